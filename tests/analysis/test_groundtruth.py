"""MI ground truth: the formula against sklearn, the vectorised counts against a brute-force loop."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import mutual_info_score

from darec.analysis.groundtruth import binary_mutual_information, count_cooccurrence, most_common_targets
from darec.data.loader import gather_histories
from darec.data.protocol import ProtocolConfig
from darec.data.store import PreparedDataset
from darec.data.synthetic import SyntheticConfig, prepare_synthetic


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> PreparedDataset:
    out = tmp_path_factory.mktemp("gt") / "tiny"
    return prepare_synthetic(SyntheticConfig(n_users=30, n_items=40, n_categories=6, mean_length=225),
                             out=out, config=ProtocolConfig(max_len=20))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mi_matches_sklearn_in_bits(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 500)
    x = np.where(rng.random(500) < 0.7, y, rng.integers(0, 2, 500))          # dependent on y
    expected = mutual_info_score(x, y) / np.log(2)
    got = binary_mutual_information(((x == 1) & (y == 1)).sum(), ((x == 1) & (y == 0)).sum(),
                                    t_pos=(y == 1).sum(), t_neg=(y == 0).sum())
    assert got == pytest.approx(expected, rel=1e-10)


def test_mi_of_known_joint_distribution():
    # X = Y exactly with P(Y=1) = 1/2: MI = H(Y) = 1 bit; X independent of Y: 0 bits.
    assert binary_mutual_information(50, 0, t_pos=50, t_neg=50) == pytest.approx(1.0)
    assert binary_mutual_information(25, 25, t_pos=50, t_neg=50) == pytest.approx(0.0, abs=1e-12)
    # Degenerate cells (X never 1, or always 1) carry no information and are 0, not NaN.
    assert binary_mutual_information(0, 0, t_pos=30, t_neg=60) == 0.0
    assert binary_mutual_information(30, 60, t_pos=30, t_neg=60) == pytest.approx(0.0, abs=1e-12)


def test_counts_match_brute_force(tiny):
    counts = count_cooccurrence(tiny, chunk=97)                                # chunking must not matter
    samples = tiny.split("train")
    length = tiny.max_len
    pos = np.zeros_like(counts.positive)
    neg = np.zeros_like(counts.negative)
    _, cats, mask = gather_histories(np.asarray(tiny.offsets), np.asarray(tiny.items),
                                     np.asarray(tiny.categories), samples["user"], samples["cut"], length)
    for i, sample in enumerate(samples):
        for j in range(length):
            if mask[i, j]:
                target = pos if sample["label"] == 1 else neg
                target[sample["category"], cats[i, j], length - j] += 1
    np.testing.assert_array_equal(counts.positive, pos)
    np.testing.assert_array_equal(counts.negative, neg)
    assert counts.support().sum() == len(samples)
    assert counts.target_positive.sum() == samples["label"].sum()


def test_restricted_targets_are_a_slice_of_all(tiny):
    full = count_cooccurrence(tiny)
    top = most_common_targets(tiny, 3)
    part = count_cooccurrence(tiny, targets=top, max_position=5)
    np.testing.assert_array_equal(part.positive, full.positive[top][:, :, :6])
    np.testing.assert_array_equal(part.row_of(top), np.arange(3))
    freq = np.bincount(tiny.split("train")["category"], minlength=tiny.n_categories)
    assert freq[top[0]] == freq[1:].max()
