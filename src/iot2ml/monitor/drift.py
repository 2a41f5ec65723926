"""Per-feature, dataset and prediction drift of current data against a reference `Profile`.

Test selection is Evidently's default data drift rule, as written in
``evidently/calculations/stattests/registry.py::_get_default_stattest`` (github.com/evidentlyai/
evidently, ``src/evidently/calculations/stattests/registry.py``) and described in
https://docs-old.evidentlyai.com/reference/data-drift-algorithm. With ``n_unique`` the number of
distinct non-missing values in reference and current *together*:

==========  ==========================================  ======================================
ref. rows   column                                      test (drift when)
==========  ==========================================  ======================================
<= 1000     numeric, n_unique > 5                       two-sample KS (p < 0.05)
<= 1000     categorical or numeric, 2 < n_unique        chi-squared (p < 0.05)
            (numeric only when n_unique <= 5)
<= 1000     categorical or numeric, n_unique <= 2       two-proportion z-test (p < 0.05)
> 1000      numeric, n_unique > 5                       Wasserstein / std(reference) (>= 0.1)
> 1000      categorical, or numeric with n_unique <= 5  Jensen-Shannon distance, base 2, on
                                                        category shares (>= 0.1)
==========  ==========================================  ======================================

Dataset drift: share of drifted features >= 0.5 (Evidently's ``drift_share`` default). The
prediction column gets the same rule but is reported apart and is not counted in that share.

Where this module has to differ from Evidently, and why:

- "reference rows" is the reference's non-missing count of that column (Evidently drops missing
  values before testing too). Missing = null, NaN or ±inf.
- Tests read the reference from the profile. With the default ``sample_size=1000`` a reference of
  <= 1000 values is stored whole (float32), so KS / chi-squared / z are exact; a larger numeric
  reference is represented by its seeded 1000-value sample in the Wasserstein distance, while the
  normalising std is the exact reference std. Category and low-cardinality counts are exact.
- Constant reference (std 0): the norm is ``max(std, 0.001)``, exactly Evidently's guard, so any
  current spread above 1e-4 counts as drift; there is no division by zero.
- Chi-squared is the two-sample test of homogeneity (``scipy.stats.chi2_contingency`` on the
  2 x k table of reference and current counts, no continuity correction). Evidently instead runs a
  goodness-of-fit ``chisquare(current, reference_share * n_current)``, which treats the reference
  shares as exact; with 500 reference and 400 current rows from the *same* distribution that
  flags drift 22% of the time at p < 0.05 (measured over 2000 seeds; the contingency test: 4.9%).
  The selection rule and the 0.05 threshold are unchanged.
- Categories unseen in the reference simply enter the table with a reference count of 0 (one
  stray value does not flag drift, a real share does). When the profile kept only the top
  categories (it has an ``__other__`` count), current categories outside that list are counted as
  ``__other__``, because they cannot be told apart from the reference tail.
- PSI is always reported, never used for the decision. Evidently bins numeric PSI with Sturges
  bins over reference+current; a profile has no raw reference, so PSI uses the profile's quantile
  histogram (or exact value counts for <= 20 distinct values) and Evidently's zero-share fill.
- Current data with no usable values gives ``status="no_data"`` (not drifted, not counted), an
  all-missing reference gives ``status="no_reference"``; neither raises.

>>> import numpy as np
>>> from iot2ml.monitor.profile import build_profile
>>> rng = np.random.default_rng(0)
>>> ref = build_profile({"x": rng.normal(size=500)})
>>> report = detect_drift(ref, {"x": rng.normal(loc=1.0, size=500)})
>>> report.features[0].test, report.features[0].drifted, report.dataset_drift
('ks', True, True)
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from scipy import stats
from scipy.spatial import distance

from iot2ml.monitor.profile import (
    OTHER,
    CategoricalProfile,
    NumericProfile,
    Profile,
    as_table,
    bin_index,
    category_counts,
    finite_values,
    interior_cuts,
)

__all__ = [
    "DISTANCE_THRESHOLD",
    "DRIFT_SHARE",
    "P_VALUE_THRESHOLD",
    "SMALL_REFERENCE",
    "DriftReport",
    "FeatureDrift",
    "detect_drift",
    "psi",
    "select_test",
]

SMALL_REFERENCE = 1000
"""References with at most this many values use p-value tests, larger ones distances."""
P_VALUE_THRESHOLD = 0.05
DISTANCE_THRESHOLD = 0.1
DRIFT_SHARE = 0.5
_LOW_UNIQUE = 5
_STD_FLOOR = 0.001
_P_TESTS = frozenset({"ks", "chisquare", "z"})


@dataclass(frozen=True)
class FeatureDrift:
    """Drift result of one column.

    ``statistic`` is the test's own statistic (KS D, chi-squared, z) or the distance itself;
    ``score`` is what ``threshold`` is compared with: ``p_value`` for p-value tests (drift when
    below), ``distance`` for distances (drift when at or above).
    """

    feature: str
    kind: str
    test: str
    statistic: float | None
    p_value: float | None
    distance: float | None
    threshold: float
    drifted: bool
    psi: float | None
    n_reference: int
    n_current: int
    status: str = "ok"

    @property
    def score(self) -> float | None:
        return self.p_value if self.test in _P_TESTS else self.distance


@dataclass(frozen=True)
class DriftReport:
    """Drift of every checked feature, the dataset verdict and the prediction's drift."""

    features: tuple[FeatureDrift, ...]
    prediction: FeatureDrift | None
    share_drifted: float
    dataset_drift: bool
    drift_share: float
    n_current_rows: int
    status: str

    @property
    def drifted_features(self) -> list[str]:
        return [f.feature for f in self.features if f.drifted]

    def to_rows(self, **context: Any) -> list[dict[str, Any]]:
        """Flat rows for a ``monitor_reports`` table: one per feature, the prediction, and one
        ``scope="dataset"`` summary row. ``context`` (e.g. ``model=``, ``version=``,
        ``window_start=``) is copied into every row."""
        rows = [{**context, "scope": "feature", **asdict(f)} for f in self.features]
        if self.prediction is not None:
            rows.append({**context, "scope": "prediction", **asdict(self.prediction)})
        rows.append(
            {
                **context,
                "scope": "dataset",
                "feature": None,
                "kind": None,
                "test": "share_drifted",
                "statistic": self.share_drifted,
                "p_value": None,
                "distance": None,
                "threshold": self.drift_share,
                "drifted": self.dataset_drift,
                "psi": None,
                "n_reference": None,
                "n_current": self.n_current_rows,
                "status": self.status,
            }
        )
        return rows


def detect_drift(
    reference: Profile,
    current: pa.Table | Any,
    *,
    features: list[str] | None = None,
    prediction: str | None = None,
    p_threshold: float = P_VALUE_THRESHOLD,
    distance_threshold: float = DISTANCE_THRESHOLD,
    drift_share: float = DRIFT_SHARE,
) -> DriftReport:
    """Compare ``current`` (pyarrow Table, pandas DataFrame or dict of arrays) with ``reference``.

    ``features`` defaults to every profiled column except ``prediction``. A feature missing from
    ``current`` is reported with ``status="no_data"``.
    """
    table = as_table(current)
    if features is None:
        features = [c for c in reference.columns if c != prediction]
    unknown = [f for f in [*features, *([prediction] if prediction else [])]
               if f not in reference.columns]  # fmt: skip
    if unknown:
        raise KeyError(
            f"columns {unknown} are not in the reference profile "
            f"(profiled: {sorted(reference.columns)}): rebuild the profile with them"
        )
    kwargs = {"p_threshold": p_threshold, "distance_threshold": distance_threshold}
    results = tuple(
        _column_drift(name, reference.columns[name], table, **kwargs) for name in features
    )
    pred = (
        _column_drift(prediction, reference.columns[prediction], table, **kwargs)
        if prediction
        else None
    )
    tested = [r for r in results if r.status == "ok"]
    share = sum(r.drifted for r in tested) / len(tested) if tested else 0.0
    return DriftReport(
        features=results,
        prediction=pred,
        share_drifted=share,
        dataset_drift=bool(tested) and share >= drift_share,
        drift_share=drift_share,
        n_current_rows=table.num_rows,
        status="ok" if tested else "no_data",
    )


def select_test(kind: str, n_reference: int, n_unique: int) -> str:
    """Evidently's default test for a column (see the module docstring)."""
    if kind not in ("numeric", "categorical"):
        raise ValueError(f"kind {kind!r} is not supported: use 'numeric' or 'categorical'")
    if n_reference <= SMALL_REFERENCE:
        if kind == "numeric" and n_unique > _LOW_UNIQUE:
            return "ks"
        return "chisquare" if n_unique > 2 else "z"
    if kind == "numeric" and n_unique > _LOW_UNIQUE:
        return "wasserstein"
    return "jensenshannon"


def psi(reference_counts: np.ndarray, current_counts: np.ndarray) -> float:
    """Population Stability Index of two count vectors over the same bins.

    Empty bins get Evidently's fill: 0.0001, or min(non-zero share) / 1e6 when that is smaller.

    >>> round(psi(np.array([50, 50]), np.array([25, 75])), 4)
    0.2747
    """
    ref = _shares(np.asarray(reference_counts, dtype=np.float64))
    cur = _shares(np.asarray(current_counts, dtype=np.float64))
    return float(np.sum((ref - cur) * np.log(ref / cur)))


def _shares(counts: np.ndarray) -> np.ndarray:
    shares = counts / counts.sum()
    nonzero = shares[shares > 0]
    low = nonzero.min()
    return np.where(shares == 0, low / 1e6 if low <= 0.0001 else 0.0001, shares)


# -- per column ------------------------------------------------------------------------------


def _column_drift(
    name: str,
    ref: NumericProfile | CategoricalProfile,
    table: pa.Table,
    *,
    p_threshold: float,
    distance_threshold: float,
) -> FeatureDrift:
    present = name in table.column_names
    try:
        if isinstance(ref, NumericProfile):
            cur = finite_values(table.column(name)) if present else np.empty(0)
            n_cur = int(cur.size)
        else:
            cur_counts = category_counts(table.column(name)) if present else {}
            n_cur = sum(cur_counts.values())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise TypeError(
            f"column {name!r} has type {table.column(name).type} but the reference profiled it "
            f"as {ref.kind}: pass the same column types the profile was built from"
        ) from err

    def empty(status: str) -> FeatureDrift:
        return FeatureDrift(
            feature=name, kind=ref.kind, test="none", statistic=None, p_value=None,
            distance=None, threshold=float("nan"), drifted=False, psi=None,
            n_reference=ref.count, n_current=n_cur, status=status,
        )  # fmt: skip

    if ref.count == 0:
        return empty("no_reference")
    if n_cur == 0:
        return empty("no_data")

    if isinstance(ref, NumericProfile):
        n_unique, ref_counts, cur_counter = _numeric_counts(ref, cur)
        test = select_test("numeric", ref.count, n_unique)
        if test == "ks":
            statistic, p_value = _ks(ref.sample, cur)
        elif test == "wasserstein":
            norm = max(float(ref.std or 0.0), _STD_FLOOR)
            statistic = float(stats.wasserstein_distance(ref.sample.astype(np.float64), cur))
            statistic /= norm
            p_value = None
        else:
            statistic, p_value = _categorical_test(test, ref_counts, cur_counter)
        psi_value = _numeric_psi(ref, cur, ref_counts, cur_counter)
    else:
        ref_counts, cur_counter = _aligned_categories(ref, cur_counts)
        test = select_test("categorical", ref.count, len(ref_counts))
        statistic, p_value = _categorical_test(test, ref_counts, cur_counter)
        psi_value = psi(ref_counts, cur_counter)

    if test in _P_TESTS:
        threshold, dist = p_threshold, None
        drifted = bool(p_value < p_threshold)  # type: ignore[operator]
    else:
        threshold, dist = distance_threshold, statistic
        drifted = bool(statistic >= distance_threshold)
    return FeatureDrift(
        feature=name,
        kind=ref.kind,
        test=test,
        statistic=float(statistic),
        p_value=None if p_value is None else float(p_value),
        distance=dist,
        threshold=threshold,
        drifted=drifted,
        psi=psi_value,
        n_reference=ref.count,
        n_current=n_cur,
    )


def _numeric_counts(
    ref: NumericProfile, cur: np.ndarray
) -> tuple[int, np.ndarray, np.ndarray | None]:
    """``n_unique`` of reference+current, and aligned counts over the union of values when the
    union has <= 5 of them (else ``(n_unique, _, None)``).

    Only a reference with exact value counts and <= 5 distinct values can give such a union, so a
    large current column is only scanned with ``np.unique`` when that is possible.
    """
    if ref.value_counts is None or ref.distinct > _LOW_UNIQUE:
        return ref.distinct, np.empty(0), None
    cur_values, cur_n = np.unique(cur, return_counts=True)
    ref_values = np.array([v for v, _ in ref.value_counts])
    keys = np.union1d(ref_values, cur_values)
    if keys.size > _LOW_UNIQUE:
        return int(keys.size), np.empty(0), None
    ref_counts = np.zeros(keys.size)
    ref_counts[np.searchsorted(keys, ref_values)] = [n for _, n in ref.value_counts]
    cur_counts = np.zeros(keys.size)
    cur_counts[np.searchsorted(keys, cur_values)] = cur_n
    return int(keys.size), ref_counts, cur_counts


def _aligned_categories(
    ref: CategoricalProfile, cur_counts: dict[str, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Reference and current counts over sorted keys; see the module docstring for `OTHER`."""
    if ref.truncated:
        folded: dict[str, int] = {}
        for key, n in cur_counts.items():
            k = key if key in ref.frequencies else OTHER
            folded[k] = folded.get(k, 0) + n
        cur_counts = folded
    keys = sorted(set(ref.frequencies) | set(cur_counts))
    return (
        np.array([ref.frequencies.get(k, 0) for k in keys], dtype=np.float64),
        np.array([cur_counts.get(k, 0) for k in keys], dtype=np.float64),
    )


def _ks(sample: np.ndarray, cur: np.ndarray) -> tuple[float, float]:
    # silence "exact calculation unsuccessful": scipy falls back to the asymptotic p itself
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = stats.ks_2samp(sample.astype(np.float64), cur)
    return float(res.statistic), float(res.pvalue)


def _categorical_test(
    test: str, ref_counts: np.ndarray, cur_counts: np.ndarray
) -> tuple[float, float | None]:
    """Counts are aligned and keys sorted, so key 0 is Evidently's z-test reference key."""
    if test == "jensenshannon":
        ref_share = ref_counts / ref_counts.sum()
        cur_share = cur_counts / cur_counts.sum()
        return float(distance.jensenshannon(ref_share, cur_share, base=2)), None
    if test == "z":
        if ref_counts.size < 2:  # one value, the same on both sides
            return 0.0, 1.0
        n1, n2 = ref_counts.sum(), cur_counts.sum()
        p1, p2 = 1 - ref_counts[0] / n1, 1 - cur_counts[0] / n2
        pooled = (p1 * n1 + p2 * n2) / (n1 + n2)
        z = (p1 - p2) / np.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
        return float(z), float(2 * stats.norm.sf(abs(z)))
    res = stats.chi2_contingency(np.vstack([ref_counts, cur_counts]), correction=False)
    return float(res.statistic), float(res.pvalue)


def _numeric_psi(
    ref: NumericProfile, cur: np.ndarray, ref_counts: np.ndarray, cur_counts: np.ndarray | None
) -> float:
    if cur_counts is not None:
        return psi(ref_counts, cur_counts)
    cuts = interior_cuts(ref.bin_edges)
    current = np.bincount(bin_index(cuts, cur), minlength=cuts.size + 1)
    return psi(np.asarray(ref.bin_counts), current)
