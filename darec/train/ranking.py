"""Ranking terms within candidate sets, added to BCE: how each positive compares with its own negatives.

BCE scores every row alone; at inference the rows of one request compete for the same slots. A ranking
term trains that comparison directly and gives the negatives of a set a gradient that grows with how
highly they are ranked against their positive (softmax weight), instead of with their own sigmoid only.

A candidate set is the rows of one user and cut in a batch (`Batch.candidate_set`): a positive and its
negatives. Sets without both a positive and a negative carry no ranking information and add nothing.

Notation: B rows, G sets, S the largest set.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from darec.data.batch import set_slots

__all__ = ["RankingLoss", "pairwise_loss", "listwise_loss", "ranking_loss", "padded_sets", "LogitGradients"]

RankingLoss = Literal["none", "pairwise", "listwise"]


def padded_sets(values: torch.Tensor, sets: torch.Tensor, n_sets: int, fill: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (R,) -> (G, S) with each set's rows side by side (in row order), `fill` elsewhere; and the (G, S) mask."""
    slot, width = set_slots(sets, n_sets)
    out = values.new_full((n_sets, width), fill).index_put((sets, slot), values)
    present = torch.zeros(n_sets, width, dtype=torch.bool, device=values.device)
    present[sets, slot] = True
    return out, present


def pairwise_loss(logits: torch.Tensor, labels: torch.Tensor, sets: torch.Tensor, n_sets: int) -> torch.Tensor:
    """Mean over (positive, negative) pairs of one set of -log sigmoid(s_pos - s_neg) (BPR); 0 without pairs."""
    s, present = padded_sets(logits, sets, n_sets, 0.0)                               # (G, S)
    y, _ = padded_sets(labels, sets, n_sets, 0.0)
    pos, neg = present & (y > 0.5), present & (y <= 0.5)
    pairs = pos.unsqueeze(2) & neg.unsqueeze(1)                                      # (G, S_pos, S_neg)
    margin = s.unsqueeze(2) - s.unsqueeze(1)                                         # s_i - s_j
    return (F.softplus(-margin) * pairs).sum() / pairs.sum().clamp(min=1)


def listwise_loss(logits: torch.Tensor, labels: torch.Tensor, sets: torch.Tensor, n_sets: int) -> torch.Tensor:
    """Mean over positives (in sets holding a negative) of -log softmax over their set; 0 without such sets."""
    s, present = padded_sets(logits, sets, n_sets, float("-inf"))                    # (G, S)
    y, _ = padded_sets(labels, sets, n_sets, 0.0)
    pos, neg = present & (y > 0.5), present & (y <= 0.5)
    counted = pos & neg.any(dim=1, keepdim=True)                                     # (G, S)
    log_p = s - torch.logsumexp(s, dim=1, keepdim=True)                              # -inf where absent
    return -(torch.where(counted, log_p, 0.0)).sum() / counted.sum().clamp(min=1)


def ranking_loss(kind: RankingLoss, logits: torch.Tensor, labels: torch.Tensor, sets: torch.Tensor,
                 n_sets: int) -> torch.Tensor:
    """The ranking term of `kind` ("pairwise" or "listwise")."""
    return {"pairwise": pairwise_loss, "listwise": listwise_loss}[kind](logits, labels, sets, n_sets)


class LogitGradients:
    """Running mean of |d loss / d logit| over the negative and the positive training rows, times the batch
    size (for BCE alone that is the mean sigmoid(s) of negatives: a per-row scale, independent of B)."""

    def __init__(self) -> None:
        self._sums = torch.zeros(4, dtype=torch.float64)  # |g| of negatives, count, |g| of positives, count

    @torch.no_grad()
    def add(self, grad: torch.Tensor, labels: torch.Tensor) -> None:
        g = grad.detach().abs().double() * len(grad)
        neg = labels <= 0.5
        self._sums += torch.stack([g[neg].sum(), neg.sum(), g[~neg].sum(), (~neg).sum()]).cpu().double()

    def flush(self) -> dict[str, float]:
        """The means since the last flush: {"train_neg_logit_grad", "train_pos_logit_grad"}."""
        s = self._sums.tolist()
        self._sums.zero_()
        return {"train_neg_logit_grad": s[0] / max(s[1], 1.0), "train_pos_logit_grad": s[2] / max(s[3], 1.0)}
