"""Samples → `Batch`: one vectorised gather of left-padded histories out of the CSR, no per-sample loop.

Notation: B = batch size, L = history length (`max_len`). Histories are oldest first and left-padded
with 0; slot j (0-based) gets position L - j, so the click just before the target is position 1.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from darec.data.batch import Batch
from darec.data.store import PreparedDataset
from darec.errors import ConfigError

__all__ = ["gather_histories", "BatchLoader"]


def gather_histories(offsets, items, categories, users, cuts, max_len: int):
    """Histories seq[max(0, cut - L):cut] of each sample, left-padded to L.

    Works on numpy arrays or torch tensors alike (same index arithmetic), so the GPU path gathers on
    the device. Args: offsets (U+1,), items/categories (N,), users/cuts (B,). Returns (hist_items,
    hist_cats, mask), each (B, L); ids keep the dtype of `items`/`categories`, mask is bool.
    """
    if isinstance(users, torch.Tensor):
        slots = torch.arange(max_len, device=users.device, dtype=torch.int64)
        start = offsets[users.long()] + cuts.long() - max_len  # (B,) global index of slot 0
        index = start[:, None] + slots[None, :]  # (B, L)
        mask = slots[None, :] >= (max_len - cuts.long())[:, None]  # slot j is real iff j >= L - cut
        index = torch.where(mask, index, torch.zeros_like(index))
        zero = torch.zeros((), dtype=items.dtype, device=items.device)
        return (torch.where(mask, items[index], zero), torch.where(mask, categories[index], zero), mask)
    users = np.asarray(users, dtype=np.int64)
    cuts = np.asarray(cuts, dtype=np.int64)
    slots = np.arange(max_len, dtype=np.int64)
    index = (offsets[users] + cuts - max_len)[:, None] + slots[None, :]  # (B, L)
    mask = slots[None, :] >= (max_len - cuts)[:, None]
    index = np.where(mask, index, 0)
    return (np.where(mask, items[index], 0), np.where(mask, categories[index], 0), mask)


class BatchLoader:
    """Iterates one split of a prepared dataset as `Batch`es.

    Shuffling uses the permutation of `np.random.default_rng([seed, epoch])`, so `batches(epoch, start)`
    reproduces exactly the batches a run would have seen after `start` steps of that epoch (resume).
    `max_len` may exceed the prepared one: longer histories come from the same CSR. On a CUDA device
    the CSR arrays live on the GPU and the gather runs there; only sample pointers cross the bus.

    `group_sets`: a split stores each positive followed by its negatives of the same user and cut (one
    candidate set, see protocol.py); with `group_sets` whole sets are shuffled and a batch holds
    `batch_size // set size` whole sets, so set-wise models and ranking losses see every set complete.
    Every batch carries `candidate_set` ids (rows of one user and cut share one) in either mode.

    `shard=(rank, world_size)`: this process reads only its share of every global batch (multi-process
    training, darec/train/distributed.py): a contiguous run of the batch's rows (whole sets with
    `group_sets`), shares differing by at most one row (set). Every rank gets the same number of
    non-empty batches, as DDP and sharded tables need: a batch with fewer rows (sets) than ranks hands its
    last row (set) to the ranks past its end again (evaluation drops such repeats by row index).
    """

    def __init__(self, dataset: PreparedDataset, split: str, *, batch_size: int, shuffle: bool = False,
                 seed: int = 0, max_len: int | None = None, drop_last: bool = False,
                 device: str | torch.device = "cpu", group_sets: bool = False,
                 shard: tuple[int, int] = (0, 1)) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.max_len = int(max_len if max_len is not None else dataset.max_len)
        if self.max_len < 1:
            raise ConfigError(f"max_len must be >= 1, got {self.max_len}")
        self.samples = dataset.split(split)
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.group_sets = group_sets
        if not 0 <= shard[0] < shard[1]:
            raise ConfigError(f"shard must be (rank, world_size) with 0 <= rank < world_size, got {shard}")
        self.shard = shard
        keys = _request_keys(self.samples)
        self._set_starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if len(keys) else np.zeros(0, np.int64)
        self._sets_per_batch = max(1, batch_size * len(self._set_starts) // max(len(self.samples), 1))
        self.device = torch.device(device)
        self._on_device = self.device.type != "cpu"
        if self._on_device:
            self._csr = tuple(torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(self.device)
                              for a in (dataset.offsets, dataset.items, dataset.categories))
        else:
            self._csr = (np.asarray(dataset.offsets), np.asarray(dataset.items), np.asarray(dataset.categories))
        self._positions = torch.arange(self.max_len, 0, -1, dtype=torch.int64, device=self.device)  # (L,)

    def __len__(self) -> int:
        n, per = (len(self._set_starts), self._sets_per_batch) if self.group_sets else (len(self.samples), self.batch_size)
        return n // per if self.drop_last else math.ceil(n / per)

    def __iter__(self) -> Iterator[Batch]:
        return self.batches(0)

    def order(self, epoch: int) -> np.ndarray:
        """Sample indices of `epoch` in visiting order."""
        if self.group_sets:
            return self._set_order(epoch)[0]
        if not self.shuffle:
            return np.arange(len(self.samples))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.samples))

    def _set_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows of whole candidate sets in visiting order, and where each batch starts in that order."""
        sizes = np.diff(np.r_[self._set_starts, len(self.samples)])
        sets = np.arange(len(sizes))
        if self.shuffle:
            sets = np.random.default_rng([self.seed, epoch]).permutation(len(sizes))
        lengths = sizes[sets]
        ends = np.cumsum(lengths)
        rows = np.repeat(self._set_starts[sets] - (ends - lengths), lengths) + np.arange(ends[-1] if len(ends) else 0)
        bounds = np.r_[0, ends][::self._sets_per_batch]
        return rows, np.r_[bounds, len(rows)] if bounds[-1] != len(rows) else bounds

    def batches(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """Batches of `epoch`, skipping the first `start` (cheap: nothing is gathered for them)."""
        for index in self.indices(epoch, start):
            yield self._batch(index)

    def indices(self, epoch: int, start: int = 0) -> Iterator[np.ndarray]:
        """Sample indices of the batches of `epoch` from batch `start` on (this rank's share of each)."""
        if self.group_sets:
            order, bounds = self._set_order(epoch)
        else:
            order = self.order(epoch)
            bounds = np.minimum(np.arange(len(self) + 1) * self.batch_size, len(order))
        for b in range(start, len(self)):
            yield self._share(order[bounds[b]:bounds[b + 1]])

    def _share(self, index: np.ndarray) -> np.ndarray:
        """This rank's contiguous run of whole units (rows, or candidate sets) of one global batch."""
        rank, world = self.shard
        if world == 1:
            return index
        if self.group_sets:
            keys = _request_keys(self.samples[index])
            starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        else:
            starts = np.arange(len(index))
        edges = np.r_[starts, len(index)]
        units = len(starts)
        if units < world:  # too few to share: ranks past the end repeat the last unit
            first = min(rank, units - 1)
            return index[edges[first]:edges[first + 1]]
        cuts = np.arange(world + 1) * units // world
        return index[edges[cuts[rank]]:edges[cuts[rank + 1]]]

    def _batch(self, index: np.ndarray) -> Batch:
        rows = self.samples[index]  # structured (B,) copy of the pointers
        columns = {name: torch.from_numpy(rows[name].astype(np.int64)) for name in ("user", "cut", "item", "category")}
        label = torch.from_numpy(rows["label"].astype(np.float32))
        if self._on_device:
            columns = {k: v.to(self.device, non_blocking=True) for k, v in columns.items()}
            label = label.to(self.device, non_blocking=True)
            hist_items, hist_cats, mask = gather_histories(*self._csr, columns["user"], columns["cut"], self.max_len)
        else:
            hi, hc, m = gather_histories(*self._csr, rows["user"], rows["cut"], self.max_len)
            hist_items, hist_cats = torch.from_numpy(hi.astype(np.int64)), torch.from_numpy(hc.astype(np.int64))
            mask = torch.from_numpy(m)
        positions = self._positions.expand(len(index), -1).contiguous()  # (B, L), same for every row
        sets = torch.from_numpy(np.unique(_request_keys(rows), return_inverse=True)[1].reshape(-1))
        return Batch(hist_items=hist_items, hist_categories=hist_cats, hist_positions=positions, mask=mask,
                     target_item=columns["item"], target_category=columns["category"], label=label,
                     user=columns["user"], candidate_set=sets.to(self.device, non_blocking=True))


def _request_keys(rows: np.ndarray) -> np.ndarray:
    """One int64 per sample, equal exactly for samples of the same user and cut (one candidate set)."""
    return (rows["user"].astype(np.int64) << 32) | rows["cut"].astype(np.int64)
