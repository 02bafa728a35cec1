"""Hand-derived backward passes for training Hydra and Hydra++ heads (arXiv 2402.05109) in NumPy/CuPy.

Every forward here keeps what its backward needs (`keep`), and every backward is the chain rule written out,
checked against central finite differences in float64 by tests/test_train_hydra.py. Reading order follows the
data: RMSNorm -> RoPE -> GQA attention under a mask -> SwiGLU -> one Mistral decoder layer (+ the final RMSNorm:
the Hydra++ prefix layer) -> a Hydra head's residual blocks and its vocabulary projection with a bias -> the two
losses (cross-entropy to labels, cross-entropy to the base model's softmax = the teacher loss).

Shapes: T rows (positions), D dim, H / Hkv heads, R = H / Hkv, Dh head dim, F ffn dim, V vocab, S keys.
The forward arithmetic is minispec.layers' (rms_norm, apply_rope, attention, swiglu): the functions below
recompute the same expressions while keeping intermediates, they do not introduce a second definition.
"""
import numpy as np

from .backend import array_module
from .layers import apply_rope, linear, rms_norm, silu, softmax
from .train_heads import silu_grad          # d silu(z)/dz, shared with Medusa's backward


# ---------------------------------------------------------------------------------------------------------
# RMSNorm: y = x · r · w,  r = (mean(x²) + eps)^(-1/2)
# ---------------------------------------------------------------------------------------------------------
def rms_norm_backward(dy, x, weight, eps):
    """Backward of layers.rms_norm. With g = dy ⊙ w (per row):

        dx = r g - x r³ mean(g ⊙ x),      dw = sum_rows(dy ⊙ x r)

    dy, x [T, D], weight [D] -> (dx [T, D], dweight [D])."""
    xp = array_module(x)
    r = 1 / xp.sqrt((x * x).mean(axis=-1, keepdims=True) + x.dtype.type(eps))   # [T, 1]
    g = dy * weight                                                             # [T, D]
    dx = r * g - x * (r ** 3) * (g * x).mean(axis=-1, keepdims=True)            # [T, D]
    return dx, (dy * x * r).sum(axis=0)                                         # [T, D], [D]


# ---------------------------------------------------------------------------------------------------------
# RoPE (rotate-half): a rotation per (i, i + Dh/2) pair, so its backward is the rotation by minus the angle
# ---------------------------------------------------------------------------------------------------------
def rope_backward(dy, cos, sin):
    """Backward of layers.apply_rope: y = R(θ) x with R orthogonal, so dx = R(θ)ᵀ dy = R(-θ) dy.

    dy [*, T, Dh], cos/sin [T, Dh/2] -> dx [*, T, Dh]."""
    return apply_rope(dy, cos, -sin)


# ---------------------------------------------------------------------------------------------------------
# GQA attention under a boolean mask (layers.attention), keeping the probabilities
# ---------------------------------------------------------------------------------------------------------
def attention_forward(q, k, v, mask):
    """layers.attention, also returning the softmax probabilities p [Hkv, R, T, S] for the backward.

    q [H, T, Dh], k/v [Hkv, S, Dh], mask bool [T, S] (every row must see at least one key) -> (o [H, T, Dh], p)."""
    xp = array_module(q)
    H, T, Dh = q.shape
    Hkv, S, _ = k.shape
    scores = (q.reshape(Hkv, H // Hkv * T, Dh) @ k.transpose(0, 2, 1))        # [Hkv, R·T, S]
    scores = scores.reshape(Hkv, H // Hkv, T, S) * q.dtype.type(1.0 / np.sqrt(Dh))
    p = softmax(xp.where(mask, scores, q.dtype.type(-np.inf)))                  # [Hkv, R, T, S]
    o = (p.reshape(Hkv, H // Hkv * T, S) @ v).reshape(H, T, Dh)                 # [H, T, Dh]
    return o, p


def attention_backward(do, q, k, v, p):
    """Backward of masked softmax attention o = P V, P = softmax(s q kᵀ) over the visible keys (s = Dh^-1/2):

        dP = do Vᵀ,   dS = P ⊙ (dP - rowsum(dP ⊙ P)),   dq = s dS K,   dk = s dSᵀ q,   dv = Pᵀ do

    with dk, dv summed over the R query heads that share a kv head (GQA). Masked entries have P = 0, so dS = 0
    there and no gradient leaks through hidden keys.  do, q [H, T, Dh]; k, v [Hkv, S, Dh]; p [Hkv, R, T, S]
    -> (dq [H, T, Dh], dk [Hkv, S, Dh], dv [Hkv, S, Dh])."""
    H, T, Dh = q.shape
    Hkv, S, _ = k.shape
    R = H // Hkv
    scale = q.dtype.type(1.0 / np.sqrt(Dh))
    dog = do.reshape(Hkv, R * T, Dh)                                            # [Hkv, R·T, Dh]
    pg = p.reshape(Hkv, R * T, S)                                               # [Hkv, R·T, S]
    dv = pg.transpose(0, 2, 1) @ dog                                            # [Hkv, S, Dh]
    dp = dog @ v.transpose(0, 2, 1)                                             # [Hkv, R·T, S]
    ds = pg * (dp - (dp * pg).sum(axis=-1, keepdims=True)) * scale              # [Hkv, R·T, S]
    dq = (ds @ k).reshape(H, T, Dh)                                             # [H, T, Dh]
    dk = ds.transpose(0, 2, 1) @ q.reshape(Hkv, R * T, Dh)                      # [Hkv, S, Dh]
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------------------
# SwiGLU: y = (silu(x W1) ⊙ x W3) W2, W1|W3 fused as w13 [D, 2F]
# ---------------------------------------------------------------------------------------------------------
def swiglu_forward(x, w13, w2):
    """layers.swiglu keeping (gu [T, 2F], g [T, F]) for the backward.  x [T, D] -> (y [T, D], saved)."""
    F = w2.shape[0]
    gu = linear(x, w13)                                                         # [T, 2F]
    g = silu(gu[:, :F]) * gu[:, F:]                                             # [T, F]
    return linear(g, w2), (gu, g)                                               # [T, D]


def swiglu_backward(dy, x, w13, w2, saved):
    """da = dg ⊙ u ⊙ silu'(a), du = dg ⊙ silu(a) with dg = dy W2ᵀ;  dW2 = gᵀ dy, dW13 = xᵀ [da | du].

    -> (dx [T, D], dw13 [D, 2F], dw2 [F, D])."""
    xp = array_module(x)
    gu, g = saved
    F = w2.shape[0]
    a, u = gu[:, :F], gu[:, F:]                                                 # [T, F] each
    dg = dy @ w2.T                                                              # [T, F]
    dgu = xp.empty_like(gu)                                                     # [T, 2F]
    dgu[:, :F] = dg * u * silu_grad(a)
    dgu[:, F:] = dg * silu(a)
    return dgu @ w13.T, x.T @ dgu, g.T @ dy


# ---------------------------------------------------------------------------------------------------------
# One Mistral decoder layer + a final RMSNorm (the Hydra++ prefix layer)
# ---------------------------------------------------------------------------------------------------------
PREFIX_KEYS = ("attention_norm", "wqkv", "wo", "ffn_norm", "w13", "w2", "norm")


def decoder_layer_forward(x, p, cos, sin, mask, n_heads, n_kv_heads, eps):
    """y = rms(x2 + swiglu(rms(x2)), norm),  x2 = x + Wo · attn(rope(Wq rms(x)), rope(Wk rms(x)), Wv rms(x)).

    Exactly minispec.model's layer (then one RMSNorm, as the LlamaModel of one layer that Hydra++ uses).
    x [T, D]; p: {attention_norm [D], wqkv [D, (H+2Hkv)Dh], wo [H·Dh, D], ffn_norm [D], w13 [D, 2F], w2 [F, D],
    norm [D]}; cos/sin [T, Dh/2]; mask bool [T, T] -> (y [T, D], saved)."""
    T, D = x.shape
    H, Hkv = n_heads, n_kv_heads
    Dh = p["wo"].shape[0] // H
    h1 = rms_norm(x, p["attention_norm"], eps)                                  # [T, D]
    qkv = linear(h1, p["wqkv"])                                                 # [T, (H+2Hkv)Dh]
    q0 = qkv[:, :H * Dh].reshape(T, H, Dh).transpose(1, 0, 2)                   # [H, T, Dh]
    k0 = qkv[:, H * Dh:(H + Hkv) * Dh].reshape(T, Hkv, Dh).transpose(1, 0, 2)   # [Hkv, T, Dh]
    v = qkv[:, (H + Hkv) * Dh:].reshape(T, Hkv, Dh).transpose(1, 0, 2)          # [Hkv, T, Dh]
    q, k = apply_rope(q0, cos, sin), apply_rope(k0, cos, sin)
    o, probs = attention_forward(q, k, v, mask)                                 # [H, T, Dh]
    of = o.transpose(1, 0, 2).reshape(T, H * Dh)                                # [T, H·Dh]
    x2 = x + linear(of, p["wo"])                                                # [T, D]
    h2 = rms_norm(x2, p["ffn_norm"], eps)                                       # [T, D]
    f, fsaved = swiglu_forward(h2, p["w13"], p["w2"])                           # [T, D]
    x3 = x2 + f                                                                 # [T, D]
    y = rms_norm(x3, p["norm"], eps)                                            # [T, D]
    return y, (x, h1, q, k, v, probs, of, x2, h2, fsaved, x3, cos, sin)


def decoder_layer_backward(dy, p, saved, n_heads, n_kv_heads, eps):
    """Backward of decoder_layer_forward: the chain rule through the final norm, the SwiGLU residual branch,
    the attention residual branch (Wo, attention, RoPE, the fused qkv projection) and the first norm.

    dy [T, D] -> (dx [T, D], {name: gradient} with the shapes of p)."""
    xp = array_module(dy)
    x, h1, q, k, v, probs, of, x2, h2, fsaved, x3, cos, sin = saved
    T, D = x.shape
    H, Hkv = n_heads, n_kv_heads
    Dh = p["wo"].shape[0] // H
    g = {}
    dx3, g["norm"] = rms_norm_backward(dy, x3, p["norm"], eps)                  # [T, D]
    dh2, g["w13"], g["w2"] = swiglu_backward(dx3, h2, p["w13"], p["w2"], fsaved)
    dx2_norm, g["ffn_norm"] = rms_norm_backward(dh2, x2, p["ffn_norm"], eps)
    dx2 = dx3 + dx2_norm                                                        # [T, D] residual + branch
    g["wo"] = of.T @ dx2                                                        # [H·Dh, D]
    do = (dx2 @ p["wo"].T).reshape(T, H, Dh).transpose(1, 0, 2)                 # [H, T, Dh]
    dq, dk, dv = attention_backward(do, q, k, v, probs)
    dq, dk = rope_backward(dq, cos, sin), rope_backward(dk, cos, sin)
    dqkv = xp.empty((T, (H + 2 * Hkv) * Dh), dtype=dy.dtype)                    # [T, (H+2Hkv)Dh]
    dqkv[:, :H * Dh] = dq.transpose(1, 0, 2).reshape(T, H * Dh)
    dqkv[:, H * Dh:(H + Hkv) * Dh] = dk.transpose(1, 0, 2).reshape(T, Hkv * Dh)
    dqkv[:, (H + Hkv) * Dh:] = dv.transpose(1, 0, 2).reshape(T, Hkv * Dh)
    g["wqkv"] = h1.T @ dqkv                                                     # [D, (H+2Hkv)Dh]
    dx_norm, g["attention_norm"] = rms_norm_backward(dqkv @ p["wqkv"].T, x, p["attention_norm"], eps)
    return dx2 + dx_norm, g                                                     # [T, D]


# ---------------------------------------------------------------------------------------------------------
# A Hydra head: block 1 = res(X) + silu(X W_1 + b_1) on X = concat(h, E(x_{t+1}) .. E(x_{t+i+1})) [T, (i+2)D],
# blocks 2..L = x + silu(x W_l + b_l), then logits = x P + c
# ---------------------------------------------------------------------------------------------------------
def head_forward(X, res_w, res_b, blocks, proj, proj_b):
    """One Hydra head, keeping what the backward needs.

    X [T, (i+2)D]; res_w [(i+2)D, D], res_b [D]; blocks = [(W_1 [(i+2)D, D], b_1 [D]), (W_l [D, D], b_l [D]) ..]
    (the same arrays may repeat: shared blocks); proj [D, V], proj_b [V] -> (logits [T, V], saved)."""
    W1, b1 = blocks[0]
    z = X @ W1 + b1                                                             # [T, D]
    x = X @ res_w + res_b + silu(z)                                             # [T, D]
    xs, zs = [x], [z]
    for W, b in blocks[1:]:
        z = x @ W + b                                                           # [T, D]
        x = x + silu(z)                                                         # [T, D]
        xs.append(x)
        zs.append(z)
    return x @ proj + proj_b, (X, xs, zs)                                       # [T, V]


def head_backward(dlogits, saved, res_w, blocks, proj):
    """Backward of head_forward:

        dP = x_Lᵀ dlogits,  dc = sum_rows dlogits,  dx_L = dlogits Pᵀ;  for l = L .. 2:
        dz_l = dx_l ⊙ silu'(z_l),  dW_l = x_{l-1}ᵀ dz_l,  db_l = sum dz_l,  dx_{l-1} = dx_l + dz_l W_lᵀ;
        block 1:  dz_1 = dx_1 ⊙ silu'(z_1),  dW_1 = Xᵀ dz_1,  dres_w = Xᵀ dx_1,  dres_b = sum dx_1,
                  dX = dx_1 res_wᵀ + dz_1 W_1ᵀ

    -> (dX [T, (i+2)D], {"res_w", "res_b", "proj", "proj_b"}, [(dW_l, db_l) per block, in order]). Shared
    blocks get one entry per use; the caller sums them."""
    X, xs, zs = saved
    g = {"proj": xs[-1].T @ dlogits, "proj_b": dlogits.sum(axis=0)}             # [D, V], [V]
    dx = dlogits @ proj.T                                                       # [T, D]
    dblocks = [None] * len(blocks)
    for layer in range(len(blocks) - 1, 0, -1):
        dz = dx * silu_grad(zs[layer])                                          # [T, D]
        dblocks[layer] = (xs[layer - 1].T @ dz, dz.sum(axis=0))
        dx = dx + dz @ blocks[layer][0].T                                       # [T, D]
    dz = dx * silu_grad(zs[0])                                                  # [T, D]
    dblocks[0] = (X.T @ dz, dz.sum(axis=0))                                     # [(i+2)D, D], [D]
    g["res_w"], g["res_b"] = X.T @ dx, dx.sum(axis=0)
    dX = dx @ res_w.T + dz @ blocks[0][0].T                                     # [T, (i+2)D]
    return dX, g, dblocks


# ---------------------------------------------------------------------------------------------------------
# Losses: cross-entropy to labels, and to the base model's distribution (the teacher loss)
# ---------------------------------------------------------------------------------------------------------
def log_softmax(logits):
    """Rows of log-probabilities.  [B, V] -> [B, V]"""
    m = logits.max(axis=-1, keepdims=True)
    z = logits - m
    return z - array_module(logits).log(array_module(logits).exp(z).sum(axis=-1, keepdims=True))


def label_ce(logits, labels):
    """Mean over labelled rows of -log q[label], q = softmax(logits), and d/dlogits = (q - onehot) / n.

    logits [B, V], labels int [B] (-1: no label) -> (loss 0-d, dlogits [B, V])."""
    xp = array_module(logits)
    valid = (labels >= 0).astype(logits.dtype)                                  # [B]
    n = xp.maximum(valid.sum(), logits.dtype.type(1))
    rows, safe = xp.arange(logits.shape[0]), xp.where(labels >= 0, labels, 0)
    lq = log_softmax(logits)                                                    # [B, V]
    loss = -(lq[rows, safe] * valid).sum() / n
    d = xp.exp(lq)                                                              # [B, V]
    d[rows, safe] -= logits.dtype.type(1)
    return loss, d * (valid / n)[:, None]


def teacher_ce(logits, teacher_logits, valid):
    """The teacher loss: mean over valid rows of -sum_v p_v log q_v, p = softmax(teacher_logits) (the base
    model's next-token distribution, held fixed), q = softmax(logits); d/dlogits = (q - p) / n.

    logits, teacher_logits [B, V], valid bool [B] -> (loss 0-d, dlogits [B, V])."""
    xp = array_module(logits)
    w = valid.astype(logits.dtype)                                              # [B]
    n = xp.maximum(w.sum(), logits.dtype.type(1))
    p = softmax(teacher_logits)                                                 # [B, V]
    lq = log_softmax(logits)                                                    # [B, V]
    loss = -((p * lq).sum(axis=-1) * w).sum() / n
    return loss, (xp.exp(lq) - p) * (w / n)[:, None]
