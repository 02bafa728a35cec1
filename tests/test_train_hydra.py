"""Training Hydra / Hydra++ heads: every hand-derived backward == central finite differences (float64) of a
naive forward written separately here (loops over heads, explicit angles, -inf masks), then the losses and the
training driver (resume == uninterrupted)."""
import numpy as np
import pytest

from conftest import FIXTURES, numgrad, tiny_config
from minispec.training import backprop as bp

EPS = 1e-6                       # the step of the sampled central differences below (numgrad uses the same)


def close(a, b, tol=1e-6):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    if a.size == 0:
        return
    err = np.abs(a - b).max() / max(1e-12, np.abs(b).max())
    assert err < tol, f"relative error {err:.2e}"


# ---------------------------------------------------------------------------------------------------------
# Naive references (no minispec code)
# ---------------------------------------------------------------------------------------------------------
def ref_rms(x, w, eps):
    return np.stack([row / np.sqrt(np.sum(row ** 2) / len(row) + eps) * w for row in x])


def ref_rope(x, positions, theta=10000.0):
    """Rotate (x[j], x[j + Dh/2]) by pos · theta^(-2j/Dh), written with explicit angles."""
    out = np.array(x, dtype=np.float64)
    Dh = x.shape[-1]
    for t, pos in enumerate(positions):
        for j in range(Dh // 2):
            a = pos * theta ** (-2 * j / Dh)
            x1, x2 = x[..., t, j], x[..., t, j + Dh // 2]
            out[..., t, j] = x1 * np.cos(a) - x2 * np.sin(a)
            out[..., t, j + Dh // 2] = x2 * np.cos(a) + x1 * np.sin(a)
    return out


def ref_attention(q, k, v, mask):
    """Per query head, per query: softmax over the visible keys only; query head h reads kv head h // R."""
    H, T, Dh = q.shape
    R = H // k.shape[0]
    o = np.zeros_like(q)
    for h in range(H):
        for t in range(T):
            vis = np.flatnonzero(mask[t])
            s = np.array([q[h, t] @ k[h // R, j] for j in vis]) / np.sqrt(Dh)
            e = np.exp(s - s.max())
            o[h, t] = (e / e.sum()) @ v[h // R, vis]
    return o


def ref_silu(z):
    return z / (1 + np.exp(-z))


def ref_swiglu(x, w1, w3, w2):
    return (ref_silu(x @ w1) * (x @ w3)) @ w2


def window_mask(T, W):
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    return (j <= i) & (j > i - W)


def ref_decoder(x, p, H, Hkv, eps, W, theta=10000.0):
    """One Mistral layer with separate q/k/v/w1/w3 matrices, then the final RMSNorm."""
    T, D = x.shape
    Dh = p["wo"].shape[0] // H
    h = ref_rms(x, p["attention_norm"], eps)
    qkv = h @ p["wqkv"]
    q = np.stack([qkv[:, i * Dh:(i + 1) * Dh] for i in range(H)])
    k = np.stack([qkv[:, (H + i) * Dh:(H + i + 1) * Dh] for i in range(Hkv)])
    v = np.stack([qkv[:, (H + Hkv + i) * Dh:(H + Hkv + i + 1) * Dh] for i in range(Hkv)])
    pos = np.arange(T)
    o = ref_attention(ref_rope(q, pos, theta), ref_rope(k, pos, theta), v, window_mask(T, W))
    x2 = x + np.concatenate(list(o), axis=1) @ p["wo"]
    F = p["w2"].shape[0]
    x3 = x2 + ref_swiglu(ref_rms(x2, p["ffn_norm"], eps), p["w13"][:, :F], p["w13"][:, F:], p["w2"])
    return ref_rms(x3, p["norm"], eps)


def ref_head(X, res_w, res_b, blocks, proj, proj_b):
    x = X @ res_w + res_b + ref_silu(X @ blocks[0][0] + blocks[0][1])
    for W, b in blocks[1:]:
        x = x + ref_silu(x @ W + b)
    return x @ proj + proj_b


def ref_logsoftmax(z):
    return z - z.max(axis=1, keepdims=True) - np.log(np.exp(z - z.max(axis=1, keepdims=True)).sum(axis=1, keepdims=True))


# ---------------------------------------------------------------------------------------------------------
# Each backward against finite differences
# ---------------------------------------------------------------------------------------------------------
def test_rms_norm_backward_equals_finite_differences():
    rng = np.random.default_rng(0)
    x, w, G = rng.standard_normal((3, 5)), 1 + 0.3 * rng.standard_normal(5), rng.standard_normal((3, 5))
    f = lambda: float((ref_rms(x, w, 1e-5) * G).sum())                          # noqa: E731
    dx, dw = bp.rms_norm_backward(G, x, w, 1e-5)
    close(dx, numgrad(f, x))
    close(dw, numgrad(f, w))


def test_rope_backward_equals_finite_differences():
    from minispec.mistral.layers import rope_tables
    rng = np.random.default_rng(1)
    x, G = rng.standard_normal((2, 4, 6)), rng.standard_normal((2, 4, 6))
    pos = np.array([0, 3, 7, 130])
    cos, sin = rope_tables(pos, 6, 10000.0, np, np.float64)
    f = lambda: float((ref_rope(x, pos) * G).sum())                             # noqa: E731
    close(bp.rope_backward(G, cos, sin), numgrad(f, x))


@pytest.mark.parametrize("H,Hkv", [(4, 2), (4, 1), (2, 2)])
def test_gqa_attention_backward_under_a_sliding_window_equals_finite_differences(H, Hkv):
    rng = np.random.default_rng(H + Hkv)
    T, Dh, W = 6, 4, 3
    q, k, v = rng.standard_normal((H, T, Dh)), rng.standard_normal((Hkv, T, Dh)), rng.standard_normal((Hkv, T, Dh))
    mask = window_mask(T, W)
    G = rng.standard_normal((H, T, Dh))
    o, p = bp.attention_forward(q, k, v, mask)
    close(o, ref_attention(q, k, v, mask), 1e-12)
    assert np.all(p[..., ~mask] == 0)                                            # hidden keys get no weight
    f = lambda: float((ref_attention(q, k, v, mask) * G).sum())                 # noqa: E731
    dq, dk, dv = bp.attention_backward(G, q, k, v, p)
    close(dq, numgrad(f, q))
    close(dk, numgrad(f, k))
    close(dv, numgrad(f, v))


def test_swiglu_backward_equals_finite_differences():
    rng = np.random.default_rng(2)
    T, D, F = 3, 4, 5
    x, w13, w2, G = (rng.standard_normal(s) for s in ((T, D), (D, 2 * F), (F, D), (T, D)))
    y, saved = bp.swiglu_forward(x, w13, w2)
    f = lambda: float((ref_swiglu(x, w13[:, :F], w13[:, F:], w2) * G).sum())    # noqa: E731
    close(y, ref_swiglu(x, w13[:, :F], w13[:, F:], w2), 1e-12)
    dx, dw13, dw2 = bp.swiglu_backward(G, x, w13, w2, saved)
    close(dx, numgrad(f, x))
    close(dw13, numgrad(f, w13))
    close(dw2, numgrad(f, w2))


def random_prefix(D, H, Hkv, Dh, F, rng, scale=0.4):
    return {"attention_norm": 1 + 0.2 * rng.standard_normal(D), "wqkv": scale * rng.standard_normal((D, (H + 2 * Hkv) * Dh)),
            "wo": scale * rng.standard_normal((H * Dh, D)), "ffn_norm": 1 + 0.2 * rng.standard_normal(D),
            "w13": scale * rng.standard_normal((D, 2 * F)), "w2": scale * rng.standard_normal((F, D)),
            "norm": 1 + 0.2 * rng.standard_normal(D)}


def test_prefix_layer_backward_equals_finite_differences():
    from minispec.decoders.hydra_heads import prefix_forward
    rng = np.random.default_rng(3)
    T, D, H, Hkv, Dh, F, W, eps = 5, 6, 4, 2, 4, 7, 3, 1e-5
    cfg = tiny_config(dim=D, n_heads=H, n_kv_heads=Hkv, head_dim=Dh, hidden_dim=F, sliding_window=W, norm_eps=eps)
    p = random_prefix(D, H, Hkv, Dh, F, rng)
    x, G = rng.standard_normal((T, D)), rng.standard_normal((T, D))
    y, saved = prefix_forward(p, cfg, x, keep=True)
    close(y, ref_decoder(x, p, H, Hkv, eps, W), 1e-12)
    dx, g = bp.prefix_backward(G, p, saved, H, Hkv, eps)
    f = lambda: float((ref_decoder(x, p, H, Hkv, eps, W) * G).sum())            # noqa: E731
    close(dx, numgrad(f, x))
    assert set(g) == set(bp.PREFIX_KEYS)
    for name in bp.PREFIX_KEYS:
        close(g[name], numgrad(f, p[name]))


def random_head(width, D, V, L, rng):
    return {"res_w": rng.standard_normal((width, D)), "res_b": rng.standard_normal(D),
            "w1": 0.5 * rng.standard_normal((width, D)), "b1": rng.standard_normal(D),
            "ws": 0.5 * rng.standard_normal((L - 1, D, D)), "bs": rng.standard_normal((L - 1, D)),
            "proj_w": rng.standard_normal((D, V)), "proj_b": rng.standard_normal(V)}


@pytest.mark.parametrize("L", [1, 3])
def test_hydra_head_backward_equals_finite_differences(L):
    from minispec.decoders.hydra_heads import head_forward
    rng = np.random.default_rng(4 + L)
    T, D, V, width = 4, 3, 7, 9                              # head i = 1: a = concat(h, E(x1), E(x2)), 3·D wide
    p = random_head(width, D, V, L, rng)
    a, G = rng.standard_normal((T, width)), rng.standard_normal((T, V))
    blocks = lambda: [(p["w1"], p["b1"])] + list(zip(p["ws"], p["bs"]))         # noqa: E731
    ref = lambda: ref_head(a, p["res_w"], p["res_b"], blocks(), p["proj_w"], p["proj_b"])   # noqa: E731
    logits, saved = head_forward(p, a, keep=True)
    close(logits, ref(), 1e-12)
    da, g = bp.hydra_head_backward(G, p, saved)
    f = lambda: float((ref() * G).sum())                                         # noqa: E731
    close(da, numgrad(f, a))
    assert set(g) == set(p)
    for name in p:
        close(g[name], numgrad(f, p[name]))


@pytest.mark.parametrize("L", [1, 2])
def test_a_head_sharing_the_frozen_output_layer_gets_finite_difference_gradients_and_none_for_the_projection(L):
    from minispec.decoders.hydra_heads import head_forward
    rng = np.random.default_rng(8 + L)
    T, D, V, width = 4, 3, 7, 9
    p = random_head(width, D, V, L, rng)
    del p["proj_b"]                                          # shared: the base output layer, no bias
    W_out = p["proj_w"]
    a, G = rng.standard_normal((T, width)), rng.standard_normal((T, V))
    blocks = lambda: [(p["w1"], p["b1"])] + list(zip(p["ws"], p["bs"]))         # noqa: E731
    ref = lambda: ref_head(a, p["res_w"], p["res_b"], blocks(), W_out, 0.0)     # noqa: E731
    logits, saved = head_forward(p, a, keep=True)
    close(logits, ref(), 1e-12)
    da, g = bp.hydra_head_backward(G, p, saved)
    f = lambda: float((ref() * G).sum())                                         # noqa: E731
    close(da, numgrad(f, a))
    assert set(g) == set(p) - {"proj_w"}
    for name in g:
        close(g[name], numgrad(f, p[name]))


def test_label_and_teacher_cross_entropies_and_their_gradients():
    rng = np.random.default_rng(5)
    B, V = 5, 6
    z, tz = rng.standard_normal((B, V)), rng.standard_normal((B, V))
    labels = np.array([2, -1, 0, 5, -1])
    valid = labels >= 0

    def ref_label():
        lq = ref_logsoftmax(z)
        return -np.mean([lq[b, labels[b]] for b in range(B) if valid[b]])

    def ref_teacher():
        lq, p = ref_logsoftmax(z), np.exp(ref_logsoftmax(tz))
        return -np.mean([p[b] @ lq[b] for b in range(B) if valid[b]])

    loss, d = bp.cross_entropy(z, labels)
    assert abs(float(loss) - ref_label()) < 1e-12
    close(d, numgrad(ref_label, z))
    loss, d = bp.teacher_ce(z, tz, valid)
    assert abs(float(loss) - ref_teacher()) < 1e-12
    close(d, numgrad(ref_teacher, z))
    # the teacher loss of a head that already matches the teacher is the teacher's entropy, with zero gradient
    loss, d = bp.teacher_ce(tz, tz, valid)
    pt = np.exp(ref_logsoftmax(tz))
    assert abs(float(loss) + np.mean((pt * np.log(pt)).sum(axis=1)[valid])) < 1e-12
    assert np.abs(d).max() < 1e-15


# ---------------------------------------------------------------------------------------------------------
# The whole loss of a batch (Hydra and Hydra++) against finite differences of a naive loss
# ---------------------------------------------------------------------------------------------------------
def tiny_setup(kind, num_heads=2, num_layers=2, seed=0, shared_output=False):
    from conftest import random_tensors
    from minispec.decoders.hydra_heads import HydraHeads, KIND_ARCH
    from minispec.mistral.model import Model
    from minispec.training.train_hydra import prepare
    cfg = tiny_config(dim=8, head_dim=4, n_heads=2, n_kv_heads=1, hidden_dim=12, vocab_size=11, sliding_window=4)
    model = Model(cfg, random_tensors(cfg, seed=seed), dtype="float64", device="cpu")
    rng = np.random.default_rng(seed + 1)
    seqs = [(rng.integers(0, 11, n).tolist(), f) for n, f in ((9, 2), (7, 0), (10, 3))]
    data = prepare(model, seqs, num_heads)
    heads = HydraHeads.create(model, num_heads, num_layers, KIND_ARCH[kind], seed=seed, shared_output=shared_output)
    for p in heads.heads + ([heads.prefix] if heads.prefix is not None else []):     # away from the init's zeros
        for k, v in p.items():
            if v is not model.output:                                  # (a shared output layer is the model's)
                v += 0.3 * rng.standard_normal(v.shape)
    return model, heads, data, seqs


def ref_batch_loss(model, heads, seqs, rows_of_seq, lm_w, t_w):
    """Σ_i [lm_w · mean CE to x_{t+i+2} + t_w · mean CE to softmax(h_{t+i+1} W_out)] over the rows that have a
    label for head i, from scratch: base hidden states by the model's own uncached forward, the prefix layer by
    ref_decoder, the heads by ref_head, inputs concat(u_t, E(x_{t+1}) .. E(x_{t+i+1}))."""
    c, E = model.config, model.tok_embeddings
    per_head = [[[], []] for _ in heads.heads]
    shared = heads.shared_output                    # then every head's projection is the model's, with no bias
    for j, (ids, first) in enumerate(seqs):
        _, h = model.forward(ids, return_hidden=True)
        u = h if heads.prefix is None else ref_decoder(h, heads.prefix, c.n_heads, c.n_kv_heads, c.norm_eps,
                                                       c.sliding_window)
        for t in rows_of_seq[j]:
            for i, p in enumerate(heads.heads):
                if t + i + 2 >= len(ids) or t + i + 2 < first:
                    continue
                a = np.concatenate([u[t]] + [E[ids[t + m]] for m in range(1, i + 2)])[None]
                blocks = [(p["w1"], p["b1"])] + list(zip(p["ws"], p["bs"]))
                proj, proj_b = (model.output, 0.0) if shared else (p["proj_w"], p["proj_b"])
                lq = ref_logsoftmax(ref_head(a, p["res_w"], p["res_b"], blocks, proj, proj_b))[0]
                pt = np.exp(ref_logsoftmax((h[t + i + 1] @ model.output)[None]))[0]
                per_head[i][0].append(-lq[ids[t + i + 2]])
                per_head[i][1].append(-(pt @ lq))
    return sum(lm_w * np.mean(a) + t_w * np.mean(b) for a, b in per_head if a)


@pytest.mark.parametrize("kind,lm_w,t_w,shared", [("hydra", 1.0, 0.0, False), ("hydra", 0.7, 0.4, False),
                                                  ("hydra++", 0.0, 1.0, False), ("hydra++", 1.0, 0.5, False),
                                                  ("hydra", 1.0, 0.0, True), ("hydra++", 0.6, 0.5, True)])
def test_batch_loss_gradients_equal_finite_differences_of_a_naive_loss(kind, lm_w, t_w, shared):
    from minispec.training.train_hydra import HydraTrainConfig, batch_loss, param_dict
    model, heads, data, seqs = tiny_setup(kind, shared_output=shared)
    cfg = HydraTrainConfig(lm_weight=lm_w, teacher_weight=t_w)
    starts = [s for s, _ in data["seqs"]]
    if kind == "hydra":                       # positions from two sequences, one row without any label
        rows_of_seq = [[0, 3, 6], [], [1, 9]]
        rows = np.array([starts[j] + t for j, r in enumerate(rows_of_seq) for t in r])
        run = lambda: batch_loss(heads, data, rows, None, cfg)                   # noqa: E731
    else:                                     # whole sequences through the prefix layer
        rows_of_seq = [list(range(len(s))) if j != 1 else [] for j, (s, _) in enumerate(seqs)]
        run = lambda: batch_loss(heads, data, None, [data["seqs"][0], data["seqs"][2]], cfg)   # noqa: E731
    loss, per_head, grads = run()
    ref = lambda: ref_batch_loss(model, heads, seqs, rows_of_seq, lm_w, t_w)    # noqa: E731
    assert abs(loss - ref()) < 1e-10
    params = param_dict(heads)
    assert set(grads) == set(params)
    assert not any(p is model.output for p in params.values()) if shared else "head.0.proj_w" in params
    rng = np.random.default_rng(7)
    for name, p in params.items():            # 6 random entries of every trained array
        entries = [tuple(rng.integers(0, n) for n in p.shape) for _ in range(6)]
        g = numgrad(ref, p, EPS, entries)
        for idx in entries:
            num = g[idx]
            assert abs(grads[name][idx] - num) < 1e-6 * max(1.0, abs(num)), (name, idx, grads[name][idx], num)


@pytest.mark.parametrize("where", ["mid-epoch", "epoch end"])
@pytest.mark.parametrize("kind", ["hydra", "hydra++"])
def test_training_resumed_from_a_checkpoint_equals_uninterrupted_training(kind, where, tmp_path):
    from minispec.training.train_hydra import HydraTrainConfig, param_dict, train
    cfg = HydraTrainConfig(epochs=3, batch=4 if kind == "hydra" else 9, lr=1e-2, teacher_weight=0.5, seed=3)
    _, heads_a, data, _ = tiny_setup(kind)
    hist_a = train(heads_a, data, cfg, progress=False)
    _, heads_b, data, _ = tiny_setup(kind)
    ck = tmp_path / "ck"
    stop = len(hist_a) // 2 + 1 if where == "mid-epoch" else len(hist_a) // 3    # 3 epochs
    hist_b = train(heads_b, data, cfg, checkpoint=ck, checkpoint_every=1000, stop_after=stop, progress=False)
    assert len(hist_b) == stop and (tmp_path / "ck.json").exists() and (tmp_path / "ck.safetensors").exists()
    _, heads_r, data, _ = tiny_setup(kind)    # resumed with the same limit: no step, the checkpoint rewritten as it was
    assert train(heads_r, data, cfg, checkpoint=ck, checkpoint_every=1000, stop_after=stop, progress=False) == []
    _, heads_c, data, _ = tiny_setup(kind)    # a fresh process: untrained heads, state from the files only
    hist_c = train(heads_c, data, cfg, checkpoint=ck, progress=False)
    assert hist_b + hist_c == hist_a
    pa, pc = param_dict(heads_a), param_dict(heads_c)
    for name in pa:
        assert np.array_equal(pa[name], pc[name]), name
    assert hist_a[-1] < hist_a[0]             # and it learns


def test_training_heads_that_share_the_output_layer_leaves_the_models_output_layer_as_it_was():
    from minispec.training.train_hydra import HydraTrainConfig, train
    model, heads, data, _ = tiny_setup("hydra", shared_output=True)
    before = np.array(model.output)
    hist = train(heads, data, HydraTrainConfig(epochs=3, batch=4, lr=1e-2, seed=3), progress=False)
    assert hist[-1] < hist[0]                                   # it learns
    assert np.array_equal(model.output, before)
    assert all(p["proj_w"] is model.output for p in heads.heads)


def test_the_fused_head_loss_is_the_weighted_sum_of_the_two_cross_entropies():
    rng = np.random.default_rng(6)
    z, tz = rng.standard_normal((5, 6)), rng.standard_normal((5, 6))
    labels = np.array([2, -1, 0, 5, 1])
    lm, tl, d = bp.head_ce(z, labels, tz, 0.3, 0.8)
    l1, d1 = bp.cross_entropy(z, labels)
    l2, d2 = bp.teacher_ce(z, tz, labels >= 0)
    assert abs(lm - float(l1)) < 1e-12 and abs(tl - float(l2)) < 1e-12
    close(d, 0.3 * d1 + 0.8 * d2, 1e-12)
    lm, tl, d = bp.head_ce(z, labels, None, 1.0, 0.0)
    assert tl == 0.0
    close(d, d1, 1e-12)


# ---------------------------------------------------------------------------------------------------------
# Held-out measures and the CLI end to end
# ---------------------------------------------------------------------------------------------------------
def test_teacher_forced_tau_counts_the_right_prefix_of_each_path_by_hand():
    from minispec.training.train_hydra import rank_accuracies, teacher_forced_tau
    from minispec.speculative.tree import Tree
    # ranks[d, t]: where the label of head d sits in its top-k at position t (k = 3: not in the top-3; -1: none)
    ranks = np.array([[0, 1, 0, 3, 0],
                      [0, 0, 2, 0, -1]])
    tree = Tree.from_choices([[0], [1], [0, 0], [0, 1], [1, 0]])
    # t=0: [0], [0,0] right -> 1 + 2; t=1: [1], [1,0] -> 1 + 2; t=2: [0] only -> 1 + 1; t=3: none -> 1;
    # t=4 left out (head 1 has no label there)
    assert teacher_forced_tau(tree, ranks) == pytest.approx((3 + 3 + 2 + 1) / 4)
    assert teacher_forced_tau(Tree.chain(1), ranks) == pytest.approx(1 + 3 / 5)
    acc = rank_accuracies(ranks, k=3)
    assert np.allclose(acc, [[3 / 5, 1 / 5, 0], [3 / 4, 0, 1 / 4]])


@pytest.mark.parametrize("kind", ["hydra", "hydra++"])
def test_cli_train_heads_writes_hydra_heads_that_generate_finds(kind, tmp_path, cli_model):
    import json
    from conftest import code_corpus
    from minispec.cli import main
    from minispec.decoders.registry import generate
    from minispec.mistral.model import load
    folder, cfg, _ = cli_model
    text = code_corpus(tmp_path / "corpus.txt")
    cache = tmp_path / "seqs.npz"
    args = ["train-heads", "--kind", kind, "--model", str(folder), "--device", "cpu", "--text", str(text),
            "--tokens", "600", "--heads", "2", "--budget", "4", "--top-k", "3", "--batch", "32", "--seq-len", "64",
            "--data-cache", str(cache), "--hydra-layers", "2"]
    main(args)
    assert cache.exists()                              # the sequences were cached (no pickle: np.load refuses)
    conf = json.loads((folder / kind / "hydra_config.json").read_text())
    assert conf["kind"] == kind and conf["num_layers"] == 2 and len(conf["tree"]) == 4
    assert np.asarray(conf["accuracies"]).shape == (2, 3) and conf["training"]["train_tokens"] > 0
    assert (conf["training"]["lm_weight"], conf["training"]["teacher_weight"]) == ((1.0, 0.0) if kind == "hydra"
                                                                                   else (0.0, 1.0))
    main(args)                                         # again, from the cache: the same sequences, the same heads
    assert json.loads((folder / kind / "hydra_config.json").read_text())["accuracies"] == conf["accuracies"]
    model = load(folder, device="cpu")
    assert len(generate(model, [1, 5], decoder=kind, max_new_tokens=6, eos_id=None).tokens) == 6


def test_train_hydra_without_its_corpus_file_is_refused_naming_it_before_the_model_loads(tmp_path, monkeypatch):
    import minispec.mistral.model
    from minispec.errors import MissingFileError
    from minispec.training.train_hydra import train_hydra
    monkeypatch.setattr(minispec.mistral.model, "load_tensors", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(MissingFileError, match="no such corpus file"):
        train_hydra(FIXTURES / "gqa4_hd", text=tmp_path / "none.txt", progress=False)
