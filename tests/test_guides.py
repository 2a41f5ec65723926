"""Every guide in docs/guides/ runs verbatim: its ```bash blocks, in order, in one bash session per
guide, in an empty directory, as a new user would paste them.

- Every command must succeed (the session runs with ``set -eo pipefail``; each block is sourced
  with stdin from /dev/null).
- A line of a bash block that is only a comment, ``# text``, is what the command above it prints:
  some line of the block's output (stdout and stderr) must contain it, compared without table
  borders and with runs of spaces as one; ``…`` stands for anything that varies (times, ids).
  Comment lines inside a here-document are the document's, not output.
- The platform gets free ports through ``IOT2ML_*_PORT`` variables (this machine runs Mosquitto on
  1883 and NATS on 4222); guides read the ports they need from ``iot2ml up --detach --json``.
- ``SUBSTITUTIONS`` shortens what only waits (a canary's bake time, the traffic that feeds it); each
  must occur in some guide.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUIDES = ROOT / "docs" / "guides"

SUBSTITUTIONS: dict[str, dict[str, str]] = {
    "serving-rest-forecast.md": {"--bake 1m": "--bake 20s", "traffic 70": "traffic 25", "traffic 20": "traffic 10"},
}
"""Per guide, text replaced in its bash blocks before they run."""

SLOW = {"serving-rest-forecast.md", "serving-streaming-promotion.md", "pollution.md"}
BLOCK_TIMEOUT = 240.0
_BORDERS = re.compile(r"[┆│┃┏┓┗┛━─┡┩╇┳┻┼└┘┌┐├┤┬┴╭╮╰╯═║╔╗╚╝]")


@dataclass
class Block:
    code: str
    expected: list[str] = field(default_factory=list)
    line: int = 0


def blocks(path: Path) -> list[Block]:
    """The ```bash blocks of a guide with the output lines each one quotes."""
    out = []
    for match in re.finditer(r"^```bash\n(.*?)^```", path.read_text(), re.S | re.M):
        block = Block(match.group(1), line=path.read_text()[:match.start()].count("\n") + 1)
        heredoc = None
        for line in block.code.splitlines():
            if heredoc is not None:
                heredoc = None if line.strip() == heredoc else heredoc
                continue
            found = re.search(r"<<-?\s*'?\"?(\w+)'?\"?", line)
            if found and not line.lstrip().startswith("#"):
                heredoc = found.group(1)
            if line.startswith("# "):
                block.expected.append(line[2:])
        out.append(block)
    return out


def normal(text: str) -> str:
    return " ".join(_BORDERS.sub(" ", text).split())


def shows(output: str, expected: str) -> bool:
    """Whether some line of ``output`` holds ``expected``'s pieces (split at ``…``) in order."""
    pieces = [normal(p) for p in expected.split("…")]
    for line in output.splitlines():
        line, at = normal(line), 0
        for piece in pieces:
            at = line.find(piece, at)
            if at < 0:
                break
            at += len(piece)
        else:
            return True
    return False


def free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Session:
    """One bash process fed block by block; output read by a thread."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.cwd = cwd
        self.proc = subprocess.Popen(["bash", "--noprofile", "--norc"], cwd=cwd, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True, bufsize=1)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self._send("set -eo pipefail\n")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text)
        self.proc.stdin.flush()

    def run(self, n: int, code: str, timeout: float) -> tuple[bool, str]:
        """Source block ``n``; (finished, its output). A failing command ends the session."""
        script = self.cwd / f".block-{n}.sh"
        script.write_text(code)
        marker = f"::block {n} done::"
        self._send(f"source {script.name} </dev/null\necho '{marker}'\n")
        output: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                return False, "".join(output) + f"\n[timed out after {timeout:.0f} s]"
            if line is None:
                return False, "".join(output) + f"\n[bash exited with code {self.proc.wait(5)}]"
            if marker in line:  # after output that did not end its line, too
                return True, "".join(output) + line[:line.index(marker)]
            output.append(line)

    def close(self) -> None:
        try:
            self._send("exit\n")
            self.proc.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # background jobs the guide left behind
        except ProcessLookupError:
            pass


def guide_params() -> list:
    return [pytest.param(p.name, marks=[pytest.mark.slow] if p.name in SLOW else [], id=p.stem)
            for p in sorted(GUIDES.glob("*.md"))]


def test_every_guide_has_bash_blocks_and_the_substitutions_apply():
    for path in sorted(GUIDES.glob("*.md")):
        code = "\n".join(b.code for b in blocks(path))
        assert code.strip(), f"{path.name} has no bash block"
        assert "iot2ml up --detach" in code and code.rstrip().endswith("iot2ml down"), path.name
        for old in SUBSTITUTIONS.get(path.name, {}):
            assert old in code, f"substitution {old!r} no longer occurs in {path.name}"


@pytest.mark.parametrize("name", guide_params())
def test_guide_runs_verbatim(name, tmp_path):
    path = GUIDES / name
    nats, mqtt, http, serve = free_ports(4)
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
           "IOT2ML_NATS_PORT": str(nats), "IOT2ML_MQTT_PORT": str(mqtt), "IOT2ML_HTTP_PORT": str(http),
           "IOT2ML_SERVE_PORT": str(serve), "PYTHONUNBUFFERED": "1"}
    env.pop("COLUMNS", None)
    session = Session(tmp_path, env)
    started = time.monotonic()
    try:
        for n, block in enumerate(blocks(path)):
            code = block.code
            for old, new in SUBSTITUTIONS.get(name, {}).items():
                code = code.replace(old, new)
            began = time.monotonic()
            finished, output = session.run(n, code, BLOCK_TIMEOUT)
            print(f"--- {name} block {n + 1}: {time.monotonic() - began:.1f} s ---\n{output}")  # -s shows it
            where = f"{name} block {n + 1} (line {block.line})"
            assert finished, f"{where} failed:\n{block.code}\n--- output ---\n{output}"
            missing = [e for e in block.expected if not shows(output, e)]
            assert not missing, f"{where} did not print {missing}:\n--- output ---\n{output}"
    finally:
        session.close()
        if (tmp_path / "data" / "run" / "up.json").exists():
            subprocess.run([sys.executable, "-m", "iot2ml", "down", "--data-dir", str(tmp_path / "data")],
                           env=env, capture_output=True, timeout=90)
        print(f"{name}: {time.monotonic() - started:.0f} s")
    shutil.rmtree(tmp_path / "data", ignore_errors=True)
