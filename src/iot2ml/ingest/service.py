"""``iot2ml ingest``: read the telemetry stream and commit it to the lake exactly once.

How exactly-once works: every message has a stream sequence number. Each lake commit records
``(app_id, highest sequence in the batch)`` as a Delta ``txn`` action in the same atomic commit as
the rows. ``raw`` is committed last, so on start the ingest resumes after raw's sequence and, for
every other table, skips rows whose sequence that table already holds. No broker acks are needed: the
lake is the consumer position. Resends by devices (same ``device_id`` + ``msg_id``) are dropped
within ``dedup_window``.

Limits: each device's messages and payload bytes are checked against its buckets
(``auth.limits.DeviceLimiter``, settings ``limit_device_*``) on the broker's timestamps, so a backlog
drained after an outage is judged at the rate it was sent, not the rate it is read. The excess is
dead-lettered with the limit as reason. The buckets live in memory: after a restart a replayed batch
is decided afresh (devices start with full buckets).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from ..auth.limits import DeviceLimiter
from ..core.config import Settings
from ..core.devices import DeviceDirectory
from ..core.errors import LakeUnavailable
from ..core.storage import TableStore
from ..core.tables import BASE_COLUMNS, DEAD_LETTERS, RAW
from ..core.transport import STREAM, TELEMETRY_SUBJECT
from .consumer import OrderedReader
from .decode import Decoded, Decoder, InMessage, kind_of
from .metrics import metrics

log = logging.getLogger("iot2ml.ingest")

APP_ID = "iot2ml-ingest"


@dataclass
class IngestStats:
    """Counters of one ingest run (also exported as Prometheus metrics)."""

    messages: int = 0
    readings: int = 0
    dead: int = 0
    duplicates: int = 0
    batches: int = 0
    committed_seq: int = 0
    started_at: float = field(default_factory=time.time)


class _DeviceTypes:
    """``device_id -> type`` from the device registry, reloaded on a miss (at most once a second)."""

    def __init__(self, devices: DeviceDirectory) -> None:
        self.devices = devices
        self._map: dict[str, str] = {}
        self._declared: dict[str, dict[str, str]] = {}
        self._loaded_at = 0.0
        self.reload()

    def reload(self) -> None:
        self._map = self.devices.device_types()
        self._declared = {t.name: t.schema for t in self.devices.list_types() if t.schema}
        self._loaded_at = time.monotonic()

    def __call__(self, device_id: str) -> str | None:
        found = self._map.get(device_id)
        if found is None and time.monotonic() - self._loaded_at > 1.0:
            self.reload()
            found = self._map.get(device_id)
        return found

    @property
    def declared(self) -> dict[str, dict[str, str]]:
        return self._declared


def _parse_reply(reply: str) -> tuple[int, int]:
    """Stream sequence and broker timestamp (µs) from a JetStream ack subject."""
    tokens = reply.split(".")
    if len(tokens) == 9:  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
        return int(tokens[5]), int(tokens[7]) // 1000
    # $JS.ACK.<domain>.<account>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>[.<token>]
    return int(tokens[7]), int(tokens[9]) // 1000


class LakeWriter:
    """Decodes batches and commits them table by table, exactly once (runs in a worker thread)."""

    def __init__(self, lake: TableStore, decoder: Decoder, *, app_id: str = APP_ID) -> None:
        self.lake = lake
        self.decoder = decoder
        self.app_id = app_id
        self.marks: dict[str, int] = {}
        for table in lake.tables():
            self.marks[table] = lake.txn_version(table, app_id) or 0

    @property
    def resume_after(self) -> int:
        """Every message up to this sequence is in every table."""
        return self.marks.get(RAW, 0)

    def write(self, messages: list[InMessage]) -> tuple[int, int, int, int]:
        """Decode and commit a batch; returns (readings, dead letters, duplicates, highest sequence)."""
        return self.commit(self.decoder.decode(messages))

    def commit(self, decoded: Decoded) -> tuple[int, int, int, int]:
        """Commit a decoded batch table by table (raw last); batches must come in sequence order."""
        seq_hi = decoded.seq_hi
        plan: list[tuple[str, pa.Table, list[str] | None]] = [
            (name, table, None) for name, table in sorted(decoded.curated.items())
        ]
        plan.append((DEAD_LETTERS, decoded.dead_letters, ["day"]))
        plan.append((RAW, decoded.raw, ["day"]))  # last: its mark is where a restart resumes
        for name, table, partition_by in plan:
            mark = self.marks.get(name, 0)
            if seq_hi <= mark:
                continue
            if mark and table.num_rows:
                table = table.filter(pc.greater(table["_seq"], mark))
            if table.num_rows == 0:
                continue
            self._append(name, table, seq_hi, partition_by)
        return decoded.readings, decoded.dead, decoded.duplicates, seq_hi

    def _append(self, name: str, table: pa.Table, seq_hi: int, partition_by: list[str] | None) -> None:
        delay = 0.1
        while True:
            try:
                self.lake.append(name, table, app_id=self.app_id, version=seq_hi, partition_by=partition_by)
                self.marks[name] = seq_hi
                return
            except LakeUnavailable as err:
                log.warning("lake write to %s failed, retrying in %.1fs: %s", name, delay, err)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
                # The failed commit may have landed after all: ask the table.
                mark = self.lake.txn_version(name, self.app_id) or 0
                if mark >= seq_hi:
                    self.marks[name] = mark
                    return
                if mark:
                    table = table.filter(pc.greater(table["_seq"], mark))


def table_schemas(lake: TableStore) -> dict[str, dict[str, str]]:
    """``{type: {column: kind}}`` of the curated tables already in the lake."""
    out: dict[str, dict[str, str]] = {}
    for table in lake.tables():
        if table in (RAW, DEAD_LETTERS):
            continue
        schema = lake.schema(table)
        if schema is not None:
            out[table] = {f.name: kind_of(f.type) for f in schema if f.name not in BASE_COLUMNS}
    return out


def recent_msg_ids(lake: TableStore, window: float) -> list[tuple[str, str]]:
    """``(device_id, msg_id)`` of rows received within ``window`` seconds, to seed the duplicate filter."""
    import pyarrow.dataset as ds

    if window <= 0:
        return []
    cutoff = pa.scalar(int((time.time() - window) * 1_000_000), pa.timestamp("us", tz="UTC"))
    pairs: list[tuple[str, str]] = []
    for table in lake.tables():
        if table in (RAW, DEAD_LETTERS):
            continue
        try:
            data = lake.dataset(table).to_table(
                columns=["device_id", "msg_id"],
                filter=(ds.field("received_at") >= cutoff) & ds.field("msg_id").is_valid(),
            )
        except Exception as err:  # noqa: BLE001 - a cold start without dedup seed is not fatal
            log.warning("could not read recent msg_ids of %s: %s", table, err)
            continue
        pairs.extend(zip(data["device_id"].to_pylist(), data["msg_id"].to_pylist()))
    return pairs


class IngestService:
    """Consumes the telemetry stream from the broker into the lake."""

    def __init__(
        self,
        settings: Settings,
        lake: TableStore,
        devices: DeviceDirectory,
        *,
        nats_url: str | Callable[[], str],
        app_id: str = APP_ID,
    ) -> None:
        self.settings = settings
        self.lake = lake
        self.devices = devices
        self._nats_url = nats_url
        self.app_id = app_id
        self.stats = IngestStats()
        self.ready = asyncio.Event()
        self._m = metrics()
        self._writes = ThreadPoolExecutor(1, thread_name_prefix="lake-commit")

    def _url(self) -> str:
        return self._nats_url() if callable(self._nats_url) else self._nats_url

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set; reconnects and resumes by itself."""
        import nats

        types = await asyncio.to_thread(_DeviceTypes, self.devices)
        decoder = Decoder(
            types,
            schemas=await asyncio.to_thread(table_schemas, self.lake),
            declared=types.declared,
            max_payload_bytes=self.settings.max_payload_bytes,
            dedup_window=self.settings.dedup_window,
            limiter=DeviceLimiter.from_settings(self.settings),
        )
        decoder.remember(await asyncio.to_thread(recent_msg_ids, self.lake, self.settings.dedup_window))
        writer = await asyncio.to_thread(LakeWriter, self.lake, decoder, app_id=self.app_id)
        self.stats.committed_seq = writer.resume_after

        nc = await self._connect(nats, stop)
        if nc is None:
            return
        try:
            js = nc.jetstream()
            start = writer.resume_after + 1
            info = await js.stream_info(STREAM)
            if info.state.first_seq > start and info.state.messages:
                log.error("the broker dropped messages %d..%d before the ingest read them (stream limits)",
                          start, info.state.first_seq - 1)
            log.info("ingest consuming %s from sequence %d", STREAM, start)
            self.ready.set()
            await self._pump(nc, writer, js, stop, start)
        finally:
            await nc.close()
            self._writes.shutdown(wait=True)

    async def _connect(self, nats, stop: asyncio.Event):  # noqa: ANN001
        delay = 0.2
        while not stop.is_set():
            try:
                return await nats.connect(
                    self._url(), name="iot2ml-ingest", max_reconnect_attempts=-1, reconnect_time_wait=0.5,
                    connect_timeout=3,
                )
            except Exception as err:  # noqa: BLE001 - broker not up yet: wait and retry
                log.info("waiting for the broker: %s", err)
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                except asyncio.TimeoutError:
                    pass
                delay = min(delay * 2, 5.0)
        return None

    async def _pump(self, nc, writer: LakeWriter, js, stop: asyncio.Event, start: int) -> None:  # noqa: ANN001
        """Read into a bounded buffer; commit it once its oldest message waited ``flush_interval``
        (or it is full), while the next batch keeps arriving."""
        buffer: list[tuple[str, str, bytes]] = []
        size = [0]  # payload bytes in the buffer
        first_at = [0.0]  # when the oldest buffered message arrived
        arrived = asyncio.Event()
        full = asyncio.Event()
        limit = self.settings.queue_max_messages
        limit_bytes = self.settings.queue_max_bytes
        interval = self.settings.flush_interval
        max_rows = self.settings.flush_max_rows

        def on_message(reply: str, subject: str, data: bytes) -> None:
            if not buffer:
                first_at[0] = time.monotonic()
                arrived.set()
            buffer.append((reply, subject, data))
            size[0] += len(data)
            if len(buffer) >= max_rows or size[0] >= limit_bytes // 2:
                full.set()
            if len(buffer) >= limit or size[0] >= limit_bytes:
                reader.pause()  # backpressure: the server stops after its flow-control window

        reader = OrderedReader(nc, stream=STREAM, subject=TELEMETRY_SUBJECT, start_seq=start, on_message=on_message)
        await reader.start()

        async def lag() -> None:
            while True:
                await asyncio.sleep(2.0)
                try:
                    info = await js.stream_info(STREAM)
                    self._m.lag.set(max(0, info.state.last_seq - self.stats.committed_seq))
                except Exception:  # noqa: BLE001 - metrics only
                    pass

        async def first_of(*events: asyncio.Event, timeout: float) -> None:
            waits = [asyncio.create_task(e.wait()) for e in events]
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()

        lagger = asyncio.create_task(lag())
        last_seen = writer.resume_after
        try:
            while not stop.is_set() or buffer:
                if not buffer:
                    arrived.clear()
                    await first_of(arrived, stop, timeout=interval)
                    continue
                wait = interval - (time.monotonic() - first_at[0])
                if wait > 0 and not full.is_set() and not stop.is_set():
                    await first_of(full, stop, timeout=wait)
                batch, buffer[:] = list(buffer), []
                size[0] = 0
                full.clear()
                await reader.resume()
                last_seen = await asyncio.to_thread(self._commit, writer, batch, last_seen)
        finally:
            lagger.cancel()
            await asyncio.gather(lagger, return_exceptions=True)
            await reader.stop()

    def _commit(self, writer: LakeWriter, batch: list[tuple[str, str, bytes]], last_seen: int) -> int:
        """Decode and commit a batch in slices of at most ``queue_max_bytes / 2`` payload bytes, so
        the decoded form of a slice bounds the memory whatever the broker sent meanwhile. Slice N is
        committed by the writer thread while slice N+1 is decoded (Delta writes release the GIL)."""
        slice_bytes = max(1, self.settings.queue_max_bytes // 2)
        pending: Future[None] | None = None
        messages: list[InMessage] = []
        size = 0

        def flush(msgs: list[InMessage]) -> None:
            nonlocal pending
            started = time.monotonic()
            decoded = writer.decoder.decode(msgs)
            if pending is not None:
                pending.result()  # in order: the previous slice first
            pending = self._writes.submit(self._commit_slice, writer, decoded, len(msgs), started,
                                          msgs[0].received_us)

        for reply, subject, data in batch:
            seq, ts_us = _parse_reply(reply)
            if seq <= last_seen:
                continue  # redelivered after a consumer reset
            last_seen = seq
            messages.append(InMessage(seq, subject, ts_us, data))
            size += len(data)
            if size >= slice_bytes:
                flush(messages)
                messages, size = [], 0
        if messages:
            flush(messages)
        if pending is not None:
            pending.result()
        return last_seen

    def _commit_slice(self, writer: LakeWriter, decoded: Decoded, count: int, started: float,
                      oldest_us: int) -> None:
        readings, dead, dups, seq_hi = writer.commit(decoded)
        s, m = self.stats, self._m
        s.messages += count
        s.readings += readings
        s.dead += dead
        s.duplicates += dups
        s.batches += 1
        s.committed_seq = max(s.committed_seq, seq_hi)
        m.received.inc(count)
        m.readings.inc(readings)
        m.dead.inc(dead)
        m.duplicates.inc(dups)
        m.committed.set(s.committed_seq)
        m.write_seconds.observe(time.monotonic() - started)
        m.freshness_seconds.observe(max(0.0, time.time() - oldest_us / 1e6))


__all__ = ["APP_ID", "IngestService", "IngestStats", "LakeWriter"]
