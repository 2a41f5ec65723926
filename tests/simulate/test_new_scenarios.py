"""The wine and viscosity scenarios: deterministic, realistic, with a signal a model can learn."""

from __future__ import annotations

import collections
import csv
import statistics

import numpy as np
import pytest

from iot2ml.core.devices import parse_schema
from iot2ml.core.errors import InvalidInput
from iot2ml.simulate.scenarios import (
    QUALITY_CLASSES,
    WINE_MEASUREMENTS,
    ViscosityMeter,
    WineStation,
    blood_viscosity,
    get_scenario,
    viscosity_references,
    wine_ratings,
    write_ratings_csv,
)

T0 = 1_763_078_400.0

# Ranges of the UCI wine-quality data set (red wine), per measurement.
UCI_RANGES = {
    "fixed_acidity": (4.6, 15.9), "volatile_acidity": (0.12, 1.58), "citric_acid": (0.0, 1.0),
    "residual_sugar": (0.9, 15.5), "chlorides": (0.012, 0.611), "free_sulfur_dioxide": (1.0, 72.0),
    "total_sulfur_dioxide": (6.0, 289.0), "density": (0.990, 1.004), "ph": (2.74, 4.01),
    "sulphates": (0.33, 2.0), "alcohol": (8.4, 14.9),
}
UCI_MEANS = {"fixed_acidity": 8.3, "volatile_acidity": 0.53, "citric_acid": 0.27, "residual_sugar": 2.5,
             "chlorides": 0.087, "free_sulfur_dioxide": 15.9, "total_sulfur_dioxide": 46.5, "density": 0.9967,
             "ph": 3.31, "sulphates": 0.66, "alcohol": 10.4}


def _wine(stations: int = 8, batches: int = 500, seed: int = 11) -> tuple[list[dict], list[str]]:
    rows, classes = [], []
    for i in range(stations):
        station = WineStation(i, seed)
        for n in range(batches):
            rows.append(station.sample(n))
            classes.append(station.true_quality(n))
    return rows, classes


@pytest.mark.parametrize("name", ["wine", "viscosity"])
def test_fields_are_a_catalog_schema_and_match_readings(name: str) -> None:
    scenario = get_scenario(name)
    assert scenario.device_type == name
    assert parse_schema(scenario.fields) == scenario.fields
    assert set(scenario.units) == set(scenario.fields)
    reading = scenario.make_device(0, 0).reading(T0)
    assert set(reading) == set(scenario.fields)
    for field, kind in scenario.fields.items():
        assert isinstance(reading[field], str if kind == "string" else float), (field, reading[field])


@pytest.mark.parametrize("name", ["wine", "viscosity"])
def test_devices_number_their_samples_deterministically(name: str) -> None:
    scenario = get_scenario(name)
    device, again = scenario.make_device(2, 5), scenario.make_device(2, 5)
    first = [device.reading(T0 + k) for k in range(50)]
    assert first == [again.reading(T0 - 999 * k) for k in range(50)], "readings depend on the count, not on t"
    key = "batch_id" if name == "wine" else "sample_id"
    assert [r[key] for r in first] == [f"{name}-0002-{key[0]}{n:06d}" for n in range(50)]
    assert first[10] == scenario.make_device(2, 5).sample(10)
    other_seed = [scenario.make_device(2, 6).sample(n) for n in range(50)]
    other_device = [scenario.make_device(3, 5).sample(n) for n in range(50)]
    strip = [{k: v for k, v in r.items() if k != key} for r in first]
    assert strip != [{k: v for k, v in r.items() if k != key} for r in other_seed]
    assert strip != [{k: v for k, v in r.items() if k != key} for r in other_device]


def test_wine_measurements_are_in_the_uci_ranges_with_realistic_centres() -> None:
    rows, _ = _wine()
    for name, (low, high) in UCI_RANGES.items():
        values = [r[name] for r in rows]
        assert low <= min(values) and max(values) <= high, (name, min(values), max(values))
        assert statistics.median(values) == pytest.approx(UCI_MEANS[name], rel=0.2), name
        assert len(set(values)) > 30, f"{name} barely varies"
    assert all(r["total_sulfur_dioxide"] > r["free_sulfur_dioxide"] for r in rows)
    alcohol, density = np.array([r["alcohol"] for r in rows]), np.array([r["density"] for r in rows])
    assert np.corrcoef(alcohol, density)[0, 1] < -0.4, "alcohol makes wine lighter"
    acid, ph = np.array([r["fixed_acidity"] for r in rows]), np.array([r["ph"] for r in rows])
    assert np.corrcoef(acid, ph)[0, 1] < -0.4, "more acid, lower pH"


def test_wine_classes_are_imbalanced_as_designed_and_every_station_has_all() -> None:
    _, classes = _wine()
    share = {c: n / len(classes) for c, n in collections.Counter(classes).items()}
    assert set(share) == set(QUALITY_CLASSES)
    assert share["good"] == pytest.approx(0.50, abs=0.05)
    assert share["better"] == pytest.approx(0.35, abs=0.05)
    assert share["best"] == pytest.approx(0.15, abs=0.04)
    for i in range(5):
        station = WineStation(i, 11)
        assert {station.true_quality(n) for n in range(200)} == set(QUALITY_CLASSES)


def test_wine_quality_follows_alcohol_volatile_acidity_and_sulphates() -> None:
    rows, classes = _wine()

    def mean(cls: str, name: str) -> float:
        return statistics.mean(r[name] for r, c in zip(rows, classes) if c == cls)

    assert mean("best", "alcohol") > mean("better", "alcohol") + 0.4 > mean("good", "alcohol") + 0.8
    assert mean("best", "volatile_acidity") < mean("better", "volatile_acidity") < mean("good", "volatile_acidity")
    assert mean("best", "sulphates") > mean("better", "sulphates") > mean("good", "sulphates")
    assert mean("best", "chlorides") == pytest.approx(mean("good", "chlorides"), rel=0.1), "chlorides carry no signal"


def test_wine_quality_is_learnable_from_the_11_measurements() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.tree import DecisionTreeClassifier

    train_rows, train_y = _wine(stations=6, batches=500, seed=1)
    test_rows, test_y = _wine(stations=4, batches=400, seed=2)  # other warehouses, other batches
    x_train = np.array([[r[m] for m in WINE_MEASUREMENTS] for r in train_rows])
    x_test = np.array([[r[m] for m in WINE_MEASUREMENTS] for r in test_rows])
    majority = collections.Counter(test_y).most_common(1)[0][1] / len(test_y)
    assert majority < 0.56
    for model in (make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
                  DecisionTreeClassifier(max_depth=5, random_state=0)):
        accuracy = model.fit(x_train, train_y).score(x_test, test_y)
        assert accuracy > 0.7 and accuracy > majority + 0.15, (model, accuracy, majority)


def test_wine_ratings_match_the_hidden_class_up_to_the_noise(tmp_path) -> None:
    ids = ["wine-0000", "wine-0001", "cellar-07"]
    ratings = wine_ratings(ids, 400, seed=4, noise=0.1)
    assert ratings == wine_ratings(ids, 400, seed=4, noise=0.1)
    assert len(ratings) == 1200 and len({r["batch_id"] for r in ratings}) == 1200
    truth = {}
    for device_id in ids:
        station = WineStation(0, 4, device_id=device_id)
        truth.update({station.batch_id(n): station.true_quality(n) for n in range(400)})
    assert {r["batch_id"] for r in ratings} == set(truth)
    # the stations run_simulation makes (device i is wine-{i:04d}) sent exactly these batches
    assert WineStation(1, 4).reading(T0)["batch_id"] == "wine-0001-b000000"
    wrong = [r for r in ratings if r["quality"] != truth[r["batch_id"]]]
    assert 0.06 < len(wrong) / len(ratings) < 0.14
    order = {c: k for k, c in enumerate(QUALITY_CLASSES)}
    assert all(abs(order[r["quality"]] - order[truth[r["batch_id"]]]) == 1 for r in wrong), "one class off"
    assert not [r for r in wine_ratings(ids, 400, seed=4, noise=0.0) if r["quality"] != truth[r["batch_id"]]]
    sources = collections.Counter(r["source"] for r in ratings)
    assert set(sources) == {"taster", "user"} and 0.2 < sources["taster"] / len(ratings) < 0.4
    assert all(r["who"].startswith(r["source"] + "-") for r in ratings)
    assert all(r["rated_at"].startswith("2026-01") and r["rated_at"].endswith("Z") for r in ratings)

    path = tmp_path / "ratings.csv"
    assert write_ratings_csv(path, ratings) == 1200
    with path.open(newline="") as f:
        assert list(csv.DictReader(f)) == ratings
    with pytest.raises(InvalidInput, match="noise 1.5"):
        wine_ratings(ids, 1, seed=0, noise=1.5)


def test_blood_viscosity_physics() -> None:
    # 37 °C, hematocrit 45 %: about 4-5 mPa·s at high shear, 3x that at 1/s (shear thinning)
    assert 3.5 < blood_viscosity(300.0, 37.0, 45.0) < 5.0
    assert blood_viscosity(1.0, 37.0, 45.0) > 2.5 * blood_viscosity(300.0, 37.0, 45.0)
    assert blood_viscosity(100.0, 37.0, 55.0) > 1.2 * blood_viscosity(100.0, 37.0, 45.0)
    assert blood_viscosity(100.0, 25.0, 45.0) > 1.15 * blood_viscosity(100.0, 37.0, 45.0)
    rates = [1.0, 5.0, 10.0, 50.0, 100.0, 300.0]
    values = [blood_viscosity(r, 37.0, 40.0) for r in rates]
    assert values == sorted(values, reverse=True)


def test_viscosity_readings_are_realistic_and_measure_the_true_viscosity() -> None:
    ratios, rows, truths = [], [], []
    for i in range(10):
        meter = ViscosityMeter(i, 3)
        for n in range(300):
            r, true = meter.sample(n), meter.true_viscosity(n)
            rows.append(r)
            truths.append(true)
            ratios.append(r["shear_stress"] / r["shear_rate"] / true)
            assert 18 <= r["hematocrit"] <= 65 and 20 <= r["temperature"] <= 40 and r["shear_stress"] > 0
            assert 1.5 < true < 60  # up to polycythaemic blood at low shear
    # the measured apparent viscosity is the true one up to calibration gain and noise
    assert statistics.mean(ratios) == pytest.approx(1.0, abs=0.02)
    assert all(0.88 < q < 1.12 for q in ratios)
    assert statistics.pstdev(ratios) > 0.01, "a meter without noise is not realistic"
    # and it rises with hematocrit, falls with temperature, at a fixed shear rate
    at_100 = [(r, t) for r, t in zip(rows, truths) if r["shear_rate"] == 100.0]
    low_h = [t for r, t in at_100 if r["hematocrit"] < 36 and r["temperature"] > 35]
    high_h = [t for r, t in at_100 if r["hematocrit"] > 46 and r["temperature"] > 35]
    assert statistics.mean(high_h) > 1.3 * statistics.mean(low_h)
    mid = [(r, t) for r, t in at_100 if 38 < r["hematocrit"] < 44]
    cold = [t for r, t in mid if r["temperature"] < 27]
    warm = [t for r, t in mid if r["temperature"] > 35]
    assert statistics.mean(cold) > 1.15 * statistics.mean(warm)


def test_viscosity_is_learnable_from_the_raw_measurements() -> None:
    from sklearn.ensemble import HistGradientBoostingRegressor

    def frame(seed: int, meters: int) -> tuple[np.ndarray, np.ndarray]:
        x, y = [], []
        for i in range(meters):
            meter = ViscosityMeter(i, seed)
            for n in range(400):
                r = meter.sample(n)
                x.append([r["shear_rate"], r["shear_stress"], r["temperature"], r["hematocrit"]])
                y.append(meter.true_viscosity(n))
        return np.array(x), np.array(y)

    x_train, y_train = frame(1, 8)
    x_test, y_test = frame(2, 4)
    model = HistGradientBoostingRegressor(random_state=0).fit(x_train, y_train)
    mae = float(np.mean(np.abs(model.predict(x_test) - y_test)))
    baseline = float(np.mean(np.abs(y_test - np.mean(y_train))))
    assert mae < 0.3 * baseline, (mae, baseline)


def test_viscosity_references_label_the_samples_the_meters_sent() -> None:
    refs = viscosity_references(["viscosity-0000", "viscosity-0001"], 100, seed=3, every=10)
    assert len(refs) == 20 and {r["source"] for r in refs} == {"lab"}
    meter = ViscosityMeter(1, 3)
    sent = {meter.reading(T0)["sample_id"]: n for n in range(100)}
    for ref in refs:
        if ref["sample_id"] in sent:
            assert float(ref["viscosity"]) == pytest.approx(meter.true_viscosity(sent[ref["sample_id"]]), abs=1e-3)
    assert sum(r["sample_id"] in sent for r in refs) == 10
    with pytest.raises(InvalidInput, match="every 0"):
        viscosity_references(["v"], 1, seed=0, every=0)
