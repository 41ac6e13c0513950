"""``type = "mqtt"``: subscribe to MQTT topics (paho-mqtt 2.x), acknowledge QoS 1 only after Kafka did.

MQTT 3.1.1 or 5 (``protocol``), QoS 0/1, username + ``password_env``, TLS (``mqtts://`` with ``ca_file``),
MQTT 5 shared subscriptions (``shared_group``: ``$share/<group>/<topic>``, several attach processes split
the messages). The session is persistent (client id stable per source, clean session off / MQTT 5 session
expiry), and acknowledgements are manual: a QoS 1 message the broker sent is acknowledged (PUBACK) only
once its records and dead letters are acknowledged by Kafka, so a process killed in between gets it again
on restart (at least once). paho reconnects with back-off (1-30 s); ``/metrics`` counts reconnects.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
from typing import Any
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ingest.settings import SourceSettings
from ingest.sources.base import Source, SourceContext, now_ms
from ingest.sources.record import Parsed, Refusal, parse_payload

log = logging.getLogger("nettwin.attach.mqtt")

SESSION_EXPIRY_S = 7 * 24 * 3600


class MqttSource(Source):
    def __init__(self, cfg: SourceSettings, ctx: SourceContext) -> None:
        super().__init__(cfg, ctx)
        if not cfg.url or not cfg.topics:
            raise ValueError(f"source {cfg.name}: type mqtt needs url and topics")
        url = urlparse(cfg.url)
        if url.scheme not in ("mqtt", "mqtts"):
            raise ValueError(f"source {cfg.name}: url scheme must be mqtt:// or mqtts://, got {cfg.url!r}")
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or (8883 if url.scheme == "mqtts" else 1883)
        self.v5 = cfg.protocol == "5"
        client_id = cfg.client_id or f"nettwin-{cfg.name}-{socket.gethostname()}"
        kwargs: dict[str, Any] = {"client_id": client_id, "manual_ack": True}
        if self.v5:
            kwargs["protocol"] = mqtt.MQTTv5
        else:
            kwargs["protocol"] = mqtt.MQTTv311
            kwargs["clean_session"] = False
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, **kwargs)
        if url.scheme == "mqtts":
            self.client.tls_set(
                ca_certs=str(cfg.ca_file) if cfg.ca_file else None, tls_version=ssl.PROTOCOL_TLS_CLIENT
            )
        username = cfg.username or url.username
        if username:
            password = os.environ.get(cfg.password_env) if cfg.password_env else url.password
            self.client.username_pw_set(username, password)
        self.client.reconnect_delay_set(1, 30)
        self.client.max_inflight_messages_set(1000)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_message = self._on_message
        self.ever_connected = False

    def subscriptions(self) -> list[str]:
        group = self.cfg.shared_group
        return [f"$share/{group}/{t}" if group else t for t in self.cfg.topics]

    def start(self) -> None:
        props = None
        if self.v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = SESSION_EXPIRY_S
            self.client.connect_async(self.host, self.port, keepalive=30, clean_start=False, properties=props)
        else:
            self.client.connect_async(self.host, self.port, keepalive=30)
        self.client.loop_start()
        log.info("source %s: mqtt %s:%d topics %s", self.name, self.host, self.port, self.subscriptions())

    def close(self, timeout_s: float) -> None:
        super().close(timeout_s)
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            log.warning("source %s: MQTT connect refused: %s", self.name, reason)
            return
        if self.ever_connected:
            self.metrics.add(reconnects=1)
        self.ever_connected = True
        self.metrics.connected = 1
        client.subscribe([(t, self.cfg.qos) for t in self.subscriptions()])
        log.info(
            "source %s: connected to %s:%d (session present: %s)",
            self.name,
            self.host,
            self.port,
            getattr(flags, "session_present", "?"),
        )

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self.metrics.connected = 0
        if not self.stopping.is_set():
            log.warning("source %s: MQTT connection lost (%s); reconnecting with back-off", self.name, reason)

    def _on_connect_fail(self, client: Any, userdata: Any) -> None:
        self.metrics.add(reconnects=1)
        log.warning(
            "source %s: cannot reach MQTT broker %s:%d; retrying with back-off",
            self.name,
            self.host,
            self.port,
        )

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        self.metrics.add(messages=1)
        where = f"mqtt {msg.topic}"
        payload: bytes = msg.payload
        if len(payload) > self.cfg.max_message_bytes:
            reason = (
                f"message of {len(payload)} bytes exceeds max_message_bytes = {self.cfg.max_message_bytes}"
            )
            parsed = Parsed(refusals=[Refusal(reason, where, payload[: self.cfg.max_message_bytes])])
        else:
            parsed = parse_payload(
                payload, self.cfg.format, where, now_ms(), self.mapping, msg.topic, self.limits
            )
        mid, qos = msg.mid, msg.qos

        def done(exc: BaseException | None) -> None:
            if exc is None and qos > 0:
                client.ack(mid, qos)

        # blocking here is the back-pressure: unacknowledged messages stop the broker at its in-flight limit
        self.wait_for_room(len(parsed.records))
        if self.stopping.is_set():
            return  # not acknowledged: the persistent session redelivers it
        try:
            self.ctx.publisher.submit(self.submission(parsed, done))
        except RuntimeError:
            return  # stopping: not acknowledged, redelivered to the persistent session
