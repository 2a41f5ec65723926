"""Bad input never earns a 5xx nor kills the server.

schemathesis fuzzes the serving app's OpenAPI over HTTP (the document the running server publishes,
plus one made exact for the deployed wine model so that valid bodies reach the model); then
mutations of a valid wine instance check that every answer is a 200 or a 4xx naming the field.
One server on a real port serves the whole module; after each test it must still be up and answer.

Cases come from ``operation.as_strategy`` under Hypothesis' ``@given``: schemathesis 4.32's
``pytest.from_fixture`` reads ``request.node._nodeid``, which pytest 9.2 no longer has.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from servekit import FEATURES, Served, ServerThread, free_port, instance

from iot2ml.auth.store import Devices, Keys
from iot2ml.core.catalog import Catalog
from iot2ml.serve.deployments import Deployments

PREDICT = "/api/v1/models/{name}/predict"
VALID = {"alcohol": 10.5, "volatile_acidity": 0.5, "ph": 3.3}
CONTEXT = ("device_id", "ts", "request_id", "model")  # fields an instance may carry besides features
CHECKS = [schemathesis.checks.not_a_server_error, schemathesis.checks.status_code_conformance,
          schemathesis.checks.content_type_conformance, schemathesis.checks.negative_data_rejection]
FUZZ = settings(max_examples=100, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                       HealthCheck.data_too_large, HealthCheck.large_base_example])


@dataclasses.dataclass
class Live:
    served: Served
    server: ServerThread
    client: httpx.Client

    @property
    def url(self) -> str:
        return self.served.url

    def predict(self, body: Any = None, *, content: bytes | None = None) -> httpx.Response:
        """POST ``body`` as JSON (or ``content`` as it is) to wine's predict route with the API key."""
        if content is None:
            content = json.dumps(body).encode()
        headers = {**self.served.headers, "content-type": "application/json"}
        return self.client.post(f"{self.url}/api/v1/models/wine/predict", content=content, headers=headers)

    def assert_alive(self) -> None:
        """The uvicorn thread still runs and a valid request still gets its prediction."""
        assert self.server.thread.is_alive() and not self.server.server.should_exit, "the server died"
        r = self.predict({"instances": [instance(7)]})
        assert r.status_code == 200, r.text
        assert r.json()["predictions"][0]["prediction"] in ("good", "better", "best")


@pytest.fixture(scope="module")
def live(trained: tuple[Any, Any]) -> Iterator[Live]:
    """The serving app on a free port with 'wine' (v1) deployed, shared by the module's tests."""
    from iot2ml.api import create_serve_app
    from iot2ml.components import serving_runtime
    from iot2ml.serve.deployments import build_spec

    settings_, bench = trained
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IOT2ML_CONFIG", "/dev/null")
        catalog = Catalog(settings_.catalog)
        deployments = Deployments(catalog)
        for d in deployments.list():
            deployments.remove(d.name, who="test reset")
        bench.registry.client.set_registered_model_alias("wine", "champion", "1")
        key = Keys(catalog).add_key(f"fuzz{time.monotonic_ns()}", "reader")
        app = create_serve_app(settings_, catalog=catalog, runtime=serving_runtime(settings_, catalog))
        port = free_port()
        server = ServerThread(app, port)
        served = Served(settings_, bench, catalog, deployments, f"http://127.0.0.1:{port}", key, app)
        deployments.put(build_spec(None, "wine"), who="test", action="deploy")
        served.wait_serving("wine", lambda d: d["variants"][0]["resolved_version"] == 1)
        try:
            with httpx.Client(timeout=30) as client:
                yield Live(served, server, client)
        finally:
            server.stop()
            catalog.close()


@pytest.fixture
def alive_after(live: Live) -> Iterator[Live]:
    """``live``, checked to be up and answering once the test is done (never a crashed worker)."""
    yield live
    live.assert_alive()


# --------------------------------------------------------------------------- schemathesis


def wine_document(document: dict[str, Any]) -> dict[str, Any]:
    """The published OpenAPI with the predict body made exact for the wine model: each instance
    takes the three features (numbers; null is a missing value) and the context fields, nothing else.
    Positive cases must then be answered (200), negative ones rejected (4xx)."""
    document = copy.deepcopy(document)
    body = document["paths"][PREDICT]["post"]["requestBody"]["content"]["application/json"]["schema"]
    body["properties"]["instances"]["items"] = {
        "type": "object", "required": list(FEATURES), "additionalProperties": False,
        "properties": {**{f: {"type": ["number", "null"]} for f in FEATURES},
                       **{c: {} for c in CONTEXT}},
    }
    body["additionalProperties"] = False
    return document


def has_input(operation: Any) -> bool:
    return bool(operation.body or operation.path_parameters or operation.query or operation.headers)


def fuzz(live: Live, operation: Any, mode: GenerationMode, seen: list[int], *, exact: bool = False,
         examples: int = 100, **fixed: Any) -> None:
    """Run one operation's generated cases; one in five goes without credentials (401 then)."""
    strategy = operation.as_strategy(mode, **fixed)

    @settings(FUZZ, max_examples=examples)
    @given(case=strategy, anonymous=st.sampled_from((False, False, False, False, True)))
    def run(case: Any, anonymous: bool) -> None:
        response = case.call(base_url=live.url, headers=None if anonymous else live.served.headers, timeout=30)
        seen.append(response.status_code)
        case.validate_response(response, checks=CHECKS)
        if response.status_code >= 400 and "json" in response.headers.get("content-type", ""):
            assert isinstance(response.json().get("detail"), (str, list)), response.text
        protected = operation.path.startswith("/api/")
        if anonymous and protected:
            assert response.status_code == 401, response.text
        elif exact and mode == GenerationMode.POSITIVE:
            assert response.status_code == 200, f"{case.body!r} -> {response.text}"
        elif exact:
            assert 400 <= response.status_code < 500, f"{case.body!r} -> {response.text}"

    run()


def test_schemathesis_finds_no_server_error_in_the_published_api(alive_after: Live):
    live = alive_after
    document = live.client.get(f"{live.url}/openapi.json").raise_for_status().json()
    schema = schemathesis.openapi.from_dict(document)
    labels, seen = [], []
    for result in schema.get_all_operations():
        operation = result.ok()
        labels.append(operation.label)
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if has_input(operation) else [])
        for mode in modes:
            if operation.path == PREDICT:  # most cases at the deployed model, a few at a random name
                fuzz(live, operation, mode, seen, examples=30)
                fuzz(live, operation, mode, seen, path_parameters={"name": "wine"})
            else:
                fuzz(live, operation, mode, seen)
    assert sorted(labels) == ["GET /api/v1/serving", "GET /healthz", "GET /metrics", f"POST {PREDICT}",
                              "POST /api/v1/serving/refresh"]
    assert {200, 401, 404, 422} <= set(seen), sorted(set(seen))


def test_schemathesis_on_the_exact_wine_body_answers_valid_and_rejects_invalid(alive_after: Live):
    live = alive_after
    document = live.client.get(f"{live.url}/openapi.json").raise_for_status().json()
    operation = schemathesis.openapi.from_dict(wine_document(document))[PREDICT]["POST"]
    valid: list[int] = []
    invalid: list[int] = []
    fuzz(live, operation, GenerationMode.POSITIVE, valid, exact=True, path_parameters={"name": "wine"})
    fuzz(live, operation, GenerationMode.NEGATIVE, invalid, exact=True, path_parameters={"name": "wine"})
    assert valid.count(200) >= 30, valid  # the generated bodies did reach the model
    assert invalid.count(422) >= 30, invalid


# --------------------------------------------------------------------------- mutations of a valid instance

TEXT = st.text(st.characters(codec="utf-8"), max_size=20)
JUNK = st.recursive(
    st.none() | st.booleans() | TEXT | st.sampled_from(["NaN", "Infinity", "-inf", "1e999", "", "0x10"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)
NOT_A_NUMBER = JUNK.filter(lambda v: v is not None)
NUMBERS = (st.none() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False, allow_infinity=False)
           | st.sampled_from([1e308, -1e308, 5e-324, 0, -0.0, 2**53 + 1]))
NAMES = st.text(st.characters(codec="utf-8"), min_size=1, max_size=12).filter(lambda k: k not in (*FEATURES, *CONTEXT))


@st.composite
def mutated(draw: st.DrawFn) -> tuple[dict[str, Any], int, tuple[str, ...]]:
    """A body with one mutated instance among valid ones: (body, status, what a 4xx's detail must name)."""
    n = draw(st.integers(1, 4))
    at = draw(st.integers(0, n - 1))
    item = dict(VALID)
    kind = draw(st.sampled_from(["drop", "add", "junk", "number", "context", "many"]))
    feature = draw(st.sampled_from(FEATURES))
    where = f"instances[{at}]"
    if kind == "drop":
        del item[feature]
        expected, needles = 422, (where, repr(feature))
    elif kind == "add":
        name = draw(NAMES)
        item[name] = draw(JUNK)
        expected, needles = 422, (where, repr(name))
    elif kind == "junk":
        item[feature] = draw(NOT_A_NUMBER)
        expected, needles = 422, (f"{where}.{feature}",)
    elif kind == "number":
        item[feature] = draw(NUMBERS)
        expected, needles = 200, ()
    elif kind == "context":  # fields the model does not read: whatever (shallow) they hold, answered
        item[draw(st.sampled_from(CONTEXT))] = draw(JUNK | NUMBERS)
        expected, needles = 200, ()
    else:
        for f in FEATURES:
            item[f] = draw(NUMBERS)
        expected, needles = 200, ()
    instances = [dict(VALID) for _ in range(n)]
    instances[at] = item
    return {"instances": instances}, expected, needles


@settings(max_examples=250, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(case=mutated())
def test_a_mutated_instance_gets_a_200_or_a_4xx_naming_the_field(live, case):
    body, expected, needles = case
    r = live.predict(body)
    assert r.status_code == expected, f"{body!r} -> {r.status_code} {r.text}"
    if r.status_code == 200:
        assert len(r.json()["predictions"]) == len(body["instances"])
    assert all(n in r.json().get("detail", "") for n in needles), f"{body!r} -> {r.text}"


def nested(depth: int, leaf: Any = 1) -> Any:
    for _ in range(depth):
        leaf = [leaf]
    return leaf


def deep_json(field: str, depth: int) -> bytes:
    """One valid instance whose ``field`` holds lists nested ``depth`` deep (beyond what json.dumps can write)."""
    value = b"[" * depth + b"]" * depth
    return b'{"instances": [{"alcohol": 10.5, "volatile_acidity": 0.5, "ph": 3.3, "%s": %s}]}' % (field.encode(), value)


BAD = [
    pytest.param({"instances": []}, 422, "empty", id="empty instances"),
    pytest.param({"instances": None}, 422, "list", id="null instances"),
    pytest.param({}, 422, "instances", id="no instances"),
    pytest.param({"instances": [VALID], "extra": 1}, 422, "'extra'", id="unknown top-level field"),
    pytest.param({"instances": [VALID], "request_id": 7}, 422, "request_id", id="request_id not a string"),
    pytest.param({"instances": [VALID], "configuration": [1]}, 422, "configuration", id="configuration not an object"),
    pytest.param({"instances": [{}] * 10_001}, 422, "at most 10000", id="over the instance cap"),
    pytest.param({"instances": [VALID] * 5_000}, 413, "max_payload_bytes", id="oversize body"),
    pytest.param({"instances": [{**VALID, "alcohol": nested(50)}]}, 422, "instances[0].alcohol", id="nested feature"),
    pytest.param(deep_json("colour", 300), 422, "instances[0].colour", id="deep unknown field"),
    pytest.param(deep_json("ts", 300), 422, "instances[0].ts", id="deep context field"),
    pytest.param(deep_json("device_id", 1_000), 422, "instances[0].device_id", id="deep device_id"),
    pytest.param({"instances": [{**VALID, "device_id": {"a": [1, {"b": None}]}}]}, 200, None, id="object device_id"),
    pytest.param({"instances": [{**VALID, "alcohol": "NaN"}]}, 422, "instances[0].alcohol", id="NaN string"),
    pytest.param({"instances": [{**VALID, "ph": 1e308}]}, 200, None, id="huge number"),
    pytest.param({"instances": [{**VALID, "ph": 2**64 + 1}]}, 200, None, id="integer over 64 bits"),
    pytest.param({"instances": [{**VALID, "ph": None}]}, 200, None, id="null is a missing value"),
    pytest.param(b'{"instances": [{"alcohol": NaN, "volatile_acidity": 0.5, "ph": 3.3}]}', 400, "JSON",
                 id="NaN literal"),
    pytest.param(b'{"instances": [{"alcohol": 1e999, "volatile_acidity": 0.5, "ph": 3.3}]}', 400, "JSON",
                 id="number beyond double"),
    pytest.param(deep_json("alcohol", 2_000), 400, "JSON", id="nesting beyond the parser"),
    pytest.param(b'{"instances": [{"alcohol": "\xff\xfe", "volatile_acidity": 0.5, "ph": 3.3}]}', 400, "JSON",
                 id="not UTF-8"),
    pytest.param(b"\x00\x01\x02", 400, "JSON", id="binary"),
    pytest.param(b"", 400, "JSON", id="empty body"),
    pytest.param(b"[1, 2]", 400, "object", id="array body"),
]


@pytest.mark.parametrize(("body", "status", "needle"), BAD)
def test_bad_bodies_get_a_4xx_naming_the_field(alive_after, body, status, needle):
    r = alive_after.predict(content=body) if isinstance(body, bytes) else alive_after.predict(body)
    assert r.status_code == status, r.text[:500]
    if needle is not None:
        assert needle in r.json()["detail"], r.text[:500]


# --------------------------------------------------------------------------- the main API (bonus)

#: Routes that answer 503 by design when run without a broker (predictions are answered by the API itself).
NEEDS_A_PEER = {"POST /api/v1/devices/{device_id}/telemetry": "broker"}
MAIN_CHECKS = [schemathesis.checks.content_type_conformance, schemathesis.checks.negative_data_rejection]


def fuzz_main(url: str, operation: Any, headers: dict[str, str], statuses: list[int], **fixed: Any) -> None:
    """No 5xx (but the documented 503 of a route whose peer is not running) and no accepted invalid body.
    The main API leaves most 4xx undocumented, so status codes are not checked against the document."""
    strategy = operation.as_strategy(GenerationMode.POSITIVE, **fixed)
    if has_input(operation):
        strategy = strategy | operation.as_strategy(GenerationMode.NEGATIVE, **fixed)

    @settings(max_examples=15, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(case=strategy)
    def run(case: Any) -> None:
        response = case.call(base_url=url, headers=headers, timeout=30)
        statuses.append(response.status_code)
        if response.status_code == 503 and operation.label in NEEDS_A_PEER:
            assert NEEDS_A_PEER[operation.label] in response.json()["detail"], response.text
            return
        assert response.status_code < 500, f"{operation.label}: {response.status_code} {response.text[:500]}"
        case.validate_response(response, checks=MAIN_CHECKS)

    run()


def test_schemathesis_finds_no_server_error_in_the_main_api(tmp_path):
    """``create_app`` without a broker, on a fresh data dir, fuzzed with an admin key (a device token for
    telemetry): every route answers, none with a server error, and the server stays up."""
    from iot2ml.api.app import create_app
    from iot2ml.core.config import load_settings

    settings_ = load_settings(data_dir=tmp_path / "data", nats_port=0, mqtt_port=0, http_port=0, serve_port=0)
    catalog = Catalog(settings_.catalog)
    admin = {"Authorization": f"Bearer {Keys(catalog).add_key('fuzz', 'admin')}"}
    device = {"Authorization": f"Bearer {Devices(catalog).add_device('fuzz-1', 'wine')}"}
    server = ServerThread(create_app(settings_, catalog=catalog), free_port())
    url = f"http://127.0.0.1:{server.server.config.port}"
    try:
        document = httpx.get(f"{url}/openapi.json").raise_for_status().json()
        seen: dict[str, list[int]] = {}
        for result in schemathesis.openapi.from_dict(document).get_all_operations():
            operation = result.ok()
            statuses = seen.setdefault(operation.label, [])
            if operation.label in NEEDS_A_PEER and "telemetry" in operation.path:
                fuzz_main(url, operation, device, statuses, path_parameters={"device_id": "fuzz-1"})
            else:
                fuzz_main(url, operation, admin, statuses)
        assert len(seen) >= 15 and all(seen.values()), seen
        assert 400 in seen["POST /api/v1/devices/{device_id}/telemetry"], seen  # past auth, into the decoder
        assert server.thread.is_alive()
        assert httpx.get(f"{url}/healthz").json()["ok"] is True
    finally:
        server.stop()
        catalog.close()
