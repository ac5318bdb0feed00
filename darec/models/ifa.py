"""IFA (Yu et al., arXiv 2406.09742): one stage, the whole history, all candidates of a request at once.

Two-stage models (TWIN, DARE) score every behaviour per candidate and keep K: O(C N d_A) per request, and
the N - K dropped behaviours never reach the representation. IFA replaces the softmax of target attention
by a kernel, exp(<q, k>) -> phi(q) . phi(k) with phi = elu(LN(.)) + 1, so the history folds into a per-user
state once and every candidate reads it in O(d^2), without dropping any behaviour:

    S = sum_n g_n phi(k_n) u_n^T   (D x E),   z = sum_n g_n phi(k_n)   (D)
    r(q) = phi(q)^T S / phi(q)^T z = sum_n w_n u_n,  w_n = g_n phi(q) . phi(k_n) / sum_m g_m phi(q) . phi(k_m)

q, k_n: the attention roles' [item; category] (width D = 2 d_A); u_n: the representation token
[item; category; position] (width E); g_n = exp(b(p_n)): the learned position bias of TWIN/DARE's score
(softmax(s + b) = exp(s) exp(b) / ...), as a multiplicative gate. Then the candidates of one set attend to
each other with the same linear attention (x_c = [q_c; r_c], learned maps to query/key/value), and the
result is added to r_c: the head sees each candidate in the context of the others. Cost per request
O((N + C) D E), against O(C N D) for the two-stage search.

In training a candidate set is a positive and its negatives of the same user and cut
(`Batch.candidate_set`); the history state is built once per set from one of its rows.

Notation: G sets (users), N history length, C candidates per set, D = 2 d_A, E token width.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from darec.data.batch import Batch, set_slots
from darec.models.config import ModelConfig
from darec.models.embedding import RoleEmbeddings
from darec.models.search import Interest, register_search
from darec.models.split_search import search_options

__all__ = ["feature_map", "linear_state", "read_state", "linear_attention", "CandidateAttention", "IFASearch"]


def feature_map(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = elu(LN(x)) + 1 > 0 (Katharopoulos et al., 2020, on layer-normalised inputs): phi(q) . phi(k)
    is a positive similarity. LN (no affine) puts the inputs at O(1) scale whatever the embeddings' norm:
    at the N(0, 0.01^2) initialisation elu(x) + 1 = 1 + x, so phi(q) . phi(k) ~ D and its gradient would
    not depend on the query (docs/ifa.md measures the difference)."""
    return F.elu(F.layer_norm(x, x.shape[-1:])) + 1


def linear_state(keys: torch.Tensor, values: torch.Tensor, gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The history folded once: S = sum_n gate_n phi(k_n) v_n^T (G, D, E) and z = sum_n gate_n phi(k_n) (G, D).

    keys (G, N, D), values (G, N, E), gate (G, N) >= 0, zero at padding."""
    phi = feature_map(keys) * gate.unsqueeze(-1)                                   # (G, N, D)
    return torch.einsum("gnd,gne->gde", phi, values), phi.sum(dim=1)


def read_state(state: torch.Tensor, norm: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Each query's attention output phi(q)^T S / phi(q)^T z: (G, C, E), O(D E) per query; 0 where the
    set's history is empty."""
    phi = feature_map(queries)                                                     # (G, C, D)
    numerator = torch.einsum("gcd,gde->gce", phi, state)                           # (G, C, E)
    denominator = torch.einsum("gcd,gd->gc", phi, norm)                            # (G, C)
    return numerator / torch.where(denominator > 0, denominator, 1.0).unsqueeze(-1)


def linear_attention(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     gate: torch.Tensor) -> torch.Tensor:
    """Kernelised attention of queries (G, C, D) over keys/values (G, N, D)/(G, N, E): (G, C, E)."""
    return read_state(*linear_state(keys, values, gate), queries)


class CandidateAttention(nn.Module):
    """Linear self-attention among the candidates of a set: each candidate reads the others' (and its
    own) values, weighted by phi(W_q x_c) . phi(W_k x_c'); O(C F D) per set."""

    def __init__(self, in_dim: int, key_dim: int, out_dim: int) -> None:
        super().__init__()
        self.query = nn.Linear(in_dim, key_dim, bias=False)
        self.key = nn.Linear(in_dim, key_dim, bias=False)
        self.value = nn.Linear(in_dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """x (G, C, F), present (G, C) bool (False at padding slots) -> (G, C, out_dim)."""
        return linear_attention(self.query(x), self.key(x), self.value(x), present.to(x.dtype))


class IFASearch(nn.Module):
    """The IFA 'search': no selection, the whole history through a per-set linear-attention state.

    `set_attention` adds the candidate self-attention (then the model reads whole candidate sets:
    `uses_candidate_sets`)."""

    def __init__(self, *, query_dim: int, token_dim: int, set_attention: bool) -> None:
        super().__init__()
        self.uses_candidate_sets = set_attention
        self.candidates = CandidateAttention(query_dim + token_dim, query_dim, token_dim) if set_attention else None

    def interest(self, *, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor,
                 queries: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Candidates' interest (G, C, E) from one history per set: keys (G, N, D), values (G, N, E), position
        bias (G, N) or None, mask (G, N), queries (G, C, D), present (G, C). Shared by training and serving."""
        gate = mask.to(keys.dtype)
        if bias is not None:  # exp(b - max b): the common factor cancels in the ratio, exp never overflows
            bias = bias.masked_fill(~mask, float("-inf"))
            top = bias.detach().amax(dim=1, keepdim=True).clamp(min=-1e30)         # (G, 1), finite
            gate = torch.exp(bias - top) * gate
        r = linear_attention(queries, keys, values, gate)                           # (G, C, E)
        if self.candidates is not None:
            r = r + self.candidates(torch.cat([queries, r], dim=-1), present)
        return r

    def forward(self, emb: RoleEmbeddings, batch: Batch, *, full: bool = False) -> Interest:
        sets, n_sets = batch.set_ids()
        slot, width = set_slots(sets, n_sets)
        leaders = torch.nonzero(slot == 0).squeeze(1)                               # one row per set
        first = torch.zeros(n_sets, dtype=torch.long, device=sets.device)
        first[sets[leaders]] = leaders                                              # (G,) its history row
        items, cats = batch.hist_items[first], batch.hist_categories[first]         # (G, N)
        positions, mask = batch.hist_positions[first], batch.mask[first]
        codes = {name: t[first] for name, t in batch.hist_features.items()}        # (G, N) each
        bias = emb.score_bias(positions, codes)                                     # (G, N) or None
        queries = emb.semantic("query", batch.target_item, batch.target_category, batch.target_features)  # (B, D)
        padded = queries.new_zeros(n_sets, width, queries.shape[-1]).index_put((sets, slot), queries)
        present = torch.zeros(n_sets, width, dtype=torch.bool, device=sets.device)
        present[sets, slot] = True
        r = self.interest(keys=emb.semantic("key", items, cats, codes),
                          values=emb.values(items, cats, positions, codes),
                          bias=bias, mask=mask, queries=padded, present=present)[sets, slot]  # (B, E)
        scores = None if self.training else self._scores(emb, batch, queries)
        return Interest(r=r, r_full=r if full else None, scores=scores)

    @torch.no_grad()
    def _scores(self, emb: RoleEmbeddings, batch: Batch, queries: torch.Tensor) -> torch.Tensor:
        """log of the unnormalised history weights, log(phi(q) . phi(k_n)) + b(p_n): (B, N), like the
        two-stage searches' logits (their softmax is IFA's weights; analyses read it). Evaluation only."""
        keys = emb.semantic("key", batch.hist_items, batch.hist_categories, batch.hist_features)  # (B, N, D)
        scores = torch.einsum("bd,bnd->bn", feature_map(queries), feature_map(keys)).log()
        bias = emb.score_bias(batch.hist_positions, batch.hist_features)
        if bias is not None:
            scores = scores + bias
        return scores.masked_fill(~batch.mask, torch.finfo(scores.dtype).min)


@register_search("ifa")
def _ifa(config: ModelConfig) -> nn.Module:
    options = search_options(config, {"set_attention": True})
    return IFASearch(query_dim=config.semantic_dim, token_dim=config.token_dim,
                     set_attention=bool(options["set_attention"]))
