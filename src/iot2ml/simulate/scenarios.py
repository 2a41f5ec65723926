"""Scenario registry and the device models behind each scenario.

A scenario makes device models; a model answers ``reading(t)`` with one reading (without ``ts`` or
``msg_id``) at epoch time ``t``. Models are pure functions of ``(seed, index, t)``: the same device
gives the same reading for the same time, so history can be back-filled and tests are exact.

Built in: ``pollution`` (city air-quality stations) and ``pump`` (pump rigs that slowly block).
Later scenarios (wine, viscosity) call ``register``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping, Protocol

from ..core.errors import AlreadyExists, NotFound
from ..core.ids import check_type_name

__all__ = [
    "SCENARIOS", "DeviceModel", "PollutionStation", "PumpRig", "Scenario", "get_scenario", "register",
]

_M64 = (1 << 64) - 1
_DAY = 86_400.0
_HOUR = 3_600.0


class DeviceModel(Protocol):
    """One simulated device."""

    def reading(self, t: float) -> dict[str, Any]:
        """The device's reading at epoch seconds ``t``: ``{field: value}`` without ``ts``/``msg_id``."""
        ...


@dataclass(frozen=True)
class Scenario:
    """A named family of simulated devices of one device type."""

    name: str
    device_type: str
    description: str
    fields: dict[str, str]
    """``{field: type}`` of a reading (types as the catalog spells them: float, int, string, bool)."""
    make_device: Callable[[int, int], DeviceModel]
    """``make_device(index, seed)``: the model of device number ``index`` (deterministic in both)."""
    units: dict[str, str] = field(default_factory=dict)
    """``{field: unit}`` for people reading the data."""


_registry: dict[str, Scenario] = {}
SCENARIOS: Mapping[str, Scenario] = MappingProxyType(_registry)
"""Every registered scenario by name (read-only; add with ``register``)."""


def register(scenario: Scenario, *, replace: bool = False) -> Scenario:
    """Add ``scenario`` to ``SCENARIOS``; a taken name raises ``AlreadyExists`` unless ``replace``."""
    check_type_name(scenario.device_type)
    if scenario.name in _registry and not replace:
        raise AlreadyExists(f"scenario {scenario.name!r} is registered already: pick another name or pass replace=True")
    _registry[scenario.name] = scenario
    return scenario


def get_scenario(name: str) -> Scenario:
    """The scenario called ``name``; ``NotFound`` lists the known ones."""
    try:
        return _registry[name]
    except KeyError:
        known = ", ".join(sorted(_registry)) or "none"
        raise NotFound(f"scenario {name!r} is not known: use one of {known}") from None


# ---- deterministic randomness ---------------------------------------------------------------
def _mix(x: int) -> int:
    """splitmix64: a well-spread 64-bit hash of an integer."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _key(*parts: int) -> int:
    h = 0x2545F4914F6CDD1D
    for part in parts:
        h = _mix(h ^ (part & _M64))
    return h


def _rng(*parts: int) -> random.Random:
    return random.Random(_key(*parts))


def _ms(t: float) -> int:
    return int(round(t * 1000))


def _bump(hour: float, centre: float, width: float) -> float:
    """A Gaussian bump on the 24-hour circle."""
    d = (hour - centre + 12.0) % 24.0 - 12.0
    return math.exp(-0.5 * (d / width) ** 2)


# ---- pollution --------------------------------------------------------------------------------
_CITY = (51.5074, -0.1278)  # London; daily cycles follow local solar time (UTC + lon/15 h)
POLLUTANTS = ("ozone", "pm25", "pm10", "co", "so2", "no2")
FAULT_RATE = 0.005
"""Share of pollution readings with a sensor fault (stuck at 0, spike x10 or a missing field)."""
_FAULTS = ("zero", "spike", "missing")


class PollutionStation:
    """An urban air-quality station: gases and particles with daily, weekly and weather cycles.

    Units: ozone, no2, so2, pm25, pm10 in µg/m³; co in mg/m³. Ozone peaks mid-afternoon with the
    sun; no2, co and particles peak at the morning and evening rush hours (less on weekends); every
    station has its own traffic and industry exposure. About ``FAULT_RATE`` of readings carry a
    fault: one pollutant stuck at 0, one spiking x10, or one missing.
    """

    def __init__(self, index: int, seed: int) -> None:
        self.index, self.seed = index, seed
        self._key = _key(1, seed, index)
        city = _rng(1, seed)  # shared by every station of this seed: the weather
        self._weather = [(city.uniform(2.5, 12.0) * _DAY, city.uniform(0, 2 * math.pi)) for _ in range(3)]
        rng = _rng(2, seed, index)
        self.lat = round(_CITY[0] + rng.uniform(-0.12, 0.12), 5)
        self.lon = round(_CITY[1] + rng.uniform(-0.2, 0.2), 5)
        self.traffic = rng.uniform(0.4, 1.6)
        self.industry = rng.uniform(0.0, 1.0)
        self.coarse = rng.uniform(1.4, 1.9)  # pm10 / pm25
        self.ozone_base = rng.uniform(28.0, 42.0)

    def _clean(self, t: float, rng: random.Random) -> dict[str, float]:
        local = t + self.lon / 15.0 * _HOUR
        hour = (local / _HOUR) % 24.0
        weekday = (int(local // _DAY) + 3) % 7  # 1970-01-01 was a Thursday; Monday = 0
        season = math.cos(2 * math.pi * ((t / _DAY) % 365.25 - 172) / 365.25)  # 1 at midsummer
        weather = math.exp(sum(0.18 * math.sin(2 * math.pi * t / p + ph) for p, ph in self._weather))
        sun = max(0.0, math.cos(2 * math.pi * (hour - 15.0) / 24.0)) ** 1.5
        rush = 0.25 + _bump(hour, 8.0, 1.3) + 0.85 * _bump(hour, 18.0, 1.6)
        if weekday >= 5:
            rush *= 0.6
        traffic = self.traffic * rush
        night = _bump(hour, 3.0, 3.0)  # shallow boundary layer holds particles at night

        def noisy(value: float, sigma: float = 0.08) -> float:
            return max(0.0, value * math.exp(rng.gauss(0.0, sigma)))

        no2 = noisy((10.0 + 32.0 * traffic) * weather)
        ozone = noisy(self.ozone_base + 8.0 * season + (48.0 + 22.0 * season) * sun / weather - 6.0 * traffic)
        pm25 = noisy((6.0 + 7.0 * traffic + 5.0 * night) * weather * (1.0 - 0.15 * season))
        pm10 = noisy(pm25 * self.coarse + 3.0)
        co = noisy((0.2 + 0.45 * traffic) * weather * (1.0 - 0.2 * season))
        so2 = noisy(1.5 + 5.0 * self.industry * (0.6 + 0.4 * sun), 0.15)
        return {
            "ozone": round(ozone, 2), "pm25": round(pm25, 2), "pm10": round(pm10, 2),
            "co": round(co, 3), "so2": round(so2, 2), "no2": round(no2, 2),
        }

    def fault(self, t: float) -> tuple[str, str] | None:
        """``(kind, field)`` of the sensor fault at ``t`` (kind: zero, spike, missing), or ``None``."""
        rng = _rng(self._key, _ms(t), 7)
        if rng.random() >= FAULT_RATE:
            return None
        return rng.choice(_FAULTS), rng.choice(POLLUTANTS)

    def reading(self, t: float, *, faults: bool = True) -> dict[str, Any]:
        """Readings at ``t``; ``faults=False`` gives what a healthy sensor would say."""
        values: dict[str, Any] = self._clean(t, _rng(self._key, _ms(t)))
        fault = self.fault(t) if faults else None
        if fault is not None:
            kind, name = fault
            if kind == "zero":
                values[name] = 0.0
            elif kind == "spike":
                values[name] = round(values[name] * 10.0, 3)
            else:
                del values[name]
        values["lat"] = self.lat
        values["lon"] = self.lon
        return values


# ---- pump -----------------------------------------------------------------------------------
_SLOT = 8 * _HOUR  # at most one blockage episode per device per slot
BLOCKAGE_CHANCE = 0.4
"""Chance that a pump has a blockage episode in a given 8-hour slot."""


class PumpRig:
    """A pump with slow blockages: over minutes to hours pressure rises, flow falls and vibration
    grows, until the blockage clears (a flush) within minutes.

    Units: pressure in bar, flow in m³/h, vibration in mm/s RMS. ``blockage(t)`` is the ground
    truth (0 = clear, up to 1 = badly blocked), for labelling.
    """

    def __init__(self, index: int, seed: int) -> None:
        self.index, self.seed = index, seed
        self._key = _key(3, seed, index)
        rng = _rng(4, seed, index)
        self.pressure0 = rng.uniform(3.5, 6.0)
        self.flow0 = rng.uniform(40.0, 90.0)
        self.vibration0 = rng.uniform(1.2, 2.8)
        self._phase = rng.uniform(0.0, _SLOT)

    def episode(self, t: float) -> tuple[float, float, float, float] | None:
        """``(start, build_s, clear_s, peak)`` of the blockage episode in the slot holding ``t``."""
        slot = math.floor((t + self._phase) / _SLOT)
        rng = _rng(self._key, slot)
        if rng.random() >= BLOCKAGE_CHANCE:
            return None
        build = rng.uniform(20 * 60.0, 4 * _HOUR)
        clear = rng.uniform(3 * 60.0, 20 * 60.0)
        peak = rng.uniform(0.35, 1.0)
        start = slot * _SLOT - self._phase + rng.uniform(0.0, _SLOT - build - clear)
        return start, build, clear, peak

    def blockage(self, t: float) -> float:
        """How blocked the pump is at ``t``: 0 (clear) .. 1."""
        ep = self.episode(t)
        if ep is None:
            return 0.0
        start, build, clear, peak = ep
        x = t - start
        if x <= 0 or x >= build + clear:
            return 0.0
        if x < build:
            return peak * (x / build) ** 1.5
        return peak * (1.0 - (x - build) / clear)

    def reading(self, t: float) -> dict[str, Any]:
        b = self.blockage(t)
        hour = (t / _HOUR) % 24.0
        demand = 1.0 + 0.06 * math.sin(2 * math.pi * (hour - 9.0) / 24.0)
        rng = _rng(self._key, _ms(t), 1)
        pressure = self.pressure0 * (1.0 - 0.3 * (demand - 1.0)) * (1.0 + 0.45 * b) * (1.0 + rng.gauss(0, 0.015))
        flow = self.flow0 * demand * (1.0 - 0.65 * b) * (1.0 + rng.gauss(0, 0.02))
        vibration = self.vibration0 * (1.0 + 1.8 * b**1.2) * math.exp(rng.gauss(0, 0.08))
        return {
            "pressure": round(max(pressure, 0.0), 3),
            "flow": round(max(flow, 0.0), 2),
            "vibration": round(max(vibration, 0.0), 3),
        }


register(Scenario(
    name="pollution",
    device_type="pollution",
    description="City air-quality stations: ozone, PM2.5, PM10, CO, SO2, NO2 with daily cycles, "
                "weather, noise and occasional sensor faults.",
    fields={**{p: "float" for p in POLLUTANTS}, "lat": "float", "lon": "float"},
    make_device=PollutionStation,
    units={"ozone": "µg/m³", "pm25": "µg/m³", "pm10": "µg/m³", "co": "mg/m³", "so2": "µg/m³",
           "no2": "µg/m³", "lat": "°", "lon": "°"},
))
register(Scenario(
    name="pump",
    device_type="pump",
    description="Pump rigs: pressure, flow and vibration, with slow blockages that build and clear.",
    fields={"pressure": "float", "flow": "float", "vibration": "float"},
    make_device=PumpRig,
    units={"pressure": "bar", "flow": "m³/h", "vibration": "mm/s"},
))
