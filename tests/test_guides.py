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
- ``SUBSTITUTIONS`` shortens what only waits (a canary's bake time); each must occur in its guide.
- The guides run at once, ``WORKERS`` at a time; ``pytest -s`` shows each block's output and time.
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
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from ports import free_ports  # below the ephemeral range: tests/ports.py

ROOT = Path(__file__).resolve().parents[1]
GUIDES = ROOT / "docs" / "guides"

SUBSTITUTIONS: dict[str, dict[str, str]] = {
    "serving-rest-forecast.md": {"--bake 1m": "--bake 15s"},
}
"""Per guide, text replaced in its bash blocks before they run."""

SLOW = {"serving-rest-forecast.md", "serving-streaming-promotion.md", "pollution.md", "monitoring.md"}
BLOCK_TIMEOUT = 240.0
GUIDES_TIMEOUT = 900.0
"""The first guide test waits for the longest guide while the others run beside it on a busy
machine: more than pytest's 300 s default; a stuck block is still stopped by ``BLOCK_TIMEOUT``."""
WORKERS = int(os.environ.get("IOT2ML_TEST_GUIDE_WORKERS", "3"))
"""Guides run at once (each with its own platform)."""
_BORDERS = re.compile(r"[┆│┃┏┓┗┛━─┡┩╇┳┻┼└┘┌┐├┤┬┴╭╮╰╯═║╔╗╚╝]")


@dataclass
class Block:
    code: str
    expected: list[str] = field(default_factory=list)
    line: int = 0


def blocks(path: Path) -> list[Block]:
    """The ```bash blocks of a guide with the output lines each one quotes."""
    out = []
    for match in re.finditer(r"^```bash\n(.*?)^```", path.read_text(), re.DOTALL | re.MULTILINE):
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
        commands = [line for line in code.splitlines() if line.strip() and not line.startswith("#")]
        assert "iot2ml up --detach" in commands[0] and commands[-1] == "iot2ml down", path.name
        for old in SUBSTITUTIONS.get(path.name, {}):
            assert old in code, f"substitution {old!r} no longer occurs in {path.name}"


def run_guide(name: str, workdir: Path) -> tuple[str | None, str]:
    """Run guide ``name`` in ``workdir``: (what went wrong or None, the transcript)."""
    path = GUIDES / name
    nats, mqtt, http, serve = free_ports(4)
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
           "IOT2ML_NATS_PORT": str(nats), "IOT2ML_MQTT_PORT": str(mqtt), "IOT2ML_HTTP_PORT": str(http),
           "IOT2ML_SERVE_PORT": str(serve), "PYTHONUNBUFFERED": "1"}
    env.pop("COLUMNS", None)
    transcript: list[str] = []
    problem = None
    session = Session(workdir, env)
    started = time.monotonic()
    try:
        for n, block in enumerate(blocks(path)):
            code = block.code
            for old, new in SUBSTITUTIONS.get(name, {}).items():
                code = code.replace(old, new)
            began = time.monotonic()
            finished, output = session.run(n, code, BLOCK_TIMEOUT)
            transcript.append(f"--- {name} block {n + 1} (line {block.line}), {time.monotonic() - began:.1f} s ---\n"
                              f"{output}")
            if not finished:
                problem = f"block {n + 1} (line {block.line}) failed:\n{block.code}"
                break
            missing = [e for e in block.expected if not shows(output, e)]
            if missing:
                problem = f"block {n + 1} (line {block.line}) did not print {missing}"
                break
    finally:
        session.close()
        if (workdir / "data" / "run" / "up.json").exists():
            subprocess.run([sys.executable, "-m", "iot2ml", "down", "--data-dir", str(workdir / "data")],
                           env=env, capture_output=True, timeout=90, check=False)
        transcript.append(f"{name}: {time.monotonic() - started:.0f} s")
    if problem is None:
        shutil.rmtree(workdir / "data", ignore_errors=True)
    return problem, "\n".join(transcript)


@pytest.fixture(scope="module")
def guide_runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Future]]:
    """Every selected guide, started at once on WORKERS threads (longest first): most of a guide's
    time is waiting for processes, so they overlap well even on two cores."""
    selected = [item.callspec.params["name"] for item in request.session.items
                if getattr(item, "callspec", None) and item.originalname == "test_guide_runs_verbatim"]
    pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="guide")
    runs = {name: pool.submit(run_guide, name, tmp_path_factory.mktemp(Path(name).stem))
            for name in sorted(selected, key=lambda n: (n not in SLOW, n))}
    yield runs
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.timeout(GUIDES_TIMEOUT)
@pytest.mark.parametrize("name", guide_params())
def test_guide_runs_verbatim(name, guide_runs):
    problem, transcript = guide_runs[name].result()
    print(transcript)  # -s shows every block's output
    assert problem is None, f"{name}: {problem}\n{transcript}"
