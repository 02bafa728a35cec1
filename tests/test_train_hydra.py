"""Training Hydra / Hydra++ heads: every hand-derived backward == central finite differences (float64) of a
naive forward written separately here (loops over heads, explicit angles, -inf masks), then the losses and the
training driver (resume == uninterrupted)."""
import numpy as np
import pytest

from minispec import backprop as bp

EPS = 1e-6


def numgrad(f, a):
    """Central finite differences of the scalar f() with respect to every entry of array a (changed in place)."""
    g = np.zeros_like(a)
    for i in np.ndindex(a.shape):
        old = a[i]
        a[i] = old + EPS
        up = f()
        a[i] = old - EPS
        down = f()
        a[i] = old
        g[i] = (up - down) / (2 * EPS)
    return g


def close(a, b, tol=1e-6):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
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
    from minispec.layers import rope_tables
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


def test_decoder_layer_and_final_norm_backward_equals_finite_differences():
    from minispec.layers import rope_tables
    rng = np.random.default_rng(3)
    T, D, H, Hkv, Dh, F, W, eps = 5, 6, 4, 2, 4, 7, 3, 1e-5
    p = random_prefix(D, H, Hkv, Dh, F, rng)
    x, G = rng.standard_normal((T, D)), rng.standard_normal((T, D))
    cos, sin = rope_tables(np.arange(T), Dh, 10000.0, np, np.float64)
    y, saved = bp.decoder_layer_forward(x, p, cos, sin, window_mask(T, W), H, Hkv, eps)
    close(y, ref_decoder(x, p, H, Hkv, eps, W), 1e-12)
    dx, g = bp.decoder_layer_backward(G, p, saved, H, Hkv, eps)
    f = lambda: float((ref_decoder(x, p, H, Hkv, eps, W) * G).sum())            # noqa: E731
    close(dx, numgrad(f, x))
    assert set(g) == set(bp.PREFIX_KEYS)
    for name in bp.PREFIX_KEYS:
        close(g[name], numgrad(f, p[name]))


@pytest.mark.parametrize("shared", [False, True])
def test_hydra_head_backward_equals_finite_differences(shared):
    rng = np.random.default_rng(4)
    T, D, V, width = 4, 3, 7, 9                              # head i = 1: X = concat(h, E(x1), E(x2)), 3·D wide
    X, G = rng.standard_normal((T, width)), rng.standard_normal((T, V))
    res_w, res_b = rng.standard_normal((width, D)), rng.standard_normal(D)
    W2, b2 = 0.5 * rng.standard_normal((D, D)), rng.standard_normal(D)
    blocks = [(0.5 * rng.standard_normal((width, D)), rng.standard_normal(D)), (W2, b2)]
    blocks += [(W2, b2)] if shared else [(0.5 * rng.standard_normal((D, D)), rng.standard_normal(D))]
    proj, proj_b = rng.standard_normal((D, V)), rng.standard_normal(V)
    logits, saved = bp.head_forward(X, res_w, res_b, blocks, proj, proj_b)
    f = lambda: float((ref_head(X, res_w, res_b, blocks, proj, proj_b) * G).sum())   # noqa: E731
    close(logits, ref_head(X, res_w, res_b, blocks, proj, proj_b), 1e-12)
    dX, g, dblocks = bp.head_backward(G, saved, res_w, blocks, proj)
    close(dX, numgrad(f, X))
    for name, a in (("res_w", res_w), ("res_b", res_b), ("proj", proj), ("proj_b", proj_b)):
        close(g[name], numgrad(f, a))
    close(dblocks[0][0], numgrad(f, blocks[0][0]))
    close(dblocks[0][1], numgrad(f, blocks[0][1]))
    if shared:            # one array used twice: its gradient is the sum of both uses
        close(dblocks[1][0] + dblocks[2][0], numgrad(f, W2))
        close(dblocks[1][1] + dblocks[2][1], numgrad(f, b2))
    else:
        for layer in (1, 2):
            close(dblocks[layer][0], numgrad(f, blocks[layer][0]))
            close(dblocks[layer][1], numgrad(f, blocks[layer][1]))


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

    loss, d = bp.label_ce(z, labels)
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
