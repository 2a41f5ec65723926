"""Predictions over the broker: device request/reply and streaming deployments.

Request/reply (seed 003): a device publishes ``devices/{id}/predict`` (NATS ``devices.{id}.predict``)
with ``{"request_id": ..., "model": name, feature: value, ...}``; without ``model`` the deployment
bound to its device type (``iot2ml deploy NAME --devices TYPE``) answers. The answer goes to
``devices/{id}/predictions``: ``{"request_id", "prediction", "model", "version", "variant", ...}``
or ``{"request_id", "error"}``. The broker lets a device subscribe only under its own prefix, so
it reads only its own replies. Serving processes share requests through a queue group.

Streaming (seed 004's "green flow"): a deployment with ``stream = TABLE`` scores every row the
ingest commits to the lake table ``TABLE`` (the device type's table), right after the commit: it
reads the rows with ``_seq`` (their stream sequence) above its mark, answers them column-wise
through the runtime (same routing per device, fallback and figures), appends them to the
``predictions`` table with a Delta transaction mark ``(iot2ml-stream-NAME, highest _seq)`` and
then publishes each answer to its device. After a restart it goes on after the mark: no row is
scored into the table twice or skipped. Reading the ingest's typed rows instead of the broker
spares a second decode of every message (reading and parsing messages was most of the scorer's
time), at the cost of the ingest's commit interval in latency.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import orjson

from ..core.devices import DeviceDirectory
from ..core.errors import Iot2mlError, NotFound
from .runtime import ServingRuntime

log = logging.getLogger("iot2ml.serve")

PREDICT_SUBJECT = "devices.*.predict"
QUEUE = "iot2ml-serve"
MAX_IN_FLIGHT = 2_000


def reply_subject(device_id: str) -> str:
    return f"devices.{device_id}.predictions"


class _DeviceTypes:
    """device id -> type from the device registry, re-read when it changes (checked every 2 s, and at
    once when one of ``unknown`` is missing: a device registered a moment ago)."""

    def __init__(self, devices: DeviceDirectory) -> None:
        self.devices = devices
        self._types: dict[str, str] = {}
        self._version = -1
        self._checked = 0.0

    def refresh(self, unknown: Iterable[str] = ()) -> None:
        if time.monotonic() - self._checked < 2.0 and all(d in self._types for d in unknown):
            return
        self._checked = time.monotonic()
        version = self.devices.version()
        if version != self._version:
            self._types = self.devices.device_types()
            self._version = version

    def get(self, device_id: str) -> str | None:
        return self._types.get(device_id)


def _one(prediction: Any) -> dict[str, Any]:
    return prediction if isinstance(prediction, dict) else {"prediction": prediction}


async def _connect(url: str | Callable[[], str]) -> Any:
    import nats

    while True:
        try:
            target = url() if callable(url) else url
            return await nats.connect(target, name="iot2ml-serve", max_reconnect_attempts=-1,
                                      reconnect_time_wait=0.5)
        except Exception as err:  # noqa: BLE001 - the broker may still be starting
            log.info("serve waits for the broker: %s", err)
            await asyncio.sleep(0.5)


async def run_device_channels(settings: Any, runtime: ServingRuntime, devices: DeviceDirectory,
                              url: str | Callable[[], str], stop: asyncio.Event, *,
                              admit: Callable[[str, int], None] | None = None) -> None:
    """Answer MQTT requests and run streaming deployments until ``stop`` is set. ``admit(device,
    nbytes)`` counts a request against the device's rate limit and payload quota (``auth.limits``)
    and raises ``RateLimited`` when over: the device gets ``{"error": ...}`` naming the limit."""
    nc = await _connect(url)
    types = _DeviceTypes(devices)
    await asyncio.get_running_loop().run_in_executor(None, types.refresh)
    slots = asyncio.Semaphore(MAX_IN_FLIGHT)

    async def answer(subject: str, data: bytes) -> None:
        device = subject.split(".")[1]
        request_id = None
        try:
            if admit is not None:
                admit(device, len(data))
            try:
                body = orjson.loads(data)
            except orjson.JSONDecodeError as err:
                raise NotFound(f"request is not JSON: {err}") from None
            if not isinstance(body, dict):
                raise NotFound("request must be a JSON object of feature values")
            request_id = body.pop("request_id", None)
            name = body.pop("model", None)
            kind = types.get(device)
            if kind is None:  # registered a moment ago
                await asyncio.get_running_loop().run_in_executor(None, types.refresh, [device])
                kind = types.get(device)
            if name is None:
                name = runtime.for_device_type(kind) if kind else None
                if name is None:
                    raise NotFound(f"no 'model' in the request and no deployment bound to device type {kind!r}: "
                                   f"send \"model\" or run 'iot2ml deploy NAME --devices {kind or 'TYPE'}'")
            runtime.check_device(str(name), device, kind)
            body.setdefault("device_id", device)
            result = await runtime.predict(str(name), [body], key=device,
                                           request_id=None if request_id is None else str(request_id), source="mqtt")
            reply = {"request_id": request_id, **_one(result.predictions[0]), "model": result.name,
                     "version": result.version, "variant": result.variant}
        except (Iot2mlError, PermissionError) as err:
            reply = {"request_id": request_id, "error": str(err)}
        except Exception as err:
            log.exception("MQTT predict for %s failed", device)
            reply = {"request_id": request_id, "error": f"internal error: {type(err).__name__}"}
        try:
            await nc.publish(reply_subject(device), orjson.dumps(reply, option=orjson.OPT_SERIALIZE_NUMPY))
        except Exception as err:  # noqa: BLE001 - the broker is reconnecting: the device asks again
            log.warning("could not publish the answer to %s: %s", device, err)

    async def on_request(msg: Any) -> None:
        await slots.acquire()
        task = asyncio.create_task(answer(msg.subject, msg.data))
        task.add_done_callback(lambda _t: slots.release())

    sub = await nc.subscribe(PREDICT_SUBJECT, queue=QUEUE, cb=on_request, pending_msgs_limit=100_000)
    streams: dict[str, tuple[int, asyncio.Task[Any]]] = {}
    try:
        while not stop.is_set():
            await asyncio.get_running_loop().run_in_executor(None, types.refresh)
            wanted = {name: spec for name, spec in runtime._specs.items() if spec.stream}
            for name in list(streams):
                if name not in wanted:
                    streams.pop(name)[1].cancel()
                    log.info("stopped streaming deployment %s", name)
            for name, spec in wanted.items():
                running = streams.get(name)
                if running is None or running[1].done():
                    if running is not None and running[1].done() and not running[1].cancelled() \
                            and running[1].exception() is not None:
                        log.error("streaming deployment %s stopped: %s; restarting", name, running[1].exception())
                    scorer = StreamScorer(runtime, nc, name, spec.stream)
                    streams[name] = (spec.generation, asyncio.create_task(scorer.run()))
                    log.info("streaming deployment %s scores arriving %s rows", name, spec.stream)
            try:
                await asyncio.wait_for(stop.wait(), timeout=1.0)
            except TimeoutError:
                pass
    finally:
        for _, task in streams.values():
            task.cancel()
        await asyncio.gather(*(t for _, t in streams.values()), return_exceptions=True)
        try:
            await sub.unsubscribe()
            await asyncio.wait_for(nc.drain(), 3)
        except Exception as err:  # noqa: BLE001 - shutting down
            log.debug("broker connection did not drain: %s", err)


class StreamScorer:
    """Scores the rows of one lake table as the ingest commits them; see the module docstring."""

    POLL_SECONDS = 0.2
    MAX_ROWS = 100_000
    YIELD_EVERY = 1_000
    """Answers published between two turns of the event loop."""

    def __init__(self, runtime: ServingRuntime, nc: Any, name: str, table: str) -> None:
        self.runtime, self.nc = runtime, nc
        self.name, self.table = name, table
        self.app_id = f"iot2ml-stream-{name}"
        self.scored = 0
        self._publishing: asyncio.Task[None] | None = None  # the answers of the last batch, on their way

    def _start_mark(self) -> int:
        """The last ``_seq`` scored (the mark in ``predictions``); on a first start, the table's newest."""
        import pyarrow.compute as pc

        from ..core.tables import PREDICTIONS

        lake = self.runtime.lake
        mark = lake.txn_version(PREDICTIONS, self.app_id) if lake.exists(PREDICTIONS) else None
        if mark is not None:
            return int(mark)
        if not lake.exists(self.table):
            return 0
        newest = pc.max(lake.dataset(self.table).to_table(columns=["_seq"]).column("_seq")).as_py()
        return int(newest or 0)

    def _version(self) -> int | None:
        lake = self.runtime.lake
        return lake.open(self.table).version() if lake.exists(self.table) else None

    def _rows_after(self, mark: int) -> tuple[Any, bool]:
        """Rows with ``_seq > mark`` in ``_seq`` order, at most about ``MAX_ROWS`` (cut between
        sequences, so a message's readings stay together), and whether more remain."""
        import pyarrow.compute as pc

        rows = self.runtime.lake.dataset(self.table).to_table(filter=pc.field("_seq") > mark)
        if rows.num_rows == 0:
            return rows, False
        rows = rows.sort_by("_seq")
        if rows.num_rows <= self.MAX_ROWS:
            return rows, False
        cut = rows.column("_seq")[self.MAX_ROWS].as_py()
        keep = rows.filter(pc.less(rows.column("_seq"), cut))
        return (keep if keep.num_rows else rows.filter(pc.less_equal(rows.column("_seq"), cut))), True

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        mark = await loop.run_in_executor(None, self._start_mark)
        seen_version: int | None = None
        try:
            while True:
                version = await loop.run_in_executor(None, self._version)
                if version is None or version == seen_version:
                    await asyncio.sleep(self.POLL_SECONDS)
                    continue
                rows, more = await loop.run_in_executor(None, self._rows_after, mark)
                if rows.num_rows:
                    seq_hi = int(rows.column("_seq")[rows.num_rows - 1].as_py())
                    await self._score(rows, seq_hi)
                    mark = seq_hi
                if not more:
                    seen_version = version
        except asyncio.CancelledError:
            if self._publishing is not None:
                self._publishing.cancel()
            raise
        except Exception:
            await self.flush()  # the answers of the rows already in the table still go out
            raise

    def _entity(self, rows: Any, versions: list[Any]) -> Any:
        """The model's entity column (e.g. a wine ``batch_id``) as strings, else nulls (as batch scoring writes it)."""
        import pyarrow as pa

        from ..ml.jobs import entity_column

        version = next((v for v in versions if v is not None), None)
        loaded = self.runtime.cache.peek(self.name, version) if version is not None else None
        column = entity_column(loaded.predictor.model) if loaded is not None else None
        if column and column in rows.column_names:
            return rows.column(column).cast(pa.string())
        return pa.nulls(rows.num_rows, pa.string())

    async def _score(self, rows: Any, seq_hi: int) -> None:
        """Score the decoded rows column-wise, append them to ``predictions`` with the stream mark,
        then publish each answer to its device: in a task, while the next rows are read and scored
        (one batch's answers at a time, in order; ``flush`` waits for them)."""
        import pyarrow as pa

        from ..core.tables import PREDICTIONS, PREDICTIONS_SCHEMA

        loop = asyncio.get_running_loop()
        n = rows.num_rows
        try:
            cols = await self.runtime.predict_table(self.name, rows)
            error = None
        except (Iot2mlError, PermissionError) as err:  # e.g. the table lacks a feature: rows say why
            cols, error = None, str(err)
        versions = cols["version"] if cols else [None] * n
        task = self.runtime.task_of(self.name, next((v for v in versions if v is not None), -1)) if cols else None
        now = pa.scalar(int(time.time() * 1_000_000), pa.timestamp("us", tz="UTC"))
        table = pa.table({
            "device_id": rows.column("device_id").cast(pa.string()),
            "entity": self._entity(rows, versions),
            "ts": rows.column("ts").cast(pa.timestamp("us", tz="UTC")),
            "model": pa.array([self.name] * n, pa.string()),
            "version": pa.array(versions, pa.int64()),
            "task": pa.array([task] * n, pa.string()),
            "prediction": pa.array(cols["prediction"] if cols else [None] * n, pa.float64()),
            "label": pa.array(cols["label"] if cols else [None] * n, pa.string()),
            "scores": pa.array(cols["scores"] if cols else [orjson.dumps({"error": error}).decode()] * n, pa.string()),
            "scored_at": pa.repeat(now, n),
        }, schema=PREDICTIONS_SCHEMA)
        await loop.run_in_executor(None, lambda: self.runtime.lake.append(
            PREDICTIONS, table, app_id=self.app_id, version=seq_hi))
        self.scored += n
        await self.flush()  # the previous batch's answers first
        self._publishing = asyncio.ensure_future(self._publish(rows, table, cols, versions, error))

    async def flush(self) -> None:
        """Wait until the answers of the rows scored so far are published."""
        if self._publishing is not None:
            await asyncio.shield(self._publishing)

    async def _publish(self, rows: Any, table: Any, cols: dict[str, Any] | None, versions: list[Any],
                       error: str | None) -> None:
        devices = table.column("device_id").to_pylist()
        stamps = _iso_column(rows.column("ts"))
        subjects = {d: reply_subject(d) for d in set(devices)}
        dumps = orjson.dumps
        publish = self.nc.publish
        answers = cols["answers"] if cols else [None] * len(devices)
        variants = cols["variant"] if cols else [None] * len(devices)
        try:
            for k, (device, stamp, answer, version, variant) in enumerate(zip(devices, stamps, answers, versions,
                                                                              variants)):
                if cols:
                    reply = {"request_id": None, "ts": stamp, **answer, "model": self.name, "version": version,
                             "variant": variant}
                else:
                    reply = {"request_id": None, "ts": stamp, "model": self.name, "error": error}
                await publish(subjects[device], dumps(reply, default=str))
                if k % self.YIELD_EVERY == self.YIELD_EVERY - 1:
                    await asyncio.sleep(0)  # let requests and the next batch's steps in
        except Exception as err:  # noqa: BLE001 - the rows are in the table; the devices may read them there
            log.warning("could not publish streamed predictions: %s", err)


def _iso(value: Any) -> Any:
    return value.isoformat() if hasattr(value, "isoformat") else value


def _iso_column(column: Any) -> list[Any]:
    """Each value of an Arrow column as ``_iso`` gives it (``datetime.isoformat()`` for a timestamp), at
    once for a UTC or naive timestamp column of seconds to microseconds (no ``datetime`` per row)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = column.type
    if not pa.types.is_timestamp(kind) or kind.unit == "ns" or kind.tz not in (None, "UTC", "+00:00"):
        return [_iso(v) for v in column.to_pylist()]
    micros = pc.fill_null(pc.cast(pc.cast(column, pa.timestamp("us", tz=kind.tz)), pa.int64()), 0)
    micros = micros.to_numpy(zero_copy_only=False)
    text = np.datetime_as_string(micros.astype("datetime64[us]"), unit="us")
    whole = micros % 1_000_000 == 0  # isoformat() leaves out a zero fraction
    if whole.any():
        text = np.where(whole, np.datetime_as_string(micros.astype("datetime64[us]"), unit="s"), text)
    suffix = "" if kind.tz is None else "+00:00"
    out = [t + suffix for t in text.tolist()]
    if column.null_count:
        for k in np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False)).tolist():
            out[k] = None
    return out
