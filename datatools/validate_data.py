"""Data-quality checks of a training dataset, with the same data config as training.

``python -m datatools.validate_data [data=folder data.path=...]`` writes ``report.json``, ``report.md`` and
``report.html`` into ``output_dir`` (default: the Hydra run folder), prints a summary and exits 1 on
leakage (exact duplicates across splits, a patient in two splits) or corrupt files, unless
``data.validation.allow_leakage=true`` / ``data.validation.allow_corrupt=true``.

Checks: counts per split and class and the class-imbalance ratio; unreadable or empty files (path and
reason); image geometry and, for folders, the distribution of original sizes with outliers; exact
duplicates (pixel hash) within and across splits; near-duplicates across splits (64-bit dHash, Hamming
distance <= ``near_duplicate_hamming``); patients/studies in more than one split (CSV ``patient_id`` or
``study_id``); intensity statistics per split and a shift warning when the standardized mean difference
of per-image means exceeds ``shift_threshold``. Training runs the same checks after loading the data
(:func:`run_validation`).
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import sys
from collections import Counter, defaultdict
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from medops.datasets import SPLITS, DataError, FolderDataset, MedMNISTFile, SplitArrays, source_from_config

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "enabled": True,
    "allow_leakage": False,
    "allow_corrupt": False,
    "near_duplicate_hamming": 4,
    "near_duplicates": "auto",  # auto: only up to near_duplicate_max_images images; true/false: always/never
    "near_duplicate_max_images": 50_000,
    "shift_threshold": 0.5,
    "max_listed": 50,  # examples listed per finding in the reports
}
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


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


def _bin_means(a: np.ndarray, axis: int, bins: int) -> np.ndarray:
    n = a.shape[axis]
    edges = np.linspace(0, n, bins + 1)
    starts = np.minimum(np.floor(edges[:-1]).astype(int), n - 1)
    ends = np.maximum(np.ceil(edges[1:]).astype(int), starts + 1)
    parts = [a.take(np.arange(s, e), axis=axis).mean(axis=axis, keepdims=True)
             for s, e in zip(starts, ends, strict=True)]
    return np.concatenate(parts, axis=axis)


def dhash(images: np.ndarray) -> np.ndarray:
    """64-bit difference hashes (uint64) of N x H x W [x C] images: grey 8 x 9 area downscale, left < right."""
    grey = images.astype(np.float32)
    if grey.ndim == 4:
        grey = grey.mean(axis=-1)
    small = _bin_means(_bin_means(grey, 1, 8), 2, 9)  # N x 8 x 9
    bits = (small[:, :, 1:] > small[:, :, :-1]).reshape(len(images), 64)
    return np.packbits(bits, axis=1).view(">u8").reshape(-1).astype(np.uint64)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances (len(a) x len(b), uint8) between uint64 hashes."""
    x = np.bitwise_xor(a[:, None], b[None, :])
    return _POPCOUNT[x.view(np.uint8).reshape(*x.shape, 8)].sum(axis=-1, dtype=np.uint8)


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
    counts = {s: np.bincount(data.labels[s], minlength=len(names)).tolist() for s in present}
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


def _within_split_duplicates(present: list[str], hashes: dict[str, list[str]],
                             where: dict[str, list[tuple[str, int]]], ids: dict[str, list[str]],
                             limit: int) -> dict[str, Any]:
    """Groups of identical images inside each split."""
    within = {}
    for s in present:
        c = Counter(hashes[s])
        groups = [h for h, n in c.items() if n > 1]
        within[s] = {"groups": len(groups), "images": int(sum(c[h] for h in groups)),
                     "examples": [[ids[s][i] for ss, i in where[h] if ss == s] for h in groups[:limit]]}
    return within


def _cross_split_duplicates(data: SplitArrays, where: dict[str, list[tuple[str, int]]], ids: dict[str, list[str]],
                            limit: int) -> dict[str, Any]:
    """Groups of identical images found in more than one split (leakage), with conflicting labels."""
    names = data.class_names
    cross_groups = [h for h, locs in where.items() if len({s for s, _ in locs}) > 1]
    pair_counts: Counter[str] = Counter()
    conflicting = 0
    examples = []
    for h in cross_groups:
        locs = where[h]
        splits_here = sorted({s for s, _ in locs}, key=SPLITS.index)
        for a, b in combinations(splits_here, 2):
            pair_counts[f"{a}/{b}"] += 1
        labels_here = {int(data.labels[s][i]) for s, i in locs}
        conflicting += len(labels_here) > 1
        if len(examples) < limit:
            examples.append({"images": [ids[s][i] for s, i in locs],
                             "labels": [names[int(data.labels[s][i])] for s, i in locs]})
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
    within = _within_split_duplicates(present, hashes, where, ids, limit)
    cross = _cross_split_duplicates(data, where, ids, limit)
    for s in present:
        if within[s]["groups"]:
            warnings.append(f"{within[s]['groups']} groups of exact duplicates within {s} "
                            f"({within[s]['images']} images)")
    if cross["groups"]:
        msg = (f"leakage: {cross['groups']} exact-duplicate groups across splits ({cross['images']} images; "
               f"{cross['by_splits']}), e.g. "
               + "; ".join(" = ".join(e["images"]) for e in cross["examples"][:3]))
        _flag(msg, settings["allow_leakage"], warnings, violations)
    return {"within_split": within, "cross_split": cross}


def _near_duplicate_pairs(data: SplitArrays, present: list[str], hashes: dict[str, list[str]],
                          ids: dict[str, list[str]], thr: int, limit: int) -> tuple[Counter[str], list[dict[str, Any]]]:
    """Pairs of images in different splits whose dHashes differ in at most ``thr`` bits (exact duplicates left out)."""
    dh = {s: dhash(data.images[s]) for s in present}
    n_pairs: Counter[str] = Counter()
    near_examples = []
    for a, b in combinations(present, 2):
        for start in range(0, len(dh[a]), 1024):
            d = hamming(dh[a][start:start + 1024], dh[b])
            ia, ib = np.nonzero(d <= thr)
            for i, j in zip(ia + start, ib, strict=True):
                if hashes[a][i] == hashes[b][j]:
                    continue  # exact duplicate, reported above
                n_pairs[f"{a}/{b}"] += 1
                if len(near_examples) < limit:
                    near_examples.append({"a": ids[a][i], "b": ids[b][j], "distance": int(d[i - start, j])})
    return n_pairs, near_examples


def check_near_duplicates(data: SplitArrays, present: list[str], hashes: dict[str, list[str]],
                          ids: dict[str, list[str]], settings: dict[str, Any], warnings: list[str]) -> dict[str, Any]:
    """Near-duplicates across splits (dHash Hamming distance), skipped above ``near_duplicate_max_images`` on auto."""
    total = sum(int(len(data.labels[s])) for s in present)
    mode = settings["near_duplicates"]
    run_near = (mode is True or str(mode).lower() == "true") or (
        str(mode).lower() == "auto" and total <= int(settings["near_duplicate_max_images"]))
    near: dict[str, Any] = {"enabled": bool(run_near), "hash": "dhash64",
                            "hamming": int(settings["near_duplicate_hamming"])}
    if not run_near:
        near["skipped"] = f"{total} images > near_duplicate_max_images" if str(mode).lower() == "auto" else "disabled"
        return near
    thr = int(settings["near_duplicate_hamming"])
    n_pairs, near_examples = _near_duplicate_pairs(data, present, hashes, ids, thr, int(settings["max_listed"]))
    near.update(pairs=int(sum(n_pairs.values())), by_splits=dict(n_pairs), examples=near_examples)
    if n_pairs:
        warnings.append(f"{sum(n_pairs.values())} near-duplicate pairs across splits "
                        f"(dHash Hamming <= {thr}): {dict(n_pairs)}")
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
    report["geometry"] = check_sizes(data, present, meta, ids, int(settings["max_listed"]), warnings)
    hashes = {s: pixel_hashes(data.images[s]) for s in present}
    report["duplicates"] = check_exact_duplicates(data, present, hashes, ids, settings, warnings, violations)
    report["near_duplicates"] = check_near_duplicates(data, present, hashes, ids, settings, warnings)
    report["patients"] = check_patients(present, meta, settings, warnings, violations)
    report["intensity"] = check_intensity_shift(data, present, settings, warnings)
    return report


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The short form stored in run.json under ``data_validation``."""
    dup = report.get("duplicates", {})
    return {
        "corrupt": report.get("corrupt", {}).get("count", 0),
        "duplicates_within": {s: v["groups"] for s, v in dup.get("within_split", {}).items()},
        "leakage_exact_duplicates": dup.get("cross_split", {}).get("groups", 0),
        "leakage_by_splits": dup.get("cross_split", {}).get("by_splits", {}),
        "near_duplicate_pairs": report.get("near_duplicates", {}).get("pairs"),
        "patients_in_multiple_splits": report.get("patients", {}).get("in_multiple_splits"),
        "imbalance_ratio": report.get("imbalance_ratio", {}),
        "intensity_shift": report.get("intensity", {}).get("shift", []),
        "warnings": report.get("warnings", []),
        "violations": report.get("violations", []),
        "settings": report.get("settings", {}),
    }


def run_validation(dm: FolderDataset | MedMNISTFile | Any, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Gather and check ``dm``'s data; returns the report (does not raise on violations)."""
    data, errors, meta = gather(dm)
    return validate(data, errors, meta, settings, source=str(getattr(dm, "path", "")) or None)


# ------------------------------------------------------------------------------------------- reports


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
    for s, w in dup.get("within_split", {}).items():
        rows.append((f"exact duplicates within {s}", f"{w['groups']} groups, {w['images']} images"))
    if cross:
        rows.append(("exact duplicates across splits (leakage)",
                     f"{cross['groups']} groups, {cross['images']} images {cross['by_splits']}; "
                     f"{cross['conflicting_labels']} with conflicting labels"))
        for e in cross["examples"][:10]:
            rows.append(("  duplicate", " = ".join(e["images"])))
    near = report.get("near_duplicates", {})
    if near:
        rows.append(("near-duplicates across splits",
                     f"{near.get('pairs')} pairs (Hamming <= {near.get('hamming')}) {near.get('by_splits', '')}"
                     if near.get("enabled") else f"skipped ({near.get('skipped')})"))
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


def to_html(report: dict[str, Any]) -> str:
    esc = html.escape
    rows = "\n".join(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in _rows(report))
    items = lambda xs: "".join(f"<li>{esc(x)}</li>" for x in xs) or "<li>none</li>"  # noqa: E731
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>Data validation report</title>"
        "<style>body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #999;"
        "padding:3px 8px;text-align:left}</style></head><body><h1>Data validation report</h1>"
        f"<table><tr><th>check</th><th>result</th></tr>\n{rows}\n</table>"
        f"<h2>Violations</h2><ul>{items(report['violations'])}</ul>"
        f"<h2>Warnings</h2><ul>{items(report['warnings'])}</ul></body></html>\n"
    )


def write_reports(report: dict[str, Any], out_dir: Path, stem: str = "report") -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md", out_dir / f"{stem}.html"]
    paths[0].write_text(json.dumps(report, indent=2, default=str))
    paths[1].write_text(to_markdown(report))
    paths[2].write_text(to_html(report))
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
            report = run_validation(dm, settings)
        except DataError as exc:
            log.error("bad input data: %s", exc)
            sys.exit(2)
        out = Path(cfg.get("output_dir") or ".")
        paths = write_reports(report, out)
        print_report(report)
        print(f"reports: {', '.join(str(p) for p in paths)}")
        if report["violations"]:
            print(f"FAILED: {len(report['violations'])} violations:\n  " + "\n  ".join(report["violations"]))
            sys.exit(1)

    main()


if __name__ == "__main__":
    _main()
