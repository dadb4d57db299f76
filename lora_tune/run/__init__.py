"""A run directory: its layout (every file name), what an output folder may lose (outputs.py), provenance, locks and
secrets."""
