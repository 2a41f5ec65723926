"""Forecast task on synthetic devices with a known signal: a daily cycle riding on a trend, plus noise.

Seasonal naive repeats yesterday, so it lags the trend by a day; a real model must beat it.
Readings come at irregular times (about four an hour) with a few outages of hours.
"""

from __future__ import annotations

import cloudpickle
import numpy as np
import pandas as pd
import pytest

from iot2ml.core.errors import ConfigError, InvalidInput
from iot2ml.ml.forecast import ForecastTask

START = pd.Timestamp("2025-01-06", tz="UTC")


def device(name: str, days: float, rng: np.random.Generator, *, outages: int = 3,
           start: pd.Timestamp = START) -> pd.DataFrame:
    hours = np.sort(rng.uniform(0, days * 24, int(days * 24 * 4)))
    level, slope, amplitude = rng.uniform(15, 25), rng.uniform(0.04, 0.08), rng.uniform(3, 6)
    temp = (level + slope * hours + amplitude * np.sin(2 * np.pi * hours / 24 + rng.uniform(0, 2 * np.pi))
            + rng.normal(0, 0.6, len(hours)))
    keep = np.ones(len(hours), bool)
    for _ in range(outages):
        at = rng.uniform(24, days * 24 - 30)
        keep &= ~((hours > at) & (hours < at + rng.uniform(2, 5)))
    return pd.DataFrame({"device_id": name, "ts": start + pd.to_timedelta(hours[keep], unit="h"), "temp": temp[keep]})


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    rng = np.random.default_rng(7)
    devices = [device(f"dev-{i}", 21, rng) for i in range(5)] + [device("short", 3, rng, outages=0)]
    return pd.concat(devices, ignore_index=True)


@pytest.fixture(scope="module")
def result(frame: pd.DataFrame):
    return ForecastTask(target="temp", n_jobs=2).fit(frame)


def test_a_real_model_beats_seasonal_naive(result) -> None:
    assert result.task == "forecast" and result.primary_metric == "mase" and not result.greater_is_better
    assert result.beats_baseline()
    assert result.params["candidate"] != "seasonal_naive"
    assert result.metrics["mase"] < 0.5 * result.baseline_metrics["mase"]
    listed = {c["name"]: c for c in result.artifacts["candidates"]}
    assert set(listed) == {"seasonal_naive", "auto_ets", "auto_arima", "auto_theta", "mstl", "lightgbm"}
    for figures in listed.values():
        assert {"mase", "mae", "rmse", "coverage", "coverage_0.8"} <= set(figures), figures
    assert listed["seasonal_naive"]["mase"] == result.baseline_metrics["mase"]
    assert result.metrics["mase"] == min(c["mase"] for c in listed.values())
    assert result.input_example is not None and list(result.input_example.columns) == ["device_id", "ts", "temp"]


def test_interval_coverage_is_near_nominal(result) -> None:
    assert result.artifacts["coverage_nominal"] == pytest.approx(0.8)
    assert 0.7 <= result.metrics["coverage"] <= 0.9
    # five series: the winner is calibrated on more folds than the 3 that chose it, from every step of them
    calibration = result.artifacts["calibration"]
    assert calibration["folds"] > 3 and calibration["origin_stride"] == 1
    assert calibration["origins"] == (calibration["folds"] - 1) * 24 + 1


def seasonal_devices(n: int, days: int, rng: np.random.Generator, noise: float) -> pd.DataFrame:
    """Hourly readings: a daily cycle plus Gaussian noise of a known spread, nothing else."""
    hours = pd.date_range(START, periods=days * 24, freq="h")
    t = np.arange(len(hours))
    cycle = [20 + 3 * np.sin(2 * np.pi * (t + 3 * i) / 24) for i in range(n)]
    return pd.concat([pd.DataFrame({"device_id": f"d{i}", "ts": hours, "temp": cycle[i] + rng.normal(0, noise, len(t))})
                      for i in range(n)], ignore_index=True)


def test_intervals_cover_80_percent_of_future_readings() -> None:
    """Train on 21 days, then forecast day after day of data the model never saw: the 0.8 interval
    holds about 80 % of the readings, and its width is that of the known noise (seasonal naive's
    error is the difference of two readings: N(0, 2 sigma^2), half-width 1.28 * sqrt(2) * sigma)."""
    rng = np.random.default_rng(11)
    noise = 2.0
    frame = seasonal_devices(10, 31, rng, noise)
    train = frame[frame["ts"] < START + pd.Timedelta(days=21)]
    result = ForecastTask(target="temp", candidates=("seasonal_naive",)).fit(train)
    assert 0.7 <= result.metrics["coverage"] <= 0.9
    inside, widths = [], []
    for day in range(21, 30):  # each forecast from the readings up to that day, scored on the next 24 h
        cut = START + pd.Timedelta(days=day)
        out = result.model.predict(frame[frame["ts"] < cut])
        truth = frame.merge(out, on=["device_id", "ts"])
        assert len(truth) == 10 * 24
        inside.append(((truth["temp"] >= truth["q0.1"]) & (truth["temp"] <= truth["q0.9"])).to_numpy())
        widths.append((truth["q0.9"] - truth["q0.1"]).to_numpy())
    coverage = np.concatenate(inside).mean()
    assert 0.7 <= coverage <= 0.9, coverage
    assert np.mean(widths) / 2 == pytest.approx(1.2816 * np.sqrt(2) * noise, rel=0.2)


def test_mstl_is_skipped_when_no_season_fits_twice() -> None:
    frame = seasonal_devices(2, 5, np.random.default_rng(2), 0.5)  # 120 h: the first fold trains on 48 h
    result = ForecastTask(target="temp", candidates=("seasonal_naive", "mstl")).fit(frame)
    listed = {c["name"]: c for c in result.artifacts["candidates"]}
    assert "no season of [24, 168] twice" in listed["mstl"]["skipped"]
    assert result.params["candidate"] == "seasonal_naive"


def test_predict_gives_horizon_future_steps_per_series(result, frame: pd.DataFrame) -> None:
    recent = frame[frame["ts"] > frame["ts"].max() - pd.Timedelta(hours=48)]  # just the newest readings
    out = result.model.predict(recent[recent["device_id"] != "short"])
    assert list(out.columns) == ["device_id", "ts", "mean", "q0.1", "q0.5", "q0.9"]
    assert out.groupby("device_id").size().to_dict() == {f"dev-{i}": 24 for i in range(5)}
    for name, rows in out.groupby("device_id"):
        last = frame.loc[frame["device_id"] == name, "ts"].max()
        assert rows["ts"].iloc[0] == last.floor("1h") + pd.Timedelta(hours=1)
        assert (rows["ts"].diff().dropna() == pd.Timedelta(hours=1)).all()
    assert np.isfinite(out[["mean", "q0.1", "q0.5", "q0.9"]].to_numpy()).all()
    assert ((out["q0.1"] <= out["q0.5"]) & (out["q0.5"] <= out["q0.9"])).all()
    assert (out["q0.1"] < out["q0.9"]).all()
    # the forecast continues the series: next hour's mean is near the last hour's level
    step = out.groupby("device_id")["mean"].first()
    level = frame[frame["ts"] > frame["ts"].max() - pd.Timedelta(hours=1)].groupby("device_id")["temp"].mean()
    assert (step - level.reindex(step.index)).abs().max() < 5


def test_too_short_series_is_skipped_with_a_reason(result) -> None:
    skipped = {s["series"]: s["reason"] for s in result.artifacts["skipped_series"]}
    assert set(skipped) == {"short"}
    assert "72 points" in skipped["short"] and "120" in skipped["short"]
    assert result.params["n_series"] == 5


def test_no_usable_series_raises_invalid_input() -> None:
    rng = np.random.default_rng(1)
    frame = pd.concat([device("a", 2, rng, outages=0), device("b", 3, rng, outages=0)], ignore_index=True)
    with pytest.raises(InvalidInput, match=r"120 regular points at 1h \(context 48 \+ folds 3 x horizon 24\)"):
        ForecastTask(target="temp").fit(frame)


def test_model_round_trips_through_cloudpickle(result, frame: pd.DataFrame) -> None:
    again = cloudpickle.loads(cloudpickle.dumps(result.model))
    pd.testing.assert_frame_equal(again.predict(frame), result.model.predict(frame))
    assert again.predict_series({"dev-0": frame.loc[frame["device_id"] == "dev-0"].set_index("ts")["temp"]},
                                horizon=6).shape == (6, 6)


def test_unseen_short_device_is_left_out_of_predict(result, frame: pd.DataFrame) -> None:
    new = device("new", 1, np.random.default_rng(3), outages=0)  # 24 h < context 48
    out = result.model.predict(pd.concat([frame[frame["device_id"] == "dev-1"], new], ignore_index=True))
    assert set(out["device_id"]) == {"dev-1"}
    assert [s["series"] for s in out.attrs["skipped_series"]] == ["new"]
    with pytest.raises(InvalidInput, match="context=48"):
        result.model.predict(new)


def test_long_outage_restarts_the_series() -> None:
    rng = np.random.default_rng(5)
    early = device("d", 4, rng, outages=0)
    late = device("d", 10, rng, outages=0, start=START + pd.Timedelta(days=7))  # three days without readings
    result = ForecastTask(target="temp", candidates=("seasonal_naive",), progress=True).fit(
        pd.concat([early, late], ignore_index=True))
    assert result.artifacts["gaps"]["restarted_series"] == 1
    assert result.params["n_series"] == 1
    future = result.model.predict(late)["ts"]
    assert future.iloc[0] == late["ts"].max().floor("1h") + pd.Timedelta(hours=1)


def test_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="context 12"):
        ForecastTask(target="temp", context=12)
    with pytest.raises(ConfigError, match="candidates"):
        ForecastTask(target="temp", candidates=("prophet",))
    assert ForecastTask(target="x").context == 48
    assert ForecastTask(target="x", freq="1D", horizon=7).season_length == 7
