"""Evaluation of a run against its base: running it, scores, result and reports."""
