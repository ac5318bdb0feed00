"""Two-metric search: the GSU ranks with one score, the ESU re-scores only the K kept behaviours.

TWIN's `TargetAttention` uses one score for both stages. SIM (Pi et al., 2020) and ETA (Chen et al.,
2021) do not: their GSU is a category match, a separately trained inner product or a Hamming
distance, and the ESU is a target attention over the K survivors. `SplitSearch` is that composition;
the builders for SIM live here, ETA's in `hashing.py`.

Notation: B batch, L history length, K kept behaviours, d_A / d_R attention / representation dim
per field, E token width.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from darec.data.batch import Batch
from darec.errors import ConfigError
from darec.models.config import ModelConfig
from darec.models.embedding import RoleEmbeddings
from darec.models.search import (DotScore, Interest, attend, register_search, select_recent_same_category,
                                 select_topk)

__all__ = ["RepresentationScore", "SplitSearch", "search_options"]


def search_options(config: ModelConfig, defaults: dict[str, Any]) -> dict[str, Any]:
    """`config.search_options` on top of `defaults`; unknown keys are a `ConfigError` (no silent typos)."""
    unknown = sorted(set(config.search_options) - set(defaults))
    if unknown:
        raise ConfigError(f"search {config.search!r} has no option(s) {unknown}; known: {sorted(defaults)}")
    return {**defaults, **config.search_options}


class RepresentationScore(nn.Module):
    """SIM's ESU score: <v_t, v_i> / sqrt(E) on the representation tokens [item; cat; position].

    The GSU's tables play no part, so with decoupled tables the ESU and GSU are trained apart, as in SIM."""

    def forward(self, emb: RoleEmbeddings, batch: Batch) -> torch.Tensor:
        target = emb.target(batch.target_item, batch.target_category, batch.target_features)  # (B, E)
        values = emb.values(batch.hist_items, batch.hist_categories, batch.hist_positions,
                            batch.hist_features)                                               # (B, L, E)
        return torch.einsum("be,ble->bl", target, values) / math.sqrt(target.shape[-1])    # (B, L)


class SplitSearch(nn.Module):
    """GSU `scorer` + `select` keep K behaviours; the ESU softmaxes `esu` logits over those K only.

    With `full=True` the aux head gets softmax attention over the whole history, on the `aux` scorer's
    logits (the GSU scores when `aux` is None: SIM-soft's auxiliary task trains the GSU this way).
    `Interest.scores` are the GSU scores, i.e. what retrieval ranks by."""

    def __init__(self, *, scorer: nn.Module, select: Callable[[torch.Tensor, Batch, int], torch.Tensor],
                 esu: nn.Module, top_k: int, aux: nn.Module | None = None) -> None:
        super().__init__()
        self.scorer, self.select, self.esu, self.aux, self.top_k = scorer, select, esu, aux, top_k

    def forward(self, emb: RoleEmbeddings, batch: Batch, *, full: bool = False) -> Interest:
        """Returns r (B, E), index/weights (B, K), scores (B, L); r_full (B, E) when `full`."""
        scores = self.scorer(emb, batch)                                                # (B, L)
        index = self.select(scores, batch, self.top_k)                                  # (B, K)
        kept = batch.take_history(index)
        r, weights = attend(emb, kept, self.esu(emb, kept), None)                      # (B, E), (B, K)
        r_full = None
        if full:
            logits = scores if self.aux is None else self.aux(emb, batch)              # (B, L)
            r_full = attend(emb, batch, logits, None)[0]
        reported = scores.masked_fill(~batch.mask, torch.finfo(scores.dtype).min)
        return Interest(r=r, r_full=r_full, index=index, weights=weights, scores=reported)


@register_search("sim_hard")
def _sim_hard(config: ModelConfig) -> nn.Module:
    """SIM hard search: same category, most recent first; ESU target attention on the representation."""
    search_options(config, {})
    return SplitSearch(scorer=DotScore(), select=select_recent_same_category, esu=RepresentationScore(),
                       top_k=config.top_k, aux=None)


@register_search("sim_soft")
def _sim_soft(config: ModelConfig) -> nn.Module:
    """SIM soft search: inner product on the attention (GSU) tables, ESU on the representation tables."""
    search_options(config, {})
    return SplitSearch(scorer=DotScore(), select=select_topk, esu=RepresentationScore(),
                       top_k=config.top_k, aux=None)
