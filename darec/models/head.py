"""The CTR head: BatchNorm, then Linear + PReLU layers, then one logit."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["MLPHead", "head_features"]


def head_features(target: torch.Tensor, r: torch.Tensor, *, target_aware: bool,
                  user: torch.Tensor | None = None) -> torch.Tensor:
    """[v_t, r, v_t * r] with the target-aware representation (TR), else [v_t, r]; then the user features'
    embeddings when the model has any.

    v_t * r equals sum_i w_i (e_i * v_t): the paper's TR form, computed after aggregation."""
    parts = [target, r, target * r] if target_aware else [target, r]
    if user is not None:
        parts.append(user)
    return torch.cat(parts, dim=-1)


class MLPHead(nn.Module):
    """BatchNorm1d(in) -> [Linear -> PReLU]* -> Linear(., 1).

    One logit with BCE-with-logits; the reference's 2-way softmax is the same model family
    (its two output units only matter through their difference)."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...]) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.BatchNorm1d(in_dim)]
        width = in_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.PReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).squeeze(-1)                                       # (B,)
