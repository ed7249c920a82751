"""Input and prediction drift statistics: per-image features, PSI, Kolmogorov-Smirnov, MMD, hysteresis.

numpy only and self-contained (no package-relative imports): export copies this file verbatim next to the
Python-backend ``model.py`` of every model version, so the served model and ``python -m serve drift`` compute
the same features and tests. One definition, two users.

Features are computed on the model input (float32 C x H x W in [0, 1], after :func:`medops.preprocess`) and on the
model output (class probabilities). The reference profile stores the per-image feature values of the validation
split; a window of new images is compared with it feature by feature:

* PSI (population stability index) on reference-quantile bins, the effect size. The number of bins follows the
  two sample sizes (:func:`psi_bins`): the PSI of two samples of one distribution is about
  ``(1/n_reference + 1/n_window) * chi2(bins - 1)``, so ten bins on a 64-image window put sampling noise alone at
  the 0.2 alarm level in a large share of windows. The bins are now the most (2 to 10) whose 99.5th null
  percentile stays below the alarm level;
* the two-sample Kolmogorov-Smirnov test (chi-square test for the categorical predicted class), the significance,
  Bonferroni-corrected over the features;
* a feature drifts when it is both significant and large (PSI >= ``psi_threshold``), so big windows do not alarm
  on trivial shifts and small windows do not alarm on sampling noise;
* optionally the maximum mean discrepancy of penultimate-layer embeddings with a permutation test.

The ``medops_drift_score`` gauge (:attr:`DriftResult.score`, the largest PSI over the features) on clean traffic:
1,000 windows drawn from the same distribution as a fresh reference each time (four correlated intensity
features, two of them quantised like uint8 percentiles, and a binary predicted class; ``tests/medops/test_drift.py``
repeats it). Median / 95th percentile / share of windows at >= 0.2, before (``clip(n_reference // 15, 3, 10)``
bins) and now (:func:`psi_bins`), reference / window:

* 78 / 64: before 0.193 / 0.401 / 46.4 % (5 bins), now 0.064 / 0.175 / 3.7 % (2 bins);
* 78 / 256: before 0.112 / 0.215 / 7.5 % (5 bins), now 0.063 / 0.149 / 1.4 % (3 bins);
* 500 / 64: before 0.253 / 0.792 / 77.1 % (10 bins), now 0.065 / 0.153 / 1.6 % (3 bins);
* 500 / 256: 0.078 / 0.125 / 0.1 % both (10 bins).

Below about 50 images against a 78-image reference even two bins (the floor) leave the gauge noisy; the drift
verdict stays protected there by the significance test (it needs both).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

PROFILE_SCHEMA = "medops.drift_reference/1"
INTENSITY_FEATURES = ("intensity_mean", "intensity_std", "intensity_p05", "intensity_p95")
CLASS_FEATURE = "predicted_class"
PERCENTILE_PIXELS = 16384


@dataclass(frozen=True)
class DriftThresholds:
    """When a window counts as drifted. ``alpha`` is the family-wise significance over all features."""

    alpha: float = 0.01
    psi_threshold: float = 0.2
    min_window: int = 30
    mmd_alpha: float = 0.01

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> DriftThresholds:
        values = values or {}
        return cls(**{k: type(getattr(cls, k))(values[k]) for k in cls.__dataclass_fields__ if k in values})


# -- features ------------------------------------------------------------------------------------------------
def image_features(batch: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image intensity features of a float N x C x H x W batch in [0, 1]: mean, std, 5th/95th percentile,
    and the mean of every channel when there are several."""
    x = np.asarray(batch, dtype=np.float32)
    if x.ndim != 4:
        raise ValueError(f"expected an N x C x H x W batch, got shape {list(x.shape)}")
    flat = x.reshape(len(x), -1)
    # percentiles on a fixed-stride sample of at most ~16k pixels per image: the same estimate everywhere, and
    # cheap enough for the served model's hot path (224 px RGB: all pixels cost more than 10 % of inference)
    sample = flat[:, :: max(1, -(-flat.shape[1] // PERCENTILE_PIXELS))]
    p05, p95 = row_percentiles(sample, (5.0, 95.0)) if len(x) else (np.zeros(0), np.zeros(0))
    out = {"intensity_mean": flat.mean(axis=1), "intensity_std": flat.std(axis=1),
           "intensity_p05": np.asarray(p05), "intensity_p95": np.asarray(p95)}
    if x.shape[1] > 1:
        for c in range(x.shape[1]):
            out[f"channel{c}_mean"] = x[:, c].reshape(len(x), -1).mean(axis=1)
    return {k: v.astype(np.float64) for k, v in out.items()}


def row_percentiles(rows: np.ndarray, percents: Sequence[float]) -> np.ndarray:
    """``np.percentile(rows, percents, axis=1)`` (linear method), bit for bit, for a 2-D array without NaN.

    Written out because ``np.percentile`` along the last axis of many short rows moves that axis first and then
    partitions strided memory: 0.55 ms for 32 images of 28 x 28 against 0.11 ms for a contiguous row sort, and the
    served model computes these features on its hot path. The interpolation is numpy's own (``_lerp``), so the
    served and offline features stay identical to the reference profiles written before. Rows with NaN go to
    ``np.percentile`` (NaN propagates there).
    """
    x = np.asarray(rows)
    if x.ndim != 2 or x.shape[1] == 0 or (x.dtype.kind == "f" and np.isnan(x).any()):
        return np.asarray(np.percentile(x, list(percents), axis=1))
    n = x.shape[1]
    virtual = np.asarray(percents, dtype=np.float64) / 100.0 * (n - 1)
    low = np.floor(virtual).astype(np.intp)
    high = np.minimum(low + 1, n - 1)
    gamma = virtual - low
    ordered = np.sort(x, axis=1)
    a, b = ordered[:, low], ordered[:, high]
    diff = b - a
    out = np.asarray(a + diff * gamma)
    np.subtract(b, diff * (1 - gamma), out=out, where=gamma >= 0.5, casting="unsafe")
    return out.T


def prediction_features(probs: np.ndarray, class_names: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-image prediction features: the probability of every class (only the positive one for two classes)
    and the predicted class index (categorical)."""
    p = np.asarray(probs, dtype=np.float64)
    names = list(class_names)
    if p.ndim != 2 or p.shape[1] != len(names):
        raise ValueError(f"expected probabilities N x {len(names)}, got shape {list(p.shape)}")
    keep = range(1, 2) if len(names) == 2 else range(len(names))
    out = {f"prob_{safe_name(names[k])}": p[:, k] for k in keep}
    out[CLASS_FEATURE] = p.argmax(axis=1).astype(np.float64) if len(p) else np.zeros(0)
    return out


def size_features(sizes: np.ndarray) -> dict[str, np.ndarray]:
    """The stored (raw, before resizing) height and width of every image, from an N x 2 array. Only offline
    checks see raw sizes; the served model receives resized images."""
    hw = np.asarray(sizes, dtype=np.float64).reshape(-1, 2)
    return {"image_height": hw[:, 0], "image_width": hw[:, 1]}


def safe_name(text: str) -> str:
    """A class name as a metric/feature-name fragment: lower-case letters, digits and underscores."""
    cleaned = "".join(ch if ch.isalnum() else "_" for ch in str(text).lower()).strip("_")
    return cleaned or "class"


# -- statistics -----------------------------------------------------------------------------------------------
# 99.5th percentiles of the chi-square distribution with 1..9 degrees of freedom (bins - 1)
CHI2_995 = (7.879, 10.597, 12.838, 14.860, 16.750, 18.548, 20.278, 21.955, 23.589)
MAX_BINS = 10


def psi_bins(n_reference: int, n_current: int, alarm: float = 0.2) -> int:
    """The number of reference-quantile bins for a PSI of ``n_current`` values against ``n_reference``: the most
    (at most 10, at least 2) that keep two samples of one distribution below ``alarm`` in 99.5 % of windows.

    Under the null the PSI of ``B`` bins is about ``(1/n_reference + 1/n_current) * chi2(B - 1)`` (mean
    ``(B - 1) * (1/n_reference + 1/n_current)``), so ``B`` is the largest with ``chi2_0.995(B - 1) * (1/n_reference +
    1/n_current) <= alarm``: 2 bins for a 64-image window against a 78-image reference, 3 against 500, 10 for
    256 against 500 or more.
    """
    if n_reference < 1 or n_current < 1:
        return 2
    scale = 1.0 / n_reference + 1.0 / n_current
    fitting = [df + 1 for df, q in enumerate(CHI2_995, start=1) if q * scale <= alarm]
    return max(fitting) if fitting else 2


def psi(reference: np.ndarray, current: np.ndarray, bins: int | None = None, eps: float = 1e-4,
        alarm: float = 0.2) -> float:
    """Population stability index of ``current`` against ``reference`` on reference-quantile bins.

    ``bins`` defaults to :func:`psi_bins` of the two sample sizes and the ``alarm`` level (the drift threshold),
    so that sampling noise alone rarely reaches the alarm (see the module docstring for measured figures).
    """
    return _psi(PreparedReference(reference), current, bins, eps, alarm)


def _psi(ref: PreparedReference, current: np.ndarray, bins: int | None, eps: float, alarm: float) -> float:
    cur = np.asarray(current, dtype=np.float64)
    if len(ref.values) == 0 or len(cur) == 0:
        return float("nan")
    edges, ref_share = ref.bins(bins or psi_bins(len(ref.values), len(cur), alarm), eps)
    cur_share = np.bincount(np.searchsorted(edges, cur, side="right"), minlength=len(edges) + 1) / len(cur)
    cur_share = np.clip(cur_share, eps, None)
    return float(np.sum((cur_share - ref_share) * np.log(cur_share / ref_share)))


class PreparedReference:
    """One reference feature with what every comparison against it reuses: float64 values, sorted values, mean,
    and the quantile bins per bin count. The served model tests a fresh window every 32 images against a fixed
    reference; preparing it once takes the reference's quantiles and sort off that path."""

    def __init__(self, values: np.ndarray) -> None:
        self.source = values
        self.values = np.asarray(values, dtype=np.float64)
        self._bins: dict[tuple[int, float], tuple[np.ndarray, np.ndarray]] = {}

    @cached_property
    def sorted(self) -> np.ndarray:
        return np.sort(self.values)

    @cached_property
    def mean(self) -> float:
        return float(self.values.mean()) if len(self.values) else float("nan")

    def bins(self, count: int, eps: float) -> tuple[np.ndarray, np.ndarray]:
        """The inner edges of ``count`` reference-quantile bins and the reference's share in each (floored at
        ``eps``)."""
        key = (count, eps)
        if key not in self._bins:
            edges = np.unique(np.quantile(self.values, np.linspace(0, 1, count + 1)[1:-1]))
            share = np.bincount(np.searchsorted(edges, self.values, side="right"),
                                minlength=len(edges) + 1) / len(self.values)
            self._bins[key] = edges, np.clip(share, eps, None)
        return self._bins[key]


def categorical_psi(reference: np.ndarray, current: np.ndarray, categories: int, eps: float = 1e-4) -> float:
    """PSI of two samples of category indices 0..categories-1."""
    ref = np.bincount(np.asarray(reference, dtype=np.int64), minlength=categories)[:categories] / max(1, len(reference))
    cur = np.bincount(np.asarray(current, dtype=np.int64), minlength=categories)[:categories] / max(1, len(current))
    ref, cur = np.clip(ref, eps, None), np.clip(cur, eps, None)
    return float(np.sum((cur - ref) * np.log(cur / ref)))


def ks_2samp(reference: np.ndarray, current: np.ndarray) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov statistic D and its asymptotic p-value (Stephens' small-sample correction)."""
    return _ks(np.sort(np.asarray(reference, dtype=np.float64)), current)


def _ks(a: np.ndarray, current: np.ndarray) -> tuple[float, float]:
    """:func:`ks_2samp` against an already sorted float64 reference ``a``."""
    b = np.sort(np.asarray(current, dtype=np.float64))
    if len(a) == 0 or len(b) == 0:
        return float("nan"), float("nan")
    values = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, values, side="right") / len(a)
    cdf_b = np.searchsorted(b, values, side="right") / len(b)
    d = float(np.max(np.abs(cdf_a - cdf_b)))
    ne = len(a) * len(b) / (len(a) + len(b))
    lam = (math.sqrt(ne) + 0.12 + 0.11 / math.sqrt(ne)) * d
    return d, _kolmogorov_q(lam)


def _kolmogorov_q(lam: float) -> float:
    """P(K > lam) for the Kolmogorov distribution."""
    if lam < 1e-3:
        return 1.0
    total = 0.0
    for k in range(1, 101):
        term = 2.0 * (-1) ** (k - 1) * math.exp(-2.0 * k * k * lam * lam)
        total += term
        if abs(term) < 1e-12:
            break
    return float(min(1.0, max(0.0, total)))


def chi2_pvalue(reference: np.ndarray, current: np.ndarray, categories: int) -> float:
    """p-value of Pearson's chi-square test that two category samples share one distribution."""
    ref = np.bincount(np.asarray(reference, dtype=np.int64), minlength=categories)[:categories].astype(np.float64)
    cur = np.bincount(np.asarray(current, dtype=np.int64), minlength=categories)[:categories].astype(np.float64)
    table = np.stack([ref, cur])
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2 or table.sum(axis=1).min() == 0:
        return 1.0
    expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0, keepdims=True) / table.sum()
    stat = float(np.sum((table - expected) ** 2 / expected))
    return _chi2_sf(stat, table.shape[1] - 1)


def _chi2_sf(x: float, dof: int) -> float:
    """Survival function of the chi-square distribution (regularised upper incomplete gamma, series/fraction)."""
    if x <= 0:
        return 1.0
    a, z = dof / 2.0, x / 2.0
    if z < a + 1:  # series for the lower incomplete gamma
        term = total = 1.0 / a
        n = a
        for _ in range(500):
            n += 1
            term *= z / n
            total += term
            if abs(term) < abs(total) * 1e-14:
                break
        return float(max(0.0, 1.0 - total * math.exp(-z + a * math.log(z) - math.lgamma(a))))
    b, c, d = z + 1 - a, 1e300, 1 / (z + 1 - a)  # Lentz continued fraction for the upper incomplete gamma
    h = d
    for i in range(1, 500):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = 1e-300 if abs(d) < 1e-300 else d
        c = b + an / c
        c = 1e-300 if abs(c) < 1e-300 else c
        d = 1 / d
        h *= d * c
        if abs(d * c - 1) < 1e-14:
            break
    return float(min(1.0, math.exp(-z + a * math.log(z) - math.lgamma(a)) * h))


def mmd_test(reference: np.ndarray, current: np.ndarray, permutations: int = 200, seed: int = 0,
             max_samples: int = 400) -> tuple[float, float]:
    """Squared maximum mean discrepancy (RBF kernel, median-distance bandwidth) and its permutation p-value."""
    rng = np.random.default_rng(seed)
    x = np.asarray(reference, dtype=np.float64)
    y = np.asarray(current, dtype=np.float64)
    if len(x) < 2 or len(y) < 2:
        return float("nan"), float("nan")
    if len(x) > max_samples:
        x = x[rng.choice(len(x), max_samples, replace=False)]
    if len(y) > max_samples:
        y = y[rng.choice(len(y), max_samples, replace=False)]
    z = np.concatenate([x, y]).reshape(len(x) + len(y), -1)
    sq = np.sum(z * z, axis=1)
    dist2 = np.maximum(sq[:, None] + sq[None, :] - 2 * z @ z.T, 0.0)
    positive = dist2[np.triu_indices(len(z), 1)]
    positive = positive[positive > 0]
    bandwidth = float(np.median(positive)) if len(positive) else 1.0
    kernel = np.exp(-dist2 / bandwidth)
    n = len(x)

    def statistic(order: np.ndarray) -> float:
        k = kernel[np.ix_(order, order)]
        kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
        m = len(order) - n
        return float((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                     - 2 * kxy.mean())

    observed = statistic(np.arange(len(z)))
    null = [statistic(rng.permutation(len(z))) for _ in range(permutations)]
    p_value = (1 + sum(v >= observed for v in null)) / (permutations + 1)
    return observed, float(p_value)


# -- comparison ----------------------------------------------------------------------------------------------
@dataclass
class FeatureDrift:
    feature: str
    psi: float
    statistic: float
    p_value: float
    test: str
    drifted: bool
    reference_mean: float
    current_mean: float

    def as_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in self.__dict__.items()}


@dataclass
class DriftResult:
    verdict: str  # "drift", "no drift" or "insufficient data"
    n_reference: int
    n_current: int
    features: list[FeatureDrift] = field(default_factory=list)
    embedding: dict[str, Any] | None = None
    thresholds: DriftThresholds = field(default_factory=DriftThresholds)

    @property
    def drifted(self) -> bool:
        return self.verdict == "drift"

    @property
    def score(self) -> float:
        """The largest PSI among the features (0 when there is none): one number for dashboards."""
        values = [f.psi for f in self.features if not math.isnan(f.psi)]
        return float(max(values)) if values else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "drifted": self.drifted, "score": self.score,
                "n_reference": self.n_reference, "n_current": self.n_current,
                "thresholds": dict(self.thresholds.__dict__), "features": [f.as_dict() for f in self.features],
                "embedding": self.embedding}


def compare(reference: Mapping[str, np.ndarray], current: Mapping[str, np.ndarray], *, num_classes: int,
            thresholds: DriftThresholds | None = None, reference_embeddings: np.ndarray | None = None,
            current_embeddings: np.ndarray | None = None, seed: int = 0,
            cache: dict[str, PreparedReference] | None = None) -> DriftResult:
    """Compare a window of per-image features with the reference profile, feature by feature.

    Only features present in both are compared. Categorical features (the predicted class, ``image_size``) use
    the chi-square test; the others Kolmogorov-Smirnov. The Bonferroni-corrected level is ``alpha / features``.
    ``cache`` (a dict the caller keeps between calls against the same reference) holds each reference feature
    prepared once (:class:`PreparedReference`); the results are the same with or without it.
    """
    th = thresholds or DriftThresholds()
    names = [k for k in reference if k in current]
    n_ref = int(len(reference[names[0]])) if names else 0
    n_cur = int(len(current[names[0]])) if names else 0
    if n_cur < th.min_window or not names:
        return DriftResult("insufficient data", n_ref, n_cur, thresholds=th)
    level = th.alpha / len(names)
    cache = {} if cache is None else cache
    results = []
    for name in names:
        if name not in cache or cache[name].source is not reference[name]:
            cache[name] = PreparedReference(reference[name])
        results.append(_compare_feature(name, cache[name], np.asarray(current[name], np.float64), num_classes,
                                        th, level))
    embedding = None
    if reference_embeddings is not None and current_embeddings is not None and len(reference_embeddings) > 1:
        mmd2, p = mmd_test(reference_embeddings, current_embeddings, seed=seed)
        embedding = {"mmd2": mmd2, "p_value": p, "drifted": bool(p < th.mmd_alpha), "dim": int(
            np.asarray(reference_embeddings).reshape(len(reference_embeddings), -1).shape[1])}
    any_drift = any(f.drifted for f in results) or bool(embedding and embedding["drifted"])
    return DriftResult("drift" if any_drift else "no drift", n_ref, n_cur, results, embedding, th)


def _compare_feature(name: str, ref: PreparedReference, cur: np.ndarray, num_classes: int, th: DriftThresholds,
                     level: float) -> FeatureDrift:
    """One feature's PSI, test and verdict (drifted when both significant at ``level`` and large)."""
    if name in (CLASS_FEATURE, "image_size"):
        cats = int(max(num_classes if name == CLASS_FEATURE else 0, ref.values.max(initial=0) + 1,
                       cur.max(initial=0) + 1))
        value, stat = categorical_psi(ref.values, cur, cats), float("nan")
        p, test = chi2_pvalue(ref.values, cur, cats), "chi2"
    else:
        value = _psi(ref, cur, None, 1e-4, th.psi_threshold)
        stat, p = _ks(ref.sorted, cur)
        test = "ks"
    drifted = bool(p < level and value >= th.psi_threshold)
    return FeatureDrift(name, value, stat, p, test, drifted, ref.mean, float(cur.mean()))


class Hysteresis:
    """An alarm that turns on after ``on`` consecutive drifted checks and off after ``off`` clean ones."""

    def __init__(self, on: int = 2, off: int = 3) -> None:
        if on < 1 or off < 1:
            raise ValueError("on and off must be >= 1")
        self.on, self.off = on, off
        self.active = False
        self._streak = 0

    def update(self, drifted: bool) -> bool:
        if drifted != self.active:
            self._streak += 1
            if self._streak >= (self.on if drifted else self.off):
                self.active, self._streak = bool(drifted), 0
        else:
            self._streak = 0
        return self.active


# -- reference profile (npz) ---------------------------------------------------------------------------------
def save_profile(path: str, features: Mapping[str, np.ndarray], *, class_names: Sequence[str],
                 pixel_histogram: np.ndarray, embeddings: np.ndarray | None = None,
                 source: str = "") -> None:
    """Write the reference profile: per-image features (``f_<name>``), the pooled 64-bin pixel histogram,
    optional embeddings, and a little metadata."""
    arrays: dict[str, Any] = {f"f_{k}": np.asarray(v, np.float64) for k, v in features.items()}
    arrays["pixel_histogram"] = np.asarray(pixel_histogram, np.float64)
    arrays["class_names"] = np.asarray(list(class_names))
    arrays["schema"] = np.asarray(PROFILE_SCHEMA)
    arrays["source"] = np.asarray(source)
    if embeddings is not None:
        arrays["embeddings"] = np.asarray(embeddings, np.float32)
    with open(path, "wb") as fh:
        np.savez_compressed(fh, **arrays)


def load_profile(path: str) -> dict[str, Any]:
    """The profile written by :func:`save_profile`: ``features`` (dict), ``pixel_histogram``, ``class_names``,
    ``embeddings`` (or None), ``source``."""
    with np.load(path, allow_pickle=False) as data:
        if str(data["schema"]) != PROFILE_SCHEMA:
            raise ValueError(f"{path}: not a {PROFILE_SCHEMA} file")
        return {"features": {k[2:]: data[k] for k in data.files if k.startswith("f_")},
                "pixel_histogram": data["pixel_histogram"], "class_names": [str(c) for c in data["class_names"]],
                "embeddings": data["embeddings"] if "embeddings" in data.files else None,
                "source": str(data["source"])}


def pixel_histogram(batch: np.ndarray, bins: int = 64) -> np.ndarray:
    """Share of all pixel values of a [0, 1] batch in ``bins`` equal bins."""
    counts, _ = np.histogram(np.clip(np.asarray(batch, np.float64), 0, 1), bins=bins, range=(0.0, 1.0))
    return counts / max(1, counts.sum())
