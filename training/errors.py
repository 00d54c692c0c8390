"""Errors of the training pipeline."""

from __future__ import annotations

from civicmesh.errors import CivicmeshError


class TrainingError(CivicmeshError):
    """A data set, a model or an export could not be made; the message says why."""
