"""The benchmark harness behind `python -m diffkern.bench` (also `diffkern bench`)."""
