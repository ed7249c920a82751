"""Data-quality checks of a training dataset, with the same data config as training.

``python -m datatools.validate_data [data=folder data.path=...]`` writes ``report.json``, ``report.md`` and
``report.html`` into ``output_dir`` (default: the Hydra run folder), prints a summary and exits 1 on
leakage (exact duplicates across splits, a patient in two splits), corrupt files or label problems, unless
``data.validation.allow_leakage=true`` / ``allow_corrupt=true`` / ``allow_label_issues=true``.

Checks: counts per split and class and the class-imbalance ratio; label values that are no usable class
(spelling variants, missing-value markers such as ``NaN``, classes with too few images: :func:`check_labels`;
violations unless ``data.validation.allow_label_issues=true``); unreadable or empty files (path and reason);
image geometry and, for folders, the distribution of original sizes with outliers; exact duplicates (pixel hash)
within and across splits (within a split with conflicting labels: a label violation); near-duplicates across
splits (dHash candidates found by multi-index hashing, confirmed by pixel correlation:
:func:`check_near_duplicates`, shown side by side in the HTML report); patients/studies in more than one split
(CSV ``patient_id`` or ``study_id``); intensity statistics per split and a shift warning when the standardized
mean difference of per-image means exceeds ``shift_threshold``. Training runs the same checks after loading the
data (:func:`run_validation`).
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import logging
import sys
from collections import Counter, defaultdict
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from medops.datasets import (
    SPLITS,
    DataError,
    FolderDataset,
    MedMNISTFile,
    SplitArrays,
    label_counts,
    source_from_config,
)

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "enabled": True,
    "allow_leakage": False,
    "allow_corrupt": False,
    "allow_label_issues": False,  # true: label problems (check_labels, conflicting duplicates) warn instead of failing
    "near_duplicates": "auto",  # auto/true: always (any size); false: never
    "near_duplicate_hamming": 6,  # hash candidates: dHash Hamming distance (horizontal or vertical hash)
    "near_duplicate_max_shift": 1,  # px: shifted copies hashed and correlated at up to this shift
    "near_duplicate_min_correlation": 0.95,  # confirmed: pixel correlation at stored resolution of at least this
    "near_duplicate_max_candidates": 1_000_000,  # candidate pairs correlated at most (closest hashes first)
    "near_duplicate_leakage": False,  # true: confirmed near-duplicates are leakage (fail unless allow_leakage)
    "shift_threshold": 0.5,
    "max_listed": 50,  # examples listed per finding in the reports
}


def validation_settings(cfg: Any | None) -> dict[str, Any]:
    """``DEFAULTS`` updated with a ``data.validation`` mapping (DictConfig or dict; unknown keys rejected)."""
    given = dict(cfg or {})
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise DataError(f"data.validation: unknown settings {unknown}; known: {sorted(DEFAULTS)}")
    return {**DEFAULTS, **given}


# ----------------------------------------------------------------------------------------- gathering


def gather(dm: FolderDataset | MedMNISTFile | Any) -> tuple[SplitArrays | None, list[tuple[str, str]], dict[str, Any]]:
    """The data as loaded (before any fold split), the unreadable files ``(path, reason)`` and file metadata.

    A folder/CSV module is scanned file by file (unreadable files are reported, not raised); for other
    modules a load failure becomes one error naming the source.
    """
    scan = getattr(dm, "scan", None)
    if callable(scan):
        result = scan()
        return result.data, list(result.errors), dm.file_meta()  # type: ignore[attr-defined]
    try:
        return dm.load(), [], {}
    except DataError as exc:
        return None, [(str(getattr(dm, "path", "data")), str(exc))], {}


# ------------------------------------------------------------------------------------------- hashing


def pixel_hashes(images: np.ndarray) -> list[str]:
    """SHA-256 (hex, first 32 chars) of each image's shape, dtype and pixel bytes (no label)."""
    out = []
    for img in images:
        h = hashlib.sha256(f"{img.dtype.str}|{img.shape}\n".encode())
        h.update(np.ascontiguousarray(img).tobytes())
        out.append(h.hexdigest()[:32])
    return out


# Near-duplicate hashing: 64-bit difference hashes from box means of an integral image, so that the hashes of
# shifted copies (the probes) cost a few gathers, not a pass over the pixels.
NEAR_SMOOTH = 0.3  # hash bins widened by this fraction of their width on each side (a box blur against noise)
NEAR_MARGIN = 4.0  # grey levels: a bit is set only when the right (lower) bin is brighter by more than this
_M1, _M2, _M4 = np.uint64(0x5555555555555555), np.uint64(0x3333333333333333), np.uint64(0x0F0F0F0F0F0F0F0F)
_H01 = np.uint64(0x0101010101010101)


def _integral(images: np.ndarray) -> np.ndarray:
    """Summed-area tables (N x (H+1) x (W+1), int64) of the channel sums of N x H x W [x C] images."""
    grey = images.sum(axis=-1, dtype=np.int64) if images.ndim == 4 else images.astype(np.int64)
    out = np.zeros((len(grey), grey.shape[1] + 1, grey.shape[2] + 1), dtype=np.int64)
    np.cumsum(grey, axis=1, out=out[:, 1:, 1:])
    np.cumsum(out[:, 1:, 1:], axis=2, out=out[:, 1:, 1:])
    return out


def _edges(n: int, bins: int, smooth: float, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """Start/end pixel of ``bins`` equal bins over ``n`` pixels, widened by ``smooth`` bin widths on each side and
    moved by ``offset`` pixels (clipped to the image; every bin keeps at least one pixel)."""
    edges = np.linspace(0, n, bins + 1)
    pad = smooth * n / bins
    starts = np.clip(np.floor(edges[:-1] - pad).astype(int) + offset, 0, n - 1)
    ends = np.clip(np.ceil(edges[1:] + pad).astype(int) + offset, starts + 1, n)
    return starts, ends


Edges = tuple[np.ndarray, np.ndarray]


def _box_means(table: np.ndarray, rows: Edges, cols: Edges) -> np.ndarray:
    """Means over the boxes ``rows`` x ``cols`` (start/end arrays) from summed-area tables: N x R x C."""
    (r0, r1), (c0, c1) = rows, cols
    sums = (table[:, r1[:, None], c1[None, :]] - table[:, r0[:, None], c1[None, :]]
            - table[:, r1[:, None], c0[None, :]] + table[:, r0[:, None], c0[None, :]])
    return np.ascontiguousarray(sums / ((r1 - r0)[:, None] * (c1 - c0)[None, :]))


def _pack(bits: np.ndarray) -> np.ndarray:
    packed = np.ascontiguousarray(np.packbits(bits.reshape(len(bits), 64), axis=1))
    return packed.view(">u8").reshape(-1).astype(np.uint64)


def _dhash_table(table: np.ndarray, channels: int, smooth: float, margin: float, vertical: bool,
                 offset: tuple[int, int]) -> np.ndarray:
    h, w = table.shape[1] - 1, table.shape[2] - 1
    rows = _edges(h, 9 if vertical else 8, smooth, -offset[0])
    cols = _edges(w, 8 if vertical else 9, smooth, -offset[1])
    small = _box_means(table, rows, cols)
    if vertical:  # relative to the row's mean change: images of one kind share their top-to-bottom gradient
        diff = small[:, 1:, :] - small[:, :-1, :]
        diff -= diff.mean(axis=2, keepdims=True)
    else:
        diff = small[:, :, 1:] - small[:, :, :-1]
    return _pack(diff > margin * channels)


def dhash(images: np.ndarray, *, smooth: float = 0.0, margin: float = 0.0, vertical: bool = False,
          offset: tuple[int, int] = (0, 0)) -> np.ndarray:
    """64-bit difference hashes (uint64) of N x H x W [x C] images: grey 8 x 9 box means, bit = right > left.

    ``smooth`` widens the boxes by that fraction of their width on each side (a blur), ``margin`` (grey levels)
    sets a bit only when the right box is brighter by more than that, so flat regions hash to 0 instead of to
    their noise; ``vertical``: 9 x 8 boxes, bit = the lower box brighter than the upper one by more than the mean
    of that row of changes (images of one kind share a top-to-bottom gradient, which would set the same bits in
    all); ``offset`` (dy, dx): the hash of the image shifted by that many pixels (edge pixels repeated, roughly).
    The defaults are the classic dHash.
    """
    channels = images.shape[-1] if images.ndim == 4 else 1
    step = max(1, 2**23 // max(1, images[0].size))  # bounded memory for large images
    return np.concatenate([_dhash_table(_integral(images[s:s + step]), channels, smooth, margin, vertical, offset)
                           for s in range(0, len(images), step)] or [np.zeros(0, np.uint64)])


def popcount64(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64 (SWAR bit counting, vectorised), as uint8."""
    x = np.asarray(x, dtype=np.uint64)
    x = x - ((x >> np.uint64(1)) & _M1)
    x = (x & _M2) + ((x >> np.uint64(2)) & _M2)
    x = (x + (x >> np.uint64(4))) & _M4
    return ((x * _H01) >> np.uint64(56)).astype(np.uint8)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances (len(a) x len(b), uint8) between uint64 hashes."""
    return popcount64(np.bitwise_xor(np.asarray(a, np.uint64)[:, None], np.asarray(b, np.uint64)[None, :]))


# Near-duplicate search: exact Hamming search by multi-index hashing, then a pixel-correlation confirmation.
_ALL_BITS = (1 << 64) - 1
BUCKET_CAP = 1 << 10  # a bucket with more pairs than this is split further (recursive multi-index hashing)
MAX_DEPTH = 2  # levels of that splitting (each multiplies the tables by thr + 1); deeper buckets are compared pairwise
_BLOCK = 1 << 22  # pairs expanded at a time


def near_hashes(images: np.ndarray, offsets: list[tuple[int, int]]) -> np.ndarray:
    """The near-duplicate hashes: ``(len(offsets), 2, N)`` uint64, the horizontal and the vertical dHash (boxes
    widened by ``NEAR_SMOOTH``, margin ``NEAR_MARGIN``) of each image shifted by each offset (dy, dx)."""
    channels = images.shape[-1] if images.ndim == 4 else 1
    step = max(1, 2**23 // max(1, images[0].size)) if len(images) else 1
    out = np.zeros((len(offsets), 2, len(images)), dtype=np.uint64)
    for s in range(0, len(images), step):
        table = _integral(images[s:s + step])
        for p, off in enumerate(offsets):
            for o in (0, 1):
                out[p, o, s:s + step] = _dhash_table(table, channels, NEAR_SMOOTH, NEAR_MARGIN, bool(o), off)
    return out


def _bit_chunks(mask: int, parts: int) -> list[int]:
    """The set bits of ``mask`` dealt round-robin into ``parts`` masks (interleaved, so each spans the image)."""
    bits = [b for b in range(64) if mask >> b & 1]
    return [sum(1 << b for b in bits[k::parts]) for k in range(min(parts, len(bits)))]


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``concatenate([arange(s, s + n) for s, n in zip(starts, counts)])``, vectorised."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    before = np.cumsum(counts) - counts
    return np.repeat(np.asarray(starts, dtype=np.int64) - before, counts) + np.arange(total)


def _groups(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``keys`` grouped: the sorting order, the distinct keys, where each group starts in that order, its size."""
    order = np.argsort(keys)
    ordered = keys[order]
    starts = np.ones(len(ordered), dtype=bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    first = np.flatnonzero(starts)
    return order, ordered[first], first, np.diff(np.append(first, len(ordered)))


def _expand(order_a: np.ndarray, first_a: np.ndarray, n_a: np.ndarray, order_b: np.ndarray, first_b: np.ndarray,
            n_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (member of group a, member of group b) for each matched group pair k, as index arrays."""
    per_a = np.repeat(n_b, n_a)  # each member of group a meets the n_b members of its group b
    members_a = order_a[_ranges(first_a, n_a)]
    return np.repeat(members_a, per_a), order_b[_ranges(np.repeat(first_b, n_a), per_a)]


def _equal_key_join(ka: np.ndarray, kb: np.ndarray, cap: float):
    """Pairs (i, j) with ``ka[i] == kb[j]``, yielded in blocks, from the buckets with at most ``cap`` pairs; the
    members of the larger buckets are yielded last as ``(None, (members_a, members_b))``."""
    oa, ua, fa, na = _groups(ka)
    ob, ub, fb, nb = _groups(kb)
    _, xa, xb = np.intersect1d(ua, ub, assume_unique=True, return_indices=True)
    fa, na, fb, nb = fa[xa], na[xa], fb[xb], nb[xb]
    prod = na.astype(np.int64) * nb
    big = prod > cap
    small = np.nonzero(~big)[0]
    block_of = (np.cumsum(prod[small]) - prod[small]) // _BLOCK
    for blk in np.unique(block_of):
        sel = small[block_of == blk]
        yield _expand(oa, fa[sel], na[sel], ob, fb[sel], nb[sel])
    if big.any():
        yield None, (oa[_ranges(fa[big], na[big])], ob[_ranges(fb[big], nb[big])])


def _hamming_join(ha: np.ndarray, hb: np.ndarray, thr: int, base: int = 0, owned: tuple[int, ...] = (),
                  cap: float | None = None, depth: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """All index pairs (i, j) with ``Hamming(ha[i], hb[j]) <= thr``, exactly, by multi-index hashing.

    The bits not in ``base`` are split into ``thr + 1`` interleaved chunks; two hashes within ``thr`` bits agree
    exactly on at least one chunk (pigeonhole), so only hashes in the same (chunk, value) bucket are compared. A
    pair is kept once: by its first agreeing chunk, and only if it agrees on none of the ``owned`` masks (chunks
    that another branch searches). A bucket of more than ``cap`` pairs is searched again the same way on its
    remaining bits (all its pairs agree on ``base`` and its chunk), so a crowded bucket, as real images give, is
    split finer; below ``MAX_DEPTH`` levels of that, its pairs are compared one by one (in blocks: a tight cluster
    of hashes has that many candidates anyway). Meant for distinct hashes per side (duplicates collapsed).
    """
    free = _ALL_BITS & ~base
    chunks = _bit_chunks(free, thr + 1)
    cap = np.inf if depth >= MAX_DEPTH else BUCKET_CAP if cap is None else cap
    if len(chunks) <= thr:  # every pair agreeing on base is within thr bits: join on base alone
        chunks, cap = [0], np.inf
    found_i, found_j = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for k, chunk in enumerate(chunks):
        mask = np.uint64(base | chunk)
        earlier = (*owned, *chunks[:k])
        for i, j in _equal_key_join(ha & mask, hb & mask, cap):
            if i is None:  # the crowded buckets: search them on their remaining bits
                sub_a, sub_b = j
                si, sj = _hamming_join(ha[sub_a], hb[sub_b], thr, base | chunk, earlier, cap, depth + 1)
                found_i.append(sub_a[si])
                found_j.append(sub_b[sj])
                continue
            x = ha[i] ^ hb[j]
            keep = popcount64(x) <= thr
            for m in earlier:
                keep &= (x & np.uint64(m)) != 0
            found_i.append(i[keep])
            found_j.append(j[keep])
    return np.concatenate(found_i), np.concatenate(found_j)


def _shift_offsets(max_shift: int) -> list[tuple[int, int]]:
    r = range(-max_shift, max_shift + 1)
    return [(0, 0)] + [(dy, dx) for dy in r for dx in r if (dy, dx) != (0, 0)]


def hash_candidates(ha: np.ndarray, hb: np.ndarray, thr: int, budget: int) -> tuple[np.ndarray, ...]:
    """Pairs (i, j) of images whose hashes are within ``thr`` bits, in either orientation and for any probe.

    ``ha``: ``(2, Na)`` hashes of one split; ``hb``: ``(P, 2, Nb)`` hashes of the other at P shifts (from
    :func:`near_hashes`). Identical hashes are searched once (:func:`_hamming_join` over the distinct values).
    Returns ``i, j, distance`` (the smallest distance found), closest first, and the number of image pairs left
    unlisted because more than ``budget`` were found (the closest are kept).
    """
    n_b = hb.shape[2]
    parts_i, parts_j, parts_d, over = [], [], [], 0
    for o in (0, 1):
        ua, inv_a = np.unique(ha[o], return_inverse=True)
        ub, inv_b = np.unique(hb[:, o, :].reshape(-1), return_inverse=True)
        vi, vj = _hamming_join(ua, ub, thr)
        dist = popcount64(ua[vi] ^ ub[vj])
        oa, _, fa, na = _groups(inv_a)  # images per distinct value (all values occur, so index = value id)
        ob, _, fb, nb = _groups(inv_b)
        keep = np.argsort(dist, kind="stable")
        size = na[vi[keep]].astype(np.int64) * nb[vj[keep]]
        cut = int(np.searchsorted(np.cumsum(size), budget, side="right"))
        over += int(size[cut:].sum())
        keep = keep[:cut]
        i, e = _expand(oa, fa[vi[keep]], na[vi[keep]], ob, fb[vj[keep]], nb[vj[keep]])
        parts_i.append(i)
        parts_j.append(e % n_b)
        parts_d.append(np.repeat(dist[keep], size[:cut]))
    i, j, d = np.concatenate(parts_i), np.concatenate(parts_j), np.concatenate(parts_d)
    order = np.lexsort((d, i * n_b + j))  # by pair, closest first
    key = (i * n_b + j)[order]
    first = np.ones(len(key), dtype=bool)
    first[1:] = key[1:] != key[:-1]
    i, j, d = i[order][first], j[order][first], d[order][first]
    closest = np.argsort(d, kind="stable")[:budget]
    return i[closest], j[closest], d[closest], over + max(0, len(d) - budget)


def _crop_correlation(a: np.ndarray, b: np.ndarray, a2: np.ndarray, b2: np.ndarray, crop_a: tuple[slice, ...],
                      crop_b: tuple[slice, ...]) -> np.ndarray:
    """Pearson correlation of each ``a[k][crop_a]`` with ``b[k][crop_b]`` (a2, b2: the squares), 0 where constant."""
    xa, xb = a[crop_a], b[crop_b]
    m = xa[0].size
    ta, tb = xa.sum(axis=(1, 2, 3)), xb.sum(axis=(1, 2, 3))
    var_a = np.maximum(a2[crop_a].sum(axis=(1, 2, 3)) - ta * ta / m, 0)
    var_b = np.maximum(b2[crop_b].sum(axis=(1, 2, 3)) - tb * tb / m, 0)
    cov = np.einsum("nhwc,nhwc->n", xa, xb) - ta * tb / m
    den = np.sqrt(var_a * var_b)
    return np.divide(cov, den, out=np.zeros_like(cov), where=den > 0)


def pair_correlation(images_a: np.ndarray, images_b: np.ndarray, ia: np.ndarray, ib: np.ndarray,
                     max_shift: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pearson correlation over the pixels (all channels, stored resolution) of ``images_a[ia[k]]`` and
    ``images_b[ib[k]]``: the best over shifts of the second image by up to ``max_shift`` pixels (on the
    overlapping part), with that shift (dy, dx). Constant images correlate 0; different shapes give NaN."""
    n = len(ia)
    corr = np.full(n, np.nan, dtype=np.float32)
    shift = np.zeros((n, 2), dtype=np.int8)
    if n == 0 or images_a.shape[1:] != images_b.shape[1:]:
        return corr, shift
    h, w = images_a.shape[1:3]
    offsets = _shift_offsets(min(max_shift, h - 1, w - 1))
    step = max(1, 2**21 // images_a[0].size)
    for s in range(0, n, step):
        a, b = (x[idx[s:s + step]].astype(np.float32).reshape(-1, h, w, x[0].size // (h * w))
                for x, idx in ((images_a, ia), (images_b, ib)))
        a -= a.mean(axis=(1, 2, 3), keepdims=True)  # centred: float32 sums keep their precision
        b -= b.mean(axis=(1, 2, 3), keepdims=True)
        best = np.full(len(a), -np.inf, dtype=np.float32)
        a2, b2 = a * a, b * b
        for dy, dx in offsets:
            crop_a = (slice(None), slice(max(0, dy), h + min(0, dy)), slice(max(0, dx), w + min(0, dx)))
            crop_b = (slice(None), slice(max(0, -dy), h + min(0, -dy)), slice(max(0, -dx), w + min(0, -dx)))
            r = _crop_correlation(a, b, a2, b2, crop_a, crop_b)
            better = r > best
            best[better] = r[better]
            shift[s:s + step][better] = (dy, dx)
        corr[s:s + step] = best
    return corr, shift


# -------------------------------------------------------------------------------------------- checks


def _ids(data: SplitArrays, meta: dict[str, Any]) -> dict[str, list[str]]:
    paths = meta.get("paths") or {}
    return {s: list(paths[s]) if paths.get(s) is not None and len(paths[s]) == len(data.labels[s])
            else [f"{s}[{i}]" for i in range(len(data.labels[s]))] for s in SPLITS}


def _stats(images: np.ndarray, rng: np.random.Generator) -> tuple[dict[str, float], np.ndarray]:
    per_image = images.reshape(len(images), -1).mean(axis=1) if len(images) else np.zeros(0)
    sample = images if len(images) <= 2000 else images[rng.choice(len(images), 2000, replace=False)]
    flat = sample.reshape(-1).astype(np.float64)
    if flat.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "p1": float("nan"), "p50": float("nan"),
                "p99": float("nan")}, per_image
    p1, p50, p99 = np.percentile(flat, [1, 50, 99])
    return {"mean": round(float(flat.mean()), 3), "std": round(float(flat.std()), 3), "p1": float(p1),
            "p50": float(p50), "p99": float(p99)}, per_image


def _flag(msg: str, allowed: bool, warnings: list[str], violations: list[str]) -> None:
    (warnings if allowed else violations).append(msg)


def check_corrupt(errors: list[tuple[str, str]], settings: dict[str, Any], warnings: list[str],
                  violations: list[str]) -> dict[str, Any]:
    """The unreadable/corrupt files; a violation unless ``allow_corrupt``."""
    corrupt = {"count": len(errors), "files": [{"path": p, "reason": r} for p, r in errors]}
    if errors:
        msg = f"{len(errors)} unreadable/corrupt files, e.g. " + "; ".join(f"{p}: {r}" for p, r in errors[:5])
        _flag(msg, settings["allow_corrupt"], warnings, violations)
    return corrupt


def check_counts(data: SplitArrays, present: list[str], warnings: list[str]) -> dict[str, Any]:
    """Counts per split and class, totals and the class-imbalance ratio; warns about classes missing from a split."""
    names = data.class_names
    counts = {s: label_counts(data.labels[s], len(names)) for s in present}  # multi-label: positives per label
    imbalance = {}
    for s in present:
        nz = [n for n in counts[s] if n > 0]
        imbalance[s] = round(max(nz) / min(counts[s]), 3) if nz and min(counts[s]) > 0 else None
    for s in present:
        missing = [names[c] for c, n in enumerate(counts[s]) if n == 0]
        if missing:
            warnings.append(f"split {s} has no samples of classes {missing}")
    return {"counts": {s: {names[c]: int(n) for c, n in enumerate(counts[s])} for s in present},
            "totals": {s: int(len(data.labels[s])) for s in present},
            "imbalance_ratio": imbalance}


ALLOW_LABELS = " (data.validation.allow_label_issues=true: warn and train anyway)"
# label values that mean "no label" in spreadsheets and pandas exports; a class of that name must be declared in
# data.class_names (then it is taken as meant)
MISSING_LABELS = frozenset({"", "nan", "none", "null", "na", "n/a", "nil", "missing", "undefined", "?", "-"})
MIN_CLASS_IMAGES = 3  # a class needs an image in each of train, val and test to be learned, selected on and tested


def label_key(name: str) -> str:
    """A label as compared for spelling variants: runs of whitespace collapsed and trimmed, case folded."""
    return " ".join(str(name).split()).casefold()


def _class_entry(data: SplitArrays, present: list[str], ids: dict[str, list[str]], c: int) -> dict[str, Any]:
    """A class's name, image count and up to 3 example paths (or ``split[index]``)."""
    examples: list[str] = []
    for s in present:
        examples += [ids[s][int(i)] for i in np.flatnonzero(data.labels[s] == c)[: 3 - len(examples)]]
    total = int(sum(int((data.labels[s] == c).sum()) for s in present))
    return {"label": data.class_names[c], "images": total, "examples": examples}


def _n(count: int, word: str) -> str:
    """``1 image``, ``2 images``."""
    return f"{count} {word}{'' if count == 1 else 's'}"


def _entry_text(e: dict[str, Any]) -> str:
    return f"{e['label']!r} ({_n(e['images'], 'image')}, e.g. {', '.join(e['examples']) or 'none'})"


def _too_few(data: SplitArrays, present: list[str], ids: dict[str, list[str]]) -> list[dict[str, Any]]:
    """Classes with no training images or fewer than ``MIN_CLASS_IMAGES`` in all, with their per-split counts."""
    out = []
    for c in range(len(data.class_names)):
        counts = {s: int((data.labels[s] == c).sum()) for s in present}
        if sum(counts.values()) < MIN_CLASS_IMAGES or counts.get("train", 1) == 0:
            out.append({**_class_entry(data, present, ids, c), "per_split": counts})
    return out


def check_labels(data: SplitArrays, present: list[str], ids: dict[str, list[str]], settings: dict[str, Any],
                 warnings: list[str], violations: list[str]) -> dict[str, Any]:
    """Label values that are not distinct, usable classes (single-label data; multi-label columns are not checked).

    * spelling variants: names equal after :func:`label_key` (``Malignant`` / ``malignant`` / ``malignant  x``);
    * missing values: names such as ``NaN``, ``None``, ``null``, ``n/a`` (``MISSING_LABELS``) unless the classes
      are declared in ``data.class_names``;
    * too few images: a class without training images, or with fewer than ``MIN_CLASS_IMAGES`` in all (it cannot
      be in train, val and test).

    Each is a violation naming the labels, their counts and example paths, a warning with ``allow_label_issues``.
    """
    found: dict[str, list[Any]] = {"spelling_variants": [], "missing_like": [], "too_few": []}
    if any(data.labels[s].ndim == 2 for s in present):
        return found
    names, allowed = data.class_names, bool(settings["allow_label_issues"])
    variants: dict[str, list[int]] = defaultdict(list)
    for c, name in enumerate(names):
        variants[label_key(name)].append(c)
    for cs in (cs for cs in variants.values() if len(cs) > 1):
        group = [_class_entry(data, present, ids, c) for c in cs]
        found["spelling_variants"].append(group)
        _flag("labels: " + " vs ".join(_entry_text(e) for e in group) + " differ only in case or whitespace and "
              "would be trained as separate classes: use one spelling per class" + ALLOW_LABELS,
              allowed, warnings, violations)
    if data.info.get("class_order") != "configured":
        for c in (c for c, name in enumerate(names) if label_key(name) in MISSING_LABELS):
            e = _class_entry(data, present, ids, c)
            found["missing_like"].append(e)
            _flag(f"labels: {_entry_text(e)} looks like a missing value, not a class: label these images or drop "
                  "them (a class really named so: declare data.class_names)" + ALLOW_LABELS,
                  allowed, warnings, violations)
    for e in _too_few(data, present, ids):
        found["too_few"].append(e)
        split_counts = ", ".join(f"{s} {n}" for s, n in e["per_split"].items())
        why = ("no training images, so it cannot be learned" if e["per_split"].get("train", 1) == 0 else
               f"fewer than {MIN_CLASS_IMAGES}, one for each of train, val and test, so it cannot be learned, "
               "selected on and tested")
        _flag(f"labels: class {e['label']!r} has {_n(e['images'], 'image')} ({split_counts}; e.g. "
              f"{', '.join(e['examples']) or 'none'}): {why}; add images, merge it into another class or drop its "
              "rows" + ALLOW_LABELS, allowed, warnings, violations)
    return found


def _channels(shape: tuple[int, ...]) -> int:
    return shape[2] if len(shape) > 2 else 1


def _original_size_outliers(present: list[str], meta: dict[str, Any],
                            ids: dict[str, list[str]]) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """The distribution of original sizes (``HxWxC: n``) and the files far from the median size or with an
    unusual channel count or dtype."""
    dtypes_meta = meta.get("original_dtypes") or {}
    all_shapes = [(s, i, tuple(sh)) for s in present for i, sh in enumerate(meta["original_shapes"].get(s, []))]
    dist = Counter(f"{sh[0]}x{sh[1]}x{_channels(sh)}" for _, _, sh in all_shapes)
    outliers: list[dict[str, Any]] = []
    if not all_shapes:
        return dict(dist.most_common()), outliers
    med_h = float(np.median([sh[0] for _, _, sh in all_shapes]))
    med_w = float(np.median([sh[1] for _, _, sh in all_shapes]))
    mode_c = Counter(_channels(sh) for _, _, sh in all_shapes).most_common(1)[0][0]
    all_dtypes = [d for s in present for d in dtypes_meta.get(s, [])]
    mode_d = Counter(all_dtypes).most_common(1)[0][0] if all_dtypes else None
    for s, i, sh in all_shapes:
        reasons = []
        if not (0.5 * med_h <= sh[0] <= 2 * med_h and 0.5 * med_w <= sh[1] <= 2 * med_w):
            reasons.append(f"size {sh[0]}x{sh[1]} far from the median {med_h:g}x{med_w:g}")
        if _channels(sh) != mode_c:
            reasons.append(f"{_channels(sh)} channels, most have {mode_c}")
        dts = dtypes_meta.get(s, [])
        if mode_d and i < len(dts) and dts[i] != mode_d:
            reasons.append(f"dtype {dts[i]}, most are {mode_d}")
        if reasons:
            outliers.append({"id": ids[s][i], "split": s, "shape": list(sh), "reason": "; ".join(reasons)})
    return dict(dist.most_common()), outliers


def _array_outliers(data: SplitArrays, present: list[str]) -> list[dict[str, Any]]:
    """Splits whose loaded array is not uint8 with 1 or 3 channels (no per-file metadata)."""
    outliers = []
    for s in present:
        img = data.images[s]
        if img.dtype != np.uint8 or img.shape[-1] not in (1, 3):
            outliers.append({"id": s, "split": s, "shape": list(img.shape[1:]),
                             "reason": f"dtype {img.dtype}, {img.shape[-1]} channels"})
    return outliers


def check_sizes(data: SplitArrays, present: list[str], meta: dict[str, Any], ids: dict[str, list[str]],
                limit: int, warnings: list[str]) -> dict[str, Any]:
    """Image geometry per split, original sizes (folders) and size/channel/dtype outliers."""
    geometry: dict[str, Any] = {s: {"shape": list(data.images[s].shape[1:]), "dtype": str(data.images[s].dtype)}
                                for s in present}
    if meta.get("original_shapes"):
        geometry["original_sizes"], outliers = _original_size_outliers(present, meta, ids)
    else:
        outliers = _array_outliers(data, present)
    geometry["outliers"] = {"count": len(outliers), "examples": outliers[:limit]}
    if outliers:
        warnings.append(f"{len(outliers)} images with unexpected size/channels/dtype, e.g. "
                        + "; ".join(f"{o['id']}: {o['reason']}" for o in outliers[:3]))
    return geometry


def _within_split_duplicates(data: SplitArrays, present: list[str], hashes: dict[str, list[str]],
                             where: dict[str, list[tuple[str, int]]], ids: dict[str, list[str]],
                             limit: int) -> dict[str, Any]:
    """Groups of identical images inside each split, and those whose copies carry different labels."""
    within = {}
    for s in present:
        c = Counter(hashes[s])
        groups = [h for h, n in c.items() if n > 1]
        members = {h: [i for ss, i in where[h] if ss == s] for h in groups}
        conflicting = [h for h in groups if len({_label_text(data, s, i) for i in members[h]}) > 1]
        within[s] = {"groups": len(groups), "images": int(sum(c[h] for h in groups)),
                     "examples": [[ids[s][i] for i in members[h]] for h in groups[:limit]],
                     "conflicting_labels": len(conflicting),
                     "conflicting_examples": [{"images": [ids[s][i] for i in members[h]],
                                               "labels": [_label_text(data, s, i) for i in members[h]]}
                                              for h in conflicting[:limit]]}
    return within


def _label_text(data: SplitArrays, split: str, index: int) -> str:
    """A sample's class name; multi-label: its labels joined with ``+`` (``none`` without any)."""
    label = data.labels[split][index]
    if np.ndim(label):
        return "+".join(data.class_names[k] for k in np.flatnonzero(label)) or "none"
    return data.class_names[int(label)]


def _cross_split_duplicates(data: SplitArrays, where: dict[str, list[tuple[str, int]]], ids: dict[str, list[str]],
                            limit: int) -> dict[str, Any]:
    """Groups of identical images found in more than one split (leakage), with conflicting labels."""
    cross_groups = [h for h, locs in where.items() if len({s for s, _ in locs}) > 1]
    pair_counts: Counter[str] = Counter()
    conflicting = 0
    examples = []
    for h in cross_groups:
        locs = where[h]
        splits_here = sorted({s for s, _ in locs}, key=SPLITS.index)
        for a, b in combinations(splits_here, 2):
            pair_counts[f"{a}/{b}"] += 1
        labels_here = {_label_text(data, s, i) for s, i in locs}
        conflicting += len(labels_here) > 1
        if len(examples) < limit:
            examples.append({"images": [ids[s][i] for s, i in locs],
                             "labels": [_label_text(data, s, i) for s, i in locs]})
    return {"groups": len(cross_groups), "images": int(sum(len(where[h]) for h in cross_groups)),
            "by_splits": dict(pair_counts), "conflicting_labels": int(conflicting), "examples": examples}


def check_exact_duplicates(data: SplitArrays, present: list[str], hashes: dict[str, list[str]],
                           ids: dict[str, list[str]], settings: dict[str, Any], warnings: list[str],
                           violations: list[str]) -> dict[str, Any]:
    """Exact (pixel-hash) duplicates within and across splits; cross-split ones are leakage."""
    limit = int(settings["max_listed"])
    where: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for s in present:
        for i, h in enumerate(hashes[s]):
            where[h].append((s, i))
    within = _within_split_duplicates(data, present, hashes, where, ids, limit)
    cross = _cross_split_duplicates(data, where, ids, limit)
    for s in present:
        w = within[s]
        if w["groups"]:
            warnings.append(f"{w['groups']} groups of exact duplicates within {s} ({w['images']} images; "
                            f"{w['conflicting_labels']} with conflicting labels)")
        if w["conflicting_labels"]:
            msg = (f"labels: {_n(w['conflicting_labels'], 'group')} of identical images within {s} carry "
                   "conflicting labels (one image, two truths: correct the labels or drop the copies), e.g. "
                   + "; ".join(" = ".join(f"{i} ({lab})" for i, lab in zip(e["images"], e["labels"], strict=True))
                               for e in w["conflicting_examples"][:3]) + ALLOW_LABELS)
            _flag(msg, settings["allow_label_issues"], warnings, violations)
    if cross["groups"]:
        msg = (f"leakage: {cross['groups']} exact-duplicate groups across splits ({cross['images']} images; "
               f"{cross['by_splits']}), e.g. "
               + "; ".join(" = ".join(e["images"]) for e in cross["examples"][:3]))
        _flag(msg, settings["allow_leakage"], warnings, violations)
    return {"within_split": within, "cross_split": cross}


def _near_duplicate_split_pair(images_a: np.ndarray, images_b: np.ndarray, hashes_a: list[str],
                               hashes_b: list[str], near: tuple[np.ndarray, np.ndarray],
                               settings: dict[str, Any], budget: int) -> dict[str, Any]:
    """Candidates and their correlations between two splits. ``near``: the (2, N) hashes of the split searched
    as stored and the (P, 2, N) probe hashes of the other; the smaller split is probed (swapped back here)."""
    thr, max_shift = int(settings["near_duplicate_hamming"]), int(settings["near_duplicate_max_shift"])
    swap = len(images_b) > len(images_a)
    stored, probed = near
    i, j, dist, over = hash_candidates(stored, probed, thr, budget)
    if swap:
        i, j = j, i
    differ = np.array([hashes_a[x] != hashes_b[y] for x, y in zip(i.tolist(), j.tolist(), strict=True)], dtype=bool)
    i, j, dist = i[differ], j[differ], dist[differ]  # exact duplicates are reported as such
    corr, shift = pair_correlation(images_a, images_b, i, j, max_shift)
    confirmed = corr >= float(settings["near_duplicate_min_correlation"])
    return {"i": i, "j": j, "hamming": dist, "correlation": corr, "shift": shift, "confirmed": confirmed,
            "not_checked": over}


def _near_duplicate_pairs(data: SplitArrays, present: list[str],
                          hashes: dict[str, list[str]], settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The candidate pairs of every two splits (``"a/b"`` -> arrays, see :func:`_near_duplicate_split_pair`),
    within one budget of ``near_duplicate_max_candidates`` pairs checked."""
    offsets = _shift_offsets(int(settings["near_duplicate_max_shift"]))
    stored = {s: near_hashes(data.images[s], [(0, 0)])[0] for s in present}
    probes: dict[str, np.ndarray] = {}
    budget = int(settings["near_duplicate_max_candidates"])
    out = {}
    for a, b in combinations(present, 2):
        big, small = (a, b) if len(data.images[a]) >= len(data.images[b]) else (b, a)
        if small not in probes:
            probes[small] = near_hashes(data.images[small], offsets)
        res = _near_duplicate_split_pair(data.images[a], data.images[b], hashes[a], hashes[b],
                                         (stored[big], probes[small]), settings, max(budget, 0))
        budget -= len(res["i"])
        out[f"{a}/{b}"] = res
    return out


def _pair_record(data: SplitArrays, ids: dict[str, list[str]], a: str, b: str, res: dict[str, Any],
                 k: int) -> dict[str, Any]:
    i, j = int(res["i"][k]), int(res["j"][k])
    return {"a": ids[a][i], "b": ids[b][j], "split_a": a, "index_a": i, "split_b": b, "index_b": j,
            "labels": [_label_text(data, a, i), _label_text(data, b, j)],
            "hamming": int(res["hamming"][k]), "distance": int(res["hamming"][k]),
            "correlation": round(float(res["correlation"][k]), 4), "shift": [int(v) for v in res["shift"][k]]}


def _top_pairs(data: SplitArrays, ids: dict[str, list[str]], found: dict[str, dict[str, Any]], confirmed: bool,
               limit: int) -> list[dict[str, Any]]:
    """The ``limit`` confirmed (or unconfirmed) pairs of highest correlation over all split pairs."""
    rows = []
    for key, res in found.items():
        a, b = key.split("/")
        sel = np.flatnonzero(res["confirmed"] == confirmed)
        corr = np.nan_to_num(res["correlation"][sel], nan=-2.0)
        for k in sel[np.argsort(-corr, kind="stable")[:limit]]:
            rows.append((-float(np.nan_to_num(res["correlation"][k], nan=-2.0)), key, int(k), a, b))
    rows.sort(key=lambda r: r[:3])
    return [_pair_record(data, ids, a, b, found[key], k) for _, key, k, a, b in rows[:limit]]


def check_near_duplicates(data: SplitArrays, present: list[str], hashes: dict[str, list[str]],
                          ids: dict[str, list[str]], settings: dict[str, Any], warnings: list[str],
                          violations: list[str] | None = None) -> dict[str, Any]:
    """Near-duplicates across splits: hash candidates confirmed by pixel correlation.

    Candidates: images of two splits whose 64-bit dHashes (horizontal or vertical, smoothed, with a margin; the
    smaller split hashed at every shift up to ``near_duplicate_max_shift`` px) differ in at most
    ``near_duplicate_hamming`` bits, found by multi-index hashing (:func:`_hamming_join`), exact duplicates left
    out. Confirmed: Pearson correlation over the pixels at stored resolution, best over the same shifts, of at least
    ``near_duplicate_min_correlation``. Only confirmed pairs are findings: a warning, or with
    ``near_duplicate_leakage`` leakage (a violation unless ``allow_leakage``). At most
    ``near_duplicate_max_candidates`` pairs are checked, the closest hashes first; the rest are counted.
    """
    mode = str(settings["near_duplicates"]).lower()
    thr, min_corr = int(settings["near_duplicate_hamming"]), float(settings["near_duplicate_min_correlation"])
    near: dict[str, Any] = {"enabled": mode != "false", "hash": "dhash64 horizontal+vertical", "hamming": thr,
                            "max_shift": int(settings["near_duplicate_max_shift"]), "min_correlation": min_corr}
    if mode == "false":
        near["skipped"] = "disabled"
        return near
    found = _near_duplicate_pairs(data, present, hashes, settings)
    by_splits = {k: int(r["confirmed"].sum()) for k, r in found.items() if r["confirmed"].any()}
    limit = int(settings["max_listed"])
    near.update(candidates=int(sum(len(r["i"]) for r in found.values())), confirmed=int(sum(by_splits.values())),
                candidates_by_splits={k: len(r["i"]) for k, r in found.items() if len(r["i"])},
                not_checked=int(sum(r["not_checked"] for r in found.values())),
                examples=_top_pairs(data, ids, found, True, limit),
                rejected_examples=_top_pairs(data, ids, found, False, min(limit, 10)))
    conflicting = 0
    for key, r in found.items():
        a, b = key.split("/")
        differ = data.labels[a][r["i"]] != data.labels[b][r["j"]]
        differ = differ.any(axis=1) if differ.ndim == 2 else differ  # multi-label: any label differs
        conflicting += int(differ[r["confirmed"]].sum())
    near.update(pairs=near["confirmed"], by_splits=by_splits, conflicting_labels=conflicting)
    if by_splits:
        msg = (f"{near['confirmed']} near-duplicate pairs across splits (pixel correlation >= {min_corr}; "
               f"{near['candidates']} dHash candidates): {by_splits}, e.g. "
               + "; ".join(f"{e['a']} ~ {e['b']} (r={e['correlation']})" for e in near["examples"][:3]))
        if settings["near_duplicate_leakage"] and violations is not None:
            _flag("leakage: " + msg, settings["allow_leakage"], warnings, violations)
        else:
            warnings.append(msg)
    if near["not_checked"]:
        warnings.append(f"about {near['not_checked']} near-duplicate candidate pairs over "
                        f"near_duplicate_max_candidates were not checked")
    return near


def check_patients(present: list[str], meta: dict[str, Any], settings: dict[str, Any], warnings: list[str],
                   violations: list[str]) -> dict[str, Any]:
    """Patients/studies (CSV ``patient_id``/``study_id``) found in more than one split; leakage."""
    groups = meta.get("groups") or {}
    patient: dict[str, Any] = {"column": meta.get("group_column")}
    if not patient["column"]:
        return patient
    split_of: dict[str, set[str]] = defaultdict(set)
    for s in present:
        for g in groups.get(s, []):
            if g is not None:
                split_of[g].add(s)
    shared = sorted(g for g, ss in split_of.items() if len(ss) > 1)
    limit = int(settings["max_listed"])
    patient.update(patients=len(split_of), in_multiple_splits=len(shared),
                   examples=[{"id": g, "splits": sorted(split_of[g], key=SPLITS.index)} for g in shared[:limit]])
    if shared:
        msg = (f"leakage: {len(shared)} {patient['column']} values in more than one split, e.g. "
               + ", ".join(f"{g} ({'/'.join(sorted(split_of[g], key=SPLITS.index))})" for g in shared[:5]))
        _flag(msg, settings["allow_leakage"], warnings, violations)
    return patient


def check_intensity_shift(data: SplitArrays, present: list[str], settings: dict[str, Any],
                          warnings: list[str]) -> dict[str, Any]:
    """Intensity statistics per split and the standardized mean difference of per-image means between splits."""
    rng = np.random.default_rng(0)
    stats, per_image = {}, {}
    for s in present:
        stats[s], per_image[s] = _stats(data.images[s], rng)
    shifts = []
    for a, b in combinations(present, 2):
        ma, mb = per_image[a], per_image[b]
        if len(ma) < 2 or len(mb) < 2:
            continue
        pooled = float(np.sqrt((ma.var(ddof=1) + mb.var(ddof=1)) / 2)) or 1e-6
        smd = round(float(abs(ma.mean() - mb.mean()) / pooled), 4)
        flagged = smd > float(settings["shift_threshold"])
        shifts.append({"splits": f"{a}/{b}", "smd": smd, "warning": flagged})
        if flagged:
            warnings.append(f"intensity shift {a}/{b}: standardized mean difference {smd} > "
                            f"{settings['shift_threshold']}")
    return {"per_split": stats, "shift": shifts}


def validate(data: SplitArrays | None, errors: list[tuple[str, str]], meta: dict[str, Any] | None = None,
             settings: dict[str, Any] | None = None, source: str | None = None) -> dict[str, Any]:
    """Run every check; returns the report (JSON-ready) with ``warnings`` and ``violations`` lists."""
    settings = validation_settings(settings)
    meta = meta or {}
    warnings: list[str] = []
    violations: list[str] = []
    report: dict[str, Any] = {"source": source or (data.source if data else None), "settings": settings,
                              "warnings": warnings, "violations": violations}
    report["corrupt"] = check_corrupt(errors, settings, warnings, violations)
    if data is None:
        violations.append("no readable data")
        return report
    present = [s for s in SPLITS if s in data.labels]
    report.update(check_counts(data, present, warnings))
    ids = _ids(data, meta)
    report["labels"] = check_labels(data, present, ids, settings, warnings, violations)
    report["geometry"] = check_sizes(data, present, meta, ids, int(settings["max_listed"]), warnings)
    hashes = {s: pixel_hashes(data.images[s]) for s in present}
    report["duplicates"] = check_exact_duplicates(data, present, hashes, ids, settings, warnings, violations)
    report["near_duplicates"] = check_near_duplicates(data, present, hashes, ids, settings, warnings, violations)
    report["patients"] = check_patients(present, meta, settings, warnings, violations)
    report["intensity"] = check_intensity_shift(data, present, settings, warnings)
    return report


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The short form stored in run.json under ``data_validation``."""
    dup = report.get("duplicates", {})
    return {
        "corrupt": report.get("corrupt", {}).get("count", 0),
        "duplicates_within": {s: v["groups"] for s, v in dup.get("within_split", {}).items()},
        "duplicates_within_conflicting": {s: v.get("conflicting_labels", 0)
                                          for s, v in dup.get("within_split", {}).items()},
        "label_issues": {k: len(v) for k, v in (report.get("labels") or {}).items()},
        "leakage_exact_duplicates": dup.get("cross_split", {}).get("groups", 0),
        "leakage_by_splits": dup.get("cross_split", {}).get("by_splits", {}),
        "near_duplicate_pairs": report.get("near_duplicates", {}).get("pairs"),
        "near_duplicate_candidates": report.get("near_duplicates", {}).get("candidates"),
        "patients_in_multiple_splits": report.get("patients", {}).get("in_multiple_splits"),
        "imbalance_ratio": report.get("imbalance_ratio", {}),
        "intensity_shift": report.get("intensity", {}).get("shift", []),
        "warnings": report.get("warnings", []),
        "violations": report.get("violations", []),
        "settings": report.get("settings", {}),
    }


def validate_source(dm: FolderDataset | MedMNISTFile | Any,
                    settings: dict[str, Any] | None = None) -> tuple[dict[str, Any], SplitArrays | None]:
    """Gather and check ``dm``'s data; the report (violations are not raised) and the data it was made from."""
    data, errors, meta = gather(dm)
    return validate(data, errors, meta, settings, source=str(getattr(dm, "path", "")) or None), data


def run_validation(dm: FolderDataset | MedMNISTFile | Any, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Gather and check ``dm``'s data; returns the report (does not raise on violations)."""
    return validate_source(dm, settings)[0]


# ------------------------------------------------------------------------------------------- reports


def _near_rows(near: dict[str, Any]) -> list[tuple[str, str]]:
    if not near:
        return []
    if not near.get("enabled") or "confirmed" not in near:
        return [("near-duplicates across splits", f"skipped ({near.get('skipped')})")]
    rows = [("near-duplicates across splits",
             f"{near['confirmed']} confirmed (pixel correlation >= {near['min_correlation']}) of {near['candidates']} "
             f"dHash candidates (Hamming <= {near['hamming']}, shifts <= {near['max_shift']} px) {near['by_splits']}; "
             f"{near['conflicting_labels']} with conflicting labels"
             + (f"; about {near['not_checked']} candidates over the limit not checked" if near["not_checked"] else ""))]
    for e in near["examples"][:10]:
        rows.append(("  near-duplicate", f"{e['a']} ~ {e['b']} (r={e['correlation']}, Hamming {e['hamming']}, "
                                         f"labels {' / '.join(e['labels'])})"))
    return rows


def _label_rows(labels: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [("label spelling variants", " | ".join(" vs ".join(_entry_text(e) for e in g)
                                                  for g in labels.get("spelling_variants", [])) or "none")]
    rows.append(("labels like missing values", "; ".join(_entry_text(e) for e in labels.get("missing_like", []))
                 or "none"))
    rows.append(("classes with too few images", "; ".join(f"{_entry_text(e)} {e['per_split']}"
                                                          for e in labels.get("too_few", [])) or "none"))
    return rows if labels else []


def _rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    dup = report.get("duplicates", {})
    cross = dup.get("cross_split", {})
    rows = [("source", str(report.get("source")))]
    for s, c in (report.get("counts") or {}).items():
        rows.append((f"{s} images per class", ", ".join(f"{k}: {v}" for k, v in c.items())))
    rows.append(("class imbalance (max/min)", json.dumps(report.get("imbalance_ratio", {}))))
    rows.append(("corrupt / unreadable files", str(report["corrupt"]["count"])))
    for f in report["corrupt"]["files"][: int(report["settings"]["max_listed"])]:
        rows.append(("  unreadable", f"{f['path']}: {f['reason']}"))
    rows += _label_rows(report.get("labels") or {})
    for s, w in dup.get("within_split", {}).items():
        rows.append((f"exact duplicates within {s}", f"{w['groups']} groups, {w['images']} images; "
                                                    f"{w.get('conflicting_labels', 0)} with conflicting labels"))
        for e in w.get("conflicting_examples", [])[:10]:
            rows.append(("  conflicting labels", " = ".join(f"{i} ({lab})" for i, lab in
                                                            zip(e["images"], e["labels"], strict=True))))
    if cross:
        rows.append(("exact duplicates across splits (leakage)",
                     f"{cross['groups']} groups, {cross['images']} images {cross['by_splits']}; "
                     f"{cross['conflicting_labels']} with conflicting labels"))
        for e in cross["examples"][:10]:
            rows.append(("  duplicate", " = ".join(e["images"])))
    rows += _near_rows(report.get("near_duplicates", {}))
    pat = report.get("patients", {})
    if pat.get("column"):
        rows.append((f"{pat['column']} in more than one split", f"{pat['in_multiple_splits']} of {pat['patients']}"))
    geo = report.get("geometry", {})
    if "original_sizes" in geo:
        rows.append(("original sizes (HxWxC: n)", json.dumps(geo["original_sizes"])))
    if geo:
        rows.append(("size/channel/dtype outliers", str(geo["outliers"]["count"])))
    for s, st in (report.get("intensity", {}).get("per_split") or {}).items():
        rows.append((f"intensity {s}", ", ".join(f"{k} {v}" for k, v in st.items())))
    for sh in report.get("intensity", {}).get("shift", []):
        rows.append((f"intensity shift {sh['splits']} (SMD)", f"{sh['smd']}" + (" WARNING" if sh["warning"] else "")))
    return rows


def to_markdown(report: dict[str, Any]) -> str:
    lines = ["# Data validation report", "", "| check | result |", "|---|---|"]
    lines += [f"| {k} | {v.replace('|', '/')} |" for k, v in _rows(report)]
    lines += ["", "## Violations", ""] + [f"- {v}" for v in report["violations"] or ["none"]]
    lines += ["", "## Warnings", ""] + [f"- {w}" for w in report["warnings"] or ["none"]]
    return "\n".join(lines) + "\n"


def _pair_png(a: np.ndarray, b: np.ndarray) -> str:
    """Two uint8 images side by side (grey 0-255 as stored, colour as RGB) as a base64 PNG."""
    from PIL import Image

    a, b = (x[..., 0] if x.ndim == 3 and x.shape[-1] == 1 else x for x in (a, b))
    height = max(a.shape[0], b.shape[0])
    a, b = (np.pad(x, [(0, height - x.shape[0])] + [(0, 0)] * (x.ndim - 1)) for x in (a, b))
    gap = np.full((height, max(2, height // 14), *a.shape[2:]), 255, dtype=np.uint8)
    img = Image.fromarray(np.ascontiguousarray(np.concatenate([a, gap, b], axis=1)))
    if max(img.size) > 512:
        img.thumbnail((512, 512))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _near_duplicate_html(near: dict[str, Any], data: SplitArrays | None) -> str:
    """The confirmed near-duplicate pairs (and the closest rejected candidates) as figures: both images side by side
    with split, index, path, labels, correlation and hash distance; without ``data``, captions only."""
    esc = html.escape
    sections = []
    for key, title in (("examples", "Near-duplicates across splits (confirmed)"),
                       ("rejected_examples", "Closest hash candidates below the correlation threshold (not counted)")):
        figures = []
        for e in near.get(key) or []:
            names = [f"{e[f'split_{s}']}[{e[f'index_{s}']}]" for s in "ab"]
            names = [esc(n if n == e[s] else f"{n} {e[s]}") for n, s in zip(names, "ab", strict=True)]
            caption = (f"{names[0]} &harr; {names[1]}<br>r = {e['correlation']} (shift {tuple(e['shift'])}), "
                       f"dHash distance {e['hamming']}, labels {esc(' / '.join(e['labels']))}")
            image = ""
            if data is not None and data.images[e["split_a"]].shape[1:] == data.images[e["split_b"]].shape[1:]:
                png = _pair_png(data.images[e["split_a"]][e["index_a"]], data.images[e["split_b"]][e["index_b"]])
                image = f"<img alt='{esc(e['a'])} | {esc(e['b'])}' src='data:image/png;base64,{png}'>"
            figures.append(f"<figure>{image}<figcaption>{caption}</figcaption></figure>")
        if figures:
            sections.append(f"<h2>{esc(title)}</h2><div class='pairs'>{''.join(figures)}</div>")
    return "".join(sections)


def to_html(report: dict[str, Any], data: SplitArrays | None = None) -> str:
    """The report as one HTML page; with ``data``, the near-duplicate pairs are shown as images."""
    esc = html.escape
    rows = "\n".join(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in _rows(report))
    items = lambda xs: "".join(f"<li>{esc(x)}</li>" for x in xs) or "<li>none</li>"  # noqa: E731
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>Data validation report</title>"
        "<style>body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #999;"
        "padding:3px 8px;text-align:left}.pairs{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0;"
        "width:300px;font-size:12px;word-break:break-all}figure img{height:128px;image-rendering:pixelated;"
        "border:1px solid #999}</style></head><body><h1>Data validation report</h1>"
        f"<table><tr><th>check</th><th>result</th></tr>\n{rows}\n</table>"
        f"<h2>Violations</h2><ul>{items(report['violations'])}</ul>"
        f"<h2>Warnings</h2><ul>{items(report['warnings'])}</ul>"
        f"{_near_duplicate_html(report.get('near_duplicates') or {}, data)}</body></html>\n"
    )


def write_reports(report: dict[str, Any], out_dir: Path, stem: str = "report",
                  data: SplitArrays | None = None) -> list[Path]:
    """``report.json``, ``report.md`` and ``report.html`` (with ``data``: near-duplicate pairs as images)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md", out_dir / f"{stem}.html"]
    paths[0].write_text(json.dumps(report, indent=2, default=str))
    paths[1].write_text(to_markdown(report))
    paths[2].write_text(to_html(report, data))
    return paths


def print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title="Data validation")
    table.add_column("check")
    table.add_column("result", overflow="fold")
    for k, v in _rows(report)[:60]:
        table.add_row(k, v)
    console.print(table)
    for w in report["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {w}", markup=True, highlight=False)
    for v in report["violations"]:
        console.print(f"[red]violation:[/red] {v}", markup=True, highlight=False)


def data_arguments(data_cfg: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """A ``data`` config split into the dataset's arguments and the validation settings (its ``validation``
    block); ``allow_corrupt`` makes a folder dataset skip unreadable files."""
    from omegaconf import DictConfig, OmegaConf

    cfg = OmegaConf.to_container(data_cfg, resolve=True) if isinstance(data_cfg, DictConfig) else dict(data_cfg)
    assert isinstance(cfg, dict)
    settings = validation_settings(cfg.pop("validation", None))
    if settings["allow_corrupt"] and str(cfg.get("_target_", "")).endswith("FolderDataModule"):
        cfg["skip_unreadable"] = True
    return cfg, settings


def run_data_arguments(record: dict[str, Any]) -> dict[str, Any]:
    """A run's DataModule arguments, as training read its data: the class names in the run's own order when its
    config left them to the data (a later rule for ordering names must not relabel an old run's images)."""
    cfg = data_arguments((record.get("config") or {}).get("data") or {})[0]
    names = (record.get("data") or {}).get("class_names")
    if cfg and not cfg.get("class_names") and names and str(cfg.get("_target_", "")).endswith("FolderDataModule"):
        cfg["class_names"] = list(names)
    return cfg


def instantiate_data(data_cfg: Any) -> tuple[FolderDataset | MedMNISTFile, dict[str, Any]]:
    """The torch-free dataset reader of a ``data`` config, and the validation settings."""
    cfg, settings = data_arguments(data_cfg)
    return source_from_config(cfg), settings


# ----------------------------------------------------------------------------------------------- CLI

def _main() -> None:
    import hydra
    from omegaconf import DictConfig

    config_dir = str(Path(__file__).resolve().parent.parent / "conf")

    @hydra.main(version_base="1.3", config_path=config_dir, config_name="validate_data")
    def main(cfg: DictConfig) -> None:
        try:
            dm, settings = instantiate_data(cfg.data)
            report, data = validate_source(dm, settings)
        except DataError as exc:
            log.error("bad input data: %s", exc)
            sys.exit(2)
        out = Path(cfg.get("output_dir") or ".")
        paths = write_reports(report, out, data=data)
        print_report(report)
        print(f"reports: {', '.join(str(p) for p in paths)}")
        if report["violations"]:
            print(f"FAILED: {len(report['violations'])} violations:\n  " + "\n  ".join(report["violations"]))
            sys.exit(1)

    main()


if __name__ == "__main__":
    _main()
