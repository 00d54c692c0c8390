"""The composition root of the edge agent: settings in, an agent with its driver, models
and link out. ``civicmesh edge run``, the demo and the edge benchmark build it here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from civicmesh.drivers import SensorDriver, load_driver
from civicmesh.identity import Signer, load_device_signer
from civicmesh.mqtt import MqttLink
from edge.agent import Clock, EdgeAgent
from edge.settings import EdgeSettings


def agent_link(settings: EdgeSettings, device_id: str) -> MqttLink:
    """The agent's own broker connection (client id per device unless configured)."""
    return MqttLink(
        settings.mqtt.url,
        settings.mqtt.client_id or f"civicmesh-edge-{device_id}",
        protocol=settings.mqtt.protocol,
        **settings.mqtt.tls_args(),
    )


@dataclass
class EdgeNode:
    """A built agent and the link it owns (None when the caller passed a shared one)."""

    agent: EdgeAgent
    link: MqttLink | None

    def close(self) -> None:
        if self.link is not None:
            self.link.close()
        self.agent.close()


def build(
    settings: EdgeSettings,
    *,
    signer: Signer | None = None,
    driver: SensorDriver | None = None,
    link: MqttLink | Literal["own"] | None = "own",
    clock: Clock | None = None,
) -> EdgeNode:
    """The agent ``settings`` describe. ``signer`` and ``driver`` default to the key file
    and the configured driver (from the driver registry); ``link`` to a link of its own
    (not yet connected). Several simulated devices can share one ``link`` (the demo
    does); ``None`` runs the agent without a broker (the edge benchmark)."""
    signer = signer or load_device_signer(settings.key_file)
    driver = driver or load_driver(settings.driver.name, settings.driver.options)
    own = agent_link(settings, signer.key_id) if link == "own" else None
    agent = EdgeAgent(settings, signer, driver, own if link == "own" else link, clock)
    return EdgeNode(agent, own)
