"""Embedding tables and the four roles that read them.

Roles: query (target, attention), key (history, attention), target (v_t, representation),
value (history, representation). `ModelConfig.tables` decides which roles share a table set;
that single choice is the difference between TWIN (one set), DARE (two) and TWIN-4E (four).

Side features (`ModelConfig.features`, docs/features.md) are more tables in the same sets: an item feature
(brand) joins [item; category] wherever they are read, a context feature (time gap, behaviour type) is a
score bias per code and/or a token field, a user feature joins the head input. So the layout decides, per
feature, which tables each role reads: DARE decouples attention and representation for every feature.
A numeric feature (price, dwell time) is the same with its normalised value x in place of a code: its
embedding is x times row 0 of its table (one vector per set), and the target of a context one, at x = 0,
reads row 1 as its query instead, so its score part is x <T_q[1], T_k[0]> / sqrt(d_A): a learned scalar times x.

Notation: B batch, L history length, d_A / d_R per-field attention / representation dims,
E = fields * d_R.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from darec.errors import ConfigError
from darec.models.batched import weighted_sum
from darec.models.config import BASE_FIELDS, ROLES, TABLE_LAYOUTS, FeatureField, ModelConfig
from darec.models.table import Table

__all__ = ["RoleEmbeddings", "TableSet", "RoleLookup"]

_ATTENTION_ROLES = ("query", "key")

Codes = Mapping[str, torch.Tensor]  # side-feature codes (int64) or numeric values (float) by feature name
_VALUE_ROW, _TARGET_ROW = 0, 1      # rows of a numeric feature's table: its vector; a context one's target query


@dataclass(frozen=True)
class RoleLookup:
    """One recorded lookup, so analyses can split a table's gradient by the role that caused it."""

    role: str
    field: str
    table_set: str
    ids: torch.Tensor
    output: torch.Tensor


class TableSet(nn.Module):
    """Item, category and (optionally) relative-position tables of one width, then one table per side
    feature its roles read (`features`: name -> rows; empty for the paper's model, which then has
    exactly the parameters, and draws its initial weights in exactly the order, it always had)."""

    def __init__(self, *, n_items: int, n_categories: int, n_positions: int, dim: int,
                 use_position: bool, features: Mapping[str, int] | None = None) -> None:
        super().__init__()
        self.item = Table(n_items, dim)
        self.category = Table(n_categories, dim)
        self.position = Table(n_positions, dim) if use_position else None
        self.features = nn.ModuleDict({name: Table(rows, dim) for name, rows in (features or {}).items()})

    def table(self, field: str) -> Table:
        return getattr(self, field) if field in BASE_FIELDS else self.features[field]


def _rows(feature: FeatureField, role: str) -> int:
    """Rows of `feature`'s table that `role` reads: its vocabulary; for the query of a numeric context
    feature in the score also the target's own row (the target has no value to scale the vector by)."""
    return feature.vocabulary + int(feature.numeric and feature.in_score and role == "query")


def _role_fields(config: ModelConfig, role: str) -> tuple[str, ...]:
    """The side features `role` reads: item features everywhere; score context in the attention roles;
    token context in the representation roles; user features in the target role."""
    wanted = [f.name for f in config.features if f.kind == "item"
              or (f.kind == "context" and (f.in_score if role in _ATTENTION_ROLES else f.in_token))
              or (f.kind == "user" and role == "target")]
    return tuple(wanted)


class RoleEmbeddings(nn.Module):
    """Looks up role tokens from the table sets named by the layout, with optional projections."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.layout = TABLE_LAYOUTS[config.tables]
        self.use_position = config.use_position
        self.max_position = config.max_len
        self.attn_dim, self.repr_dim = config.attn_dim, config.dim
        self.item_features, self.score_context = config.item_features, config.score_context
        self.token_context, self.user_features = config.token_context, config.user_features
        self.numeric = frozenset(config.numeric_features)
        by_name = {f.name: f for f in config.features}
        role_fields = {role: _role_fields(config, role) for role in ROLES}
        set_dims: dict[str, int] = {}
        set_rows: dict[str, dict[str, int]] = {}  # set -> feature -> rows (the most any role reading it needs)
        for role in ROLES:
            dim = self.attn_dim if role in _ATTENTION_ROLES else self.repr_dim
            set_dims.setdefault(self.layout[role], dim)
            rows = set_rows.setdefault(self.layout[role], {})
            for n in role_fields[role]:
                rows[n] = max(rows.get(n, 0), _rows(by_name[n], role))
        self.sets = nn.ModuleDict({
            name: TableSet(n_items=config.n_items, n_categories=config.n_categories,
                           n_positions=config.max_len + 1, dim=dim, use_position=config.use_position,
                           features={n: set_rows[name][n] for n in by_name if n in set_rows[name]})
            for name, dim in set_dims.items()})
        fields = ("item", "category", "position") if config.use_position else ("item", "category")
        self.projections = nn.ModuleDict({
            role: nn.ModuleDict({f: nn.Linear(set_dims[self.layout[role]], set_dims[self.layout[role]],
                                              bias=False) for f in (*fields, *role_fields[role])})
            for role in ROLES}) if config.projection else None
        self.recorder: list[RoleLookup] | None = None  # set to [] to record lookups (analysis only)

    def _lookup(self, role: str, field: str, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the table `role` reads for `field` (projected, when the model has projections)."""
        name = self.layout[role]
        out = self.sets[name].table(field)(ids)
        if self.recorder is not None:
            self.recorder.append(RoleLookup(role, field, name, ids, out))
        if self.projections is not None:
            out = self.projections[role][field](out)
        return out

    def _field(self, role: str, field: str, ids: torch.Tensor) -> torch.Tensor:
        """`field`'s embedding for codes `ids`, or for a numeric field the values `ids` times its vector."""
        if field not in self.numeric:
            return self._lookup(role, field, ids)
        vector = self._lookup(role, field, torch.full(ids.shape, _VALUE_ROW, dtype=torch.long, device=ids.device))
        return vector * ids.unsqueeze(-1).to(vector.dtype)

    @staticmethod
    def _codes(features: Codes | None, name: str) -> torch.Tensor:
        if features is None or name not in features:
            raise ConfigError(f"this model reads side feature {name!r}, which its input does not carry "
                              f"(carried: {sorted(features or {}) or 'none'})")
        return features[name]

    def semantic_fields(self, role: str, items: torch.Tensor, categories: torch.Tensor,
                        features: Codes | None = None) -> list[torch.Tensor]:
        """The parts of `semantic`, each (..., d): item, category, item features."""
        parts = [self._field(role, "item", items), self._field(role, "category", categories)]
        return parts + [self._field(role, n, self._codes(features, n)) for n in self.item_features]

    def _token_fields(self, role: str, items: torch.Tensor, categories: torch.Tensor, positions: torch.Tensor,
                      features: Codes | None) -> list[torch.Tensor]:
        parts = self.semantic_fields(role, items, categories, features)
        if self.use_position:
            parts.append(self._positions(role, positions))
        return parts + [self._field(role, n, self._codes(features, n)) for n in self.token_context]

    def _positions(self, role: str, positions: torch.Tensor) -> torch.Tensor:
        """The position field (..., d). Positions shared by every row, as the loader hands them (one (L,) row
        expanded, stride 0), are looked up once: an expanded (B, L, d) view of L rows, which `weighted_sum`
        reduces with one matrix product and whose gradient is L rows, not B L."""
        if positions.dim() == 2 and positions.stride(0) == 0:
            return self._field(role, "position", positions[0].clamp(max=self.max_position)).expand(
                positions.shape[0], -1, -1)
        return self._field(role, "position", positions.clamp(max=self.max_position))

    def semantic(self, role: str, items: torch.Tensor, categories: torch.Tensor,
                 features: Codes | None = None) -> torch.Tensor:
        """[item; category; item features] of a role: (..., (2 + n) d). `features`: codes by name."""
        return torch.cat(self.semantic_fields(role, items, categories, features), -1)

    def token(self, role: str, items: torch.Tensor, categories: torch.Tensor,
              positions: torch.Tensor, features: Codes | None = None) -> torch.Tensor:
        """[item; category; item features; position; context] of a role: (..., fields * d). Positions past the
        table clamp to its end."""
        return torch.cat(self._token_fields(role, items, categories, positions, features), -1)

    def _bias(self, field: str) -> torch.Tensor:
        """<T_q(0), T_k(c)> / sqrt(d_A) for every code c of `field`: (rows,). A numeric field: the score per
        unit of value, <T_q[1], T_k[0]> / sqrt(d_A): (1,)."""
        key_table = self.sets[self.layout["key"]].table(field).weight
        if field in self.numeric:
            key_rows = torch.arange(_VALUE_ROW, _VALUE_ROW + 1, device=key_table.device)  # arange, not tensor([..]):
            query_row = torch.arange(_TARGET_ROW, _TARGET_ROW + 1, device=key_table.device)  # no program constants
        else:
            key_rows = torch.arange(key_table.shape[0], device=key_table.device)
            query_row = key_rows[:1]
        keys = self._lookup("key", field, key_rows)                             # (P, d_A)
        query = self._lookup("query", field, query_row)                         # (1, d_A)
        return (keys @ query.squeeze(0)) / math.sqrt(keys.shape[-1])            # (P,)

    def position_bias(self) -> torch.Tensor | None:
        """Score contribution of each relative position, <T_q(0), T_k(p)> / sqrt(d_A): (max_len + 1,).

        The query always sits at position 0, so the position half of the attention score is one
        learned scalar per position; computing it from the table once per batch keeps the search
        cost at 2 d_A per behaviour instead of 3 d_A.
        """
        return self._bias("position") if self.use_position else None

    def context_bias(self, name: str) -> torch.Tensor | None:
        """Score contribution of each code of context feature `name` (e.g. "time_gap"), (vocabulary,): the
        target sits at code 0, so like the position this half of the score is one learned scalar per code.
        A numeric one: (1,), the contribution per unit of its value. None when `name` is not a context
        feature entering the score."""
        return self._bias(name) if name in self.score_context else None

    def score_bias(self, positions: torch.Tensor | None, features: Codes | None = None) -> torch.Tensor | None:
        """The additive score bias of behaviours (...): the position bias at `positions` (None: left out, as
        DIN's MLP score does) plus every score context feature's bias at its codes; None when there is none."""
        total = None
        if positions is not None and self.use_position:
            bias = self.position_bias()
            total = bias[positions.clamp(max=bias.shape[0] - 1)]
        for name in self.score_context:
            scores, codes = self.context_bias(name), self._codes(features, name)  # per code, or per unit of value
            part = scores * codes.to(scores.dtype) if name in self.numeric else scores[codes]
            total = part if total is None else total + part
        return total

    def target(self, items: torch.Tensor, categories: torch.Tensor, features: Codes | None = None) -> torch.Tensor:
        """v_t: the target's representation token, position 0, context code 0 (numeric context value 0): (B, E)."""
        zeros = torch.zeros_like(items)
        codes = {**(features or {}), **{n: zeros for n in self.token_context}}
        return self.token("target", items, categories, zeros, codes)

    def values(self, items: torch.Tensor, categories: torch.Tensor, positions: torch.Tensor,
               features: Codes | None = None) -> torch.Tensor:
        """Representation tokens of history behaviours: (..., E)."""
        return self.token("value", items, categories, positions, features)

    def weighted_values(self, weights: torch.Tensor, items: torch.Tensor, categories: torch.Tensor,
                        positions: torch.Tensor, features: Codes | None = None) -> torch.Tensor:
        """sum_k weights[..., k] * values(...)[..., k, :], field by field: (..., E).

        Equal to the einsum over `values`, but the (..., K, E) token tensor is never built: each field's
        (..., K, d) lookup is reduced on its own and only the (..., d) sums are joined. In serving, where
        every candidate keeps its own K, that tensor is the largest one and its concatenation the
        costliest step."""
        fields = self._token_fields("value", items, categories, positions, features)
        return torch.cat([weighted_sum(weights, field) for field in fields], -1)

    def user(self, features: Codes | None = None) -> torch.Tensor | None:
        """[user features] from the target role's tables: (B, n_user d_R), None without user features."""
        if not self.user_features:
            return None
        return torch.cat([self._field("target", n, self._codes(features, n)) for n in self.user_features], -1)
