"""Grad-CAM overlays of a PACS study as DICOM Secondary Captures labelled "NOT FOR DIAGNOSIS", stored back with STOW-RS.

    python -m evaluation.pacs_overlay --dicomweb URL --study UID [--series UID] --run RUN_DIR|latest
        [--log-dir logs] [--store] [--png-dir DIR]

For each image series of the study (report-like series and instances written by medops are skipped): every
instance is read with the model's input contract and scored by the training run's best checkpoint (its temperature
applied, as in the exported model); the image with the highest P(positive class) -- the one that decides the series
under :data:`medops.dicom_sr.AGGREGATION_RULE` -- gets a Grad-CAM map of the positive class logit
(:func:`evaluation.explain.gradcam`) over the source image enlarged to at least 512 px (:func:`readable_overlay`:
the map's opacity follows its value, transparent below :data:`HEAT_FLOOR` of its maximum and at most
:data:`HEAT_ALPHA_MAX`, so the anatomy stays visible under it; a colour bar under the image), and "NOT FOR
DIAGNOSIS" with the model, the probability and the operating point burned into the pixels
(:func:`medops.dicom_sr.burn_label`). The Secondary
Capture (:func:`medops.dicom_sr.overlay_capture`) references the source image and goes into a new series of the
study with ``--store``; ``--png-dir`` also writes each overlay as ``overlay_<n>.png`` (pixels only).

Privacy: printed lines name series by :func:`medops.pacs.uid_key` digests; the PNGs hold pixels only (no header).
The Secondary Captures sent back carry the source study's patient and study identifiers (docs/privacy.md).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from evaluation.explain import HEAT_CMAP, display_map, gradcam
from medops import ImageReadError, preprocess, read_image
from medops.deid import quiet_pydicom
from medops.dicom_sr import NOT_FOR_DIAGNOSIS, burn_label, overlay_capture
from medops.pacs import NON_IMAGE_MODALITIES, PacsError, as_file, find_series, open_client, retrieve_series, store

MIN_WIDTH = 512
HEAT_ALPHA_MAX = 0.45  # opacity of the map where Grad-CAM is at its maximum
HEAT_FLOOR = 0.3  # below this share of the map's maximum nothing is drawn: the image shows as it is
HEAT_GAMMA = 1.5  # opacity rises as the power 1.5 of the value above the floor: mid values stay faint


def _model(run: str, log_dir: str) -> tuple[Any, dict[str, Any]]:
    """The run's network (eval mode) and what the label needs: classes, positive index, threshold, temperature."""
    from export.build import clinical_evaluation
    from export.source import ExportError, load_source

    source = load_source(run=run, log_dir=log_dir)
    op, _ = clinical_evaluation(source)  # what export puts into the version: evaluate's, else training's
    names = source.class_names
    if op.get("positive_class") not in names or op.get("threshold") is None:
        raise ExportError(f"run {run}: no operating point (positive class and threshold) for its best checkpoint; "
                          "the overlay states the decision it shows: run python -m evaluation.evaluate first")
    positive = names.index(op["positive_class"])
    channels, size, _ = source.input_shape
    return source.module.net.eval(), {
        "class_names": names, "positive": positive, "threshold": op.get("threshold"),
        "temperature": float(op.get("temperature") or 1.0), "channels": channels, "size": size,
        "name": f"run {Path(source.checkpoint).parent.parent.name}", "checkpoint": Path(source.checkpoint).name}


def _read(datasets: Sequence[Dataset], spec: dict[str, Any]) -> tuple[list[Dataset], list[np.ndarray], np.ndarray]:
    """The readable image instances, their native images (HxWxC uint8) and the model batch."""
    kept, native, batch = [], [], []
    for number, ds in enumerate(datasets, start=1):
        if str(ds.get("Manufacturer", "")) == "medops" or "PixelData" not in ds:
            continue
        try:
            with quiet_pydicom(), as_file(ds) as path:
                image = read_image(path)
        except ImageReadError as exc:  # reported (its reason holds no header value); the others go on
            print(f"  instance {number}: not read ({exc.reason})", file=sys.stderr)
            continue
        kept.append(ds)
        native.append(image)
        batch.append(preprocess(image, spec["size"], spec["channels"]))
    return kept, native, np.stack(batch) if batch else np.zeros((0,))


def _enlarged(image: np.ndarray, min_width: int) -> np.ndarray:
    """HxWxC uint8 (C 1 or 3) as HxWx3 float in [0, 1], enlarged by an integer factor (bicubic) to >= ``min_width``."""
    rgb = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image[..., :3]
    scale = max(1, int(np.ceil(min_width / rgb.shape[1])))
    if scale > 1:
        rgb = np.asarray(Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).resize(
            (rgb.shape[1] * scale, rgb.shape[0] * scale), Image.Resampling.BICUBIC))
    return rgb.astype(np.float32) / 255.0


def heat_opacity(shown: np.ndarray) -> np.ndarray:
    """The map's opacity from its shown value (0..1 of its maximum): 0 up to :data:`HEAT_FLOOR`, then rising
    (power :data:`HEAT_GAMMA`) to :data:`HEAT_ALPHA_MAX` at the maximum."""
    return HEAT_ALPHA_MAX * np.clip((shown - HEAT_FLOOR) / (1.0 - HEAT_FLOOR), 0.0, 1.0) ** HEAT_GAMMA


def colour_bar(width: int, cmap: str = HEAT_CMAP) -> np.ndarray:
    """A legend strip (HxWx3 uint8) for :func:`readable_overlay`: the colours from the floor to the maximum, at
    the opacity they get, over mid grey, between "Grad-CAM low" and "high (this image's maximum)"."""
    height = max(16, width // 26)
    font = ImageFont.load_default(size=max(8, int(height * 0.7)))
    strip = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(strip)
    left_text, right_text = "Grad-CAM: low", "high"
    left = int(draw.textlength(left_text, font=font)) + 12
    right = width - int(draw.textlength(right_text, font=font)) - 12
    values = np.linspace(0.0, 1.0, max(right - left, 2))
    alpha = heat_opacity(values)[:, None]
    colours = (1 - alpha) * 0.5 + alpha * matplotlib.colormaps[cmap](values)[:, :3]
    bar = np.repeat(np.rint(colours * 255).astype(np.uint8)[None], height - 6, axis=0)
    strip.paste(Image.fromarray(bar), (left, 3))
    draw.text((6, height // 2), left_text, fill=(255, 255, 255), font=font, anchor="lm")
    draw.text((width - 6, height // 2), right_text, fill=(255, 255, 255), font=font, anchor="rm")
    return np.asarray(strip, dtype=np.uint8)


def readable_overlay(image: np.ndarray, heat: np.ndarray, min_width: int = MIN_WIDTH,
                     cmap: str = HEAT_CMAP) -> np.ndarray:
    """The source image (HxWxC uint8) enlarged to at least ``min_width`` with the Grad-CAM map ``heat`` (any HxW,
    resized bilinearly) over it, its opacity following its value (:func:`heat_opacity`), and the colour bar under
    it: HxWx3 uint8. Where the map is below :data:`HEAT_FLOOR` of its maximum the pixels are the image's own."""
    rgb = _enlarged(image, min_width)
    height, width = rgb.shape[:2]
    hm = np.asarray(heat, dtype=np.float32)
    if hm.shape != (height, width):
        hm = np.asarray(Image.fromarray(hm, mode="F").resize((width, height), Image.Resampling.BILINEAR))
    shown = display_map(hm)
    alpha = heat_opacity(shown)[..., None]
    blend = (1.0 - alpha) * rgb + alpha * matplotlib.colormaps[cmap](shown)[..., :3]
    picture = np.clip(np.rint(blend * 255.0), 0, 255).astype(np.uint8)
    return np.concatenate([picture, colour_bar(width, cmap)], axis=0)


def series_overlay(net: Any, spec: dict[str, Any], native: list[np.ndarray], batch: np.ndarray
                   ) -> tuple[int, float, np.ndarray]:
    """The index of the image with the highest P(positive), that probability and its labelled overlay (RGB)."""
    with torch.no_grad():
        logits = net(torch.from_numpy(batch)).float() / spec["temperature"]
    probs = torch.softmax(logits, dim=1)[:, spec["positive"]].numpy()
    best = int(np.argmax(probs))
    heat = np.asarray(gradcam(net, batch[best : best + 1], target_class=spec["positive"])[0], dtype=np.float32)
    rgb = readable_overlay(native[best], heat)
    positive = spec["class_names"][spec["positive"]]
    threshold = spec["threshold"]
    decision = f" >= {threshold:.3f}: {positive}" if probs[best] >= threshold else f" < {threshold:.3f}: not {positive}"
    lines = [f"Grad-CAM of the {positive} logit; {spec['name']}",
             f"P({positive}) = {probs[best]:.3f}{decision}"]
    return best, float(probs[best]), burn_label(rgb, lines)


def run(args: argparse.Namespace) -> int:
    """Overlays for every image series of the study; the exit status."""
    net, spec = _model(args.run, args.log_dir)
    client = open_client(args.dicomweb, timeout=args.timeout)
    series_uid, captures = generate_uid(), []
    for ref in find_series(client, args.study, args.series):
        if ref.modality.upper() in NON_IMAGE_MODALITIES:
            continue
        kept, native, batch = _read(retrieve_series(client, ref), spec)
        if not kept:
            print(f"series {ref.key}: no readable image, skipped")
            continue
        best, probability, rgb = series_overlay(net, spec, native, batch)
        positive = spec["class_names"][spec["positive"]]
        captures.append(overlay_capture(
            kept[best], rgb, series_uid=series_uid, instance_number=len(captures) + 1,
            description=f"medops Grad-CAM P({positive}) - {NOT_FOR_DIAGNOSIS}"))
        print(f"series {ref.key}: image {best + 1} of {len(kept)} has the highest P({positive}) = {probability:.3f}")
        if args.png_dir is not None:
            args.png_dir.mkdir(parents=True, exist_ok=True)
            png = args.png_dir / f"overlay_{len(captures)}.png"
            Image.fromarray(rgb).save(png)
            print(f"wrote {png}")
    if args.store and captures:
        store(client, captures, args.study)
        print(f"stored {len(captures)} overlay secondary capture(s) in the study (STOW-RS)")
    return 0 if captures else 1


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m evaluation.pacs_overlay", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dicomweb", required=True, metavar="URL", help="DICOMweb root, e.g. http://pacs:8042/dicom-web")
    ap.add_argument("--study", required=True, metavar="UID", help="StudyInstanceUID")
    ap.add_argument("--series", default=None, metavar="UID", help="only this SeriesInstanceUID")
    ap.add_argument("--run", required=True, help="training run folder (or 'latest') whose best checkpoint explains")
    ap.add_argument("--log-dir", default="logs", help="where --run latest looks (default: logs)")
    ap.add_argument("--store", action="store_true", help="store the secondary captures in the study (STOW-RS)")
    ap.add_argument("--png-dir", type=Path, default=None, help="also write each overlay as a PNG here")
    ap.add_argument("--timeout", type=float, default=60.0, help="DICOMweb request timeout in s (default: 60)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from export.source import ExportError

    try:
        return run(args)
    except (PacsError, ExportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
