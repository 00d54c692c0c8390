"""The embedded demo and the simulated city's history: configuration above the components.

The only package allowed to import every component (see ``[tool.civicmesh.boundaries]``
in pyproject.toml): it builds them through their composition roots, never wires them.
"""
