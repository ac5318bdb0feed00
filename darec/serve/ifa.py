"""IFA's serving form: the history folded into one linear-attention state per user, then every candidate
reads it in O(d_A d_R) and the candidates attend to each other; no top-K, no (U, C, N) score matrix.

Notation: U users, C candidates per user, N history length, E token width.
"""
from __future__ import annotations

import torch

from darec.serve.scorer import SearchResult, _SearchInputs, register_serve_search

__all__: list[str] = []


@register_serve_search("ifa")
def _serve_ifa(inputs: _SearchInputs) -> SearchResult:
    """The C candidates of a user are one candidate set, as in training (`IFASearch.interest`)."""
    h = inputs.history
    present = torch.ones(inputs.queries.shape[:2], dtype=torch.bool, device=inputs.queries.device)  # (U, C)
    return SearchResult(interest=inputs.search.interest(
        keys=inputs.keys, values=inputs.emb.values(h.items, h.categories, h.positions, h.features), bias=inputs.bias,
        mask=h.mask, queries=inputs.queries, present=present))                                    # (U, C, E)
