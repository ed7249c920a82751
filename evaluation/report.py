"""The self-contained HTML evaluation report (figures embedded; the figures themselves come from medops.plots)."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}"
    return html.escape(str(v))


def _metrics_table(metrics: dict[str, Any], with_gap: bool = False) -> str:
    gap_head = "<th>gap</th>" if with_gap else ""
    head = f"<tr><th>metric</th><th>value</th><th>95% CI</th>{gap_head}<th>note</th></tr>"
    rows = []
    for name, m in metrics.items():
        ci = f"{_fmt(m['ci_low'])} – {_fmt(m['ci_high'])}" if m.get("ci_low") is not None else "–"
        gap_value = "–" if m.get("gap") is None else f"{m['gap']:+.3f}"
        gap = f"<td>{gap_value}</td>" if with_gap else ""
        rows.append(f"<tr><td>{name}</td><td>{_fmt(m['value'])}</td><td>{ci}</td>{gap}<td>{_fmt(m.get('note'))}</td></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    alt = html.escape(alt)
    return f'<figure><img alt="{alt}" src="data:image/png;base64,{data}"><figcaption>{alt}</figcaption></figure>'


def _explanations_section(expl: dict[str, Any] | None) -> str:
    """The model-randomisation sanity check of the explanation maps (Adebayo et al., NeurIPS 2018)."""
    if not expl:
        return ""
    rows = []
    for method, label in (("gradcam", "Grad-CAM (logit)"), ("occlusion", "Occlusion (logit drop)")):
        check = expl.get(method)
        if not check:
            continue
        verdict = html.escape(str(check.get("verdict", "")))
        colour = "#1a7f37" if check.get("passed") else "#cf222e"
        rows.append(f"<tr><td>{label}</td><td>{_fmt(check.get('randomisation_spearman'))}</td>"
                    f"<td style='color:{colour}'><b>{verdict}</b></td><td>{_fmt(check.get('flat_maps'))}</td></tr>")
    return (
        "<h2>Explanations: sanity check</h2>"
        f"<p>Maps of the predicted class's logit for {_fmt(expl.get('samples'))} images (the most confident correct "
        "and wrong predictions, figure below; arrays in "
        f"<code>{html.escape(str(expl.get('file', 'explanations.npz')))}</code>). Occlusion patch "
        f"{_fmt(expl.get('patch'))} px, stride {_fmt(expl.get('stride'))} px, baseline "
        f"{_fmt(expl.get('baseline'))}.</p>"
        "<p>Model randomisation: the same maps for a copy of the network with every trainable layer re-initialised. "
        "Maps that explain the model must change, so the Spearman rank correlation between trained and randomised "
        f"maps (mean over the images) should be low: |rho| &lt; {html.escape(str(expl.get('sanity_threshold')))} "
        "passes. A failure means the map shows the image (edges, brightness), not what the network learnt.</p>"
        "<table><tr><th>method</th><th>Spearman rho (trained vs randomised)</th><th>verdict</th>"
        f"<th>flat maps</th></tr>{''.join(rows)}</table>"
    )


def _abnormal_section(abnormal: dict[str, Any] | None) -> str:
    """Multi-class with a declared abnormal set: the abnormal-vs-normal decision and its metrics."""
    if not abnormal:
        return ""
    classes = ", ".join(html.escape(c) for c in abnormal["classes"])
    normal = ", ".join(html.escape(c) for c in abnormal["normal_classes"])
    return (f"<h2>Abnormal ({classes}) vs normal ({normal})</h2><p>P(abnormal) is the sum of the abnormal classes' "
            f"probabilities; decision at P(abnormal) &ge; {abnormal['value']:.4f} (<b>{html.escape(abnormal['method'])}"
            "</b>, chosen on the validation split). Sensitivity, specificity, PPV and NPV are for <i>abnormal</i>.</p>"
            + _metrics_table(abnormal["evaluation"]["metrics"]))


def _counts(result: dict[str, Any]) -> str:
    """``class counts {...}``, or for a multi-label evaluation ``positives per label {...}``."""
    ev = result["evaluation"]
    if "label_counts" in ev:
        return f"positives per label {dict(zip(result['class_names'], ev['label_counts'], strict=True))}"
    return f"class counts {dict(zip(result['class_names'], ev['class_counts'], strict=True))}"


def _label_thresholds_section(op: dict[str, Any]) -> str:
    """Multi-label: one threshold per label, chosen on validation."""
    cells = ", ".join(f"{html.escape(str(k))} &ge; {v:.4f}" for k, v in op["label_thresholds"].items())
    return (f"<h2>Operating points</h2><p>Multi-label: one threshold per label, method <b>"
            f"{html.escape(str(op['method']))}</b>, chosen on the validation split and applied unchanged here"
            f"{' to temperature-scaled probabilities' if op.get('temperature') else ''}: {cells}. The metrics below "
            "are the means over the labels.</p>")


def _per_class_section(ev: dict[str, Any]) -> str:
    """The per-class table (one-vs-rest), or for a multi-label evaluation the per-label one at its threshold."""
    if "per_label" in ev:
        keys = ("positives", "threshold", "auroc", "sensitivity", "specificity", "precision", "f1")
        rows = "".join(f"<tr><td>{html.escape(c)}</td>" + "".join(f"<td>{_fmt(v[k])}</td>" for k in keys) + "</tr>"
                       for c, v in ev["per_label"].items())
        head = "".join(f"<th>{k}</th>" for k in keys)
        return f"<h3>Per label</h3><table><tr><th>label</th>{head}</tr>{rows}</table>"
    per_class = "".join(
        f"<tr><td>{html.escape(c)}</td>" + "".join(f"<td>{_fmt(v[k])}</td>" for k in
                                                   ("support", "precision", "recall", "specificity", "f1", "auroc_ovr"))
        + "</tr>" for c, v in ev["per_class"].items())
    return ("<h3>Per class</h3><table><tr><th>class</th><th>support</th><th>precision</th><th>recall</th>"
            f"<th>specificity</th><th>F1</th><th>AUROC (OvR)</th></tr>{per_class}</table>")


CALIBRATION_TERMS = {
    "ece": "expected calibration error of the top label (15 bins), before temperature scaling",
    "nll": "mean negative log-likelihood of the true class, before temperature scaling",
    "temperature": "temperature fitted on the validation split (> 1 softens, < 1 sharpens)",
    "ece_calibrated": "expected calibration error after temperature scaling",
    "nll_calibrated": "negative log-likelihood after temperature scaling",
    "val_nll": "validation negative log-likelihood before (what the temperature minimises)",
    "val_nll_calibrated": "validation negative log-likelihood after",
    "ece_if_calibrated_median": "ECE a perfectly calibrated model shows on this many images: median",
    "ece_if_calibrated_p95": "the same, 95th percentile (above it: miscalibrated beyond chance)",
    "ece_consistency_p_value": "share of perfectly calibrated draws whose ECE reaches the observed one",
    "not_calibrated": "why no temperature was applied",
}


def _decision_rule(op: dict[str, Any]) -> str:
    """The decision the threshold-dependent metrics are taken at: the training run's own figures use the arg-max,
    so a reader comparing the two must see which one this table used."""
    if op.get("label_thresholds"):
        rule = "each label at its own threshold (above)"
    elif op.get("threshold") is not None:
        rule = f"the operating point, P({html.escape(op['positive_class'])}) ≥ {op['threshold']:.4f}"
    else:
        rule = "the arg-max class"
    return (f"<p>Accuracy, balanced accuracy, sensitivity, specificity, precision, recall and F1 at {rule}; AUROC and "
            "average precision over every threshold. 95% stratified bootstrap intervals.</p>")


def _calibration_section(cal: dict[str, Any]) -> str:
    """The calibration figures, each with what it measures (the JSON keys alone say little to a clinician)."""
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td><td>{html.escape(CALIBRATION_TERMS.get(k, ''))}"
                   "</td></tr>" for k, v in cal.items())
    return f"<h2>Calibration</h2><table><tr><th>figure</th><th>value</th><th>what it measures</th></tr>{rows}</table>"


def write_html_report(result: dict[str, Any], plots: dict[str, Path], path: Path) -> Path:
    """One self-contained HTML page: the operating point, metrics with CIs, calibration, the explanation sanity
    check, plots and subgroups."""
    ev = result["evaluation"]
    op = result.get("operating_point") or {}
    cal = result.get("calibration") or {}
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>medops evaluation</title><style>"
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}figure{display:inline-block;margin:0 1em}"
        "</style></head><body>",
        "<h1>Clinical evaluation report</h1>",
        f"<p>Run <code>{html.escape(str(result['run']))}</code>, "
        f"checkpoint <code>{html.escape(result['checkpoint'])}</code>"
        f"<br>Data: <code>{html.escape(result['data']['source'])}</code>, split <b>{html.escape(result['split'])}</b>, "
        f"{ev['n']} samples, {_counts(result)}</p>",
    ]
    if op.get("label_thresholds"):
        parts.append(_label_thresholds_section(op))
    elif op.get("threshold") is not None:
        target = f" (target {op['target']})" if op["method"] == "sensitivity" else ""
        parts.append(
            f"<h2>Operating point</h2><p>Threshold {op['threshold']:.4f} on P({html.escape(op['positive_class'])}), "
            f"method <b>{html.escape(op['method'])}</b>{target}, "
            "chosen on the validation split and applied unchanged here"
            f"{' to temperature-scaled probabilities' if op.get('temperature') else ''}.</p>"
        )
    else:
        parts.append("<h2>Operating point</h2><p>Multi-class: the arg-max class.</p>")
    parts += [f"<h2>Metrics ({html.escape(result['split'])})</h2>", _decision_rule(op), _metrics_table(ev["metrics"])]
    parts.append(_per_class_section(ev))
    parts.append(_abnormal_section(result.get("abnormal")))
    if cal:
        parts.append(_calibration_section(cal))
    parts.append(_explanations_section(result.get("explanations")))
    parts.append("<h2>Plots</h2>" + "".join(_img(p, name) for name, p in plots.items()))
    for column, groups in (result.get("subgroups") or {}).items():
        parts.append(f"<h2>Subgroups by {html.escape(column)}</h2>")
        for value, g in groups.items():
            note = f" — {html.escape(g['note'])}" if g.get("note") else ""
            parts.append(f"<h3>{html.escape(column)} = {html.escape(value)} (n={g['n']}){note}</h3>")
            if g["metrics"]:
                parts.append(_metrics_table(g["metrics"], with_gap=True))
    parts.append("</body></html>")
    path = Path(path)
    path.write_text("\n".join(parts))
    return path
