"""Scenario registry and the device models behind each scenario.

A scenario makes device models; a model answers ``reading(t)`` with one reading (without ``ts`` or
``msg_id``) at epoch time ``t``. Models are pure functions of ``(seed, index, t)``: the same device
gives the same reading for the same time, so history can be back-filled and tests are exact.

Built in: ``pollution`` (city air-quality stations), ``pump`` (pump rigs that slowly block), ``wine``
(cask samples with a hidden quality class, plus ``wine_ratings``) and ``viscosity`` (hospital
blood-viscosity meters). Wine stations and viscosity meters count their samples: their readings are
pure functions of ``(seed, sample number)`` rather than of ``t``. Other scenarios call ``register``.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import random
from dataclasses import dataclass, field
from datetime import datetime, timezone
from statistics import NormalDist
from types import MappingProxyType
from typing import Any, Callable, Mapping, Protocol

from ..core.errors import AlreadyExists, InvalidInput, NotFound
from ..core.ids import check_type_name

__all__ = [
    "QUALITY_CLASSES", "SCENARIOS", "WINE_MEASUREMENTS", "DeviceModel", "PollutionStation", "PumpRig", "Scenario",
    "ViscosityMeter", "WineStation", "blood_viscosity", "get_scenario", "register", "viscosity_references",
    "wine_ratings", "write_ratings_csv",
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


def _clip(x: float, low: float, high: float) -> float:
    return min(high, max(low, x))


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


# ---- wine -------------------------------------------------------------------------------------
def _text_key(text: str) -> int:
    """A stable 64-bit key of a string (Python's ``hash`` changes between runs)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


QUALITY_CLASSES = ("good", "better", "best")
QUALITY_SHARES = (0.50, 0.35, 0.15)
"""Designed share of each quality class over many batches (good, better, best)."""
WINE_MEASUREMENTS = (
    "fixed_acidity", "volatile_acidity", "citric_acid", "residual_sugar", "chlorides",
    "free_sulfur_dioxide", "total_sulfur_dioxide", "density", "ph", "sulphates", "alcohol",
)
# The hidden quality score: weights on the latent (standardised) alcohol, volatile acidity,
# sulphates and citric acid, plus noise the measurements cannot explain. Thresholds cut the score's
# distribution (station offsets included) at the designed class shares.
_Q_ALCOHOL, _Q_VOLATILE, _Q_SULPHATES, _Q_CITRIC, _Q_NOISE = 1.0, -0.65, 0.55, 0.15, 0.4
_STATION_SD = 0.2  # sd of a warehouse's alcohol offset, in latent units
_Q_SD = math.sqrt(sum(w * w for w in (_Q_ALCOHOL, _Q_VOLATILE, _Q_SULPHATES, _Q_CITRIC, _Q_NOISE, _STATION_SD)))
_Q_CUTS = tuple(NormalDist(0.0, _Q_SD).inv_cdf(sum(QUALITY_SHARES[: k + 1])) for k in range(len(QUALITY_SHARES) - 1))


class WineStation:
    """The sampling station of one bottling warehouse: each reading is one cask sample.

    A worker scans the cask's ``batch_id`` and measures the 11 physico-chemical values of the UCI
    wine-quality data set (red wine ranges): acidity in g/dm³ (tartaric, acetic, citric), sugar and
    sulphates in g/dm³, chlorides in g/dm³ NaCl, sulfur dioxide in mg/dm³, density in g/cm³,
    alcohol in % vol. Each batch has a hidden quality class (good/better/best, about 50/35/15 %)
    driven mostly by alcohol (up), volatile acidity (down) and sulphates (up), plus noise.

    Batches are numbered 0, 1, 2, ... per station; ``batch_id`` is ``{device_id}-b{n:06d}`` and a
    batch's values and class are a pure function of ``(seed, batch_id)``. ``reading(t)`` samples
    the next batch (the station counts; ``t`` does not matter), ``sample(n)`` any batch.
    ``device_id`` defaults to ``wine-{index:04d}``, the id ``run_simulation`` gives device ``index``.
    """

    def __init__(self, index: int, seed: int, *, device_id: str | None = None) -> None:
        self.index, self.seed = index, seed
        self.device_id = device_id or f"wine-{index:04d}"
        rng = _rng(5, seed, _text_key(self.device_id))
        self._alcohol_offset = rng.gauss(0.0, _STATION_SD)  # riper grapes in some regions
        self._acid_offset = rng.gauss(0.0, 0.3)
        self._next = 0

    def batch_id(self, n: int) -> str:
        return f"{self.device_id}-b{n:06d}"

    def _latent(self, n: int) -> tuple[dict[str, float], float]:
        rng = _rng(6, self.seed, _text_key(self.batch_id(n)))
        z = {k: rng.gauss(0.0, 1.0) for k in ("alc", "va", "sul", "cit", "fa", "rs", "cl", "fso2", "tso2", "ph", "d")}
        z["alc"] += self._alcohol_offset
        z["fa"] += self._acid_offset
        score = (_Q_ALCOHOL * z["alc"] + _Q_VOLATILE * z["va"] + _Q_SULPHATES * z["sul"] + _Q_CITRIC * z["cit"]
                 + rng.gauss(0.0, _Q_NOISE))
        return z, score

    def sample(self, n: int) -> dict[str, Any]:
        """The reading for batch ``n``: ``batch_id`` and the 11 measurements."""
        z, _ = self._latent(n)
        alcohol = _clip(8.5 + 1.9 * math.exp(0.38 * z["alc"]), 8.4, 14.9)  # the UCI data set's ranges
        fixed = _clip(8.3 * math.exp(0.2 * z["fa"]), 4.6, 15.9)
        sugar = 1.2 + 1.1 * math.exp(0.55 * z["rs"])
        free = _clip(14.0 * math.exp(0.6 * z["fso2"]), 1.0, 72.0)
        density = (0.99675 - 0.00065 * (alcohol - 10.4) + 0.00045 * (sugar - 2.5)
                   + 0.00035 * (fixed - 8.3) + 0.0004 * z["d"])
        return {
            "batch_id": self.batch_id(n),
            "fixed_acidity": round(fixed, 1),
            "volatile_acidity": round(_clip(0.53 * math.exp(0.33 * z["va"]), 0.12, 1.58), 3),
            "citric_acid": round(_clip(0.27 + 0.12 * z["fa"] + 0.14 * z["cit"], 0.0, 1.0), 2),
            "residual_sugar": round(sugar, 1),
            "chlorides": round(_clip(0.079 * math.exp(0.3 * z["cl"]), 0.012, 0.611), 3),
            "free_sulfur_dioxide": round(free, 1),
            "total_sulfur_dioxide": round(_clip(free + 6.0 + 20.0 * math.exp(0.6 * z["tso2"]), 6.0, 289.0), 1),
            "density": round(density, 5),
            "ph": round(3.31 - 0.11 * z["fa"] + 0.08 * z["ph"], 2),
            "sulphates": round(_clip(0.62 * math.exp(0.22 * z["sul"]), 0.33, 2.0), 2),
            "alcohol": round(alcohol, 1),
        }

    def true_quality(self, n: int) -> str:
        """The hidden quality class of batch ``n``: good, better or best."""
        _, score = self._latent(n)
        return QUALITY_CLASSES[sum(score > cut for cut in _Q_CUTS)]

    def reading(self, t: float) -> dict[str, Any]:
        n, self._next = self._next, self._next + 1
        return self.sample(n)


_UTC0 = 1_767_225_600  # 2026-01-01 00:00 UTC
_TASTERS = 8


def wine_ratings(
    device_ids: list[str],
    batches_per_device: int,
    seed: int,
    *,
    noise: float = 0.1,
    start: float = _UTC0,
) -> list[dict[str, Any]]:
    """One rating per batch ``0 .. batches_per_device - 1`` of each station in ``device_ids``.

    Rows are ``{"batch_id", "quality", "rated_at", "source", "who"}``: ``quality`` is the batch's
    hidden class except for about a ``noise`` share of rows, rated one class off; ``source`` is
    ``taster`` (about 30 %, ``who`` = ``taster-NN``) or ``user`` (``who`` = ``user-NNNNN``);
    ``rated_at`` is ISO 8601 UTC, within 30 days after ``start`` (epoch seconds). Deterministic in
    ``seed`` and each ``batch_id``, so the ratings match what ``WineStation`` sent with that seed.

    >>> wine_ratings(["wine-0000"], 1, seed=0)[0]["batch_id"]
    'wine-0000-b000000'
    """
    if not 0.0 <= noise <= 1.0:
        raise InvalidInput(f"noise {noise!r} is not a share: use a number from 0 to 1")
    rows = []
    for device_id in device_ids:
        station = WineStation(0, seed, device_id=device_id)
        for n in range(batches_per_device):
            batch_id = station.batch_id(n)
            rng = _rng(7, seed, _text_key(batch_id))
            k = QUALITY_CLASSES.index(station.true_quality(n))
            if rng.random() < noise:
                k = 1 if k != 1 else rng.choice((0, 2))  # one class off
            taster = rng.random() < 0.3
            who = f"taster-{rng.randrange(_TASTERS):02d}" if taster else f"user-{rng.randrange(100_000):05d}"
            rated = datetime.fromtimestamp(start + rng.uniform(0.0, 30 * _DAY), timezone.utc)
            rows.append({
                "batch_id": batch_id,
                "quality": QUALITY_CLASSES[k],
                "rated_at": rated.isoformat(timespec="seconds").replace("+00:00", "Z"),
                "source": "taster" if taster else "user",
                "who": who,
            })
    return rows


def write_ratings_csv(path: str | os.PathLike[str], rows: list[dict[str, Any]]) -> int:
    """Write ``wine_ratings`` rows to a CSV file with a header; return the number of rows."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["batch_id", "quality", "rated_at", "source", "who"])
        writer.writeheader()
        writer.writerows(rows)
    return len(rows)


# ---- viscosity ----------------------------------------------------------------------------------
SHEAR_RATES = (1.0, 5.0, 10.0, 50.0, 100.0, 300.0)
"""Shear rates (1/s) a meter measures at; each sample is measured at one of them."""
_PLASMA_37 = 1.25  # plasma viscosity at 37 °C, mPa·s
_ARRHENIUS = 1900.0  # K: plasma (like water) loses about 2 % viscosity per °C


def blood_viscosity(shear_rate: float, temperature: float, hematocrit: float) -> float:
    """Apparent whole-blood viscosity in mPa·s (hematocrit in %, temperature in °C, rate in 1/s).

    Plasma viscosity falls with temperature (Arrhenius); red cells raise it exponentially with
    hematocrit; at low shear rates aggregated cells raise it further (shear thinning).

    >>> round(blood_viscosity(100.0, 37.0, 45.0), 1), round(blood_viscosity(1.0, 37.0, 45.0), 1)
    (4.3, 11.8)
    """
    h = hematocrit / 100.0
    plasma = _PLASMA_37 * math.exp(_ARRHENIUS * (1.0 / (temperature + 273.15) - 1.0 / 310.15))
    return plasma * math.exp(2.4 * h) * (1.0 + 2.2 * (h / 0.45) ** 2 * shear_rate ** -0.55)


class ViscosityMeter:
    """A hospital blood-viscosity meter (rotational): each reading is one blood sample.

    Sends raw measurements: ``sample_id`` (``{device_id}-s{n:06d}``), ``shear_rate`` (1/s),
    ``shear_stress`` (mPa), ``temperature`` (°C, the meter's set point 25, 30 or 37 ± drift) and
    ``hematocrit`` (%, from its optical sensor). The sample's true viscosity
    (``true_viscosity(n)``, mPa·s, what a reference lab would report) is ``blood_viscosity`` of the
    sample's conditions times the patient's own factor (plasma proteins, aggregation: ±8 %);
    ``shear_stress`` is that viscosity times the shear rate, seen through the meter's calibration
    gain (±3 %) and 2 % noise. ``reading(t)`` measures the next sample (the meter counts),
    ``sample(n)`` any sample; values are a pure function of ``(seed, sample_id)``.
    """

    def __init__(self, index: int, seed: int, *, device_id: str | None = None) -> None:
        self.index, self.seed = index, seed
        self.device_id = device_id or f"viscosity-{index:04d}"
        rng = _rng(8, seed, _text_key(self.device_id))
        self.set_point = rng.choice((25.0, 30.0, 37.0))
        self.gain = rng.uniform(0.97, 1.03)
        self._next = 0

    def sample_id(self, n: int) -> str:
        return f"{self.device_id}-s{n:06d}"

    def _draw(self, n: int) -> tuple[float, float, float, float, float]:
        rng = _rng(9, self.seed, _text_key(self.sample_id(n)))
        rate = rng.choice(SHEAR_RATES)
        temperature = self.set_point + rng.gauss(0.0, 0.6)
        hematocrit = _clip(rng.gauss(41.0, 6.0), 18.0, 65.0)
        patient = math.exp(rng.gauss(0.0, 0.08))
        noise = 1.0 + rng.gauss(0.0, 0.02)
        return rate, temperature, hematocrit, patient, noise

    def true_viscosity(self, n: int) -> float:
        """The true (reference-lab) viscosity of sample ``n`` in mPa·s at its measured conditions."""
        rate, temperature, hematocrit, patient, _ = self._draw(n)
        return blood_viscosity(rate, round(temperature, 1), round(hematocrit, 1)) * patient

    def sample(self, n: int) -> dict[str, Any]:
        rate, temperature, hematocrit, _, noise = self._draw(n)
        stress = self.true_viscosity(n) * rate * self.gain * noise
        return {
            "sample_id": self.sample_id(n),
            "shear_rate": rate,
            "shear_stress": round(stress, 3),
            "temperature": round(temperature, 1),
            "hematocrit": round(hematocrit, 1),
        }

    def reading(self, t: float) -> dict[str, Any]:
        n, self._next = self._next, self._next + 1
        return self.sample(n)


def viscosity_references(
    device_ids: list[str], samples_per_device: int, seed: int, *, every: int = 1, start: float = _UTC0,
) -> list[dict[str, Any]]:
    """Reference-lab viscosities for every ``every``-th sample of each meter in ``device_ids``.

    Rows ``{"sample_id", "viscosity", "measured_at", "source": "lab", "who": "lab-NN"}`` with
    ``viscosity`` in mPa·s as a string (labels are strings), ready for ``iot2ml labels import``.
    """
    if every < 1:
        raise InvalidInput(f"every {every!r} is below 1: use a whole number >= 1")
    rows = []
    for device_id in device_ids:
        meter = ViscosityMeter(0, seed, device_id=device_id)
        for n in range(0, samples_per_device, every):
            rng = _rng(10, seed, _text_key(meter.sample_id(n)))
            measured = datetime.fromtimestamp(start + rng.uniform(0.0, 30 * _DAY), timezone.utc)
            rows.append({
                "sample_id": meter.sample_id(n),
                "viscosity": f"{meter.true_viscosity(n):.3f}",
                "measured_at": measured.isoformat(timespec="seconds").replace("+00:00", "Z"),
                "source": "lab",
                "who": f"lab-{rng.randrange(4):02d}",
            })
    return rows


register(Scenario(
    name="wine",
    device_type="wine",
    description="Wine sampling stations, one per warehouse: a cask's batch id and 11 physico-chemical "
                "measurements; each batch has a hidden quality class (good/better/best).",
    fields={"batch_id": "string", **{m: "float" for m in WINE_MEASUREMENTS}},
    make_device=WineStation,
    units={"batch_id": "", "fixed_acidity": "g/dm³", "volatile_acidity": "g/dm³", "citric_acid": "g/dm³",
           "residual_sugar": "g/dm³", "chlorides": "g/dm³", "free_sulfur_dioxide": "mg/dm³",
           "total_sulfur_dioxide": "mg/dm³", "density": "g/cm³", "ph": "", "sulphates": "g/dm³",
           "alcohol": "% vol"},
))
register(Scenario(
    name="viscosity",
    device_type="viscosity",
    description="Hospital blood-viscosity meters: shear rate, shear stress, temperature and hematocrit "
                "per blood sample; viscosity rises with hematocrit and falls with temperature.",
    fields={"sample_id": "string", "shear_rate": "float", "shear_stress": "float", "temperature": "float",
            "hematocrit": "float"},
    make_device=ViscosityMeter,
    units={"sample_id": "", "shear_rate": "1/s", "shear_stress": "mPa", "temperature": "°C", "hematocrit": "%"},
))
