"""Data: raw logs → protocol splits → prepared directory (CSR + sample pointers) → `Batch`es.

Torch-dependent names (`Batch`, `BatchLoader`, `gather_histories`) load lazily, so `darec prepare`
does not pay for importing torch.
"""
from __future__ import annotations

import importlib
from typing import Any

from darec.data.pipeline import SOURCES, prepare, read_source
from darec.data.protocol import SAMPLE_DTYPE, SPLITS, PreparedArrays, ProtocolConfig, build_splits
from darec.data.readers import (RawEvents, read_generic, read_movielens, read_movielens_100k, read_taobao,
                                read_tmall)
from darec.data.store import PreparedDataset, write_prepared

__all__ = [
    "Batch", "BatchLoader", "gather_histories",
    "prepare", "read_source", "SOURCES",
    "ProtocolConfig", "PreparedArrays", "build_splits", "SAMPLE_DTYPE", "SPLITS",
    "RawEvents", "read_taobao", "read_tmall", "read_movielens", "read_movielens_100k", "read_generic",
    "PreparedDataset", "write_prepared",
    "SyntheticConfig", "PlantedTruth", "generate", "prepare_synthetic",
]

_LAZY = {"Batch": "darec.data.batch", "BatchLoader": "darec.data.loader", "gather_histories": "darec.data.loader",
         "SyntheticConfig": "darec.data.synthetic", "PlantedTruth": "darec.data.synthetic",
         "generate": "darec.data.synthetic", "prepare_synthetic": "darec.data.synthetic"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'darec.data' has no attribute {name!r}")
