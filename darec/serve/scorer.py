"""Inference: score C candidate items per user against a long history in one search pass.

The training model sees one (history, target) pair per row, so C candidates of one user would look
the same history up C times. Here the key embeddings (width 2 K_A) of a user's N behaviours are
gathered once and shared by all C candidates: scores (U, C, N) are one batched matmul plus the
position bias (or one fused score-and-top-K kernel on GPU, see fused_search.py), K positions are
kept per candidate, and only those K value tokens, the softmax and the MLP head are computed. This
is where DARE's small attention dimension pays: search cost is linear in K_A.

The hashing baselines share the user pass too: ETA hashes the N keys once and ranks by Hamming
distance per candidate; SDIM builds its per-user bucket sums once, after which a candidate costs m
lookups, independent of N (its serving form, which is what makes it fast).

Side features (docs/features.md): the history's codes travel in `History.features`, the candidates'
item-feature codes are looked up from the item ids in the tables given to the Scorer (`item_features`,
the dataset's; `darec.serve.predict.load_scorer` passes them), the users' codes in `History.user_features`.

Notation: U users, C candidates per user, N history length, K kept behaviours, D = (2 + item features) K_A,
E token width.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from darec.checkpoint import load_model_checkpoint
from darec.errors import ConfigError
from darec.models.embedding import RoleEmbeddings
from darec.models.head import head_features
from darec.models.hashing import nearest_codes_key, sign_vectors
from darec.models.search import masked_softmax, recent_same_category_key
from darec.models.two_stage import TwoStageModel
from darec.registry import registrar
from darec.serve.fused_search import search_topk
from darec.serve.history import DEFAULT_MAX_SCORES, History, resolve_candidates, user_chunks
from darec.serve.program_check import INPUT_NAMES

__all__ = ["Scorer", "ScorerModule", "History", "SearchResult", "SERVE_SEARCHES", "register_serve_search"]


@dataclass(frozen=True)
class SearchResult:
    """The search stage's output: logits (U, C, K) of the kept positions and index (U, C, K) into N,
    which the scorer softmaxes over; or, for a search without attention (SDIM), the interest (U, C, E)."""

    logits: torch.Tensor | None = None
    index: torch.Tensor | None = None
    interest: torch.Tensor | None = None


@dataclass(frozen=True)
class _SearchInputs:
    """Everything a serving search needs, computed once per user chunk."""

    emb: RoleEmbeddings
    search: torch.nn.Module   # the model's training search (its hash planes, for ETA and SDIM)
    history: History          # resolved: (U, N) tensors
    queries: torch.Tensor     # (U, C, D)
    keys: torch.Tensor        # (U, N, D), once per user
    bias: torch.Tensor | None  # (U, N) score bias (position and context features)
    cand_categories: torch.Tensor  # (U, C)
    top_k: int
    fused: bool | None


ServeSearch = Callable[[_SearchInputs], SearchResult]
SERVE_SEARCHES: dict[str, ServeSearch] = {}


# The serving form of a training search, under the same key as in `darec.models.search.SEARCHES`.
register_serve_search = registrar(SERVE_SEARCHES)


def _scale(inputs: _SearchInputs) -> float:
    return 1.0 / math.sqrt(inputs.queries.shape[-1])


@register_serve_search("topk")
def _serve_topk(inputs: _SearchInputs) -> SearchResult:
    """Soft search (TWIN/DARE): the K best-scoring real behaviours per candidate."""
    scores, index = search_topk(inputs.queries, inputs.keys, bias=inputs.bias, valid=inputs.history.mask,
                                k=inputs.top_k, scale=_scale(inputs), fused=inputs.fused)
    return SearchResult(logits=scores, index=index)


@register_serve_search("hard")
def _serve_hard(inputs: _SearchInputs) -> SearchResult:
    """Hard search (TWIN hard): the K most recent behaviours of the candidate's category, topped up
    with the most recent others; scores are then computed at the kept K only."""
    h = inputs.history
    n = h.items.shape[1]
    key = recent_same_category_key(positions=h.positions.unsqueeze(1), categories=h.categories.unsqueeze(1),
                                   target_categories=inputs.cand_categories.unsqueeze(2),
                                   mask=h.mask.unsqueeze(1))                                # (U, C, N)
    index = key.topk(min(inputs.top_k, n), dim=-1).indices                             # (U, C, K)
    return _logits_at(inputs, index)


@register_serve_search("eta")
def _serve_eta(inputs: _SearchInputs) -> SearchResult:
    """ETA: the N keys are hashed once per user; each candidate keeps its K nearest signatures by
    Hamming distance (ties to the most recent), then dot-product logits at those K only. The
    distances come from one matrix product of +-1 signatures (torch has no popcount)."""
    h, planes = inputs.history, inputs.search.scorer.planes
    agree = sign_vectors(inputs.queries, planes) @ sign_vectors(inputs.keys, planes).transpose(1, 2)  # (U, C, N)
    distance = (planes.shape[1] - agree) / 2                                           # Hamming, exact
    key = nearest_codes_key(-distance, h.positions.unsqueeze(1), h.mask.unsqueeze(1))        # (U, C, N)
    index = key.topk(min(inputs.top_k, h.items.shape[1]), dim=-1).indices               # (U, C, K)
    return _logits_at(inputs, index)


@register_serve_search("sdim")
def _serve_sdim(inputs: _SearchInputs) -> SearchResult:
    """SDIM: per user, the sum of value tokens in every (hash, bucket), built once from all N
    behaviours; per candidate, its m buckets' sums are looked up and combined."""
    h, sdim = inputs.history, inputs.search
    values = inputs.emb.values(h.items, h.categories, h.positions, h.features)         # (U, N, E)
    return SearchResult(interest=sdim.lookup(sdim.user_cache(inputs.keys, values, h.mask), inputs.queries))


def _logits_at(inputs: _SearchInputs, index: torch.Tensor) -> SearchResult:
    """Dot-product logits (plus position bias) at the kept positions `index` (U, C, K) only."""
    u, c, k = index.shape
    kept_keys = inputs.keys.gather(1, index.reshape(u, c * k, 1).expand(-1, -1, inputs.keys.shape[-1]))
    kept_keys = kept_keys.reshape(u, c, k, -1)                                         # (U, C, K, D)
    logits = torch.einsum("ucd,uckd->uck", inputs.queries, kept_keys) * _scale(inputs)  # (U, C, K)
    if inputs.bias is not None:
        logits = logits + inputs.bias.gather(1, index.reshape(u, c * k)).reshape(u, c, k)
    return SearchResult(logits=logits, index=index)


def item_table(values: np.ndarray | torch.Tensor) -> torch.Tensor:
    """An item id -> code (int64) or numeric value (float32) table, copied (a dataset's are read-only maps)."""
    table = torch.from_numpy(np.array(values))
    return table.float() if table.is_floating_point() else table.long()


class ScorerModule(torch.nn.Module):
    """The serving computation on plain tensors: (U, N) histories and (U, C) candidates -> logits (U, C).

    One module, so that `Scorer` (input checks and user chunks around it, through `logits`) and
    `torch.export` (darec.serve.export, through `forward`) run the very same code: an exported program is
    this forward, traced. Inputs are resolved (`History.resolved`): int64 ids and positions, bool mask.

    `forward` takes flat tensors, `input_names` in order: the six of a model without side features, then one
    per side feature in `config.features` order, `hist_NAME` (U, N) for a behaviour's feature (item and
    context kinds) and `user_NAME` (U,) for a user feature, int64 codes or float32 values (numeric features).
    Candidates' item features are looked up inside it from `item_features` (item id -> code or value tables,
    kept as buffers), so a caller passes only candidate items.
    """

    def __init__(self, model: TwoStageModel, *, fused: bool | None = None,
                 item_features: Mapping[str, np.ndarray | torch.Tensor] | None = None) -> None:
        super().__init__()
        config = model.config
        if config.score != "dot":
            raise ConfigError(f"Scorer supports the dot-product score only; this model uses {config.score!r} "
                              "(DIN-style MLP attention must score each candidate separately)")
        if config.search not in SERVE_SEARCHES:
            raise ConfigError(f"Scorer does not support search {config.search!r}; supported: "
                              f"{sorted(SERVE_SEARCHES)}")
        self.model = model.eval()
        self.config = config
        self.fused = fused
        self._search = SERVE_SEARCHES[config.search]
        self.feature_inputs = tuple((f"{'user' if f.kind == 'user' else 'hist'}_{f.name}", f) for f in config.features)
        self.input_names = INPUT_NAMES + tuple(name for name, _ in self.feature_inputs)
        device = next(model.parameters()).device
        for name in config.item_features:  # buffers item_table_NAME (no attribute at all without item features)
            if name in (item_features or {}):
                self.register_buffer(f"item_table_{name}", item_table(item_features[name]).to(device))

    def forward(self, hist_items: torch.Tensor, hist_categories: torch.Tensor, hist_mask: torch.Tensor,
                hist_positions: torch.Tensor, cand_items: torch.Tensor, cand_categories: torch.Tensor,
                *features: torch.Tensor) -> torch.Tensor:
        """Main-head logits (U, C) of flat inputs (`input_names`): what an exported program computes."""
        by_input = dict(zip((name for name, _ in self.feature_inputs), features, strict=True))
        h = History(items=hist_items, categories=hist_categories, mask=hist_mask, positions=hist_positions,
                    features={f.name: by_input[name] for name, f in self.feature_inputs if f.kind != "user"},
                    user_features={f.name: by_input[name] for name, f in self.feature_inputs if f.kind == "user"})
        return self.logits(h, cand_items, cand_categories, self.candidate_features(cand_items))

    def candidate_features(self, cand_items: torch.Tensor) -> dict[str, torch.Tensor]:
        """The candidates' item features from the `item_features` tables: (U, C) each."""
        missing = [name for name in self.config.item_features if not hasattr(self, f"item_table_{name}")]
        if missing:
            raise ConfigError(f"this model reads item feature(s) {missing}: give the ScorerModule the dataset's "
                              "item tables (item_features=dataset.item_features)")
        return {name: self.get_buffer(f"item_table_{name}")[cand_items] for name in self.config.item_features}

    def logits(self, h: History, cand_items: torch.Tensor, cand_categories: torch.Tensor,
               cand_features: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Main-head logits (U, C) of a resolved history: every embedding set's head input side by side, as in
        training. Side features (models with side features only): `h.features` (U, N), `h.user_features` (U,),
        `cand_features` (U, C)."""
        u, c = cand_items.shape
        features = []
        for emb, search in self.model.embedding_sets:  # M sets (1 unless multi-embedding)
            found = self._search(self._inputs(emb, search, h, cand_items, cand_categories, cand_features))
            r = found.interest if found.interest is not None else self._attend(emb, h, found)  # (U, C, E)
            target = emb.target(cand_items, cand_categories, cand_features)             # (U, C, E)
            user = emb.user(h.user_features)                                            # (U, n_u d_R) or None
            user = None if user is None else user.unsqueeze(1).expand(-1, c, -1)        # (U, C, n_u d_R)
            features.append(head_features(target, r, target_aware=self.config.target_aware, user=user))
        return self.model.head(torch.cat(features, dim=-1).reshape(u * c, -1)).reshape(u, c)

    def search(self, h: History, items: torch.Tensor, cats: torch.Tensor,
               cand_features: Mapping[str, torch.Tensor] | None = None) -> SearchResult:
        """The (first embedding set's) search stage on a resolved history: kept positions and their logits."""
        return self._search(self._inputs(self.model.embeddings, self.model.search, h, items, cats, cand_features))

    def _inputs(self, emb: RoleEmbeddings, search: torch.nn.Module, h: History, items: torch.Tensor,
                cats: torch.Tensor, cand_features: Mapping[str, torch.Tensor] | None) -> _SearchInputs:
        return _SearchInputs(
            emb=emb, search=search, history=h, cand_categories=cats, top_k=self.config.top_k, fused=self.fused,
            bias=emb.score_bias(h.positions, h.features),                            # (U, N) or None
            queries=emb.semantic("query", items, cats, cand_features),               # (U, C, D)
            keys=emb.semantic("key", h.items, h.categories, h.features))             # (U, N, D)

    @staticmethod
    def _attend(emb: RoleEmbeddings, h: History, found: SearchResult) -> torch.Tensor:
        """Softmax over the K kept positions and the weighted sum of their value tokens: (U, C, E)."""
        u, c, k = found.index.shape
        flat = found.index.reshape(u, c * k)                                         # (U, C K)
        kept = [t.gather(1, flat).reshape(u, c, k) for t in (h.items, h.categories, h.positions, h.mask)]
        codes = {n: t.gather(1, flat).reshape(u, c, k) for n, t in h.features.items()}
        weights = masked_softmax(found.logits, kept[3])                              # (U, C, K)
        return emb.weighted_values(weights, kept[0], kept[1], kept[2], codes)        # (U, C, E)


class Scorer:
    """Click probabilities of C candidates for each of U users, sharing one history pass per user.

    Equals the training model's eval-mode forward on the (history, candidate) pairs; supports the
    searches in `SERVE_SEARCHES` (soft top-K, hard search, ETA, SDIM, ...) with the dot-product score.
    The computation is `ScorerModule`; this class resolves and checks inputs and bounds memory by
    scoring users in chunks.
    """

    def __init__(self, model: TwoStageModel, *, fused: bool | None = None,
                 max_scores: int = DEFAULT_MAX_SCORES,
                 item_features: Mapping[str, np.ndarray | torch.Tensor] | None = None) -> None:
        self.module = ScorerModule(model, fused=fused)
        self.model = self.module.model
        self.config = self.module.config
        self.max_scores = max_scores
        self.item_features: dict[str, torch.Tensor] = {}
        self.use_item_features(item_features or {})

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "cpu", fused: bool | None = None,
             item_features: Mapping[str, np.ndarray | torch.Tensor] | None = None) -> "Scorer":
        return cls(load_model_checkpoint(path, device=device), fused=fused, item_features=item_features)

    def use_item_features(self, tables: Mapping[str, np.ndarray | torch.Tensor]) -> None:
        """Item id -> code tables (n_items,) of the model's item features (a dataset's `item_features`; float
        values for numeric ones), from which candidates' codes are looked up; tables of features the model
        does not read are ignored."""
        self.item_features = {name: item_table(tables[name]).to(self.device)
                              for name in self.config.item_features if name in tables}

    def _candidate_features(self, items: torch.Tensor) -> dict[str, torch.Tensor]:
        missing = [n for n in self.config.item_features if n not in self.item_features]
        if missing:
            raise ConfigError(f"this model reads item feature(s) {missing}: give the Scorer the dataset's item "
                              "features (Scorer(..., item_features=dataset.item_features))")
        return {name: table[items] for name, table in self.item_features.items()}

    @property
    def fused(self) -> bool | None:
        return self.module.fused

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def search(self, history: History, cand_items: torch.Tensor, cand_categories: torch.Tensor) -> SearchResult:
        """The search stage alone for one chunk of users: kept positions and their logits (U, C, K)."""
        h = history.resolved(self.device)
        items, cats = resolve_candidates(h, cand_items, cand_categories, self.device)
        return self.module.search(h, items, cats, self._candidate_features(items))

    @torch.inference_mode()
    def logits(self, history: History, cand_items: torch.Tensor, cand_categories: torch.Tensor) -> torch.Tensor:
        """Main-head logits (U, C); users are processed in chunks that bound the score matrix."""
        h = history.resolved(self.device)
        items, cats = resolve_candidates(h, cand_items, cand_categories, self.device)
        cand = self._candidate_features(items)
        (u, c), n = items.shape, h.items.shape[1]
        parts = []
        for rows in user_chunks(u, c, n, self.max_scores):  # a few chunks, each vectorised
            part = h.rows(rows)
            parts.append(self.module.logits(part, items[rows], cats[rows], {k: v[rows] for k, v in cand.items()}))
        return torch.cat(parts)

    def score(self, history: History, cand_items: torch.Tensor, cand_categories: torch.Tensor) -> torch.Tensor:
        """Click probabilities (U, C)."""
        return torch.sigmoid(self.logits(history, cand_items, cand_categories))


# Serving searches defined in their own modules register on import; last, because they import this module.
from darec.serve import ifa  # noqa: E402,F401  (IFA)
