"""Row-sparse (lazy) Adam for embedding tables: moments and weights change only on the rows a batch read.

`torch.optim.SparseAdam`'s update. A table's gradient arrives as pieces (ids, gradient rows): from a
`RowGradients` collector (`darec.models.table`), or from the sparse `.grad` of `nn.Embedding(sparse=True)`
(several processes, gradient clipping). On CPU the pieces are summed and applied by numba kernels
(`row_kernels`); on other devices by torch operations (`unique` + `index_add_`), which are also the
reference the kernels are tested against.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from darec.errors import ConfigError
from darec.models.table import RowGradients

__all__ = ["RowSparseAdam"]

Pieces = list[tuple[torch.Tensor, torch.Tensor]]


class _Scratch:
    """Buffers of the CPU kernels for one table, kept between steps (allocating them anew each step
    page-faults tens of MB in again). `slot_of` is -1 everywhere between steps."""

    def __init__(self, table_rows: int, capacity: int, dim: int) -> None:
        self.slot_of = np.full(table_rows, -1, dtype=np.int64)  # table row -> slot
        self.rows = np.empty(capacity, dtype=np.int64)          # slot -> table row
        self.sums = np.empty((capacity, dim), dtype=np.float32)  # slot -> summed gradient


class RowSparseAdam(torch.optim.Optimizer):
    """Lazy Adam over embedding tables. `collectors` maps a table's weight to the collector its lookups
    write to (tables not in it must have sparse gradients)."""

    def __init__(self, params: list[torch.nn.Parameter], *, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, collectors: dict[torch.nn.Parameter, RowGradients] | None = None) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})
        self._collectors = dict(collectors or {})
        self._scratch: dict[torch.nn.Parameter, _Scratch] = {}  # CPU kernels' buffers per table
        self._pool: ThreadPoolExecutor | None = None               # one thread per share of a table's rows
        self._pool_size = 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Also drops rows collected by a backward pass that no step consumed."""
        super().zero_grad(set_to_none=set_to_none)
        for collector in self._collectors.values():
            collector.take()

    def _pieces(self, param: torch.nn.Parameter) -> Pieces:
        collector = self._collectors.get(param)
        pieces = collector.take() if collector is not None else []
        if param.grad is not None:
            if not param.grad.is_sparse:
                raise ConfigError("RowSparseAdam needs sparse gradients (nn.Embedding(sparse=True)) or collected rows")
            pieces.append((param.grad._indices()[0], param.grad._values()))
        return pieces

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                pieces = self._pieces(param)
                if not pieces:
                    continue
                state = self.state[param]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(param), exp_avg_sq=torch.zeros_like(param))
                state["step"] += 1
                step_size = group["lr"] * math.sqrt(1 - beta2 ** state["step"]) / (1 - beta1 ** state["step"])
                update = self._update_cpu if param.device.type == "cpu" else update_rows_torch
                update(param, state["exp_avg"], state["exp_avg_sq"], pieces, rate1=1 - beta1, rate2=1 - beta2,
                       eps=group["eps"], step_size=step_size)

    def _update_cpu(self, param: torch.nn.Parameter, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, pieces: Pieces,
                    *, rate1: float, rate2: float, eps: float, step_size: float) -> None:
        from darec.train.row_kernels import adam_rows, owned_counts, sum_rows  # numba compiles on first use (then cached)

        shares = torch.get_num_threads()
        owned = sum(owned_counts(ids.numpy(), param.shape[0], shares) for ids, _ in pieces)
        starts = np.cumsum(owned) - owned                                   # each share's block of slots
        capacity = int(owned.sum())
        scratch = self._scratch.get(param)
        if scratch is None or len(scratch.rows) < capacity:
            scratch = self._scratch[param] = _Scratch(param.shape[0], capacity, param.shape[1])
        arrays = [(ids.numpy(), grads.contiguous().numpy()) for ids, grads in pieces]
        weight, m, v, f32 = param.detach().numpy(), exp_avg.numpy(), exp_avg_sq.numpy(), np.float32

        def update_share(share: int) -> None:
            start = free = int(starts[share])
            for ids, grads in arrays:
                free = sum_rows(ids, grads, scratch.slot_of, scratch.rows, scratch.sums, free, share, shares)
            adam_rows(weight, m, v, scratch.rows[start:free], scratch.sums[start:free], f32(rate1), f32(rate2),
                      f32(eps), f32(step_size), scratch.slot_of)

        if shares == 1:
            update_share(0)
        else:
            if self._pool_size != shares:
                if self._pool is not None:
                    self._pool.shutdown()
                self._pool = ThreadPoolExecutor(max_workers=shares, thread_name_prefix="row-sparse-adam")
                self._pool_size = shares
            list(self._pool.map(update_share, range(shares)))  # the kernels release the GIL


def update_rows_torch(param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, pieces: Pieces, *,
                      rate1: float, rate2: float, eps: float, step_size: float) -> None:
    """The same update in torch operations (any device): sum by `unique` + `index_add_`, then Adam on those rows."""
    ids = torch.cat([i for i, _ in pieces])
    grads = torch.cat([g for _, g in pieces])
    rows, inverse = torch.unique(ids, return_inverse=True)                                # (R,), (n,)
    g = grads.new_zeros(len(rows), param.shape[1]).index_add_(0, inverse, grads)          # (R, d)
    m = exp_avg.index_select(0, rows)
    v = exp_avg_sq.index_select(0, rows)
    m.add_((g - m).mul_(rate1))
    v.add_((g * g - v).mul_(rate2))
    exp_avg.index_copy_(0, rows, m)
    exp_avg_sq.index_copy_(0, rows, v)
    param.index_add_(0, rows, m.div_(v.sqrt_().add_(eps)).mul_(-step_size))
