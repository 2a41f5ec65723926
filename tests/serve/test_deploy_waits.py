"""Deploys are done when they say so: ``iot2ml deploy / rollback / undeploy`` and the API's
``/api/v1/deployments`` return once the running serving processes serve the change, so the very
next request, over REST on either port or over MQTT, gets the new state.

Real pieces: the embedded broker, ``iot2ml serve`` as its own process (found by its run file, with
``serve_poll`` at its 60 s maximum so that only the wait can explain a prompt switch), the API's
app on a real port, the wine models in a real MLflow registry, the CLI."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from servekit import ServerThread, free_port, instance
from test_mqtt import client
from typer.testing import CliRunner

from iot2ml.auth.store import Devices, Keys
from iot2ml.cli import app as cli
from iot2ml.core.catalog import Catalog
from iot2ml.core.runtime import clear_run_info, read_run_info, write_run_info
from iot2ml.serve.deployments import Deployments


@dataclass
class Platform:
    settings: Any
    serve_url: str
    serve_pid: int
    serve_started: float
    api_url: str
    key: str
    admin: str
    device: str
    mqtt: Any
    inbox: Any
    log: Path

    def cli(self, *args: str, code: int = 0) -> Any:
        result = CliRunner().invoke(cli, [*args, "--data-dir", str(self.settings.data_dir)])
        assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr, self.log.read_text()[-3000:])
        return result

    def rest(self, base: str, i: int = 0) -> httpx.Response:
        return httpx.post(f"{base}/api/v1/models/wine/predict", json={"instances": [instance(i)]},
                          headers={"Authorization": f"Bearer {self.key}"}, timeout=30)

    def ask(self, request_id: str) -> dict[str, Any]:
        """Publish a prediction request as the device over MQTT; its answer on its own topic."""
        self.mqtt.publish(f"devices/{self.device}/predict",
                          json.dumps({"request_id": request_id, "model": "wine", **instance(5)}), qos=1)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            _topic, reply = self.inbox.get(timeout=20)
            if reply.get("request_id") == request_id:
                return reply
        raise AssertionError(f"no answer to {request_id}")

    def answers(self, version: int, tag: str) -> None:
        """The next request on each channel is answered by ``version`` (not 'not deployed')."""
        for base in (self.serve_url, self.api_url):
            r = self.rest(base)
            assert r.status_code == 200, (base, r.text)
            assert r.json()["version"] == version, (base, r.json())
        reply = self.ask(tag)
        assert "error" not in reply and reply["version"] == version, reply


@pytest.fixture
def platform(trained, make_broker, tmp_path) -> Iterator[Platform]:
    settings, bench = trained
    catalog = Catalog(settings.catalog)
    store = Deployments(catalog)
    for d in store.list():
        store.remove(d.name, who="test reset")
    bench.registry.client.set_registered_model_alias("wine", "champion", "1")
    devices = Devices(catalog)
    devices.add_type("wine", exist_ok=True)
    device = f"wd-{time.monotonic_ns()}"
    token = devices.add_device(device, "wine")
    key = Keys(catalog).add_key(f"k{time.monotonic_ns()}", "reader")
    admin = Keys(catalog).add_key(f"a{time.monotonic_ns()}", "admin")
    broker = make_broker(settings)
    broker.service.poke()
    broker.wait_reload()

    from iot2ml.api import create_app
    from iot2ml.supervisor import settings_env

    env = {**os.environ, **settings_env(settings), "IOT2ML_CONFIG": os.devnull, "IOT2ML_SERVE_POLL": "60"}
    log = tmp_path / "serve.log"
    started = time.monotonic()
    with log.open("wb") as out:
        serve = subprocess.Popen([sys.executable, "-m", "iot2ml", "serve"], env=env, stdout=out,
                                 stderr=subprocess.STDOUT)
    api = None
    try:
        deadline = time.monotonic() + 90
        info: dict[str, Any] = {}
        while time.monotonic() < deadline:
            assert serve.poll() is None, log.read_text()
            with contextlib.suppress(Exception):  # not up yet
                info = read_run_info(settings.data_dir, "serve")
                if info.get("pid") == serve.pid and httpx.get(f"{info['url']}/healthz", timeout=2).json()["ok"]:
                    break
            time.sleep(0.2)
        else:
            raise AssertionError(f"iot2ml serve did not start:\n{log.read_text()}")
        # The API on a real port, recorded as the running 'api' component (as 'iot2ml api' does).
        port = free_port()
        api = ServerThread(create_app(settings, catalog=catalog, nats_url=broker.url), port)
        write_run_info(settings.data_dir, "api", {"url": f"http://127.0.0.1:{port}", "port": port})
        mqtt, inbox = client(broker.mqtt_port, device, token, subscribe=f"devices/{device}/predictions")
        time.sleep(0.3)
        yield Platform(settings, info["url"], serve.pid, started, f"http://127.0.0.1:{port}", key, admin, device,
                       mqtt, inbox, log)
        mqtt.loop_stop()
        mqtt.disconnect()
    finally:
        clear_run_info(settings.data_dir, "api")
        if api is not None:
            api.stop()
        os.kill(serve.pid, signal.SIGCONT)
        serve.terminate()
        serve.wait(30)
        catalog.close()


def test_deploy_rollback_undeploy_are_served_by_the_next_request(platform):
    p = platform
    out = p.cli("deploy", "wine", "--version", "1", "--devices", "wine").stdout
    p.answers(1, "q1")  # at once, on both ports and over MQTT
    assert f"serve (pid {p.serve_pid}" in " ".join(out.split()) and "api (pid" in out

    # Without waiting, the serving process (polling every 60 s) still answers with what it had:
    # what the next checks see is the wait's doing.
    p.cli("deploy", "wine", "--version", "2", "--no-wait")
    if time.monotonic() - p.serve_started < 50:
        assert p.rest(p.serve_url).json()["version"] == 1

    info = json.loads(p.cli("deploy", "wine", "--version", "2", "--json").stdout)
    assert info["generation"] == 3 and len(info["confirmed_by"]) == 2
    p.answers(2, "q2")

    p.cli("rollback", "wine")
    p.answers(1, "q3")  # the restored version answers the next request

    p.cli("undeploy", "wine")
    for base in (p.serve_url, p.api_url):
        r = p.rest(base)
        assert r.status_code == 404 and "not deployed" in r.json()["detail"], (base, r.text)
    assert "not deployed" in p.ask("q4")["error"]


def test_api_changes_wait_for_the_serving_process(platform):
    p = platform
    headers = {"Authorization": f"Bearer {p.admin}"}
    r = httpx.put(f"{p.api_url}/api/v1/deployments/wine", json={"version": 2, "devices": "wine"}, headers=headers,
                  timeout=60)
    assert r.status_code == 200, r.text
    assert any(f"pid {p.serve_pid}" in c for c in r.json()["confirmed_by"]), r.json()
    p.answers(2, "a1")
    r = httpx.put(f"{p.api_url}/api/v1/deployments/wine", json={"version": 1}, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    p.answers(1, "a2")
    r = httpx.post(f"{p.api_url}/api/v1/deployments/wine/rollback", headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    p.answers(2, "a3")
    assert httpx.delete(f"{p.api_url}/api/v1/deployments/wine", headers=headers, timeout=60).status_code == 204
    assert p.rest(p.serve_url).status_code == 404


def test_a_process_that_does_not_apply_the_change_is_named_and_the_exit_code_says_so(platform):
    p = platform
    first = json.loads(p.cli("deploy", "wine", "--version", "1", "--devices", "wine", "--json").stdout)
    wanted = first["generation"] + 1  # generations keep growing across the module's earlier undeploys
    os.kill(p.serve_pid, signal.SIGSTOP)  # alive, but it answers nothing
    try:
        started = time.monotonic()
        result = p.cli("deploy", "wine", "--version", "2", "--wait-timeout", "2", code=3)
        assert time.monotonic() - started < 15
        said = " ".join(result.stderr.split())
        assert f"serve (pid {p.serve_pid}, {p.serve_url}) did not load generation {wanted} of wine within 2 s" \
            in said, said
        assert "The change is stored" in said and "serve.log" in said
        assert f"generation {wanted}" in result.stdout  # what was stored is still printed
    finally:
        os.kill(p.serve_pid, signal.SIGCONT)
    # Once it runs again, a deploy is confirmed as usual (and the API's runtime had it all along).
    p.cli("deploy", "wine", "--version", "2")
    p.answers(2, "t1")
