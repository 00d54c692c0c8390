"""The importer's error: a message for the person running ``civicmesh import``."""

from __future__ import annotations

from civicmesh.errors import CivicmeshError


class ArchiveError(CivicmeshError):
    """An archive, a mapping file or the import state cannot be used as given."""

    reason = "import.invalid"
