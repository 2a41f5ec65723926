"""A wrapper that makes a real fitted estimator fail or slow down: the canary tests' bad versions.

It lives in an importable module so that MLflow's pickle of the model finds it when the serving
runtime (in the test process) loads the version.
"""

from __future__ import annotations

import time
from typing import Any


class Faulty:
    """Delegates to ``estimator``; ``mode`` is ``"raise"`` or ``"slow:<seconds per call>"``."""

    def __init__(self, estimator: Any, mode: str) -> None:
        self.estimator = estimator
        self.mode = mode

    def _act(self) -> None:
        if self.mode == "raise":
            raise RuntimeError("this model version is broken on purpose")
        if self.mode.startswith("slow:"):
            time.sleep(float(self.mode.split(":", 1)[1]))

    def predict_proba(self, x: Any) -> Any:
        self._act()
        return self.estimator.predict_proba(x)

    def predict(self, x: Any) -> Any:
        self._act()
        return self.estimator.predict(x)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or "estimator" not in self.__dict__:  # unpickling: no state yet
            raise AttributeError(name)
        return getattr(self.__dict__["estimator"], name)
