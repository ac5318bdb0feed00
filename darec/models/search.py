"""Search (GSU) and target attention (ESU): score every behaviour, keep K, softmax over the kept K.

A search is an `nn.Module` built from a `ModelConfig` by the registry `SEARCHES`, called as
`search(embeddings, batch, full=...)`, returning an `Interest`. Adding a search (ETA, SDIM, ...)
means one builder in this registry, never a branch in the model.

Notation: B batch, L history length, K kept behaviours, d_A attention dim per field, D = (2 + n item
features) d_A query/key width, E token width.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from darec.data.batch import Batch
from darec.errors import ConfigError
from darec.registry import registrar
from darec.models.batched import row_dots
from darec.models.config import ModelConfig
from darec.models.embedding import RoleEmbeddings

__all__ = ["Interest", "SEARCHES", "register_search", "build_search", "DotScore", "MLPScore",
           "TargetAttention", "masked_softmax", "select_topk", "select_recent_same_category",
           "select_all", "attend", "recent_same_category_key"]


@dataclass(frozen=True)
class Interest:
    """What a search hands to the head, plus what analyses look at.

    r: (B, E) aggregated history; r_full: (B, E) softmax attention over the whole history (aux head),
    None when not asked for; index/weights: (B, K) kept positions and their weights; scores: (B, L)
    attention logits over the whole history (masked positions hold a large negative number).
    """

    r: torch.Tensor
    r_full: torch.Tensor | None = None
    index: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    scores: torch.Tensor | None = None


def masked_softmax(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Softmax over valid entries of the last dim; exactly 0 elsewhere, all-zero rows when none is valid."""
    filled = logits.masked_fill(~valid, torch.finfo(logits.dtype).min)
    return torch.softmax(filled, dim=-1) * valid


class DotScore(nn.Module):
    """TWIN/DARE score: <q, k> / sqrt(D) on [item; category; item features] (D = (2 + n) d_A) plus a learned
    bias per position and per code of every context feature in the score (time gap, behaviour type).

    The dot product is summed field by field, so the (B, L, D) key tensor is never concatenated."""

    def forward(self, emb: RoleEmbeddings, batch: Batch) -> torch.Tensor:
        queries = emb.semantic_fields("query", batch.target_item, batch.target_category, batch.target_features)
        keys = emb.semantic_fields("key", batch.hist_items, batch.hist_categories, batch.hist_features)
        width = sum(q.shape[-1] for q in queries)                                      # D
        scores = sum(row_dots(q, k) for q, k in zip(queries, keys)) / math.sqrt(width)  # (B, L)
        bias = emb.score_bias(batch.hist_positions, batch.hist_features)              # (B, L) or None
        if bias is not None:
            scores = scores + bias
        return scores


class MLPScore(nn.Module):
    """DIN's activation unit on [q, k, q - k, q * k], divided by the token width as the reference does,
    plus the context features' score bias (none by default; the position bias is not used, as in DIN)."""

    def __init__(self, token_dim: int, hidden: int = 36) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(4 * token_dim, hidden), nn.PReLU(), nn.Linear(hidden, 1))
        self.scale = float(token_dim)

    def forward(self, emb: RoleEmbeddings, batch: Batch) -> torch.Tensor:
        query = emb.semantic("query", batch.target_item, batch.target_category, batch.target_features)  # (B, D)
        keys = emb.semantic("key", batch.hist_items, batch.hist_categories, batch.hist_features)        # (B, L, D)
        query = query.unsqueeze(1).expand_as(keys)
        features = torch.cat([query, keys, query - keys, query * keys], dim=-1)      # (B, L, 4 D)
        scores = self.mlp(features).squeeze(-1) / self.scale                         # (B, L)
        bias = emb.score_bias(None, batch.hist_features)
        return scores if bias is None else scores + bias


def select_topk(scores: torch.Tensor, batch: Batch, k: int) -> torch.Tensor:
    """Soft search: the K highest-scoring real behaviours (padding only when fewer than K exist)."""
    masked = scores.detach().masked_fill(~batch.mask, torch.finfo(scores.dtype).min)
    return masked.topk(min(k, scores.shape[-1]), dim=-1).indices                   # (B, K)


def select_recent_same_category(scores: torch.Tensor, batch: Batch, k: int) -> torch.Tensor:
    """Hard search: the K most recent behaviours of the target's category, topped up with the most
    recent others. The score is not used for the choice, only (once) for the weights afterwards."""
    key = recent_same_category_key(positions=batch.hist_positions, categories=batch.hist_categories,
                                   target_categories=batch.target_category.unsqueeze(1), mask=batch.mask)
    return key.topk(min(k, scores.shape[-1]), dim=-1).indices                      # (B, K)


def recent_same_category_key(*, positions: torch.Tensor, categories: torch.Tensor,
                             target_categories: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Hard search's ranking key: every same-category behaviour above every other, the more recent
    first, -1 on padding. Broadcasts, so training (B, L) and serving (U, C, N) share one rule."""
    top = positions.max()
    recency = (top + 1 - positions).to(torch.float32)                              # larger = more recent
    same = (categories == target_categories).to(torch.float32)
    return torch.where(mask, recency + same * (top + 2), -1.0)


def select_all(scores: torch.Tensor, batch: Batch, k: int) -> torch.Tensor:
    """No search: keep the whole history (full-sequence attention, e.g. DIN as published)."""
    return torch.arange(scores.shape[-1], device=scores.device).expand_as(scores)  # (B, L)


def attend(emb: RoleEmbeddings, batch: Batch, logits: torch.Tensor, index: torch.Tensor | None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax the logits at `index` (all positions when None) and sum the value tokens there.

    Values are looked up only at the kept positions, so the representation path costs O(B K E); they are
    summed field by field (`weighted_values`), never joined into (B, K, E) tokens."""
    if index is not None:
        batch = batch.take_history(index)                                           # (B, K) fields
        logits = logits.gather(1, index)                                            # (B, K)
    weights = masked_softmax(logits, batch.mask)                                    # (B, K)
    r = emb.weighted_values(weights, batch.hist_items, batch.hist_categories, batch.hist_positions,
                            batch.hist_features)                                    # (B, E)
    return r, weights


class TargetAttention(nn.Module):
    """Score all L behaviours, select K of them, softmax over the selected K (TWIN's consistent
    search and attention; DARE is the same module on decoupled tables).

    `aux_over_kept`: the aux head's attention covers the kept K only (the reference's hard search masks
    the history to its K before any attention, so its aux head sees r itself), not the whole history."""

    def __init__(self, *, scorer: nn.Module, select: Callable[[torch.Tensor, Batch, int], torch.Tensor],
                 top_k: int, aux_over_kept: bool = False) -> None:
        super().__init__()
        self.scorer, self.select, self.top_k, self.aux_over_kept = scorer, select, top_k, aux_over_kept

    def forward(self, emb: RoleEmbeddings, batch: Batch, *, full: bool = False) -> Interest:
        scores = self.scorer(emb, batch)                                            # (B, L)
        index = self.select(scores, batch, self.top_k)                              # (B, K)
        r, weights = attend(emb, batch, scores, index)
        r_full = None
        if full:
            r_full = r if self.aux_over_kept else attend(emb, batch, scores, None)[0]
        return Interest(r=r, r_full=r_full, index=index, weights=weights, scores=scores)


SearchBuilder = Callable[[ModelConfig], nn.Module]
SEARCHES: dict[str, SearchBuilder] = {}
register_search = registrar(SEARCHES)


def _scorer(config: ModelConfig) -> nn.Module:
    return DotScore() if config.score == "dot" else MLPScore(config.semantic_dim)


@register_search("topk")
def _topk(config: ModelConfig) -> nn.Module:
    return TargetAttention(scorer=_scorer(config), select=select_topk, top_k=config.top_k)


@register_search("hard")
def _hard(config: ModelConfig) -> nn.Module:
    return TargetAttention(scorer=_scorer(config), select=select_recent_same_category, top_k=config.top_k,
                           aux_over_kept=True)


@register_search("full")
def _full(config: ModelConfig) -> nn.Module:
    return TargetAttention(scorer=_scorer(config), select=select_all, top_k=config.top_k)


def build_search(config: ModelConfig) -> nn.Module:
    if config.search not in SEARCHES:
        raise ConfigError(f"unknown search {config.search!r}; known: {sorted(SEARCHES)}")
    return SEARCHES[config.search](config)
