"""TWIN (hard)'s aux head sees what the reference's does: attention over the K hard-searched behaviours."""
from __future__ import annotations

import torch

from darec.models import build_model, preset_config
from tests.helpers import random_batch


def _interest(preset: str):
    torch.manual_seed(0)
    model = build_model(preset_config(preset, n_items=50, n_categories=6, max_len=30, dim=4, init_std=0.5))
    return model.train()(random_batch(batch_size=8, length=30, min_real=25, seed=2)).interest


def test_hard_search_aux_input_is_the_kept_attention():
    hard = _interest("twin_hard")
    assert hard.r_full is not None and torch.equal(hard.r_full, hard.r)


def test_soft_search_aux_input_is_the_whole_history():
    soft = _interest("twin")
    assert soft.r_full is not None and not torch.allclose(soft.r_full, soft.r)
