"""Training in several processes (one per device) started by torchrun: what changes, and why.

* `setup` joins the process group torchrun describes (gloo carries CPU tensors, NCCL CUDA ones). Without
  torchrun (`WORLD_SIZE` unset or 1) every function here is the identity of the one-process run.
* Each rank reads its own share of every global batch (`BatchLoader(shard=...)`), so N processes at batch
  size B take the steps one process takes at B: DDP averages the ranks' gradients of their mean losses.
  The embedding tables keep row-sparse gradients (`nn.Embedding(sparse=True)`), which DDP all-reduces on
  gloo; NCCL has no sparse all-reduce, so on CUDA the tables go through torchrec (or dense Adam).
* BatchNorm normalises by the statistics of the whole global batch (sums all-reduced over the ranks, and
  differentiated through, as `nn.SyncBatchNorm`, which runs only on GPUs; `_SyncBatchNorm1d` is its CPU
  counterpart), so the running statistics too are the one-process ones, on every rank.
* Metrics: each rank predicts its share of a split; `gather_predictions` collects every rank's rows and
  puts them back in split order, so AUC, GAUC and the saved test logits are over all rows.
* Checkpoints: a torch.distributed.checkpoint folder, `checkpoint.dcp`, written once (replicated tensors
  by one rank, sharded tables by their owners); it resumes at any world size, one process included.
"""
from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from darec.checkpoint import (holds_sharded_tensors, is_distributed_checkpoint, load_checkpoint,
                              load_distributed_checkpoint, save_checkpoint, save_distributed_checkpoint)
from darec.data.loader import BatchLoader
from darec.errors import ConfigError, DarecError
from darec.models.torchrec_tables import fused_parameter_ids
from darec.train.config import TrainConfig

__all__ = ["Cluster", "setup", "current", "launched", "wrap", "shard_tables", "synchronise_batchnorm",
           "gather_predictions", "resumable", "save_run_checkpoint", "load_run_checkpoint", "relaunch", "CHECKPOINT",
           "DCP_CHECKPOINT"]

CHECKPOINT = "checkpoint.pt"        # what a one-process run writes (darec's weights-only file)
DCP_CHECKPOINT = "checkpoint.dcp"   # what a multi-process run writes (a DCP folder)
# Environment entries that legitimately change with the world size (torchrun gives each worker 1 thread).
_PER_LAUNCH = ("world_size", "threads")


@dataclass(frozen=True)
class Cluster:
    """This process's place among the training processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run's files and shows progress."""
        return self.rank == 0

    @property
    def shard(self) -> tuple[int, int]:
        """(rank, world_size), as `BatchLoader(shard=...)` takes it."""
        return self.rank, self.world_size

    def device(self, device: torch.device) -> torch.device:
        """One CUDA device per local rank; CPU ranks share the CPU."""
        if self.world_size > 1 and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def rows(self, n: int) -> int:
        """Sum of `n` over the ranks (a global batch's size from each rank's share)."""
        if self.world_size == 1:
            return n
        total = torch.tensor([n], dtype=torch.int64)
        dist.all_reduce(total)
        return int(total)

    def mean(self, value: torch.Tensor | float) -> float:
        """Mean of a per-rank scalar over the ranks."""
        if self.world_size == 1:
            return float(value)
        total = torch.tensor([float(value)], dtype=torch.float64)
        dist.all_reduce(total)
        return float(total) / self.world_size

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def on_main(self, action: Callable[[], None]) -> None:
        """Run `action` on rank 0 only; a DarecError it raises is raised on every rank, so that a bad input
        ends every process with the same one line instead of leaving the others waiting."""
        if self.world_size == 1:
            action()
            return
        failure: list[DarecError | None] = [None]
        if self.is_main:
            try:
                action()
            except DarecError as err:
                failure[0] = err
        dist.broadcast_object_list(failure, src=0)
        if failure[0] is not None:
            raise failure[0]


def launched() -> bool:
    """True in a worker that torchrun started with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: torch.device) -> Cluster:
    """Join torchrun's process group once (idempotent) and return this process's place; a plain
    `Cluster()` when not launched by torchrun."""
    if not launched():
        return Cluster()
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    return current()


def current() -> Cluster:
    """This process's place (a plain `Cluster()` without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return Cluster()
    return Cluster(rank=dist.get_rank(), world_size=dist.get_world_size(),
                   local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def wrap(model: nn.Module, device: torch.device, cluster: Cluster) -> nn.Module:
    """The module the training step calls: DDP over `model` (BatchNorm synchronised) with several ranks,
    `model` itself with one. Parameters stay the same objects, so optimizers built before still apply."""
    if cluster.world_size == 1 or fused_parameter_ids(model):  # one process, or torchrec's DMP (DDP inside)
        return model
    sparse = any(isinstance(m, nn.Embedding) and m.sparse for m in model.modules())
    if sparse and device.type == "cuda":
        raise ConfigError("sparse_optimizer with several CUDA processes needs embedding_backend: torchrec "
                          "(NCCL cannot all-reduce sparse gradients); or set sparse_optimizer: false")
    synchronise_batchnorm(model, device)
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)


def shard_tables(model: nn.Module, config: TrainConfig, device: torch.device, cluster: Cluster) -> nn.Module:
    """`embedding_backend: torchrec`: the model with its tables sharded over the ranks by torchrec (one
    process gets a one-rank process group), BatchNorm synchronised when there are several ranks."""
    from darec.models.torchrec_tables import shard, torchrec_available

    if not torchrec_available():
        raise ConfigError("embedding_backend: torchrec needs torchrec and fbgemm, which are not importable here "
                          "(see README: installing torchrec)")
    if config.grad_clip is not None:
        raise ConfigError("grad_clip needs every gradient before any update, but torchrec's fused optimiser "
                          "updates the tables inside backward: use embedding_backend: plain to clip")
    if config.compile:
        raise ConfigError("compile is not supported with embedding_backend: torchrec")
    if not dist.is_initialized():
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo",
                                store=dist.HashStore(), rank=0, world_size=1)
    if cluster.world_size > 1:
        synchronise_batchnorm(model, device)
    return shard(model, device=device, optimizer=config.embedding_optimizer, lr=config.lr)


def synchronise_batchnorm(model: nn.Module, device: torch.device) -> None:
    """Replace every BatchNorm1d of `model` by one that normalises by the statistics of all ranks' rows."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.BatchNorm1d:
                synced = (nn.SyncBatchNorm if device.type == "cuda" else _SyncBatchNorm1d)(
                    child.num_features, eps=child.eps, momentum=child.momentum, affine=child.affine,
                    track_running_stats=child.track_running_stats)
                synced.weight, synced.bias = child.weight, child.bias  # the optimizers' parameters
                synced.running_mean, synced.running_var = child.running_mean, child.running_var
                synced.num_batches_tracked = child.num_batches_tracked
                setattr(parent, name, synced)


class _SyncBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d over (B, C) whose training statistics are those of every rank's rows together: per-channel
    sums all-reduced with a differentiable all-reduce, so each rank's backward carries the other ranks'
    terms too (after DDP's averaging, the one-process gradient). Evaluation is plain BatchNorm1d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        channels = x.shape[1]
        stats = all_reduce(torch.cat([x.sum(0), (x * x).sum(0), x.new_full((1,), x.shape[0])]))
        count = stats[-1]
        mean = stats[:channels] / count
        var = stats[channels:2 * channels] / count - mean * mean  # biased, as BatchNorm normalises
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean, factor)
                self.running_var.lerp_(var * count / (count - 1), factor)
        out = (x - mean) * torch.rsqrt(var + self.eps)
        return out * self.weight + self.bias if self.affine else out


def gather_predictions(predictions: dict[str, np.ndarray], loader: BatchLoader, cluster: Cluster
                       ) -> dict[str, np.ndarray]:
    """Every rank's predictions of `loader`'s split (one epoch-0 pass each), in split order, each row once."""
    if cluster.world_size == 1:
        return predictions
    rows = np.concatenate(list(loader.indices(0)))
    gathered = {name: _all_gather(values, cluster) for name, values in {**predictions, "_rows": rows}.items()}
    order = gathered.pop("_rows")
    _, first = np.unique(order, return_index=True)  # sorted by row; repeats of a too-small batch dropped
    return {name: values[first] for name, values in gathered.items()}


def _all_gather(values: np.ndarray, cluster: Cluster) -> np.ndarray:
    """Concatenation of every rank's 1-d array (lengths may differ), rank 0's first."""
    local = torch.from_numpy(np.ascontiguousarray(values))
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(cluster.world_size)]
    dist.all_gather(sizes, torch.tensor([len(local)], dtype=torch.int64))
    longest = max(int(s) for s in sizes)
    padded = torch.zeros(longest, dtype=local.dtype)
    padded[:len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(cluster.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:int(size)] for part, size in zip(parts, sizes)]).numpy()


def resumable(saved: dict[str, Any], current_env: dict[str, Any]) -> bool:
    """Whether a checkpoint's environment lets this run resume it. Same world size: the same environment
    (bit-identical continuation). Another world size cannot be bit-identical anyway, so only torch and the
    device type must match (torchrun also sets one thread per worker)."""
    if saved.get("world_size", 1) == current_env.get("world_size", 1):
        return saved == current_env
    strip = lambda env: {k: v for k, v in env.items() if k not in _PER_LAUNCH}  # noqa: E731
    return strip(saved) == strip(current_env)


def save_run_checkpoint(out_dir: Path, obj: dict[str, Any], cluster: Cluster) -> None:
    """`checkpoint.pt` from one process, `checkpoint.dcp` from several or with sharded tables; the other
    format, if an earlier launch left one, is removed once the new one is complete (darec wrote it)."""
    sharded = dist.is_initialized() and holds_sharded_tensors(obj)  # torchrec tables, even in one process
    if cluster.world_size == 1 and not sharded:
        save_checkpoint(out_dir / CHECKPOINT, obj)
        stale = out_dir / DCP_CHECKPOINT
    else:
        save_distributed_checkpoint(out_dir / DCP_CHECKPOINT, obj)
        stale = out_dir / CHECKPOINT
    if cluster.is_main and (stale.is_file() or is_distributed_checkpoint(stale)):
        _remove_darec_checkpoint(stale)


def _remove_darec_checkpoint(path: Path) -> None:
    if path.is_file():
        path.unlink()
        return
    for child in path.iterdir():  # a DCP folder holds only files DCP wrote
        child.unlink()
    path.rmdir()


def load_run_checkpoint(out_dir: Path, *, map_location: Any, keys: tuple[str, ...],
                        live: dict[str, Any] | None = None) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint of `out_dir` in either format, and its path (None when there is none).
    `live` gives the sharded tensors to fill in place (see `load_distributed_checkpoint`)."""
    candidates = [p for p in (out_dir / CHECKPOINT, out_dir / DCP_CHECKPOINT)
                  if p.is_file() or is_distributed_checkpoint(p)]
    if not candidates:
        return None
    newest = max(candidates, key=lambda p: p.stat().st_mtime_ns)
    if newest.name == CHECKPOINT:
        return newest, load_checkpoint(newest, map_location=map_location, keys=keys)
    return newest, load_distributed_checkpoint(newest, live=live, keys=keys)


def relaunch(nproc: int, argv: list[str] | None = None) -> int:
    """Run this command line again as `nproc` processes under torch.distributed.run (torchrun), without
    the `--nproc-per-node` flag; returns the workers' exit status (the first failing one's)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    args = _without_flag(list(sys.argv[1:] if argv is None else argv), "--nproc-per-node")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default for its workers, without its warning
    launcher_log = logging.getLogger("torch.distributed.elastic")
    level = launcher_log.level
    launcher_log.setLevel(logging.CRITICAL)  # a failing worker speaks for itself (rank 0's lines are shown)
    try:
        torchrun(["--standalone", "--nproc-per-node", str(nproc), "--local-ranks-filter", "0", "-m", "darec", *args])
    except ChildFailedError as err:
        failed = {failure.local_rank: failure.exitcode for failure in err.failures.values()}
        if 0 not in failed:  # rank 0's output is the one shown: say which others failed
            print(f"darec: training process(es) {sorted(failed)} failed (exit {sorted(set(failed.values()))})",
                  file=sys.stderr)
        return next((code for code in failed.values() if code not in (0, None)), 1)
    finally:
        launcher_log.setLevel(level)
    return 0


def _without_flag(argv: list[str], flag: str) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == flag:
            skip = True
        elif not arg.startswith(flag + "="):
            out.append(arg)
    return out
