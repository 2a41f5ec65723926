"""Each training task on real public data that an installed package ships (no network), against its
baseline on the same holdout. Prints one JSON line.

  classify  scikit-learn's wine data (178 wines, 13 measurements, 3 classes)   baseline: majority class
  regress   scikit-learn's diabetes data (442 patients, 10 measurements)       baseline: mean
  anomaly   public labelled series of benchmarks/anomaly_data.py (defaults      baseline: rolling z-score
            chosen on aeon's GutenTAG ECG, UCR InternalBleeding16, sktime's Yahoo-style series and
            StreamAD uniDS; held out: river Shuttle, sktime's MIT-BIH ECG);
            event P/R/F1, the UCR hit rule; then fit time on 100 pumps x 7 days of 1-minute readings
  forecast  river's water-flow series (hourly; chose the defaults), held out:  baseline: seasonal naive
            river AirlinePassengers, statsmodels co2 and elnino (monthly); also vs the best statsforecast model

  forecast_scale  1,000 synthetic hourly series x 21 days: fit time (seasonal naive + LightGBM)

    python benchmarks/ml.py [--skip forecast] [--scale-series 1000]

The anomaly series of aeon are read from its wheel's bundled CSV files: `pip install aeon --no-deps`
first (nothing of aeon is imported).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pandas as pd


def _pick(result) -> dict:  # noqa: ANN001
    metric = result.primary_metric
    return {
        "primary": metric,
        "model": round(float(result.metrics[metric]), 4),
        "baseline": round(float(result.baseline_metrics[metric]), 4),
        "beats_baseline": result.beats_baseline(),
        "metrics": {k: round(float(v), 4) for k, v in result.metrics.items() if isinstance(v, (int, float))},
        "baseline_metrics": {k: round(float(v), 4) for k, v in result.baseline_metrics.items()
                             if isinstance(v, (int, float))},
    }


def classify() -> dict:
    from sklearn.datasets import load_wine

    from iot2ml.ml.classify import ClassifyTask

    data = load_wine(as_frame=True)
    frame = data.frame.rename(columns={"target": "cultivar"})
    frame["cultivar"] = frame["cultivar"].map({0: "c0", 1: "c1", 2: "c2"})
    frame.columns = [c.replace("/", "_").replace(" ", "_") for c in frame.columns]
    frame["device_id"] = "lab"
    frame["ts"] = pd.date_range("2026-01-01", periods=len(frame), freq="h", tz="UTC")
    return {"data": "sklearn wine", "rows": len(frame),
            **_pick(ClassifyTask(label="cultivar", aggregate=False).fit(frame))}


def regress() -> dict:
    from sklearn.datasets import load_diabetes

    from iot2ml.ml.classify import RegressTask

    data = load_diabetes(as_frame=True, scaled=False)
    frame = data.frame.rename(columns={"target": "progression"})
    frame["device_id"] = "clinic"
    frame["ts"] = pd.date_range("2026-01-01", periods=len(frame), freq="h", tz="UTC")
    return {"data": "sklearn diabetes", "rows": len(frame),
            **_pick(RegressTask(label="progression", aggregate=False).fit(frame))}


def _anomaly_series(series) -> dict:
    """Fit the task on ``series.train`` (with its labels); with a test part, score it after the
    training readings (the model's context) and judge flags and top score there, else the task's
    own holdout figures. The rolling z-score baseline on the same readings."""
    from iot2ml.ml.anomaly import (
        AnomalyTask,
        evaluate_flags,
        ucr_hit,
        zscore_flags,
        zscore_scores,
    )

    labelled = bool(series.train["anomaly"].any())
    task = AnomalyTask(features=series.features, label="anomaly" if labelled else None)
    started = time.perf_counter()
    result = task.fit(series.train)
    out = {"data": series.name, "kind": series.kind, "rows": len(series.train) + (0 if series.test is None else len(series.test)),
           "chosen": result.params["method"], "window": result.params["window"],
           "threshold": round(float(result.params["threshold"]), 4), "selection": result.params["selection"],
           "candidates": {k.removeprefix("selection_"): v for k, v in result.params.items()
                          if k.startswith("selection_")},
           "fit_seconds": round(time.perf_counter() - started, 1)}
    if series.test is None:
        return {**out, "judged_on": "the task's holdout (last 30 % in time)", **_pick(result)}
    whole = pd.concat([series.train, series.test], ignore_index=True)
    test = np.arange(len(series.train), len(whole))
    scores = result.model.score(series.test)
    flags = scores > result.model.threshold
    base_scores = zscore_scores(whole, entity="device_id", features=series.features)[test]
    base_flags = zscore_flags(whole, entity="device_id", features=series.features)[test]
    truth = series.test["anomaly"].to_numpy() > 0
    keys = series.test["device_id"].to_numpy()
    mine, base = evaluate_flags(flags, truth, keys), evaluate_flags(base_flags, truth, keys)
    out.update({"judged_on": "the test part, scored after the training part", "primary": "event_f1",
                "model": round(mine["event_f1"], 4), "baseline": round(base["event_f1"], 4),
                "beats_baseline": mine["event_f1"] > base["event_f1"],
                "metrics": {k: round(float(v), 4) for k, v in mine.items()},
                "baseline_metrics": {k: round(float(v), 4) for k, v in base.items()}})
    if int(np.diff(np.r_[0, truth.astype(int), 0]).clip(0).sum()) == 1:
        out["ucr_hit"], out["baseline_ucr_hit"] = ucr_hit(scores, truth), ucr_hit(base_scores, truth)
    return out


def anomaly_scale(devices: int = 100, days: int = 7) -> dict:
    """Fit time of the anomaly task on ``devices`` pumps x ``days`` of 1-minute readings, unlabelled."""
    from anomaly_data import pump_fleet

    from iot2ml.ml.anomaly import AnomalyTask

    frame = pump_fleet(devices, days)
    started = time.perf_counter()
    result = AnomalyTask(features=["pressure", "flow", "vibration"]).fit(frame)
    out = {"devices": devices, "rows": len(frame), "fit_seconds": round(time.perf_counter() - started, 1),
           "chosen": result.params["method"], "window": result.params["window"], "cycles": result.params["cycles"],
           "candidates": {k.removeprefix("selection_"): v for k, v in result.params.items()
                          if k.startswith("selection_")}}
    # The selection's cost is the same whichever wins; the chosen method's refit differs: each alone.
    out["fit_seconds_method_alone"] = {}
    for method in ("window", "residual", "discord"):
        started = time.perf_counter()
        AnomalyTask(features=["pressure", "flow", "vibration"], methods=[method]).fit(frame)
        out["fit_seconds_method_alone"][method] = round(time.perf_counter() - started, 1)
    return out


def anomaly(scale_devices: int = 100) -> dict:
    """Each public series of ``anomaly_data`` (defaults chosen on ``DEFAULTS``, the others held out),
    then the fit time at scale."""
    import anomaly_data

    out: dict = {"defaults_chosen_on": {}, "held_out": {}}
    for name, load in anomaly_data.LOADERS.items():
        try:
            series = load()
        except LookupError as err:
            out["held_out" if name in anomaly_data.HELD_OUT else "defaults_chosen_on"][name] = {"skipped": str(err)}
            continue
        group = "defaults_chosen_on" if name in anomaly_data.DEFAULTS else "held_out"
        out[group][name] = _anomaly_series(series)
    if scale_devices:
        out["scale"] = anomaly_scale(scale_devices)
    return out


def forecast() -> dict:
    """Per series: the chosen candidate's MASE and MAE against seasonal naive and against the best
    single statsforecast candidate of the same run, and the held-out coverage of each interval."""
    from iot2ml.ml.forecast import STATS_CANDIDATES, ForecastTask

    out = {}
    for role, (name, (frame, options)) in zip(["chose defaults"] + ["held out"] * 9, _forecast_series().items()):
        frame = frame.assign(device_id="s").sort_values("ts")
        started = time.perf_counter()
        result = ForecastTask(target="y", quantiles=FORECAST_QUANTILES, n_jobs=1, **options).fit(frame)
        listed = [c for c in result.artifacts["candidates"] if "mae" in c]
        stats = min((c for c in listed if c["name"] in STATS_CANDIDATES), key=lambda c: c["mae"], default=None)
        out[name] = {
            "role": role, "rows": len(frame), **options, "folds": result.params["folds"],
            "calibration": result.artifacts["calibration"],
            "chosen": result.params["candidate"],
            "mase": round(result.metrics["mase"], 4), "mae": round(result.metrics["mae"], 4),
            "baseline_mase": round(result.baseline_metrics["mase"], 4),
            "best_stats": stats and stats["name"], "best_stats_mae": stats and round(stats["mae"], 4),
            "coverage": {k.removeprefix("coverage_"): round(v, 3) for k, v in result.metrics.items()
                         if k.startswith("coverage_")},
            "candidates_mae": {c["name"]: round(c["mae"], 4) for c in listed},
            "seconds": round(time.perf_counter() - started, 1),
        }
    return out


FORECAST_QUANTILES = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95)
"""Intervals measured by ``forecast``: nominal 0.9, 0.8 and 0.5."""


def _forecast_series() -> dict[str, tuple[pd.DataFrame, dict]]:
    """Public series shipped offline: WaterFlow (hourly; chose the defaults), and held out:
    AirlinePassengers (river, monthly), co2 (statsmodels, weekly Mauna Loa readings as monthly
    means) and elnino (statsmodels, monthly sea surface temperature)."""
    import statsmodels.api as sm
    from river import datasets

    water = pd.DataFrame([{"ts": x["Time"], "y": y} for x, y in datasets.WaterFlow()])
    water["ts"] = pd.to_datetime(water["ts"], utc=True)
    air = pd.DataFrame([{"ts": x["month"], "y": float(y)} for x, y in datasets.AirlinePassengers()])
    air["ts"] = pd.to_datetime(air["ts"], utc=True)
    co2 = sm.datasets.co2.load_pandas().data["co2"].dropna()
    co2 = pd.DataFrame({"ts": co2.index.tz_localize("UTC"), "y": co2.to_numpy()})
    nino = sm.datasets.elnino.load_pandas().data.melt(id_vars="YEAR", var_name="month", value_name="y")
    nino["ts"] = pd.to_datetime(nino["YEAR"].astype(int).astype(str) + "-" + nino["month"], format="%Y-%b", utc=True)
    monthly = {"freq": "MS", "horizon": 12}
    return {  # the task's defaults otherwise (3 folds choose the model, more calibrate few series)
        "river WaterFlow": (water, {"freq": "1h", "horizon": 24}),
        "river AirlinePassengers": (air, monthly),
        "statsmodels co2 (monthly)": (co2, monthly),
        "statsmodels elnino": (nino[["ts", "y"]], monthly),
    }


def forecast_scale(n_series: int) -> dict:
    """Fit time for many synthetic hourly series (21 days each), statsforecast in parallel processes."""
    from iot2ml.ml.forecast import ForecastTask

    rng = np.random.default_rng(0)
    hours = pd.date_range("2026-10-01", periods=24 * 21, freq="h", tz="UTC")
    t = np.arange(len(hours))
    frames = [pd.DataFrame({"device_id": f"s{i:05d}", "ts": hours,
                            "y": 50 + 10 * np.sin(2 * np.pi * (t + i) / 24) + 0.02 * t + rng.normal(0, 2, len(t))})
              for i in range(n_series)]
    frame = pd.concat(frames, ignore_index=True)
    started = time.perf_counter()
    result = ForecastTask(target="y", candidates="seasonal_naive,lightgbm", n_jobs=-1).fit(frame)
    return {"series": n_series, "rows": len(frame), "fit_seconds": round(time.perf_counter() - started, 1),
            **_pick(result)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip", nargs="*", default=[])
    ap.add_argument("--scale-series", type=int, default=1000, help="series for the forecast scale run (0 = skip)")
    args = ap.parse_args()
    out: dict = {"bench": "ml"}
    if args.scale_series:
        out["forecast_scale"] = forecast_scale(args.scale_series)
    for name, fn in (("classify", classify), ("regress", regress), ("anomaly", anomaly), ("forecast", forecast)):
        if name in args.skip:
            continue
        started = time.perf_counter()
        out[name] = fn()
        out[name]["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(out, default=lambda v: v.item() if isinstance(v, np.generic) else str(v)))


if __name__ == "__main__":
    main()
