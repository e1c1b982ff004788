"""Configuration and other process-wide plumbing."""
