"""Small builders shared by tests: random batches with known padding."""
from __future__ import annotations

import torch

from darec.data.batch import Batch


def random_batch(*, batch_size: int = 16, length: int = 30, n_items: int = 50, n_categories: int = 6,
                 min_real: int = 0, seed: int = 0) -> Batch:
    """A left-padded batch; row i has between `min_real` and `length` real behaviours."""
    g = torch.Generator().manual_seed(seed)
    real = torch.randint(min_real, length + 1, (batch_size,), generator=g)
    slots = torch.arange(length)
    mask = slots.unsqueeze(0) >= (length - real).unsqueeze(1)                 # (B, L), left padding
    items = torch.randint(1, n_items, (batch_size, length), generator=g) * mask
    cats = torch.randint(1, n_categories, (batch_size, length), generator=g) * mask
    return Batch(hist_items=items, hist_categories=cats,
                 hist_positions=torch.arange(length, 0, -1).expand(batch_size, length).clone(),
                 mask=mask, target_item=torch.randint(1, n_items, (batch_size,), generator=g),
                 target_category=torch.randint(1, n_categories, (batch_size,), generator=g),
                 label=torch.randint(0, 2, (batch_size,), generator=g).float(),
                 user=torch.arange(batch_size))
