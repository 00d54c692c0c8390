"""Edge agent settings: TOML file + ``CIVICMESH_EDGE_*`` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import SettingsConfigDict

from civicmesh.config import MqttSection, ServiceSettings


class DriverSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("sim", description="Driver name (see civicmesh.drivers) or module:Class")
    options: dict[str, Any] = Field(default_factory=dict, description="Driver keyword options")


class ModelsSection(BaseModel):
    """On-device models and their over-the-air updates (see edge.ota)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="Run models and take model releases")
    dir: Path | None = Field(None, description="Where releases are kept; default state_dir/models")
    group: str = Field(
        "default",
        pattern=r"^[A-Za-z0-9_.-]{1,32}$",
        description="Rollout group: the device takes releases published to this group only",
    )
    sensor_types: list[str] = Field(
        default_factory=list,
        description="Sensor types on this device (e.g. purpleair-pa-ii); a release names "
        "the types it is for ('*' = any)",
    )
    release_keys: list[str] = Field(
        default_factory=list,
        description="Public keys (base64) whose signature a release needs; none = refuse all",
    )
    calibrate: list[str] = Field(
        default_factory=list,
        description="Metrics this device expects a calibration model for: while none works "
        "their readings carry the UNCALIBRATED flag",
    )
    install: list[Path] = Field(
        default_factory=list,
        description="Release files to install at start (verified like an over-the-air one)",
    )


class EdgeSettings(ServiceSettings):
    """Settings of one edge agent (one device)."""

    model_config = SettingsConfigDict(
        env_prefix="CIVICMESH_EDGE_", extra="forbid", env_nested_delimiter="__"
    )

    key_file: Path = Field(Path("/var/lib/civicmesh/device.key"), description="Device key (0600)")
    state_dir: Path = Field(Path("/var/lib/civicmesh"), description="Holds outbox.db")
    mqtt: MqttSection = Field(default_factory=MqttSection)
    driver: DriverSection = Field(default_factory=DriverSection)  # type: ignore[arg-type]
    window_s: int = Field(60, ge=1, le=3600, description="Window length of one reading")
    batch_max_readings: int = Field(500, ge=1, le=5000, description="Readings per sealed batch")
    publish_interval_s: float = Field(10.0, gt=0, le=3600, description="Seconds between flushes")
    outbox_max_readings: int = Field(
        500_000,
        ge=1000,
        le=50_000_000,
        description="Bound on all readings in the outbox: unsealed ones and those in sealed "
        "batches not yet confirmed",
    )
    outbox_max_bytes: int = Field(
        256 * 1024 * 1024,
        ge=64 * 1024,
        le=64 * 1024**3,
        description="Bound on the outbox's size in bytes (sealed messages plus about 64 bytes "
        "per unsealed reading)",
    )
    outbox_min_free_bytes: int = Field(
        16 * 1024 * 1024,
        ge=0,
        le=64 * 1024**3,
        description="Free disk space the outbox leaves on its file system: below it the "
        "overflow policy applies as if the outbox were full (0: no reserve)",
    )
    outbox_overflow: Literal["drop_oldest"] = Field(
        "drop_oldest",
        description="Past any bound the oldest data is dropped first (sealed batches, then "
        "unsealed readings), counted in dropped_total, logged at warning",
    )
    await_receipts: bool = Field(
        True,
        description="Keep a published batch until the gateway's receipt names it "
        "(off: the broker's PUBACK releases it, for a setup without a civicmesh gateway)",
    )
    resend_after_s: float = Field(
        60.0, gt=0, le=86_400, description="Publish again a batch still without a receipt"
    )
    health_interval_s: float = Field(60.0, gt=0, description="Seconds between health messages")
    models: ModelsSection = Field(default_factory=ModelsSection)  # type: ignore[arg-type]
