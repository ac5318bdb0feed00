"""Row-sparse Adam with collected row gradients and numba kernels, against torch's own sparse Adam and a
brute-force sum; the batched dot/weighted-sum backward against autograd's einsum."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from darec.data.loader import BatchLoader
from darec.data.store import PreparedDataset
from darec.models import PRESETS, build_model, preset_config
from darec.models.batched import row_dots, weighted_sum
from darec.models.table import RowGradients, Table
from darec.train.config import TrainConfig
from darec.train.row_kernels import owned_counts
from darec.train.row_sparse import RowSparseAdam, update_rows_torch
from darec.train.trainer import Optimizers, objective, regularised_weights


def _two_role_steps(table: torch.nn.Embedding, opt: torch.optim.Optimizer, steps: int = 6) -> None:
    """Each step reads the table twice (as query and key roles do), with repeated ids."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        a, b = torch.randint(0, 30, (25,), generator=gen), torch.randint(0, 30, (4, 9), generator=gen)
        wa, wb = torch.randn(25, 5, generator=gen), torch.randn(4, 9, 5, generator=gen)
        opt.zero_grad()
        ((table(a) * wa).sum() + (table(b) * wb).sum()).backward()
        opt.step()


def test_collected_rows_give_torch_sparse_adam():
    torch.manual_seed(0)
    ours, ref = Table(40, 5), torch.nn.Embedding(40, 5, sparse=True)
    ref.load_state_dict(ours.state_dict())
    ours.collector = RowGradients()
    start = ours.weight.detach().clone()
    _two_role_steps(ours, RowSparseAdam([ours.weight], lr=0.05, collectors={ours.weight: ours.collector}))
    _two_role_steps(ref, torch.optim.SparseAdam([ref.weight], lr=0.05))
    assert ours.weight.grad is None                         # autograd never wrote a gradient
    torch.testing.assert_close(ours.weight, ref.weight, rtol=1e-5, atol=1e-6)
    assert torch.equal(ours.weight[30:], start[30:])        # rows never read never move
    assert not torch.equal(ours.weight[:30], start[:30])


def test_zero_grad_drops_rows_no_step_consumed():
    table = Table(10, 3)
    table.collector = RowGradients()
    opt = RowSparseAdam([table.weight], lr=0.1, collectors={table.weight: table.collector})
    table(torch.tensor([1, 2])).sum().backward()
    opt.zero_grad()
    before = table.weight.detach().clone()
    opt.step()                                              # nothing collected since zero_grad: no change
    assert torch.equal(table.weight, before)


def _random_pieces(rng: np.random.Generator, table_rows: int, sizes: list[int], dim: int, low: int = 0
                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.from_numpy(rng.integers(low, table_rows, n)), torch.from_numpy(rng.standard_normal((n, dim),
                                                                                               dtype=np.float32)))
            for n in sizes]


def _step_with_kernels(threads: int, pieces, weight: torch.Tensor, steps: int = 3):
    """`steps` CPU-kernel Adam steps (numba, `threads` shares) on the same collected pieces each step, from
    fresh moments; returns (w, m, v)."""
    table = torch.nn.Parameter(weight.clone())
    collector = RowGradients()
    opt = RowSparseAdam([table], lr=0.01, collectors={table: collector})
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(steps):
            for ids, grads in pieces:
                collector.add(ids, grads)
            opt.step()
    finally:
        torch.set_num_threads(previous)
    state = opt.state[table]
    return table.detach(), state["exp_avg"], state["exp_avg_sq"]


@pytest.mark.parametrize("low", [0, 700])  # 700: every id in the last thread's share (unbalanced blocks)
def test_cpu_kernels_equal_torch_operations_at_any_thread_count(low):
    rng = np.random.default_rng(3)
    pieces = _random_pieces(rng, 1000, [500, 37, 1], 6, low=low)
    weight = torch.from_numpy(rng.standard_normal((1000, 6), dtype=np.float32))
    results = [_step_with_kernels(t, pieces, weight) for t in (1, 2)]
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)   # bit-identical across threads

    w, m, v = weight.clone(), torch.zeros_like(weight), torch.zeros_like(weight)
    for step in range(1, 4):
        step_size = 0.01 * (1 - 0.999 ** step) ** 0.5 / (1 - 0.9 ** step)
        update_rows_torch(w, m, v, pieces, rate1=0.1, rate2=0.001, eps=1e-8, step_size=step_size)
    torch.testing.assert_close(results[0], (w, m, v), rtol=1e-6, atol=1e-7)
    touched = torch.unique(torch.cat([i for i, _ in pieces]))
    untouched = torch.ones(1000, dtype=torch.bool)
    untouched[touched] = False
    assert torch.equal(results[0][0][untouched], weight[untouched])


@settings(max_examples=40, deadline=None)
@given(table_rows=st.integers(1, 300), sizes=st.lists(st.integers(0, 200), min_size=1, max_size=4),
       threads=st.integers(1, 5), seed=st.integers(0, 2**31))
def test_owned_counts_partition_the_ids(table_rows, sizes, threads, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, table_rows, sum(sizes))
    counts = owned_counts(ids, table_rows, threads)
    share = -(-table_rows // threads)
    assert counts.tolist() == [int(((ids >= t * share) & (ids < (t + 1) * share)).sum()) for t in range(threads)]


@settings(max_examples=25, deadline=None)
@given(table_rows=st.integers(1, 400), sizes=st.lists(st.integers(0, 300), min_size=1, max_size=4),
       seed=st.integers(0, 2**31))
def test_one_kernel_step_is_the_brute_force_adam_step(table_rows, sizes, seed):
    """Against an independent float64 computation: sum each row's gradients, one Adam step from zero moments."""
    rng = np.random.default_rng(seed)
    pieces = _random_pieces(rng, table_rows, sizes, 4)
    weight = torch.from_numpy(rng.standard_normal((table_rows, 4), dtype=np.float32))
    w, m, v = _step_with_kernels(torch.get_num_threads(), pieces, weight, steps=1)
    g = np.zeros((table_rows, 4))
    touched = np.zeros(table_rows, dtype=bool)
    for ids, grads in pieces:
        np.add.at(g, ids.numpy(), grads.numpy().astype(np.float64))
        touched[ids.numpy()] = True
    m_ref, v_ref = 0.1 * g, 0.001 * g * g
    w_ref = weight.numpy().astype(np.float64) - 0.01 * (0.001 ** 0.5 / 0.1) * m_ref / (np.sqrt(v_ref) + 1e-8)
    w_ref[~touched] = weight.numpy()[~touched]
    np.testing.assert_allclose(m.numpy(), m_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(w.numpy(), w_ref, rtol=1e-5, atol=1e-5)


def test_batched_backward_equals_autograd_einsum():
    torch.manual_seed(0)
    q, k = torch.randn(3, 4, dtype=torch.float64, requires_grad=True), torch.randn(3, 7, 4, dtype=torch.float64,
                                                                                 requires_grad=True)
    w, v = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True), torch.randn(2, 3, 7, 5, dtype=torch.float64,
                                                                                    requires_grad=True)
    assert torch.autograd.gradcheck(row_dots, (q, k))
    assert torch.autograd.gradcheck(weighted_sum, (w, v))
    with torch.no_grad():
        torch.testing.assert_close(row_dots(q, k), torch.einsum("bd,bld->bl", q, k))
        torch.testing.assert_close(weighted_sum(w, v), torch.einsum("...k,...kd->...d", w, v))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_collected_rows_sum_to_autograd_sparse_gradients(tiny_planted_dir, preset):
    """The trainer collects rows when nothing reads .grad; with clipping (which reads it) the tables keep
    autograd's sparse gradients. Every preset (aux head on where it has one: tables read up to three times a
    step) gives every table the same gradient both ways."""
    dataset = PreparedDataset.open(tiny_planted_dir)
    batch = next(BatchLoader(dataset, "train", batch_size=32, shuffle=True, seed=1, max_len=dataset.max_len,
                             group_sets=True).batches(0))
    grads = []
    for clip in (None, 1e30):  # clipping on reads .grad
        torch.manual_seed(0)
        model = build_model(preset_config(preset, n_items=dataset.n_items, n_categories=dataset.n_categories,
                                          max_len=dataset.max_len, dim=8, top_k=5))
        config = TrainConfig(preset=preset, batch_size=32, grad_clip=clip)
        optimizers = Optimizers(model, config, torch.device("cpu"))
        tables = {name: m for name, m in model.named_modules() if isinstance(m, Table)}
        assert all((m.collector is not None) == (clip is None) for m in tables.values())
        optimizers.zero_grad()
        objective(model(batch), batch, config=config, l2_weights=regularised_weights(model)).backward()
        dense = {}
        for name, m in tables.items():
            dense[name] = torch.zeros_like(m.weight)
            if m.collector is not None:
                for ids, rows in m.collector.take():
                    dense[name].index_add_(0, ids, rows)
            elif m.weight.grad is not None:
                dense[name] = m.weight.grad.to_dense()
        grads.append(dense)
    assert grads[0].keys() == grads[1].keys() and any(g.any() for g in grads[0].values())
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-8, msg=name)
