"""Score-and-top-K over a long history without writing the (U, C, N) score matrix.

`search_topk` returns, for every (user, candidate), the K best history positions under
score = <q, k> * scale + bias[n] (invalid positions rank below every valid one) and their scores.
On CUDA with Triton installed it runs one fused kernel: each program owns a block of candidates of
one user, streams that user's key embeddings in tiles and keeps a running top-K in registers, so
global memory sees only the O(U C K) result instead of O(U C N) scores. Everywhere else (CPU, no
Triton) it is a batched matmul + `topk`, which is also the reference the kernel is tested against.

Notation: U users, C candidates per user, N history length, D query/key width, K kept positions.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Any

import torch

from darec.errors import ConfigError

__all__ = ["search_topk", "search_topk_torch", "triton_available", "MAX_FUSED_K", "INVALID_SCORE"]

log = logging.getLogger(__name__)

MAX_FUSED_K = 64
# Score given to masked positions: below any real score, above the kernel's "empty slot" (-inf), so
# padding is kept only when a row has fewer than K real behaviours, exactly as `select_topk` does.
INVALID_SCORE = torch.finfo(torch.float32).min
_DISABLED: list[str] = []  # set when the automatic fused path failed once; it is not retried


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when `triton` imports (it is the optional `darec[gpu]` dependency)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install that fails on import
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check(queries: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor | None, valid: torch.Tensor,
           k: int) -> None:
    if queries.dim() != 3 or keys.dim() != 3 or queries.shape[0] != keys.shape[0] \
            or queries.shape[2] != keys.shape[2]:
        raise ConfigError(f"queries (U, C, D) and keys (U, N, D) must agree, got {tuple(queries.shape)} "
                          f"and {tuple(keys.shape)}")
    if valid.shape != keys.shape[:2]:
        raise ConfigError(f"valid must be (U, N) = {tuple(keys.shape[:2])}, got {tuple(valid.shape)}")
    if bias is not None and bias.shape[-1] != keys.shape[1]:
        raise ConfigError(f"bias must end in N = {keys.shape[1]}, got {tuple(bias.shape)}")
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")


def search_topk_torch(queries: torch.Tensor, keys: torch.Tensor, *, bias: torch.Tensor | None,
                      valid: torch.Tensor, k: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch: one batched matmul for all candidates of a user, then `topk`.

    Returns (scores, index), each (U, C, min(k, N)), best first."""
    n = valid.shape[1]
    k = min(k, n)
    width = _topk_width(n, k, queries.device)
    offset = bias.reshape(-1, 1, n) if bias is not None else queries.new_zeros(1, 1, n)  # (U or 1, 1, N)
    if width > n:  # columns scoring -inf, never kept while N >= k: they only let torch's CPU topk take its fast path
        offset = torch.nn.functional.pad(offset, (0, width - n), value=float("-inf"))
        keys = torch.nn.functional.pad(keys, (0, 0, 0, width - n))
        valid = torch.nn.functional.pad(valid, (0, width - n), value=True)
    scores = torch.baddbmm(offset, queries, keys.transpose(1, 2), alpha=scale)      # bias + scale <q, k>: (U, C, width)
    top = scores.masked_fill(~valid.unsqueeze(1), INVALID_SCORE).topk(k, dim=-1)
    return top.values, top.indices


# torch's CPU topk keeps a heap (a partial sort) only when 64 k <= n and runs a much slower full selection
# otherwise; up to this many times N, scoring 64 k columns instead is faster (docs/serving.md).
_CPU_TOPK_PAD_LIMIT = 2.0


def _topk_width(n: int, k: int, device: torch.device) -> int:
    """Columns to score for the top-k of N: 64 k where that takes torch's CPU heap path at a cost below the
    slow selection's, else N."""
    if torch.compiler.is_exporting():  # a traced program keeps N symbolic: no branch on it
        return n
    return 64 * k if device.type == "cpu" and n < 64 * k <= _CPU_TOPK_PAD_LIMIT * n else n


def search_topk(queries: torch.Tensor, keys: torch.Tensor, *, bias: torch.Tensor | None, valid: torch.Tensor,
                k: int, scale: float, fused: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-K history positions per candidate: (scores, index), each (U, C, min(k, N)), best first.

    Args:
        queries: (U, C, D) candidate query embeddings; keys: (U, N, D) history key embeddings.
        bias: (N,) or (U, N) additive score per position, or None.
        valid: (U, N) bool, False at padding.
        fused: True forces the Triton kernel (ConfigError when it cannot run), False the PyTorch
            path, None picks the kernel on CUDA when Triton is installed and k <= MAX_FUSED_K (and
            falls back to PyTorch, with a warning, if the kernel fails to compile or launch).
    Ties between equal scores may be broken differently by the two paths.
    """
    _check(queries, keys, bias, valid, k)
    can_fuse = triton_available() and (queries.is_cuda or _interpreting()) and min(k, keys.shape[1]) <= MAX_FUSED_K
    if fused and not can_fuse:
        raise ConfigError(f"fused search needs Triton, a CUDA tensor (or TRITON_INTERPRET=1) and k <= "
                          f"{MAX_FUSED_K}; got triton={triton_available()}, device={queries.device}, k={k}")
    if fused is None:
        if can_fuse and queries.is_cuda and not _DISABLED:
            try:
                return _search_topk_triton(queries, keys, bias=bias, valid=valid, k=min(k, keys.shape[1]),
                                           scale=scale)
            except Exception as err:  # a compile or launch failure must not take serving down
                _DISABLED.append(repr(err))
                log.warning("fused search failed (%s); using the PyTorch search from now on", err)
        fused = False
    if not fused:
        return search_topk_torch(queries, keys, bias=bias, valid=valid, k=k, scale=scale)
    return _search_topk_triton(queries, keys, bias=bias, valid=valid, k=min(k, keys.shape[1]), scale=scale)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _search_topk_triton(queries: torch.Tensor, keys: torch.Tensor, *, bias: torch.Tensor | None,
                        valid: torch.Tensor, k: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    import triton

    kernel = _kernel()
    u, c, d = queries.shape
    n = keys.shape[1]
    queries = queries.float().contiguous()
    keys = keys.float().contiguous()
    valid8 = valid.to(torch.int8).contiguous()                                        # (U, N)
    if bias is None:
        bias_t, bias_stride = torch.zeros(1, n, device=keys.device), 0
    else:
        bias_t = bias.float().reshape(-1, n).contiguous()                            # (U or 1, N)
        bias_stride = bias_t.stride(0) if bias_t.shape[0] == u and u > 1 else 0
    out_scores = torch.empty(u, c, k, device=keys.device, dtype=torch.float32)
    out_index = torch.empty(u, c, k, device=keys.device, dtype=torch.int64)
    block_c = 16 if c <= 16 else 32
    block_n = 64
    grid = (u, triton.cdiv(c, block_c))
    kernel[grid](
        queries, keys, bias_t, valid8, out_scores, out_index,
        c, n, d, float(scale),
        queries.stride(0), queries.stride(1), keys.stride(0), keys.stride(1), bias_stride, valid8.stride(0),
        out_scores.stride(0), out_scores.stride(1),
        K=k, K_PAD=max(16, _next_pow2(k)), BLOCK_C=block_c, BLOCK_N=block_n,
        BLOCK_D=max(16, _next_pow2(d)), INVALID=INVALID_SCORE)
    return out_scores, out_index


@functools.lru_cache(maxsize=1)
def _kernel() -> Any:
    """Build the Triton kernel on first use, so importing this module never needs Triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def fused_topk_kernel(q_ptr, k_ptr, bias_ptr, valid_ptr, out_s_ptr, out_i_ptr,
                          C, N, D, scale,
                          stride_qu, stride_qc, stride_ku, stride_kn, stride_bu, stride_vu,
                          stride_ou, stride_oc,
                          K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr, INVALID: tl.constexpr):
        user = tl.program_id(0)
        c_offs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)                  # (BC,)
        d_offs = tl.arange(0, BLOCK_D)                                               # (BD,)
        slots = tl.arange(0, K_PAD)                                                  # (KP,)
        q = tl.load(q_ptr + user * stride_qu + c_offs[:, None] * stride_qc + d_offs[None, :],
                    mask=(c_offs[:, None] < C) & (d_offs[None, :] < D), other=0.0)   # (BC, BD)
        # Running top-K per candidate. Slots past K hold +inf so they are never the minimum (never
        # replaced); empty real slots hold -inf so any score, even INVALID, beats them.
        pad = (slots[None, :] >= K) & (c_offs[:, None] >= 0)                         # (BC, KP)
        top_v = tl.where(pad, float("inf"), float("-inf"))                           # (BC, KP)
        top_i = tl.zeros((BLOCK_C, K_PAD), dtype=tl.int64)                           # (BC, KP)
        for start in range(0, N, BLOCK_N):
            n_offs = start + tl.arange(0, BLOCK_N)                                   # (BN,)
            in_seq = n_offs < N
            kt = tl.load(k_ptr + user * stride_ku + n_offs[None, :] * stride_kn + d_offs[:, None],
                         mask=in_seq[None, :] & (d_offs[:, None] < D), other=0.0)    # (BD, BN)
            s = tl.dot(q, kt, input_precision="ieee") * scale                        # (BC, BN)
            s = s + tl.load(bias_ptr + user * stride_bu + n_offs, mask=in_seq, other=0.0)[None, :]
            ok = tl.load(valid_ptr + user * stride_vu + n_offs, mask=in_seq, other=0) != 0
            s = tl.where(ok[None, :], s, INVALID)
            s = tl.where(in_seq[None, :], s, float("-inf"))                          # past N: never kept
            # Insert the tile's best entries one at a time while they beat the current K-th best;
            # the whole merge is skipped when no row of the block can improve (most tiles, late on).
            improves = (tl.max(s, axis=1) > tl.min(top_v, axis=1)).to(tl.int32)     # (BC,)
            if tl.max(improves, axis=0) > 0:
                for _ in tl.static_range(K):
                    best = tl.max(s, axis=1)                                         # (BC,)
                    best_at = tl.argmax(s, axis=1)                                   # (BC,)
                    worst = tl.min(top_v, axis=1)
                    worst_at = tl.argmin(top_v, axis=1)
                    put = (best > worst)[:, None] & (slots[None, :] == worst_at[:, None])  # (BC, KP)
                    top_v = tl.where(put, best[:, None], top_v)
                    top_i = tl.where(put, (start + best_at).to(tl.int64)[:, None], top_i)
                    s = tl.where(tl.arange(0, BLOCK_N)[None, :] == best_at[:, None], float("-inf"), s)
        # Emit best first: repeatedly take the maximum of the K real slots.
        top_v = tl.where(slots[None, :] < K, top_v, float("-inf"))
        out_v = tl.zeros((BLOCK_C, K_PAD), dtype=tl.float32)
        out_i = tl.zeros((BLOCK_C, K_PAD), dtype=tl.int64)
        for j in tl.static_range(K):
            best = tl.max(top_v, axis=1)
            best_at = tl.argmax(top_v, axis=1)
            at = slots[None, :] == best_at[:, None]                                  # (BC, KP)
            chosen = tl.sum(tl.where(at, top_i, 0), axis=1)                          # (BC,)
            out_v = tl.where(slots[None, :] == j, best[:, None], out_v)
            out_i = tl.where(slots[None, :] == j, chosen[:, None], out_i)
            top_v = tl.where(at, float("-inf"), top_v)
        o = user * stride_ou + c_offs[:, None] * stride_oc + slots[None, :]
        store = (c_offs[:, None] < C) & (slots[None, :] < K)
        tl.store(out_s_ptr + o, out_v, mask=store)
        tl.store(out_i_ptr + o, out_i, mask=store)

    return fused_topk_kernel
