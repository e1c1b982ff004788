"""The example HTTP API."""
