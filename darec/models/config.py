"""Model configuration: every Table 1 row is one of these with a few fields changed (see presets.py)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import TypeAdapter, ValidationError

from darec.errors import ConfigError, reject_unknown_keys

__all__ = ["ModelConfig", "FeatureField", "TABLE_LAYOUTS", "ROLES", "BASE_FIELDS"]

ROLES = ("query", "key", "target", "value")

# Which table set each role reads. Query/key are the attention roles, target/value the representation
# roles; a set read by both kinds of role is where attention and representation gradients meet.
TABLE_LAYOUTS: dict[str, dict[str, str]] = {
    "shared": {"query": "shared", "key": "shared", "target": "shared", "value": "shared"},  # TWIN
    "decoupled": {"query": "attention", "key": "attention",
                  "target": "representation", "value": "representation"},  # DARE
    "four": {"query": "query", "key": "key", "target": "target", "value": "value"},  # TWIN-4E
}


BASE_FIELDS = ("item", "category", "position")  # the fields every model has (names a side feature cannot take)


@dataclass(frozen=True)
class FeatureField:
    """One side feature the model reads (docs/features.md, "The model").

    kind:
      item: a property of the item with a value for the target too (brand, seller). A table in every table
        set; its embedding joins [item; category] in the search score and in every token.
      context: a property of the behaviour only (behaviour type, time-gap bucket, hour, weekday). The target
        sits at code 0, as it sits at position 0, so in the score the feature is one learned scalar per code
        (`RoleEmbeddings.context_bias`); `enter` says whether it is that score bias, a field of every
        representation token, or both.
      user: a property of the user; its embedding (representation tables) joins the head input.
    vocabulary: rows of its table, code 0 included (1 for a numeric feature: its one vector).
    numeric: the input is a normalised number x, not a code; its embedding is x times the vector of its
      table (the numeric embedding of CTR libraries), in whichever role tables `kind` says. An item one
      (price) joins [item; category] like a categorical item feature; a context one (dwell time) has its
      target at x = 0, so its score part is one learned scalar times x (`RoleEmbeddings.context_bias`).
    """

    name: str
    vocabulary: int
    kind: Literal["item", "context", "user"] = "item"
    enter: Literal["score", "representation", "both"] = "both"
    numeric: bool = False

    @property
    def in_score(self) -> bool:
        return self.kind == "context" and self.enter in ("score", "both")

    @property
    def in_token(self) -> bool:
        """A field of every token (item features always; context features unless score-only)."""
        return self.kind == "item" or (self.kind == "context" and self.enter in ("representation", "both"))


@dataclass(frozen=True)
class ModelConfig:
    """Shape and variant of the two-stage model.

    Dimensions are per field: a token is [item; category; item features; position; context features in
    the representation], so E = 3 * dim without side features (2 * dim without positions). `features`
    lists the side features (default none: the paper's model, bit for bit). `attention_dim` (K_A) may
    differ from `dim` (K_R) only when the attention roles have tables of their own. `n_embedding_sets`
    M > 1 is multi-embedding (Guo et al., 2023, against embedding collapse): M independent table sets,
    each with its own search, and the head input is the M head inputs side by side (`head_dim`).
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
    features: tuple[FeatureField, ...] = ()  # side features (issue 14), built from a dataset by `feature_fields`

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
        names = [f.name for f in self.features]
        clash = sorted({n for n in names if names.count(n) > 1 or n in BASE_FIELDS})
        if clash:
            raise ConfigError(f"feature name {clash[0]!r} is used twice or names a base field {BASE_FIELDS}")
        for f in self.features:
            if f.vocabulary < 1:
                raise ConfigError(f"feature {f.name!r}: vocabulary must be >= 1, got {f.vocabulary}")
            if f.numeric and (f.kind == "user" or f.vocabulary != 1):
                raise ConfigError(f"numeric feature {f.name!r} must be an item or context feature with vocabulary "
                                  f"1 (its one vector), got kind {f.kind!r}, vocabulary {f.vocabulary}")

    @property
    def attn_dim(self) -> int:
        return self.dim if self.attention_dim is None else self.attention_dim

    @property
    def item_features(self) -> tuple[str, ...]:
        """Features in the semantic part [item; category; ...]: the dot score covers them."""
        return tuple(f.name for f in self.features if f.kind == "item")

    @property
    def score_context(self) -> tuple[str, ...]:
        """Context features that add a learned bias per code to the search score."""
        return tuple(f.name for f in self.features if f.in_score)

    @property
    def token_context(self) -> tuple[str, ...]:
        """Context features that are fields of every representation token (after position)."""
        return tuple(f.name for f in self.features if f.kind == "context" and f.in_token)

    @property
    def user_features(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features if f.kind == "user")

    @property
    def numeric_features(self) -> tuple[str, ...]:
        """Features read as numbers (value times a vector), not as codes."""
        return tuple(f.name for f in self.features if f.numeric)

    @property
    def semantic_dim(self) -> int:
        """D: width of a query / key, [item; category; item features] in the attention dim."""
        return (2 + len(self.item_features)) * self.attn_dim

    @property
    def fields(self) -> int:
        return 2 + len(self.item_features) + int(self.use_position) + len(self.token_context)

    @property
    def token_dim(self) -> int:
        """E: width of a representation token [item; category; item features (; position); context]."""
        return self.fields * self.dim

    @property
    def head_dim(self) -> int:
        """Head input width: per embedding set [v_t, r (, v_t * r)] and the user features' embeddings."""
        per_set = (3 if self.target_aware else 2) * self.token_dim + len(self.user_features) * self.dim
        return self.n_embedding_sets * per_set

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
