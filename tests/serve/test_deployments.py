"""The deployment store on a real SQLite catalog: routing shares, A/B stickiness per device, spec
validation, the audit trail, rollback, restarts and the generation check; and ``Guard.caller``."""

from __future__ import annotations

import threading

import pytest

from iot2ml.auth import Guard
from iot2ml.auth.store import Devices, Keys
from iot2ml.core.catalog import Catalog
from iot2ml.core.errors import AuthError, InvalidInput, NotFound
from iot2ml.serve.deployments import (
    Deployment,
    Deployments,
    Variant,
    build_spec,
    parse_ab,
    parse_rollback_on,
)


@pytest.fixture
def catalog(catalog_url):
    """Each store test runs on SQLite and on the machine's PostgreSQL (row locks differ)."""
    found = Catalog(catalog_url)
    yield found
    found.close()


@pytest.fixture
def store(catalog):
    return Deployments(catalog)


def store_url(store: Deployments) -> str:
    return store.catalog.url


def shares(spec: Deployment, keys: list[str]) -> dict[str, float]:
    counts: dict[str, int] = {}
    for key in keys:
        label = spec.route(key, 0.0).label
        counts[label] = counts.get(label, 0) + 1
    return {label: n / len(keys) for label, n in counts.items()}


def test_canary_takes_its_share_of_requests_and_of_devices():
    spec = build_spec(None, "wq", version="7", canary=10)
    assert [(v.ref, v.role) for v in spec.variants] == [("champion", "primary"), ("7", "canary")]
    draws = [spec.route(None, i / 10_000).label for i in range(10_000)]
    assert draws.count("canary") == 1000 and draws.count("primary") == 9000
    by_device = shares(spec, [f"dev-{i}" for i in range(4000)])
    assert 0.08 < by_device["canary"] < 0.12


def test_ab_splits_by_weight_and_each_device_stays_on_its_side(store):
    spec = store.put(build_spec(None, "wq", ab="6:30,7:70"), who="t", action="ab")
    devices = [f"dev-{i}" for i in range(4000)]
    split = shares(spec, devices)
    assert set(split) == {"ab-6", "ab-7"} and 0.27 < split["ab-6"] < 0.33
    first = {d: spec.route(d, 0.0).ref for d in devices[:200]}
    # The same device lands on the same version whatever the draw, and after a reload from the catalog.
    reloaded = Deployments(Catalog(store_url(store))).get("wq")
    assert all(spec.route(d, draw).ref == first[d] for d in devices[:200] for draw in (0.0, 0.5, 0.99))
    assert all(reloaded.route(d, 0.3).ref == first[d] for d in devices[:200])
    # Another deployment shuffles devices independently: stickiness is per (deployment, device).
    other = build_spec(None, "other", ab="6:30,7:70")
    assert sum(other.route(d, 0.0).ref != first[d] for d in devices[:200]) > 20


@pytest.mark.parametrize(("options", "message"), [
    ({"canary": 10}, "--canary needs --version"),
    ({"version": "7", "canary": 0}, "between 0 and 100"),
    ({"version": "7", "canary": 100}, "between 0 and 100"),
    ({"ab": "6:50,7:50", "version": "8"}, "do not combine"),
    ({"ab": "6:50,7:40"}, "add up to 90"),
    ({"ab": "6:100"}, "at least two versions"),
    ({"ab": "6:fifty,7:50"}, "VERSION:WEIGHT"),
    ({"version": "7 and 8"}, "neither a number nor an alias"),
    ({"version": "7", "canary": 10, "rollback_on": {"p95_ms": 3.0}}, "'p95_ms' is not known"),
])
def test_bad_specs_are_refused_with_the_reason(options, message):
    with pytest.raises(InvalidInput, match=message):
        build_spec(None, "wq", **options)


def test_rollback_conditions_are_parsed_or_refused():
    assert parse_rollback_on("error_rate>0.01, p99_ms > 50") == {"error_rate": 0.01, "p99_ms": 50.0}
    assert parse_rollback_on("") == {}
    for bad in ("error_rate<0.01", "p98>3", "p99_ms>1.2.3", "error_rate"):
        with pytest.raises(InvalidInput, match="is not understood"):
            parse_rollback_on(bad)
    assert [v.weight for v in parse_ab("6:25, 7:75")] == [25.0, 75.0]
    with pytest.raises(InvalidInput, match="weight 150"):
        Variant("7", "ab", 150)


def test_canary_defaults_and_what_a_later_change_keeps():
    canary = build_spec(None, "wq", version="7", canary=10)
    assert canary.bake_seconds == 300.0 and canary.rollback_on == {"error_rate": 0.01}
    assert canary.canary_since is not None
    bound = build_spec(canary, "wq", stream="wine", devices="wine")
    assert bound.variants == canary.variants and bound.canary_since == canary.canary_since
    assert (bound.stream, bound.devices, bound.bake_seconds) == ("wine", "wine", 300.0)
    shadowed = build_spec(bound, "wq", shadow="8")
    assert [v.label for v in shadowed.variants] == ["primary", "canary", "shadow"] and shadowed.stream == "wine"
    rebound = build_spec(shadowed, "wq", stream="")
    assert rebound.shadow == Variant("8", "shadow", 0.0) and rebound.stream is None
    promoted = build_spec(rebound, "wq", version="7")
    assert [(v.ref, v.role) for v in promoted.variants] == [("7", "primary")]
    assert promoted.canary_since is None and promoted.rollback_on == {} and promoted.devices == "wine"


def test_every_change_is_an_event_and_rollback_restores_the_previous_spec(store):
    first = store.put(build_spec(None, "wq", version="6"), who="ann", action="deploy", reason="first")
    second = store.put(build_spec(first, "wq", version="7", canary=10), who="bob", action="canary")
    assert (first.generation, second.generation) == (1, 2)
    restored = store.rollback("wq", who="carl", reason="p99 too high")
    assert restored.generation == 3 and restored.variants == first.variants and restored.canary is None
    assert store.get("wq").variants == (Variant("6"),)
    events = store.events("wq")
    assert [(e["generation"], e["action"], e["who"], e["reason"]) for e in events] == [
        (3, "rollback", "carl", "p99 too high"), (2, "canary", "bob", None), (1, "deploy", "ann", "first")]
    assert events[1]["spec"]["variants"][1] == {"ref": "7", "role": "canary", "weight": 10.0}

    store.remove("wq", who="dan")
    assert store.get("wq") is None and store.list() == []
    assert store.events("wq")[0]["action"] == "undeploy" and store.events("wq")[0]["spec"] is None
    with pytest.raises(NotFound, match="not deployed"):
        store.remove("wq", who="dan")
    with pytest.raises(NotFound, match="not deployed"):
        store.rollback("wq", who="dan")
    # A redeploy continues the generations (3 served, 4 the undeploy): a serving process never
    # takes the new state for one it already had.
    assert store.put(build_spec(None, "wq", version="6"), who="ann", action="deploy").generation == 5


def test_rollback_needs_an_earlier_state_and_a_restored_canary_bakes_anew(store):
    canary = store.put(build_spec(None, "wq", version="7", canary=10), who="t", action="canary")
    with pytest.raises(NotFound, match="no earlier state"):
        store.rollback("wq", who="t")
    store.put(build_spec(canary, "wq", version="8"), who="t", action="deploy")
    back = store.rollback("wq", who="t")
    assert back.canary == Variant("7", "canary", 10.0) and back.canary_since > canary.canary_since


def test_state_and_history_survive_a_restart(settings, store):
    spec = store.put(build_spec(None, "wq", ab="6:50,7:50", stream=None), who="t", action="ab")
    store.put(build_spec(spec, "wq", shadow="8"), who="t", action="shadow")
    stamp = store.stamp()
    after = Deployments(Catalog(store_url(store)))  # a new process: same database, fresh objects
    got = after.get("wq")
    assert got.generation == 2 and [v.label for v in got.variants] == ["ab-6", "ab-7", "shadow"]
    assert after.stamp() == stamp == (("wq", 2),)
    assert [e["action"] for e in after.events("wq")] == ["shadow", "ab"]
    assert after.rollback("wq", who="t").variants == spec.variants


def test_a_change_based_on_a_stale_generation_is_not_applied(store):
    v6 = store.put(build_spec(None, "wq", version="6"), who="t", action="deploy")
    canary = store.put(build_spec(v6, "wq", version="7", canary=10), who="t", action="canary",
                       expect_generation=v6.generation)
    assert canary.generation == 2
    # The canary judge decided on generation 1; someone changed it since: its promotion is dropped.
    stale = store.put(build_spec(v6, "wq", version="7"), who="judge", action="promote", expect_generation=1)
    assert stale.generation == 2 and stale.canary is not None
    stale_rollback = store.rollback("wq", who="judge", action="auto-rollback", expect_generation=1)
    assert stale_rollback.generation == 2
    assert [e["action"] for e in store.events("wq")] == ["canary", "deploy"]
    assert store.get("wq").canary == Variant("7", "canary", 10.0)
    done = store.rollback("wq", who="judge", action="auto-rollback", expect_generation=2)
    assert done.generation == 3 and done.variants == (Variant("6"),)


def test_concurrent_writers_never_apply_two_changes_to_one_generation(settings, store):
    """Processes (here: threads with their own catalog connections) racing on one deployment, each
    changing what it read: every applied change has its own generation, the others are dropped."""
    store.put(build_spec(None, "wq", version="1"), who="t", action="deploy")

    def writer(i: int) -> None:
        mine = Deployments(Catalog(store_url(store)))
        for j in range(25):
            current = mine.get("wq")
            mine.put(build_spec(current, "wq", version=str(100 * i + j)), who=f"w{i}", action="deploy",
                     expect_generation=current.generation)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    generations = [e["generation"] for e in store.events("wq", limit=1000)]
    assert len(generations) == len(set(generations)) == store.get("wq").generation
    assert sorted(generations) == list(range(1, len(generations) + 1))


def test_guard_caller_accepts_device_tokens_and_keys_of_any_role(catalog):
    guard = Guard(catalog, ttl=0.0)
    token = Devices(catalog).add_device("press-1", "wine")
    reader = Keys(catalog).add_key("dash", "reader")
    admin = Keys(catalog).add_key("ops", "admin")
    device = guard.caller(token)
    assert (device.kind, device.name, device.role) == ("device", "press-1", "wine")
    assert (guard.caller(reader).kind, guard.caller(reader).role) == ("key", "reader")
    assert (guard.caller(admin).name, guard.caller(admin).role) == ("ops", "admin")
    for bad in (None, "", "nope"):
        with pytest.raises(AuthError):
            guard.caller(bad)
    Devices(catalog).remove_device("press-1")
    with pytest.raises(AuthError, match="unknown or revoked"):
        guard.caller(token)
