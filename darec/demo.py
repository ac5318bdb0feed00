"""The main job: the shipped MovieLens data through the paper's protocol, Table-1 presets compared.

Sized for a 2-core laptop (minutes, not hours): embedding dim 16, batch 128, 4 epochs, several seeds.
"""
from __future__ import annotations

import logging
from pathlib import Path

from darec.models.presets import TABLE1_PRESETS
from darec.train.config import TrainConfig

__all__ = ["run_demo", "DEMO_TRAIN", "DEMO_PRESETS"]

log = logging.getLogger(__name__)

# MovieLens has 7,239 training samples: the paper's batch 2048 would give 4 steps an epoch, so the
# demo takes batch 128 for 4 epochs (226 steps), otherwise the paper's optimiser settings.
DEMO_TRAIN = TrainConfig(batch_size=128, eval_batch_size=4096, epochs=4, lr=0.01)

# Every Table 1 row except TWIN-V2, whose per-forward clustering takes minutes a run on a 2-core CPU
# (in production it clusters offline); `darec demo --presets table1` includes it.
DEMO_PRESETS = tuple(p for p in TABLE1_PRESETS if p != "twin_v2")


def run_demo(*, out_dir: str | Path, seeds: tuple[int, ...] = (1, 2, 3),
             presets: tuple[str, ...] = DEMO_PRESETS, progress: bool = True) -> str:
    """Prepare MovieLens into `out_dir/data` (reused when present), run the table, return it as Markdown."""
    from darec.data import prepare
    from darec.train.table import TableSpec, resolve_presets, run_table

    out_dir = Path(out_dir)
    data_dir = out_dir / "data"
    if not (data_dir / "manifest.json").exists():
        log.info("preparing the shipped MovieLens ratings into %s", data_dir)
        prepare(source="movielens", out=data_dir)
    spec = TableSpec(presets=resolve_presets(presets), dims=(16,), seeds=seeds)
    run_table(data=data_dir, out_dir=out_dir, spec=spec, base=DEMO_TRAIN, progress=progress)
    table = (out_dir / "table.md").read_text()
    return table + f"\nWritten to {out_dir}: table.md, table.csv, runs.json, curves.png, runs/\n"
