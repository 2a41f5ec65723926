"""The anomaly task's window methods: shape and context anomalies the point-wise model cannot see,
the selection and what it logs, and a single served reading scored in its device's context."""

from __future__ import annotations

import pickle

import cloudpickle
import numpy as np
import pandas as pd
import pytest

from iot2ml.core.errors import InvalidInput
from iot2ml.ml import _anomaly_methods as methods
from iot2ml.ml.anomaly import AnomalyTask, evaluate_flags, ucr_hit


def wave(n: int, rng: np.random.Generator, *, period: int = 40, device: str = "dev-1") -> pd.DataFrame:
    """A periodic sensor signal (one reading a minute) with a little noise."""
    t = np.arange(n)
    return pd.DataFrame({
        "device_id": device,
        "ts": pd.Timestamp("2026-01-01", tz="UTC") + pd.to_timedelta(t, unit="min"),
        "value": np.sin(2 * np.pi * t / period) + rng.normal(0, 0.05, n),
        "anomaly": False,
    })


def with_shape_change(frame: pd.DataFrame, start: int, length: int) -> pd.DataFrame:
    """The waveform inverted over ``length`` readings: every value stays within the normal range."""
    out = frame.copy()
    rows = out.index[start:start + length]
    out.loc[rows, "value"] = -out.loc[rows, "value"]
    out.loc[rows, "anomaly"] = True
    return out


@pytest.fixture(scope="module")
def shape_series() -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(4)
    train = wave(3000, rng)
    test = with_shape_change(wave(4000, rng).assign(ts=lambda f: f["ts"] + pd.Timedelta(minutes=3000)), 2210, 20)
    return train, test


def test_the_left_matrix_profile_matches_its_definition() -> None:
    """Each subsequence's z-normalised Euclidean distance to its nearest one starting more than
    ceil(m/4) positions earlier (stumpy's exclusion zone), computed here pair by pair."""
    rng = np.random.default_rng(0)
    x = np.cumsum(rng.normal(size=400))
    m = 24
    ours = methods.left_profile(x, m, 0)
    subs = np.lib.stride_tricks.sliding_window_view(x, m)
    z = (subs - subs.mean(axis=1, keepdims=True)) / subs.std(axis=1, keepdims=True)
    excl = int(np.ceil(m / 4))
    want = np.zeros(len(z))
    for i in range(len(z)):
        earlier = [np.linalg.norm(z[i] - z[j]) for j in range(max(0, i - methods.REFERENCE), i - excl)]
        want[i] = min(earlier) if earlier else 0.0
    np.testing.assert_allclose(ours, want, atol=1e-6)


def test_a_shape_anomaly_in_the_normal_range_is_found_by_the_discord_not_the_point_model(shape_series) -> None:
    train, test = shape_series
    truth = test["anomaly"].to_numpy()
    found = {}
    for method in ("point", "discord"):
        model = AnomalyTask(features=["value"], methods=[method]).fit(train).model
        scores = model.score(test)
        found[method] = (ucr_hit(scores, truth), evaluate_flags(scores > model.threshold, truth,
                                                               test["device_id"].to_numpy())["event_recall"])
    assert found["discord"] == (True, 1.0)
    assert not found["point"][0]


def test_without_labels_the_selection_is_by_injected_anomalies_and_is_logged(shape_series) -> None:
    train, _ = shape_series
    result = AnomalyTask(features=["value"]).fit(train)
    params = result.params
    assert params["selection"] == "injected_event_rank"
    assert params["method"] in ("window", "residual", "discord")  # a periodic signal: the point model cannot win
    figures = {m: params[f"selection_{m}"] for m in ("point", "window", "residual", "discord")}
    assert params["method"] == max(figures, key=lambda m: figures[m])
    assert params["period"] == 40 and params["window"] == 40
    assert params["threshold"] == result.model.threshold
    assert result.model.describe_inputs()["method"] == params["method"]


def test_with_labels_the_selection_is_event_f1_on_the_time_ordered_holdout(shape_series) -> None:
    train, test = shape_series
    frame = pd.concat([train, test], ignore_index=True)  # the last 30 % (held out) hold the inverted stretch
    result = AnomalyTask(features=["value"], label="anomaly").fit(frame)
    assert result.params["selection"] == "holdout_event_f1"
    assert result.params["method"] != "point"
    assert result.metrics["event_recall"] == 1.0
    assert result.beats_baseline()


def test_a_single_served_reading_is_scored_in_its_context(shape_series) -> None:
    train, test = shape_series
    model = AnomalyTask(features=["value"], methods=["discord"]).fit(train).model
    batch = model.predict(test.head(300))
    served = cloudpickle.loads(cloudpickle.dumps(model))  # as a serving process loads it: no kept readings
    one_by_one = [served.predict_records([{"device_id": r.device_id, "value": r.value}])[0]
                  for r in test.head(300).itertuples()]
    np.testing.assert_allclose([a["score"] for a in one_by_one], batch["score"].to_numpy(), atol=1e-9)
    assert [a["prediction"] for a in one_by_one] == batch["is_anomaly"].tolist()
    assert len(served._recent["dev-1"]) == min(served.kept, served.context + 300)  # bounded: AnomalyModel._matrix


def test_a_reading_seen_on_two_channels_gets_one_score_and_is_kept_once(shape_series) -> None:
    """A device's reading asked about over REST (a record with its ts) and then streamed from the lake
    (a row with the same ts) is scored alike and joins the context once; a late reading is scored in
    the context before it."""
    import pyarrow as pa

    train, test = shape_series
    model = AnomalyTask(features=["value"], methods=["window"]).fit(train).model
    rows = test.head(120)
    batch = model.score(rows)
    records = [{"device_id": r.device_id, "ts": r.ts.isoformat(), "value": r.value} for r in rows.itertuples()]
    rest, streamed = [], []
    for i in range(0, len(rows), 20):  # the streaming scorer reads each commit after the devices asked
        rest += [model.predict_records([r])[0]["score"] for r in records[i:i + 20]]
        part = pa.Table.from_pandas(rows.iloc[i:i + 20][["device_id", "ts", "value"]])
        streamed += model.predict_matrix(model.matrix_from_arrow(part)).tolist()
    kept = model._recent["dev-1"].copy()
    assert len(kept) == model.kept == 2 * model.context
    np.testing.assert_allclose(kept[-len(rows):], model.scaler.transform(rows["device_id"].to_numpy(),
                                                                         rows[["value"]].to_numpy())[-len(kept):])
    np.testing.assert_allclose(rest, batch, atol=1e-9)
    np.testing.assert_allclose(streamed, batch, atol=1e-9)
    np.testing.assert_array_equal(model._recent["dev-1"], kept)  # nothing kept twice
    late = model.predict_records([{**records[60], "value": records[60]["value"] + 5}])[0]["score"]
    assert late > batch[60]  # scored in its own context, not after the newer readings
    np.testing.assert_array_equal(model._recent["dev-1"], kept)
    with pytest.raises(InvalidInput, match=r"instances\[0\]\.ts"):
        model.predict_records([{**records[0], "ts": "yesterday-ish"}])


def test_a_loaded_model_warmed_with_the_lake_scores_as_batch_scoring_does(shape_series) -> None:
    """A serving process that loads a window model long after training takes the readings sent since
    (its device type's table) as context: the next reading scores as in a batch over all of them."""
    import pyarrow as pa

    train, test = shape_series
    model = AnomalyTask(features=["value"], methods=["window"]).fit(train).model
    batch = model.score(test.head(400))
    served = cloudpickle.loads(cloudpickle.dumps(model))
    gap = pa.Table.from_pandas(test.iloc[:300][["device_id", "ts", "value"]].sample(frac=1.0, random_state=1))
    assert served.warm(gap) == min(300, served.kept)
    assert served.warm(gap) == 0  # readings it holds are not taken again
    after = [served.predict_records([{"device_id": r.device_id, "ts": r.ts.isoformat(), "value": r.value}])[0]
             for r in test.iloc[300:400].itertuples()]
    np.testing.assert_allclose([a["score"] for a in after], batch[300:400], atol=1e-9)
    cold = cloudpickle.loads(cloudpickle.dumps(model)).score(test.iloc[300:400])
    assert not np.allclose(cold, batch[300:400])  # without the warm-up the context would be the training tail


def test_streamed_commits_continue_the_context(shape_series) -> None:
    import pyarrow as pa

    train, test = shape_series
    model = AnomalyTask(features=["value"], methods=["window"]).fit(train).model
    batch = model.score(test.head(200))
    parts = [pa.Table.from_pandas(test.iloc[i:i + 50][["device_id", "value"]]) for i in range(0, 200, 50)]
    streamed = np.concatenate([model.predict_matrix(model.matrix_from_arrow(p)) for p in parts])
    np.testing.assert_allclose(streamed, batch, atol=1e-9)


def test_a_model_pickled_before_the_window_methods_still_scores(shape_series) -> None:
    train, test = shape_series
    model = AnomalyTask(features=["value"], methods=["point"]).fit(train).model
    state = {k: v for k, v in model.__getstate__().items() if k not in ("method", "tail", "tail_ts", "_recent", "_recent_ts")}
    state["forest"] = model.method.forest
    old = object.__new__(type(model))
    old.__setstate__(pickle.loads(pickle.dumps(state)))
    np.testing.assert_allclose(old.score(test.head(50)), model.score(test.head(50)))


def test_unknown_methods_are_named() -> None:
    with pytest.raises(InvalidInput, match="'forest'"):
        AnomalyTask(features=["value"], methods=["forest"])
    assert AnomalyTask(features=["value"], methods="discord, point").methods == ["point", "discord"]


def test_the_window_method_places_readings_in_the_day() -> None:
    """A pump on from 08:00 to 18:00 every day that stays on until 22:00 one evening: every reading
    is normal in level and does not change, only its time of day is wrong."""
    rng = np.random.default_rng(2)
    ts = pd.date_range("2026-01-01", periods=12 * 144, freq="10min", tz="UTC")
    hour = ts.hour.to_numpy()
    on = (hour >= 8) & (hour < 18)
    late = (ts >= "2026-01-11 18:00") & (ts < "2026-01-11 22:00")
    frame = pd.DataFrame({"device_id": "pump-1", "ts": ts,
                          "power": np.where(on | late, 5.0, 1.0) + rng.normal(0, 0.1, len(ts)), "anomaly": late})
    result = AnomalyTask(features=["power"], methods=["window"]).fit(frame)
    assert result.params["cycles"] == "day"
    scores = result.model.score(frame)
    evening = np.asarray(late)
    normal_evenings = (hour >= 18) & (hour < 22) & ~evening
    assert np.median(scores[evening]) > np.quantile(scores[normal_evenings], 0.99)
    assert (scores[evening] > result.model.threshold).mean() > 0.5  # without the hour of the day: none flagged


def test_the_seasonal_residual_does_not_echo_a_spike_one_period_later() -> None:
    """The forecast takes the median of the readings one, two and three periods back: a spike is one
    anomaly, not two (a seasonal naive forecast would see it again a period later)."""
    rng = np.random.default_rng(5)
    train, test = wave(2000, rng), wave(600, rng).assign(ts=lambda f: f["ts"] + pd.Timedelta(minutes=2000))
    test.loc[200, "value"] += 4.0
    model = AnomalyTask(features=["value"], methods=["residual"]).fit(train).model
    assert model.method.period == 40
    scores = model.score(test)
    assert scores[200] == scores.max() and scores[200] > model.threshold
    assert scores[240] < model.threshold  # one period later


def test_the_drift_reference_scores_training_readings_in_their_context(shape_series) -> None:
    """The reference profile's scores (what served scores are compared with) are those of the
    newest training readings after the readings before them, as serving scores them, not of readings
    sampled at random and scored alone."""
    from iot2ml.ml.jobs import reference_profile

    train, _ = shape_series
    model = AnomalyTask(features=["value"], methods=["window"]).fit(train).model
    sample, answers = model.reference_sample(train, 500)
    assert len(sample) == 500 and sample["ts"].is_monotonic_increasing
    assert sample["ts"].iloc[-1] == train["ts"].max()
    z = model.scaler.transform(train["device_id"].to_numpy(), train[["value"]].to_numpy())
    stamps = train["ts"].astype("int64").to_numpy()
    whole = model.predict_matrix(model.method.rows("dev-1", z, 0, stamps))  # every reading after all before it
    np.testing.assert_allclose([a["score"] for a in answers], whole[-500:], atol=1e-9)
    profile = reference_profile(model, "anomaly", train)
    assert profile is not None and "prediction" in profile["columns"]
