"""Model configuration: every Table 1 row is one of these with a few fields changed (see presets.py)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import TypeAdapter, ValidationError

from darec.errors import ConfigError, reject_unknown_keys

__all__ = ["ModelConfig", "TABLE_LAYOUTS", "ROLES"]

ROLES = ("query", "key", "target", "value")

# Which table set each role reads. Query/key are the attention roles, target/value the representation
# roles; a set read by both kinds of role is where attention and representation gradients meet.
TABLE_LAYOUTS: dict[str, dict[str, str]] = {
    "shared": {"query": "shared", "key": "shared", "target": "shared", "value": "shared"},  # TWIN
    "decoupled": {"query": "attention", "key": "attention",
                  "target": "representation", "value": "representation"},  # DARE
    "four": {"query": "query", "key": "key", "target": "target", "value": "value"},  # TWIN-4E
}


@dataclass(frozen=True)
class ModelConfig:
    """Shape and variant of the two-stage model.

    Dimensions are per field: a token is [item; category; position], so E = 3 * dim
    (2 * dim without positions). `attention_dim` (K_A) may differ from `dim` (K_R) only when
    the attention roles have tables of their own. `n_embedding_sets` M > 1 is multi-embedding (Guo et
    al., 2023, against embedding collapse): M independent table sets, each with its own search, and the
    head input is the M head inputs side by side (width M * 3E).
    """

    n_items: int
    n_categories: int
    max_len: int = 200
    dim: int = 16
    attention_dim: int | None = None
    tables: Literal["shared", "decoupled", "four"] = "decoupled"
    projection: bool = False          # per-role, per-field bias-free d x d maps (TWIN w/ proj.)
    use_position: bool = True         # relative-position embeddings in every token (DIN: off)
    score: Literal["dot", "mlp"] = "dot"
    search: str = "topk"              # a key of darec.models.search.SEARCHES
    top_k: int = 20
    target_aware: bool = True         # head input [v_t, r, v_t * r] (TR) instead of [v_t, r]
    aux_head: bool = True             # second CTR head on full-sequence softmax attention
    hidden: tuple[int, ...] = (200, 80)
    aux_hidden: tuple[int, ...] = (200,)
    init_std: float = 0.01
    legacy_init: bool = False         # the reference's N(0, 0.01^2) BatchNorm gamma and PReLU slopes
    search_options: dict[str, Any] = field(default_factory=dict)  # options of non-default searches
    n_embedding_sets: int = 1         # multi-embedding: independent tables + search per set, heads see all

    def __post_init__(self) -> None:
        if self.tables not in TABLE_LAYOUTS:
            raise ConfigError(f"tables must be one of {sorted(TABLE_LAYOUTS)}, got {self.tables!r}")
        for name in ("n_items", "n_categories", "max_len", "dim", "top_k", "n_embedding_sets"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.attention_dim is not None and self.attention_dim < 1:
            raise ConfigError(f"attention_dim must be >= 1, got {self.attention_dim}")
        if self.score not in ("dot", "mlp"):
            raise ConfigError(f"score must be 'dot' or 'mlp', got {self.score!r}")
        if self.attention_dim not in (None, self.dim) and self.tables == "shared":
            raise ConfigError(
                f"attention_dim={self.attention_dim} differs from dim={self.dim}, but tables='shared' "
                "has one table for attention and representation; use tables='decoupled' or 'four'")

    @property
    def attn_dim(self) -> int:
        return self.dim if self.attention_dim is None else self.attention_dim

    @property
    def fields(self) -> int:
        return 3 if self.use_position else 2

    @property
    def token_dim(self) -> int:
        """E: width of a representation token [item; category (; position)]."""
        return self.fields * self.dim

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """Type-checked construction: `dim: big` is one ConfigError line, not a TypeError deep inside."""
        if not isinstance(data, dict):
            raise ConfigError(f"model options must be a mapping, got {type(data).__name__} {data!r}")
        reject_unknown_keys(data, {f.name for f in dataclasses.fields(cls)}, section="model")
        try:
            return TypeAdapter(cls).validate_python(data)
        except ValidationError as err:
            parts = [f"model.{'.'.join(str(p) for p in e['loc'])}: {e['msg']} (got {e['input']!r})"
                     for e in err.errors()]
            raise ConfigError("; ".join(parts)) from None
