"""Named presets: each Table 1 row is a handful of `ModelConfig` fields, nothing more.

A preset is a dict of overrides registered with a one-line description; `preset_config` applies
it on top of the dataset's vocabulary sizes and any user overrides.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from darec.errors import ConfigError
from darec.models.config import ModelConfig

__all__ = ["Preset", "PRESETS", "register_preset", "preset_config", "TABLE1_PRESETS"]


@dataclass(frozen=True)
class Preset:
    """`overrides`: ModelConfig fields; `train`: TrainConfig fields the preset needs when the run leaves
    them null (IFA's set-wise loss)."""

    name: str
    description: str
    overrides: dict[str, Any]
    train: dict[str, Any] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {}


def register_preset(name: str, description: str, *, train: dict[str, Any] | None = None, **overrides: Any) -> Preset:
    if name in PRESETS:
        raise ConfigError(f"preset {name!r} registered twice")
    PRESETS[name] = Preset(name, description, overrides, dict(train or {}))
    return PRESETS[name]


register_preset("dare", "DARE: attention and representation tables decoupled, TR, aux head",
                tables="decoupled")
register_preset("dare_no_tr", "DARE without the target-aware representation: head input [v_t, r]",
                tables="decoupled", target_aware=False)
register_preset("twin", "TWIN: one table set for attention and representation, TR, aux head",
                tables="shared")
register_preset("twin_hard", "TWIN (hard search): the K most recent same-category behaviours",
                tables="shared", search="hard")
register_preset("twin_proj", "TWIN (w/ projection): shared tables + per-role per-field linear maps",
                tables="shared", projection=True)
register_preset("twin_no_tr", "TWIN (w/o TR): head input [v_t, r]",
                tables="shared", target_aware=False)
register_preset("twin_4e", "TWIN-4E: separate tables for query, key, target and value",
                tables="four")
register_preset("din", "DIN as the reference runs it: MLP attention, no positions, top-K search",
                tables="shared", score="mlp", use_position=False)
register_preset("din_full", "DIN as published: MLP attention over the whole sequence",
                tables="shared", score="mlp", use_position=False, search="full")
register_preset("eta", "ETA: SimHash (32 bits) top-K by Hamming distance, target attention over the K, TR",
                tables="shared", search="eta")
register_preset("sdim", "SDIM: 48 SimHash buckets of 3 bits, L2-normalised sums of colliding behaviours, TR",
                tables="shared", search="sdim", aux_head=False)
register_preset("twin_v2", "TWIN-V2: history clustered into virtual items (cap 8), size-aware attention",
                tables="shared", search="twin_v2")
register_preset("sim_hard", "SIM (hard): same-category GSU, ESU target attention on the representation",
                tables="shared", search="sim_hard", aux_head=False)
register_preset("sim_soft", "SIM (soft): inner-product GSU on its own tables (aux-trained), separate ESU",
                tables="decoupled", search="sim_soft")
register_preset("ifa", "IFA: linear attention of every candidate over the whole history, linear attention "
                "among the candidates, BCE + listwise loss", tables="shared", search="ifa", aux_head=False,
                train={"ranking_loss": "listwise"})
register_preset("ifa_dare", "IFA on DARE's decoupled attention / representation tables",
                tables="decoupled", search="ifa", aux_head=False, train={"ranking_loss": "listwise"})
register_preset("ifa_no_set", "IFA without the candidate attention: every row scored alone, as DARE/TWIN",
                tables="shared", search="ifa", aux_head=False, search_options={"set_attention": False},
                train={"ranking_loss": "listwise"})

# The rows of the paper's Table 1, in the paper's order (`--presets table1`).
TABLE1_PRESETS = ("eta", "sdim", "din", "twin", "twin_hard", "twin_proj", "twin_no_tr", "twin_v2",
                  "twin_4e", "dare")


def preset_config(name: str, *, n_items: int, n_categories: int, **overrides: Any) -> ModelConfig:
    """The preset's config for a dataset; `overrides` (e.g. dim, attention_dim, top_k) win."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    fields = {**PRESETS[name].overrides, **{k: v for k, v in overrides.items() if v is not None}}
    return ModelConfig.from_dict({"n_items": n_items, "n_categories": n_categories, **fields})
