"""The model's embedding tables in torchrec: sharded over ranks by torchrec's planner, updated by fbgemm's
fused optimiser inside the backward pass (`embedding_backend: torchrec`; docs/scale.md).

Every table of every `TableSet` (item, category and position tables of each role's set: TWIN's one set,
DARE's two, TWIN-4E's four, and those of extra embedding sets) becomes one table of a torchrec
`EmbeddingCollection` (one collection per embedding width, torchrec's rule); the `nn.Embedding` it replaces
becomes a `RowLookup` without parameters. Per batch, `TorchrecModel` looks up each table once, for the batch's
unique ids (every position for position tables), and each role's lookup then indexes those rows. So a table
is read and updated once per step, whatever number of roles read it: its gradient is the same row sum an
`nn.Embedding` receives, and a fused optimiser steps each touched row exactly once.

The plain `nn.Embedding` model stays the reference (analyses need per-role gradients); both compute the same
output from the same weights (tests/models/test_torchrec_tables.py). `plain_state_dict` turns a torchrec
model's state (sharded or not) back into the plain model's keys, so `best.pt` loads anywhere darec loads a
model. torchrec is optional: importing this module does not import it.
"""
from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from darec.errors import ConfigError
from darec.models.embedding import TableSet
from darec.models.two_stage import TwoStageModel

__all__ = ["TorchrecModel", "RowLookup", "torchrec_available", "shard", "plain_state_dict",
           "load_plain_state_dict", "fused_parameter_ids", "FUSED_OPTIMIZERS"]

FUSED_OPTIMIZERS = ("adam", "rowwise_adagrad")  # fbgemm's: Adam on CUDA only, row-wise Adagrad everywhere
_SEP = "__"  # a table's name is its plain module path with "." -> "__" (torchrec names cannot hold dots)


def torchrec_available() -> bool:
    """Whether torchrec and fbgemm import here (both are optional: `pip install --no-deps ...`, README)."""
    try:
        import fbgemm_gpu  # noqa: F401
        import torchrec  # noqa: F401
    except (ImportError, OSError, RuntimeError):
        return False
    return True


class RowLookup(nn.Module):
    """Stands in for one `nn.Embedding` of the plain model: `ids` -> rows fetched for the current batch.

    `fill` hands it the batch's sorted unique ids and their rows (U, d); a lookup is then one
    `searchsorted` + gather. `weight` is the whole table where every id was fetched (position tables)."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self._ids: torch.Tensor | None = None
        self._rows: torch.Tensor | None = None

    def fill(self, ids: torch.Tensor | None, rows: torch.Tensor | None) -> None:
        self._ids, self._rows = ids, rows

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self._rows is None:
            raise RuntimeError("RowLookup used outside TorchrecModel.forward")
        return self._rows[torch.searchsorted(self._ids, ids)]

    @property
    def weight(self) -> torch.Tensor:
        if self._rows is None or len(self._rows) != self.num_embeddings:
            raise RuntimeError("only a table fetched whole (positions) has a weight here")
        return self._rows


class TorchrecModel(nn.Module):
    """A `TwoStageModel` whose tables live in torchrec `EmbeddingCollection`s (`collections`, by width)."""

    def __init__(self, model: TwoStageModel, *, device: torch.device | str = "cpu") -> None:
        super().__init__()
        from torchrec import EmbeddingCollection, EmbeddingConfig

        tables: dict[str, tuple[str, nn.Embedding]] = {}  # table name -> (field, the plain table)
        for path, module in list(model.named_modules()):
            if isinstance(module, TableSet):
                for field in ("item", "category", "position"):
                    table = getattr(module, field)
                    if isinstance(table, nn.Embedding):
                        tables[f"{path}.{field}".replace(".", _SEP)] = (field, table)
                        setattr(module, field, RowLookup(table.num_embeddings, table.embedding_dim))
        self.model = model
        self.fields = {name: field for name, (field, _) in tables.items()}
        by_dim: dict[int, list[Any]] = {}
        for name, (_, table) in tables.items():
            by_dim.setdefault(table.embedding_dim, []).append(EmbeddingConfig(
                name=name, embedding_dim=table.embedding_dim, num_embeddings=table.num_embeddings,
                feature_names=[name]))
        self.collections = nn.ModuleDict({f"dim{dim}": EmbeddingCollection(tables=configs, device=torch.device(device))
                                          for dim, configs in by_dim.items()})
        self.features = {f"dim{dim}": [config.name for config in configs] for dim, configs in by_dim.items()}
        self._lookups = {name: _lookup_at(model, name) for name in tables}
        home = next(model.parameters()).device
        self.register_buffer("positions", torch.arange(model.config.max_len + 1, device=home), persistent=False)
        if torch.device(device).type != "meta":
            weights = {_plain_key(name): table.weight.detach() for name, (_, table) in tables.items()}
            load_plain_state_dict(self, weights, strict=False)

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def uses_candidate_sets(self) -> bool:
        return self.model.uses_candidate_sets

    def forward(self, batch: Any) -> Any:
        from torchrec import KeyedJaggedTensor

        ids = {"item": torch.unique(torch.cat([batch.hist_items.reshape(-1), batch.target_item])),
               "category": torch.unique(torch.cat([batch.hist_categories.reshape(-1), batch.target_category])),
               "position": self.positions}
        try:
            for key, collection in self.collections.items():
                names = self.features[key]
                lengths = torch.tensor([len(ids[self.fields[n]]) for n in names], device=self.positions.device)
                rows = collection(KeyedJaggedTensor(keys=names, values=torch.cat([ids[self.fields[n]] for n in names]),
                                                    lengths=lengths))
                for name in names:
                    self._lookups[name].fill(ids[self.fields[name]], rows[name].values())
            return self.model(batch)
        finally:
            for lookup in self._lookups.values():
                lookup.fill(None, None)


def _lookup_at(model: nn.Module, name: str) -> RowLookup:
    return model.get_submodule(name.replace(_SEP, "."))


def _plain_key(name: str) -> str:
    """A table's key in the plain model's state dict."""
    return name.replace(_SEP, ".") + ".weight"


def _collection_key(key: str) -> tuple[str, str] | None:
    """(collection, table name) of a TorchrecModel state key holding a table, else None."""
    parts = key.split(".")
    if len(parts) == 5 and parts[0] == "collections" and parts[2] == "embeddings" and parts[4] == "weight":
        return parts[1], parts[3]
    return None


def shard(model: TwoStageModel, *, device: torch.device, optimizer: str, lr: float) -> nn.Module:
    """The model with its tables in torchrec, sharded over the current process group by torchrec's planner,
    each table updated in backward by fbgemm's fused `optimizer` (lr `lr`); dense layers data-parallel
    (DDP) when there are several ranks. Returns a `DistributedModelParallel` that also answers the plain
    model's attributes (`config`, `uses_candidate_sets`); weights start as `model`'s."""
    import torch.distributed as dist
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.embedding_types import EmbeddingComputeKernel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology

    if optimizer not in FUSED_OPTIMIZERS:
        raise ConfigError(f"embedding_optimizer must be one of {', '.join(FUSED_OPTIMIZERS)}, got {optimizer!r}")
    if optimizer == "adam" and device.type != "cuda":
        raise ConfigError("fbgemm's fused Adam runs on CUDA only; on CPU use embedding_optimizer: rowwise_adagrad")
    fused = {"optimizer": EmbOptimType.ADAM if optimizer == "adam" else EmbOptimType.EXACT_ROWWISE_ADAGRAD,
             "learning_rate": lr, "eps": 1e-8}
    if optimizer == "adam":
        fused.update(beta1=0.9, beta2=0.999)
    plain_weights = model.state_dict()  # kept: the tables' modules leave the model below
    wrapped = TorchrecModel(model.to(device), device="meta")
    sharder = EmbeddingCollectionSharder(fused_params=fused)
    constraints = {name: ParameterConstraints(compute_kernels=[EmbeddingComputeKernel.FUSED.value])
                   for name in wrapped.fields}
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=dist.get_world_size(), compute_device=device.type),
                                       constraints=constraints)
    plan = planner.collective_plan(wrapped, [sharder], dist.GroupMember.WORLD)
    sharded = _sharded_model_class()(wrapped, device=device, plan=plan, sharders=[sharder])
    load_plain_state_dict(sharded, plain_weights)
    return sharded


@functools.cache
def _sharded_model_class() -> type:
    """torchrec's DistributedModelParallel, answering the wrapped model's attributes too (defined on first
    use: torchrec is optional)."""
    from torchrec.distributed import DistributedModelParallel

    class ShardedModel(DistributedModelParallel):
        def __getattr__(self, name: str) -> Any:
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self.module, name)

    return ShardedModel


def fused_parameter_ids(model: nn.Module) -> set[int]:
    """Parameters updated inside backward by a fused optimiser (a sharded model's tables): no other optimiser,
    clipping or L2 term may touch them."""
    if getattr(model, "fused_optimizer", None) is None:  # not a sharded model (torchrec maybe not installed)
        return set()
    from torchrec.distributed.types import ShardedModule

    return {id(p) for m in model.modules() if isinstance(m, ShardedModule) for p in m.parameters()}


@torch.no_grad()
def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain model's state dict (what `best.pt` holds) of a plain, torchrec or sharded model; sharded
    tables are gathered (a collective: every rank calls it; only rank 0 gets their rows, others get None)."""
    state = model.state_dict()
    if not any(k.startswith("collections.") for k in state):
        return state
    plain: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        found = _collection_key(key)
        if found is None:
            plain[key.removeprefix("model.")] = value
        else:
            plain[_plain_key(found[1])] = _whole(value)
    return plain


def _whole(tensor: torch.Tensor) -> torch.Tensor | None:
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    if not isinstance(tensor, ShardedTensor):
        return tensor.detach().clone()
    import torch.distributed as dist

    out = torch.empty(tensor.size(), dtype=tensor.dtype) if dist.get_rank() == 0 else None
    tensor.gather(dst=0, out=out)
    return out


@torch.no_grad()
def load_plain_state_dict(model: nn.Module, plain: dict[str, torch.Tensor], *, strict: bool = True) -> None:
    """Load a plain model's state dict (`best.pt`) into a plain, torchrec or sharded model: each rank copies
    the rows of its own shards."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    state = model.state_dict()  # views of the parameters, buffers and local shards: copied into in place
    if not any(k.startswith("collections.") for k in state):
        model.load_state_dict(plain, strict=strict)
        return
    for key, target in state.items():
        found = _collection_key(key)
        source_key = _plain_key(found[1]) if found else key.removeprefix("model.")
        source = plain.get(source_key)
        if source is None:
            if strict:
                raise KeyError(f"the plain state dict has no {source_key}")
            continue
        if not isinstance(target, ShardedTensor):
            target.copy_(source)
            continue
        for piece in target.local_shards():
            (row, col), (rows, cols) = piece.metadata.shard_offsets, piece.metadata.shard_sizes
            piece.tensor.copy_(source[row:row + rows, col:col + cols])
