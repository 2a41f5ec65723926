"""Components are rows of one table: every component's command takes the options `up` takes, and
`up` starts and stops whatever the table holds, in its order."""

from __future__ import annotations

import json
import re
import shlex
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from iot2ml.cli import app
from iot2ml.cli._common import SHARED_FLAGS
from iot2ml.components import COMPONENTS, Component, Port, active_ports, start_stages
from iot2ml.core.config import load_settings
from iot2ml.core.runtime import port_is_free, read_run_info
from iot2ml.supervisor import Platform

FLAGS = list(SHARED_FLAGS.values())
SWITCHES = {"--tls", "--plain-mqtt"}


def help_of(*command: str) -> str:
    out = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    return out.output


def test_shared_options_are_the_ones_up_takes():
    assert set(FLAGS) == {"--data-dir", "--catalog-url", "--host", "--mqtt-url", "--nats-port", "--mqtt-port",
                          "--http-port", "--serve-port", "--tls", "--mqtts-port", "--tls-cert", "--tls-key",
                          "--plain-mqtt"}
    for command in ("up", "demo"):
        text = help_of(command)
        assert [f for f in FLAGS if f not in text] == [], command


@pytest.mark.parametrize("component", [c.name for c in COMPONENTS])
def test_every_component_command_takes_every_shared_option(component):
    text = help_of(component)
    assert [f for f in FLAGS if f not in text] == []
    for switch in next(c for c in COMPONENTS if c.name == component).switches:
        assert switch.flag in text
    # All of them at once are accepted (click rejects an unknown option before --help answers).
    values = {"--data-dir": "./data", "--catalog-url": "sqlite:///x.db", "--host": "127.0.0.1",
              "--mqtt-url": "mqtt://127.0.0.1:1"}
    args = [a for f in FLAGS if f not in SWITCHES for a in (f, values.get(f, "0"))] + sorted(SWITCHES)
    assert CliRunner().invoke(app, [component, *args, "--help"]).exit_code == 0


def test_broker_accepts_http_port(tmp_path):
    """`iot2ml broker --http-port 0` used to be refused; it runs (and is stopped by SIGTERM)."""
    import subprocess

    data = tmp_path / "data"
    proc = subprocess.Popen([sys.executable, "-m", "iot2ml", "broker", "--data-dir", str(data), "--nats-port", "0",
                             "--mqtt-port", "0", "--http-port", "0", "--serve-port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not (data / "run" / "broker.json").exists():
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the broker did not start"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_a_component_names_all_its_busy_ports_with_one_command(tmp_path):
    with socket.socket() as a, socket.socket() as b:
        for s in (a, b):
            s.bind(("127.0.0.1", 0))
            s.listen()
        nats, mqtt = a.getsockname()[1], b.getsockname()[1]
        out = CliRunner().invoke(app, ["broker", "--data-dir", str(tmp_path / "d"), "--nats-port", str(nats),
                                       "--mqtt-port", str(mqtt)])
    assert out.exit_code == 2
    text = " ".join(out.output.split())
    found = re.search(rf"ports {nats} \(--nats-port\), {mqtt} \(--mqtt-port\) are already in use: run `([^`]+)`", text)
    assert found, text
    argv = shlex.split(found.group(1))
    assert argv[:2] == ["iot2ml", "broker"] and argv[argv.index("--data-dir") + 1] == str(tmp_path / "d")
    suggested = [int(argv[argv.index(flag) + 1]) for flag in ("--nats-port", "--mqtt-port")]
    assert suggested[0] != nats and suggested[1] != mqtt
    assert all(port_is_free("127.0.0.1", p) for p in suggested)


# ---- the supervisor loops over the table --------------------------------------------------------
CHILD = """
import json, os, signal, sys, time
data, name, log = sys.argv[1], sys.argv[2], sys.argv[3]
def stop(*_):
    with open(log, "a") as f:
        f.write(f"stop {name} {time.monotonic()}\\n")
    time.sleep(0.2)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
with open(log, "a") as f:
    f.write(f"start {name} {time.monotonic()}\\n")
time.sleep(0.3)  # then ready: the run file names this process
os.makedirs(os.path.join(data, "run"), exist_ok=True)
with open(os.path.join(data, "run", name + ".json"), "w") as f:
    json.dump({"pid": os.getpid()}, f)
while True:
    time.sleep(1)
"""


class FakePlatform(Platform):
    """The real supervisor over a registry of stand-in processes."""

    log: Path = Path()

    def child_command(self, name: str) -> list[str]:
        return [sys.executable, "-c", CHILD, str(self.settings.data_dir), name, str(self.log)]


def test_up_starts_and_stops_what_the_registry_holds_in_its_order(tmp_path):
    def row(name: str, stage: int, **kw) -> Component:
        return Component(name, f"{name} help", lambda settings: None, stage=stage, death_signal=signal.SIGTERM, **kw)

    registry = (row("first", 0, ports=(Port("http_port", "--http-port"),)), row("second", 1), row("third", 1),
                row("last", 2))
    assert [[c.name for c in s] for s in start_stages(registry)] == [["first"], ["second", "third"], ["last"]]
    settings = load_settings(data_dir=tmp_path / "data", http_port=0)
    platform = FakePlatform(settings, components=registry)
    platform.log = tmp_path / "events.log"
    platform.start(timeout=30)
    try:
        up = read_run_info(settings.data_dir, "up")
        assert up["state"] == "up" and set(up["pids"]) == {"first", "second", "third", "last"}
        assert up["http_port"] > 0 and [e["key"] for e in up["endpoints"]] == []
    finally:
        platform.shutdown()
    events = [line.split() for line in platform.log.read_text().splitlines()]
    starts = [(n, float(t)) for kind, n, t in events if kind == "start"]
    stops = [(n, float(t)) for kind, n, t in events if kind == "stop"]
    # Each stage starts once the previous one is ready (wrote its run file, 0.3 s after starting).
    assert starts[0][0] == "first" and {n for n, _ in starts[1:3]} == {"second", "third"} and starts[3][0] == "last"
    assert starts[1][1] - starts[0][1] >= 0.3 and starts[3][1] - max(t for _, t in starts[1:3]) >= 0.3
    # Stopped stage by stage in reverse.
    assert stops[0][0] == "last" and {n for n, _ in stops[1:3]} == {"second", "third"} and stops[3][0] == "first"
    assert not (settings.data_dir / "run" / "up.json").exists()


def test_the_real_registry_drives_ports_and_banner():
    platform = Platform(load_settings(nats_port=0, mqtt_port=0, http_port=0, serve_port=0))
    platform.settle_ports()
    assert {p.setting for c in COMPONENTS for p in c.ports} == {
        "nats_port", "mqtt_port", "mqtts_port", "http_port", "serve_port"}
    ports = {p.setting for p in active_ports(platform.settings)}
    assert ports == {"nats_port", "mqtt_port", "http_port", "serve_port"}  # no TLS: no MQTTS port
    chosen = [getattr(platform.settings, p) for p in sorted(ports)]
    assert all(chosen) and len(set(chosen)) == 4
    assert set(platform.urls) == {"mqtt", "nats", "ui", "http", "metrics", "serve"}
    assert json.dumps(platform.status("up"))  # what up.json holds is JSON
    assert platform.urls["http"].startswith("http://")


def test_tls_adds_the_mqtts_port_and_https_and_can_drop_plain_mqtt():
    platform = Platform(load_settings(nats_port=0, mqtt_port=0, http_port=0, serve_port=0, mqtts_port=0,
                                      plain_mqtt=False))
    platform.settle_ports()
    assert {p.setting for p in active_ports(platform.settings)} == {"nats_port", "mqtts_port", "http_port",
                                                                     "serve_port"}
    assert platform.settings.mqtts_port
    assert set(platform.urls) == {"mqtts", "nats", "ui", "http", "metrics", "serve"}
    assert platform.urls["http"].startswith("https://") and platform.urls["serve"].startswith("https://")
