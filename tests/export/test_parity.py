"""The parity gate's decision check: the exported engine must give the checkpoint's decision at the version's
operating point (medops.decision, the rule the INT8 gate uses too) on every checked image, not only probabilities
within the tolerance and the same arg-max."""

from __future__ import annotations

import numpy as np
import pytest
from rich.console import Console

from export.build import _checked_parity
from export.model_card import build_card, render_markdown
from export.parity import ParityError, check_parity
from export.quantize import gate_figures
from medops.decision import DecisionRule, decision_rule, metadata_rule

THRESHOLD = 0.3  # a binary operating point below 0.5: a decision can flip while the arg-max stays


def binary(p_positive: list[float], positive: int = 1) -> np.ndarray:
    p = np.asarray(p_positive, dtype=np.float64)
    return np.stack([1 - p, p], axis=1) if positive == 1 else np.stack([p, 1 - p], axis=1)


def engine_of(probs: np.ndarray):
    """An engine that answers image i (an index in a [N, 1] array) with row i of ``probs``."""
    return lambda batch: probs[batch[:, 0].astype(int)]


def images_for(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.float32)[:, None]


RULE = decision_rule({"threshold": THRESHOLD, "positive_index": 1, "positive_class": "malignant"},
                     ["benign", "malignant"])


def test_a_decision_flip_within_the_tolerance_fails_parity() -> None:
    reference = binary([0.1, THRESHOLD + 2e-5, 0.9, 0.45])
    got = binary([0.1, THRESHOLD - 2e-5, 0.9, 0.45])  # 4e-5 apart: within 1e-4, same arg-max, other side of 0.3
    images = images_for(4)
    without = check_parity(reference, engine_of(got), images, [1, 2], 1e-4, "test engine")
    assert without.passed and without.decision == "arg-max class"  # what the gate checked before

    report = check_parity(reference, engine_of(got), images, [1, 2], 1e-4, "test engine", RULE)
    assert report.max_abs_diff <= report.tolerance and report.argmax_agreement == 1.0
    assert report.decision == "P(malignant) >= 0.3000"
    assert report.decision_mismatches == 2 and report.decision_agreement == pytest.approx(6 / 8)  # 2 batch sizes
    assert not report.passed and report.as_dict()["passed"] is False
    assert "2 checked image(s) get a different decision at the operating point" in report.summary()
    assert report.as_dict()["decision_agreement"] == pytest.approx(0.75)


def test_the_same_decisions_pass_and_are_recorded() -> None:
    reference = binary([0.1, THRESHOLD + 2e-5, 0.9])
    got = reference + np.array([[-5e-5, 5e-5]])  # moves every image, none across the threshold
    report = check_parity(reference, engine_of(got), images_for(3), [1, 3], 1e-4, "test engine", RULE)
    assert report.passed and report.decision_agreement == 1.0 and report.decision_mismatches == 0
    assert report.as_dict()["decision"] == "P(malignant) >= 0.3000"


def test_export_stops_with_the_decision_in_the_message() -> None:
    reference = binary([THRESHOLD + 1e-5, 0.8])
    got = binary([THRESHOLD - 1e-5, 0.8])
    with pytest.raises(ParityError, match=r"same decision \(P\(malignant\) >= 0.3000\) 50.00% \(1 checked image"):
        _checked_parity(reference, engine_of(got), images_for(2), [1], 1e-4, "onnxruntime (CPU, FP32)",
                        Console(quiet=True), RULE)
    assert _checked_parity(reference, engine_of(reference), images_for(2), [1], 1e-4, "onnxruntime",
                           Console(quiet=True), RULE)["decision_agreement"] == 1.0


def test_multilabel_parity_uses_each_labels_threshold() -> None:
    rule = decision_rule({"label_thresholds": {"a": 0.2, "b": 0.7}}, ["a", "b", "c"], task="multilabel")
    assert rule.label_thresholds == (0.2, 0.7, 0.5)  # a label without a threshold: 0.5
    reference = np.array([[0.25, 0.70001, 0.9], [0.1, 0.1, 0.1]])
    got = np.array([[0.25, 0.69999, 0.9], [0.1, 0.1, 0.1]])  # label b crosses its 0.7 on image 0 only
    report = check_parity(reference, engine_of(got), images_for(2), [1], 1e-4, "test engine", rule)
    assert report.argmax_agreement == 1.0 and report.decision_agreement == 0.5 and not report.passed
    moved = np.array([[0.25, 0.70002, 0.9], [0.1, 0.1, 0.1]])
    assert check_parity(reference, engine_of(moved), images_for(2), [1], 1e-4, "test engine", rule).passed


def test_multiclass_takes_the_argmax_and_the_abnormal_call() -> None:
    op = {"threshold": None, "abnormal": {"classes": ["b", "c"], "indices": [1, 2], "value": 0.4}}
    rule = decision_rule(op, ["a", "b", "c"], task="multiclass")
    reference = np.array([[0.59, 0.21, 0.20], [0.1, 0.2, 0.7]])  # P(abnormal) 0.41 >= 0.4
    got = np.array([[0.61, 0.20, 0.19], [0.1, 0.2, 0.7]])  # same arg-max, P(abnormal) 0.39: the call flips
    assert rule.decide(reference).tolist() == [[0, 1], [2, 1]]
    assert rule.agreement(reference, got) == 0.5
    assert DecisionRule("argmax").agreement(reference, got) == 1.0
    assert rule.describe() == "arg-max class and P(abnormal) >= 0.4000"


def test_rule_from_a_versions_metadata() -> None:
    binary_meta = {"class_names": ["malignant", "benign"], "input": {"task": "binary"},
                   "operating_point": {"threshold": 0.42, "positive_class": "malignant"}, "metrics": {}}
    rule = metadata_rule(binary_meta)
    assert (rule.kind, rule.positive_index, rule.threshold) == ("threshold", 0, 0.42)
    assert rule.decide(binary([0.43, 0.41], positive=0)).ravel().tolist() == [True, False]
    labels_meta = {"class_names": ["x", "y"], "input": {"task": "multilabel"}, "operating_point": None,
                   "metrics": {"labels": {"thresholds": {"x": 0.3, "y": None}}}}
    assert metadata_rule(labels_meta).label_thresholds == (0.3, 0.5)  # training's thresholds when evaluate's absent
    assert metadata_rule({"class_names": ["a", "b"], "metrics": {}}).kind == "argmax"  # no operating point


def test_parity_and_the_int8_gate_share_the_decision() -> None:
    rng = np.random.default_rng(0)
    p = rng.uniform(0.2, 0.4, 200)
    fp32, other = binary(p), binary(np.clip(p + rng.normal(0, 0.01, 200), 0, 1))
    labels = (p > 0.3).astype(int)
    gate = gate_figures(fp32, other, labels, RULE, {"auroc": 1, "accuracy": 1, "decision_agreement": 0.99})
    report = check_parity(fp32, engine_of(other), images_for(200), [200], 1.0, "test engine", RULE)
    assert gate["decision"] == report.decision == RULE.describe()
    assert 0 < gate["decision_agreement"] < 1 and gate["decision_agreement"] == report.decision_agreement
    assert gate["checks"]["decision_agreement"] is False  # fewer than 99 % the same


def test_model_card_states_the_decision_parity() -> None:
    meta = {"name": "m", "version": 1, "target": "python", "created": "2026-11-28", "class_names": ["a", "b"],
            "input": {"task": "binary"}, "model": {}, "data": {}, "metrics": {"task": "binary"}, "lineage": {},
            "versions": {}, "max_batch_size": 8, "operating_point": None, "evaluation": None,
            "precision": {"precision": "fp32"}}
    report = check_parity(binary([0.2, 0.8]), engine_of(binary([0.2, 0.8])), images_for(2), [1], 1e-4,
                          "onnxruntime (CPU, FP32)", RULE)
    meta["parity"] = [report.as_dict()]
    card = render_markdown(build_card(meta))
    assert "argmax agreement 100.00%, same decision (P(malignant) >= 0.3000) 100.00% on 2 held-out images" in card
    old = {k: v for k, v in report.as_dict().items() if not k.startswith("decision")}  # versions before the check
    meta["parity"] = [old]
    assert "argmax agreement 100.00% on 2 held-out images" in render_markdown(build_card(meta))


def test_model_card_limitations_follow_the_calibration() -> None:
    meta = {"name": "m", "version": 1, "target": "python", "created": "2026-11-28", "class_names": ["a", "b", "c"],
            "input": {"task": "multilabel"}, "model": {}, "data": {}, "lineage": {}, "parity": [],
            "metrics": {"val": {"precision": 0.5}, "test": {"precision": 0.25}}}
    card = render_markdown(build_card(meta))
    assert "- The served probabilities are not temperature-scaled: do not read them as risks." in card
    assert "the test figures rest on its test split, so read them with their intervals" in card
    meta["data"] = {"counts": {"test": [42, 114]}}  # multi-label: positives per label, not images
    assert "the test figures rest on its test split" in render_markdown(build_card(meta))
    assert "the test figures rest on 156 test images" in render_markdown(build_card({**meta, "input": {}}))
    assert "| precision (unweighted mean over the labels) | 0.5000 | 0.2500 |" in card
    assert "P >= 0.5 for each label" in card
    assert "operating point" not in card.split("## Metrics")[1].split("## Clinical")[0]
    threshold = {"method": "youden", "value": 0.3, "positive_class": "a",
                 "test": dict.fromkeys(("acc", "sensitivity", "specificity"), 0.5)}
    meta["metrics"] |= {"calibration": {"temperature": 1.4, "test": {"ece_before": 0.2}}, "threshold": threshold}
    card = render_markdown(build_card(meta))  # training fitted a temperature, the graph does not apply it
    assert "graph is NOT temperature-scaled" in card and "uncalibrated probabilities, test ECE 0.2000" in card
    assert "- The served probabilities are not temperature-scaled" in card
    meta["operating_point"] = {"temperature": 1.4}
    card = render_markdown(build_card(meta))
    assert "(T = 1.400, inside the exported graph)" in card
    assert "- Probabilities are temperature-scaled on validation; read them as risks only as far as the calibration" \
           " figures above allow. The operating point was chosen on validation." in card
