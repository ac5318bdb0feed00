"""Locality-sensitive hashing searches: ETA (Chen et al., 2021) and SDIM (Cao et al., 2022).

Both hash the attention embeddings [item; category; item features] (query role for the target, key role for the
history) with SimHash: sign(x @ P) for random Gaussian hyperplanes P, whose bit agreement rate
estimates 1 - angle / pi. P is drawn once, when the model is built, from torch's global generator, so
it follows the run's seed like every initial weight (the trainer seeds before building; the `seed`
search option pins it to a private generator instead). It is a registered *buffer*: saved in the state
dict, so evaluation and serving use the trained planes (LongCTR re-draws it every forward pass,
peers.md §1.10).

- ETA: top-K behaviours by Hamming distance to the target's signature (ties: most recent first;
  padding never while K real behaviours exist), then TWIN's target attention over the K.
- SDIM: m hashes of tau bits; a behaviour counts for hash h when its tau-bit bucket equals the target's;
  per hash the matching value tokens are summed and L2-normalised, then averaged over hashes. No top-K.

Notation: B batch, L history length, K kept behaviours, D = 2 d_A hashed width, W packed words,
m hashes, E token width.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from darec.data.batch import Batch
from darec.errors import ConfigError
from darec.models.config import ModelConfig
from darec.models.embedding import RoleEmbeddings
from darec.models.search import DotScore, Interest, attend, register_search
from darec.models.split_search import SplitSearch, search_options

__all__ = ["random_hyperplanes", "sign_bits", "sign_vectors", "pack_bits", "popcount", "hamming", "HammingScore",
           "select_nearest_codes", "nearest_codes_key", "bucket_ids", "bucket_sums", "SDIMSearch", "WORD_BITS"]

WORD_BITS = 32  # bits per packed int64 word: values stay < 2^32, so shifts and the popcount are sign-safe


def random_hyperplanes(dim: int, bits: int, *, seed: int | None = None) -> torch.Tensor:
    """(dim, bits) N(0, 1) hyperplanes: from torch's global generator (so `torch.manual_seed` decides
    them), or from a private generator seeded by `seed` (the global RNG is then left untouched)."""
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return torch.randn(dim, bits, generator=generator)


def sign_bits(x: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """SimHash bits of x (..., D) under planes (D, bits): (..., bits) bool, True where x . p > 0."""
    return (x.detach().to(planes.dtype) @ planes) > 0


def sign_vectors(x: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """SimHash signatures as +-1 floats (..., bits). Hamming distance = (bits - <s_q, s_k>) / 2, so one
    query against many keys is one matrix product: serving's form (packed codes are a cache's form)."""
    return sign_bits(x, planes).to(planes.dtype) * 2 - 1


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """(..., n) bool -> (..., ceil(n / 32)) int64, bit j of word w = bits[..., 32 w + j]."""
    n = bits.shape[-1]
    words = -(-n // WORD_BITS)
    padded = F.pad(bits.to(torch.int64), (0, words * WORD_BITS - n))
    weights = 1 << torch.arange(WORD_BITS, device=bits.device, dtype=torch.int64)        # (32,)
    return (padded.unflatten(-1, (words, WORD_BITS)) * weights).sum(-1)                  # (..., W)


def popcount(words: torch.Tensor) -> torch.Tensor:
    """Set bits of each int64 word holding a value < 2^32 (SWAR bit tricks; torch has no popcount)."""
    x = words - ((words >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return ((x * 0x01010101) & 0xFFFFFFFF) >> 24


def hamming(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Hamming distance between packed codes: query (B, W), keys (B, L, W) -> (B, L) int64."""
    return popcount(torch.bitwise_xor(keys, query.unsqueeze(1))).sum(-1)                # (B, L)


class HammingScore(nn.Module):
    """ETA's GSU score: minus the Hamming distance between SimHash signatures of the attention
    embeddings. Costs O(L D bits) to hash here; in serving the history's codes are cached per item."""

    def __init__(self, *, dim: int, bits: int, seed: int | None) -> None:
        super().__init__()
        self.register_buffer("planes", random_hyperplanes(dim, bits, seed=seed))        # (D, bits)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Packed signatures of x (..., D): (..., W) int64."""
        return pack_bits(sign_bits(x, self.planes))

    def forward(self, emb: RoleEmbeddings, batch: Batch) -> torch.Tensor:
        query = self.codes(emb.semantic("query", batch.target_item, batch.target_category,
                                        batch.target_features))                             # (B, W)
        keys = self.codes(emb.semantic("key", batch.hist_items, batch.hist_categories,
                                       batch.hist_features))                                # (B, L, W)
        return -hamming(query, keys).to(torch.float32)                                       # (B, L)


def nearest_codes_key(scores: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ETA's ranking key for integer-valued scores (minus Hamming): ties to the most recent, padding last.

    One float key: score * (P + 1) - position, with P the largest position, so a score step of 1
    always outweighs any recency difference (exact in float32 up to 2^24 / (P + 1) bits). Broadcasts,
    so training (B, L) and serving (U, C, N) share one rule."""
    span = positions.max().to(torch.float32) + 1.0  # a tensor, not .item(): no host sync, and torch.export traces it
    key = scores.detach().to(torch.float32) * span - positions.to(torch.float32)
    return key.masked_fill(~mask, torch.finfo(torch.float32).min)


def select_nearest_codes(scores: torch.Tensor, batch: Batch, k: int) -> torch.Tensor:
    """ETA's selection: top-K of `nearest_codes_key` (B, K)."""
    key = nearest_codes_key(scores, batch.hist_positions, batch.mask)                  # (B, L)
    return key.topk(min(k, scores.shape[-1]), dim=-1).indices                            # (B, K)


def bucket_ids(bits: torch.Tensor, *, hashes: int) -> torch.Tensor:
    """(..., m * tau) bool -> (..., m) int64 bucket of each tau-bit hash, in [0, 2^tau)."""
    grouped = bits.unflatten(-1, (hashes, -1)).to(torch.int64)                            # (..., m, tau)
    weights = 1 << torch.arange(grouped.shape[-1], device=bits.device, dtype=torch.int64)
    return (grouped * weights).sum(-1)                                                    # (..., m)


def bucket_sums(buckets: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, n_buckets: int,
                max_onehot: int = 1 << 25) -> torch.Tensor:
    """Per hash and bucket, the sum of the real behaviours' values: (B, m, n_buckets, E).

    buckets (B, L, m), values (B, L, E), mask (B, L). This is SDIM's serving form: computed once per
    user, after which any target costs m lookups, independent of L. Built as one-hot (L, m n_buckets)
    transposed times values: n_buckets times the adds of a scatter, but a single matrix product,
    about 14x faster on CPU at L = 10,000. Rows go in chunks that keep the one-hot under `max_onehot`."""
    b, length, m = buckets.shape
    slots = buckets + n_buckets * torch.arange(m, device=buckets.device)                  # (B, L, m)
    masked = values * mask.unsqueeze(-1)                                                  # (B, L, E)
    if torch.compiler.is_exporting():  # a traced program cannot loop over a symbolic B: its caller chunks rows
        return _onehot_sums(slots, masked, m * n_buckets).unflatten(1, (m, n_buckets))
    rows = max(1, max_onehot // max(1, length * m * n_buckets))
    parts = [_onehot_sums(slots[lo:lo + rows], masked[lo:lo + rows], m * n_buckets)
             for lo in range(0, b, rows)]  # a few chunks of rows, each one batched matmul
    return torch.cat(parts).unflatten(1, (m, n_buckets))                                  # (B, m, nb, E)


def _onehot_sums(slots: torch.Tensor, masked: torch.Tensor, cells: int) -> torch.Tensor:
    """slots (b, L, m), masked values (b, L, E) -> per-cell sums (b, cells, E), one batched matmul."""
    onehot = masked.new_zeros(*slots.shape[:2], cells).scatter_(2, slots, 1.0)              # (b, L, cells)
    return onehot.transpose(1, 2) @ masked                                                # (b, cells, E)


class SDIMSearch(nn.Module):
    """SDIM: hash-collision sampling of behaviours, no softmax and no top-K.

    r = mean_h normalize(sum_{i: bucket_h(k_i) = bucket_h(q)} v_i). `Interest.index` is every
    position and `weights` (B, L) are each behaviour's exact share of r, so r = sum_i w_i v_i;
    `scores` is the fraction of hashes in which a behaviour collides with the target."""

    def __init__(self, *, dim: int, hashes: int, bits_per_hash: int, seed: int | None) -> None:
        super().__init__()
        self.hashes = hashes
        self.n_buckets = 1 << bits_per_hash
        self.register_buffer("planes", random_hyperplanes(dim, hashes * bits_per_hash, seed=seed))

    def buckets(self, x: torch.Tensor) -> torch.Tensor:
        """Bucket of x (..., D) under each hash: (..., m) int64."""
        return bucket_ids(sign_bits(x, self.planes), hashes=self.hashes)

    def user_cache(self, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """SDIM's per-user serving cache from keys (U, N, D), values (U, N, E), mask (U, N): the
        normalised sum of values in every (hash, bucket) cell, (U, m nb, E). Built once per history."""
        sums = bucket_sums(self.buckets(keys), values, mask, n_buckets=self.n_buckets)   # (U, m, nb, E)
        return F.normalize(sums, dim=-1, eps=1e-12).flatten(1, 2)                        # (U, m nb, E)

    def lookup(self, cache: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Interests (U, C, E) of candidates with query embeddings (U, C, D): the mean of each
        candidate's m cells, one fused `embedding_bag` that reads m E numbers per candidate, whatever N."""
        u, cells, e = cache.shape
        slots = self.buckets(queries) + self.n_buckets * torch.arange(self.hashes, device=cache.device)  # (U, C, m)
        slots = slots + cells * torch.arange(u, device=cache.device).view(u, 1, 1)      # rows of the flat cache
        r = F.embedding_bag(slots.flatten(0, 1), cache.reshape(u * cells, e), mode="mean")  # (U C, E)
        return r.view(u, -1, e)

    def forward(self, emb: RoleEmbeddings, batch: Batch, *, full: bool = False) -> Interest:
        """Returns r (B, E), index/weights/scores (B, L); r_full (B, E) when `full`."""
        q_bucket = self.buckets(emb.semantic("query", batch.target_item, batch.target_category,
                                             batch.target_features))                     # (B, m)
        k_bucket = self.buckets(emb.semantic("key", batch.hist_items, batch.hist_categories,
                                             batch.hist_features))                       # (B, L, m)
        match = ((k_bucket == q_bucket.unsqueeze(1)) & batch.mask.unsqueeze(-1))         # (B, L, m)
        values = emb.values(batch.hist_items, batch.hist_categories, batch.hist_positions,
                            batch.hist_features)                                         # (B, L, E)
        match = match.to(values.dtype)
        sums = torch.einsum("blm,ble->bme", match, values)                               # (B, m, E)
        norms = sums.norm(dim=-1).clamp_min(1e-12)                                       # (B, m)
        r = (sums / norms.unsqueeze(-1)).mean(1)                                         # (B, E)
        weights = torch.einsum("blm,bm->bl", match, 1.0 / (norms * self.hashes))         # (B, L)
        scores = match.mean(-1).masked_fill(~batch.mask, torch.finfo(values.dtype).min)  # (B, L)
        r_full = attend(emb, batch, DotScore()(emb, batch), None)[0] if full else None
        index = torch.arange(scores.shape[1], device=scores.device).expand_as(scores)   # (B, L)
        return Interest(r=r, r_full=r_full, index=index, weights=weights, scores=scores)


def _check_options(options: dict, *names: str) -> None:
    """`names` must be positive integers; `seed` null or a non-negative integer."""
    for name in names:
        value = options[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"search option {name} must be a positive integer, got {value!r}")
    seed = options["seed"]
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ConfigError(f"search option seed must be null (the run's seed) or an integer >= 0, got {seed!r}")


@register_search("eta")
def _eta(config: ModelConfig) -> nn.Module:
    """ETA: SimHash top-K + dot-product target attention over the K. 32 bits by default: one packed
    word, the value LongCTR's tuning picked most often, and few Hamming ties among ~200 behaviours."""
    options = search_options(config, {"bits": 32, "seed": None})
    _check_options(options, "bits")
    return SplitSearch(scorer=HammingScore(dim=config.semantic_dim, bits=options["bits"], seed=options["seed"]),
                       select=select_nearest_codes, esu=DotScore(), top_k=config.top_k, aux=DotScore())


@register_search("sdim")
def _sdim(config: ModelConfig) -> nn.Module:
    """SDIM with the paper's defaults m = 48 hashes of tau = 3 bits."""
    options = search_options(config, {"hashes": 48, "bits_per_hash": 3, "seed": None})
    _check_options(options, "hashes", "bits_per_hash")
    if options["bits_per_hash"] > 30:
        raise ConfigError(f"bits_per_hash must be <= 30, got {options['bits_per_hash']}")
    return SDIMSearch(dim=config.semantic_dim, hashes=options["hashes"], bits_per_hash=options["bits_per_hash"],
                      seed=options["seed"])
