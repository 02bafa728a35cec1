"""Hand-derived backward passes for training Medusa heads (arXiv 2401.10774) and Hydra / Hydra++ heads
(arXiv 2402.05109) in NumPy/CuPy.

The forwards are the ones inference runs (minispec.mistral.layers, decoders.medusa.head_forward,
decoders.hydra_heads.head_forward / prefix_forward with keep=True); this module adds only their backward passes, each
the chain rule written out and checked against central finite differences in float64 by tests/test_medusa.py and
tests/test_train_hydra.py. Reading order: SiLU and the label cross-entropy -> a Medusa head's residual blocks ->
RMSNorm -> RoPE -> GQA attention under a mask -> SwiGLU -> the Hydra++ prefix layer (one Mistral decoder layer + a
final RMSNorm) -> a Hydra head (first block over the concatenated input, then a Medusa head's blocks) -> the
teacher loss (cross-entropy to the base model's softmax).

Shapes: T rows (positions), D dim, H / Hkv heads, R = H / Hkv, Dh head dim, F ffn dim, V vocab, S keys, Lh blocks
of a head.
"""
import numpy as np

from ..backend import array_module
from ..mistral.layers import apply_rope, attention, silu, softmax, swiglu


# ---------------------------------------------------------------------------------------------------------
# SiLU's derivative and the cross-entropy to labels (both trainers)
# ---------------------------------------------------------------------------------------------------------
def silu_grad(z):
    """d silu(z) / dz = s + z s (1 - s),  s = sigmoid(z) (written through tanh, like layers.silu)."""
    xp = array_module(z)
    half = z.dtype.type(0.5)
    s = half + half * xp.tanh(half * z)
    return s * (1 + z * (1 - s))


def cross_entropy(logits, labels):
    """Mean cross-entropy over the rows that have a label, and its gradient.

    logits [B, V], labels int [B] (device; -1 = no label) -> (loss 0-d, dlogits [B, V]).
    CE = logsumexp(logits) - logits[label];  dCE/dlogits = (softmax(logits) - onehot(label)) / n_labelled."""
    xp = array_module(logits)
    dt = logits.dtype.type
    B = logits.shape[0]
    rows = xp.arange(B)
    valid = (labels >= 0).astype(logits.dtype)                                   # [B]
    safe = xp.where(labels >= 0, labels, 0)                                      # [B]
    m = logits.max(axis=-1, keepdims=True)                                       # [B, 1]
    e = xp.exp(logits - m)                                                       # [B, V]
    s = e.sum(axis=-1, keepdims=True)                                            # [B, 1]
    n = xp.maximum(valid.sum(), dt(1))
    loss = ((xp.log(s[:, 0]) + m[:, 0] - logits[rows, safe]) * valid).sum() / n
    d = e / s                                                                    # [B, V] softmax
    d[rows, safe] -= dt(1)
    return loss, d * (valid / n)[:, None]


# ---------------------------------------------------------------------------------------------------------
# A Medusa head (forward: decoders.medusa.head_forward): Lh blocks y + silu(y W_l + b_l), logits = y P
# ---------------------------------------------------------------------------------------------------------
def head_backward(dlogits, saved, Ws, P, grad_proj=True):
    """Backward pass of one head (decoders.medusa.head_forward with keep=True), by the chain rule:

        dP = x_Lh^T dlogits;   dx_Lh = dlogits P^T;   for l = Lh .. 1:  dz_l = dx_l ⊙ silu'(z_l),
        dW_l = x_{l-1}^T dz_l,   db_l = sum_rows dz_l,   dx_{l-1} = dx_l + dz_l W_l^T   (the residual path)

    dlogits [T, V], saved = (xs, zs), Ws [Lh, D, D], P [D, V] -> (dWs [Lh, D, D], dbs [Lh, D], dP [D, V] or None,
    dx_0 [T, D], the gradient of the blocks' input)."""
    xs, zs = saved
    xp = array_module(dlogits)
    Lh, D = len(zs), xs[0].shape[1]
    dWs = xp.empty((Lh, D, D), dtype=dlogits.dtype)                               # [Lh, D, D]
    dbs = xp.empty((Lh, D), dtype=dlogits.dtype)
    dP = xs[-1].T @ dlogits if grad_proj else None                               # [D, V]
    dx = dlogits @ P.T                                                           # [T, D]
    for layer in reversed(range(Lh)):
        dz = dx * silu_grad(zs[layer])                                           # [T, D]
        dWs[layer] = xs[layer].T @ dz                                            # [D, D]
        dbs[layer] = dz.sum(axis=0)                                              # [D]
        dx = dx + dz @ Ws[layer].T                                               # [T, D]
    return dWs, dbs, dP, dx


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
    return attention(q, k, v, mask, keep=True)


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
    """layers.swiglu, keeping (gu [T, 2F], g [T, F]) for the backward.  x [T, D] -> (y [T, D], saved)."""
    return swiglu(x, w13, w2, keep=True)


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
# The Hydra++ prefix layer: one Mistral decoder layer + a final RMSNorm (forward: decoders.hydra_heads.prefix_forward)
# ---------------------------------------------------------------------------------------------------------
PREFIX_KEYS = ("attention_norm", "wqkv", "wo", "ffn_norm", "w13", "w2", "norm")


def prefix_backward(dy, p, saved, n_heads, n_kv_heads, eps):
    """Backward of hydra_heads.prefix_forward without a cache (keep=True gives `saved`):

        out = rms(x2, norm),  x2 = x1 + swiglu(rms(x1, ffn_norm)),  x1 = x + Wo · attn(rope(q), rope(k), v),
        q | k | v = rms(x, attention_norm) Wqkv

    the chain rule through the final norm, the SwiGLU residual branch, the attention residual branch (Wo,
    attention, RoPE, the fused qkv projection) and the first norm. The attention probabilities and the SwiGLU
    intermediates are recomputed from saved q, k, v and h2 (cheap; the forward stays the one in hydra_heads.py).
    dy [T, D] -> (dx [T, D], {name: gradient} with the shapes of p)."""
    xp = array_module(dy)
    x, h1, q, k, v, x1, h2, x2 = (saved[n] for n in ("x", "h1", "q", "k", "v", "x1", "h2", "x2"))
    T, D = x.shape
    H, Hkv = n_heads, n_kv_heads
    Dh = p["wo"].shape[0] // H
    _, probs = attention_forward(q, k, v, saved["mask"])                        # [Hkv, R, T, T]
    _, fsaved = swiglu_forward(h2, p["w13"], p["w2"])
    g = {}
    dx2, g["norm"] = rms_norm_backward(dy, x2, p["norm"], eps)                  # [T, D]
    dh2, g["w13"], g["w2"] = swiglu_backward(dx2, h2, p["w13"], p["w2"], fsaved)
    dx1_branch, g["ffn_norm"] = rms_norm_backward(dh2, x1, p["ffn_norm"], eps)
    dx1 = dx2 + dx1_branch                                                      # [T, D] residual + branch
    of = saved["o"].transpose(1, 0, 2).reshape(T, H * Dh)                       # [T, H·Dh]
    g["wo"] = of.T @ dx1                                                        # [H·Dh, D]
    do = (dx1 @ p["wo"].T).reshape(T, H, Dh).transpose(1, 0, 2)                 # [H, T, Dh]
    dq, dk, dv = attention_backward(do, q, k, v, probs)
    dq, dk = rope_backward(dq, saved["cos"], saved["sin"]), rope_backward(dk, saved["cos"], saved["sin"])
    dqkv = xp.empty((T, (H + 2 * Hkv) * Dh), dtype=dy.dtype)                    # [T, (H+2Hkv)Dh]
    dqkv[:, :H * Dh] = dq.transpose(1, 0, 2).reshape(T, H * Dh)
    dqkv[:, H * Dh:(H + Hkv) * Dh] = dk.transpose(1, 0, 2).reshape(T, Hkv * Dh)
    dqkv[:, (H + Hkv) * Dh:] = dv.transpose(1, 0, 2).reshape(T, Hkv * Dh)
    g["wqkv"] = h1.T @ dqkv                                                     # [D, (H+2Hkv)Dh]
    dx_branch, g["attention_norm"] = rms_norm_backward(dqkv @ p["wqkv"].T, x, p["attention_norm"], eps)
    return dx1 + dx_branch, g                                                   # [T, D]


# ---------------------------------------------------------------------------------------------------------
# A Hydra head (forward: decoders.hydra_heads.head_forward): block 1 = res(a) + silu(a W_1 + b_1) on
# a = concat(h, E(x_{t+1}) .. E(x_{t+i+1})) [T, (i+2)D], blocks 2..L = y + silu(y W_l + b_l), logits = y P + c
# ---------------------------------------------------------------------------------------------------------
def hydra_head_backward(dlogits, p, saved):
    """Backward of hydra_heads.head_forward (keep=True gives `saved` = {"a", "z": [z_1..z_L], "y": [y_1..y_L]}):

        dP = y_Lᵀ dlogits,  dc = sum_rows dlogits,  dy_L = dlogits Pᵀ;  for l = L .. 2:
        dz_l = dy_l ⊙ silu'(z_l),  dW_l = y_{l-1}ᵀ dz_l,  db_l = sum dz_l,  dy_{l-1} = dy_l + dz_l W_lᵀ;
        block 1:  dz_1 = dy_1 ⊙ silu'(z_1),  dW_1 = aᵀ dz_1,  db_1 = sum dz_1,  dres_w = aᵀ dy_1,
                  dres_b = sum dy_1,  da = dy_1 res_wᵀ + dz_1 W_1ᵀ

    A head that shares the base output layer (no "proj_b" in p: hydra_heads.py) trains no projection: dP and dc
    are neither computed nor returned, and dy_L = dlogits W_outᵀ all the same.
    dlogits [T, V] -> (da [T, (i+2)D], {name: gradient} with the shapes of p's trained arrays)."""
    a, zs, ys = saved["a"], saved["z"], saved["y"]
    own = "proj_b" in p
    # blocks L .. 2 and the output layer are a Medusa head's residual blocks (inputs y_1 .. y_{L-1}): its backward
    g = {"proj_b": dlogits.sum(axis=0)} if own else {}                          # [V]
    g["ws"], g["bs"], dP, dy = head_backward(dlogits, (ys, zs[1:]), p["ws"], p["proj_w"], grad_proj=own)
    if own:
        g["proj_w"] = dP                                                        # [D, V]
    dz = dy * silu_grad(zs[0])                                                  # [T, D]
    g["w1"], g["b1"] = a.T @ dz, dz.sum(axis=0)                                 # [(i+2)D, D], [D]
    g["res_w"], g["res_b"] = a.T @ dy, dy.sum(axis=0)
    return dy @ p["res_w"].T + dz @ p["w1"].T, g                                # [T, (i+2)D]


# ---------------------------------------------------------------------------------------------------------
# The teacher loss: cross-entropy to the base model's distribution, alone and fused with the label loss
# ---------------------------------------------------------------------------------------------------------
def log_softmax(logits):
    """Rows of log-probabilities.  [B, V] -> [B, V]"""
    m = logits.max(axis=-1, keepdims=True)
    z = logits - m
    return z - array_module(logits).log(array_module(logits).exp(z).sum(axis=-1, keepdims=True))


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


def head_ce(logits, labels, teacher_logits=None, lm_weight=1.0, teacher_weight=0.0):
    """lm_weight · cross_entropy + teacher_weight · teacher_ce (rows with a label) in one pass over the [B, V]
    arrays, for training speed: softmax(logits) is computed once and

        d/dlogits = ((lm_weight + teacher_weight) q - lm_weight onehot - teacher_weight p) / n

    logits [B, V], labels int [B], teacher_logits [B, V] or None (then teacher_weight must be 0)
    -> (label CE float, teacher CE float (0.0 if unused), dlogits [B, V])."""
    xp = array_module(logits)
    dt = logits.dtype.type
    valid = labels >= 0
    w = valid.astype(logits.dtype)                                              # [B]
    n = xp.maximum(w.sum(), dt(1))
    rows, safe = xp.arange(logits.shape[0]), xp.where(valid, labels, 0)
    lq = log_softmax(logits)                                                    # [B, V]
    d = xp.exp(lq)                                                              # [B, V] q
    d *= dt(lm_weight + teacher_weight)
    lm = float(-(lq[rows, safe] * w).sum() / n)
    d[rows, safe] -= dt(lm_weight)
    teacher = 0.0
    if teacher_weight:
        p = softmax(teacher_logits)                                             # [B, V]
        teacher = float(-((p * lq).sum(axis=-1) * w).sum() / n)
        d -= dt(teacher_weight) * p
    d *= (w / n)[:, None]
    return lm, teacher, d
