"""Search selections against brute-force per-sample references."""
from __future__ import annotations

import torch

from darec.models.search import masked_softmax, select_recent_same_category, select_topk
from tests.helpers import random_batch


def _brute_topk(scores, mask, k):
    rows = []
    for s, m in zip(scores.tolist(), mask.tolist()):
        real = sorted((i for i in range(len(s)) if m[i]), key=lambda i: -s[i])
        pad = [i for i in range(len(s)) if not m[i]]
        rows.append(set((real + pad)[:k]))
    return rows


def test_topk_equals_brute_force_and_never_picks_padding_when_enough_real():
    batch = random_batch(batch_size=64, length=40, min_real=0, seed=3)
    scores = torch.randn(64, 40, generator=torch.Generator().manual_seed(1))
    scores[~batch.mask] = 100.0  # padding with the highest scores must still lose
    k = 10
    got = select_topk(scores, batch, k)
    for row, (chosen, expected) in enumerate(zip(got.tolist(), _brute_topk(scores, batch.mask, k))):
        real = int(batch.mask[row].sum())
        if real >= k:
            assert set(chosen) == expected
            assert batch.mask[row, got[row]].all()
        else:  # every real behaviour is kept
            assert set(torch.nonzero(batch.mask[row]).flatten().tolist()) <= set(chosen)


def test_hard_search_keeps_most_recent_same_category_then_most_recent_others():
    batch = random_batch(batch_size=32, length=25, n_categories=4, min_real=12, seed=5)
    k = 8
    got = select_recent_same_category(torch.zeros(32, 25), batch, k)
    for row in range(32):
        real = [i for i in range(25) if batch.mask[row, i]]
        same = [i for i in real if batch.hist_categories[row, i] == batch.target_category[row]]
        other = [i for i in real if i not in same]
        # later slots are more recent (positions count down towards the target)
        expected = (sorted(same, reverse=True) + sorted(other, reverse=True))[:k]
        assert set(got[row].tolist()) == set(expected)


def test_masked_softmax_zero_outside_mask_and_empty_rows():
    logits = torch.randn(3, 5)
    valid = torch.tensor([[1, 1, 0, 0, 1], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    w = masked_softmax(logits, valid)
    assert torch.all(w[~valid] == 0)
    assert torch.allclose(w[0].sum(), torch.tensor(1.0))
    assert torch.all(w[1] == 0)
    expected = torch.softmax(logits[0, [0, 1, 4]], 0)
    assert torch.allclose(w[0, [0, 1, 4]], expected)
