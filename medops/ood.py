"""Per-image out-of-distribution score: the Mahalanobis distance of the penultimate embedding.

Lee et al., "A simple unified framework for detecting out-of-distribution samples and adversarial attacks"
(NeurIPS 2018): class-conditional Gaussians with one shared covariance fitted on the training split's penultimate
features; an image's score is its distance to the nearest class mean,

    score(x) = min_k sqrt((f(x) - mu_k)^T P (f(x) - mu_k)),    P = shared precision matrix.

The covariance is the Ledoit-Wolf shrinkage estimate (scikit-learn), so it is well conditioned even when the
training split has fewer images than the embedding has dimensions (BreastMNIST: 546 images, 256 features).
The threshold is a quantile of the scores of the *validation* split (images the network did not fit), so that
``pass_rate`` of in-distribution images pass; an image above it is flagged.

Export writes the fitted parameters into the ONNX graph itself (outputs ``ood_score`` and ``ood_flag`` next to
``probabilities``), so every serving path (Triton, the local backend, TensorRT) returns the same score from one
forward pass. The score uses the factor ``L`` of ``P = L L^T``: ``|| (f - mu_k) L ||`` is a matrix product
and a norm, which any runtime computes. Torch-free.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

METHOD = "mahalanobis"


@dataclass(frozen=True)
class OODProfile:
    """The fitted score: class means [K, D], precision factor L [D, D] and the flag threshold."""

    means: np.ndarray
    factor: np.ndarray
    threshold: float
    pass_rate: float

    def scores(self, embeddings: np.ndarray) -> np.ndarray:
        """The score of each row of ``embeddings`` [N, D]."""
        return mahalanobis_scores(embeddings, self.means, self.factor)

    def flags(self, embeddings: np.ndarray) -> np.ndarray:
        return self.scores(embeddings) > self.threshold


def fit_gaussians(embeddings: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class means [K, D] and the factor L of the shared Ledoit-Wolf precision (``P = L L^T``).

    Classes without a training image get no mean (K counts the classes present). Multi-label labels (N x K of
    0/1) have no class per image: one Gaussian for all images (K = 1).
    """
    from sklearn.covariance import LedoitWolf

    emb = np.asarray(embeddings, dtype=np.float64)
    labels = np.asarray(labels)
    labels = np.zeros(len(labels), dtype=np.int64) if labels.ndim == 2 and labels.shape[1] > 1 else labels.reshape(-1)
    if emb.ndim != 2 or len(emb) != len(labels) or len(emb) < 2:
        raise ValueError(f"need >= 2 embeddings [N, D] with N labels, got {list(emb.shape)} and {len(labels)}")
    classes = np.unique(labels)
    means = np.stack([emb[labels == k].mean(axis=0) for k in classes])
    centred = emb - means[np.searchsorted(classes, labels)]
    precision = LedoitWolf(assume_centered=True).fit(centred).precision_
    precision = (precision + precision.T) / 2
    return means, np.linalg.cholesky(precision)


def mahalanobis_scores(embeddings: np.ndarray, means: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """``min_k || (f - mu_k) L ||`` for each row ``f`` of ``embeddings``: the distance to the nearest class."""
    z = np.asarray(embeddings, dtype=np.float64) @ factor
    centres = np.asarray(means, dtype=np.float64) @ factor
    squared = ((z[:, None, :] - centres[None, :, :]) ** 2).sum(axis=-1)
    return np.sqrt(squared.min(axis=1))


def threshold_at(scores: np.ndarray, pass_rate: float) -> float:
    """The score below which ``pass_rate`` of ``scores`` lie (the higher order statistic: at least that share
    passes)."""
    if not 0.5 <= pass_rate <= 1.0:
        raise ValueError(f"pass_rate must be in [0.5, 1], got {pass_rate}")
    values = np.asarray(scores, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no scores to set the threshold on")
    return float(np.quantile(values, pass_rate, method="higher"))


def fit_profile(train_embeddings: np.ndarray, train_labels: np.ndarray, val_embeddings: np.ndarray,
                pass_rate: float) -> tuple[OODProfile, dict[str, Any]]:
    """Fit on training embeddings, set the threshold on validation; returns the profile and its summary."""
    means, factor = fit_gaussians(train_embeddings, train_labels)
    val_scores = mahalanobis_scores(val_embeddings, means, factor)
    profile = OODProfile(means=means, factor=factor, threshold=threshold_at(val_scores, pass_rate),
                         pass_rate=float(pass_rate))
    train_scores = mahalanobis_scores(train_embeddings, means, factor)
    summary = {
        "method": METHOD, "covariance": "shared, Ledoit-Wolf shrinkage", "dimensions": int(means.shape[1]),
        "classes": int(means.shape[0]), "fitted_on": int(len(train_embeddings)),
        "threshold_on": int(len(val_scores)), "pass_rate": float(pass_rate), "threshold": profile.threshold,
        "val_flagged": float((val_scores > profile.threshold).mean()),
        "train_flagged": float((train_scores > profile.threshold).mean()),
        "val_score_median": float(np.median(val_scores)),
    }
    return profile, summary


def profile_arrays(profile: OODProfile) -> dict[str, Any]:
    """The profile as plain arrays and numbers (for ``np.savez``)."""
    return {k: np.asarray(v) for k, v in asdict(profile).items()}
