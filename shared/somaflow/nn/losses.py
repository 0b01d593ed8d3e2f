"""Training losses of the somaflow CNNs.

* :func:`dice_loss` — soft Dice on the neuron-class probability (STNeuroNet Eq. 1,
  after V-Net) for the detectors;
* :func:`multiclass_hinge_loss` — the SVM loss of 3CNet, equal to
  :class:`torch.nn.MultiMarginLoss` (``p=1``);
* :func:`bce_loss` — binary cross-entropy on logits for the LSTM seed classifier.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from somaflow.errors import InputError

__all__ = ["bce_loss", "dice_loss", "multiclass_hinge_loss"]


def dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    *,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Soft Dice loss on the class-1 softmax probability.

    ``1 − (2 Σ w p q + eps) / (Σ w p² + Σ w q² + eps)`` with ``p`` the softmax
    probability of class 1, ``q`` the target and the sums over every pixel of
    the batch (STNeuroNet Eq. 1; the Dice of V-Net handles the imbalance of few
    neuron pixels without reweighting). ``eps`` makes an empty target predicted
    empty a loss of 0.

    Parameters
    ----------
    logits : torch.Tensor
        ``(B, 2, H, W)`` float logits (class 1 = neuron).
    target : torch.Tensor
        ``(B, H, W)`` labels in {0, 1} (bool, integer or float; soft labels in
        [0, 1] also work).
    weight : torch.Tensor, optional
        Non-negative per-pixel weights broadcastable to ``(B, H, W)``, e.g. 0
        on pixels to ignore.
    eps : float
        Smoothing term.

    Returns
    -------
    torch.Tensor
        Scalar loss in [0, 1].
    """
    if logits.ndim != 4 or logits.shape[1] != 2:
        raise InputError(
            f"dice_loss expects logits (B, 2, H, W), got {tuple(logits.shape)}. Pass the detector's output."
        )
    if target.shape != logits.shape[:1] + logits.shape[2:]:
        raise InputError(
            f"dice_loss: target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}; "
            "it must be (B, H, W). Crop the labels like the input."
        )
    p = torch.softmax(logits, dim=1)[:, 1]
    q = target.to(p.dtype)
    if weight is None:
        w = torch.ones_like(p)
    else:
        try:
            w = torch.broadcast_to(weight.to(p.dtype), p.shape)
        except RuntimeError as exc:
            raise InputError(
                f"dice_loss: weight shape {tuple(weight.shape)} cannot broadcast to {tuple(p.shape)}. "
                "Pass per-pixel weights of shape (B, H, W)."
            ) from exc
    inter = (w * p * q).sum()
    denom = (w * p * p).sum() + (w * q * q).sum()
    return 1.0 - (2.0 * inter + eps) / (denom + eps)


def multiclass_hinge_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    margin: float = 1.0,
    class_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multiclass hinge (SVM) loss, as :class:`torch.nn.MultiMarginLoss` with ``p=1``.

    Per sample ``i`` with label ``y``: ``Σ_{j≠y} w_y · max(0, margin − s_y + s_j) / C``,
    averaged over the batch (3CNet's ``L_i`` divided by the number of classes
    ``C``, as torch does).

    Parameters
    ----------
    logits : torch.Tensor
        ``(B, C)`` scores.
    labels : torch.Tensor
        ``(B,)`` integer class indices in ``[0, C)``.
    margin : float
        Required gap between the true score and every other score.
    class_weight : torch.Tensor, optional
        ``(C,)`` weights of the true classes (class rebalancing).

    Returns
    -------
    torch.Tensor
        Scalar loss.
    """
    if logits.ndim != 2:
        raise InputError(
            f"multiclass_hinge_loss expects logits (B, C), got {tuple(logits.shape)}. Pass a classifier's output."
        )
    n, c = logits.shape
    if labels.shape != (n,) or labels.is_floating_point():
        raise InputError(
            f"multiclass_hinge_loss expects integer labels (B,) = ({n},), got {tuple(labels.shape)} {labels.dtype}. "
            "Pass class indices as a torch.long tensor."
        )
    labels = labels.long()
    if n and (labels.min() < 0 or labels.max() >= c):
        raise InputError(f"multiclass_hinge_loss: labels must lie in [0, {c}). Fix the labels.")
    true = logits.gather(1, labels[:, None])
    hinge = torch.clamp(margin - true + logits, min=0.0)
    hinge = hinge.masked_fill(F.one_hot(labels, c).bool(), 0.0)
    per_sample = hinge.sum(dim=1) / c
    if class_weight is not None:
        if class_weight.shape != (c,):
            raise InputError(
                f"multiclass_hinge_loss: class_weight must have shape ({c},), got {tuple(class_weight.shape)}."
            )
        per_sample = per_sample * class_weight.to(logits.dtype)[labels]
    return per_sample.mean()


def bce_loss(
    logits: torch.Tensor, labels: torch.Tensor, *, pos_weight: float | None = None
) -> torch.Tensor:
    """Binary cross-entropy on logits (mean over the batch).

    Parameters
    ----------
    logits : torch.Tensor
        ``(B,)`` logits, e.g. of :class:`~somaflow.nn.models.LSTMTraceClassifier`.
    labels : torch.Tensor
        ``(B,)`` targets in {0, 1}.
    pos_weight : float, optional
        Weight of the positive class (negatives / positives to rebalance).

    Returns
    -------
    torch.Tensor
        Scalar loss.
    """
    if logits.shape != labels.shape:
        raise InputError(
            f"bce_loss: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} differ in shape. Pass one label per logit."
        )
    pw = (
        None
        if pos_weight is None
        else torch.tensor(pos_weight, dtype=logits.dtype, device=logits.device)
    )
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), pos_weight=pw)
