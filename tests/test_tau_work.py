"""Work repeated for nothing (issue 18 part 2): bugs that keep every token right but copy, allocate or scan again
what is already there. Greedy equality with AR cannot see them, so these tests COUNT: the cache's allocations
(through a counting array module handed to the cache), the mapped workspace's buffers (by identity), and the
rows the NaN/inf scan reads (by wrapping the scan).

What the counts should be comes from the design, not from the code: the ring and its scratch rows grow by at
least doubling until W (a cache allocates O(log W) times in a whole generation, however long); the workspace's
buffers grow to the largest matrix and are then reused; every mapped row is scanned once, on its first use.
"""
import numpy as np
import pytest

import minispec
from conftest import FIXTURES, random_tensors, tiny_config
from minispec.mistral import weights as weights_mod
from minispec.mistral.cache import RollingCache
from minispec.mistral.model import Model


class CountingXp:
    """numpy, counting the buffers it makes (zeros / empty / *_like) and their bytes."""

    def __init__(self):
        self.allocations, self.bytes = 0, 0

    def __getattr__(self, name):
        f = getattr(np, name)
        if name not in ("zeros", "empty", "zeros_like", "empty_like", "ones", "full"):
            return f

        def counted(*a, **kw):
            out = f(*a, **kw)
            self.allocations += 1
            self.bytes += out.nbytes
            return out
        return counted


def counted_cache(model):
    c, xp = model.config, CountingXp()
    cache = RollingCache(c.n_layers, c.n_kv_heads, c.head_dim, c.cache_slots, xp, model.dtype,
                         ring=c.sliding_window is not None)
    return cache, xp


def tiny(W, seed=0, **kw):
    cfg = tiny_config(sliding_window=W, **kw)
    return Model(cfg, random_tensors(cfg, seed=seed), dtype="float64", device="cpu")


@pytest.mark.parametrize("W", [4, 16])
def test_decoding_many_windows_allocates_the_cache_a_logarithmic_number_of_times(W):
    """300 one-token steps through a ring of W slots (many wraps), then 300 more: the second half allocates
    nothing, the first at most log2(W) + 3 times a pair of buffers (k and v: the empty start, the ring's
    doublings 1, 2, 4, .. W, the scratch's first row)."""
    model = tiny(W, max_seq_len=1024)
    cache, xp = counted_cache(model)
    ids = (np.arange(600) * 7 + 3) % model.config.vocab_size
    for t in ids[:300]:
        model.forward([int(t)], cache)
    first = xp.allocations
    assert first <= 2 * (np.log2(W) + 3), f"{first} allocations for 300 steps with W = {W}"
    for t in ids[300:]:
        model.forward([int(t)], cache)
    assert xp.allocations == first, "a full ring was reallocated while decoding"
    assert cache.capacity == W and cache.pos == 600


def test_speculative_steps_on_a_full_ring_allocate_nothing_whatever_they_commit():
    """Blocks of 1..5 rows against a full ring, committing 0..5 of them (a rejected draft, a partial path, a
    full accept): once the scratch holds the largest block, no commit and no block allocates."""
    model = tiny(6, seed=1, max_seq_len=1024)
    cache, xp = counted_cache(model)
    model.forward(np.arange(20) % model.config.vocab_size, cache)           # ring full, wrapped
    model.forward_block([1, 2, 3, 4, 5], cache)
    cache.commit([0, 1, 2, 3, 4])                                           # the largest block and commit seen
    before = xp.allocations
    rng = np.random.default_rng(0)
    for _ in range(60):
        T = int(rng.integers(1, 6))
        model.forward_block(rng.integers(0, model.config.vocab_size, T).tolist(), cache)
        cache.commit(list(range(int(rng.integers(0, T + 1)))))
    assert xp.allocations == before, f"{xp.allocations - before} allocations in 60 steps on a full ring"


def test_a_decode_step_on_a_full_ring_never_holds_a_copy_of_it():
    """Whatever a step allocates (the activations, the attention scores, any temporary), the peak it adds is
    measured with tracemalloc (NumPy reports its buffers there): on a full ring of 512 slots and 8 layers it stays
    under half of ONE of the ring's two buffers, so no step copies the ring, by reallocation, .copy() or
    concatenation. (A step's own temporaries are per layer: the attention scores of one layer, [H, T, W].)"""
    import tracemalloc
    model = tiny(512, max_seq_len=4096, n_layers=8)
    cache = model.new_cache()
    model.forward(np.arange(530) % model.config.vocab_size, cache)
    model.forward_block([1, 2, 3], cache)
    cache.commit([0, 1])
    tracemalloc.start()
    try:
        peaks = []
        for t in range(12):
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            if t % 3:
                model.forward([t], cache)
            else:
                model.forward_block([t, t + 1, t + 2], cache)
                cache.commit([0, 1, 2][:t % 4])
            peaks.append(tracemalloc.get_traced_memory()[1] - base)
    finally:
        tracemalloc.stop()
    assert max(peaks) < cache._k.nbytes / 2, (max(peaks), cache._k.nbytes)


def test_a_cache_without_a_window_allocates_logarithmically_too():
    model = tiny(None, max_seq_len=256)
    cache, xp = counted_cache(model)
    for t in range(250):
        model.forward([t % model.config.vocab_size], cache)
    assert xp.allocations <= 2 * (np.log2(256) + 3)
    assert xp.bytes <= 4 * 2 * cache._k.nbytes         # doubling: all buffers together < 2x the last, k and v


# ---------------------------------------------------------------------------------------------------------
# The mapped model: buffers reused, rows scanned once
# ---------------------------------------------------------------------------------------------------------
def mapped_model():
    return minispec.load(FIXTURES / "gqa4_hd_bf16", device="cpu", weights="mapped")


def workspace(model):
    return model.output.ws


def test_the_mapped_workspace_keeps_its_buffers_across_matrices_of_different_sizes():
    """The fixture's matrices have four different shapes (wqkv 192x48, wo 48x128, w13 192x48, w2 48x96, output
    256x48): after one one-token step and one 20-token block the buffers are as large as any product needs, and
    20 more forwards of both kinds make no new buffer."""
    model = mapped_model()
    ws = workspace(model)
    cache = model.new_cache()
    model.forward(np.arange(20) * 5 % 256, cache)                # T = 12 chunk products (whole-matrix widening)
    model.forward([3], cache)                                    # the per-row gemv path
    bufs = [id(b) for b in ws.flat]
    for step in range(20):
        if step % 2:
            model.forward_block(np.arange(8) * 3 % 256, cache)
            cache.discard()
        else:
            model.forward([step], cache)
    assert [id(b) for b in ws.flat] == bufs, "a workspace buffer was reallocated for a smaller matrix"


def test_each_mapped_row_is_scanned_for_nan_and_inf_once_whatever_the_number_of_passes(monkeypatch):
    """Count the rows check_rows reads, per tensor: the first forward scans every row of every mapped matrix
    once; 10 more forwards over the same tokens (both product paths) scan none of them again. (The embedding
    table is not a matrix here: its looked-up rows are checked at each lookup, T rows of D, as they are read.)"""
    scanned = {}
    check = weights_mod.Tensor16.check_rows

    def counting(self, src, start):
        scanned[self.name] = scanned.get(self.name, 0) + src.shape[0]
        return check(self, src, start)
    monkeypatch.setattr(weights_mod.Tensor16, "check_rows", counting)
    model = mapped_model()
    ids = [1, 2, 3]
    model.forward(ids)
    mats = {p.name: p.shape[0] for w in [model.output] + [v for lw in model.layers for v in lw.values()
                                                           if hasattr(v, "parts")] for p in w.parts}
    assert len(mats) == 1 + 7 * model.config.n_layers
    for name, rows in mats.items():
        assert scanned.get(name) == rows, (name, scanned.get(name), rows)
    first = dict(scanned)
    for _ in range(5):
        model.forward(ids)                                       # the matrix-matrix path
        model.forward(ids[:1])                                   # the gemv path
    widened = {n: scanned[n] - first.get(n, 0) for n in mats}
    assert all(v == 0 for v in widened.values()), f"rows scanned again: {widened}"
