"""The error base of the shared package.

Every error carries a machine-readable ``reason`` (dotted, stable, used in
quarantine records and metrics) and a message written for the person who reads it.
"""

from __future__ import annotations


class CivicmeshError(Exception):
    """Base of all errors raised by the shared package."""

    reason: str = "error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class ConfigError(CivicmeshError):
    """A configuration file or environment variable is invalid."""

    reason = "config.invalid"


class KeyFileError(CivicmeshError):
    """A key file is missing, unreadable, or has unsafe permissions."""

    reason = "key.file"


class RegistryError(CivicmeshError):
    """The device registry file is missing or malformed."""

    reason = "registry.invalid"


class MqttError(CivicmeshError):
    """The MQTT broker refused, dropped, or did not answer in time."""

    reason = "mqtt.error"
