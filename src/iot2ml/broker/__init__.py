"""Run and talk to the message broker: the embedded NATS server (MQTT + JetStream) or an external MQTT broker."""

from .nats import EmbeddedNats, nats_server_binary, render_config

__all__ = ["EmbeddedNats", "nats_server_binary", "render_config"]
