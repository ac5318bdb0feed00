"""MI ground truth: the formula against sklearn, the vectorised counts against a brute-force loop."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import mutual_info_score

from darec.analysis.groundtruth import binary_mutual_information, cell_keys, count_cooccurrence, most_common_targets
from darec.analysis.retrieval import position_relevance
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


def _brute_force_counts(dataset: PreparedDataset, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Dense (C, C, L+1) positive and negative counts by a per-sample loop (the old dense layout)."""
    samples = dataset.split("train")
    n = dataset.n_categories
    pos, neg = np.zeros((n, n, length + 1)), np.zeros((n, n, length + 1))
    _, cats, mask = gather_histories(np.asarray(dataset.offsets), np.asarray(dataset.items),
                                     np.asarray(dataset.categories), samples["user"], samples["cut"], length)
    for i, sample in enumerate(samples):
        for j in range(length):
            if mask[i, j]:
                target = pos if sample["label"] == 1 else neg
                target[sample["category"], cats[i, j], length - j] += 1
    return pos, neg


def _full_grid(n: int, length: int) -> tuple[np.ndarray, ...]:
    return np.arange(n)[:, None, None], np.arange(n)[None, :, None], np.arange(length + 1)[None, None, :]


def test_counts_match_brute_force(tiny):
    length = tiny.max_len
    grid = _full_grid(tiny.n_categories, length)
    cells = cell_keys(*grid, n_categories=tiny.n_categories, max_position=length).ravel()
    counts = count_cooccurrence(tiny, cells=cells, max_position=length, chunk=97)    # chunking must not matter
    pos, neg = _brute_force_counts(tiny, length)
    got_pos, got_neg = counts.counts_at(*grid)
    np.testing.assert_array_equal(got_pos, pos)
    np.testing.assert_array_equal(got_neg, neg)
    samples = tiny.split("train")
    assert counts.support().sum() == len(samples)
    assert counts.target_positive.sum() == samples["label"].sum()


def test_requested_cells_are_a_slice_of_all(tiny):
    length = tiny.max_len
    grid = _full_grid(tiny.n_categories, length)
    full = count_cooccurrence(tiny, cells=cell_keys(*grid, n_categories=tiny.n_categories,
                                                    max_position=length).ravel(), max_position=length)
    top = most_common_targets(tiny, 3)
    part_grid = (top[:, None, None], np.arange(tiny.n_categories)[None, :, None], np.arange(1, 6)[None, None, :])
    cells = cell_keys(*part_grid, n_categories=tiny.n_categories, max_position=5)
    part = count_cooccurrence(tiny, cells=cells[:, :, ::2].ravel(), max_position=5)   # a sparse subset
    np.testing.assert_array_equal(part.counts_at(*part_grid[:2], part_grid[2][..., ::2])[0],
                                  full.counts_at(*part_grid[:2], part_grid[2][..., ::2])[0])
    with pytest.raises(ValueError, match="not counted"):
        part.counts_at(top[0], 1, 2)                       # position 2 was not requested
    freq = np.bincount(tiny.split("train")["category"], minlength=tiny.n_categories)
    assert freq[top[0]] == freq[1:].max()


def test_sparse_relevance_equals_the_dense_table(tiny):
    """The retrieval ground truth from sparse counts equals a lookup in the dense MI table built by brute force."""
    length = tiny.max_len
    pos, neg = _brute_force_counts(tiny, length)
    t_pos = np.bincount(tiny.split("train")["category"], weights=tiny.split("train")["label"],
                        minlength=tiny.n_categories)
    t_neg = np.bincount(tiny.split("train")["category"], minlength=tiny.n_categories) - t_pos
    dense_mi = binary_mutual_information(pos, neg, t_pos=t_pos[:, None, None], t_neg=t_neg[:, None, None])
    test = tiny.split("test")
    _, cats, mask = gather_histories(np.asarray(tiny.offsets), np.asarray(tiny.items), np.asarray(tiny.categories),
                                     test["user"], test["cut"], length)
    positions = np.broadcast_to(np.arange(length, 0, -1), cats.shape)
    min_support = int(np.median((t_pos + t_neg)[1:]))       # some targets supported, some not
    got = position_relevance(tiny, target_categories=test["category"], hist_categories=cats,
                             hist_positions=positions, mask=mask, min_support=min_support)
    supported = (t_pos + t_neg)[test["category"]] >= min_support
    expected = np.where(mask & supported[:, None], dense_mi[test["category"][:, None], cats, positions], 0.0)
    assert 0 < supported.sum() < len(test) and (expected > 0).any()
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=0)
