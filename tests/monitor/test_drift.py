"""Drift statistics: Evidently's default test choice, numbers equal to scipy's, edge cases."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from scipy import stats
from scipy.spatial import distance

from iot2ml.monitor.drift import detect_drift, psi, select_test
from iot2ml.monitor.profile import OTHER, Profile, build_profile


def _f32(a: np.ndarray) -> np.ndarray:
    """Values a float32 profile sample stores exactly, so scipy sees the same numbers."""
    return np.asarray(a, dtype=np.float32).astype(np.float64)


def _one(report, name):
    return next(f for f in report.features if f.feature == name)


# -- test selection (Evidently's _get_default_stattest) --------------------------------------


@pytest.mark.parametrize(
    ("kind", "n_ref", "n_unique", "expected"),
    [
        ("numeric", 1000, 6, "ks"),
        ("numeric", 1000, 5, "chisquare"),
        ("numeric", 1000, 2, "z"),
        ("categorical", 1000, 3, "chisquare"),
        ("categorical", 1000, 2, "z"),
        ("numeric", 1001, 6, "wasserstein"),
        ("numeric", 1001, 5, "jensenshannon"),
        ("categorical", 1001, 2, "jensenshannon"),
    ],
)
def test_select_test_follows_evidently_default(kind, n_ref, n_unique, expected):
    assert select_test(kind, n_ref, n_unique) == expected


def test_reference_size_picks_test_end_to_end():
    rng = np.random.default_rng(1)
    small = build_profile({"x": rng.normal(size=1000), "c": rng.choice(["a", "b", "c"], 1000)})
    large = build_profile({"x": rng.normal(size=1001), "c": rng.choice(["a", "b", "c"], 1001)})
    cur = {"x": rng.normal(size=300), "c": rng.choice(["a", "b", "c"], 300)}
    assert [f.test for f in detect_drift(small, cur).features] == ["ks", "chisquare"]
    assert [f.test for f in detect_drift(large, cur).features] == ["wasserstein", "jensenshannon"]


def test_unique_count_includes_current_values():
    """Evidently counts uniques over reference and current together."""
    ref = build_profile({"x": np.repeat([1.0, 2.0, 3.0], 100)})
    same = detect_drift(ref, {"x": np.array([1.0, 2.0, 3.0] * 10)})
    assert same.features[0].test == "chisquare"
    wider = detect_drift(ref, {"x": np.arange(10.0)})
    assert wider.features[0].test == "ks"


# -- numbers equal scipy on the same data ------------------------------------------------------


def test_ks_equals_scipy():
    rng = np.random.default_rng(2)
    ref, cur = _f32(rng.normal(size=800)), rng.normal(0.2, 1.0, size=600)
    got = detect_drift(build_profile({"x": ref}), {"x": cur}).features[0]
    want = stats.ks_2samp(ref, cur)
    assert got.test == "ks"
    assert got.statistic == pytest.approx(want.statistic)
    assert got.p_value == pytest.approx(want.pvalue)
    assert got.drifted == (want.pvalue < 0.05)


def test_chisquare_equals_scipy():
    ref = np.array(["a"] * 300 + ["b"] * 200 + ["c"] * 100)
    cur = np.array(["a"] * 50 + ["b"] * 60 + ["c"] * 40)
    got = detect_drift(build_profile({"c": ref}), {"c": cur}).features[0]
    want = stats.chi2_contingency([[300, 200, 100], [50, 60, 40]], correction=False)
    assert got.test == "chisquare"
    assert got.statistic == pytest.approx(want.statistic)
    assert got.p_value == pytest.approx(want.pvalue)


def test_z_test_equals_two_proportion_formula():
    ref = np.array(["off"] * 400 + ["on"] * 100)
    cur = np.array(["off"] * 120 + ["on"] * 80)
    got = detect_drift(build_profile({"s": ref}), {"s": cur}).features[0]
    p1, p2, pooled = 100 / 500, 80 / 200, 180 / 700
    z = (p1 - p2) / math.sqrt(pooled * (1 - pooled) * (1 / 500 + 1 / 200))
    assert got.test == "z"
    assert got.statistic == pytest.approx(z)
    assert got.p_value == pytest.approx(2 * stats.norm.sf(abs(z)))
    assert got.drifted


def test_normed_wasserstein_equals_scipy():
    rng = np.random.default_rng(3)
    ref, cur = _f32(rng.normal(10, 2, size=1000)), rng.normal(10.5, 2, size=2000)
    # more than 1000 reference values switch KS to Wasserstein; keep them all in the sample
    ref = np.concatenate([ref, ref[:500]])
    profile = build_profile({"x": ref}, sample_size=len(ref))
    got = detect_drift(profile, {"x": cur}).features[0]
    want = stats.wasserstein_distance(ref, cur) / np.std(ref)
    assert got.test == "wasserstein"
    assert got.distance == pytest.approx(want, rel=1e-6)
    assert got.drifted == (want >= 0.1)


def test_jensenshannon_equals_scipy():
    ref = np.array(["a"] * 1000 + ["b"] * 800 + ["c"] * 200)
    cur = np.array(["a"] * 100 + ["b"] * 300 + ["d"] * 100)
    got = detect_drift(build_profile({"c": ref}), {"c": cur}).features[0]
    want = distance.jensenshannon([1000, 800, 200, 0], [100, 300, 0, 100], base=2)
    assert got.test == "jensenshannon"
    assert got.distance == pytest.approx(want)
    assert got.drifted


# -- behaviour: no false alarms, real shifts detected -----------------------------------------


def test_same_distribution_rarely_drifts_with_p_value_tests():
    cats = np.array(["a", "b", "c", "d"])
    drifted = {"ks": 0, "chisquare": 0, "z": 0}
    for seed in range(50):
        rng = np.random.default_rng(seed)
        ref = build_profile(
            {
                "x": rng.normal(size=500),
                "c": rng.choice(cats, 500, p=[0.4, 0.3, 0.2, 0.1]),
                "b": rng.choice(["y", "n"], 500, p=[0.3, 0.7]),
            },
            seed=seed,
        )
        cur = {
            "x": rng.normal(size=400),
            "c": rng.choice(cats, 400, p=[0.4, 0.3, 0.2, 0.1]),
            "b": rng.choice(["y", "n"], 400, p=[0.3, 0.7]),
        }
        for f in detect_drift(ref, cur).features:
            drifted[f.test] += f.drifted
    assert all(n <= 5 for n in drifted.values()), drifted  # <= 10% of 50 at alpha 0.05
    # Evidently's goodness-of-fit chi-squared would flag ~20% here; see drift.py's docstring.


def test_same_distribution_large_reference_no_drift():
    rng = np.random.default_rng(4)
    ref = build_profile({"x": rng.normal(size=20_000), "c": rng.choice(list("abc"), 20_000)})
    report = detect_drift(ref, {"x": rng.normal(size=5000), "c": rng.choice(list("abc"), 5000)})
    assert [f.drifted for f in report.features] == [False, False]
    assert not report.dataset_drift


def test_shifted_mean_and_changed_mix_drift():
    rng = np.random.default_rng(5)
    for n_ref in (800, 20_000):
        ref = build_profile(
            {"x": rng.normal(size=n_ref), "c": rng.choice(list("abc"), n_ref, p=[0.6, 0.3, 0.1])}
        )
        cur = {
            "x": rng.normal(0.5, 1.0, size=2000),
            "c": rng.choice(list("abc"), 2000, p=[0.2, 0.3, 0.5]),
        }
        report = detect_drift(ref, cur)
        assert report.drifted_features == ["x", "c"], n_ref
        assert report.dataset_drift and report.share_drifted == 1.0


# -- PSI ----------------------------------------------------------------------------------------


def test_psi_known_value():
    # shares 0.5/0.5 -> 0.25/0.75: 0.25*ln 2 + 0.25*ln 1.5
    assert psi(np.array([50, 50]), np.array([25, 75])) == pytest.approx(
        0.25 * math.log(2) + 0.25 * math.log(1.5)
    )
    assert psi(np.array([10, 20, 30]), np.array([1, 2, 3])) == pytest.approx(0.0)


def test_psi_reported_for_categorical_features():
    ref = np.array(["a"] * 500 + ["b"] * 500)
    cur = np.array(["a"] * 250 + ["b"] * 750)
    got = detect_drift(build_profile({"c": ref}), {"c": cur}).features[0]
    assert got.psi == pytest.approx(psi(np.array([50, 50]), np.array([25, 75])))


# -- dataset drift and prediction drift ---------------------------------------------------------


def test_dataset_drift_threshold_is_half_of_features():
    rng = np.random.default_rng(6)
    data = {f"f{i}": rng.normal(size=600) for i in range(4)}
    ref = build_profile(data)
    cur = {f"f{i}": rng.normal(size=600) for i in range(4)}
    cur["f0"] = cur["f0"] + 2
    one = detect_drift(ref, cur)
    assert one.share_drifted == 0.25 and not one.dataset_drift
    cur["f1"] = cur["f1"] + 2
    two = detect_drift(ref, cur)
    assert two.share_drifted == 0.5 and two.dataset_drift
    assert not detect_drift(ref, cur, drift_share=0.75).dataset_drift


def test_prediction_drift_reported_apart_from_features():
    rng = np.random.default_rng(7)
    x = rng.normal(size=600)
    ref = build_profile(
        {"x": x, "score": rng.normal(size=600), "label": rng.choice(list("ab"), 600)}
    )
    cur = {"x": rng.permutation(x), "score": rng.normal(3, 1, size=600),
           "label": rng.choice(list("ab"), 600)}  # fmt: skip
    numeric = detect_drift(ref, cur, features=["x"], prediction="score")
    assert numeric.prediction.feature == "score" and numeric.prediction.test == "ks"
    assert numeric.prediction.drifted
    assert not numeric.dataset_drift  # prediction is not counted among features
    label = detect_drift(ref, cur, features=["x"], prediction="label")
    assert label.prediction.test == "z" and label.prediction.kind == "categorical"
    default = detect_drift(ref, cur, prediction="score")
    assert [f.feature for f in default.features] == ["x", "label"]


# -- edge cases ---------------------------------------------------------------------------------


def test_empty_current_data_reports_no_data():
    ref = build_profile({"x": np.arange(100.0), "c": ["a", "b"] * 50})
    empty = pa.table({"x": pa.array([], pa.float64()), "c": pa.array([], pa.string())})
    report = detect_drift(ref, empty)
    assert report.status == "no_data" and not report.dataset_drift
    assert [f.status for f in report.features] == ["no_data", "no_data"]
    assert all(not f.drifted for f in report.features)
    missing = detect_drift(ref, {"other": [1, 2]})
    assert missing.status == "no_data"


def test_all_null_columns():
    ref = build_profile(pa.table({"x": pa.array([None] * 10, pa.float64()), "y": np.arange(10.0)}))
    assert ref.columns["x"].count == 0 and ref.columns["x"].null_count == 10
    cur = pa.table({"x": [1.0, 2.0], "y": pa.array([None, float("nan")], pa.float64())})
    report = detect_drift(ref, cur)
    assert _one(report, "x").status == "no_reference"
    assert _one(report, "y").status == "no_data"
    assert report.status == "no_data"


def test_unseen_category_counts_without_error():
    ref = build_profile({"c": ["a", "b", "c"] * 100})
    stray = detect_drift(ref, {"c": ["a", "b", "c"] * 30 + ["z"]}).features[0]
    assert stray.test == "chisquare" and not stray.drifted
    assert math.isfinite(stray.statistic) and stray.psi > 0
    many = detect_drift(ref, {"c": ["a", "b", "c", "z"] * 30}).features[0]
    assert many.test == "chisquare" and many.drifted
    want = stats.chi2_contingency([[100, 100, 100, 0], [30, 30, 30, 30]], correction=False)
    assert many.p_value == pytest.approx(want.pvalue)


def test_truncated_reference_folds_unknown_categories_into_other():
    values = [f"k{i:03d}" for i in range(150)]
    ref = build_profile({"c": np.repeat(values, 10)}, top_k=100)
    assert ref.columns["c"].frequencies[OTHER] == 500
    got = detect_drift(ref, {"c": np.repeat(values, 3)}).features[0]
    assert got.test == "jensenshannon" and got.distance == pytest.approx(0.0, abs=1e-7)


def test_constant_reference_column_uses_std_floor():
    ref = build_profile({"x": np.full(2000, 5.0)})
    same = detect_drift(ref, {"x": np.full(100, 5.0)}).features[0]
    assert same.test == "jensenshannon" and not same.drifted
    spread = np.linspace(5.0, 5.01, 100)
    got = detect_drift(ref, {"x": spread}).features[0]
    assert got.test == "wasserstein"
    assert got.distance == pytest.approx(stats.wasserstein_distance([5.0], spread) / 0.001)
    assert math.isfinite(got.distance) and got.drifted


def test_wrong_column_type_names_the_column():
    ref = build_profile({"x": np.arange(10.0)})
    with pytest.raises(TypeError, match="'x'.*numeric"):
        detect_drift(ref, {"x": ["a", "b"]})


def test_accepts_pandas_and_numpy_inputs():
    rng = np.random.default_rng(8)
    df = pd.DataFrame({"x": rng.normal(size=300), "c": rng.choice(list("abc"), 300)})
    ref = build_profile(df)
    a = detect_drift(ref, df)
    b = detect_drift(ref, {"x": df["x"].to_numpy(), "c": df["c"].to_numpy()})
    assert a == b and not a.dataset_drift


def test_large_current_column_runs():
    rng = np.random.default_rng(9)
    ref = build_profile({"x": rng.normal(size=50_000)})
    report = detect_drift(ref, {"x": rng.normal(size=1_000_000)})
    assert report.features[0].n_current == 1_000_000
    assert report.features[0].test == "wasserstein"


def test_to_rows_flat_with_context():
    rng = np.random.default_rng(10)
    ref = build_profile({"x": rng.normal(size=300), "p": rng.normal(size=300)})
    report = detect_drift(ref, {"x": rng.normal(size=300), "p": rng.normal(size=300)},
                          prediction="p")  # fmt: skip
    rows = report.to_rows(model="m1", version=3)
    assert [r["scope"] for r in rows] == ["feature", "prediction", "dataset"]
    assert {len(r) for r in rows} == {len(rows[0])}  # same columns in every row
    assert all(r["model"] == "m1" and r["version"] == 3 for r in rows)
    assert all(not isinstance(v, (dict, list, tuple)) for r in rows for v in r.values())
    assert rows[-1]["drifted"] == report.dataset_drift


# -- profile ------------------------------------------------------------------------------------


def test_profile_round_trips_through_json():
    rng = np.random.default_rng(11)
    table = pa.table(
        {
            "x": pa.array(np.r_[rng.normal(size=3000), [np.nan]]),
            "i": pa.array(rng.integers(0, 3, size=3001)),
            "s": pa.array(rng.choice(list("abcd"), 3001)).dictionary_encode(),
            "flag": pa.array(rng.random(3001) > 0.5),
            "ts": pa.array(np.arange(3001).astype("datetime64[s]")),
        }
    )
    profile = build_profile(table)
    back = Profile.from_json(profile.to_json())
    assert back == profile
    assert profile.skipped == ("ts",)
    assert profile.columns["x"].null_count == 1 and profile.columns["x"].count == 3000
    assert profile.columns["i"].value_counts is not None
    assert set(profile.columns["flag"].frequencies) == {"true", "false"}
    cur = table.slice(0, 500)
    assert detect_drift(back, cur) == detect_drift(profile, cur)


def test_profile_statistics_are_right():
    values = np.arange(1, 101, dtype=np.float64)
    col = build_profile({"x": values}).columns["x"]
    assert (col.min, col.max, col.mean) == (1.0, 100.0, 50.5)
    assert col.std == pytest.approx(np.std(values))
    assert sum(col.bin_counts) == 100 and len(col.bin_counts) == len(col.bin_edges) - 1
    assert col.quantiles[0] == 1.0 and col.quantiles[-1] == 100.0
    assert sorted(col.sample) == list(values)  # <= sample_size: kept whole


def test_profile_size_is_bounded_for_50_features():
    rng = np.random.default_rng(12)
    n = 20_000
    data = {f"n{i}": rng.normal(size=n) for i in range(45)}
    data |= {f"c{i}": rng.integers(0, 1_000, size=n).astype(str) for i in range(5)}
    text = build_profile(data).to_json()
    assert len(text.encode()) < 400_000


def test_profile_sample_is_seeded_and_bounded():
    x = np.random.default_rng(13).normal(size=10_000)
    a, b = build_profile({"x": x}, seed=1), build_profile({"x": x}, seed=1)
    assert a.columns["x"].sample.size == 1000
    assert np.array_equal(a.columns["x"].sample, b.columns["x"].sample)
