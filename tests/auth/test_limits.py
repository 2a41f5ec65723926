"""Rate limits and payload quotas (``auth.limits``): one device or key cannot starve the others.

Unit tests of the bucket arithmetic (against a plain message-by-message token bucket), then the real
parts: the API app over the embedded broker with the ingest as its own process, and devices over
MQTT into the ingest. Limits are set low in the tests' settings, with margins wide enough for a
loaded 2-core machine: a well-behaved device sends at most half its rate.
"""

from __future__ import annotations

import doctest
import os
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import orjson
import pyarrow as pa
import pytest
from fastapi.testclient import TestClient

import iot2ml.auth.limits as limits_module
from iot2ml.api import create_app
from iot2ml.auth.guard import Guard
from iot2ml.auth.limits import BYTES, MESSAGES, OK, Buckets, DeviceLimiter, Limits, Rate
from iot2ml.auth.store import Devices, Keys
from iot2ml.auth.users import Users
from iot2ml.core.catalog import Catalog
from iot2ml.core.errors import RateLimited
from iot2ml.core.http import Principal
from iot2ml.ingest.decode import Decoder, InMessage
from iot2ml.lake import Lake
from iot2ml.simulate.loadgen import publish_qos1_sync
from iot2ml.supervisor import settings_env

T0 = 1_763_780_000_000_000  # µs


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --------------------------------------------------------------------------- bucket arithmetic


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_module_examples_hold():
    assert doctest.testmod(limits_module).failed == 0


def test_a_bucket_gives_its_burst_then_its_rate_and_says_how_long_to_wait():
    clock = Clock()
    b = Buckets(Rate(10, 5), clock=clock)
    assert [b.take("d") for _ in range(5)] == [0.0] * 5
    assert b.take("d") == pytest.approx(0.1)  # one token comes back every 1/10 s
    assert b.take("d", 3) == pytest.approx(0.3)  # a refusal takes nothing
    clock.now += 0.25
    assert b.take("d") == 0.0 and b.take("d") == 0.0 and b.take("d") > 0  # 2.5 tokens came back
    clock.now += 60  # never more than the burst
    assert sum(b.take("d") == 0.0 for _ in range(20)) == 5
    assert b.take("other") == 0.0  # per key


def test_a_cost_over_the_burst_passes_on_a_full_bucket_only():
    clock = Clock()
    b = Buckets(Rate(100, 1000), clock=clock)
    assert b.take("d", 5000) == 0.0  # a full bucket: passes, empties it
    assert b.take("d", 5000) == pytest.approx(10.0)  # then waits for a full bucket again


def test_rate_zero_is_off_and_bad_rates_are_refused():
    b = Buckets(Rate(0, 1))
    assert all(b.take("d", 10**9) == 0.0 for _ in range(1000)) and len(b) == 0
    with pytest.raises(ValueError, match="burst >= 1"):
        Rate(5, 0)
    with pytest.raises(ValueError, match="rate >= 0"):
        Rate(-1, 5)


def test_idle_buckets_are_forgotten_so_memory_follows_the_active_callers():
    clock = Clock()
    b = Buckets(Rate(10, 10), clock=clock, max_keys=500)
    for i in range(400):
        b.take(f"d{i}")
    assert len(b) == 400
    clock.now += 1.0  # every bucket is full again: forgetting one loses nothing
    for i in range(200):
        b.take(f"new{i}")
    assert len(b) == 200  # up to 4 forgotten per take: all 400 old ones are gone
    for i in range(1000):  # past max_keys the longest idle go first, even if not full
        b.take(f"more{i}")
    assert len(b) <= 501


def test_buckets_are_thread_safe():
    clock = Clock()  # the clock stands still: exactly the burst may pass, whatever the threads do
    b = Buckets(Rate(1, 1000), clock=clock)
    passed = []

    def hammer() -> None:
        passed.append(sum(b.take("d") == 0.0 for _ in range(500)))

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(passed) == 1000


def test_limits_name_the_limit_and_a_whole_retry_after():
    clock = Clock()
    limits = Limits(device=Rate(100, 100), device_bytes=Rate(1000, 2000), key=Rate(2, 2), clock=clock)
    pump = Principal("device", "pump-7", "pump")
    for _ in range(100):
        limits.admit(pump)
    with pytest.raises(RateLimited, match=r"^rate limit: device pump-7 over 100 requests/s .*retry after 1 s$") as err:
        limits.admit(pump)
    assert err.value.retry_after == 1  # 0.01 s rounds up to a whole second
    ci = Principal("key", "ci", "operator")
    limits.admit(ci)
    limits.admit(ci)
    with pytest.raises(RateLimited, match="API key ci over 2 requests/s") as err:
        limits.admit(ci)
    assert err.value.retry_after == 1
    limits.admit(Principal("key", "other", "viewer"))  # another key has its own bucket
    limits.admit(Principal("user", "ci", "viewer"))  # a user named like the key too
    limits.charge(pump, 2000)
    with pytest.raises(RateLimited, match="device pump-7 over 1000 payload bytes/s") as err:
        limits.charge(pump, 1500)
    assert err.value.retry_after == 2  # 1.5 s
    limits.charge(ci, 10**9)  # payload quotas are per device; keys pass
    limits.admit(Principal("anonymous", "", ""))


def test_the_guard_counts_each_request_once_and_spares_the_control_secret(settings):
    catalog = Catalog(settings.catalog)
    try:
        guard = Guard(catalog, control="local-secret",
                      limits=Limits(device=Rate(1, 3), device_bytes=Rate(0, 1), key=Rate(1, 3)))
        token = guard.devices.add_device("pump-7", "pump")
        key = Keys(catalog).add_key("ci", "viewer")
        for _ in range(3):
            guard.caller(key)  # who it is (the audit asks) is not a request
            guard.authorize(key, "data:read")
            guard.device(token, "pump-7")
        with pytest.raises(RateLimited, match="API key ci"):
            guard.authorize(key, "data:read")
        with pytest.raises(RateLimited, match="device pump-7"):
            guard.device(token, "pump-7")
        for _ in range(50):  # the CLI on this machine
            guard.authorize("local-secret", "keys:admin")
    finally:
        catalog.close()


def reference(messages: Rate, payload: Rate, slack: float, batches: list) -> list[list[int]]:
    """A plain token bucket, message by message: what ``DeviceLimiter`` must answer."""
    dims = [(r, code) for r, code in ((messages, MESSAGES), (payload, BYTES)) if r.on]
    caps = [r.burst + r.per_second * slack for r, _ in dims]
    state: dict[str, tuple[list[float], float]] = {}
    out = []
    for devices, sizes, times in batches:
        codes = []
        for device, size, t in zip(devices, sizes, times):
            t = (t - T0) / 1e6
            levels, at = state.get(device, (list(caps), t))
            now = max(at, t)
            levels = [min(c, v + r.per_second * (now - at)) for v, (r, _), c in zip(levels, dims, caps)]
            cost = [(1.0 if size else 0.0) if code == MESSAGES else min(size, c) for (_, code), c in zip(dims, caps)]
            short = [v + 1e-6 < x for v, x in zip(levels, cost)]
            if any(short):
                codes.append(dims[short.index(True)][1])
            else:
                codes.append(OK)
                levels = [v - x for v, x in zip(levels, cost)]
            state[device] = (levels, now)
        out.append(codes)
    return out


def test_device_limiter_answers_as_a_message_by_message_bucket():
    rng = random.Random(7)
    for _ in range(150):
        messages = Rate(rng.choice([0, 2, 20, 500]), rng.choice([1, 4, 30]))
        payload = Rate(rng.choice([0, 300, 5000]), rng.choice([500, 4000]))
        if not (messages.on or payload.on):
            continue
        slack = rng.choice([0.0, 0.5])
        batches, t = [], T0
        for _ in range(rng.randint(1, 4)):
            n = rng.choice([1, 5, 50, 700])  # size classes of the padded pass, and the long path
            devices = [rng.choice(["a", "b", "c", "d"]) if rng.random() < 0.7 else f"x{rng.randint(0, 90)}"
                       for _ in range(n)]
            sizes = [rng.choice([0, 10, 80, 700, 9000]) for _ in range(n)]
            times = []
            for _ in range(n):
                t += rng.choice([0, 200, 5_000, 60_000, 700_000]) - (3_000 if rng.random() < 0.02 else 0)
                times.append(t)
            batches.append((devices, sizes, times))
        limiter = DeviceLimiter(messages, payload, slack=slack)
        got = [limiter.check(*batch).tolist() for batch in batches]
        assert got == reference(messages, payload, slack, batches), (messages, payload, slack)


def test_a_backlog_is_judged_on_the_broker_clock_not_when_it_is_read():
    limiter = DeviceLimiter(Rate(10, 10), Rate(0, 1), slack=0)
    # 20 s of a device at 8 messages/s, read in one go after an outage: all within its limit
    times = T0 + np.arange(160) * 125_000
    assert not limiter.over(pa.array(["pump-1"] * 160), np.full(160, 50), times).any()
    # 400 messages in one second: the burst and the second's rate pass, the rest do not
    flood = T0 + 30_000_000 + np.arange(400) * 2_500
    codes = limiter.check(["pump-2"] * 400, np.full(400, 50), flood)
    assert 10 + 9 <= (codes == OK).sum() <= 10 + 10  # the burst + about 1 s x 10/s (the last at 0.9975 s)
    assert set(codes[codes != OK].tolist()) == {MESSAGES}


def test_a_batch_of_many_devices_is_decided_without_a_loop_per_message():
    limiter = DeviceLimiter(Rate(1000, 20000), Rate(8 * 2**20, 64 * 2**20))
    n = 200_000
    devices = pa.array([f"dev-{i % 5000}" for i in range(n)])
    times = T0 + np.arange(n) * 2  # 200k messages in 0.4 s: 40 a device, within the limits
    started = time.perf_counter()
    codes = limiter.check(devices, np.full(n, 200), times)
    flood = limiter.check(pa.array(["dev-0"] * n), np.full(n, 200), times + 1_000_000)
    took = time.perf_counter() - started
    assert not codes.any() and 0 < (flood == OK).sum() < 25_000
    assert took < 5.0, f"{took:.2f} s for 400k messages"  # ~0.1 s on a laptop


def test_the_decoder_dead_letters_the_excess_with_the_reason_and_keeps_it_out_of_raw():
    decoder = Decoder(lambda _d: "pump", limiter=DeviceLimiter(Rate(1, 3), Rate(0, 1), slack=0))
    messages = [InMessage(i + 1, f"devices.{'flood' if i % 4 else 'calm'}.telemetry", T0 + i * 1000,
                          orjson.dumps({"n": i})) for i in range(40)]
    decoded = decoder.decode(messages)
    calm = [i for i in range(40) if i % 4 == 0]
    assert decoded.curated["pump"]["device_id"].to_pylist().count("calm") == 3  # its burst in 40 ms
    dead = decoded.dead_letters.to_pydict()
    assert dead["device_id"].count("flood") == 30 - 3 and dead["device_id"].count("calm") == len(calm) - 3
    assert set(dead["reason"]) == {
        f"rate limit: device {d} over 1 messages/s (burst 3): slow the device down or raise limit_device_rate"
        for d in ("flood", "calm")}
    assert sorted(orjson.loads(p)["n"] for p in dead["payload"]) == sorted(set(range(40)) - {0, 4, 8, 1, 2, 3})
    assert decoded.raw.num_rows == 6


# --------------------------------------------------------------------------- real parts


def start_ingest(settings, log_path):
    env = {**os.environ, **settings_env(settings), "IOT2ML_CONFIG": os.devnull, "IOT2ML_LOG_LEVEL": "WARNING"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log = open(log_path, "ab")  # noqa: SIM115 - the child writes to it until stopped
    return subprocess.Popen([sys.executable, "-m", "iot2ml", "ingest"], env=env, stdout=log, stderr=log)


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


def rows_by_device(lake: Lake, table: str) -> dict[str, int]:
    if table not in lake.tables():
        return {}
    lake.forget(table)
    ids = lake.open(table).to_pyarrow_table(columns=["device_id"])["device_id"].to_pylist()
    return {d: ids.count(d) for d in set(ids)}


def wait_for(check, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:
        time.sleep(0.2)


RATE, BURST = 5, 10  # per device and per key in the HTTP tests


@pytest.fixture
def limited(settings):
    return settings.model_copy(update={"limit_device_rate": RATE, "limit_device_burst": BURST,
                                       "limit_key_rate": RATE, "limit_key_burst": BURST})


@pytest.mark.timeout(120)
def test_http_a_flooding_device_gets_429_while_another_device_lands_every_row(limited, make_broker, tmp_path):
    broker = make_broker(limited)
    devices = Devices(Catalog(limited.catalog))
    flood_token = devices.add_device("flood-1", "pump")
    calm_token = devices.add_device("calm-1", "pump")
    ingest = start_ingest(limited, tmp_path / "ingest.log")
    try:
        with TestClient(create_app(limited, nats_url=broker.url)) as client:
            statuses: list[int] = []
            refusals: list = []
            calm: list[int] = []
            stop_flood = threading.Event()

            def flood() -> None:
                while not stop_flood.is_set():
                    r = client.post("/api/v1/devices/flood-1/telemetry", headers=auth(flood_token),
                                    json={"n": len(statuses), "pressure": 1.0})
                    statuses.append(r.status_code)
                    if r.status_code == 429:
                        refusals.append(r)

            def well_behaved() -> None:  # 2 requests/s of 10 readings, against a limit of 5/s
                for b in range(8):
                    r = client.post("/api/v1/devices/calm-1/telemetry", headers=auth(calm_token),
                                    json=[{"n": b * 10 + k, "pressure": 2.0} for k in range(10)])
                    calm.append(r.status_code)
                    time.sleep(0.5)

            flooder = threading.Thread(target=flood)
            started = time.monotonic()
            flooder.start()
            well_behaved()
            stop_flood.set()
            flooder.join(30)
            elapsed = time.monotonic() - started

            admitted = statuses.count(201)
            assert set(statuses) == {201, 429}
            assert calm == [201] * 8  # the other device was served every time
            # the flooder got its burst and its rate, no more (+1: the refill while the last request ran)
            assert BURST <= admitted <= BURST + RATE * elapsed + 1, (admitted, elapsed, len(statuses))
            assert len(refusals) > 2 * admitted  # it really flooded
            r = refusals[-1]
            assert r.json()["detail"].startswith(f"rate limit: device flood-1 over {RATE} requests/s")
            retry = int(r.headers["Retry-After"])
            assert retry >= 1 and r.json()["detail"].endswith(f"retry after {retry} s")
            time.sleep(retry)  # then it is served again
            r = client.post("/api/v1/devices/flood-1/telemetry", headers=auth(flood_token), json={"n": -1})
            assert r.status_code == 201
            admitted += 1

        lake = Lake(limited.lake)
        wait_for(lambda: rows_by_device(lake, "pump").get("calm-1", 0) >= 80
                 and rows_by_device(lake, "pump").get("flood-1", 0) >= admitted)
        time.sleep(1.0)  # anything extra would show now
        landed = rows_by_device(lake, "pump")
        # fairness, measured: the well-behaved device's rows are 100 % of what it sent, and every
        # reading the flooder was answered 201 for is there too (none dead-lettered by the ingest)
        assert landed.get("calm-1") == 80, landed
        assert landed.get("flood-1") == admitted, landed
        assert rows_by_device(lake, "dead_letters") == {}
        print(f"http: flooder {len(statuses) + 1} requests in {elapsed:.1f} s, {admitted} served (limit {RATE}/s, "
              f"burst {BURST}), {len(refusals)} x 429; well-behaved device 8/8 served, {landed['calm-1']}/80 rows landed")
    finally:
        stop(ingest)


def test_http_a_flooding_key_gets_429_and_other_keys_and_users_are_unaffected(limited):
    catalog = Catalog(limited.catalog)
    keys = Keys(catalog)
    flood_key, calm_key = keys.add_key("flood-key", "viewer"), keys.add_key("calm-key", "viewer")
    Users(catalog).add_user("alice", "correct horse battery", "viewer")
    with TestClient(create_app(limited)) as client:
        started = time.monotonic()
        got = [client.get("/api/v1/deployments", headers=auth(flood_key)) for _ in range(40)]
        elapsed = time.monotonic() - started
        codes = [r.status_code for r in got]
        assert codes[:BURST] == [200] * BURST and set(codes) == {200, 429}
        assert codes.count(200) <= BURST + RATE * elapsed + 1, (codes, elapsed)
        refused = next(r for r in got if r.status_code == 429)
        assert "rate limit: API key flood-key over 5 requests/s" in refused.json()["detail"]
        assert int(refused.headers["Retry-After"]) >= 1
        for _ in range(BURST):  # the other key has its own bucket, full
            assert client.get("/api/v1/deployments", headers=auth(calm_key)).status_code == 200
        token = client.post("/api/v1/auth/login", json={"username": "alice", "password": "correct horse battery"})
        token = token.json()["access_token"]
        users = [client.get("/api/v1/deployments", headers=auth(token)).status_code for _ in range(BURST + 20)]
        assert users[:BURST] == [200] * BURST and 429 in users  # users are limited like keys
        time.sleep(int(refused.headers["Retry-After"]) + 0.2)
        assert client.get("/api/v1/deployments", headers=auth(flood_key)).status_code == 200
    catalog.close()


def test_http_a_device_over_its_payload_quota_gets_429(settings, broker):
    settings = settings.model_copy(update={"limit_device_bytes": 1000, "limit_device_bytes_burst": 2000})
    token = Devices(Catalog(settings.catalog)).add_device("big-1", "pump")
    body = orjson.dumps({"pad": "x" * 880})  # 892 bytes
    with TestClient(create_app(settings, nats_url=broker.url)) as client:
        post = [client.post("/api/v1/devices/big-1/telemetry", headers=auth(token), content=body) for _ in range(3)]
        assert [r.status_code for r in post] == [201, 201, 429]
        assert post[2].json()["detail"].startswith("rate limit: device big-1 over 1000 payload bytes/s")
        assert int(post[2].headers["Retry-After"]) == 1  # 676 bytes short at 1000 bytes/s


MQTT_RATE, MQTT_BURST = 20, 20
FLOOD, CALM_CHUNKS, CALM_CHUNK = 3000, 10, 5


@pytest.mark.timeout(120)
def test_mqtt_a_flooding_device_is_dead_lettered_while_another_lands_every_reading(settings, make_broker, tmp_path):
    settings = settings.model_copy(update={"limit_device_rate": MQTT_RATE, "limit_device_burst": MQTT_BURST})
    broker = make_broker(settings)
    devices = Devices(Catalog(settings.catalog))
    tokens = {d: devices.add_device(d, "pump") for d in ("mflood-1", "mcalm-1")}
    broker.service.poke()
    broker.wait_reload()
    ingest = start_ingest(settings, tmp_path / "ingest.log")
    try:
        spans: list[float] = []
        acked: list[int] = []

        def flood() -> None:
            started = time.monotonic()
            payloads = [orjson.dumps({"msg_id": f"f-{i}", "n": i}) for i in range(FLOOD)]
            res = publish_qos1_sync("127.0.0.1", broker.mqtt_port, username="mflood-1", password=tokens["mflood-1"],
                                    topic="devices/mflood-1/telemetry", payloads=payloads)
            spans.append(time.monotonic() - started)
            acked.append(res.acked)

        flooder = threading.Thread(target=flood)
        flooder.start()
        for c in range(CALM_CHUNKS):  # 5 messages every 0.5 s: 10/s at most, half the limit
            payloads = [orjson.dumps({"msg_id": f"c-{c}-{k}", "n": k}) for k in range(CALM_CHUNK)]
            res = publish_qos1_sync("127.0.0.1", broker.mqtt_port, username="mcalm-1", password=tokens["mcalm-1"],
                                    topic="devices/mcalm-1/telemetry", payloads=payloads)
            assert res.acked == CALM_CHUNK
            time.sleep(0.5)
        flooder.join(60)
        assert acked == [FLOOD]  # the broker took every message: the ingest decides

        lake = Lake(settings.lake)
        sent_calm = CALM_CHUNKS * CALM_CHUNK
        wait_for(lambda: rows_by_device(lake, "pump").get("mcalm-1", 0) >= sent_calm
                 and sum(rows_by_device(lake, "pump").values()) + sum(rows_by_device(lake, "dead_letters").values())
                 >= FLOOD + sent_calm)
        time.sleep(1.0)
        landed, dead = rows_by_device(lake, "pump"), rows_by_device(lake, "dead_letters")
        # fairness, measured: 100 % of the well-behaved device's readings landed, none dead-lettered
        assert landed.get("mcalm-1") == sent_calm and "mcalm-1" not in dead, (landed, dead)
        # the flooder got its burst (+1 s of slack) and its rate over the time it published; the rest
        # is in dead_letters with the reason and its payload: nothing acknowledged is lost silently
        kept = landed.get("mflood-1", 0)
        assert MQTT_BURST <= kept <= MQTT_BURST + MQTT_RATE * (1 + spans[0] + 1), (kept, spans)
        assert kept + dead.get("mflood-1", 0) == FLOOD
        letters = lake.open("dead_letters").to_pyarrow_table(columns=["reason", "payload"]).to_pydict()
        assert set(letters["reason"]) == {(f"rate limit: device mflood-1 over {MQTT_RATE} messages/s "
                                           f"(burst {MQTT_BURST}): slow the device down or raise limit_device_rate")}
        kept_ids = set(lake.open("pump").to_pyarrow_table(columns=["msg_id"])["msg_id"].to_pylist())
        dead_ids = {orjson.loads(p)["msg_id"] for p in letters["payload"]}
        assert kept_ids | dead_ids >= {f"f-{i}" for i in range(FLOOD)} and not kept_ids & dead_ids
        raw = lake.open("raw").to_pyarrow_table(columns=["device_id"])["device_id"].to_pylist()
        assert raw.count("mflood-1") == kept  # refused messages are not in raw
        print(f"mqtt: flooder {FLOOD} messages in {spans[0]:.2f} s: {kept} landed, {dead['mflood-1']} dead-lettered "
              f"(limit {MQTT_RATE}/s, burst {MQTT_BURST}); well-behaved device {landed['mcalm-1']}/{sent_calm} landed")
    finally:
        stop(ingest)


def test_the_sdk_raises_rate_limited_with_retry_after(limited):
    """iot2ml.Client over real HTTP: a 429 is a ``RateLimited`` (a ``Transient``) carrying Retry-After."""
    from apiserver import serving

    import iot2ml
    from iot2ml.core.errors import RateLimited, Transient

    key = Keys(Catalog(limited.catalog)).add_key("sdk-key", "viewer")
    with serving(limited) as url, iot2ml.Client(url, key) as client:
        with pytest.raises(RateLimited) as caught:
            for _ in range(BURST + 40):
                client.tables()
        assert isinstance(caught.value, Transient) and caught.value.retry_after >= 1
        assert "rate limit: API key sdk-key" in str(caught.value)
