"""Rolling-cache invariants on tiny random models (mistral-src test_generate.py style), against the oracle."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from conftest import random_tensors, rel_err, tiny_config
from minispec.mistral.model import Model
from minispec.mistral.oracle import oracle_forward

CONFIGS = {  # name: (config overrides) — MHA, GQA, MQA, head_dim != D/H, short windows, no window
    "mha_w4": dict(n_heads=4, n_kv_heads=4, sliding_window=4),
    "gqa2_w6": dict(n_heads=4, n_kv_heads=2, sliding_window=6),
    "gqa4_hd_w5": dict(dim=24, n_heads=8, n_kv_heads=2, head_dim=6, sliding_window=5),
    "mqa_w3": dict(n_heads=4, n_kv_heads=1, sliding_window=3),
    "nowin": dict(sliding_window=None, max_seq_len=64),
}


def make(name, dtype="float64", seed=0):
    cfg = tiny_config(**CONFIGS[name])
    t = random_tensors(cfg, seed=seed)
    return cfg, t, Model(cfg, t, dtype=dtype, device="cpu")


@pytest.mark.parametrize("name", CONFIGS)
def test_one_shot_forward_equals_the_naive_oracle(name):
    cfg, t, m = make(name)
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, 30)
    assert rel_err(m.forward(ids), oracle_forward(cfg, t, ids)) < 1e-12


@pytest.mark.parametrize("name", CONFIGS)
def test_decoding_token_by_token_over_three_windows_equals_the_oracle(name):
    cfg, t, m = make(name)
    T = 3 * (cfg.sliding_window or 10) + 5
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, T)
    cache = m.new_cache()
    steps = np.concatenate([m.forward(ids[i:i + 1], cache) for i in range(T)])
    assert cache.pos == T
    assert rel_err(steps, oracle_forward(cfg, t, ids)) < 1e-12


@pytest.mark.parametrize("name", CONFIGS)
def test_chunked_prefill_then_decode_equals_one_shot(name):
    cfg, t, m = make(name)
    ids = np.random.default_rng(3).integers(0, cfg.vocab_size, 40)
    cache = m.new_cache()
    parts = [m.forward(ids[:13], cache), m.forward(ids[13:14], cache), m.forward(ids[14:31], cache),
             m.forward(ids[31:], cache)]
    assert rel_err(np.concatenate(parts), m.forward(ids)) < 1e-12


def test_prefill_is_cut_into_chunks_of_at_most_W_and_cache_memory_is_constant():
    cfg, t, m = make("gqa2_w6")
    cache = m.new_cache()
    sizes = []
    orig = m.forward_block
    m.forward_block = lambda ids, c, **kw: sizes.append(len(ids)) or orig(ids, c, **kw)
    m.forward(np.arange(200) % cfg.vocab_size, cache)
    assert max(sizes) <= cfg.sliding_window and sum(sizes) == 200
    nbytes = cache.keys.nbytes
    for i in range(50):
        m.forward([i % cfg.vocab_size], cache)
    assert cache.keys.shape == (cfg.n_layers, cfg.n_kv_heads, cfg.sliding_window, cfg.head_dim)
    assert cache.keys.nbytes == nbytes


def test_new_cache_chunk_sets_the_prefill_chunk_and_chunked_prefill_still_equals_the_oracle():
    cfg, t, m = make("nowin")                            # no window: only chunk= bounds the chunks
    cache = m.new_cache(chunk=7)
    sizes = []
    orig = m.forward_block
    m.forward_block = lambda ids, c, **kw: sizes.append(len(ids)) or orig(ids, c, **kw)
    ids = np.random.default_rng(4).integers(0, cfg.vocab_size, 30)
    logits = m.forward(ids, cache)
    assert sizes == [7, 7, 7, 7, 2] and cache.chunk == 7
    assert rel_err(logits, oracle_forward(cfg, t, ids)) < 1e-12


@pytest.mark.parametrize("name", ["gqa2_w6", "mqa_w3", "nowin"])
def test_a_block_forward_without_commit_leaves_the_cache_bit_identical(name):
    cfg, t, m = make(name, dtype="float32")
    rng = np.random.default_rng(4)
    cache = m.new_cache()
    m.forward(rng.integers(0, cfg.vocab_size, 11), cache)       # the ring has wrapped (11 > W) where there is one
    k, v, pos = cache.keys.copy(), cache.values.copy(), cache.pos
    m.forward_block(rng.integers(0, cfg.vocab_size, 5), cache)  # a chain that would wrap again
    tree = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], bool)
    m.forward_block(rng.integers(0, cfg.vocab_size, 4), cache, depths=[0, 1, 1, 2], parents_mask=tree)
    assert cache.pos == pos
    assert np.array_equal(cache.keys, k) and np.array_equal(cache.values, v)


@pytest.mark.parametrize("name", ["gqa2_w6", "mqa_w3"])
def test_committing_a_tree_path_equals_decoding_that_path_token_by_token(name):
    cfg, t, m = make(name)
    rng = np.random.default_rng(5)
    prompt = rng.integers(0, cfg.vocab_size, 9)
    # tree: 0 is the root; 1 and 2 are its children; 3 is a child of 2; 4 a child of 3
    tokens = rng.integers(0, cfg.vocab_size, 5)
    parent = [-1, 0, 0, 2, 3]
    depth = np.array([0, 1, 1, 2, 3])
    anc = np.eye(5, dtype=bool)
    for i in range(5):
        j = parent[i]
        while j >= 0:
            anc[i, j] = True
            j = parent[j]
    cache = m.new_cache()
    m.forward(prompt, cache)
    out = m.forward_block(tokens, cache, depths=depth, parents_mask=anc)
    path = [0, 2, 3, 4]
    cache.commit(path)

    ref_cache = m.new_cache()
    m.forward(prompt, ref_cache)
    ref = m.forward(tokens[path], ref_cache)
    assert cache.pos == ref_cache.pos == 9 + 4
    assert rel_err(out.logits[path], ref) < 1e-12
    np.testing.assert_allclose(cache.keys, ref_cache.keys, rtol=0, atol=1e-12)
    np.testing.assert_allclose(cache.values, ref_cache.values, rtol=0, atol=1e-12)
    # and the whole sequence equals the oracle
    full = np.concatenate([prompt, tokens[path]])
    assert rel_err(out.logits[path], oracle_forward(cfg, t, full)[9:]) < 1e-12


def test_a_cache_without_window_refuses_to_grow_past_max_seq_len():
    cfg, t, m = make("nowin")
    cache = m.new_cache()
    m.forward(np.zeros(64, int), cache)
    with pytest.raises(ValueError, match="max_seq_len = 64"), pytest.warns(UserWarning, match="reach 65 positions.*64"):
        m.forward([1], cache)


@settings(max_examples=25, deadline=None)
@given(H=st.sampled_from([2, 4]), ratio=st.sampled_from([1, 2]), Dh=st.sampled_from([2, 4, 6]),
       window=st.one_of(st.none(), st.integers(1, 9)), T=st.integers(1, 30), chunk=st.integers(1, 12),
       seed=st.integers(0, 10_000))
def test_property_random_configs_chunked_cache_forward_equals_oracle(H, ratio, Dh, window, T, chunk, seed):
    cfg = tiny_config(dim=8, n_layers=2, head_dim=Dh, hidden_dim=12, n_heads=H, n_kv_heads=H // ratio,
                      vocab_size=17, sliding_window=window, max_seq_len=64)
    t = random_tensors(cfg, seed=seed)
    m = Model(cfg, t, dtype="float64", device="cpu")
    ids = np.random.default_rng(seed).integers(0, 17, T)
    cache = m.new_cache()
    got = np.concatenate([m.forward(ids[s:s + chunk], cache) for s in range(0, T, chunk)])
    assert rel_err(got, oracle_forward(cfg, t, ids)) < 1e-11


@pytest.mark.parametrize("name", ["gqa2_w6", "nowin"])
def test_the_ring_is_allocated_as_it_fills_and_attention_reads_only_the_slots_written(name):
    """capacity: 0 at first, at least doubled by a commit that needs more, never above W; a block never commits
    more than room for itself. Decoding across every growth step still equals the oracle."""
    cfg, t, m = make(name)
    W = cfg.sliding_window or cfg.max_seq_len
    ids = np.random.default_rng(7).integers(0, cfg.vocab_size, W + 3 if cfg.sliding_window else W)
    cache = m.new_cache()
    assert cache.capacity == 0 and cache.keys.shape[2] == 0
    seen, capacities = [], []
    orig = cache.layer_kv
    cache.layer_kv = lambda i, T: seen.append(orig(i, T)[0].shape[1] - T) or orig(i, T)
    steps = []
    for i in range(len(ids)):
        steps.append(m.forward(ids[i:i + 1], cache))
        capacities.append(cache.capacity)
        assert i + 1 <= cache.capacity <= W or cache.capacity == W
    assert rel_err(np.concatenate(steps), oracle_forward(cfg, t, ids)) < 1e-12
    # the ring slots attention read at step i: the capacity after step i - 1 (0 at the first step)
    assert seen[::cfg.n_layers] == [0] + capacities[:-1]
    grown = [c for a, c in zip([0] + capacities, capacities) if c != a]
    assert grown == sorted(grown) and grown[-1] == W and all(b >= 2 * a or b == W for a, b in zip(grown, grown[1:]))
    if name == "nowin":     # 64 positions of room, a 9-token prefill: the buffer holds 9 ring slots, not 64
        cache2 = m.new_cache()
        m.forward(ids[:9], cache2)
        assert cache2.capacity == 9 and cache2.keys.shape[2] == 9


def test_scratch_rows_grow_to_the_longest_block_and_a_draft_chain_growing_by_one_row_reallocates_rarely():
    cfg, t, m = make("nowin")
    cache = m.new_cache()
    assert cache.scratch == 0 and cache.chunk == min(cfg.max_seq_len, 512)
    m.forward(np.arange(5), cache)
    assert cache.scratch == 5
    sizes = []
    for k in range(1, 12):                                  # a chain continued one row at a time (Draft & Verify)
        m.forward_block([3], cache, offset=k - 1)
        sizes.append(cache.scratch)
    cache.discard()
    assert sizes[-1] >= 11 and len(set(sizes)) <= 3        # 5 -> 10 -> 20: two reallocations for 11 rows
    m.forward([7], cache)
    assert cache.scratch == sizes[-1]                        # a short block does not shrink it
