"""Training, evaluation metrics and the Table 1 runner.

Torch-dependent names load lazily, so the `darec` command reads its configuration (and answers
`--help`) without paying for importing torch.
"""
from __future__ import annotations

import importlib
from typing import Any

from darec.train.config import TrainConfig, load_run_config

__all__ = ["TrainConfig", "load_run_config", "train", "evaluate", "predict", "auc", "group_auc", "logloss",
           "evaluate_predictions"]

_LAZY = {"train": "darec.train.trainer", "evaluate": "darec.train.trainer", "predict": "darec.train.trainer",
         "auc": "darec.train.metrics", "group_auc": "darec.train.metrics", "logloss": "darec.train.metrics",
         "evaluate_predictions": "darec.train.metrics"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'darec.train' has no attribute {name!r}")
