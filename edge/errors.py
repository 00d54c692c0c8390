"""Errors of the edge models and their updates."""

from __future__ import annotations

from edge import EdgeError


class ModelError(EdgeError):
    """A model is missing, does not load, or gave unusable outputs; readings stay raw."""

    reason = "model.error"


class ReleaseRefused(EdgeError):
    """A model release was not installed; ``reason`` says why (signature, hash, ...)."""

    reason = "release.refused"
