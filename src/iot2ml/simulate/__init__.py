"""Device simulators: a scenario registry and a runner that drives a fleet over MQTT or HTTP.

``iot2ml.simulate.loadgen`` holds the pipelined QoS 1 publisher used by benchmarks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .scenarios import SCENARIOS, Scenario, get_scenario

if TYPE_CHECKING:
    from .runner import SimulationStats, run_simulation

__all__ = ["SCENARIOS", "Scenario", "SimulationStats", "get_scenario", "run_simulation"]


def __getattr__(name: str) -> Any:  # the runner pulls in paho, httpx and rich: load it on first use
    if name in ("run_simulation", "SimulationStats"):
        from . import runner

        return getattr(runner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
