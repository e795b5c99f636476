"""Implementations of the command-line tools (`tools/*.py` and the `vssl-*` console scripts)."""
