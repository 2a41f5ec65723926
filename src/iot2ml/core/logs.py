"""Logging set-up shared by the commands: ours on stderr, other libraries' chatter in the debug log.

``setup_logging()`` is called once per process: by the CLI for every command (``component=False``:
our warnings and errors only) and again by each component (``component=True``: our INFO lines, into
``data_dir/run/<name>.log`` under ``up``). Either way, records of other libraries below WARNING
(ERROR for a command), Python warnings (such as MLflow's advice to type-hint ``predict``) and what
MLflow prints on stderr ("Successfully registered model ...", "Created version ...") become DEBUG
records: ``IOT2ML_LOG_LEVEL=DEBUG`` shows them all.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import os
import sys
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_COMMAND_FORMAT = "%(levelname)s %(name)s: %(message)s"
_MLFLOW_STREAM_MODULE = "mlflow.utils.logging_utils"


class _Threshold(logging.Filter):
    """Passes our records from ``ours`` up and everybody else's from ``theirs`` up."""

    def __init__(self, ours: int, theirs: int) -> None:
        super().__init__()
        self.ours, self.theirs = ours, theirs

    def filter(self, record: logging.LogRecord) -> bool:
        mine = record.name == "iot2ml" or record.name.startswith("iot2ml.")
        return record.levelno >= (self.ours if mine else self.theirs)


def setup_logging(level: str | None = None, *, component: bool = True) -> None:
    """Log to stderr at ``level`` (else ``IOT2ML_LOG_LEVEL``, else INFO for a component and WARNING
    for a command); other libraries only from WARNING (ERROR for a command) unless the level is DEBUG.
    Calling it again replaces the previous set-up."""
    name = (level or os.environ.get("IOT2ML_LOG_LEVEL") or ("INFO" if component else "WARNING")).upper()
    ours = logging.getLevelName(name)
    if not isinstance(ours, int):
        from .errors import ConfigError

        raise ConfigError(f"log level {name!r} is not valid: use DEBUG, INFO, WARNING or ERROR")
    theirs = ours if ours <= logging.DEBUG else max(ours, logging.WARNING if component else logging.ERROR)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_iot2ml", False)]:
        root.removeHandler(old)
    handler = logging.StreamHandler()
    handler._iot2ml = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter(_FORMAT if component else _COMMAND_FORMAT))
    handler.addFilter(_Threshold(ours, theirs))
    root.addHandler(handler)
    root.setLevel(min(ours, theirs))
    warnings.showwarning = _warning_to_debug
    _quiet_mlflow()


def _warning_to_debug(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      file: Any = None, line: str | None = None) -> None:
    logging.getLogger("py.warnings").debug("%s:%s: %s: %s", filename, lineno, category.__name__, message)


class _DebugLines:
    """A text stream whose lines become DEBUG records of ``logger``."""

    def __init__(self, logger: str) -> None:
        self._log = logging.getLogger(logger)
        self._buffer = ""

    def write(self, text: str) -> int:
        self._buffer += text
        *lines, self._buffer = self._buffer.split("\n")
        for line in lines:
            if line.strip():
                self._log.debug("%s", line)
        return len(text)

    def flush(self) -> None:
        pass


def _quiet_mlflow() -> None:
    """MLflow's loggers propagate to ours (it configures none), and what it prints to stderr becomes
    DEBUG records, from the moment it is imported (lazily, by the ML commands)."""
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    module = sys.modules.get(_MLFLOW_STREAM_MODULE)
    if module is not None:
        _mlflow_stream_to_debug(module)
    elif not any(isinstance(f, _AfterImport) and f.name == _MLFLOW_STREAM_MODULE for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(_MLFLOW_STREAM_MODULE, _mlflow_stream_to_debug))


def _mlflow_stream_to_debug(module: ModuleType) -> None:
    # Every eprint() and MLflow log handler writes to this one stream object.
    stream = getattr(module, "MLFLOW_LOGGING_STREAM", None)
    if stream is not None:
        lines = _DebugLines("mlflow")
        stream.write, stream.flush = lines.write, lines.flush


class _AfterImport(importlib.abc.MetaPathFinder):
    """A one-shot import hook: ``then(module)`` right after module ``name`` has executed."""

    def __init__(self, name: str, then: Callable[[ModuleType], None]) -> None:
        self.name, self.then = name, then

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        loader = spec.loader if spec is not None else None
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then(module: ModuleType) -> None:
            exec_module(module)
            self.then(module)

        loader.exec_module = exec_then  # type: ignore[method-assign]
        return spec
