"""civicmesh benchmarks: ``python -m bench`` (see README, "Measured figures")."""
