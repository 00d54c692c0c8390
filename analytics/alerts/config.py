"""Alert rules and contact points as typed settings (``[alerts]`` in the central config).

Every rule kind is its own model, chosen by ``kind``; unknown keys are rejected and every
number is bounded, so a typo fails at start-up with the key's name, never at 3 a.m.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

_ID_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
WEEK_MIN = 7 * 24 * 60
MIN_SECRET_BYTES = 16

# US EPA AQI categories above Good, lowest first (analytics.aqi.EPA_CATEGORIES)
AqiLevel = Literal[
    "Moderate", "Unhealthy for Sensitive Groups", "Unhealthy", "Very Unhealthy", "Hazardous"
]
Severity = Literal["info", "warning", "critical"]


class _Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=_ID_PATTERN, description="Stable rule id (part of every alert)")
    severity: Severity = Field(default="warning", description="info, warning or critical")
    cooldown_s: float = Field(
        default=3600.0,
        ge=0,
        le=7 * 86_400,
        description="After an alert of this rule and subject resolves, no new one opens for "
        "this long (a flapping condition makes one alert, not many)",
    )
    contact_points: list[str] = Field(
        default_factory=list,
        max_length=20,
        description="Names of the contact points notified; empty: every contact point",
    )


class _ZoneRule(_Rule):
    zones: list[str] = Field(
        default_factory=list, max_length=1000, description="Only these zones; empty: every zone"
    )


class AqiCategoryRule(_ZoneRule):
    """A zone's current US AQI (NowCast, as the dashboard shows it) at or above ``level``
    in every hour for at least ``for_minutes``."""

    kind: Literal["aqi_category"]
    level: AqiLevel = Field(description="US EPA AQI category, e.g. Unhealthy for Sensitive Groups")
    for_minutes: int = Field(
        default=60,
        ge=0,
        le=WEEK_MIN,
        description="Minimum duration (minutes) before the alert fires; counted from the "
        "start of the first hour at or above the level",
    )


class WhoExceedanceRule(_ZoneRule):
    """Hours in the last ``period_hours`` whose zone mean lay above the WHO 2021 guideline
    (24-hour level; ozone: 8-hour level) reach ``min_hours``."""

    kind: Literal["who_exceedance"]
    metric: Literal["pm25", "pm10", "no2", "o3", "co"] = Field(description="The pollutant")
    period_hours: int = Field(default=24, ge=1, le=24 * 31, description="Look-back period (h)")
    min_hours: int = Field(
        default=8, ge=1, le=24 * 31, description="Hours above the guideline that fire the alert"
    )

    @model_validator(mode="after")
    def _hours_fit(self) -> WhoExceedanceRule:
        if self.min_hours > self.period_hours:
            raise ValueError(
                f"min_hours ({self.min_hours}) cannot exceed period_hours ({self.period_hours})"
            )
        return self


class CompletenessRule(_Rule):
    """A device sent less than ``below`` of its expected readings over the last
    ``window_hours`` whole hours (devices silent for the whole window: see offline)."""

    kind: Literal["completeness"]
    below: float = Field(default=0.8, gt=0, le=1, description="Completeness ratio (0-1)")
    window_hours: int = Field(default=6, ge=1, le=24 * 31, description="Whole hours looked at")
    interval_s: int = Field(
        default=60, ge=1, le=86_400, description="Expected seconds between a metric's readings"
    )


class DeviceOfflineRule(_Rule):
    """An active device's newest reading is older than ``after_minutes``."""

    kind: Literal["device_offline"]
    after_minutes: int = Field(default=15, ge=1, le=WEEK_MIN, description="Minutes of silence")


class FaultFlagsRule(_Rule):
    """A device sent at least ``min_readings`` fault-flagged readings (stuck, spike, drift,
    out of range, implausible) in the last ``window_minutes``."""

    kind: Literal["fault_flags"]
    window_minutes: int = Field(default=60, ge=1, le=WEEK_MIN, description="Look-back (min)")
    min_readings: int = Field(default=10, ge=1, le=1_000_000, description="Flagged readings")


class QuarantineBurstRule(_Rule):
    """At least ``min_records`` of a device's batches were quarantined in the last
    ``window_minutes``."""

    kind: Literal["quarantine_burst"]
    window_minutes: int = Field(default=15, ge=1, le=WEEK_MIN, description="Look-back (min)")
    min_records: int = Field(default=5, ge=1, le=1_000_000, description="Quarantine records")


AlertRule = Annotated[
    AqiCategoryRule
    | WhoExceedanceRule
    | CompletenessRule
    | DeviceOfflineRule
    | FaultFlagsRule
    | QuarantineBurstRule,
    Field(discriminator="kind"),
]


class WebhookContactPoint(BaseModel):
    """An HTTP(S) endpoint that receives each alert event as a signed JSON POST."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=_ID_PATTERN, description="Name rules refer to")
    kind: Literal["webhook"] = Field(default="webhook", description="webhook")
    url: str = Field(min_length=8, max_length=2048, description="http:// or https:// URL")
    secret_file: Path | None = Field(
        default=None, description="File holding the HMAC-SHA256 key (at least 16 bytes)"
    )
    secret: SecretStr | None = Field(
        default=None, description="The HMAC key itself (prefer secret_file)"
    )
    timeout_s: float = Field(default=10.0, gt=0, le=120, description="Per attempt")
    max_attempts: int = Field(default=10, ge=1, le=100, description="Attempts before giving up")
    retry_initial_s: float = Field(
        default=5.0, ge=0.01, le=3600, description="Wait after the first failure; doubles"
    )
    retry_max_s: float = Field(default=600.0, ge=0.01, le=86_400, description="Longest wait")

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        return value

    @model_validator(mode="after")
    def _one_secret(self) -> WebhookContactPoint:
        if (self.secret_file is None) == (self.secret is None):
            raise ValueError("set exactly one of secret_file and secret (the HMAC key)")
        return self

    def key(self) -> bytes:
        """The HMAC key; ValueError names the contact point when it is missing or short."""
        if self.secret_file is not None:
            try:
                key = self.secret_file.read_bytes().strip()
            except OSError as exc:
                raise ValueError(
                    f"alerts contact point {self.name!r}: cannot read secret_file "
                    f"{self.secret_file} ({exc.strerror})"
                ) from None
        else:
            assert self.secret is not None
            key = self.secret.get_secret_value().encode()
        if len(key) < MIN_SECRET_BYTES:
            raise ValueError(
                f"alerts contact point {self.name!r}: the webhook secret is shorter than "
                f"{MIN_SECRET_BYTES} bytes (make one: head -c 32 /dev/urandom | base64)"
            )
        return key


class AlertSettings(BaseModel):
    """Alert rules, where alerts go, and how often they are evaluated."""

    model_config = ConfigDict(extra="forbid")

    interval_s: float = Field(
        default=60.0, ge=1, le=86_400, description="Seconds between two evaluations of the rules"
    )
    state_file: Path = Field(
        default=Path("var/alerts.db"),
        description="SQLite file with open and past alerts and the delivery queue (survives "
        "restarts; the API reads it too)",
    )
    public_url: str = Field(
        default="",
        max_length=2048,
        description="The dashboard's public base URL (https://air.example.org), put before "
        "the zone links in alerts; empty: links stay relative (/dashboard/#/zone/...)",
    )
    history_days: float = Field(
        default=90.0, gt=0, le=3650, description="Keep resolved alerts and deliveries this long"
    )
    rules: list[AlertRule] = Field(
        default_factory=list, max_length=500, description="The rules; none: no evaluation"
    )
    contact_points: list[WebhookContactPoint] = Field(
        default_factory=list, max_length=50, description="Where alert events are delivered"
    )

    @model_validator(mode="after")
    def _names_resolve(self) -> AlertSettings:
        ids = [r.id for r in self.rules]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"rule ids must be unique; repeated: {', '.join(dupes)}")
        names = [c.name for c in self.contact_points]
        if len(set(names)) != len(names):
            raise ValueError("contact point names must be unique")
        for rule in self.rules:
            unknown = sorted(set(rule.contact_points) - set(names))
            if unknown:
                raise ValueError(
                    f"rule {rule.id!r} names unknown contact points {', '.join(unknown)} "
                    f"(known: {', '.join(names) or 'none'})"
                )
        return self
