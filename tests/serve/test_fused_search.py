"""search_topk: the PyTorch path against brute force; the Triton kernel against the PyTorch path."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from darec.errors import ConfigError
from darec.serve.fused_search import INVALID_SCORE, _topk_width, search_topk, search_topk_torch, triton_available

ROOT = Path(__file__).resolve().parents[2]


def _inputs(u: int, c: int, n: int, d: int, *, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    queries, keys = torch.randn(u, c, d, generator=g), torch.randn(u, n, d, generator=g)
    bias = torch.randn(n, generator=g)
    valid = torch.rand(u, n, generator=g) > 0.3
    valid[0, : n - 3] = False  # user 0 has at most 3 real behaviours: padding fills its top-K
    return queries, keys, bias, valid


def _brute_force(queries, keys, bias, valid, k, scale):
    """Per (user, candidate): score every real position in float64, sort, keep k."""
    q, kk, b, v = (t.double().numpy() if t.dtype != torch.bool else t.numpy() for t in (queries, keys, bias, valid))
    u, c, _ = q.shape
    out = []
    for i in range(u):
        for j in range(c):
            real = np.flatnonzero(v[i])
            scores = np.array([q[i, j] @ kk[i, p] * scale + b[p] for p in real])
            order = real[np.argsort(-scores, kind="stable")][:k]
            out.append((i, j, order.tolist(), np.sort(scores)[::-1][:k]))
    return out


@pytest.mark.parametrize(("n", "k"), [(30, 1), (30, 5), (30, 40), (40, 1), (100, 3)])
def test_torch_path_matches_brute_force(n, k):
    """(40, 1) and (100, 3) score 64 k columns (torch's CPU topk fast path): the extra ones are never kept."""
    assert (_topk_width(n, k, torch.device("cpu")) > n) == (n < 64 * k <= 2 * n)
    queries, keys, bias, valid = _inputs(3, 4, n, 6)
    scores, index = search_topk_torch(queries, keys, bias=bias, valid=valid, k=k, scale=0.5)
    assert scores.shape == index.shape == (3, 4, min(k, n))
    for i, j, order, expected in _brute_force(queries, keys, bias, valid, k, 0.5):
        m = len(order)
        assert index[i, j, :m].tolist() == order
        np.testing.assert_allclose(scores[i, j, :m].numpy(), expected, rtol=1e-5, atol=1e-5)
        assert (scores[i, j, m:] == INVALID_SCORE).all()  # padding only after every real behaviour
        assert not valid[i, index[i, j, m:]].any()


def test_per_user_bias_and_no_bias():
    queries, keys, _, valid = _inputs(2, 3, 12, 4)
    bias = torch.randn(2, 12)
    scores, index = search_topk_torch(queries, keys, bias=bias, valid=valid, k=3, scale=1.0)
    expected = torch.einsum("ucd,und->ucn", queries, keys) + bias[:, None, :]
    expected = expected.masked_fill(~valid[:, None, :], INVALID_SCORE)
    torch.testing.assert_close(scores, expected.gather(2, index))
    plain, _ = search_topk_torch(queries, keys, bias=None, valid=valid, k=3, scale=1.0)
    assert plain.shape == (2, 3, 3)


def test_fused_without_cuda_or_triton_raises():
    queries, keys, bias, valid = _inputs(1, 2, 8, 4)
    if triton_available() and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the Triton interpreter is active here")
    with pytest.raises(ConfigError, match="fused search"):
        search_topk(queries, keys, bias=bias, valid=valid, k=3, scale=1.0, fused=True)


def test_shape_errors():
    queries, keys, bias, valid = _inputs(2, 3, 8, 4)
    with pytest.raises(ConfigError):
        search_topk(queries, keys[:, :, :3], bias=bias, valid=valid, k=3, scale=1.0)
    with pytest.raises(ConfigError):
        search_topk(queries, keys, bias=bias, valid=valid[:, :5], k=3, scale=1.0)
    with pytest.raises(ConfigError):
        search_topk(queries, keys, bias=bias, valid=valid, k=0, scale=1.0)


def _assert_same_topk(fused, plain, valid):
    (fs, fi), (ps, pi) = fused, plain
    torch.testing.assert_close(fs, ps, rtol=1e-5, atol=1e-5)
    real = ps > INVALID_SCORE  # ties among padding may be broken differently
    assert torch.equal(fi[real], pi[real])
    assert not torch.gather(valid.unsqueeze(1).expand(-1, fi.shape[1], -1), 2, fi)[~real].any()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not triton_available(), reason="needs CUDA and Triton")
@pytest.mark.parametrize("shape", [(2, 5, 100, 32, 20), (3, 70, 1000, 16, 32), (1, 3, 10, 8, 20),
                                   (4, 100, 10_000, 32, 64)])
def test_fused_kernel_equals_plain_on_cuda(shape):
    u, c, n, d, k = shape
    queries, keys, bias, valid = (t.cuda() for t in _inputs(u, c, n, d))
    fused = search_topk(queries, keys, bias=bias, valid=valid, k=k, scale=0.25, fused=True)
    plain = search_topk(queries, keys, bias=bias, valid=valid, k=k, scale=0.25, fused=False)
    _assert_same_topk(fused, plain, valid)


@pytest.mark.skipif(not triton_available(), reason="triton is not installed (pip install darec[gpu])")
def test_fused_kernel_equals_plain_in_triton_interpreter():
    script = textwrap.dedent("""
        import torch
        from darec.serve.fused_search import search_topk
        from tests.serve.test_fused_search import _inputs, _assert_same_topk
        for u, c, n, d, k in [(2, 5, 100, 32, 20), (2, 17, 130, 6, 33), (1, 3, 10, 16, 20)]:
            queries, keys, bias, valid = _inputs(u, c, n, d)
            fused = search_topk(queries, keys, bias=bias, valid=valid, k=k, scale=0.3, fused=True)
            plain = search_topk(queries, keys, bias=bias, valid=valid, k=k, scale=0.3, fused=False)
            _assert_same_topk(fused, plain, valid)
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    if run.returncode != 0 and "interpret" in run.stderr.lower() and "not supported" in run.stderr.lower():
        pytest.skip(f"this Triton cannot interpret on CPU: {run.stderr[-300:]}")
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]
