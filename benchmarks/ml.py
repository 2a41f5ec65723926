"""Each training task on real public data that an installed package ships (no network), against its
baseline on the same holdout. Prints one JSON line.

  classify  scikit-learn's wine data (178 wines, 13 measurements, 3 classes)   baseline: majority class
  regress   scikit-learn's diabetes data (442 patients, 10 measurements)       baseline: mean
  anomaly   river's Statlog Shuttle (49,097 sensor readings, 7 % anomalies)    baseline: rolling z-score
  forecast  river's water-flow series (hourly)                                 baseline: seasonal naive

  forecast_scale  1,000 synthetic hourly series x 21 days: fit time (seasonal naive + LightGBM)

    python benchmarks/ml.py [--skip forecast] [--scale-series 1000]
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


def anomaly() -> dict:
    from river import datasets

    from iot2ml.ml.anomaly import AnomalyTask

    rows = [{**x, "anomaly": int(y)} for x, y in datasets.Shuttle()]
    frame = pd.DataFrame(rows)
    frame["device_id"] = "shuttle"
    frame["ts"] = pd.date_range("2026-01-01", periods=len(frame), freq="s", tz="UTC")
    features = [f"f{i}" for i in range(1, 10)]
    return {"data": "river Shuttle", "rows": len(frame),
            **_pick(AnomalyTask(features=features, label="anomaly").fit(frame))}


def forecast() -> dict:
    from river import datasets

    from iot2ml.ml.forecast import ForecastTask

    rows = [{"ts": x["Time"], "flow": y} for x, y in datasets.WaterFlow()]
    frame = pd.DataFrame(rows)
    frame["ts"] = pd.to_datetime(frame["ts"], utc=True)
    frame["device_id"] = "water-1"
    task = ForecastTask(target="flow", freq="1h", horizon=24, n_jobs=1)
    result = task.fit(frame)
    return {"data": "river WaterFlow", "rows": len(frame),
            "chosen": result.params.get("chosen") or result.params.get("candidate"), **_pick(result)}


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
