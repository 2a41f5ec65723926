"""One feature path: every task answers the same rows alike on every channel.

Each model (forecast, classify with and without an entity, regress, anomaly) scores the same rows
in-process (``model.predict(frame)``), batch-scored into the ``predictions`` table
(``Workbench.predict``), over REST, over MQTT request/reply through the real embedded broker and, for
row models, from a streaming deployment scoring rows appended to a lake table (its ``predictions``
rows and the answers it publishes to the devices). Predicted class, value, score, flag,
probabilities and quantiles agree to 1e-9. A per-entity model takes each record or streamed row as
one reading of its own entity, the same as batch-scoring entities with one reading each, and the
aggregated columns of an entity's history as batch scoring aggregates them. A window anomaly model
scores each reading after its device's earlier ones (the training tail, then what it was sent): the
same reading seen again on another channel (known by its ``ts``) gets the same score."""

from __future__ import annotations

import json
import queue
import threading
import time
from typing import Any

import httpx
import numpy as np
import paho.mqtt.client as mqtt
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from servekit import ServerThread, free_port

from iot2ml.auth.store import Devices, Keys
from iot2ml.core.catalog import Catalog
from iot2ml.core.tables import PREDICTIONS, PREDICTIONS_SCHEMA
from iot2ml.ml.checks import check_same_answers
from iot2ml.ml.jobs import TrainJob
from iot2ml.ml.workbench import Workbench
from iot2ml.serve.deployments import Deployments, build_spec

TOL = 1e-9
TS = pa.timestamp("us", tz="UTC")
WINE = ["alcohol", "volatile_acidity", "ph"]
PUMP = ["pressure", "flow"]
HORIZON = 12
# model -> (task, device type, stream table or None, fields of a record besides device_id)
MODELS: dict[str, tuple[str, str, str | None, list[str]]] = {
    "wine-class": ("classify", "wine", "wine", [*WINE, "colour"]),
    "wine-batch": ("classify", "wine", "wine", ["batch_id", *WINE]),
    "wine-score": ("regress", "wine", "wine", [*WINE, "colour"]),
    "pump-alarm": ("anomaly", "pump", "pump", PUMP),
    "pump-window": ("anomaly", "pump", "pump", PUMP),  # scores each reading in its device's context
    "air-24": ("forecast", "air", None, []),
}


def wine(n: int, seed: int, start: str) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    alcohol, acidity = rng.normal(10.5, 1.2, n), rng.normal(0.5, 0.15, n)
    score = alcohol - 4 * acidity + rng.normal(0, 0.3, n)
    return pd.DataFrame({
        "device_id": [f"station-{i % 2}" for i in range(n)],
        "ts": pd.date_range(start, periods=n, freq="min", tz="UTC"),
        "alcohol": alcohol, "volatile_acidity": acidity, "ph": rng.normal(3.3, 0.1, n),
        "colour": np.where(rng.random(n) < 0.5, "red", "white"),
        "quality": np.where(score > 9.6, "better", "good"), "score": score,
    })


def pumps(n: int, seed: int, start: str) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    parts = []
    for d in range(3):
        spike = np.zeros(n)
        spike[n // 2:n // 2 + 12] = 1.0
        parts.append(pd.DataFrame({
            "device_id": f"pump-{d}", "ts": pd.date_range(start, periods=n, freq="min", tz="UTC"),
            "pressure": (4 + d) * (1 + 0.3 * spike + rng.normal(0, 0.02, n)),
            "flow": (50 + 10 * d) * (1 - 0.4 * spike + rng.normal(0, 0.02, n)), "blocked": spike > 0}))
    return pd.concat(parts, ignore_index=True)


def air() -> pd.DataFrame:
    hours, rng = 24 * 7, np.random.default_rng(9)
    t = np.arange(hours)
    return pd.concat([pd.DataFrame({
        "device_id": f"s{k}", "ts": pd.date_range("2026-10-01", periods=hours, freq="h", tz="UTC"),
        "ozone": 40 + 5 * k + 10 * np.sin(2 * np.pi * (t + 3 * k) / 24) + rng.normal(0, 0.5, hours)})
        for k in range(3)], ignore_index=True)


def write(lake: Any, table: str, frame: pd.DataFrame, version: int) -> None:
    t = pa.Table.from_pandas(frame, preserve_index=False)
    lake.append(table, t.set_column(t.schema.get_field_index("ts"), "ts", t["ts"].cast(TS)),
                app_id="test", version=version)


def frame_answers(task: str, out: pd.DataFrame) -> list[dict[str, Any]]:
    """``model.predict``'s frame worded as the online answers are."""
    if task == "classify":
        proba = [c for c in out.columns if c.startswith("proba_")]
        return [{"prediction": p, "probabilities": {c.removeprefix("proba_"): float(v) for c, v in zip(proba, row)}}
                for p, row in zip(out["prediction"], out[proba].itertuples(index=False))]
    if task == "regress":
        return [{"prediction": float(v)} for v in out["prediction"]]
    if task == "anomaly":
        return [{"prediction": bool(f), "score": float(s)} for f, s in zip(out["is_anomaly"], out["score"])]
    return [{"start": g["ts"].iloc[0].isoformat(), "mean": g["mean"].tolist(),
             "quantiles": {c[1:]: g[c].tolist() for c in g.columns if c.startswith("q")}}
            for _, g in out.groupby("device_id", sort=True)]


def same(a: Any, b: Any, where: str = "") -> list[str]:
    """Where ``a`` and ``b`` differ (floats by more than TOL)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys {sorted(a)} vs {sorted(b)}"]
        return [d for k in a for d in same(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} vs {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in same(x, y, f"{where}[{i}]")]
    if isinstance(a, float) or isinstance(b, float):
        ok = isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) <= TOL
        return [] if ok else [f"{where}: {a!r} vs {b!r}"]
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"]


def mqtt_client(port: int, user: str, password: str, inbox: queue.Queue) -> mqtt.Client:
    subscribed = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    c.username_pw_set(user, password)
    c.on_connect = lambda client, *_a: client.subscribe(f"devices/{user}/predictions", qos=1)
    c.on_subscribe = lambda *_a: subscribed.set()
    c.on_message = lambda _c, _u, msg: inbox.put((user, json.loads(msg.payload)))
    c.connect("127.0.0.1", port)
    c.loop_start()
    assert subscribed.wait(10), f"{user} could not subscribe to its predictions"
    return c


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Five trained models, the rows each scores, their in-process and batch predictions."""
    from iot2ml.core.config import load_settings

    settings = load_settings(data_dir=tmp_path_factory.mktemp("path") / "data", nats_port=0, mqtt_port=0,
                             http_port=0, serve_port=0, serve_poll=0.2, flush_interval=0.2)
    bench = Workbench(settings)
    train = wine(180, 1, "2026-11-01")
    train["batch_id"] = [f"b{i // 3:03d}" for i in range(len(train))]
    write(bench.lake, "wine_train", train, 1)
    write(bench.lake, "pump_train", pumps(240, 2, "2026-01-01"), 1)
    write(bench.lake, "pump_long", pumps(720, 5, "2026-01-05"), 1)
    write(bench.lake, "air", air(), 1)
    jobs = {
        "wine-class": ("wine_train", {"label": "quality", "features": [*WINE, "colour"], "folds": 3}),
        "wine-batch": ("wine_train", {"label": "quality", "entity": "batch_id", "features": WINE, "folds": 3}),
        "wine-score": ("wine_train", {"label": "score", "features": [*WINE, "colour"], "folds": 3}),
        "pump-alarm": ("pump_train", {"features": PUMP, "label": "blocked"}),
        "pump-window": ("pump_long", {"features": PUMP, "methods": ["window"]}),
        "air-24": ("air", {"target": "ozone", "horizon": HORIZON, "folds": 2, "n_jobs": 1,
                           "candidates": "seasonal_naive,lightgbm"}),
    }
    for name, (table, options) in jobs.items():
        bench.train(TrainJob(task=MODELS[name][0], table=table, name=name, options=options))

    rows = {"wine": wine(8, 3, "2026-12-01"), "pump": pumps(240, 4, "2026-02-01").iloc[100:420:40]}
    rows["wine"]["batch_id"] = [f"new-{i}" for i in range(8)]  # sorted: batch scoring orders by entity
    for frame in rows.values():
        frame["_seq"] = np.arange(1, len(frame) + 1)
    write(bench.lake, "wine_batch", rows["wine"], 1)
    write(bench.lake, "pump_batch", rows["pump"], 1)
    rows["air"] = air()

    local, batch = {}, {}
    for name, (task, kind, _, _) in MODELS.items():
        model = bench.registry.load(name, "1", unwrap=True)
        local[name] = frame_answers(task, model.predict(rows[kind]))
        bench.predict(name, table="air" if kind == "air" else f"{kind}_batch")
        got = bench.lake.dataset(PREDICTIONS).to_table(filter=pc.field("model") == name)  # one commit, in order
        batch[name] = {k: got.column(k).to_pylist() for k in ("prediction", "label", "scores")}
        assert got.schema.equals(PREDICTIONS_SCHEMA)
    history = train[train["batch_id"].isin(["b001", "b002", "b003"])]
    model = bench.registry.load("wine-batch", "1", unwrap=True)
    return {"settings": settings, "bench": bench, "rows": rows, "local": local, "batch": batch,
            "history": history, "history_local": frame_answers("classify", model.predict(history)),
            "aggregated": model.aggregate(history).to_dict("records")}


def records(name: str, frame: pd.DataFrame) -> list[dict[str, Any]]:
    task, _, _, fields = MODELS[name]
    if task == "forecast":  # s0 and s2 from the history the model stored, s1 from its points
        s1 = frame[frame["device_id"] == "s1"]
        return [{"device_id": "s0"}, {"device_id": "s1", "start": s1["ts"].iloc[0].isoformat(),
                                      "target": s1["ozone"].tolist()}, {"device_id": "s2"}]
    out = frame[["device_id", *fields]].to_dict("records")
    if task == "anomaly":  # a context model tells a reading seen on another channel by its ts
        out = [{**r, "ts": ts.isoformat()} for r, ts in zip(out, frame["ts"])]
    return out


def test_every_channel_answers_every_task_alike(scored: dict[str, Any], make_broker: Any) -> None:
    from iot2ml.api import create_serve_app
    from iot2ml.components import serving_runtime

    settings, bench, rows = scored["settings"], scored["bench"], scored["rows"]
    catalog = Catalog(settings.catalog)
    devices, deployments = Devices(catalog), Deployments(catalog)
    broker = make_broker(settings)
    tokens = {}
    for kind, ids in {"wine": ["station-0", "station-1"], "pump": ["pump-0", "pump-1", "pump-2"],
                      "air": ["s0", "s1", "s2"]}.items():
        devices.add_type(kind, exist_ok=True)
        for device in ids:
            tokens[device] = devices.add_device(device, kind)
    key = Keys(catalog).add_key("path", "reader")
    for name, (_, kind, stream, _) in MODELS.items():
        deployments.put(build_spec(None, name, devices=kind, stream=stream), who="test", action="deploy")
        if stream:  # the deployment has scored every row up to _seq 0: it takes all rows appended below
            bench.lake.append(PREDICTIONS, PREDICTIONS_SCHEMA.empty_table(), app_id=f"iot2ml-stream-{name}",
                              version=0)
    broker.service.poke()
    broker.wait_reload()
    app = create_serve_app(settings, catalog=catalog, runtime=serving_runtime(settings, catalog),
                           nats_url=broker.url)
    server = ServerThread(app, free_port())
    inbox: queue.Queue = queue.Queue()
    clients = [mqtt_client(broker.mqtt_port, d, t, inbox) for d, t in tokens.items()]
    problems: list[str] = []
    try:
        deadline = time.monotonic() + 20
        while set(app.state.runtime._specs) != set(MODELS) and time.monotonic() < deadline:
            time.sleep(0.1)
        url = f"http://127.0.0.1:{server.server.config.port}/api/v1/models"
        rest, asked = {}, {}
        for name, (task, kind, _, _) in MODELS.items():
            asked[name] = records(name, rows[kind])
            r = httpx.post(f"{url}/{name}/predict", json={"instances": asked[name]},
                           headers={"Authorization": f"Bearer {key}"}, timeout=30)
            assert r.status_code == 200, (name, r.text)
            rest[name] = r.json()["predictions"]
            problems += same(rest[name], scored["local"][name], f"{name} REST vs model.predict")
            try:
                check_same_answers(task, rest[name], scored["batch"][name])
            except AssertionError as err:
                problems.append(f"{name} REST vs batch predictions: {err}")
        r = httpx.post(f"{url}/wine-batch/predict", json={"instances": scored["aggregated"]},
                       headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert r.status_code == 200, r.text
        problems += same(r.json()["predictions"], scored["history_local"], "wine-batch aggregated records vs history")

        # MQTT request/reply: each row from its own device (a forecast device sends its series or just asks).
        pending = {}
        for name, items in asked.items():
            for i, item in enumerate(items):
                device, body = item["device_id"], {k: v for k, v in item.items() if k != "device_id"}
                pending[f"{name}/{i}"] = (name, i)
                clients[list(tokens).index(device)].publish(
                    f"devices/{device}/predict", json.dumps({"request_id": f"{name}/{i}", "model": name, **body}),
                    qos=1)
        replies, streamed = {}, {}
        deadline = time.monotonic() + 20
        while len(replies) < len(pending) and time.monotonic() < deadline:
            try:
                _, reply = inbox.get(timeout=0.5)
            except queue.Empty:
                continue
            replies[reply["request_id"]] = reply
        assert len(replies) == len(pending), sorted(set(pending) - set(replies))
        for request_id, (name, i) in pending.items():
            reply = {k: v for k, v in replies[request_id].items() if k not in ("request_id", "model", "version",
                                                                                "variant")}
            problems += same(reply, rest[name][i], f"{name} MQTT vs REST row {i}")

        # Streaming: the rows land in the device types' tables; each deployment scores them once.
        started = pd.Timestamp.now(tz="UTC")
        write(bench.lake, "wine", rows["wine"], 1)
        write(bench.lake, "pump", rows["pump"], 1)
        streaming = [n for n, spec in MODELS.items() if spec[2]]
        want = {n: len(rows[MODELS[n][1]]) for n in streaming}
        deadline = time.monotonic() + 30
        table = None
        while time.monotonic() < deadline:
            while not inbox.empty():
                device, reply = inbox.get()
                streamed[(reply["model"], device, reply["ts"])] = reply
            table = bench.lake.dataset(PREDICTIONS).to_table(filter=pc.field("scored_at") > started)
            counts = {n: table.filter(pc.field("model") == n).num_rows for n in streaming}
            if counts == want and len(streamed) == sum(want.values()):
                break
            time.sleep(0.2)
        assert table is not None and counts == want, counts
        assert len(streamed) == sum(want.values()), len(streamed)
        for name in streaming:
            frame = rows[MODELS[name][1]]
            got = table.filter(pc.field("model") == name).to_pandas()
            order = {(d, t): i for i, (d, t) in enumerate(zip(frame["device_id"], frame["ts"]))}
            got = got.assign(_i=[order[(d, t)] for d, t in zip(got["device_id"], got["ts"])]).sort_values("_i")
            cols = {k: got[k].tolist() for k in ("prediction", "label", "scores")}
            for k in ("label", "scores"):
                cols[k] = [None if isinstance(v, float) and np.isnan(v) else v for v in cols[k]]
            try:
                check_same_answers(MODELS[name][0], rest[name], cols)
            except AssertionError as err:
                problems.append(f"{name} stream predictions vs REST: {err}")
            for i, (device, ts) in enumerate(zip(frame["device_id"], frame["ts"])):
                reply = streamed[(name, device, ts.isoformat())]
                reply = {k: v for k, v in reply.items() if k not in ("request_id", "ts", "model", "version", "variant")}
                problems += same(reply, rest[name][i], f"{name} streamed answer vs REST row {i}")
            if name == "wine-batch":
                assert got["entity"].tolist() == rows["wine"]["batch_id"].tolist()
    finally:
        for c in clients:
            c.loop_stop()
            c.disconnect()
        server.stop()
        catalog.close()
    assert not problems, "\n".join(problems[:20])


def test_a_serving_process_takes_what_its_devices_sent_since_training_as_context(scored: dict[str, Any]) -> None:
    """A serving process that loads the window model after its devices sent more readings (the
    ``pump`` table) scores the next reading after them, as batch scoring over all of them does, not
    after the training tail."""
    import asyncio

    from iot2ml.components import serving_runtime

    settings, bench = scored["settings"], scored["bench"]
    later = pumps(240, 6, "2026-03-01")
    gap, ask = later[later["ts"] < "2026-03-01 03:00"], later[later["ts"] >= "2026-03-01 03:00"].iloc[::60]
    write(bench.lake, "pump", gap.assign(_seq=np.arange(1, len(gap) + 1)), 7)
    sent = bench.lake.dataset("pump").to_table().to_pandas()  # with what an earlier test streamed, if it ran
    model = bench.registry.load("pump-window", "1", unwrap=True)
    want = model.predict(pd.concat([sent[["device_id", "ts", *PUMP]], ask[["device_id", "ts", *PUMP]]],
                                   ignore_index=True))["score"].to_numpy()[len(sent):]
    cold = model.predict(ask)["score"].to_numpy()
    assert not np.allclose(want, cold)  # the readings in between matter

    catalog = Catalog(settings.catalog)
    Deployments(catalog).put(build_spec(None, "pump-window", devices="pump"), who="test", action="deploy")

    async def ask_fresh_process() -> list[float]:
        runtime = serving_runtime(settings, catalog)
        await runtime.start()
        try:
            answer = await runtime.predict("pump-window", records("pump-window", ask))
        finally:
            await runtime.stop()
        return [p["score"] for p in answer.predictions]

    try:
        got = asyncio.run(ask_fresh_process())
    finally:
        catalog.close()
    np.testing.assert_allclose(got, want, atol=TOL)
