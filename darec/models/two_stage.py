"""The two-stage long-sequence CTR model: embeddings -> search + attention -> head.

Every variant in Table 1 is this one class with different parts (see presets.py):
TWIN/DARE/TWIN-4E differ in `RoleEmbeddings` layout, hard search/DIN/ETA/SDIM in the search.
With `n_embedding_sets` M > 1 (multi-embedding) the first (embeddings, search) pair is joined by M - 1
more in `extra_sets`, and the heads read the M head inputs side by side.
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

__all__ = ["TwoStageModel", "ModelOutput", "EmbeddingSet", "build_model", "init_weights"]


@dataclass(frozen=True)
class ModelOutput:
    """logit: (B,) main head; aux_logit: (B,) or None; features: (B, head_dim) head input (discriminability
    analysis); interest: what the (first set's) search kept and how it weighted it."""

    logit: torch.Tensor
    aux_logit: torch.Tensor | None
    features: torch.Tensor
    interest: Interest


class EmbeddingSet(nn.Module):
    """One more (embeddings, search) pair of a multi-embedding model."""

    def __init__(self, embeddings: RoleEmbeddings, search: nn.Module) -> None:
        super().__init__()
        self.embeddings, self.search = embeddings, search


class TwoStageModel(nn.Module):
    def __init__(self, *, config: ModelConfig, embeddings: RoleEmbeddings, search: nn.Module,
                 head: MLPHead, aux_head: MLPHead | None, extra_sets: list[EmbeddingSet] = ()) -> None:
        super().__init__()
        self.config = config
        self.embeddings, self.search, self.head, self.aux_head = embeddings, search, head, aux_head
        self.extra_sets = nn.ModuleList(extra_sets)  # empty (no parameters, no state keys) unless M > 1

    @property
    def embedding_sets(self) -> list[tuple[RoleEmbeddings, nn.Module]]:
        """Every (embeddings, search) pair, the first one first."""
        return [(self.embeddings, self.search), *((s.embeddings, s.search) for s in self.extra_sets)]

    @property
    def uses_candidate_sets(self) -> bool:
        """True when a row's output depends on the other rows of its candidate set (IFA): such a model must
        be fed whole sets (`BatchLoader(group_sets=True)`)."""
        return bool(getattr(self.search, "uses_candidate_sets", False))

    def forward(self, batch: Batch) -> ModelOutput:
        full = self.aux_head is not None and self.training
        features, aux_features, interests = [], [], []
        for embeddings, search in self.embedding_sets:
            target = embeddings.target(batch.target_item, batch.target_category, batch.target_features)  # (B, E)
            user = embeddings.user(batch.user_features)                                   # (B, n_u d_R) or None
            interest = search(embeddings, batch, full=full)
            features.append(head_features(target, interest.r, target_aware=self.config.target_aware, user=user))
            if interest.r_full is not None:
                aux_features.append(head_features(target, interest.r_full, target_aware=self.config.target_aware,
                                                  user=user))
            interests.append(interest)
        head_input = torch.cat(features, dim=-1)                                           # (B, head_dim)
        aux_logit = self.aux_head(torch.cat(aux_features, dim=-1)) if aux_features else None
        return ModelOutput(logit=self.head(head_input), aux_logit=aux_logit, features=head_input,
                           interest=interests[0])


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
    width = config.head_dim
    model = TwoStageModel(
        config=config, embeddings=embeddings, search=build_search(config),
        head=MLPHead(width, config.hidden),
        aux_head=MLPHead(width, config.aux_hidden) if config.aux_head else None,
        extra_sets=[EmbeddingSet(RoleEmbeddings(config), build_search(config))
                    for _ in range(config.n_embedding_sets - 1)])
    init_weights(model, std=config.init_std, legacy=config.legacy_init)
    return model
