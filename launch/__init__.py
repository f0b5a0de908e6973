"""Command line, experiment configs and launch helpers."""
