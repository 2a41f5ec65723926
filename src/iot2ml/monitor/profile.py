"""Reference profile of a feature table: the statistics drift checks compare against.

A `Profile` is built once, at training time, from the training features and stored next to the
model. It is small (about 7 KB per numeric column with the defaults, so ~350 KB for 50 features)
and JSON-serialisable, so drift can be checked later without the training data:

- numeric columns: count, null count (nulls, NaN and ±inf all count as missing), mean, std
  (population, ``ddof=0``), min, max, quantiles at `QUANTILE_LEVELS`, a histogram on quantile-based
  edges, the number of distinct values (with exact value counts when there are at most
  `LOW_CARDINALITY` of them) and a seeded uniform sample of at most ``sample_size`` values
  (float32, base64 in JSON) for two-sample tests;
- categorical columns (strings, dictionaries, booleans): counts of the ``top_k`` most frequent
  categories plus one ``__other__`` count for the rest.

Columns of other types (timestamps, lists, ...) are not profiled; their names are kept in
`Profile.skipped`. Everything is computed with numpy/pyarrow kernels, never row by row.

>>> import pyarrow as pa
>>> p = build_profile(pa.table({"t": [1.0, 2.0, None, 4.0], "s": ["a", "b", "a", None]}))
>>> p.columns["t"].count, p.columns["t"].null_count, p.columns["s"].frequencies
(3, 1, {'a': 2, 'b': 1})
>>> Profile.from_json(p.to_json()) == p
True
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = [
    "LOW_CARDINALITY",
    "OTHER",
    "QUANTILE_LEVELS",
    "CategoricalProfile",
    "NumericProfile",
    "Profile",
    "build_profile",
]

FORMAT_VERSION = 1
OTHER = "__other__"
"""Category key that collects every category outside a profile's top ``top_k``."""
QUANTILE_LEVELS: tuple[float, ...] = (
    0.0, 0.01, 0.025, 0.05, 0.1, 0.2, 0.25, 0.3, 0.4, 0.5,
    0.6, 0.7, 0.75, 0.8, 0.9, 0.95, 0.975, 0.99, 1.0,
)  # fmt: skip
LOW_CARDINALITY = 20
"""Numeric columns with at most this many distinct values keep exact value counts."""


@dataclass(frozen=True, eq=False)
class NumericProfile:
    """Summary of one numeric column (missing = null, NaN or ±inf)."""

    count: int
    null_count: int
    mean: float | None
    std: float | None
    min: float | None
    max: float | None
    distinct: int
    quantiles: tuple[float, ...]
    bin_edges: tuple[float, ...]
    bin_counts: tuple[int, ...]
    value_counts: tuple[tuple[float, int], ...] | None
    sample: np.ndarray = field(repr=False)

    kind = "numeric"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NumericProfile):
            return NotImplemented
        return _numeric_dict(self) == _numeric_dict(other)


@dataclass(frozen=True)
class CategoricalProfile:
    """Category counts of one categorical column; `OTHER` holds the tail beyond ``top_k``."""

    count: int
    null_count: int
    distinct: int
    frequencies: dict[str, int]

    kind = "categorical"

    @property
    def truncated(self) -> bool:
        """True when some categories were folded into `OTHER`."""
        return OTHER in self.frequencies


ColumnProfile = NumericProfile | CategoricalProfile


@dataclass(frozen=True)
class Profile:
    """Reference statistics of a feature table, keyed by column name."""

    n_rows: int
    columns: dict[str, ColumnProfile]
    sample_size: int
    seed: int
    skipped: tuple[str, ...] = ()

    def to_json(self) -> str:
        """Serialise to a compact JSON string (`from_json` reads it back)."""
        cols: dict[str, Any] = {}
        for name, col in self.columns.items():
            if isinstance(col, NumericProfile):
                cols[name] = _numeric_dict(col)
            else:
                cols[name] = {
                    "kind": "categorical",
                    "count": col.count,
                    "null_count": col.null_count,
                    "distinct": col.distinct,
                    "frequencies": col.frequencies,
                }
        doc = {
            "format": FORMAT_VERSION,
            "n_rows": self.n_rows,
            "sample_size": self.sample_size,
            "seed": self.seed,
            "skipped": list(self.skipped),
            "columns": cols,
        }
        return json.dumps(doc, separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> Profile:
        """Read a profile written by `to_json`."""
        doc = json.loads(text)
        if doc.get("format") != FORMAT_VERSION:
            raise ValueError(
                f"profile format {doc.get('format')!r} is not supported "
                f"(expected {FORMAT_VERSION}): rebuild the profile with this version of iot2ml"
            )
        columns: dict[str, ColumnProfile] = {}
        for name, c in doc["columns"].items():
            if c["kind"] == "numeric":
                raw = base64.b64decode(c["sample"])
                vc = c["value_counts"]
                columns[name] = NumericProfile(
                    count=c["count"],
                    null_count=c["null_count"],
                    mean=c["mean"],
                    std=c["std"],
                    min=c["min"],
                    max=c["max"],
                    distinct=c["distinct"],
                    quantiles=tuple(c["quantiles"]),
                    bin_edges=tuple(c["bin_edges"]),
                    bin_counts=tuple(c["bin_counts"]),
                    value_counts=None if vc is None else tuple((float(v), int(n)) for v, n in vc),
                    sample=np.frombuffer(raw, dtype="<f4").copy(),
                )
            else:
                columns[name] = CategoricalProfile(
                    count=c["count"],
                    null_count=c["null_count"],
                    distinct=c["distinct"],
                    frequencies=dict(c["frequencies"]),
                )
        return cls(
            n_rows=doc["n_rows"],
            columns=columns,
            sample_size=doc["sample_size"],
            seed=doc["seed"],
            skipped=tuple(doc["skipped"]),
        )


def build_profile(
    data: pa.Table | Any,
    *,
    columns: list[str] | None = None,
    sample_size: int = 1000,
    top_k: int = 100,
    bins: int = 20,
    seed: int = 0,
) -> Profile:
    """Profile ``data`` (pyarrow Table, pandas DataFrame or mapping of name -> array).

    ``sample_size`` defaults to 1000, Evidently's small-data limit: a reference of at most 1000
    rows is kept whole, so the small-data tests (KS, chi-squared, z) see exactly the reference.
    """
    if sample_size < 1 or top_k < 1 or bins < 1:
        raise ValueError(
            f"sample_size={sample_size}, top_k={top_k}, bins={bins}: each must be at least 1"
        )
    table = as_table(data)
    names = table.column_names if columns is None else columns
    rng = np.random.default_rng(seed)
    profiled: dict[str, ColumnProfile] = {}
    skipped: list[str] = []
    for name in names:
        if name not in table.column_names:
            raise KeyError(f"column {name!r} is not in the data (columns: {table.column_names})")
        col = table.column(name)
        if is_numeric(col.type):
            profiled[name] = _profile_numeric(col, sample_size=sample_size, bins=bins, rng=rng)
        elif is_categorical(col.type):
            profiled[name] = _profile_categorical(col, top_k=top_k)
        else:
            skipped.append(name)
    return Profile(
        n_rows=table.num_rows,
        columns=profiled,
        sample_size=sample_size,
        seed=seed,
        skipped=tuple(skipped),
    )


# -- helpers shared with drift.py (same package) -------------------------------------------


def as_table(data: Any) -> pa.Table:
    """Accept a pyarrow Table/RecordBatch, a pandas DataFrame or a mapping of name -> array."""
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data])
    if isinstance(data, Mapping):
        return pa.table({str(k): _as_array(v) for k, v in data.items()})
    if type(data).__module__.startswith("pandas"):
        return pa.Table.from_pandas(data, preserve_index=False)
    raise TypeError(
        f"data of type {type(data).__name__} is not supported: "
        "pass a pyarrow Table, a pandas DataFrame or a dict of column -> array"
    )


def _as_array(values: Any) -> pa.Array | pa.ChunkedArray:
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return values
    return pa.array(np.asarray(values) if not isinstance(values, list) else values)


def is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)


def is_categorical(t: pa.DataType) -> bool:
    return (
        pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_dictionary(t)
        or pa.types.is_boolean(t)
    )


def finite_values(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Non-missing values as float64 (nulls, NaN and ±inf dropped, as Evidently does)."""
    arr = pc.drop_null(col)
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    values = arr.cast(pa.float64()).to_numpy(zero_copy_only=False)
    return values[np.isfinite(values)]


def category_counts(col: pa.Array | pa.ChunkedArray) -> dict[str, int]:
    """Counts of each non-null category, keys as strings."""
    if pa.types.is_dictionary(col.type):
        col = pc.cast(col, col.type.value_type)
    strings = pc.drop_null(pc.cast(col, pa.string()))
    vc = pc.value_counts(strings)
    keys = vc.field("values").to_pylist()
    counts = vc.field("counts").to_pylist()
    return dict(zip(keys, counts))


def bin_index(cuts: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Bin of each value given the interior cut points; bin i is [cut[i-1], cut[i])."""
    return np.searchsorted(cuts, values, side="right")


def interior_cuts(edges: tuple[float, ...]) -> np.ndarray:
    return np.asarray(edges[1:-1], dtype=np.float64)


def _profile_numeric(
    col: pa.Array | pa.ChunkedArray, *, sample_size: int, bins: int, rng: np.random.Generator
) -> NumericProfile:
    values = finite_values(col)
    n = int(values.size)
    missing = len(col) - n
    if n == 0:
        return NumericProfile(
            count=0, null_count=missing, mean=None, std=None, min=None, max=None, distinct=0,
            quantiles=(), bin_edges=(), bin_counts=(), value_counts=None,
            sample=np.empty(0, dtype=np.float32),
        )  # fmt: skip
    uniq, ucounts = np.unique(values, return_counts=True)
    value_counts = (
        tuple((float(v), int(c)) for v, c in zip(uniq, ucounts))
        if uniq.size <= LOW_CARDINALITY
        else None
    )
    edges = np.unique(np.quantile(values, np.linspace(0.0, 1.0, bins + 1)))
    cuts = edges[1:-1]
    counts = np.bincount(bin_index(cuts, values), minlength=cuts.size + 1)
    sample = values if n <= sample_size else rng.choice(values, size=sample_size, replace=False)
    return NumericProfile(
        count=n,
        null_count=missing,
        mean=float(values.mean()),
        std=float(values.std()),
        min=float(uniq[0]),
        max=float(uniq[-1]),
        distinct=int(uniq.size),
        quantiles=tuple(float(q) for q in np.quantile(values, QUANTILE_LEVELS)),
        bin_edges=tuple(float(e) for e in edges),
        bin_counts=tuple(int(c) for c in counts),
        value_counts=value_counts,
        sample=sample.astype(np.float32),
    )


def _profile_categorical(col: pa.Array | pa.ChunkedArray, *, top_k: int) -> CategoricalProfile:
    counts = category_counts(col)
    n = sum(counts.values())
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    freqs = dict(ranked[:top_k])
    rest = sum(c for _, c in ranked[top_k:])
    if rest:
        freqs[OTHER] = freqs.get(OTHER, 0) + rest
    return CategoricalProfile(
        count=n, null_count=len(col) - n, distinct=len(counts), frequencies=freqs
    )


def _numeric_dict(col: NumericProfile) -> dict[str, Any]:
    return {
        "kind": "numeric",
        "count": col.count,
        "null_count": col.null_count,
        "mean": col.mean,
        "std": col.std,
        "min": col.min,
        "max": col.max,
        "distinct": col.distinct,
        "quantiles": list(col.quantiles),
        "bin_edges": list(col.bin_edges),
        "bin_counts": list(col.bin_counts),
        "value_counts": None if col.value_counts is None else [list(p) for p in col.value_counts],
        "sample": base64.b64encode(np.asarray(col.sample, dtype="<f4").tobytes()).decode("ascii"),
    }
