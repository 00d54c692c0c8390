"""Typed configuration: TOML file + environment overrides, unknown keys rejected by name.

Each service defines one settings model deriving from :class:`ServiceSettings` with an
``env_prefix`` (``CIVICMESH_EDGE_``, ``CIVICMESH_GATEWAY_``, ...). Precedence, highest
first: explicit overrides (CLI flags), environment, ``/run/secrets``, the TOML file,
defaults. Nested fields use ``__`` in environment names
(``CIVICMESH_EDGE_MQTT__URL``).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal, TypedDict, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from civicmesh.errors import ConfigError

SettingsT = TypeVar("SettingsT", bound="ServiceSettings")


class TlsArgs(TypedDict):
    tls_ca: str | None
    tls_cert: str | None
    tls_key: str | None


class MqttSection(BaseModel):
    """A broker connection, as every service configures it."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(
        default="mqtt://127.0.0.1:1883",
        min_length=8,
        max_length=2048,
        description="Broker URL: mqtt://[user:pass@]host[:port] or mqtts://... (TLS)",
    )
    client_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description=(
            "MQTT client id; keep it stable across restarts so the broker keeps a persistent "
            "session. Default: derived from the service's id"
        ),
    )
    protocol: Literal["auto", "5", "3.1.1"] = Field(
        default="auto",
        description="MQTT protocol: auto tries 5 first and falls back to 3.1.1",
    )

    tls_ca: Path | None = Field(
        default=None, description="CA certificate that signed the broker's (mqtts://)"
    )
    tls_cert: Path | None = Field(
        default=None,
        description="This client's certificate (`civicmesh pki client`); its CN is the MQTT user",
    )
    tls_key: Path | None = Field(default=None, description="This client's private key (0600)")

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if not value.startswith(("mqtt://", "mqtts://", "tcp://")):
            raise ValueError("must start with mqtt://, mqtts:// or tcp://")
        return value

    def require_tls_files(self, section: str, fix: str) -> None:
        """Refuse to start, in one line, when a configured TLS file is not there yet (a
        device before its enrolment): the TLS library would fail with a bare traceback."""
        missing = [
            f"{section}.{name} = {path}"
            for name, path in (
                ("tls_ca", self.tls_ca),
                ("tls_cert", self.tls_cert),
                ("tls_key", self.tls_key),
            )
            if path is not None and not path.exists()
        ]
        if missing:
            raise ConfigError(f"TLS file(s) not found: {'; '.join(missing)}. {fix}")

    def tls_args(self) -> TlsArgs:
        """The TLS keyword arguments of ``MqttLink``."""
        return {
            "tls_ca": str(self.tls_ca) if self.tls_ca else None,
            "tls_cert": str(self.tls_cert) if self.tls_cert else None,
            "tls_key": str(self.tls_key) if self.tls_key else None,
        }


class ServiceSettings(BaseSettings):
    """Base of every service's settings model."""

    model_config = SettingsConfigDict(
        extra="forbid",
        env_nested_delimiter="__",
        validate_default=True,
        secrets_dir=None,
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, file_secret_settings)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _env_layer(cls: type[ServiceSettings]) -> dict[str, Any]:
    """What the environment alone says, so it can be layered above the file."""
    data: dict[str, Any] = EnvSettingsSource(cls)()
    return data


def validation_problems(exc: ValidationError) -> list[str]:
    """One line per problem of a pydantic error, naming the key: ``unknown key 'a.b'`` or
    ``a.b: <message>`` (config files, mapping files: anything a person wrote)."""
    problems = []
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"]) or "(root)"
        if err["type"] == "extra_forbidden":
            problems.append(f"unknown key {key!r}")
        else:
            problems.append(f"{key}: {err['msg']}")
    return problems


def load_settings(
    cls: type[SettingsT], path: Path | None = None, overrides: dict[str, Any] | None = None
) -> SettingsT:
    """Build ``cls`` from defaults < TOML file < environment < overrides.

    Errors name the offending key and where it came from.
    """
    file_data: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        origin = str(path)
        try:
            file_data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"Config file {path} not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"Config file {path} is not valid TOML: {exc}") from None
    data = _merge(_merge(file_data, _env_layer(cls)), overrides or {})
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        problems = validation_problems(exc)
        prefix = cls.model_config.get("env_prefix", "")
        raise ConfigError(
            f"Invalid {cls.__name__} (from {origin}, environment {prefix}*): " + "; ".join(problems)
        ) from None
