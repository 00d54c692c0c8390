"""Gateway settings: TOML file + ``CIVICMESH_GATEWAY_*`` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from civicmesh.config import MqttSection, ServiceSettings


class GatewaySettings(ServiceSettings):
    """Settings of one gateway."""

    model_config = SettingsConfigDict(
        env_prefix="CIVICMESH_GATEWAY_", extra="forbid", env_nested_delimiter="__"
    )

    key_file: Path = Field(Path("/var/lib/civicmesh/gateway.key"), description="Gateway key")
    registry_file: Path = Field(
        Path("/etc/civicmesh/registry.json"), description="Device and gateway registry"
    )
    registry_authority: str | None = Field(
        None,
        description=(
            "Public key of the central registry authority. Set: the gateway takes its "
            "registry only from snapshots signed by it (retained on civicmesh/v1/registry) "
            "and holds device batches while its newest snapshot has expired, so a "
            "revocation takes effect within a snapshot's validity"
        ),
    )
    state_dir: Path = Field(Path("/var/lib/civicmesh/gateway"), description="Holds buffer.db")
    device_mqtt: MqttSection = Field(
        default_factory=MqttSection,
        description="Broker the devices publish to",
    )
    upstream_mqtt: MqttSection = Field(
        default_factory=MqttSection,
        description="Broker of the central service (may be the same)",
    )
    buffer_max_envelopes: int = Field(
        1_000_000,
        ge=1000,
        le=100_000_000,
        description="Bound on envelopes in the buffer (confirmed ones kept for replay go first)",
    )
    buffer_max_bytes: int = Field(
        1024**3,
        ge=1024 * 1024,
        le=1024**4,
        description="Bound on the buffer's envelope bytes; past either bound the oldest "
        "unconfirmed envelopes are dropped, counted in dropped_total and logged",
    )
    gap_hold_s: float = Field(
        300.0,
        ge=0,
        le=7 * 86_400,
        description="A batch that jumps ahead of its device's chain (a seq gap: its "
        "prev_hash cannot be checked) is held, with its device's later batches, until the "
        "missing batch arrives and links it, or for this long; then it is forwarded with a "
        "chain.gap quarantine record saying it was never linked (0: forward at once, "
        "with the record)",
    )
    forward_batch_size: int = Field(200, ge=1, le=5000, description="Envelopes per publish burst")
    await_receipts: bool = Field(
        True,
        description="Keep a forwarded envelope until ingest's receipt names it "
        "(off: the upstream broker's PUBACK releases it)",
    )
    resend_after_s: float = Field(
        60.0, gt=0, le=86_400, description="Forward again an envelope still without a receipt"
    )
    keep_forwarded_hours: float = Field(
        168.0, ge=0, le=24 * 365, description="Forwarded envelopes kept for replay after a loss"
    )
    # The public audit log (issue 21): the gateway's operator witnesses the central log.
    audit_witness_key: Path | None = Field(
        None,
        description="Witness key (`civicmesh audit keygen --witness`); unset: no witnessing",
    )
    audit_log_key: str | None = Field(None, description="The central log's vkey to check")
    audit_api_url: str | None = Field(
        None, description="The central API's audit URL for proofs, e.g. https://host/api/v1/audit"
    )
