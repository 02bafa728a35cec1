"""Hydra and Hydra++: the heads, the grounded tree proposal, the prefix layer's cache, greedy losslessness,
lossless sampling (the file formats: tests/test_hydra_files.py).

Every expected value comes from a reference written here (a naive head, a naive prefix layer, the model's own
forward pass, AR decoding), never from minispec.decoders.hydra or hydra_heads.
"""
import numpy as np
import pytest

from conftest import SHIPPED, assert_lossless, random_tensors, rel_err, tiny_config
from test_sampling import SAME, chi2_test
from minispec import generate
from minispec.speculative.loop import Context, Stats
from minispec.decoders.hydra import HydraProposer
from minispec.decoders.hydra_heads import (HydraHeads, head_forward, new_prefix_cache, prefix_advance,
                                          prefix_forward)
from minispec.decoders.registry import make_proposer
from minispec.mistral.model import Model, load
from minispec.speculative.sampling import SamplingParams
from minispec.speculative.tree import Tree

BRANCHING = [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 1, 0], [0, 0, 0, 0]]
ARCHS = ["mlp", "prefix-mlp"]


def tiny_model(W=6, V=24, seed=0, dtype="float64", dim=32):
    cfg = tiny_config(sliding_window=W, vocab_size=V, dim=dim, n_heads=dim // 8)
    return Model(cfg, random_tensors(cfg, seed=seed), dtype=dtype, device="cpu")


def random_heads(model, arch="mlp", num_heads=4, num_layers=2, seed=0, scale=0.3, block_scale=None):
    """Heads with every parameter random (W_1 and the bias included, so a dropped term changes the logits);
    projections near the base output layer, so drafts are right sometimes."""
    heads = HydraHeads.create(model, num_heads, num_layers, arch, seed=seed)
    rng = np.random.default_rng(seed)
    for p in heads.heads:
        for k in p:
            std = 0.1 if k.endswith("b") else (block_scale or scale) if k == "ws" else scale
            p[k] = p[k] + std * rng.standard_normal(p[k].shape)
    if heads.prefix is not None:
        for k in heads.prefix:
            heads.prefix[k] = heads.prefix[k] + 0.3 * rng.standard_normal(heads.prefix[k].shape)
    return heads


def bigram_heads(model, arch, seq, num_heads=4, num_layers=2, corrupt=0.0, seed=0):
    """Heads rigged to be right: head i reads only the LAST embedding of its input, E(x_{t+i+1}), and predicts
    nxt[x], the successor of x in `seq` (the model's own greedy continuation), solved through the embedding
    table (V <= D, so E's rows are independent). A `corrupt` fraction of the table is replaced at random so
    that rejects happen too."""
    heads = HydraHeads.create(model, num_heads, num_layers, arch, seed=seed)
    V, D = model.config.vocab_size, model.config.dim
    rng = np.random.default_rng(seed)
    nxt = rng.integers(0, V, V)
    for a, b in zip(seq[:-1], seq[1:]):
        nxt[a] = b
    bad = rng.random(V) < corrupt
    nxt[bad] = rng.integers(0, V, int(bad.sum()))
    E = np.asarray(model.tok_embeddings, np.float64)                      # [V, D]
    M = np.linalg.pinv(E) @ (20.0 * np.eye(V)[nxt])                       # [D, V]: E[x] @ M ≈ 20·onehot(nxt[x])
    for i, p in enumerate(heads.heads):
        p["res_w"][...] = 0
        p["res_w"][(i + 1) * D:(i + 2) * D] = np.eye(D)                   # y_1 = E(last token on the path)
        p["proj_w"] = M.astype(model.dtype)
    return heads


def oracle_heads(model, arch, ids, n, corrupt=0.0, num_heads=4, seed=0):
    """Heads rigged from the model's own greedy continuation: head i reads h_t (Hydra++: the prefix output at t,
    from the naive reference below) and a least-squares map, fitted on the n positions of this very run,
    sends it to 20·onehot(seq[t+i+2]). Needs D >= the sequence length. A `corrupt` fraction of the targets
    is replaced at random, so that rejects happen too."""
    heads = random_heads(model, arch, num_heads, seed=seed)
    seq = list(ids) + generate(model, list(ids), max_new_tokens=n + num_heads + 2, eos_id=None).tokens
    _, hidden = model.forward(seq, return_hidden=True)
    feats = np.asarray(hidden) if arch == "mlp" else ref_prefix(heads.prefix, model.config, np.asarray(hidden))[0]
    T, D, V = len(seq) - num_heads - 2, model.config.dim, model.config.vocab_size
    rng = np.random.default_rng(seed)
    for i, p in enumerate(heads.heads):
        target = np.array(seq[i + 2:i + 2 + T])
        bad = rng.random(T) < corrupt
        target[bad] = rng.integers(0, V, int(bad.sum()))
        M = np.linalg.lstsq(feats[:T], 20.0 * np.eye(V)[target], rcond=None)[0]          # [D, V]
        p["res_w"][...] = 0
        p["res_w"][:D] = np.eye(D)                                        # y_1 = h_t (W_1, blocks, biases zero)
        for k in ("w1", "b1", "ws", "bs", "res_b", "proj_b"):
            p[k][...] = 0
        p["proj_w"] = M
    return heads


# ---------------------------------------------------------------------------------------------------------
# Independent references
# ---------------------------------------------------------------------------------------------------------
def ref_silu(z):
    return z / (1.0 + np.exp(-z))


def ref_head(p, a):
    """Hydra head written out: res(a) + silu(a W1 + b1), then y + silu(y W + b) per block, then y P + c."""
    y = a @ p["res_w"] + p["res_b"] + ref_silu(a @ p["w1"] + p["b1"])
    for W, b in zip(p["ws"], p["bs"]):
        y = y + ref_silu(y @ W + b)
    return y @ p["proj_w"] + p["proj_b"]


def ref_proposal(heads, E, tree, h, root):
    """Node by node, no batching: node n's token is rank r of head depth-1 on concat(h, E(root), E(path))."""
    tokens = [int(root)]
    for n in range(1, tree.N):
        path, m = [], int(tree.parents[n])
        while m > 0:
            path.append(tokens[m])
            m = int(tree.parents[m])
        a = np.concatenate([h, E[root]] + [E[t] for t in reversed(path)])
        logits = ref_head(heads.heads[int(tree.depths[n]) - 1], a[None])[0]
        tokens.append(int(np.argsort(-logits, kind="stable")[tree.rank[n]]))
    return tokens


def ref_prefix(p, cfg, X):
    """The prefix layer position by position: RMSNorm, q/k/v, RoPE as explicit pair rotations, softmax over the
    window's keys, GQA by index, SwiGLU, final RMSNorm. X [T, D] at positions 0..T-1 -> (out [T, D], keys after
    RoPE [Hkv, T, Dh], values [Hkv, T, Dh])."""
    T, D = X.shape
    H, Hkv, Dh, F, eps = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.hidden_dim, cfg.norm_eps
    rms = lambda x, w: x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w          # noqa: E731
    h = rms(X, p["attention_norm"])
    qkv = h @ p["wqkv"]
    q = qkv[:, :H * Dh].reshape(T, H, Dh)
    k = qkv[:, H * Dh:(H + Hkv) * Dh].reshape(T, Hkv, Dh)
    v = qkv[:, (H + Hkv) * Dh:].reshape(T, Hkv, Dh)

    def rot(x, t):
        out, half = x.copy(), Dh // 2
        for i in range(half):
            ang = t * cfg.rope_theta ** (-2 * i / Dh)
            c, s = np.cos(ang), np.sin(ang)
            out[..., i], out[..., i + half] = x[..., i] * c - x[..., i + half] * s, x[..., i + half] * c + x[..., i] * s
        return out

    q = np.stack([rot(q[t], t) for t in range(T)])
    k = np.stack([rot(k[t], t) for t in range(T)])
    o = np.zeros((T, H, Dh))
    W = cfg.sliding_window or T
    for t in range(T):
        js = [j for j in range(T) if t - W < j <= t]
        for hh in range(H):
            g = hh // (H // Hkv)
            s = np.array([q[t, hh] @ k[j, g] for j in js]) / np.sqrt(Dh)
            w = np.exp(s - s.max())
            o[t, hh] = (w / w.sum()) @ v[js, g]
    x1 = X + o.reshape(T, H * Dh) @ p["wo"]
    gu = rms(x1, p["ffn_norm"]) @ p["w13"]
    x2 = x1 + (ref_silu(gu[:, :F]) * gu[:, F:]) @ p["w2"]
    return rms(x2, p["norm"]), k.transpose(1, 0, 2), v.transpose(1, 0, 2)


# ---------------------------------------------------------------------------------------------------------
# Heads and the grounded proposal
# ---------------------------------------------------------------------------------------------------------
def test_a_head_batch_gives_the_reference_logits_and_an_untrained_head_gives_the_base_lm_head():
    model = tiny_model()
    D = model.config.dim
    heads = random_heads(model, num_heads=3, num_layers=3)
    rng = np.random.default_rng(0)
    for i in range(3):
        a = rng.standard_normal((5, (i + 2) * D))
        out = head_forward(heads.heads[i], a)
        assert out.shape == (5, model.config.vocab_size) and out.dtype == np.float64
        assert rel_err(out, ref_head(heads.heads[i], a)) < 1e-12
        assert rel_err(head_forward(heads.heads[i], a[:1]), ref_head(heads.heads[i], a[:1])) < 1e-12   # gemv path
    logits, hidden = model.forward([1, 2, 3, 4], return_hidden=True)
    fresh = HydraHeads.create(model, 2, 2)
    a = np.concatenate([hidden, model.tok_embeddings[[5, 6, 7, 8]]], axis=1)        # [T, 2D]
    assert rel_err(head_forward(fresh.heads[0], a), logits) < 1e-12


def path_rows(model, h, paths):
    """The rows a head reads for paths [B, i+1] of token ids: concat(h, E(path)), built naively."""
    E = np.asarray(model.tok_embeddings)
    return np.stack([np.concatenate([h] + [E[t] for t in path]) for path in paths])


@pytest.mark.parametrize("tables", [True, False])
def test_a_head_on_its_paths_gives_the_reference_logits_with_block_one_tables_and_without(tables):
    model = tiny_model()
    heads = random_heads(model, "prefix-mlp", num_heads=4, num_layers=3)
    heads.table_budget = heads.table_budget if tables else 0
    assert (heads.tables() is not None) == tables
    rng = np.random.default_rng(3)
    h = rng.standard_normal(model.config.dim)
    for i in range(4):
        paths = rng.integers(0, model.config.vocab_size, (5, i + 1))
        out = heads.path_logits(i, h, paths)
        assert out.shape == (5, model.config.vocab_size)
        assert rel_err(out, ref_head(heads.heads[i], path_rows(model, h, paths))) < 1e-12
        assert rel_err(heads.path_logits(i, h, paths[:1]), ref_head(heads.heads[i], path_rows(model, h, paths[:1]))
                       ) < 1e-12                                                  # one row, the gemv path


def test_block_one_tables_are_remade_when_a_heads_weights_change_in_place_or_are_replaced():
    model = tiny_model()
    heads = random_heads(model, num_heads=3)
    rng = np.random.default_rng(4)
    h, paths = rng.standard_normal(model.config.dim), rng.integers(0, 24, (4, 3))
    heads.path_logits(2, h, paths)                                   # the tables of head 2 are made now
    p = heads.heads[2]
    p["w1"] -= 0.5 * rng.standard_normal(p["w1"].shape)              # trained further in place (an Adam step)
    assert rel_err(heads.path_logits(2, h, paths), ref_head(p, path_rows(model, h, paths))) < 1e-12
    p["res_b"] = p["res_b"] + 1.0                                    # an array replaced
    assert rel_err(heads.path_logits(2, h, paths), ref_head(p, path_rows(model, h, paths))) < 1e-12


def test_restricted_heads_share_the_block_one_tables_and_give_the_kept_columns():
    model = tiny_model()
    heads = random_heads(model, num_heads=3)
    keep = np.array([0, 3, 4, 10, 23])
    small = heads.restricted(keep)
    rng = np.random.default_rng(5)
    h, paths = rng.standard_normal(model.config.dim), rng.integers(0, 24, (4, 2))
    full = ref_head(heads.heads[1], path_rows(model, h, paths))                   # [4, V]
    assert rel_err(small.path_logits(1, h, paths), full[:, keep]) < 1e-12
    assert small.tables() is heads.tables()


def test_block_one_tables_are_made_only_within_their_budget():
    model = tiny_model()                                             # V = 24, D = 32, float64
    heads = random_heads(model, num_heads=4)
    need = 10 * 24 * (2 * 32) * 8                  # K(K+1)/2 = 10 tables of [V, 2D], 8 bytes an entry
    heads.table_budget = need
    assert heads.tables() is not None
    heads.table_budget = need - 1
    assert heads.tables() is None


def test_the_shipped_hydra_heads_draft_through_block_one_tables():
    """On a CPU the registry's decoders look block 1 up: after a short ungated decode, the heads of the CPU tree
    (a chain of 3: heads 0, 1 and 2) have their tables, head 3 none (made only for a head that runs)."""
    model = load(SHIPPED)
    for kind in ("hydra", "hydra++"):
        prop = make_proposer(kind, model, gate=False)
        tables = prop.heads.tables()
        assert tables is not None                    # 4 heads would take 10 x [4096, 384] float32, about 63 MB
        generate(model, [1, 5, 3], decoder=prop, max_new_tokens=8, eos_id=None)
        assert sorted(tables.built) == [0, 1, 2] == list(range(prop.tree.max_depth))


def shared_output_heads(model, arch="mlp", num_heads=3, num_layers=2, seed=0, scale=0.3):
    """Heads sharing the base output layer, every block parameter random (the model's output layer untouched)."""
    heads = HydraHeads.create(model, num_heads, num_layers, arch, seed=seed, shared_output=True)
    rng = np.random.default_rng(seed)
    for p in heads.heads:
        for k in ("res_w", "res_b", "w1", "b1", "ws", "bs"):
            p[k] = p[k] + (0.1 if k.endswith("b") else scale) * rng.standard_normal(p[k].shape)
    return heads


def test_a_head_sharing_the_output_layer_gives_its_blocks_output_times_the_base_output_layer_without_a_bias():
    model = tiny_model()
    D = model.config.dim
    W_out = np.asarray(model.output).copy()                                           # [D, V]
    heads = shared_output_heads(model, num_heads=3, num_layers=3)
    rng = np.random.default_rng(0)
    for i, p in enumerate(heads.heads):
        assert "proj_b" not in p
        a = rng.standard_normal((5, (i + 2) * D))
        y = a @ p["res_w"] + p["res_b"] + ref_silu(a @ p["w1"] + p["b1"])         # the blocks, naively
        for W, b in zip(p["ws"], p["bs"]):
            y = y + ref_silu(y @ W + b)
        assert rel_err(head_forward(p, a), y @ W_out) < 1e-12
        assert rel_err(head_forward(p, a[:1]), y[:1] @ W_out) < 1e-12               # gemv path
    logits, hidden = model.forward([1, 2, 3, 4], return_hidden=True)                 # untrained: the base lm head
    fresh = HydraHeads.create(model, 2, 2, shared_output=True)
    a = np.concatenate([hidden, model.tok_embeddings[[5, 6, 7, 8]]], axis=1)         # [T, 2D]
    assert rel_err(head_forward(fresh.heads[0], a), logits) < 1e-12


def test_heads_sharing_the_output_layer_restricted_to_some_tokens_share_one_slice_of_it():
    model = tiny_model()
    D = model.config.dim
    heads = shared_output_heads(model, num_heads=3)
    keep = np.array([0, 3, 4, 10, 23])
    small = heads.restricted(keep)
    assert small.shared_output and small.V == 5
    assert all(p["proj_w"] is small.heads[0]["proj_w"] and "proj_b" not in p for p in small.heads)
    a = np.random.default_rng(2).standard_normal((3, 4 * D))
    for i in range(3):
        assert rel_err(small.logits(i, a[:, :(i + 2) * D]), heads.logits(i, a[:, :(i + 2) * D])[:, keep]) < 1e-12


def shared_oracle_heads(model, ids, n, corrupt=0.2, num_heads=4, seed=0):
    """Shared-output heads rigged from the model's own greedy continuation (oracle_heads' idea): head i's residual
    projection maps h_t to a y whose product with the base output layer is about 20·onehot(seq[t+i+2]) (least
    squares through pinv(W_out), V <= D), a `corrupt` fraction of the targets random."""
    heads = HydraHeads.create(model, num_heads, 1, "mlp", seed=seed, shared_output=True)
    seq = list(ids) + generate(model, list(ids), max_new_tokens=n + num_heads + 2, eos_id=None).tokens
    _, hidden = model.forward(seq, return_hidden=True)
    T, D, V = len(seq) - num_heads - 2, model.config.dim, model.config.vocab_size
    pinv_out = np.linalg.pinv(np.asarray(model.output, np.float64))                  # [V, D]
    rng = np.random.default_rng(seed)
    for i, p in enumerate(heads.heads):
        target = np.array(seq[i + 2:i + 2 + T])
        bad = rng.random(T) < corrupt
        target[bad] = rng.integers(0, V, int(bad.sum()))
        M = np.linalg.lstsq(np.asarray(hidden)[:T], 20.0 * np.eye(V)[target] @ pinv_out, rcond=None)[0]   # [D, D]
        p["res_w"][...] = 0
        p["res_w"][:D] = M
    return heads


@pytest.mark.parametrize("shape", ["chain", "tree"])
def test_greedy_hydra_with_heads_sharing_the_output_layer_emits_exactly_the_ar_tokens(shape):
    model = tiny_model(W=6, seed=3, dim=64)
    tree = Tree.chain(4) if shape == "chain" else Tree.from_choices(BRANCHING)
    stats = assert_lossless(model, HydraProposer(model, heads=shared_oracle_heads(model, [1, 5, 3], 40), tree=tree))
    steps = stats.accepted[1:-1]
    assert max(steps) == tree.max_depth + 1 and min(steps) < tree.max_depth + 1, "no full accept or no reject"
    assert_lossless(model, HydraProposer(model, heads=shared_output_heads(model, num_heads=4, seed=3), tree=tree))


def sensitive_heads(model, arch, seed=5):
    """Random heads whose every input block and bias moves the top-k (unit-variance pre-activations, biases of
    std 1), so that a shifted input, a wrong parent row or a dropped bias changes the proposal."""
    heads = random_heads(model, arch, num_layers=2, scale=1.0, block_scale=0.1, seed=seed)
    rng, D = np.random.default_rng(seed), model.config.dim
    for i, p in enumerate(heads.heads):
        I = (i + 2) * D
        p["res_w"], p["w1"] = (5 * rng.standard_normal((I, D)) / np.sqrt(I) for _ in range(2))
        p["proj_w"] = 3 * rng.standard_normal(p["proj_w"].shape) / np.sqrt(D)
        p["res_b"], p["b1"], p["proj_b"] = (rng.standard_normal(p[k].shape) for k in ("res_b", "b1", "proj_b"))
    return heads


@pytest.mark.parametrize("tables", [True, False])
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("choices", [BRANCHING, [[0], [0, 0], [0, 0, 0]], [[0], [1], [2], [0, 0], [2, 0], [2, 1]],
                                     [[0], [1], [2], [0, 0], [1, 0], [2, 0], [0, 0, 0], [1, 0, 0], [2, 0, 0]]])
def test_the_grounded_proposal_gives_each_node_rank_r_of_its_head_on_its_own_path(arch, choices, tables):
    model = tiny_model()
    heads = sensitive_heads(model, arch)
    heads.table_budget = heads.table_budget if tables else 0
    tree = Tree.from_choices(choices)
    prop = HydraProposer(model, heads=heads, tree=tree)
    rng = np.random.default_rng(1)
    for trial in range(8):
        stats = Stats()
        h, root = 0.3 * rng.standard_normal(model.config.dim), int(rng.integers(24))
        prop.h = h                                        # Hydra++ reads its prefix output; set it by hand here
        d = prop.propose(Context(root, h, model, model.new_cache(), SamplingParams(), np.random.default_rng(0), stats))
        assert list(d.tokens) == ref_proposal(heads, model.tok_embeddings, tree, h, root)
    assert d.q is None and d.tree is tree
    parents_per_depth = [sum(1 for n in range(tree.N) if tree.depths[n] == dd and tree.children[n])
                         for dd in range(tree.max_depth)]
    assert stats.counters["head_calls"] == tree.max_depth                 # one batched call per depth
    assert stats.counters["head_rows"] == sum(parents_per_depth)
    assert stats.counters["head_time_s"] > 0


def test_before_anything_is_verified_the_draft_is_the_root_alone():
    model = tiny_model()
    prop = HydraProposer(model, heads=random_heads(model), tree=BRANCHING)
    d = prop.propose(Context(4, None, model, model.new_cache(), SamplingParams(), np.random.default_rng(0), Stats()))
    assert d.tree.N == 1 and list(d.tokens) == [4]


# ---------------------------------------------------------------------------------------------------------
# Hydra++'s prefix layer and its cache
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("W", [4, 7])
def test_the_prefix_layer_over_a_sequence_equals_the_naive_reference(W):
    model = tiny_model(W=W)
    heads = random_heads(model, "prefix-mlp")
    X = np.random.default_rng(2).standard_normal((11, model.config.dim))
    ref, _, _ = ref_prefix(heads.prefix, model.config, X)
    out = prefix_forward(heads.prefix, model.config, X)
    assert out.shape == X.shape and out.dtype == np.float64
    assert rel_err(out, ref) < 1e-12


@pytest.mark.parametrize("W", [4, 7])
def test_the_prefix_layer_run_for_its_last_row_alone_gives_the_naive_references_last_row_and_caches_every_row(W):
    """last=True runs attention, Wo and the FFN for the last query only: the output must be the naive
    reference's last row (a shifted row, or the first row's mask, must fail), without a cache and as the catch-up
    (prefix_advance) of rows 6..10 after rows 0..5, whose cache must still hold every row's keys and values."""
    model = tiny_model(W=W)
    heads = random_heads(model, "prefix-mlp")
    X = np.random.default_rng(2).standard_normal((11, model.config.dim))
    ref, k, v = ref_prefix(heads.prefix, model.config, X)                  # [11, D], [Hkv, 11, Dh] x 2
    out = prefix_forward(heads.prefix, model.config, X, last=True)
    assert out.shape == (1, model.config.dim)
    assert rel_err(out[0], ref[-1]) < 1e-12
    cache = new_prefix_cache(model)
    assert rel_err(prefix_advance(heads.prefix, model.config, X[:6], cache), ref[5]) < 1e-12
    h = prefix_advance(heads.prefix, model.config, X[6:], cache)
    assert h.shape == (model.config.dim,) and rel_err(h, ref[10]) < 1e-12
    for pos in range(11 - W, 11):                                         # the ring: the last W positions
        assert rel_err(cache.keys[0, :, pos % W], k[:, pos]) < 1e-12
        assert rel_err(cache.values[0, :, pos % W], v[:, pos]) < 1e-12


@pytest.mark.parametrize("W", [4, 5, 8])
@pytest.mark.parametrize("heads_kind", ["random", "oracle"])
def test_the_prefix_cache_after_n_steps_equals_the_prefix_layer_run_from_scratch_on_the_committed_sequence(W, heads_kind):
    """Random heads (mostly rejects) and heads rigged from the greedy continuation (full accepts of 5 tokens:
    a committed path longer than W = 4). After every step, the h that replaces h_t must be the reference prefix
    output at the last committed position (one node early must fail); at the end the ring holds the reference
    keys and values of the last W committed positions."""
    model = tiny_model(W=W, seed=W, dim=64)
    ids = [1, 5, 3, 7]
    heads = (random_heads(model, "prefix-mlp", seed=W) if heads_kind == "random"
             else oracle_heads(model, "prefix-mlp", ids, 37, corrupt=0.2, seed=W))
    prop = HydraProposer(model, heads=heads, tree=BRANCHING)
    seen, observe = [], prop.observe
    prop.observe = lambda step: (observe(step), seen.append((prop.cache.pos, prop.h.copy(), len(step.path))))
    out = generate(model, ids, decoder=prop, max_new_tokens=37, eos_id=None)
    seq = ids + out.tokens[:-1]                                           # committed: all but the newest token
    _, hidden = model.forward(seq, return_hidden=True)                     # [T, D] base final-norm states
    ref, k, v = ref_prefix(heads.prefix, model.config, np.asarray(hidden))
    T = len(seq)
    assert prop.cache.pos == T
    for pos in range(T - W, T):                                           # the ring holds the last W positions
        assert rel_err(prop.cache.keys[0, :, pos % W], k[:, pos]) < 1e-10
        assert rel_err(prop.cache.values[0, :, pos % W], v[:, pos]) < 1e-10
    for pos, h, _ in seen:
        assert rel_err(h, ref[pos - 1]) < 1e-10                          # what replaces h_t for the heads
    if heads_kind == "oracle":
        assert max(n for _, _, n in seen) == 5 > W or W > 4, "no committed path longer than the window"


def test_the_prefix_cache_never_holds_a_rejected_token():
    """With heads that are often wrong, many drafted tokens are rejected; the prefix cache must still be exactly
    that of the committed sequence (checked above), and it must advance by the committed path only."""
    model = tiny_model(W=5, seed=3)
    heads = random_heads(model, "prefix-mlp", seed=3, scale=1.0)
    prop = HydraProposer(model, heads=heads, tree=BRANCHING)
    positions = []
    orig = prop.observe
    prop.observe = lambda step: (orig(step), positions.append((prop.cache.pos, len(step.path))))
    out = generate(model, [1, 2], decoder=prop, max_new_tokens=20, eos_id=None)
    start = 1
    for pos, n in positions:
        start += n
        assert pos == start
    assert sum(out.stats.drafted) > sum(a - 1 for a in out.stats.accepted), "nothing was rejected"


# ---------------------------------------------------------------------------------------------------------
# Greedy losslessness: tokens and the final cache, across several windows
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("W", [4, 5, 6, 7, 8])
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("shape", ["chain", "tree"])
def test_greedy_hydra_emits_exactly_the_ar_tokens_and_leaves_the_same_cache(W, arch, shape):
    model = tiny_model(W=W, seed=W, dim=64)
    tree = Tree.chain(4) if shape == "chain" else Tree.from_choices(BRANCHING)
    heads = oracle_heads(model, arch, [1, 5, 3], 40, corrupt=0.2, seed=W)
    stats = assert_lossless(model, HydraProposer(model, heads=heads, tree=tree))
    steps = stats.accepted[1:-1]                                          # not the root-only first step, nor the last
    assert max(steps) == tree.max_depth + 1, "no full accept"
    assert min(steps) < tree.max_depth + 1, "no draft token was ever rejected"
    assert any(1 < s < tree.max_depth + 1 for s in steps), "no partial accept"
    assert_lossless(model, HydraProposer(model, heads=random_heads(model, arch, seed=W), tree=tree))


def test_greedy_hydra_is_lossless_in_float32_and_never_exceeds_max_new_tokens_or_passes_eos():
    model = tiny_model(W=5, seed=4, dtype="float32")
    for arch in ARCHS:
        prop = HydraProposer(model, heads=random_heads(model, arch, seed=4), tree=BRANCHING)
        assert_lossless(model, prop, tol=1e-5)
        assert_stops_at_the_limit_and_right_after_eos(model, prop)


def assert_stops_at_the_limit_and_right_after_eos(model, prop):
    """The proposer's output is plain greedy's cut at max_new_tokens, and at the first EOS (included), for several
    limits and several EOS tokens."""
    free = generate(model, [1, 2], max_new_tokens=30, eos_id=None).tokens
    for n in (0, 1, 2, 5, 11):
        assert generate(model, [1, 2], decoder=prop, max_new_tokens=n, eos_id=None).tokens == free[:n]
    for eos in list(dict.fromkeys(free[3:20]))[:4]:
        first = free.index(eos)
        assert generate(model, [1, 2], decoder=prop, max_new_tokens=30, eos_id=eos).tokens == free[:first + 1]


def test_a_one_token_prompt_and_a_prompt_longer_than_the_window_work_for_hydra_plus_plus():
    model = tiny_model(W=4, seed=6)
    prop = HydraProposer(model, heads=random_heads(model, "prefix-mlp", seed=6), tree=BRANCHING)
    assert_lossless(model, prop, ids=(1,), n=15)
    assert_lossless(model, prop, ids=tuple(range(1, 12)), n=15)


# ---------------------------------------------------------------------------------------------------------
# Sampling: lossless tree rejection sampling (χ²) and typical acceptance
# ---------------------------------------------------------------------------------------------------------
def test_tree_rejection_sampling_of_hydra_drafts_reproduces_the_models_own_two_token_joint():
    """10000 draws, seed 0, T = 1, V = 5: one Hydra draft (a branching tree of depth 2 from heads rigged to be
    right often) is verified by one forward, and the rejection rule is applied 10000 times; when only the bonus
    comes out, the second token is drawn from the model itself. The histogram of the first two emitted tokens
    must be p(b | prompt) p(c | prompt, b) from the model's forward pass; "same" means p > 1e-4."""
    from minispec.speculative.acceptance import make_rule
    model = tiny_model(W=6, V=5, seed=11)
    ids = [1, 3, 2]
    ar = generate(model, ids, max_new_tokens=20, eos_id=None).tokens
    prop = HydraProposer(model, heads=bigram_heads(model, "mlp", [2] + ar, num_heads=2, corrupt=0.3, seed=1),
                         tree=[[0], [1], [0, 0], [1, 0]])
    cache = model.new_cache()
    _, hidden = model.forward(ids[:-1], cache, return_hidden=True)
    stats, rng = Stats(), np.random.default_rng(0)
    params = SamplingParams(1.0)
    draft = prop.propose(Context(ids[-1], hidden[-1], model, cache, params, rng, stats))
    assert_two_token_joint(model, ids, cache, draft, make_rule(params, None, rng), "hydra tree rejection")


def assert_two_token_joint(model, ids, cache, draft, rule, label, draws=10000):
    """One draft verified by one forward, `rule` applied `draws` times (V = 5); when only the bonus comes out, the
    second token is drawn from the model. The first two tokens' histogram must be p(b | prompt) p(c | prompt, b)
    (chi-square, "same" is p > SAME), and enough draws must accept a draft token to test the tree at all."""
    logits = model.forward_block(draft.tokens, cache, depths=draft.tree.depths, parents_mask=draft.tree.mask).logits
    rng = np.random.default_rng(1)
    softmax = lambda z: np.exp(z - z.max()) / np.exp(z - z.max()).sum()     # noqa: E731
    after = [softmax(model.forward(ids + [b])[-1]) for b in range(5)]         # p(c | prompt, b)
    counts, accepted = np.zeros((5, 5), dtype=np.int64), 0
    for _ in range(draws):
        path, bonus = rule(draft, logits)
        out = [int(draft.tokens[i]) for i in path[1:]] + [int(bonus)]
        accepted += len(path) > 1
        if len(out) == 1:
            out.append(int(rng.choice(5, p=after[out[0]])))
        counts[out[0], out[1]] += 1
    joint = softmax(model.forward(ids)[-1])[:, None] * np.stack(after)
    stat, df, pval = chi2_test(counts, joint)
    print(f"{label}: chi2={stat:.2f} df={df} p={pval:.3g}, draws accepting a draft={accepted}")
    assert pval > SAME
    assert accepted > draws // 5, "the drafts were almost never accepted: the test would not test the tree"


@pytest.mark.parametrize("arch", ARCHS)
def test_typical_acceptance_runs_with_hydra_accepts_drafts_and_is_greedy_at_temperature_zero(arch):
    model = tiny_model(W=6, seed=8)
    ar = generate(model, [1, 5, 3], max_new_tokens=40, eos_id=None).tokens
    prop = HydraProposer(model, heads=bigram_heads(model, arch, [3] + ar, corrupt=0.2, seed=8), tree=BRANCHING)
    greedy = generate(model, [1, 5, 3], decoder=prop, max_new_tokens=40, acceptance="typical", eos_id=None)
    assert greedy.tokens == ar
    hot = generate(model, [1, 5, 3], decoder=prop, max_new_tokens=40, temperature=0.7, acceptance="typical",
                   seed=1, eos_id=None)
    assert len(hot.tokens) == 40 and hot.stats.tau > 1.2
