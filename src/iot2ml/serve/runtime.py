"""The serving runtime: deployed models in memory, requests routed to variants, answers batched.

One ``ServingRuntime`` per process answers REST (``serve/http.py``), MQTT request/reply
(``serve/mqtt.py``) and streaming deployments (``serve/stream.py``) alike:

- models come from the MLflow registry by version or alias, are loaded once into an LRU cache
  bounded by count and by the memory they took when loaded, and are warmed before a deployment
  switches to them (blue/green: the old version answers until the new one is ready);
- a change of deployment (``iot2ml deploy``) or of the champion alias is picked up within
  ``serve_poll`` seconds, without a restart;
- requests for the same model version that arrive while the model is busy are answered by one
  model call (continuous micro-batching: no wait is added when the model is idle);
- a canary or A/B variant that fails is answered for by the primary (the client never sees the
  failure), counted against the variant, and the canary judge rolls a canary back when its error
  rate or latency crosses the deployment's thresholds, or promotes it when the bake time passes;
- every answered instance is a row of the ``prediction_log`` table (request id, model, version,
  variant, latency, inputs hash, the answer), flushed to the lake every second;
- a sample of what each model received and answered (``capture_sample``, at most
  ``capture_max_per_second`` per model) is a row of ``model_inputs`` (``InputCapture``), which the
  monitor's drift reports compare with the version's training data.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import hashlib
import logging
import os
import random
import threading
import time
import uuid
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import orjson

from ..core.errors import InvalidInput, ModelFailed, NotFound
from ..core.storage import LakeBuffer
from ..core.tables import MODEL_INPUTS, PREDICTION_LOG
from .deployments import Deployment, Deployments, Variant
from .predictors import Prepared, check_instances, predictor_for

log = logging.getLogger("iot2ml.serve")

WINDOW_SECONDS = 120.0
MIN_CANARY_REQUESTS = 10
"""A canary is promoted only after this many answered requests (and its bake time); with a latency
threshold, only after MIN_LATENCY_SAMPLES, so that the threshold was judged."""
MIN_LATENCY_SAMPLES = 20
"""Latency thresholds are judged only on at least this many requests."""


# --------------------------------------------------------------------------- model cache


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


@dataclass
class Loaded:
    name: str
    version: int
    task: str
    predictor: Any
    size_mb: float
    batcher: Batcher
    loaded_at: float = field(default_factory=time.time)
    warming: asyncio.Future[None] | None = None  # the warm-up of a context model (``ServingRuntime._model``)


class ModelCache:
    """Loaded model versions, least recently used first out beyond ``max_models`` or ``max_mb``."""

    def __init__(self, registry: Any, *, max_models: int, max_mb: float, executor: ThreadPoolExecutor,
                 max_batch: int) -> None:
        self.registry = registry
        self.max_models, self.max_mb = max_models, max_mb
        self.executor, self.max_batch = executor, max_batch
        self._items: OrderedDict[tuple[str, int], Loaded] = OrderedDict()
        self._loading: dict[tuple[str, int], asyncio.Future[Loaded]] = {}
        self._lock = threading.Lock()  # MLflow loads one model at a time per process
        self.evictions = 0
        self.loads = 0

    def peek(self, name: str, version: int) -> Loaded | None:
        item = self._items.get((name, version))
        if item is not None:
            self._items.move_to_end((name, version))
        return item

    async def get(self, name: str, version: int) -> Loaded:
        item = self.peek(name, version)
        if item is not None:
            return item
        key = (name, version)
        pending = self._loading.get(key)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            self._loading[key] = pending
            try:
                item = await asyncio.get_running_loop().run_in_executor(None, self._load, name, version)
                self._items[key] = item
                self._evict(keep=key)
                pending.set_result(item)
            except BaseException as err:
                pending.set_exception(err)
                pending.exception()  # retrieved: no "never retrieved" warning when nobody else waits
                raise
            finally:
                self._loading.pop(key, None)
            return item
        return await asyncio.shield(pending)

    def _load(self, name: str, version: int) -> Loaded:
        with self._lock:
            before = _rss_mb()
            started = time.monotonic()
            wrapper = self.registry.load(name, str(version))
            inner = wrapper.unwrap_python_model()
            predictor = predictor_for(inner.model, inner.task)
            size = max(1.0, _rss_mb() - before)
            self.loads += 1
        log.info("loaded %s v%s (%s) in %.2f s, ~%.0f MB", name, version, inner.task,
                 time.monotonic() - started, size)
        return Loaded(name, version, inner.task, predictor, size,
                      Batcher(predictor, self.executor, max_batch=self.max_batch))

    def _evict(self, keep: tuple[str, int]) -> None:
        while len(self._items) > 1 and (len(self._items) > self.max_models or
                                        sum(i.size_mb for i in self._items.values()) > self.max_mb):
            key = next(k for k in self._items if k != keep)
            self._items.pop(key)
            self.evictions += 1
            log.info("unloaded %s v%s (cache bound)", *key)

    def holds(self, name: str, version: int | None = None) -> bool:
        """Whether ``name`` (that version, or any) is loaded; unlike ``peek`` it does not count as a use."""
        return any(n == name and version in (None, v) for n, v in self._items)

    def describe(self) -> list[dict[str, Any]]:
        return [{"name": i.name, "version": i.version, "task": i.task, "size_mb": round(i.size_mb, 1)}
                for i in self._items.values()]


# --------------------------------------------------------------------------- micro-batching


class Batcher:
    """Runs a predictor over every request queued while the previous model call ran."""

    def __init__(self, predictor: Any, executor: ThreadPoolExecutor, *, max_batch: int) -> None:
        self.predictor = predictor
        self.executor = executor
        self.max_batch = max_batch
        self._queue: deque[tuple[Prepared, asyncio.Future[list[Any]]]] = deque()
        self._running = False
        self.calls = 0
        self.rows = 0

    async def submit(self, prepared: Prepared) -> list[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        self._queue.append((prepared, future))
        if not self._running:
            self._running = True
            loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._queue:
                batch, rows = [], 0
                while self._queue and (not batch or rows + self._queue[0][0].count <= self.max_batch):
                    item = self._queue.popleft()
                    batch.append(item)
                    rows += item[0].count
                await self._run(loop, batch)
        finally:
            self._running = False
            if self._queue:  # arrived after the loop ended
                self._running = True
                loop.create_task(self._drain())

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[Any]) -> None:
        try:
            results = await loop.run_in_executor(self.executor, self.predictor.predict_many, [p for p, _ in batch])
            self.calls += 1
            self.rows += sum(p.count for p, _ in batch)
        except Exception as err:  # noqa: BLE001 - one bad request must not fail the others
            if len(batch) > 1:
                for item in batch:
                    await self._run(loop, [item])
                return
            _, future = batch[0]
            if not future.done():
                future.set_exception(err)
            return
        for (_, future), result in zip(batch, results):
            if not future.done():
                future.set_result(result)


# --------------------------------------------------------------------------- per-variant figures


_EDGES_MS = [0.0] + [0.05 * 1.25**k for k in range(60)]  # 0.05 ms .. ~32 s, 25 % apart


class _Second:
    """Requests of one variant in one second: counts and a latency histogram (few objects: GC-cheap)."""

    __slots__ = ("at", "errors", "hist", "n")

    def __init__(self, at: int) -> None:
        self.at, self.n, self.errors, self.hist = at, 0, 0, [0] * len(_EDGES_MS)


class VariantStats:
    """Answered requests per (model, variant label, version): latency and outcome, per second, last
    two minutes. Percentiles come from a histogram with buckets 25 % apart (read as the bucket's top)."""

    def __init__(self) -> None:
        self._seconds: dict[tuple[str, str, int], deque[_Second]] = {}
        self.totals: dict[tuple[str, str, int], list[int]] = {}

    def record(self, name: str, label: str, version: int, latency_ms: float, ok: bool) -> None:
        key = (name, label, version)
        seconds = self._seconds.get(key)
        if seconds is None:
            seconds = self._seconds[key] = deque()
        now = int(time.monotonic())
        if not seconds or seconds[-1].at != now:
            seconds.append(_Second(now))
            while seconds[0].at < now - WINDOW_SECONDS:
                seconds.popleft()
        current = seconds[-1]
        current.n += 1
        if not ok:
            current.errors += 1
        current.hist[bisect.bisect_left(_EDGES_MS, latency_ms) if latency_ms < _EDGES_MS[-1] else -1] += 1
        total = self.totals.get(key)
        if total is None:
            total = self.totals[key] = [0, 0]
        total[0] += 1
        total[1] += 0 if ok else 1

    def window(self, name: str, label: str, version: int, since: float | None = None) -> dict[str, Any]:
        first = -1.0 if since is None else int(since)
        picked = [s for s in self._seconds.get((name, label, version), ()) if s.at >= first]
        n = sum(s.n for s in picked)
        if not n:
            return {"requests": 0, "errors": 0, "error_rate": 0.0, "p50_ms": None, "p99_ms": None}
        hist = [sum(col) for col in zip(*(s.hist for s in picked))]
        errors = sum(s.errors for s in picked)

        def pct(q: float) -> float:
            rank, seen = q * n, 0
            for k, count in enumerate(hist):
                seen += count
                if seen >= rank:
                    return round(_EDGES_MS[k], 3)
            return round(_EDGES_MS[-1], 3)

        return {"requests": n, "errors": errors, "error_rate": errors / n, "p50_ms": pct(0.5), "p99_ms": pct(0.99)}

    def describe(self, name: str) -> list[dict[str, Any]]:
        out = []
        for (model, label, version), (total, errors) in sorted(self.totals.items()):
            if model == name:
                out.append({"variant": label, "version": version, "requests_total": total, "errors_total": errors,
                            "last_2min": self.window(model, label, version)})
        return out


# --------------------------------------------------------------------------- prediction log


class PredictionLog(LakeBuffer):
    """Rows of ``prediction_log``, appended to the lake every second from a buffer (bounded)."""

    TABLE, SCHEMA, APP = PREDICTION_LOG, "PREDICTION_LOG_SCHEMA", "iot2ml-serve"


class InputCapture(LakeBuffer):
    """Rows of ``model_inputs``: a sample of the instances each model received and what it answered
    (REST, MQTT and streamed rows alike), appended to the lake every second from a bounded buffer.

    Of the ``n`` instances of one answer, a ``sample`` share is drawn (binomially, then uniformly which)
    and at most ``per_second`` per model and wall-clock second are kept (the rest count as ``capped``);
    a full buffer counts ``dropped``. Only the kept instances are turned into JSON (a streamed table's
    other rows never are), and a failure here is counted (``failed``), never raised to the caller.
    """

    MAX_PENDING = 100_000
    TABLE, SCHEMA, APP = MODEL_INPUTS, "MODEL_INPUTS_SCHEMA", "iot2ml-capture"

    def __init__(self, lake: Any | None, *, sample: float, per_second: int) -> None:
        super().__init__(lake if sample > 0 and per_second > 0 else None)
        self.sample, self.per_second = sample, per_second
        self._used: dict[str, tuple[int, int]] = {}  # model -> (second, instances kept in it)
        self._draw = random.Random()
        self.capped = self.failed = 0

    def choose(self, name: str, n: int) -> list[int]:
        """Which of ``n`` instances answered by ``name`` now to keep (sorted positions)."""
        if self.lake is None or n <= 0:
            return []
        if self.sample >= 1.0:
            k = n
        else:
            import numpy as np

            k = int(np.random.default_rng(self._draw.getrandbits(64)).binomial(n, self.sample))
        second = int(time.time())
        with self._lock:
            at, used = self._used.get(name, (second, 0))
            if at != second:
                used = 0
            keep = min(k, self.per_second - used)
            self._used[name] = (second, used + max(keep, 0))
            self.capped += k - max(keep, 0)
        if keep <= 0:
            return []
        return list(range(n)) if keep == n else sorted(self._draw.sample(range(n), keep))

    def describe(self) -> dict[str, int]:
        return {"written": self.written, "capped": self.capped, "dropped": self.dropped, "failed": self.failed}


def _plain_json(value: Any) -> Any:
    return str(value)


def _row_hashes(matrix: Any) -> list[str]:
    """``inputs_hash`` of each row of a streamed batch's model matrix: the digest of the row's bytes."""
    import numpy as np

    matrix = np.ascontiguousarray(matrix)
    if matrix.ndim != 2 or not matrix.size:
        return [hashlib.blake2b(row.tobytes(), digest_size=12).hexdigest() for row in matrix]
    blake2b, data, width = hashlib.blake2b, memoryview(matrix.tobytes()), matrix.shape[1] * matrix.itemsize
    return [blake2b(data[k:k + width], digest_size=12).hexdigest() for k in range(0, len(data), width)]


def inputs_hash(instance: dict[str, Any]) -> str:
    return hashlib.blake2b(orjson.dumps(instance, option=orjson.OPT_SORT_KEYS), digest_size=12).hexdigest()


# --------------------------------------------------------------------------- the runtime


@dataclass
class Answer:
    name: str
    version: int
    variant: str
    predictions: list[Any]
    request_id: str

    def body(self) -> dict[str, Any]:
        return {"predictions": self.predictions, "model": self.name, "version": self.version,
                "variant": self.variant, "request_id": self.request_id}


class ServingRuntime:
    """See the module docstring. ``start()`` inside the event loop, ``stop()`` at the end."""

    def __init__(self, settings: Any, catalog: Any, *, registry: Any, lake: Any, lazy: bool = False,
                 judge: bool = True) -> None:
        """``registry``: an ``ml.registry.Registry`` (loads versions, resolves aliases); ``lake``: a
        ``lake.Lake`` for ``prediction_log`` and streamed ``predictions``. The composition root builds both.

        ``lazy``: a deployment's models load on its first request instead of when it is deployed (once
        loaded, a change is warmed before the switch as usual): the API process, which answers a few
        models of many. ``judge=False``: this runtime records its figures but never promotes or rolls
        back a canary (see ``docs/decisions/0009-predictions-on-the-api-port.md``)."""
        self.settings = settings
        self.lazy = lazy
        self.judging = judge
        self._refreshing = asyncio.Lock()
        self.deployments = Deployments(catalog)
        self.registry = registry
        self.lake = lake
        self.executor = ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 2)),
                                           thread_name_prefix="iot2ml-model")
        self.cache = ModelCache(registry, max_models=settings.serve_max_models, max_mb=settings.serve_max_model_mb,
                                executor=self.executor, max_batch=settings.serve_max_batch)
        self.stats = VariantStats()
        self.plog = PredictionLog(lake if settings.serve_log_predictions else None)
        self.capture = InputCapture(lake, sample=settings.capture_sample, per_second=settings.capture_max_per_second)
        self._specs: dict[str, Deployment] = {}
        self._versions: dict[tuple[str, str], int] = {}  # (name, ref) -> version in force
        self._canary_clock: dict[tuple[str, int], float] = {}  # (name, generation) -> monotonic start
        self._stamp: tuple[tuple[str, int], ...] | None = None
        self._frozen_at = -1
        self._tasks: list[asyncio.Task[Any]] = []
        self.ready = asyncio.Event()
        self._draw = random.Random()

    # ---- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        await self.refresh()
        self.ready.set()
        self._tasks = [asyncio.create_task(self._loop(self.refresh, self.settings.serve_poll), name="refresh"),
                       asyncio.create_task(self._loop(self._flush, 1.0), name="prediction-log")]
        if self.judging:
            self._tasks.append(asyncio.create_task(self._loop(self.judge, 0.25), name="judge"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._flush()
        self.executor.shutdown(wait=False, cancel_futures=True)
        import gc

        gc.unfreeze()  # let the interpreter free everything at exit (native extensions check for leaks)

    async def _loop(self, step: Any, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            try:
                await step()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("serving background step %s failed", getattr(step, "__name__", step))

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.gather(loop.run_in_executor(None, self.plog.flush),
                             loop.run_in_executor(None, self.capture.flush))

    # ---- deployments -------------------------------------------------------------------
    async def _resolve(self, name: str, ref: str) -> int:
        return await asyncio.get_running_loop().run_in_executor(None, self.registry.resolve, name, ref)

    async def refresh(self, *, relist: bool = False) -> None:
        """Pick up deployment changes and moved aliases; switch only once the new versions are loaded
        (``lazy``: a deployment no request used yet switches at once). Runs every ``serve_poll``, and at
        once on ``POST /api/v1/serving/refresh`` (``iot2ml deploy`` waits for that: ``relist`` re-reads
        every spec, not only those whose generation moved); one at a time, so a slower earlier pass
        never puts back an older state."""
        async with self._refreshing:
            if relist:
                self._stamp = None
            await self._refresh()

    async def _refresh(self) -> None:
        loop = asyncio.get_running_loop()
        stamp = await loop.run_in_executor(None, self.deployments.stamp)
        specs = self._specs
        if stamp != self._stamp:
            specs = {d.name: d for d in await loop.run_in_executor(None, self.deployments.list)}
        pending = False
        for name, spec in specs.items():
            versions: dict[tuple[str, str], int] = {}
            warm = not self.lazy or self.cache.holds(name)
            try:
                for variant in spec.variants:
                    version = await self._resolve(name, variant.ref)
                    if warm:
                        await self._model(name, version, spec)  # loaded and warmed before switching
                    versions[(name, variant.ref)] = version
            except Exception as err:  # noqa: BLE001 - keep what answers now
                log.error("deployment %s generation %s cannot be served yet: %s", name, spec.generation, err)
                pending = True  # tried again on the next pass, though the catalog did not change
                continue
            old = self._specs.get(name)
            changed = old is None or old != spec or any(
                self._versions.get(k) != v for k, v in versions.items())
            self._versions.update(versions)
            if changed:
                self._specs[name] = spec
                if spec.canary is not None:
                    self._canary_clock.setdefault((name, spec.generation), time.monotonic())
                log.info("serving %s generation %s: %s", name, spec.generation,
                         ", ".join(f"{v.label}=v{versions[(name, v.ref)]}" for v in spec.variants))
        for name in [n for n in self._specs if n not in specs]:
            self._specs.pop(name)
            log.info("undeployed %s", name)
        self._stamp = None if pending else stamp
        if self.cache.loads != self._frozen_at:
            # Models, MLflow and pandas leave a million long-lived objects: a full collection over
            # them stalls every request for a few hundred ms. Move them out of the collector's sight.
            import gc

            gc.collect()
            gc.freeze()
            self._frozen_at = self.cache.loads

    async def _model(self, name: str, version: int, spec: Deployment | None = None) -> Loaded:
        """Version ``version`` of ``name``, loaded and, for a model that scores a reading in its device's
        context (an anomaly window method), warmed once per load with what the deployment's device type
        sent since training (``_warm``): every request of a fresh load waits for that warm-up."""
        loaded = await self.cache.get(name, version)
        if loaded.warming is None:
            spec = spec or self._specs.get(name)
            table = spec.stream or spec.devices if spec is not None else None
            loaded.warming = asyncio.ensure_future(
                asyncio.get_running_loop().run_in_executor(None, self._warm, loaded, table))
        await asyncio.shield(loaded.warming)
        return loaded

    def _warm(self, loaded: Loaded, table: str | None) -> None:
        """Give a context model the newest readings of lake table ``table`` (its device type's) sent
        after its training data (``AnomalyModel.warm``). A failure is logged: the model then starts
        from its training tail."""
        model = getattr(loaded.predictor, "model", None)
        if table is None or not getattr(model, "context", 0) or not hasattr(model, "warm") or self.lake is None:
            return
        try:
            import pyarrow as pa
            import pyarrow.compute as pc

            if not self.lake.exists(table):
                return
            inputs = loaded.predictor.describe()
            columns = [inputs["entity"], "ts", *inputs["features"]]
            stamps = [int(t[-1]) for t in getattr(model, "tail_ts", {}).values() if len(t)]
            since = pa.scalar(min(stamps), pa.timestamp("ns", tz="UTC")) if stamps else None
            dataset = self.lake.dataset(table)
            if since is not None:
                since = pc.cast(since, dataset.schema.field("ts").type, safe=False)
            rows = dataset.to_table(columns=columns, filter=pc.field("ts") > since if since is not None else None)
            kept = model.warm(rows)
            log.info("%s v%s: %d readings of %s since training as context", loaded.name, loaded.version, kept, table)
        except Exception as err:  # noqa: BLE001 - the model still answers, from its training tail
            log.warning("%s v%s: could not read the context of its devices from %s: %s: %s",
                        loaded.name, loaded.version, table, type(err).__name__, err)

    def spec(self, name: str) -> Deployment:
        spec = self._specs.get(name)
        if spec is None:
            raise NotFound(f"model {name!r} is not deployed here: run 'iot2ml deploy {name}' "
                           f"(deployed: {', '.join(sorted(self._specs)) or 'none'})")
        return spec

    def deployed(self) -> list[str]:
        """Names of the deployments this runtime answers for now."""
        return sorted(self._specs)

    def check_device(self, name: str, device_id: str, device_type: str | None) -> None:
        """A device may use only deployments bound to its type (``--devices TYPE`` or ``--stream TYPE``);
        people and scripts (API keys) may use any. ``PermissionError`` says how to allow it."""
        spec = self.spec(name)
        if device_type is None or device_type not in (spec.devices, spec.stream):
            raise PermissionError(f"device {device_id!r} (type {device_type!r}) may use only models deployed for "
                                  f"its type: 'iot2ml deploy {name} --devices {device_type or 'TYPE'}' allows it")

    def for_device_type(self, device_type: str) -> str | None:
        for name, spec in self._specs.items():
            if spec.devices == device_type:
                return name
        return None

    def task_of(self, name: str, version: int) -> str | None:
        loaded = self.cache.peek(name, version)
        return loaded.task if loaded is not None else None

    def version_of(self, name: str, variant: Variant) -> int:
        return self._versions[(name, variant.ref)]

    def describe(self) -> list[dict[str, Any]]:
        out = []
        for name, spec in sorted(self._specs.items()):
            item = spec.describe()
            for v, d in zip(spec.variants, item["variants"]):
                d["resolved_version"] = version = self._versions.get((name, v.ref))
                d["loaded"] = version is not None and self.cache.holds(name, version)
            item["stats"] = self.stats.describe(name)
            out.append(item)
        return out

    # ---- answering ---------------------------------------------------------------------
    async def _answer(self, name: str, variant: Variant, instances: list[dict[str, Any]],
                      configuration: dict[str, Any] | None, lenient: bool = False) -> tuple[int, list[Any]]:
        version = self.version_of(name, variant)
        loaded = await self._model(name, version)
        allowed = getattr(loaded.predictor, "allowed", None)
        if lenient and allowed is not None:  # a table row: take the model's fields, leave the rest
            instances = [{k: v for k, v in item.items() if k in allowed} for item in instances]
        prepared = loaded.predictor.prepare(instances, configuration)
        return version, await loaded.batcher.submit(prepared)

    async def predict(self, name: str, instances: Any, *, key: str | None = None, request_id: str | None = None,
                      configuration: dict[str, Any] | None = None, source: str = "rest",
                      lenient: bool = False) -> Answer:
        """Answer ``instances`` with the variant the deployment routes ``key`` (device id) to."""
        started = time.perf_counter()
        instances = check_instances(instances)
        spec = self.spec(name)
        request_id = request_id or uuid.uuid4().hex
        chosen = spec.route(key, self._draw.random())
        variant, failure = chosen, None
        try:
            version, predictions = await self._answer(name, chosen, instances, configuration, lenient)
        except InvalidInput as err:
            if chosen.role == "primary":
                self._log(name, chosen, None, instances, None, started, request_id, source, key, str(err))
                raise
            failure = err  # the variant rejects what the primary may take: count it, fall back
        except Exception as err:  # noqa: BLE001 - a failing model variant
            failure = err
        if failure is not None:
            if chosen.role == "primary":
                self._record(name, chosen, started, ok=False)
                self._log(name, chosen, None, instances, None, started, request_id, source, key,
                          f"{type(failure).__name__}: {failure}")
                raise ModelFailed(f"model {name} failed: {type(failure).__name__}: {failure}") from failure
            fallback = spec.primary or next(v for v in spec.variants if v.role == "ab" and v != chosen)
            variant = fallback
            try:
                version, predictions = await self._answer(name, fallback, instances, configuration, lenient)
            except InvalidInput:
                if isinstance(failure, InvalidInput):  # both reject it: the request is bad, not the variant
                    raise
                self._record(name, chosen, started, ok=False)
                raise
            except Exception as err:
                self._record(name, chosen, started, ok=False)
                self._record(name, fallback, started, ok=False)
                raise ModelFailed(f"model {name} failed: {type(err).__name__}: {err}") from err
            # The variant failed where the fallback answered: count it against the variant.
            self._record(name, chosen, started, ok=False)
            self._log(name, chosen, None, instances, None, started, request_id, source, key,
                      f"{type(failure).__name__}: {failure}")
            log.warning("%s variant %s failed (%s); answered by %s", name, chosen.label, failure, fallback.label)
        self._record(name, variant, started, ok=True, version=version)
        self._log(name, variant, version, instances, predictions, started, request_id, source, key, None)
        if spec.shadow is not None:
            asyncio.get_running_loop().create_task(
                self._shadow(name, spec.shadow, instances, configuration, request_id, source, key))
        return Answer(name, version, variant.label, predictions, request_id)

    async def predict_table(self, name: str, table: Any, *, source: str = "stream") -> dict[str, Any]:
        """Score every row of an Arrow ``table`` (one reading per row, a ``device_id`` column) with the
        variant each device is routed to; a failing canary or A/B variant falls back to the primary.
        Returns per-row columns: ``version``, ``variant``, ``prediction``, ``label``, ``scores``, ``answers``."""
        spec = self.spec(name)
        n = table.num_rows
        devices = [None if d is None else str(d) for d in table.column("device_id").to_pylist()]
        routes = {d: spec.route(d, self._draw.random()) for d in set(devices)}
        groups: dict[Variant, list[int]] = {}
        if len(set(routes.values())) == 1:  # one variant answers every device (no canary or A/B split)
            groups[next(iter(routes.values()))] = list(range(n))
        else:
            for i, d in enumerate(devices):
                groups.setdefault(routes[d], []).append(i)
        out: dict[str, list[Any]] = {} if len(groups) == 1 else {
            k: [None] * n for k in ("version", "variant", "prediction", "label", "scores", "answers")}
        for variant, index in groups.items():
            part = table if len(groups) == 1 else table.take(index)
            started = time.perf_counter()
            try:
                version, cols = await self._score_table(name, variant, part, devices, index, source, started)
                used = variant
            except Exception as err:
                self._record(name, variant, started, ok=False)
                if variant.role == "primary" or spec.primary is None:
                    raise ModelFailed(f"model {name} failed on {part.num_rows} rows: {type(err).__name__}: {err}") \
                        from err
                log.warning("%s variant %s failed on streamed rows (%s); the primary answers", name, variant.label, err)
                used = spec.primary
                version, cols = await self._score_table(name, used, part, devices, index, source, started)
            m = len(index)
            part_out = {"version": [version] * m, "variant": [used.label] * m,
                        "prediction": [None] * m if cols["prediction"] is None else
                        [None if p is None else float(p) for p in cols["prediction"]],
                        "label": [None] * m if cols["label"] is None else cols["label"],
                        "scores": [None] * m if cols["scores"] is None else cols["scores"],
                        "answers": cols["answers"]}
            if len(groups) == 1:
                out = part_out
            else:
                for key, values in part_out.items():
                    column = out[key]
                    for i, value in zip(index, values):
                        column[i] = value
            if spec.shadow is not None:
                asyncio.get_running_loop().create_task(self._shadow_table(name, spec.shadow, part, devices, index,
                                                                          source))
        return out

    async def _score_table(self, name: str, variant: Variant, part: Any, devices: list[Any], index: list[int],
                           source: str, started: float) -> tuple[int, dict[str, Any]]:
        version = self.version_of(name, variant)
        loaded = await self._model(name, version)
        if not hasattr(loaded.predictor, "prepare_table"):
            raise InvalidInput(f"{loaded.task} models are not scored on a stream: use REST or 'iot2ml predict'")

        def work() -> dict[str, Any]:
            prepared = loaded.predictor.prepare_table(part)
            cols = loaded.predictor.score_table(prepared)
            cols["hashes"] = _row_hashes(prepared.rows)
            return cols

        cols = await asyncio.get_running_loop().run_in_executor(self.executor, work)
        self._record(name, variant, started, ok=True, version=version)
        self._capture_table(name, variant, version, loaded, part, devices, index, source, cols["answers"])
        if self.plog.lake is not None:
            self.plog.add_table(self._log_table(name, variant, version, part, devices, index, source, started, cols))
        return version, cols

    @staticmethod
    def _log_table(name: str, variant: Variant, version: int, part: Any, devices: list[Any], index: list[int],
                   source: str, started: float, cols: dict[str, Any]) -> Any:
        """The ``prediction_log`` rows of streamed rows ``part``, column-wise: request id
        ``SOURCE:NAME:_seq``, one answer each."""
        import pyarrow as pa
        import pyarrow.compute as pc

        from ..core.tables import PREDICTION_LOG_SCHEMA as schema

        n = part.num_rows
        seqs = pc.cast(part.column("_seq"), pa.string()) if "_seq" in part.column_names else pa.nulls(n, pa.string())
        dumps = orjson.dumps
        return pa.table({
            "ts": pa.repeat(pa.scalar(datetime.now(UTC), schema.field("ts").type), n),
            "request_id": pc.binary_join_element_wise(f"{source}:{name}:", pc.fill_null(seqs, "None"), ""),
            "model": pa.repeat(pa.scalar(name, pa.string()), n),
            "version": pa.repeat(pa.scalar(version, pa.int64()), n),
            "variant": pa.repeat(pa.scalar(variant.label, pa.string()), n),
            "source": pa.repeat(pa.scalar(source, pa.string()), n),
            "device_id": pa.array(devices if len(index) == len(devices) else [devices[i] for i in index], pa.string()),
            "latency_ms": pa.repeat(pa.scalar((time.perf_counter() - started) * 1000.0, pa.float64()), n),
            "inputs_hash": pa.array(cols["hashes"], pa.string()),
            "prediction": pa.array([dumps(a).decode() for a in cols["answers"]], pa.string()),
            "ok": pa.repeat(pa.scalar(True), n),
            "error": pa.nulls(n, pa.string()),
        }, schema=schema)

    async def _shadow_table(self, name: str, variant: Variant, part: Any, devices: list[Any], index: list[int],
                            source: str) -> None:
        started = time.perf_counter()
        try:
            await self._score_table(name, variant, part, devices, index, source, started)
        except Exception as err:  # noqa: BLE001 - a shadow never affects an answer
            self._record(name, variant, started, ok=False)
            log.info("%s shadow failed on streamed rows: %s", name, err)

    async def _shadow(self, name: str, variant: Variant, instances: list[dict[str, Any]],
                      configuration: dict[str, Any] | None, request_id: str, source: str, key: str | None) -> None:
        started = time.perf_counter()
        try:
            version, predictions = await self._answer(name, variant, instances, configuration)
        except Exception as err:  # noqa: BLE001 - a shadow never affects an answer
            self._record(name, variant, started, ok=False)
            self._log(name, variant, None, instances, None, started, request_id, source, key,
                      f"{type(err).__name__}: {err}")
            return
        self._record(name, variant, started, ok=True, version=version)
        self._log(name, variant, version, instances, predictions, started, request_id, source, key, None)

    def _record(self, name: str, variant: Variant, started: float, *, ok: bool, version: int | None = None) -> None:
        latency = (time.perf_counter() - started) * 1000.0
        v = version if version is not None else self._versions.get((name, variant.ref), 0)
        self.stats.record(name, variant.label, v, latency, ok)
        _metrics().predictions.labels(name, str(v), variant.label, "ok" if ok else "error").inc()
        if ok:
            _metrics().latency.labels(name, variant.label).observe(latency / 1000.0)

    # ---- capture for drift (model_inputs) ---------------------------------------------
    @staticmethod
    def _capture_shape(loaded: Loaded) -> tuple[frozenset[str], str | None]:
        """The fields an instance of ``loaded`` carries for the model, and the model's entity column."""
        from ..ml.jobs import entity_column

        inputs = getattr(loaded.predictor, "inputs", None) or {}
        return frozenset(inputs.get("fields", ())), entity_column(loaded.predictor.model)

    def _capture(self, name: str, variant: Variant, version: int, instances: list[dict[str, Any]],
                 predictions: list[Any], request_id: str, source: str, key: str | None) -> None:
        """Keep a sample of answered REST/MQTT instances (see ``InputCapture``); never raises."""
        try:
            chosen = self.capture.choose(name, len(instances))
            if not chosen:
                return
            loaded = self.cache.peek(name, version)
            if loaded is None:
                return
            fields, entity = self._capture_shape(loaded)
            now = datetime.now(UTC)
            dumps = orjson.dumps
            rows = []
            for i in chosen:
                item = instances[i]
                device = item.get("device_id", key)
                ent = item.get(entity) if entity else None
                rows.append((now, name, version, variant.label, source, None if device is None else str(device),
                             None if ent is None else str(ent),
                             request_id if len(instances) == 1 else f"{request_id}/{i}",
                             dumps({k: v for k, v in item.items() if k in fields}, default=_plain_json).decode(),
                             dumps(predictions[i], default=_plain_json).decode()))
            self.capture.add(rows)
        except Exception as err:  # noqa: BLE001 - capture never fails a prediction
            self.capture.failed += 1
            log.debug("capture of %s failed: %s", name, err)

    def _capture_table(self, name: str, variant: Variant, version: int, loaded: Loaded, part: Any,
                       devices: list[Any], index: list[int], source: str, answers: list[Any]) -> None:
        """Keep a sample of streamed rows: only the chosen rows are turned into JSON; never raises."""
        try:
            chosen = self.capture.choose(name, part.num_rows)
            if not chosen:
                return
            fields, entity = self._capture_shape(loaded)
            sub = part.take(chosen)
            records = sub.select([c for c in sub.column_names if c in fields]).to_pylist()
            ents = sub.column(entity).to_pylist() if entity and entity in sub.column_names else [None] * len(chosen)
            seqs = sub.column("_seq").to_pylist() if "_seq" in sub.column_names else [None] * len(chosen)
            now = datetime.now(UTC)
            dumps = orjson.dumps
            self.capture.add([
                (now, name, version, variant.label, source, devices[index[i]], None if e is None else str(e),
                 f"{source}:{name}:{seq}", dumps(r, default=_plain_json).decode(),
                 dumps(answers[i], default=_plain_json).decode())
                for i, r, e, seq in zip(chosen, records, ents, seqs)])
        except Exception as err:  # noqa: BLE001 - capture never fails a prediction
            self.capture.failed += 1
            log.debug("capture of streamed %s rows failed: %s", name, err)

    def _log(self, name: str, variant: Variant, version: int | None, instances: list[dict[str, Any]],
             predictions: list[Any] | None, started: float, request_id: str, source: str, key: str | None,
             error: str | None) -> None:
        if predictions is not None and version is not None and error is None:
            self._capture(name, variant, version, instances, predictions, request_id, source, key)
        if self.plog.lake is None:
            return
        now = datetime.now(UTC)
        latency = (time.perf_counter() - started) * 1000.0
        v = version if version is not None else self._versions.get((name, variant.ref), 0)
        rows = []
        for i, item in enumerate(instances):
            device = item.get("device_id", key)
            answer = None if predictions is None or i >= len(predictions) else orjson.dumps(predictions[i]).decode()
            rows.append((now, request_id if len(instances) == 1 else f"{request_id}/{i}", name, v, variant.label,
                         source, None if device is None else str(device), latency, inputs_hash(item), answer,
                         error is None, error))
        self.plog.add(rows)

    # ---- canary judge ------------------------------------------------------------------
    async def judge(self) -> None:
        """Roll a canary back when a threshold is crossed; promote it when its bake time has passed."""
        loop = asyncio.get_running_loop()
        for name, spec in list(self._specs.items()):
            canary = spec.canary
            if canary is None:
                continue
            version = self._versions.get((name, canary.ref))
            since = self._canary_clock.setdefault((name, spec.generation), time.monotonic())
            figures = self.stats.window(name, canary.label, version or 0, since=since)
            breach = self._breach(spec, figures)
            if breach:
                reason = f"canary v{version} {breach} (after {figures['requests']} requests)"
                log.warning("%s: rolling back: %s", name, reason)
                await loop.run_in_executor(None, functools.partial(
                    self.deployments.rollback, name, who="serve (canary judge)", reason=reason,
                    action="auto-rollback", expect_generation=spec.generation))
                await self.refresh()
                continue
            bake = spec.bake_seconds or 0.0
            # A latency threshold is judged from MIN_LATENCY_SAMPLES requests on: never promote before it was.
            needed = MIN_LATENCY_SAMPLES if {"p99_ms", "p50_ms"} & set(spec.rollback_on) else MIN_CANARY_REQUESTS
            if time.monotonic() - since >= bake and figures["requests"] >= needed:
                promoted = replace(spec, variants=tuple(
                    [Variant(canary.ref, "primary")] + [v for v in spec.variants if v.role == "shadow"]),
                    canary_since=None)
                reason = (f"canary v{version} baked {bake:g} s over {figures['requests']} requests within "
                          f"{spec.rollback_on or 'no thresholds'} (error rate {figures['error_rate']:.4f}, "
                          f"p99 {figures['p99_ms']} ms)")
                log.info("%s: promoting: %s", name, reason)
                await loop.run_in_executor(None, functools.partial(
                    self.deployments.put, promoted, who="serve (canary judge)", action="promote",
                    reason=reason, expect_generation=spec.generation))
                await self.refresh()

    @staticmethod
    def _breach(spec: Deployment, figures: dict[str, Any]) -> str | None:
        limits = spec.rollback_on
        if "error_rate" in limits and figures["requests"] and figures["error_rate"] > limits["error_rate"]:
            return f"error_rate {figures['error_rate']:.4f} > {limits['error_rate']:g}"
        for key in ("p99_ms", "p50_ms"):
            if key in limits and figures["requests"] >= MIN_LATENCY_SAMPLES and figures[key] > limits[key]:
                return f"{key} {figures[key]:.1f} > {limits[key]:g}"
        return None


_METRICS: Any = None


def _metrics() -> Any:
    global _METRICS
    if _METRICS is None:
        from types import SimpleNamespace

        from prometheus_client import Counter, Histogram

        _METRICS = SimpleNamespace(
            predictions=Counter("iot2ml_serve_requests", "Prediction requests answered, by variant and outcome",
                                ["model", "version", "variant", "outcome"]),
            latency=Histogram("iot2ml_serve_latency_seconds", "Time to answer a prediction request",
                              ["model", "variant"],
                              buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)),
        )
    return _METRICS
