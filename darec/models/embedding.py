"""Embedding tables and the four roles that read them.

Roles: query (target, attention), key (history, attention), target (v_t, representation),
value (history, representation). `ModelConfig.tables` decides which roles share a table set;
that single choice is the difference between TWIN (one set), DARE (two) and TWIN-4E (four).

Notation: B batch, L history length, d_A / d_R per-field attention / representation dims,
E = fields * d_R.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from darec.models.config import ROLES, TABLE_LAYOUTS, ModelConfig

__all__ = ["RoleEmbeddings", "TableSet", "RoleLookup"]

_ATTENTION_ROLES = ("query", "key")


@dataclass(frozen=True)
class RoleLookup:
    """One recorded lookup, so analyses can split a table's gradient by the role that caused it."""

    role: str
    field: str
    table_set: str
    ids: torch.Tensor
    output: torch.Tensor


class TableSet(nn.Module):
    """Item, category and (optionally) relative-position tables of one width."""

    def __init__(self, *, n_items: int, n_categories: int, n_positions: int, dim: int,
                 use_position: bool) -> None:
        super().__init__()
        self.item = nn.Embedding(n_items, dim)
        self.category = nn.Embedding(n_categories, dim)
        self.position = nn.Embedding(n_positions, dim) if use_position else None

    def table(self, field: str) -> nn.Embedding:
        return getattr(self, field)


class RoleEmbeddings(nn.Module):
    """Looks up role tokens from the table sets named by the layout, with optional projections."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.layout = TABLE_LAYOUTS[config.tables]
        self.use_position = config.use_position
        self.max_position = config.max_len
        self.attn_dim, self.repr_dim = config.attn_dim, config.dim
        set_dims: dict[str, int] = {}
        for role in ROLES:
            dim = self.attn_dim if role in _ATTENTION_ROLES else self.repr_dim
            set_dims.setdefault(self.layout[role], dim)
        self.sets = nn.ModuleDict({
            name: TableSet(n_items=config.n_items, n_categories=config.n_categories,
                           n_positions=config.max_len + 1, dim=dim, use_position=config.use_position)
            for name, dim in set_dims.items()})
        fields = ("item", "category", "position") if config.use_position else ("item", "category")
        self.projections = nn.ModuleDict({
            role: nn.ModuleDict({f: nn.Linear(set_dims[self.layout[role]], set_dims[self.layout[role]],
                                              bias=False) for f in fields})
            for role in ROLES}) if config.projection else None
        self.recorder: list[RoleLookup] | None = None  # set to [] to record lookups (analysis only)

    def _field(self, role: str, field: str, ids: torch.Tensor) -> torch.Tensor:
        name = self.layout[role]
        out = self.sets[name].table(field)(ids)
        if self.recorder is not None:
            self.recorder.append(RoleLookup(role, field, name, ids, out))
        if self.projections is not None:
            out = self.projections[role][field](out)
        return out

    def semantic(self, role: str, items: torch.Tensor, categories: torch.Tensor) -> torch.Tensor:
        """[item; category] of a role: (..., 2 d)."""
        return torch.cat([self._field(role, "item", items), self._field(role, "category", categories)], -1)

    def token(self, role: str, items: torch.Tensor, categories: torch.Tensor,
              positions: torch.Tensor) -> torch.Tensor:
        """[item; category; position] of a role: (..., fields * d). Positions past the table clamp to its end."""
        parts = [self.semantic(role, items, categories)]
        if self.use_position:
            parts.append(self._field(role, "position", positions.clamp(max=self.max_position)))
        return torch.cat(parts, -1)

    def position_bias(self) -> torch.Tensor | None:
        """Score contribution of each relative position, <T_q(0), T_k(p)> / sqrt(d_A): (max_len + 1,).

        The query always sits at position 0, so the position half of the attention score is one
        learned scalar per position; computing it from the table once per batch keeps the search
        cost at 2 d_A per behaviour instead of 3 d_A.
        """
        if not self.use_position:
            return None
        key_table = self.sets[self.layout["key"]].position.weight
        all_positions = torch.arange(key_table.shape[0], device=key_table.device)
        keys = self._field("key", "position", all_positions)                   # (P, d_A)
        query = self._field("query", "position", all_positions[:1])            # (1, d_A)
        return (keys @ query.squeeze(0)) / math.sqrt(keys.shape[-1])           # (P,)

    def target(self, items: torch.Tensor, categories: torch.Tensor) -> torch.Tensor:
        """v_t: the target's representation token, position 0: (B, E)."""
        return self.token("target", items, categories, torch.zeros_like(items))

    def values(self, items: torch.Tensor, categories: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Representation tokens of history behaviours: (..., E)."""
        return self.token("value", items, categories, positions)
