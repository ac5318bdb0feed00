"""The two-stage long-sequence CTR model: embeddings -> search + attention -> head.

Every variant in Table 1 is this one class with different parts (see presets.py):
TWIN/DARE/TWIN-4E differ in `RoleEmbeddings` layout, hard search/DIN/ETA/SDIM in the search.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from darec.data.batch import Batch
from darec.models.config import ModelConfig
from darec.models.embedding import RoleEmbeddings
from darec.models.head import MLPHead, head_features
from darec.models.search import Interest, build_search

__all__ = ["TwoStageModel", "ModelOutput", "build_model", "init_weights"]


@dataclass(frozen=True)
class ModelOutput:
    """logit: (B,) main head; aux_logit: (B,) or None; features: (B, 3E) head input (discriminability
    analysis); interest: what the search kept and how it weighted it."""

    logit: torch.Tensor
    aux_logit: torch.Tensor | None
    features: torch.Tensor
    interest: Interest


class TwoStageModel(nn.Module):
    def __init__(self, *, config: ModelConfig, embeddings: RoleEmbeddings, search: nn.Module,
                 head: MLPHead, aux_head: MLPHead | None) -> None:
        super().__init__()
        self.config = config
        self.embeddings, self.search, self.head, self.aux_head = embeddings, search, head, aux_head

    def forward(self, batch: Batch) -> ModelOutput:
        target = self.embeddings.target(batch.target_item, batch.target_category)      # (B, E)
        interest = self.search(self.embeddings, batch, full=self.aux_head is not None and self.training)
        features = head_features(target, interest.r, target_aware=self.config.target_aware)
        aux_logit = None
        if interest.r_full is not None:
            aux_logit = self.aux_head(head_features(target, interest.r_full,
                                                    target_aware=self.config.target_aware))
        return ModelOutput(logit=self.head(features), aux_logit=aux_logit, features=features,
                           interest=interest)


def init_weights(model: nn.Module, *, std: float, legacy: bool = False) -> None:
    """N(0, std^2) for embeddings and weight matrices, as the reference. BatchNorm gamma and PReLU
    slopes keep PyTorch's 1 and 0.25 unless `legacy`, which redraws them from N(0, std^2) too."""
    for module in model.modules():
        if isinstance(module, (nn.Embedding, nn.Linear)):
            nn.init.normal_(module.weight, 0.0, std)
        elif legacy and isinstance(module, (nn.BatchNorm1d, nn.PReLU)):
            nn.init.normal_(module.weight, 0.0, std)


def build_model(config: ModelConfig) -> TwoStageModel:
    embeddings = RoleEmbeddings(config)
    width = (3 if config.target_aware else 2) * config.token_dim
    model = TwoStageModel(
        config=config, embeddings=embeddings, search=build_search(config),
        head=MLPHead(width, config.hidden),
        aux_head=MLPHead(width, config.aux_hidden) if config.aux_head else None)
    init_weights(model, std=config.init_std, legacy=config.legacy_init)
    return model
