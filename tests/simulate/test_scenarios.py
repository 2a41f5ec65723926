"""Scenario registry and device models: deterministic, realistic, with the cycles and faults promised."""

from __future__ import annotations

import statistics
from dataclasses import replace

import pytest

import iot2ml.simulate as simulate
from iot2ml.core.devices import parse_schema
from iot2ml.core.errors import AlreadyExists, NotFound
from iot2ml.simulate.scenarios import FAULT_RATE, POLLUTANTS, SCENARIOS, get_scenario, register

DAY = 86_400
MIDNIGHT = 1_763_078_400  # 2025-11-14 00:00 UTC, a Friday


def test_public_surface() -> None:
    assert set(simulate.__all__) == {"SCENARIOS", "Scenario", "get_scenario", "run_simulation", "SimulationStats"}
    for name in simulate.__all__:
        assert getattr(simulate, name) is not None


def test_registry_knows_builtins_and_names_them_on_a_miss() -> None:
    assert {"pollution", "pump"} <= set(SCENARIOS)
    assert get_scenario("pump").device_type == "pump"
    with pytest.raises(NotFound, match=r"'submarine' is not known: use one of .*pollution, pump"):
        get_scenario("submarine")
    with pytest.raises(AlreadyExists, match="pump"):
        register(get_scenario("pump"))
    with pytest.raises(TypeError):
        SCENARIOS["x"] = get_scenario("pump")  # type: ignore[index]


@pytest.mark.parametrize("name", ["pollution", "pump"])
def test_fields_are_a_catalog_schema_and_match_readings(name: str) -> None:
    scenario = get_scenario(name)
    assert parse_schema(scenario.fields) == scenario.fields
    assert set(scenario.units) == set(scenario.fields)
    model = scenario.make_device(0, 0)
    reading = model.reading(MIDNIGHT + 12 * 3600)
    assert set(reading) == set(scenario.fields)
    assert all(isinstance(v, float) for v in reading.values())


@pytest.mark.parametrize("name", ["pollution", "pump"])
def test_models_are_deterministic_in_seed_index_and_time(name: str) -> None:
    scenario = get_scenario(name)
    times = [MIDNIGHT + k * 97.3 for k in range(200)]
    first = [scenario.make_device(3, 42).reading(t) for t in times]
    assert first == [scenario.make_device(3, 42).reading(t) for t in reversed(times)][::-1]
    assert first != [scenario.make_device(4, 42).reading(t) for t in times]
    assert first != [scenario.make_device(3, 43).reading(t) for t in times]


def test_pollution_stations_sit_around_the_city_and_stay_put() -> None:
    stations = [get_scenario("pollution").make_device(i, 7) for i in range(50)]
    spots = {(s.reading(MIDNIGHT)["lat"], s.reading(MIDNIGHT)["lon"]) for s in stations}
    assert len(spots) == 50
    for s in stations:
        assert 51.3 < s.lat < 51.7 and -0.4 < s.lon < 0.1
        assert (s.reading(MIDNIGHT + 5 * DAY)["lat"], s.reading(MIDNIGHT + 5 * DAY)["lon"]) == (s.lat, s.lon)


def _clean(hour: float, days: int = 120, devices: int = 10) -> list[dict]:
    stations = [get_scenario("pollution").make_device(i, 1) for i in range(devices)]
    return [s.reading(MIDNIGHT + d * DAY + hour * 3600, faults=False) for s in stations for d in range(days)]


def test_pollution_values_are_in_realistic_ranges() -> None:
    bounds = {"ozone": (1, 200), "pm25": (1, 120), "pm10": (2, 200), "co": (0.05, 5), "so2": (0.2, 40),
              "no2": (2, 250)}
    for hour in range(0, 24, 3):
        for r in _clean(hour, days=60):
            for name, (low, high) in bounds.items():
                assert low <= r[name] <= high, (hour, name, r[name])
    rows = _clean(12)
    assert all(r["pm10"] > r["pm25"] for r in rows)


def test_ozone_peaks_mid_afternoon_and_traffic_gases_at_rush_hour() -> None:
    def mean(hour: float, name: str) -> float:
        return statistics.mean(r[name] for r in _clean(hour))

    assert mean(15, "ozone") > 1.6 * mean(4, "ozone")
    for gas in ("no2", "co"):
        assert mean(8, gas) > 1.8 * mean(3, gas)
        assert mean(18, gas) > 1.6 * mean(13, gas)


def test_pollution_faults_at_the_stated_rate_and_of_each_kind() -> None:
    station = get_scenario("pollution").make_device(2, 5)
    times = [MIDNIGHT + k * 10.0 for k in range(60_000)]
    kinds = {"zero": 0, "spike": 0, "missing": 0}
    for t in times:
        fault = station.fault(t)
        if fault is None:
            continue
        kind, name = fault
        kinds[kind] += 1
        faulty, clean = station.reading(t), station.reading(t, faults=False)
        if kind == "missing":
            assert name not in faulty and set(faulty) == set(clean) - {name}
        elif kind == "zero":
            assert faulty[name] == 0.0
        else:
            assert faulty[name] == pytest.approx(10 * clean[name], rel=1e-3)
        assert {k: v for k, v in faulty.items() if k != name} == {k: v for k, v in clean.items() if k != name}
    total = sum(kinds.values())
    assert 0.6 * FAULT_RATE < total / len(times) < 1.4 * FAULT_RATE
    assert all(n > total / 6 for n in kinds.values()), kinds
    assert POLLUTANTS == ("ozone", "pm25", "pm10", "co", "so2", "no2")


def test_pump_blockages_build_slowly_then_clear() -> None:
    pump = get_scenario("pump").make_device(1, 9)
    minutes = [MIDNIGHT + m * 60 for m in range(30 * 24 * 60)]  # 30 days
    levels = [pump.blockage(t) for t in minutes]
    blocked = sum(b > 0 for b in levels) / len(levels)
    assert 0.02 < blocked < 0.4
    assert max(levels) > 0.3
    # episodes: rise over at least 20 minutes, and always end clear
    starts = [i for i in range(1, len(levels)) if levels[i - 1] == 0 < levels[i]]
    assert len(starts) >= 10
    for s in starts:
        end = next(i for i in range(s, len(levels)) if levels[i] == 0)
        peak = max(range(s, end), key=levels.__getitem__)
        assert peak - s >= 19, "a blockage built up in under 20 minutes"
        assert end - peak <= 21, "a blockage took over 20 minutes to clear"


def test_pump_blockage_raises_pressure_and_vibration_and_cuts_flow() -> None:
    scenario = get_scenario("pump")
    for index in range(5):
        pump = scenario.make_device(index, 3)
        clear, bad = [], []
        for m in range(0, 12 * 24 * 60, 2):
            t = MIDNIGHT + m * 60
            b = pump.blockage(t)
            if b == 0:
                clear.append(pump.reading(t))
            elif b > 0.3:
                bad.append(pump.reading(t))
        assert len(bad) > 20, f"pump {index} had no bad blockage in 12 days"

        def mean(rows: list[dict], name: str) -> float:
            return statistics.mean(r[name] for r in rows)

        assert mean(bad, "pressure") > 1.1 * mean(clear, "pressure")
        assert mean(bad, "flow") < 0.85 * mean(clear, "flow")
        assert mean(bad, "vibration") > 1.3 * mean(clear, "vibration")
        assert 3.0 < mean(clear, "pressure") < 7.0 and 30 < mean(clear, "flow") < 100


def test_pump_readings_are_noisy_but_not_wild() -> None:
    pump = get_scenario("pump").make_device(0, 0)
    t0 = next(MIDNIGHT + m * 60 for m in range(100_000) if pump.blockage(MIDNIGHT + m * 60) == 0)
    rows = [pump.reading(t0 + k) for k in range(60)]
    flows = [r["flow"] for r in rows]
    assert len(set(flows)) > 50
    assert statistics.pstdev(flows) / statistics.mean(flows) < 0.05


def test_register_adds_a_scenario() -> None:
    base = get_scenario("pump")
    extra = replace(base, name="pump_copy_for_test")
    try:
        assert register(extra) is extra
        assert get_scenario("pump_copy_for_test") is extra
        assert register(replace(extra, description="x"), replace=True).description == "x"
    finally:
        from iot2ml.simulate import scenarios

        scenarios._registry.pop("pump_copy_for_test", None)
