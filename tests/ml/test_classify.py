"""Classify and regress on synthetic data with a known signal: the model must clearly beat its baseline."""

from __future__ import annotations

import cloudpickle
import numpy as np
import pandas as pd
import pytest

from iot2ml.core.errors import InvalidInput
from iot2ml.ml.classify import ClassifyTask, RegressTask

MEASUREMENTS = ["fixed_acidity", "volatile_acidity", "citric_acid", "residual_sugar", "chlorides",
                "free_sulfur_dioxide", "total_sulfur_dioxide", "density", "ph", "sulphates", "alcohol"]


def wine_frame(batches: int = 400, *, unlabelled: int = 0, seed: int = 0) -> pd.DataFrame:
    """Seed 004: cask samples (``batch_id``) measured 3-7 times; quality decided by alcohol and
    volatile acidity plus noise; classes imbalanced (good ≈ 60 %, better ≈ 24 %, best ≈ 16 %)."""
    rng = np.random.default_rng(seed)
    n = batches + unlabelled
    true = {m: rng.normal(0.0, 1.0, n) for m in MEASUREMENTS}
    score = 1.2 * true["alcohol"] - 0.9 * true["volatile_acidity"] + rng.normal(0.0, 0.5, n)
    quality = np.where(score > 1.8, "best", np.where(score > 0.5, "better", "good")).astype(object)
    quality[batches:] = None
    rows = []
    t0 = pd.Timestamp("2026-03-01", tz="UTC")
    for b in range(n):
        for k in range(int(rng.integers(3, 8))):
            rows.append({"device_id": f"lab-{b % 4}", "ts": t0 + pd.Timedelta(minutes=30 * b + k),
                         "msg_id": f"m{b}-{k}", "_seq": len(rows), "batch_id": f"batch-{b:04d}",
                         "quality": quality[b], **{m: true[m][b] + rng.normal(0.0, 0.3) for m in MEASUREMENTS}})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def wine() -> pd.DataFrame:
    return wine_frame(400, unlabelled=20)


@pytest.fixture(scope="module")
def wine_result(wine: pd.DataFrame):
    return ClassifyTask(label="quality", entity="batch_id").fit(wine)


def test_wine_quality_beats_majority_class(wine_result) -> None:
    result = wine_result
    assert result.task == "classify" and result.primary_metric == "macro_f1" and result.greater_is_better
    assert result.beats_baseline()
    assert result.metrics["macro_f1"] > result.baseline_metrics["macro_f1"] + 0.35
    assert result.metrics["accuracy"] > result.baseline_metrics["accuracy"] + 0.1
    assert result.features == MEASUREMENTS  # ids, ts, msg_id, _seq, label and entity are not features
    cm = result.artifacts["confusion_matrix"]
    assert cm["labels"] == ["best", "better", "good"]
    assert np.asarray(cm["matrix"]).sum() == 400  # one row per labelled batch; unlabelled ones dropped
    assert set(result.artifacts["report"]) == {"best", "better", "good"}
    assert result.artifacts["report"]["best"]["recall"] > 0.5  # class weights: the rare class is found
    assert next(iter(result.artifacts["feature_importance"])).startswith(("alcohol", "volatile_acidity"))


def test_predict_aggregates_raw_readings_or_takes_aggregated_rows(wine: pd.DataFrame, wine_result) -> None:
    model = wine_result.model
    raw = model.predict(wine)
    assert list(raw.columns) == ["batch_id", "prediction", "proba_best", "proba_better", "proba_good"]
    assert len(raw) == wine["batch_id"].nunique()
    assert np.allclose(raw.filter(like="proba_").sum(axis=1), 1.0)
    aggregated = model.aggregate(wine)
    assert "alcohol__std" in aggregated.columns and "n_readings" in aggregated.columns
    again = model.predict(aggregated)
    assert (again["prediction"].to_numpy() == raw["prediction"].to_numpy()).all()
    assert np.allclose(again.filter(like="proba_").to_numpy(), raw.filter(like="proba_").to_numpy())
    assert len(model.predict(wine_result.input_example)) >= 1


def test_missing_feature_column_is_named(wine: pd.DataFrame, wine_result) -> None:
    with pytest.raises(InvalidInput, match="'alcohol'"):
        wine_result.model.predict(wine.drop(columns="alcohol"))
    with pytest.raises(InvalidInput, match="'colour'"):
        ClassifyTask(label="quality", entity="batch_id", features=["alcohol", "colour"]).fit(wine)
    with pytest.raises(InvalidInput, match="'rating'"):
        ClassifyTask(label="rating", entity="batch_id").fit(wine)
    with pytest.raises(InvalidInput, match="'alcohol'.*non-numeric"):
        wine_result.model.predict(wine.assign(alcohol="strong"))


def test_too_few_examples_of_a_class_is_refused() -> None:
    frame = wine_frame(60, seed=3)
    first = frame["batch_id"] == "batch-0000"
    frame.loc[first, "quality"] = "faulty"  # one batch of its class
    with pytest.raises(InvalidInput, match=r"class 'faulty'.* 1 entities"):
        ClassifyTask(label="quality", entity="batch_id").fit(frame)


def test_models_round_trip_through_cloudpickle(wine: pd.DataFrame, wine_result) -> None:
    restored = cloudpickle.loads(cloudpickle.dumps(wine_result.model))
    pd.testing.assert_frame_equal(restored.predict(wine), wine_result.model.predict(wine))


def test_regression_beats_the_mean() -> None:
    rng = np.random.default_rng(7)
    n = 1500
    frame = pd.DataFrame({"device_id": [f"d{i % 5}" for i in range(n)], "x1": rng.uniform(-2, 2, n),
                          "x2": rng.uniform(-2, 2, n), "x3": rng.uniform(-2, 2, n), "noise": rng.normal(0, 1, n)})
    frame["y"] = 3 * frame["x1"] + 2 * np.sin(3 * frame["x2"]) + frame["x3"] ** 2 + rng.normal(0, 0.3, n)
    result = RegressTask(label="y").fit(frame)
    assert result.task == "regress" and result.primary_metric == "mae" and not result.greater_is_better
    assert result.beats_baseline()
    assert result.metrics["mae"] < 0.3 * result.baseline_metrics["mae"]
    assert result.metrics["r2"] > 0.9 and abs(result.baseline_metrics["r2"]) < 0.05
    assert result.metrics["rmse"] < result.baseline_metrics["rmse"]
    assert result.features == ["x1", "x2", "x3", "noise"]
    out = result.model.predict(frame.drop(columns="y").tail(3))
    assert list(out.columns) == ["prediction"] and list(out.index) == list(frame.index[-3:])
    restored = cloudpickle.loads(cloudpickle.dumps(result.model))
    pd.testing.assert_frame_equal(restored.predict(frame), result.model.predict(frame))


def test_string_feature_is_categorical_and_entities_stay_in_one_fold() -> None:
    rng = np.random.default_rng(11)
    n = 900
    site = rng.choice(["north", "south", "east"], n)
    level = rng.normal(0, 1, n)
    alarm = np.where(site == "south", level > -0.5, level > 1.0)
    frame = pd.DataFrame({"unit": [f"u{i // 9}" for i in range(n)], "site": site, "level": level,
                          "alarm": alarm})
    result = ClassifyTask(label="alarm", entity="unit", aggregate=False, features=["site", "level"]).fit(frame)
    assert result.metrics["macro_f1"] > 0.85 > result.baseline_metrics["macro_f1"] + 0.3
    unseen = pd.DataFrame({"unit": ["new", "new"], "site": ["south", "west"], "level": [0.0, 0.0]})
    out = result.model.predict(unseen)
    assert list(out.columns) == ["unit", "prediction", "proba_False", "proba_True"]
    assert bool(out["prediction"].iloc[0]) is True  # south alarms from -0.5


def test_rounds_come_from_early_stopping_and_are_logged(wine_result) -> None:
    params = wine_result.params
    best = params["lgbm_best_iterations"]
    assert len(best) == params["folds"] and all(isinstance(b, int) and b >= 1 for b in best)
    assert params["lgbm_n_estimators"] == max(10, round(float(np.median(best))))
    assert params["lgbm_early_stopping"].startswith("every fold")
    booster = wine_result.model.estimator.booster_
    assert booster.num_trees() == params["lgbm_n_estimators"] * 3  # one tree per class and round
    assert params["lgbm_n_estimators"] < 300  # 400 batches support far fewer than the old fixed 300
    assert [f["best_iteration"] for f in wine_result.artifacts["folds"]] == best


def test_a_rows_out_of_fold_prediction_ignores_its_own_label() -> None:
    """Stopping uses only the fold's training part: changing one row's label moves other folds' models
    (they train on it) but not the prediction the row got from the fold that held it out."""
    rng = np.random.default_rng(5)
    n = 600
    frame = pd.DataFrame({"x1": rng.normal(0, 1, n), "x2": rng.normal(0, 1, n)})
    frame["y"] = 2 * frame["x1"] - frame["x2"] ** 2 + rng.normal(0, 0.5, n)
    task = RegressTask(label="y")
    before = task.fit(frame).artifacts["holdout_predictions"]["prediction"].to_numpy()
    changed = frame.copy()
    changed.loc[17, "y"] = 1e4
    after = task.fit(changed).artifacts["holdout_predictions"]["prediction"].to_numpy()
    assert after[17] == before[17]
    assert not np.allclose(np.delete(after, 17), np.delete(before, 17))  # the label did reach other folds


def test_too_few_rows_to_stop_early_train_a_modest_fixed_count() -> None:
    frame = wine_frame(30, seed=3)  # ~22 batches per fold's training part
    result = ClassifyTask(label="quality", entity="batch_id").fit(frame)
    params = result.params
    assert params["lgbm_early_stopping"].startswith("off: 2") and "fewer than 30" in params["lgbm_early_stopping"]
    assert params["lgbm_best_iterations"] == [None] * params["folds"]
    assert params["lgbm_n_estimators"] == 100
    assert result.model.estimator.booster_.num_trees() == 100 * len(params["classes"])
    assert len(result.model.predict(frame)) == 30
