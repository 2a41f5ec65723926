"""Run a fleet of simulated devices against a platform, over MQTT (paho) or HTTP (httpx).

``run_simulation`` registers the devices in the catalog (fresh tokens), then every device sends
``rate`` readings per second. The main thread paces the readings; paho's MQTT clients share one
network thread; HTTP batches go through a small thread pool. Every wait is bounded.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import math
import secrets
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import orjson

from ..auth.store import Devices
from ..core.catalog import Catalog
from ..core.config import Settings
from ..core.errors import AuthError, BrokerUnavailable, ConfigError, Iot2mlError, Transient
from ..core.ids import check_device_id
from ..core.runtime import http_verify, read_run_info, tls_verify
from .scenarios import get_scenario

__all__ = ["SimulationStats", "run_simulation"]

TRANSPORTS = ("mqtt", "http")
_MAX_BURST = 2_000  # readings sent between two looks at the clock, stop flag and progress
_TICK = 0.05  # longest sleep of the pacing and network loops, seconds
_RETRY_MIN, _RETRY_MAX = 0.2, 2.0  # MQTT reconnect backoff, seconds
_CLOSE_TIMEOUT = 3.0  # seconds for the MQTT clients to say DISCONNECT


@dataclass
class SimulationStats:
    """What a simulation did. ``sent - acked - failed`` readings were never confirmed either way."""

    scenario: str
    transport: str
    devices: int
    run_id: str
    """Part of every ``msg_id`` (``{device_id}-{run_id}-{n}``), so reruns are not taken for resends."""
    sent: int = 0
    acked: int = 0
    """PUBACKs received (MQTT) or readings in 2xx answers (HTTP)."""
    failed: int = 0
    elapsed: float = 0.0
    interrupted: bool = False
    """Stopped by Ctrl-C or the ``stop`` event rather than by ``duration``."""
    per_device: dict[str, int] = field(default_factory=dict)
    """Acknowledged readings per device id."""
    errors: list[str] = field(default_factory=list)
    """The first few distinct errors met on the way."""

    @property
    def unconfirmed(self) -> int:
        return self.sent - self.acked - self.failed

    @property
    def rate(self) -> float:
        """Acknowledged readings per second."""
        return self.acked / self.elapsed if self.elapsed > 0 else 0.0


def run_simulation(
    settings: Settings,
    scenario_name: str,
    *,
    devices: int,
    rate: float,
    duration: float | None,
    transport: str = "mqtt",
    id_prefix: str | None = None,
    progress: bool = True,
    start_time: float | None = None,
    step: float | None = None,
    seed: int = 0,
    stop: threading.Event | None = None,
    mqtt_host: str | None = None,
    mqtt_port: int | None = None,
    api_url: str | None = None,
    connect_timeout: float = 10.0,
    drain_timeout: float = 10.0,
    max_pending: int = 20_000,
) -> SimulationStats:
    """Simulate ``devices`` devices of ``scenario_name``, each sending ``rate`` readings per second.

    Devices are ``{id_prefix or scenario}-{i:04d}``, registered (token rotated) in the catalog.
    ``duration`` None runs until Ctrl-C or ``stop`` is set; both end the run cleanly and return the
    stats. Readings carry ``ts`` = now, or with ``start_time`` a simulated clock starting there and
    advancing at the live pace (the k-th reading of a device at ``start_time + k / rate``, devices
    staggered within that interval) or, with ``step``, by ``step`` seconds per reading whatever the
    pace (a backfill of past days sent in seconds), and a unique ``msg_id`` ``{device_id}-{run_id}-{k}``.

    Where to send: ``mqtt_host``/``mqtt_port`` or ``api_url`` if given, else what the running
    platform recorded in ``settings.data_dir``. At most ``max_pending`` readings wait for their
    acknowledgement at once; after the last one, ``drain_timeout`` bounds the wait for the rest.
    Raises ``AuthError`` if the broker or API refuses the devices and ``BrokerUnavailable`` /
    ``Transient`` if nothing answers.
    """
    scenario = get_scenario(scenario_name)
    _check("devices", devices, isinstance(devices, int) and devices >= 1, "give a whole number >= 1")
    _check("rate", rate, rate > 0, "give readings per second per device, > 0")
    _check("duration", duration, duration is None or duration > 0, "give seconds > 0, or None to run until stopped")
    _check("transport", transport, transport in TRANSPORTS, f"use one of {', '.join(TRANSPORTS)}")
    _check("max_pending", max_pending, max_pending >= 1, "give a whole number >= 1")
    prefix = id_prefix or scenario.name
    ids = [f"{prefix}-{i:04d}" for i in range(devices)]
    check_device_id(ids[-1])

    if transport == "mqtt":
        host, port = _mqtt_address(settings, mqtt_host, mqtt_port)
    else:
        url = _api_url(settings, api_url)
        verify = True if api_url else tls_verify(read_run_info(settings.data_dir, "api"))

    catalog = Catalog(settings.catalog)
    try:
        store = Devices(catalog)
        tokens = [store.add_device(d, scenario.device_type, rotate=True) for d in ids]
    finally:
        catalog.close()

    # Wine stations and viscosity meters name their batches / samples after the device id: give them
    # the id they send as (with --id-prefix it is not the scenario's default), so the references match.
    named = "device_id" in inspect.signature(scenario.make_device).parameters
    models = [scenario.make_device(i, seed, device_id=ids[i]) if named else scenario.make_device(i, seed)
              for i in range(devices)]
    stats = SimulationStats(scenario.name, transport, devices, secrets.token_hex(3))
    fleet: _Fleet
    if transport == "mqtt":
        fleet = _MqttFleet(host, port, ids, tokens)
    else:
        fleet = _HttpFleet(url, ids, tokens, verify=verify)
    started = time.monotonic()
    try:
        fleet.connect(connect_timeout)
        with _progress_bar(progress, scenario.name, devices, rate, duration, transport) as show:
            try:
                _pace(fleet, models, ids, stats, rate=rate, duration=duration, start_time=start_time, step=step,
                      stop=stop, max_pending=max_pending, show=show)
            except KeyboardInterrupt:
                stats.interrupted = True
            with contextlib.suppress(KeyboardInterrupt):  # a second Ctrl-C skips the drain
                fleet.drain(drain_timeout, show)
    finally:
        fleet.close()
        stats.elapsed = time.monotonic() - started
        stats.sent, stats.acked, stats.failed = fleet.totals()
        stats.per_device = dict(zip(ids, fleet.acked))
        stats.errors = list(fleet.errors)
    return stats


def _check(key: str, value: Any, ok: bool, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not valid: {fix}")


def _mqtt_address(settings: Settings, host: str | None, port: int | None) -> tuple[str, int]:
    if host is None or port is None:
        info = read_run_info(settings.data_dir, "broker")
        host = host or info["host"]
        if not port and not info.get("mqtt_port"):
            raise ConfigError("the platform runs without plain MQTT (--no-plain-mqtt): simulated devices log in "
                              "with tokens, so use --transport http, or start it with plain MQTT on")
        port = port or int(info["mqtt_port"])
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    return host, port


def _api_url(settings: Settings, url: str | None) -> str:
    if url is None:
        url = str(read_run_info(settings.data_dir, "api")["url"])
    return url.rstrip("/")


# ---- pacing ---------------------------------------------------------------------------------
def _pace(
    fleet: _Fleet,
    models: list[Any],
    ids: list[str],
    stats: SimulationStats,
    *,
    rate: float,
    duration: float | None,
    start_time: float | None,
    stop: threading.Event | None,
    step: float | None = None,
    max_pending: int,
    show: Callable[[_Fleet, bool], None],
) -> None:
    """Send reading ``j`` (device ``j % n``, its ``j // n``-th) at ``j / (n * rate)`` seconds."""
    n = len(ids)
    total_rate = n * rate
    planned = n * max(1, math.ceil(duration * rate - 1e-9)) if duration is not None else None
    deadline = None if duration is None else duration + max(1.0, 0.1 * duration)  # grace to catch up
    tags = [f"{d}-{stats.run_id}-" for d in ids]
    dumps = orjson.dumps
    t0 = time.monotonic()
    j = 0
    while True:
        if stop is not None and stop.is_set():
            stats.interrupted = True
            return
        if planned is not None and j >= planned:
            return
        elapsed = time.monotonic() - t0
        if deadline is not None and elapsed >= deadline:
            fleet.note(f"could not keep up: sent {j} of {planned} readings in {deadline:.1f}s")
            return
        fleet.raise_fatal()
        due = int(elapsed * total_rate) + 1
        if planned is not None:
            due = min(due, planned)
        burst = min(due - j, _MAX_BURST, max_pending - fleet.pending())
        for _ in range(max(0, burst)):
            i, k = j % n, j // n
            if start_time is None:
                ts = time.time()
            elif step is not None:  # simulated clock: step seconds per reading, devices staggered
                ts = start_time + k * step + i * step / n
            else:
                ts = start_time + j / total_rate
            reading = models[i].reading(ts)
            fleet.send(i, dumps({"ts": round(ts, 3), "msg_id": f"{tags[i]}{k}", **reading}))
            j += 1
        fleet.poll()
        show(fleet, False)
        if j < due:  # held back by max_pending: wait for acknowledgements
            time.sleep(0.005)
            continue
        wait = t0 + j / total_rate - time.monotonic()
        if wait > 0:
            time.sleep(min(wait, _TICK))


@contextlib.contextmanager
def _progress_bar(
    enabled: bool, name: str, devices: int, rate: float, duration: float | None, transport: str,
) -> Iterator[Callable[[_Fleet, bool], None]]:
    if not enabled:
        yield lambda fleet, force: None
        return
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    total = devices * max(1, math.ceil(duration * rate - 1e-9)) if duration is not None else None
    columns = [
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("sent {task.fields[sent]:,}  acked {task.fields[acked]:,}  failed {task.fields[failed]:,}"),
        TextColumn("[cyan]{task.fields[speed]:,.0f} msg/s"),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, refresh_per_second=8) as bar:
        task = bar.add_task(f"{name} x{devices} over {transport}", total=total, sent=0, acked=0, failed=0, speed=0.0)
        started = time.monotonic()
        last = [0.0]

        def show(fleet: _Fleet, force: bool) -> None:
            now = time.monotonic()
            if not force and now - last[0] < 0.1:
                return
            last[0] = now
            sent, acked, failed = fleet.totals()
            speed = acked / (now - started) if now > started else 0.0
            bar.update(task, completed=sent, sent=sent, acked=acked, failed=failed, speed=speed)

        yield show


# ---- transports ----------------------------------------------------------------------------
class _Fleet:
    """The devices' connections: send one encoded reading for device ``i``; count acknowledgements."""

    def __init__(self, ids: list[str], tokens: list[str]) -> None:
        self.ids, self.tokens = ids, tokens
        self.sent = [0] * len(ids)
        self.acked = [0] * len(ids)
        self.failed = [0] * len(ids)
        self.errors: list[str] = []
        self.fatal: Iot2mlError | None = None

    def note(self, error: str) -> None:
        if len(self.errors) < 10 and error not in self.errors:
            self.errors.append(error)

    def totals(self) -> tuple[int, int, int]:
        return sum(self.sent), sum(self.acked), sum(self.failed)

    def pending(self) -> int:
        sent, acked, failed = self.totals()
        return sent - acked - failed

    def raise_fatal(self) -> None:
        if self.fatal is not None:
            raise self.fatal

    def connect(self, timeout: float) -> None:
        raise NotImplementedError

    def send(self, i: int, payload: bytes) -> None:
        raise NotImplementedError

    def poll(self) -> None:
        """Periodic work between bursts (HTTP: post batches that are due)."""

    def drain(self, timeout: float, show: Callable[[_Fleet, bool], None]) -> None:
        """Wait up to ``timeout`` for every sent reading to be confirmed or failed."""
        deadline = time.monotonic() + timeout
        while self.pending() > 0 and time.monotonic() < deadline:
            self.poll()
            show(self, False)
            time.sleep(0.02)
        show(self, True)

    def close(self) -> None:
        raise NotImplementedError


class _MqttFleet(_Fleet):
    """One paho client per device (QoS 1), all driven by one network thread through an epoll/kqueue
    selector. Paho's own loop uses ``select()``, which fails past descriptor 1023: with a thread and
    a socket pair per client that caps a process at ~340 devices.

    Only the network thread touches the clients; the main thread hands it readings via a queue.
    """

    def __init__(self, host: str, port: int, ids: list[str], tokens: list[str]) -> None:
        super().__init__(ids, tokens)
        self.host, self.port = host, port
        self.topics = [f"devices/{d}/telemetry" for d in ids]
        self.clients: list[Any] = []
        self.connected = [threading.Event() for _ in ids]
        self.refused: dict[int, str] = {}
        self.queue: collections.deque[tuple[int, bytes]] = collections.deque()
        self.selector = selectors.DefaultSelector()
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self.selector.register(self.wake_r, selectors.EVENT_READ, None)
        self.woken = False
        self.retry_at: dict[int, float] = {}
        self.delay = [_RETRY_MIN] * len(ids)
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="iot2ml-sim-mqtt", daemon=True)

    # ---- main thread ----------------------------------------------------------------------
    def connect(self, timeout: float) -> None:
        import paho.mqtt.client as mqtt

        _raise_fd_limit(len(self.ids) + 256)
        for i, (device, token) in enumerate(zip(self.ids, self.tokens)):
            client = mqtt.Client(
                mqtt.CallbackAPIVersion.VERSION2, client_id=device, protocol=mqtt.MQTTv311,
                clean_session=True, userdata=i,
            )
            client.username_pw_set(device, token)
            client.max_inflight_messages_set(100)
            client.max_queued_messages_set(0)
            client.connect_timeout = min(5.0, timeout)
            client.on_connect = self._on_connect
            client.on_disconnect = self._on_disconnect
            client.on_publish = self._on_publish
            client.on_socket_open = self._on_socket_open
            client.on_socket_close = self._on_socket_close
            client.on_socket_register_write = self._on_register_write
            client.on_socket_unregister_write = self._on_unregister_write
            client.connect_async(self.host, self.port, keepalive=30)
            self.clients.append(client)
        now = time.monotonic()
        self.retry_at = dict.fromkeys(range(len(self.ids)), now)
        self.thread.start()
        deadline = now + timeout
        for event in self.connected:
            event.wait(max(0.0, deadline - time.monotonic()))
        missing = [i for i, e in enumerate(self.connected) if not e.is_set()]
        if not missing:
            return
        refused = [i for i in missing if i in self.refused]
        where = f"MQTT broker at {self.host}:{self.port}"
        if refused:
            first = refused[0]
            raise AuthError(
                f"{where} refused {len(refused)} of {len(self.ids)} devices for {timeout:.0f}s "
                f"(e.g. {self.ids[first]!r}: {self.refused[first]}): check that the broker uses this "
                "data dir's catalog"
            )
        if len(missing) < len(self.ids):
            raise BrokerUnavailable(
                f"{where} accepted only {len(self.ids) - len(missing)} of {len(self.ids)} devices within "
                f"{timeout:.0f}s: simulate fewer devices, or raise the broker's connection limits"
            )
        raise BrokerUnavailable(
            f"{where} accepted none of {len(self.ids)} devices within {timeout:.0f}s "
            f"({self.errors[0] if self.errors else 'no answer'}): start the platform with 'iot2ml up' "
            "or pass the broker's host and port"
        )

    def send(self, i: int, payload: bytes) -> None:
        self.sent[i] += 1
        self.queue.append((i, payload))
        if not self.woken:
            self.woken = True
            with contextlib.suppress(BlockingIOError):
                self.wake_w.send(b"\0")

    def close(self) -> None:
        self.stopping = True
        with contextlib.suppress(OSError):
            self.wake_w.send(b"\0")
        if self.thread.is_alive():
            self.thread.join(_CLOSE_TIMEOUT + 2.0)
        if not self.thread.is_alive():
            self.selector.close()
            self.wake_r.close()
            self.wake_w.close()

    # ---- network thread -------------------------------------------------------------------
    def _run(self) -> None:
        import paho.mqtt.client as mqtt

        ok = (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN)  # NO_CONN: kept for the reconnect
        clients, queue, topics = self.clients, self.queue, self.topics
        next_misc = 0.0
        closing_since: float | None = None
        while True:
            if self.stopping and closing_since is None:
                closing_since = time.monotonic()
                self.retry_at.clear()
                for client in clients:
                    client.disconnect()
            if closing_since is not None and (
                len(self.selector.get_map()) <= 1 or time.monotonic() - closing_since > _CLOSE_TIMEOUT
            ):
                return
            for key, mask in self.selector.select(_TICK):
                client = key.data
                if client is None:
                    self.woken = False
                    with contextlib.suppress(BlockingIOError):
                        while self.wake_r.recv(4096):
                            pass
                    continue
                if mask & selectors.EVENT_READ:
                    client.loop_read()
                if mask & selectors.EVENT_WRITE:
                    client.loop_write()
            while queue and closing_since is None:
                i, payload = queue.popleft()
                info = clients[i].publish(topics[i], payload, qos=1)
                if info.rc not in ok:
                    self.failed[i] += 1
                    self.note(f"{self.ids[i]}: publish failed: {mqtt.error_string(info.rc)}")
            now = time.monotonic()
            for i, at in list(self.retry_at.items()):
                if at <= now:
                    del self.retry_at[i]
                    try:
                        clients[i].reconnect()
                    except OSError as err:
                        self.note(f"{self.ids[i]}: cannot connect: {err}")
                        self._retry(i)
            if now >= next_misc:
                next_misc = now + 1.0
                for client in clients:
                    client.loop_misc()  # keepalive pings

    def _retry(self, i: int) -> None:
        if not self.stopping:
            self.retry_at[i] = time.monotonic() + self.delay[i]
            self.delay[i] = min(self.delay[i] * 2, _RETRY_MAX)

    def _on_connect(self, client: Any, i: int, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            self.refused[i] = str(reason)
            self.note(f"{self.ids[i]}: CONNACK {reason}")
        else:
            self.refused.pop(i, None)
            self.delay[i] = _RETRY_MIN
            self.connected[i].set()

    def _on_disconnect(self, client: Any, i: int, flags: Any, reason: Any, properties: Any) -> None:
        self._retry(i)

    def _on_publish(self, client: Any, i: int, mid: int, reason: Any, properties: Any) -> None:
        self.acked[i] += 1

    def _on_socket_open(self, client: Any, i: int, sock: Any) -> None:
        self.selector.register(sock, selectors.EVENT_READ, client)

    def _on_socket_close(self, client: Any, i: int, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(sock)

    def _on_register_write(self, client: Any, i: int, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)

    def _on_unregister_write(self, client: Any, i: int, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.modify(sock, selectors.EVENT_READ, client)


class _HttpFleet(_Fleet):
    """Readings buffered per device and posted as JSON arrays by a small thread pool."""

    def __init__(
        self, url: str, ids: list[str], tokens: list[str], *, batch_max: int = 200, flush_every: float = 0.25,
        verify: bool | str = True,
    ) -> None:
        super().__init__(ids, tokens)
        self.url = url
        self.verify = verify
        self.batch_max, self.flush_every = batch_max, flush_every
        self.buffers: list[list[bytes]] = [[] for _ in ids]
        self.last_flush = time.monotonic()
        self.lock = threading.Lock()
        self.workers = max(1, min(8, len(ids)))
        self.futures: set[Any] = set()
        self.client: Any = None
        self.pool: Any = None

    def connect(self, timeout: float) -> None:
        from concurrent.futures import ThreadPoolExecutor

        import httpx

        self.client = httpx.Client(
            timeout=httpx.Timeout(timeout), limits=httpx.Limits(max_connections=self.workers),
            verify=http_verify(self.verify),
        )
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="iot2ml-sim-http")

    def send(self, i: int, payload: bytes) -> None:
        buf = self.buffers[i]
        buf.append(payload)
        if len(buf) >= self.batch_max:
            self._post(i)

    def poll(self) -> None:
        self.futures = {f for f in self.futures if not f.done()}
        now = time.monotonic()
        if now - self.last_flush >= self.flush_every:
            self.last_flush = now
            for i, buf in enumerate(self.buffers):
                if buf:
                    self._post(i)

    def pending(self) -> int:
        return super().pending() + sum(len(b) for b in self.buffers)

    def drain(self, timeout: float, show: Callable[[_Fleet, bool], None]) -> None:
        self.last_flush = 0.0
        self.poll()
        super().drain(timeout, show)

    def _post(self, i: int) -> None:
        body = b"[" + b",".join(self.buffers[i]) + b"]"
        count = len(self.buffers[i])
        self.buffers[i] = []
        with self.lock:
            self.sent[i] += count
        self.futures.add(self.pool.submit(self._request, i, body, count))

    def _request(self, i: int, body: bytes, count: int) -> None:
        import httpx

        device = self.ids[i]
        try:
            answer = self.client.post(
                f"{self.url}/api/v1/devices/{device}/telemetry", content=body,
                headers={"Authorization": f"Bearer {self.tokens[i]}", "Content-Type": "application/json"},
            )
        except httpx.HTTPError as err:
            with self.lock:
                self.failed[i] += count
            self.note(f"{device}: {type(err).__name__}: {err}")
            if isinstance(err, httpx.ConnectError) and not any(self.acked):
                self.fatal = Transient(
                    f"no iot2ml API answered at {self.url} ({err}): start it with 'iot2ml up' or pass api_url"
                )
            return
        with self.lock:
            if answer.is_success:
                self.acked[i] += count
                return
            self.failed[i] += count
        self.note(f"{device}: HTTP {answer.status_code}: {answer.text[:200]}")
        if answer.status_code in (401, 403):
            self.fatal = AuthError(
                f"API at {self.url} refused device {device!r} with HTTP {answer.status_code}: "
                "check that the API uses this data dir's catalog"
            )

    def close(self) -> None:
        from concurrent.futures import wait

        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            wait(self.futures, timeout=10.0)  # requests still running end within the client timeout
        if self.client is not None:
            self.client.close()


def _raise_fd_limit(needed: int) -> None:
    """One descriptor per device: lift the soft limit towards the hard one if short."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
