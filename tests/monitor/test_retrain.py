"""The closed loop on real parts: a Delta lake, a real MLflow registry, the catalog's deployments, and
a serving runtime resolving what answers.

A wine-quality v1 (two features, day-1 data) is the champion and deployed following the ``champion``
alias. Day-2 data arrives; a firing ``--retrain`` rule trains on it. A better v2 becomes the
registry's champion, yet serving gives it only the canary share (the primary stays v1, also after an
auto-rollback); a worse v2 or a failing training leaves the deployment as it was.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from test_evaluate import Writer

from iot2ml.auth.store import Devices
from iot2ml.core.catalog import Catalog
from iot2ml.core.errors import InvalidInput
from iot2ml.lake import Lake
from iot2ml.monitor.kinds import Context
from iot2ml.monitor.retrain import Retrainer, check_retrain
from iot2ml.monitor.rules import StateChange, fingerprint
from iot2ml.monitor.service import Monitor, define_rule, history
from iot2ml.monitor.store import AlertRules, Notifiers, RuleRecord
from iot2ml.serve.control import deploy
from iot2ml.serve.deployments import Deployments
from iot2ml.serve.runtime import ServingRuntime
from iot2ml.wiring import ModelOps

MODEL = "wine-quality"
TS = pa.timestamp("us", tz="UTC")
BASE = "classify --table wine --label quality --entity batch_id"
BETTER = f"{BASE} --features alcohol,volatile_acidity,ph --name {MODEL}"
WORSE = f"{BASE} --features ph --name {MODEL}"
FAILING = f"classify --table wine --label grade --entity batch_id --name {MODEL}"  # no column 'grade'
WHO = "monitor (rule wine-drift)"


def wine(n: int, start: str, seed: int) -> pd.DataFrame:
    """One reading per batch, a minute apart; quality follows alcohol and acidity (ph is noise)."""
    rng = np.random.default_rng(seed)
    alcohol, acidity = rng.normal(10.5, 1.2, n), rng.normal(0.5, 0.15, n)
    score = alcohol - 4 * acidity + rng.normal(0, 0.3, n)
    return pd.DataFrame({
        "device_id": "station-1", "ts": pd.date_range(start, periods=n, freq="min", tz="UTC"),
        "batch_id": [f"b{seed}-{i}" for i in range(n)], "alcohol": alcohol, "volatile_acidity": acidity,
        "ph": rng.normal(3.3, 0.1, n),
        "quality": np.where(score > 10.2, "best", np.where(score > 8.6, "better", "good")),
    })


def write(lake: Any, frame: pd.DataFrame, version: int) -> None:
    frame = frame.assign(received_at=frame["ts"], _seq=np.arange(len(frame)) + version * 1_000_000)
    t = pa.Table.from_pandas(frame, preserve_index=False)
    for col in ("ts", "received_at"):
        t = t.set_column(t.schema.get_field_index(col), col, t[col].cast(TS))
    lake.append("wine", t, app_id="test", version=version)


class Platform:
    """v1 champion deployed by alice (primary follows ``champion``), day-2 data in the lake."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.catalog = Catalog(settings.catalog)
        self.models = ModelOps(settings, self.catalog)
        self.lake = self.models.bench.lake
        self.deployments = Deployments(self.catalog)
        write(self.lake, wine(120, "2026-11-01", seed=1), 1)
        first = self.models.train(f"{BASE} --features alcohol,ph --name {MODEL}", default_name=MODEL)
        assert first["version"] == 1 and "champion" in first["aliases"]
        deploy(self.deployments, Devices(self.catalog), self.models.bench.registry, MODEL, who="alice")
        write(self.lake, wine(80, "2026-11-02", seed=2), 2)
        self.ctx = Context(self.lake, self.catalog, settings, self.models)

    def champion(self) -> int:
        return int(self.models.describe(MODEL)["version"])

    def variants(self) -> list[tuple[str, str, float]]:
        spec = self.deployments.get(MODEL)
        return [(v.role, v.ref, v.weight) for v in spec.variants]

    def served(self) -> dict[str, int]:
        """What a fresh serving runtime over this catalog and registry answers with, per variant role."""
        registry = self.models.bench.registry
        runtime = ServingRuntime(self.settings, self.catalog, registry=registry, lake=self.lake, lazy=True)
        try:
            asyncio.run(runtime.refresh(relist=True))
            (item,) = [d for d in runtime.describe() if d["name"] == MODEL]
        finally:
            runtime.executor.shutdown(wait=False)
        return {v["role"]: v["resolved_version"] for v in item["variants"]}

    def events(self) -> list[dict[str, Any]]:
        return list(reversed(self.deployments.events(MODEL)))  # oldest first

    def close(self) -> None:
        self.catalog.close()


@pytest.fixture
def platform(settings):
    p = Platform(settings)
    yield p
    p.close()


def record(platform: Platform, command: str, **given: Any) -> RuleRecord:
    spec = {"retrain": check_retrain({"retrain": command, **given}, platform.ctx, MODEL)}
    return RuleRecord("wine-drift", MODEL, "dataset drift", (), 60.0, 0.0, 60.0, "warning", (),
                      datetime.now(UTC), "drift", spec)


def firing(at: float) -> StateChange:
    labels = {"model": MODEL}
    return StateChange(rule="wine-drift", labels=labels, from_state="Normal", state="Firing", value=0.75, at=at,
                       fingerprint=fingerprint(labels), severity="warning")


def outcome(retrainer: Retrainer, timeout: float = 180.0) -> StateChange:
    deadline = time.monotonic() + timeout
    while True:
        rows = retrainer.collect()
        if rows:
            (row,) = rows
            return row
        assert time.monotonic() < deadline, "the retrain did not end"
        time.sleep(0.1)


def test_a_better_challenger_gets_only_the_canary_share_and_rolls_back_to_the_old_champion(platform):
    assert platform.served() == {"primary": 1}
    retrainer = Retrainer(platform.ctx)
    now = time.time()
    started = retrainer.submit(record(platform, BETTER, canary=10, bake=600), firing(now), now)
    assert (started.state, started.from_state, started.value) == ("Retraining", "Firing", 0.75)
    assert round((started.at - now) * 1e6) == 1000  # after the Firing row, in the alerts table's microseconds
    assert started.labels == {"model": MODEL, "command": BETTER}
    assert started.fingerprint == fingerprint({"model": MODEL})
    assert retrainer.submit(record(platform, BETTER), firing(now + 1), now + 1) is None  # one at a time per rule

    row = outcome(retrainer)
    retrainer.close()
    assert row.state == "Retrained" and row.from_state == "Retraining" and row.value == 2.0, row
    assert row.at > now
    labels = dict(row.labels)
    assert {k: labels[k] for k in ("model", "version", "champion", "primary", "canary", "bake")} == {
        "model": MODEL, "version": "2", "champion": "1", "primary": "1", "canary": "10%", "bake": "600s"}
    assert "beats champion v1" in labels["reason"]

    # the registry's champion moved, but serving gives v2 only its canary share: the primary is v1
    assert platform.champion() == 2
    assert platform.variants() == [("primary", "1", 100.0), ("canary", "2", 10.0)]
    spec = platform.deployments.get(MODEL)
    assert spec.bake_seconds == 600 and spec.rollback_on == {"error_rate": 0.01} and spec.canary_since
    assert platform.served() == {"primary": 1, "canary": 2}
    chain = [(e["who"], e["action"]) for e in platform.events()]
    assert chain == [("alice", "deploy"), (WHO, "pin"), (WHO, "canary")]
    canary_event = platform.events()[-1]
    assert canary_event["reason"].startswith("alert wine-drift (model=wine-quality) fired: ")
    assert "beats champion v1" in canary_event["reason"]

    # the canary judge's auto-rollback restores the pinned v1, though the alias names v2
    platform.deployments.rollback(MODEL, who="serve (canary judge)", reason="canary v2 error_rate 0.5 > 0.01",
                                  action="auto-rollback")
    assert platform.variants() == [("primary", "1", 100.0)]
    assert platform.served() == {"primary": 1}


def test_a_failing_retrain_never_touches_the_serving_champion(platform):
    before = platform.variants()
    retrainer = Retrainer(platform.ctx)
    now = time.time()
    assert retrainer.submit(record(platform, FAILING), firing(now), now).state == "Retraining"
    row = outcome(retrainer)
    retrainer.close()
    assert row.state == "RetrainFailed" and row.value is None, row
    assert "grade" in row.labels["error"] and "version" not in row.labels
    assert platform.champion() == 1
    assert [v["version"] for v in platform.models.bench.registry.list_models()] == [1]
    assert platform.variants() == before == [("primary", "champion", 100.0)]
    assert platform.served() == {"primary": 1}
    events = platform.events()
    assert [(e["who"], e["action"]) for e in events] == [("alice", "deploy"), (WHO, "pin"), (WHO, "unpin")]
    assert "the retrain failed" in events[-1]["reason"]
    assert events[-1]["spec"]["variants"] == events[0]["spec"]["variants"]


def test_a_challenger_that_does_not_beat_the_champion_changes_no_deployment(platform):
    retrainer = Retrainer(platform.ctx)
    now = time.time()
    retrainer.submit(record(platform, WORSE), firing(now), now)
    row = outcome(retrainer)
    retrainer.close()
    assert row.state == "RetrainKept" and row.value == 2.0, row
    assert row.labels["version"] == "2" and row.labels["champion"] == "1"
    assert "does not beat champion v1" in row.labels["reason"] and "canary" not in row.labels
    assert platform.champion() == 1
    assert platform.variants() == [("primary", "champion", 100.0)]
    assert platform.served() == {"primary": 1}
    assert [e["action"] for e in platform.events()] == ["deploy", "pin", "unpin"]


def test_a_better_challenger_of_a_model_not_deployed_deploys_nothing(platform):
    platform.deployments.remove(MODEL, who="alice")
    retrainer = Retrainer(platform.ctx)
    now = time.time()
    retrainer.submit(record(platform, BETTER), firing(now), now)
    row = outcome(retrainer)
    retrainer.close()
    assert row.state == "Retrained" and row.labels["version"] == "2", row
    assert row.labels["canary"].startswith(f"none: {MODEL} is not deployed") and row.labels["champion"] == "1"
    assert platform.deployments.get(MODEL) is None and platform.champion() == 2


def test_check_retrain_defaults_and_refusals(settings):
    catalog = Catalog(settings.catalog)
    try:
        ctx = Context(Lake(settings.lake), catalog, settings, ModelOps(settings, catalog))
        assert check_retrain({"retrain": f"{BASE} --name {MODEL}"}, ctx, MODEL) == {
            "command": f"{BASE} --name {MODEL}", "model": MODEL, "canary": 10, "bake": 600.0}
        assert check_retrain({"retrain": BASE, "canary": 25, "bake": "2m"}, ctx, MODEL)["bake"] == 120.0
        refusals = [
            ({"retrain": BASE}, Context(ctx.lake), "no model registry is reachable"),
            ({"retrain": "  "}, ctx, "--retrain needs the training command"),
            ({"retrain": "--table wine"}, ctx, "must start with the task"),
            ({"retrain": "classify --label quality"}, ctx, "needs --table"),
            ({"retrain": f"{BASE} --name pump-model"}, ctx, "trains 'pump-model', but the rule watches"),
            ({"retrain": BASE, "canary": 0}, ctx, "--canary 0 must be a share between 0 and 100"),
            ({"retrain": BASE, "canary": 100}, ctx, "--canary 100 must be"),
            ({"retrain": BASE, "canary": "lots"}, ctx, "--canary 'lots' is not a number"),
            ({"retrain": BASE, "bake": 0}, ctx, "--bake 0 must be a positive duration"),
            ({"retrain": BASE, "bake": -60.0}, ctx, "--bake -60 must be a positive duration"),
            ({"retrain": BASE, "bake": "soon"}, ctx, "--bake 'soon' is not a duration"),
        ]
        for given, context, reason in refusals:
            with pytest.raises(InvalidInput) as err:
                check_retrain(given, context, MODEL)
            assert reason in str(err.value), (given, str(err.value))
        with pytest.raises(InvalidInput, match="use --name wine-quality or leave --name out"):
            check_retrain({"retrain": f"{BASE} --name other"}, ctx, MODEL)
    finally:
        catalog.close()


def test_a_firing_rule_retrains_through_the_monitor_and_the_chain_is_in_the_alerts_table(platform):
    """A threshold rule (its condition fires at once) with ``spec["retrain"]``, run by Monitor.tick."""
    clock = [time.time()]
    monitor = Monitor(platform.settings, Lake(platform.settings.lake), AlertRules(platform.catalog),
                      Notifiers(platform.catalog), clock=lambda: clock[0], models=platform.models)
    writer = Writer(platform.lake)
    writer.write(["p1"], [clock[0] - 1], [9.0])
    rule = define_rule(platform.ctx, "wine-drift", table="pump", when="max(pressure) > 5", window=60.0, every=1.0)
    rule.spec["retrain"] = check_retrain({"retrain": BETTER, "canary": 20, "bake": 120.0}, platform.ctx, MODEL)
    AlertRules(platform.catalog).add(rule)
    monitor.start()
    try:
        monitor.tick()
        states = [r["state"] for r in reversed(history(platform.lake, rule="wine-drift"))]
        assert states == ["Firing", "Retraining"]
        deadline = time.monotonic() + 180
        while len(history(platform.lake, rule="wine-drift")) < 3:
            assert time.monotonic() < deadline, "the retrain did not end"
            time.sleep(0.2)
            clock[0] += 0.2
            monitor.tick()  # never waits for the retrain
    finally:
        monitor.close()
    rows = list(reversed(history(platform.lake, rule="wine-drift")))
    assert [r["state"] for r in rows] == ["Firing", "Retraining", "Retrained"]
    assert rows[0]["labels"] == {"alertname": "wine-drift", "severity": "warning"}
    assert rows[1]["labels"] == {**rows[0]["labels"], "model": MODEL, "command": BETTER}  # the instance's, and ours
    assert rows[2]["value"] == 2.0
    assert {k: rows[2]["labels"][k] for k in ("version", "champion", "primary", "canary", "bake")} == {
        "version": "2", "champion": "1", "primary": "1", "canary": "20%", "bake": "120s"}
    assert platform.variants() == [("primary", "1", 100.0), ("canary", "2", 20.0)]
    assert platform.served() == {"primary": 1, "canary": 2}
    assert [(e["who"], e["action"]) for e in platform.events()][-2:] == [(WHO, "pin"), (WHO, "canary")]
    assert "alert wine-drift fired" in platform.events()[-1]["reason"]


def test_a_monitor_without_models_records_why_it_cannot_retrain(tmp_path):
    retrainer = Retrainer(Context(Lake(str(tmp_path / "lake"))))
    now = time.time()
    spec = {"retrain": {"command": BETTER, "model": MODEL, "canary": 10, "bake": 600.0}}
    rule = RuleRecord("wine-drift", MODEL, "dataset drift", (), 60.0, 0.0, 60.0, "warning", (), datetime.now(UTC),
                      "drift", spec)
    assert retrainer.submit(rule, firing(now), now).state == "Retraining"
    row = outcome(retrainer, timeout=10)
    retrainer.close()
    assert row.state == "RetrainFailed" and "no model registry is reachable" in row.labels["error"]
