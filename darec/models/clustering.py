"""TWIN-V2 (Si et al., 2024): hierarchical clustering of the history into virtual items, then
cluster-size-aware target attention (Eq. "ln n_c" term) in both search and aggregation.

Clustering is batched over users and split level by level: at each level every cluster larger than
`cap` is split in two by k-means (deterministic farthest-point start, fixed Lloyd iterations); after
`levels` levels, clusters still over the cap (e.g. one item repeated) are cut into runs of `cap`
consecutive behaviours. No randomness and no per-sample loop: evaluation is reproducible.

Notation: B batch, L history length, C clusters per row (<= L), K kept clusters, D clustered width
(2 d_A), E token width.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from darec.data.batch import Batch
from darec.errors import ConfigError
from darec.models.config import ModelConfig
from darec.models.embedding import RoleEmbeddings
from darec.models.search import DotScore, Interest, attend, masked_softmax, register_search
from darec.models.split_search import search_options

__all__ = ["VirtualItems", "relabel", "cluster_sizes", "cluster_means", "two_means_split", "split_oversized",
           "hierarchical_clusters", "TwinV2Search"]


def relabel(ids: torch.Tensor) -> torch.Tensor:
    """Dense per-row ids 0..C-1 in increasing order of `ids` (B, L); negative ids (padding) stay -1."""
    sorted_ids, perm = ids.sort(dim=1)                                                   # (B, L)
    new = torch.ones_like(sorted_ids, dtype=torch.bool)
    new[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    new &= sorted_ids >= 0
    dense = new.cumsum(1) - 1
    dense = dense.masked_fill(sorted_ids < 0, -1)
    return torch.empty_like(dense).scatter_(1, perm, dense)                              # (B, L)


def cluster_sizes(assign: torch.Tensor, n: int) -> torch.Tensor:
    """Members of each of n cluster ids per row: (B, n); assign (B, L), -1 = padding."""
    valid = assign >= 0
    return torch.zeros(assign.shape[0], n, dtype=torch.int64, device=assign.device).scatter_add_(
        1, assign.clamp(min=0), valid.to(torch.int64))


def _flat(assign: torch.Tensor, n: int) -> torch.Tensor:
    """Row-offset cluster ids b * n + c (B, L), padding sent to its row's cluster 0 (callers mask it)."""
    rows = torch.arange(assign.shape[0], device=assign.device).unsqueeze(1) * n
    return (assign.clamp(min=0) + rows)


def cluster_means(x: torch.Tensor, assign: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of x (B, L, D) over each cluster: ((B, n, D), sizes (B, n)); empty clusters give 0.

    One `index_add_` on the flattened (B n, D) table: much faster on CPU than a scatter with an
    expanded (B, L, D) index, and no (B, L, D) masking product."""
    b = x.shape[0]
    rows = torch.where(assign >= 0, _flat(assign, n), b * n)  # padding goes to one spare row, dropped after
    sums = x.new_zeros(b * n + 1, x.shape[-1])
    sums.index_add_(0, rows.flatten(), x.flatten(0, 1))                                  # (B n + 1, D)
    sizes = cluster_sizes(assign, n)
    return sums[:-1].view(b, n, -1) / sizes.clamp(min=1).unsqueeze(-1).to(x.dtype), sizes


def _members(centers: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
    """Each behaviour's own cluster row of centers (B, n, D): (B, L, D)."""
    flat = _flat(assign, centers.shape[1]).flatten()
    return centers.flatten(0, 1).index_select(0, flat).view(*assign.shape, -1)          # (B, L, D)


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-behaviour dot product of (B, L, D) tensors: (B, L). einsum runs it as a batched matmul,
    about 5x faster on CPU than (a * b).sum(-1), which writes the (B, L, D) product first."""
    return torch.einsum("bld,bld->bl", a, b)


def _sq_dist(x: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    diff = x - centers
    return _row_dot(diff, diff)                                                           # (B, L)


def _farthest(dist: torch.Tensor, assign: torch.Tensor, active: torch.Tensor, n: int) -> torch.Tensor:
    """Per cluster, the slot of its active member with the largest `dist` (lowest slot on ties): (B, n)."""
    length = dist.shape[1]
    d = dist.masked_fill(~active, -1.0)
    best = torch.full((dist.shape[0], n), -1.0, device=dist.device, dtype=dist.dtype)
    best = best.scatter_reduce(1, assign.clamp(min=0), d, reduce="amax")                 # (B, n)
    slots = torch.arange(length, device=dist.device).expand_as(assign)
    is_best = active & (d == best.gather(1, assign.clamp(min=0)))
    candidate = torch.where(is_best, slots, length)
    first = torch.full_like(best, length, dtype=torch.int64)
    return first.scatter_reduce(1, assign.clamp(min=0), candidate, reduce="amin").clamp(max=length - 1)


def two_means_split(x: torch.Tensor, assign: torch.Tensor, active: torch.Tensor, *, iters: int) -> torch.Tensor:
    """Side (0/1) of each behaviour after 2-means inside its cluster; 0 outside `active` members.

    x (B, L, D); assign (B, L) dense ids; active (B, L) members of clusters to split. Start: the member
    farthest from the cluster mean, then the member farthest from that one; then `iters` Lloyd steps."""
    n = int(assign.max().item()) + 1  # clusters so far: small at the first levels, at most L
    mean, _ = cluster_means(x, torch.where(active, assign, -1), n)                       # (B, n, D)
    first = _farthest(_sq_dist(x, _members(mean, assign)), assign, active, n)            # (B, n)
    flat_x = x.flatten(0, 1)
    rows = torch.arange(x.shape[0], device=x.device).unsqueeze(1) * n
    center_a = flat_x.index_select(0, (first + rows).flatten()).view_as(mean)           # (B, n, D)
    second = _farthest(_sq_dist(x, _members(center_a, assign)), assign, active, n)
    center_b = flat_x.index_select(0, (second + rows).flatten()).view_as(mean)          # (B, n, D)
    side = torch.zeros_like(assign)
    for step in range(iters + 1):
        # |x - b|^2 < |x - a|^2  <=>  2 x.(b - a) > |b|^2 - |a|^2: one member lookup instead of two
        delta = _members(torch.cat([center_b - center_a, (center_b.pow(2).sum(-1) - center_a.pow(2).sum(-1)
                                                          ).unsqueeze(-1)], -1), assign)  # (B, L, D + 1)
        closer_b = 2 * _row_dot(x, delta[..., :-1]) > delta[..., -1]
        side = (closer_b & active).to(torch.int64)                                        # (B, L)
        if step == iters:
            break
        halves, sizes = cluster_means(x, torch.where(active, 2 * assign + side, -1), 2 * n)  # (B, 2n, D)
        keep = (sizes == 0).unsqueeze(-1)
        center_a = torch.where(keep[:, 0::2], center_a, halves[:, 0::2])
        center_b = torch.where(keep[:, 1::2], center_b, halves[:, 1::2])
    return side


def split_oversized(assign: torch.Tensor, cap: int) -> torch.Tensor:
    """Cut every cluster into runs of `cap` members in slot (time) order; clusters <= cap unchanged."""
    b, length = assign.shape
    slots = torch.arange(length, device=assign.device).expand(b, length)
    key = torch.where(assign >= 0, assign * length + slots, -1)
    sorted_key, perm = key.sort(dim=1)                                                   # (B, L)
    sorted_cluster = torch.where(sorted_key >= 0, sorted_key // length, -1)
    starts = torch.ones_like(sorted_key, dtype=torch.bool)
    starts[:, 1:] = sorted_cluster[:, 1:] != sorted_cluster[:, :-1]
    run_start = torch.where(starts, slots, 0).cummax(dim=1).values                       # (B, L)
    rank = slots - run_start
    chunked = torch.where(sorted_cluster >= 0, sorted_cluster * length + rank // cap, -1)
    return relabel(torch.empty_like(chunked).scatter_(1, perm, chunked))


def hierarchical_clusters(x: torch.Tensor, mask: torch.Tensor, *, cap: int, levels: int, iters: int = 4
                          ) -> torch.Tensor:
    """Cluster id (0..C-1) of every real behaviour, -1 at padding: (B, L). Every cluster has <= cap members.

    x (B, L, D) is used as given (detach it first); cost O(levels * iters * B L D)."""
    if cap < 1 or levels < 0 or iters < 0:
        raise ConfigError(f"need cap >= 1, levels >= 0, iters >= 0; got {cap}, {levels}, {iters}")
    assign = torch.where(mask, 0, -1)                                                   # (B, L)
    for _ in range(levels):
        sizes = cluster_sizes(assign, int(assign.max().item()) + 1)                      # (B, C)
        active = mask & (sizes.gather(1, assign.clamp(min=0)) > cap)
        if not bool(active.any()):
            break
        side = two_means_split(x, assign, active, iters=iters)
        assign = relabel(torch.where(mask, 2 * assign + side, -1))
    return split_oversized(assign, cap)


@dataclass(frozen=True)
class VirtualItems:
    """A batch of histories compressed into clusters: what a server would precompute per user.

    assign (B, L) cluster of each behaviour (-1 = padding); keys (B, C, D) and values (B, C, E) the
    members' means; prior (B, C) the members' mean position bias plus ln(cluster size); valid (B, C)."""

    assign: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    prior: torch.Tensor
    sizes: torch.Tensor

    @property
    def valid(self) -> torch.Tensor:
        return self.sizes > 0


class TwinV2Search(nn.Module):
    """Clusters each history on its detached key embeddings, then TWIN's search and attention over
    the virtual items with ln(cluster size) added to the score.

    A virtual item's key, value token and score bias (position and context) are its members' means, so
    every field of a virtual item is an average. `Interest.index` is every position and `weights`
    (B, L) each behaviour's share (its cluster's weight / cluster size), so r = sum_i w_i v_i;
    `scores` (B, L) is the score of each behaviour's cluster."""

    def __init__(self, *, top_k: int, cap: int, levels: int, iters: int) -> None:
        super().__init__()
        self.top_k, self.cap, self.levels, self.iters = top_k, cap, levels, iters

    def virtual_items(self, emb: RoleEmbeddings, batch: Batch) -> VirtualItems:
        """The clustering and the clusters' means: target-independent, so computed once per history."""
        keys = emb.semantic("key", batch.hist_items, batch.hist_categories, batch.hist_features)  # (B, L, D)
        assign = hierarchical_clusters(keys.detach(), batch.mask, cap=self.cap, levels=self.levels,
                                       iters=self.iters)                                 # (B, L)
        n = int(assign.max().item()) + 1 if bool(batch.mask.any()) else 1
        centers, sizes = cluster_means(keys, assign, n)                                  # (B, C, D), (B, C)
        values = emb.values(batch.hist_items, batch.hist_categories, batch.hist_positions,
                            batch.hist_features)                                         # (B, L, E)
        prior = sizes.clamp(min=1).to(keys.dtype).log()                                  # ln n_c
        bias = emb.score_bias(batch.hist_positions, batch.hist_features)                 # (B, L) or None
        if bias is not None:
            prior = prior + cluster_means(bias.unsqueeze(-1), assign, n)[0].squeeze(-1)
        return VirtualItems(assign=assign, keys=centers, values=cluster_means(values, assign, n)[0],
                            prior=prior, sizes=sizes)

    def search(self, query: torch.Tensor, virtual: VirtualItems) -> tuple[torch.Tensor, torch.Tensor]:
        """Cluster-aware scores (B, C) of the query (B, D) and the K kept clusters (B, K)."""
        logits = torch.einsum("bd,bcd->bc", query, virtual.keys) / math.sqrt(query.shape[-1]) + virtual.prior
        masked = logits.detach().masked_fill(~virtual.valid, torch.finfo(logits.dtype).min)
        return logits, masked.topk(min(self.top_k, logits.shape[1]), dim=-1).indices

    def forward(self, emb: RoleEmbeddings, batch: Batch, *, full: bool = False) -> Interest:
        """Returns r (B, E), index/weights/scores (B, L); r_full (B, E) when `full`."""
        virtual = self.virtual_items(emb, batch)
        logits, kept = self.search(emb.semantic("query", batch.target_item, batch.target_category,
                                                batch.target_features), virtual)
        weights = masked_softmax(logits.gather(1, kept), virtual.valid.gather(1, kept))  # (B, K)
        e = virtual.values.shape[-1]
        r = torch.einsum("bk,bke->be", weights, virtual.values.gather(1, kept.unsqueeze(-1).expand(-1, -1, e)))
        per_cluster = torch.zeros_like(logits).scatter(1, kept, weights) / virtual.sizes.clamp(min=1)  # (B, C)
        slot = virtual.assign.clamp(min=0)
        share = per_cluster.gather(1, slot) * batch.mask                                 # (B, L)
        scores = logits.gather(1, slot).masked_fill(~batch.mask, torch.finfo(logits.dtype).min)
        r_full = attend(emb, batch, DotScore()(emb, batch), None)[0] if full else None
        index = torch.arange(scores.shape[1], device=scores.device).expand_as(scores)   # (B, L)
        return Interest(r=r, r_full=r_full, index=index, weights=share, scores=scores)


@register_search("twin_v2")
def _twin_v2(config: ModelConfig) -> nn.Module:
    """TWIN-V2; options: cluster_cap (8), levels (halvings of max_len to reach the cap), iters (3).

    Unbalanced k-means splits that are still over the cap after `levels` are cut in time order; more
    levels cost more (the later ones are the expensive ones) for slightly purer clusters."""
    options = search_options(config, {"cluster_cap": 8, "levels": None, "iters": 3})
    cap = options["cluster_cap"]
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
        raise ConfigError(f"search option cluster_cap must be a positive integer, got {cap!r}")
    levels = options["levels"]
    if levels is None:
        levels = max(0, math.ceil(math.log2(max(config.max_len, 1) / cap)))
    return TwinV2Search(top_k=config.top_k, cap=cap, levels=int(levels), iters=int(options["iters"]))
