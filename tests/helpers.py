"""Small builders shared by tests: random batches with known padding, tiny saved models, file-tree snapshots."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from darec.checkpoint import save_checkpoint
from darec.data.batch import Batch


def tiny_dare_checkpoint(path: Path, dataset, *, max_len: int, init_std: float = 0.2):
    """Save an untrained, seeded tiny DARE model (K_A 4, K_R 8) for `dataset`'s vocabularies as a checkpoint
    at `path` (e.g. RUN/best.pt) and return it in eval mode: serving tests need weights, not training."""
    from darec.models import build_model, preset_config

    torch.manual_seed(0)
    config = preset_config("dare", n_items=dataset.n_items, n_categories=dataset.n_categories, max_len=max_len,
                           attention_dim=4, dim=8, init_std=init_std)
    model = build_model(config).eval()
    save_checkpoint(path, {"model_config": config.to_dict(), "model": model.state_dict(), "step": 1})
    return model


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


def tree_snapshot(*roots: Path) -> dict[str, tuple[int, int, int, int]]:
    """(size, mtime_ns, mode, inode) of every file and folder under `roots`: any rewrite, move, chmod
    or deletion shows up as a difference. A folder's size and mtime are left out: they change whenever
    an allowed output is created inside it."""
    snap = {}
    for root in roots:
        for path in [Path(root), *Path(root).rglob("*")]:
            st = path.lstat()
            is_dir = path.is_dir() and not path.is_symlink()
            snap[str(path)] = (0 if is_dir else st.st_size, 0 if is_dir else st.st_mtime_ns, st.st_mode, st.st_ino)
    return snap


def changes_outside(before: dict, after: dict, allowed: list[Path]) -> list[str]:
    """Paths changed, removed or created, except at or under an `allowed` output path."""
    def inside(path: str) -> bool:
        return any(path == str(a) or path.startswith(str(a) + os.sep) for a in allowed)
    changed = {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}
    return sorted(p for p in changed if not inside(p))
