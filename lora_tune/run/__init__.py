"""A run directory: its layout (every file name), provenance and locks."""
