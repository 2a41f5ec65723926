"""Public labelled anomaly series that installed packages ship inside their wheels (no network).

Each loader gives a ``Series``: a ``train`` frame and, when the source splits it, a ``test`` frame
(``device_id``, ``ts``, the features, ``anomaly`` 0/1). Found and used:

  river  Shuttle (river.datasets.Shuttle)          49,097 readings, 9 sensors of the NASA shuttle,
         ~7 % anomalies, many short events       multivariate point anomalies; no split (the
                                                   task's own time-ordered holdout)
  aeon   KDD-TSAD_135 UCR_Anomaly_InternalBleeding16
         (aeon/datasets/data/KDD-TSAD_135)        UCR anomaly archive series of 7,501 readings: the
                                                   first 1,200 normal (training), then ONE labelled
                                                   anomaly (12 readings) after them: a physiological waveform
                                                   whose shape changes; the UCR hit rule applies
  aeon   GutenTAG ecg-diff-count-3                 synthetic ECG (10,000 readings each):
         (aeon/datasets/data/UnitTest)             TRAIN_A (3 labelled pattern anomalies of 100
                                                   readings) and TEST (3 others)

  sktime MIT-BIH (sktime/datasets/data/mitdb)     7,500 readings of a real ECG at 360 Hz, one labelled
                                                   stretch of abnormal beats (352 readings) near the end
  sktime yahoo (sktime/datasets/data/yahoo)       1,000 hourly readings, Yahoo S5-style: trend,
                                                   seasonality, 7 single-reading spikes and dips
  streamad uniDS (streamad/util/data/uniDS.csv)    999 hourly readings of a noisy cycle, 3 level events

(sktime 1.2.0 and streamad 0.3.1 are read as data only, like aeon: `pip install sktime==1.2.0
streamad==0.3.1 --no-deps`; the sktime files are not referenced by sktime's code.)

Also shipped but unusable: aeon's Daphnet_S06R02E0 slice (7,040 accelerometer readings) has no
labelled anomaly in it. sktime's wheel ships the same UCR classification sets, no anomaly series.

aeon is read as data only (``pip install aeon --no-deps`` is enough: its CSV files are located
without importing it). A loader whose package is missing raises ``LookupError`` naming it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import pandas as pd


@dataclass
class Series:
    name: str
    kind: str
    features: list[str]
    train: pd.DataFrame
    test: pd.DataFrame | None = None


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LookupError(f"package {package!r} is not installed: pip install {package} --no-deps")
    return Path(next(iter(spec.submodule_search_locations)))


def _frame(values: pd.DataFrame, labels: pd.Series, device: str, start: str, freq: str) -> pd.DataFrame:
    frame = values.reset_index(drop=True).copy()
    frame["anomaly"] = labels.astype(int).to_numpy()
    frame["device_id"] = device
    frame["ts"] = pd.date_range(start, periods=len(frame), freq=freq, tz="UTC")
    return frame


def shuttle() -> Series:
    from river import datasets

    rows = [{**x, "anomaly": int(y)} for x, y in datasets.Shuttle()]
    raw = pd.DataFrame(rows)
    features = [f"f{i}" for i in range(1, 10)]
    return Series("river Shuttle", "multivariate sensor readings, point anomalies (many events)", features,
                  _frame(raw[features], raw["anomaly"], "shuttle", "2026-01-01", "s"))


def _aeon_csv(relative: str) -> pd.DataFrame:
    return pd.read_csv(_package_dir("aeon") / "datasets" / "data" / relative)


def ucr_internal_bleeding16() -> Series:
    """aeon's TEST file is the whole UCR series (its TRAIN file is the first 1,200 readings of it)."""
    whole = _aeon_csv("KDD-TSAD_135/135_UCR_Anomaly_InternalBleeding16_TEST.csv")
    frame = _frame(whole[["value"]], whole["is_anomaly"], "ib16", "2026-01-01", "s")
    return Series("UCR InternalBleeding16 (aeon)", "physiological waveform, one shape anomaly", ["value"],
                  frame.iloc[:1200].reset_index(drop=True), frame.iloc[1200:].reset_index(drop=True))


def ecg_diff_count_3() -> Series:
    train = _aeon_csv("UnitTest/ecg-diff-count-3_TRAIN_A.csv")
    test = _aeon_csv("UnitTest/ecg-diff-count-3_TEST.csv")
    a = _frame(train[["value-0"]].rename(columns={"value-0": "value"}), train["is_anomaly"], "ecg", "2026-01-01", "s")
    b = _frame(test[["value-0"]].rename(columns={"value-0": "value"}), test["is_anomaly"], "ecg",
               str(pd.Timestamp("2026-01-01", tz="UTC") + pd.Timedelta(seconds=len(train))), "s")
    return Series("GutenTAG ecg-diff-count-3 (aeon)", "synthetic ECG, 3 pattern anomalies", ["value"], a, b)


def _sktime_csv(relative: str) -> pd.DataFrame:
    return pd.read_csv(_package_dir("sktime") / "datasets" / "data" / relative)


def mitdb() -> Series:
    """sktime's MIT-BIH slice (ECG at 360 Hz, 20.8 s): one labelled stretch of abnormal beats near the
    end. Trained on the first 5,000 readings (normal), scored on the rest."""
    whole = _sktime_csv("mitdb/mitdb.csv")
    frame = _frame(whole[["data"]].rename(columns={"data": "ecg"}), whole["label"], "mitdb", "2026-01-01",
                   "2777777ns")
    return Series("MIT-BIH ECG (sktime)", "real ECG, one stretch of abnormal beats", ["ecg"],
                  frame.iloc[:5000].reset_index(drop=True), frame.iloc[5000:].reset_index(drop=True))


def yahoo() -> Series:
    """sktime's Yahoo S5-style series (1,000 hourly readings: trend, seasonality, 7 single-reading
    spikes and dips). Trained on the first 700 readings (with their labels), scored on the rest."""
    whole = _sktime_csv("yahoo/yahoo.csv")
    frame = _frame(whole[["data"]].rename(columns={"data": "value"}), whole["label"], "yahoo", "2026-01-01", "h")
    return Series("Yahoo S5-style (sktime)", "seasonal series with spikes and dips", ["value"],
                  frame.iloc[:700].reset_index(drop=True), frame.iloc[700:].reset_index(drop=True))


def streamad_uni() -> Series:
    """StreamAD's uniDS (999 hourly readings of a noisy cycle, 3 labelled 3-hour level events, all
    after reading 620). Trained on the first 600 readings (normal), scored on the rest."""
    whole = pd.read_csv(_package_dir("streamad") / "util" / "data" / "uniDS.csv", parse_dates=["timestamp"])
    frame = whole[["value"]].assign(anomaly=whole["label"].astype(int), device_id="streamad-uni",
                                    ts=whole["timestamp"].dt.tz_localize("UTC"))
    return Series("StreamAD uniDS", "hourly cycle with level events", ["value"],
                  frame.iloc[:600].reset_index(drop=True), frame.iloc[600:].reset_index(drop=True))


DEFAULTS = ("ecg_diff_count_3", "ucr_internal_bleeding16", "yahoo", "streamad_uni")
"""Series whose figures were looked at while choosing the defaults (window, candidates, criteria;
yahoo and streamad_uni: the history each method needs and the residual's median forecast)."""
HELD_OUT = ("shuttle", "mitdb")
"""Series reported as held out: run with the defaults, not tuned on."""
LOADERS = {"ecg_diff_count_3": ecg_diff_count_3, "shuttle": shuttle, "ucr_internal_bleeding16": ucr_internal_bleeding16,
           "mitdb": mitdb, "yahoo": yahoo, "streamad_uni": streamad_uni}


def pump_fleet(devices: int, days: int, *, seed: int = 0) -> pd.DataFrame:
    """``devices`` synthetic pumps x ``days`` of 1-minute readings (daily demand cycle, noise and a few
    slow blockages each), for the fit-time figure only: not a labelled benchmark."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n = days * 1440
    minute = np.arange(n)
    parts = []
    for d in range(devices):
        blocked = np.zeros(n)
        for start in rng.integers(0, n - 200, size=days):
            build = int(rng.integers(20, 150))
            blocked[start:start + build] = np.linspace(0, rng.uniform(0.35, 1.0), build)
        demand = 1 + 0.06 * np.sin(2 * np.pi * (minute / 60 - 9) / 24)
        p0, f0, v0 = rng.uniform(3.5, 6.0), rng.uniform(40.0, 90.0), rng.uniform(1.2, 2.8)
        parts.append(pd.DataFrame({
            "device_id": f"pump-{d:03d}",
            "ts": pd.Timestamp("2026-01-01", tz="UTC") + pd.to_timedelta(minute, unit="min"),
            "pressure": p0 * (1 - 0.3 * (demand - 1)) * (1 + 0.45 * blocked) * (1 + rng.normal(0, 0.015, n)),
            "flow": f0 * demand * (1 - 0.65 * blocked) * (1 + rng.normal(0, 0.02, n)),
            "vibration": v0 * (1 + 1.8 * blocked ** 1.2) * np.exp(rng.normal(0, 0.08, n))}))
    return pd.concat(parts, ignore_index=True)
