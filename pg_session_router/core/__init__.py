"""The bottom layer: settings and the error hierarchy. Imports nothing else of the library."""
