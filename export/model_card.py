"""Model cards (Mitchell et al., "Model Cards for Model Reporting", FAT* 2019) as Markdown and JSON."""

from __future__ import annotations

from typing import Any

INTENDED_USE = (
    "Research and engineering evaluation of automated image classification on data like the training data. "
    "Outputs are class probabilities for a single image."
)
OUT_OF_SCOPE = (
    "Not a medical device and not for clinical use: do not use it to diagnose, triage or treat patients. "
    "Not validated on images from other sites, scanners, modalities, resolutions or populations than the "
    "training data; not for images outside the input contract below."
)
LIMITATIONS = [
    "Low-resolution inputs remove detail a clinician would use.",
    "Performance under distribution shift (new scanners, sites, populations) is unknown.",
]
METRIC_NAMES = {"auroc": "AUROC", "acc": "accuracy", "precision": "precision (unweighted mean over the {over})",
                "recall": "recall (unweighted mean over the {over})", "f1": "F1 (unweighted mean over the {over})",
                "qwk": "quadratic-weighted kappa", "mae": "mean absolute grade error",
                "loss": "loss (training objective)"}


def limitations(card: dict[str, Any]) -> list[str]:
    """The card's limitations: the fixed ones and what this version's data, calibration and operating point
    allow."""
    metrics, counts = card["metrics"], card["evaluation_data"].get("counts") or []
    per_image = card["input_contract"].get("task") != "multilabel"  # multi-label counts are positives per label
    size = f"{sum(counts)} test images" if per_image and counts and all(isinstance(c, int) for c in counts) \
        else "its test split"
    data = (f"Trained and evaluated on one dataset; the test figures rest on {size}, so read them with their "
            "intervals (clinical evaluation), and they say nothing of other sites or scanners.")
    if metrics.get("temperature_in_graph"):
        calibration = ("Probabilities are temperature-scaled on validation; read them as risks only as far as the "
                       "calibration figures above allow.")
    else:
        calibration = "The served probabilities are not temperature-scaled: do not read them as risks."
    chosen = " The operating point was chosen on validation." if metrics.get("operating_point") else ""
    return [data, LIMITATIONS[0], calibration + chosen, *LIMITATIONS[1:]]


def per_class_figures(confusion: list[list[int]] | None, class_names: list[str]) -> list[dict[str, Any]]:
    """Sensitivity (recall) and precision per class from a confusion matrix (rows: true class)."""
    if not confusion:
        return []
    rows = []
    for i, name in enumerate(class_names):
        tp = confusion[i][i]
        support = sum(confusion[i])
        predicted = sum(row[i] for row in confusion)
        rows.append({"class": name, "support": support,
                     "sensitivity": tp / support if support else None,
                     "precision": tp / predicted if predicted else None})
    return rows


def architecture(model: dict[str, Any]) -> str:
    """The architecture as a reader wants it: ``resnet18``, or ``deep ensemble of 3 x resnet18, ... one graph``."""
    arch, members, tta = model.get("arch"), int(model.get("members") or 1), model.get("tta") or "none"
    if members == 1 and tta == "none":
        return str(arch)
    views = "" if tta == "none" else ", test-time augmentation: mean with the horizontal mirror"
    return f"deep ensemble of {members} x {arch} (mean of the members' logits{views}; one graph)"


def build_card(meta: dict[str, Any]) -> dict[str, Any]:
    """The model card as a JSON-able dict, from the version's metadata."""
    card = _card_sections(meta)
    card["limitations"] = limitations(card)
    return card


def _card_sections(meta: dict[str, Any]) -> dict[str, Any]:
    data = meta.get("data") or {}
    return {
        "model_details": {
            "name": meta["name"], "version": meta["version"], "architecture": architecture(meta["model"]),
            "parameters": meta["model"].get("parameters"), "created": meta["created"],
            "format": meta["target"], "license_of_training_data": data.get("licence"),
        },
        "intended_use": INTENDED_USE,
        "out_of_scope_use": OUT_OF_SCOPE,
        "input_contract": meta["input"],
        "training_data": {"source": data.get("source"), "fingerprint": data.get("fingerprint"),
                          "counts": (data.get("counts") or {}).get("train"), "class_names": meta["class_names"]},
        "evaluation_data": {"split": "test", "counts": (data.get("counts") or {}).get("test"),
                            "source": data.get("source")},
        "metrics": {"val": meta["metrics"].get("val"), "test": meta["metrics"].get("test"),
                    "per_class_test": per_class_figures(meta["metrics"].get("confusion_matrix"), meta["class_names"]),
                    "operating_point": meta["metrics"].get("threshold"),
                    "positive_class": data.get("positive_class"),
                    "calibration": meta["metrics"].get("calibration"),
                    "abnormal": meta["metrics"].get("abnormal"), "labels": meta["metrics"].get("labels"),
                    "temperature_in_graph": (meta.get("operating_point") or {}).get("temperature")},
        "clinical_evaluation": meta.get("evaluation"),
        "out_of_distribution": meta.get("ood"),
        "calibrated_operating_point": meta.get("operating_point"),
        "parity": meta["parity"],
        "precision": meta.get("precision"),
        "monitoring": meta.get("drift"),
        "limitations": None,
        "lineage": meta["lineage"],
    }


def precision_line(precision: dict[str, Any] | None) -> str:
    """The precision of a version, for the model card and the export output: FP32, or INT8 with its method,
    calibration and the clinical gate's figures (``metadata.json`` ``precision``, written by export/quantize.py);
    versions exported before precision was recorded are FP32."""
    if not precision or precision.get("precision") != "int8":
        return "Precision: FP32 (float32 weights and activations)."
    g, cal, lim = precision["gate"], precision["calibration"], precision["limits"]
    kept = ", ".join(precision["keep_float"]) or "nothing"
    c = precision.get("choice")  # versions before the choice moved to validation: chosen on the test split
    chosen = (f"chosen on {c['images']} {c['split']} images (AUROC {c['auroc_diff']:+.4f}, accuracy "
              f"{c['accuracy_diff']:+.4f}, same decision {c['decision_agreement']:.2%}); " if c else "")
    return (f"Precision: INT8 (QDQ, per-channel int8 weights, "
            f"{precision['activations']} activations; calibrated on {cal['images']} "
            f"{cal['split']} images, {precision['method']}; kept in float: {kept}; {chosen}"
            f"gate on {g['images']} {g.get('split', 'test')} images "
            f"against FP32: AUROC {g['auroc_fp32']:.4f} -> {g['auroc_int8']:.4f} ({g['auroc_diff']:+.4f}, limit "
            f"{lim['auroc']}), accuracy {g['accuracy_fp32']:.4f} -> {g['accuracy_int8']:.4f} "
            f"({g['accuracy_diff']:+.4f}, limit {lim['accuracy']}), same decision ({g['decision']}) for "
            f"{g['decision_agreement']:.2%} of images (limit {lim['decision_agreement']:.0%})).")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "-" if value is None else str(value)


def render_markdown(card: dict[str, Any]) -> str:
    d = card["model_details"]
    lines = [
        f"# Model card: {d['name']} v{d['version']}", "",
        "## Model details", "",
        f"- Architecture: {d['architecture']} ({_fmt(d['parameters'])} parameters), format `{d['format']}`",
        f"- {precision_line(card.get('precision'))}",
        f"- Created: {d['created']}",
        f"- Training data licence: {_fmt(d['license_of_training_data'])}", "",
        "## Intended use", "", card["intended_use"], "",
        "## Out-of-scope use", "", card["out_of_scope_use"], "",
        "## Input contract", "",
    ]
    lines += [f"- {k}: `{v}`" for k, v in card["input_contract"].items()]
    td, ed = card["training_data"], card["evaluation_data"]
    lines += ["", "## Training data", "",
              f"- Source: `{td['source']}`", f"- Fingerprint: `{td['fingerprint']}`",
              f"- Classes: {', '.join(td['class_names'])}", f"- Images per class (train): {td['counts']}", "",
              "## Evaluation data", "", f"- Test split of the same source, images per class: {ed['counts']}", "",
              "## Metrics (best checkpoint)", ""]
    lines += _metrics_table(card["metrics"], card["input_contract"].get("task"))
    per_class = card["metrics"]["per_class_test"]
    if per_class:
        lines += ["", "| class (test, arg-max) | support | sensitivity | precision |", "|---|---|---|---|"]
        lines += [f"| {r['class']} | {r['support']} | {_fmt(r['sensitivity'])} | {_fmt(r['precision'])} |"
                  for r in per_class]
    lines += _positive_and_calibration(card["metrics"])
    op = card["metrics"]["operating_point"]
    if op:
        lines += ["", f"Operating point ({op['method']}, P({op['positive_class']}) >= {op['value']:.4f}): test "
                      f"accuracy {_fmt(op['test']['acc'])}, sensitivity {_fmt(op['test']['sensitivity'])}, "
                      f"specificity {_fmt(op['test']['specificity'])}."]
    lines += _abnormal(card["metrics"].get("abnormal"))
    lines += _label_thresholds(card["metrics"].get("labels"))
    lines += render_evaluation(card.get("clinical_evaluation"), card.get("calibrated_operating_point"))
    lines += ["", "## Export parity", ""]
    lines += [f"- {p['engine']}: max |prob diff| {p['max_abs_diff']:.2e} (tolerance {p['tolerance']:.0e}), "
              f"argmax agreement {p['argmax_agreement']:.2%}"
              + (f", same decision ({p['decision']}) {p['decision_agreement']:.2%}" if "decision" in p else "")
              + f" on {p['images']} held-out images, batch sizes {p['batch_sizes']}" for p in card["parity"]]
    drift = card.get("monitoring")
    lines += ["", "## Monitoring", ""]
    if drift:
        online = drift.get("online") or {}
        lines += [f"- Drift reference: {drift['n']} images of the {drift['reference']} split "
                  f"(`{drift['file']}`); features: {', '.join(drift['features'])}; embeddings: {drift['embeddings']}.",
                  f"- Check new data: `python -m serve drift <images> --name {card['model_details']['name']}`; "
                  f"online: rolling window of {online.get('window')} images, tested every {online.get('every')}, "
                  "Prometheus gauges `medops_drift_*` on Triton's metrics port."]
    else:
        lines += ["- No drift reference (exported with `drift.enabled=false`)."]
    lines += _out_of_distribution(card.get("out_of_distribution"), card["input_contract"].get("modalities"))
    lines += ["", "## Limitations", ""] + [f"- {item}" for item in card["limitations"]]
    lines += ["", "## Lineage", ""] + [f"- {k}: `{_fmt(v)}`" for k, v in card["lineage"].items()]
    return "\n".join(lines) + "\n"


def _metrics_table(metrics: dict[str, Any], task: str | None) -> list[str]:
    """The training run's figures of the best checkpoint, saying which decision they are taken at: precision,
    recall and F1 averaged over the classes are not the finding's own figures, which a binary card gives at the
    operating point below."""
    if task == "multilabel":
        rule = "Accuracy, precision, recall and F1 at P >= 0.5 for each label, as training logged them."
    else:
        rule = "Accuracy, precision, recall and F1 at the arg-max class, as training logged them."
    if metrics.get("operating_point"):
        rule += " The finding's own sensitivity and specificity are the operating point's, below."
    over = "labels" if task == "multilabel" else "classes"
    lines = [rule, "", "| metric | val | test |", "|---|---|---|"]
    val, test = metrics["val"] or {}, metrics["test"] or {}
    for key in ("auroc", "acc", "precision", "recall", "f1", "qwk", "mae", "loss"):  # qwk, mae: ordinal tasks
        if key in val or key in test:
            name = METRIC_NAMES[key].format(over=over)
            lines.append(f"| {name} | {_fmt(val.get(key))} | {_fmt(test.get(key))} |")
    return lines


def _label_thresholds(labels: dict[str, Any] | None) -> list[str]:
    """Multi-label versions: every label's threshold (chosen on validation) and its test figures at it."""
    if not labels or not labels.get("thresholds"):
        return []
    chosen, test = set(labels.get("chosen_on_val") or []), labels.get("test") or {}
    lines = ["", f"Per-label decisions ({labels.get('method')}; a label is reported present when its probability is at "
                 "or above its threshold; 0.5 where validation held only one value of the label):", "",
             "| label | threshold | chosen on | test AUROC | sensitivity | specificity | precision | positives |",
             "|---|---|---|---|---|---|---|---|"]
    for name, thr in labels["thresholds"].items():
        f = test.get(name) or {}
        lines.append(f"| {name} | {thr:.4f} | {'val' if name in chosen else 'default 0.5'} | {_fmt(f.get('auroc'))} | "
                     f"{_fmt(f.get('sensitivity'))} | {_fmt(f.get('specificity'))} | {_fmt(f.get('precision'))} | "
                     f"{_fmt(f.get('positives'))} |")
    return lines


def _abnormal(abnormal: dict[str, Any] | None) -> list[str]:
    """The declared abnormal set's decision (multi-class tasks)."""
    if not abnormal:
        return []
    test = abnormal.get("test") or {}
    return ["", f"Abnormal (the finding across classes): **{', '.join(abnormal['classes'])}** vs "
                f"{', '.join(abnormal['normal_classes'])}; P(abnormal) = the sum of their probabilities, decision at "
                f"P(abnormal) >= {abnormal['value']:.4f} ({abnormal['method']}): test AUROC {_fmt(test.get('auroc'))}, "
                f"sensitivity {_fmt(test.get('sensitivity'))}, specificity {_fmt(test.get('specificity'))}, "
                f"PPV {_fmt(test.get('ppv'))}, NPV {_fmt(test.get('npv'))}."]


def _out_of_distribution(ood: dict[str, Any] | None, modalities: list[str] | None) -> list[str]:
    """The per-image out-of-distribution score and the training modality the served model checks inputs against."""
    lines = ["", "## Inputs unlike the training data", ""]
    if ood and ood.get("threshold") is not None:
        lines += [f"- Every answer carries `ood_score`, the Mahalanobis distance of the image's {ood['dimensions']}-d "
                  f"penultimate features to the nearest class mean ({ood['fitted_on']} {ood['fit_split']} images, "
                  f"shared Ledoit-Wolf covariance), and `ood_flag` = score > {ood['threshold']:.3f}, the threshold "
                  f"that passes {1 - ood['val_flagged']:.1%} of the {ood['threshold_on']} {ood['threshold_split']} "
                  "images. A flagged answer should not be relied on."]
    else:
        lines += [f"- No out-of-distribution score ({(ood or {}).get('skipped', 'not exported')})."]
    lines += [f"- Training data modality: {', '.join(modalities)}; DICOM inputs of another Modality get a warning."
              if modalities else "- Training data modality: unknown (no DICOM Modality check)."]
    return lines


def _positive_and_calibration(metrics: dict[str, Any]) -> list[str]:
    """The positive class the binary figures are for, and the calibration the exported graph carries."""
    lines = []
    if metrics.get("positive_class"):
        lines += ["", f"Positive class (the finding): **{metrics['positive_class']}**; sensitivity, specificity "
                      "and the operating point are for it."]
    cal = metrics.get("calibration") or {}
    test = cal.get("test") or {}
    consistency = test.get("consistency") or {}
    noise = (f" A perfectly calibrated model with these probabilities would show a test ECE of "
             f"{_fmt(consistency.get('null_median'))} (median; 95th percentile {_fmt(consistency.get('null_p95'))}) on "
             f"these {consistency.get('n')} images; it would reach the observed ECE in "
             f"{consistency['p_value']:.0%} of such test sets."
             if consistency else "")
    in_graph = metrics.get("temperature_in_graph")
    if cal.get("temperature") and in_graph and abs(in_graph - cal["temperature"]) < 1e-6:
        lines += ["", f"Calibration: temperature scaling fitted on validation (T = {cal['temperature']:.3f}, inside "
                      f"the exported graph); test ECE {_fmt(test.get('ece_before'))} before, "
                      f"{_fmt(test.get('ece_after'))} after (15 bins).{noise}"]
    elif in_graph:
        lines += ["", f"Calibration: the exported graph applies T = {in_graph:.3f}, fitted on validation by "
                      f"`evaluation.evaluate` (the clinical evaluation below has its figures)."]
    elif cal.get("temperature"):
        lines += ["", f"Calibration: training fitted T = {cal['temperature']:.3f} on validation, but this version's "
                      "graph is NOT temperature-scaled (its operating point was chosen without one): it serves the "
                      f"uncalibrated probabilities, test ECE {_fmt(test.get('ece_before'))} (15 bins)."]
    elif test:
        why = cal.get("not_calibrated") or "not calibrated (`calibrate=false`)"
        lines += ["", f"Calibration: {why}; test ECE {_fmt(test.get('ece_before'))}."]
    return lines


def render_evaluation(evaluation: dict[str, Any] | None, op: dict[str, Any] | None) -> list[str]:
    """The ``evaluation.evaluate`` figures: metrics with 95% bootstrap CIs, calibration, subgroup gaps."""
    if not evaluation:
        return ["", "## Clinical evaluation", "",
                "Not run (`python -m evaluation.evaluate run=<run dir>` before export)."]
    lines = ["", "## Clinical evaluation", "",
             f"{evaluation['split']} split of `{evaluation['source']}`, n = {evaluation['n']}; "
             "95% stratified bootstrap intervals.", "", "| metric | value | 95% CI |", "|---|---|---|"]
    for name, m in evaluation["metrics"].items():
        ci = f"[{m['ci_low']:.3f}, {m['ci_high']:.3f}]" if m.get("ci_low") is not None else (m.get("note") or "-")
        lines.append(f"| {name} | {_fmt(m.get('value'))} | {ci} |")
    if op and op.get("threshold") is not None:
        lines += ["", f"Operating point: P({op['positive_class']}) >= {op['threshold']:.4f} ({op['method']}, chosen on "
                      "validation); the served model reports this decision."]
    cal = evaluation.get("calibration") or {}
    if cal:
        text = f"Calibration: ECE {_fmt(cal.get('ece'))}"
        if cal.get("temperature"):
            text += (f", after temperature scaling (T = {cal['temperature']:.3f}, in the exported graph) "
                     f"{_fmt(cal.get('ece_calibrated'))}")
        lines += ["", text + "."]
    for column, groups in (evaluation.get("subgroups") or {}).items():
        lines += ["", f"Subgroups by `{column}`: " + "; ".join(
            f"{value}: n={g.get('n')}" + _gap_text(g) for value, g in groups.items() if isinstance(g, dict))]
    return lines


def _gap_text(group: dict[str, Any]) -> str:
    gap = ((group.get("metrics") or {}).get("auroc") or {}).get("gap")
    return f", AUROC gap {gap:+.3f}" if gap is not None else (f" ({group['note']})" if group.get("note") else "")
