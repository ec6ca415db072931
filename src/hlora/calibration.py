"""Head calibration from the clients' feature moments (CCVR), after the last round.

Under label skew the classifier's head is biased more than the features it reads ("No Fear of
Heterogeneity: Classifier Calibration for Federated Learning with Non-IID Data", Luo et al.,
NeurIPS 2021). With ``server.head_calibration = "ccvr"``, after the last round every client
computes, under the final global model, the per-class count, mean and covariance of the
features entering the head's final linear layer on its own examples (:meth:`ClassMoments.of`);
the server checks them (:func:`check_moments`), pools them into the moments of the union of the
clients' data (:func:`pool`, exact), samples virtual features from one Gaussian per class
(:func:`virtual_features`) and refits that linear layer on them (:func:`fit_linear`).

Choices (docs/RESULTS.md 0.8.8 measures them):

* the virtual features follow the federation's class counts (``per_example`` of them for every
  training example), so the head is calibrated to the federation's label distribution, not
  balanced as in the paper's fixed number per class: the accuracy a user reads is on data
  distributed like the federation's;
* the fit is full-batch L-BFGS on the cross-entropy with a small L2 term, from the global head:
  deterministic, with no learning rate or epoch count to choose.

No example or feature vector leaves a client; its per-class moments do, and they say more about
its data than a LoRA update does (a class's mean feature, its spread, and the client's label
counts): a federation whose members must not share class-level statistics keeps this off.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

CALIBRATION_L2 = 1e-3
"""Weight of ``l2 / 2 * ||W||^2`` in the head's refit."""


@dataclass(frozen=True)
class ClassMoments:
    """Per-class statistics of the features entering the head's final linear layer.

    Attributes:
        count: Examples of each class, ``(C,)`` float64 (whole numbers).
        mean: Each class's mean feature, ``(C, d)`` float64 (zero for a class without examples).
        cov: Each class's unbiased covariance, ``(C, d, d)`` float64 (zero for a class of fewer
            than two examples).
    """

    count: Tensor
    mean: Tensor
    cov: Tensor

    @staticmethod
    def of(features: Tensor, labels: Tensor, num_classes: int) -> ClassMoments:
        """The moments of ``features (n, d)`` with integer ``labels (n,)`` in ``[0, C)``."""
        d = features.shape[1]
        count = torch.zeros(num_classes, dtype=torch.float64)
        mean = torch.zeros(num_classes, d, dtype=torch.float64)
        cov = torch.zeros(num_classes, d, d, dtype=torch.float64)
        for c in range(num_classes):
            x = features[labels == c].double()
            count[c] = x.shape[0]
            if x.shape[0] > 0:
                mean[c] = x.mean(0)
            if x.shape[0] > 1:
                cov[c] = torch.cov(x.T).reshape(d, d)
        return ClassMoments(count, mean, cov)

    @property
    def dim(self) -> int:
        """The feature dimension ``d``."""
        return int(self.mean.shape[1])


def check_moments(m: ClassMoments, num_classes: int, dim: int, num_examples: int) -> str | None:
    """Why a client's moments cannot be pooled, or None when they can.

    Args:
        m: What the client sent.
        num_classes: The task's classes ``C``.
        dim: The head's input dimension ``d``.
        num_examples: The example count the server accepted for the client when it joined: its
            class counts must add up to it.
    """
    shapes = {"count": (num_classes,), "mean": (num_classes, dim), "cov": (num_classes, dim, dim)}
    for name, want in shapes.items():
        value = getattr(m, name)
        if not isinstance(value, Tensor) or tuple(value.shape) != want:
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            return f"moments '{name}' must have shape {want}, got {got}"
        if not value.dtype.is_floating_point or not bool(torch.isfinite(value).all()):
            return f"moments '{name}' must be finite floating-point numbers"
    if bool((m.count < 0).any()) or not bool((m.count == m.count.round()).all()):
        return "class counts must be whole numbers >= 0"
    if int(m.count.sum()) != num_examples:
        total = int(m.count.sum())
        return f"class counts add up to {total}, not the {num_examples} examples it joined with"
    cov = m.cov.double()
    scale = float(cov.abs().amax()) or 1.0
    if not torch.allclose(cov, cov.transpose(1, 2), atol=1e-6 * scale):
        return "covariances must be symmetric"
    if bool((torch.diagonal(cov, dim1=1, dim2=2) < -1e-6 * scale).any()):
        return "covariances must have a non-negative diagonal"
    if bool((torch.linalg.eigvalsh(0.5 * (cov + cov.transpose(1, 2))) < -1e-6 * scale).any()):
        return "covariances must be positive semi-definite"
    return None


def pool(parts: Sequence[ClassMoments]) -> ClassMoments:
    """The moments of the union of the clients' examples, from each client's moments alone.

    Per class, with client counts ``n_k``, means ``m_k``, covariances ``S_k`` and ``N = sum n_k``:
    ``mean = sum n_k m_k / N`` and ``cov = (sum (n_k - 1) S_k + n_k m_k m_k^T - N mean mean^T) /
    (N - 1)``.
    """
    if not parts:
        raise ValueError("no moments to pool")
    count = torch.stack([p.count.double() for p in parts]).sum(0)  # (C,)
    weighted = torch.stack([p.count.double()[:, None] * p.mean.double() for p in parts]).sum(0)
    mean = weighted / count.clamp(min=1)[:, None]  # (C, d)
    scatter = torch.stack(
        [
            (p.count.double() - 1).clamp(min=0)[:, None, None] * p.cov.double()
            + p.count.double()[:, None, None]
            * p.mean.double()[:, :, None]
            * p.mean.double()[:, None, :]
            for p in parts
        ]
    ).sum(0)  # (C, d, d): the sum of squares about the origin, corrected below
    scatter = scatter - count[:, None, None] * mean[:, :, None] * mean[:, None, :]
    cov = scatter / (count - 1).clamp(min=1)[:, None, None]
    return ClassMoments(count, mean, 0.5 * (cov + cov.transpose(1, 2)))


def virtual_features(m: ClassMoments, per_example: float, seed: int) -> tuple[Tensor, Tensor]:
    """Samples ``round(per_example * count_c)`` features of each class ``c`` from
    ``N(mean_c, cov_c)``.

    Returns:
        Features ``(M, d)`` float32 and their labels ``(M,)`` int64, class by class.
    """
    gen = torch.Generator().manual_seed(seed)
    d = m.dim
    rows: list[Tensor] = []
    labels: list[Tensor] = []
    for c in range(m.count.shape[0]):
        n = round(per_example * float(m.count[c]))
        if n == 0:
            continue
        # cov = V diag(lam) V^T; a class of fewer examples than dimensions has zero (or, by
        # rounding, slightly negative) eigenvalues: clamped, so the square root always exists
        lam, vecs = torch.linalg.eigh(m.cov[c].double())
        root = vecs * lam.clamp(min=0).sqrt()  # (d, d): root @ root.T = cov
        z = torch.randn(n, d, generator=gen, dtype=torch.float64)
        rows.append((m.mean[c].double() + z @ root.T).float())
        labels.append(torch.full((n,), c, dtype=torch.long))
    if not rows:
        raise ValueError("no virtual features: every class count rounds to zero")
    return torch.cat(rows), torch.cat(labels)


def fit_linear(
    features: Tensor,
    labels: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    l2: float = CALIBRATION_L2,
) -> tuple[Tensor, Tensor | None]:
    """The linear layer minimizing cross-entropy + ``l2 / 2 * ||W||^2`` on ``features (M, d)``,
    by full-batch L-BFGS from ``weight (C, d)`` and ``bias (C,)`` (None: a layer without one).

    Returns:
        The new weight ``(C, d)`` and bias ``(C,)`` (or None), float32.
    """
    w = weight.detach().clone().float().requires_grad_(True)
    b = None if bias is None else bias.detach().clone().float().requires_grad_(True)
    params = [w] if b is None else [w, b]
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=500, line_search_fn="strong_wolfe")
    x = features.float()

    def closure() -> Tensor:
        opt.zero_grad()
        logits = x @ w.T
        if b is not None:
            logits = logits + b
        loss = torch.nn.functional.cross_entropy(logits, labels) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), None if b is None else b.detach()


def calibrated_head(
    parts: Sequence[ClassMoments],
    extras: Mapping[str, Tensor],
    linear: str,
    *,
    per_example: float,
    seed: int,
) -> tuple[dict[str, Tensor], int]:
    """The head ``extras`` with its final linear layer ``linear`` (``"classifier"``: the keys
    ``classifier.weight`` and, when present, ``classifier.bias``) refitted on virtual features
    drawn from the pooled moments of ``parts``.

    Returns:
        The new head (every other tensor as it was) and the number of virtual features.
    """
    virtual, labels = virtual_features(pool(parts), per_example, seed)
    weight = extras[f"{linear}.weight"]
    bias = extras.get(f"{linear}.bias")
    new_w, new_b = fit_linear(virtual, labels, weight, bias)
    head = dict(extras)
    head[f"{linear}.weight"] = new_w.to(weight.dtype)
    if bias is not None and new_b is not None:
        head[f"{linear}.bias"] = new_b.to(bias.dtype)
    return head, int(virtual.shape[0])
