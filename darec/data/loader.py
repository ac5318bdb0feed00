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
    """

    def __init__(self, dataset: PreparedDataset, split: str, *, batch_size: int, shuffle: bool = False,
                 seed: int = 0, max_len: int | None = None, drop_last: bool = False,
                 device: str | torch.device = "cpu") -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.max_len = int(max_len if max_len is not None else dataset.max_len)
        if self.max_len < 1:
            raise ConfigError(f"max_len must be >= 1, got {self.max_len}")
        self.samples = dataset.split(split)
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.device = torch.device(device)
        self._on_device = self.device.type != "cpu"
        if self._on_device:
            self._csr = tuple(torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(self.device)
                              for a in (dataset.offsets, dataset.items, dataset.categories))
        else:
            self._csr = (np.asarray(dataset.offsets), np.asarray(dataset.items), np.asarray(dataset.categories))
        self._positions = torch.arange(self.max_len, 0, -1, dtype=torch.int64, device=self.device)  # (L,)

    def __len__(self) -> int:
        n = len(self.samples)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        return self.batches(0)

    def order(self, epoch: int) -> np.ndarray:
        """Sample indices of `epoch` in visiting order."""
        if not self.shuffle:
            return np.arange(len(self.samples))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.samples))

    def batches(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """Batches of `epoch`, skipping the first `start` (cheap: nothing is gathered for them)."""
        order = self.order(epoch)
        for b in range(start, len(self)):
            yield self._batch(order[b * self.batch_size:(b + 1) * self.batch_size])

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
        return Batch(hist_items=hist_items, hist_categories=hist_cats, hist_positions=positions, mask=mask,
                     target_item=columns["item"], target_category=columns["category"], label=label,
                     user=columns["user"])
