"""Mistral's building blocks, one pure function per equation (Mistral 7B, arXiv 2310.06825, "Architectural details").

Every function takes arrays of one namespace (NumPy or CuPy, found with `array_module`) and one floating
dtype, and returns arrays of the same. Shapes use the letters of minispec/config.py.
"""
import numpy as np

from ..backend import array_module


def rms_norm(x, weight, eps):
    """RMSNorm (Zhang & Sennrich 2019): x / sqrt(mean(x²) + eps) * weight.   [T, D] -> [T, D]

    float16: the statistic is taken in float32 (x² overflows float16 from |x| = 256 on, and a mean of D
    squares loses digits), the normalised x is cast back before the weight.
    """
    xp = array_module(x)
    if x.dtype.itemsize < 4:
        return rms_norm(x.astype(xp.float32), 1, eps).astype(x.dtype) * weight
    ms = (x * x).mean(axis=-1, keepdims=True)                       # [T, 1]
    return x / xp.sqrt(ms + x.dtype.type(eps)) * weight


def rope_inv_freq(head_dim, theta):
    """RoPE's frequencies θ^(-2i/Dh), i < Dh/2, in float64 on the host.   -> [Dh/2]"""
    return 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


def rope_tables(positions, head_dim, theta, xp, dtype):
    """cos, sin of RoPE angles pos · θ^(-2i/Dh), i < Dh/2 (RoFormer, arXiv 2104.09864).   -> [T, Dh/2]

    Built in float64 on the host from integer positions, then cast: exact to the working dtype's rounding.
    """
    pos = np.asarray(positions, dtype=np.float64)                   # [T]
    ang = pos[:, None] * rope_inv_freq(head_dim, theta)[None, :]    # [T, Dh/2]
    return xp.asarray(np.cos(ang), dtype=dtype), xp.asarray(np.sin(ang), dtype=dtype)


def apply_rope(x, cos, sin):
    """Rotate each (x[i], x[i + Dh/2]) pair by its angle (HF's rotate-half order).   [*, T, Dh] -> [*, T, Dh]"""
    xp = array_module(x)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]                           # [*, T, Dh/2] each
    out = xp.empty_like(x)
    out[..., :half] = x1 * cos - x2 * sin
    out[..., half:] = x2 * cos + x1 * sin
    return out


def sliding_window_mask(q_pos, k_pos, window):
    """Causal sliding-window visibility: query at i sees key at j iff i - W < j <= i (W keys incl. itself).

    q_pos [T], k_pos [S] (integer arrays, any namespace; negative k_pos marks an empty slot) -> bool [T, S].
    window None means plain causal attention.
    """
    q, k = q_pos[:, None], k_pos[None, :]
    visible = (k <= q) & (k >= 0)
    if window is not None:
        visible &= k > q - window
    return visible


def qkv_heads(h, wqkv, cos, sin, n_heads, n_kv_heads, head_dim):
    """The attention inputs of one layer: the fused projection h @ [Wq | Wk | Wv], split per head, RoPE on q and k.

    h [T, D], wqkv [D, (H+2Hkv)Dh], cos/sin [T, Dh/2] -> q [H, T, Dh], k [Hkv, T, Dh] (rotated), v [Hkv, T, Dh].
    """
    T, H, Hkv, Dh = h.shape[0], n_heads, n_kv_heads, head_dim
    qkv = linear(h, wqkv)                                           # [T, (H+2Hkv)Dh]
    q = qkv[:, :H * Dh].reshape(T, H, Dh).transpose(1, 0, 2)        # [H, T, Dh]
    k = qkv[:, H * Dh:(H + Hkv) * Dh].reshape(T, Hkv, Dh).transpose(1, 0, 2)   # [Hkv, T, Dh]
    v = qkv[:, (H + Hkv) * Dh:].reshape(T, Hkv, Dh).transpose(1, 0, 2)         # [Hkv, T, Dh]
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def repeat_kv(x, n_rep):
    """Grouped-query attention's sharing made explicit: kv head g serves query heads g·R ... g·R + R - 1.

    [Hkv, S, Dh] -> [H, S, Dh]. `attention` gets the same result by reshaping q instead of copying k and v.
    """
    xp = array_module(x)
    return xp.repeat(x, n_rep, axis=0)


def softmax(x, axis=-1):
    """Numerically stable softmax; masked entries hold -inf and come out as exact zeros. float16 in, float16 out,
    computed in float32 (the sum of S exponentials in float16 would round away small probabilities)."""
    xp = array_module(x)
    if x.dtype.itemsize < 4:
        return softmax(x.astype(xp.float32), axis).astype(x.dtype)
    e = xp.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def attention(q, k, v, mask, keep=False):
    """Masked scaled dot-product attention with grouped kv heads (GQA, arXiv 2305.13245).

    q [H, T, Dh], k and v [Hkv, S, Dh], mask bool [T, S] -> [H, T, Dh]. Query head h uses kv head h // R:
    q is viewed as [Hkv, R, T, Dh] so each kv head meets its R query heads in one matmul (no repeat_kv copy).
    keep=True also returns the probabilities [Hkv, R, T, S] (for a backward pass, minispec/backprop.py).
    """
    xp = array_module(q)
    H, T, Dh = q.shape
    Hkv, S, _ = k.shape
    qg = q.reshape(Hkv, H // Hkv * T, Dh)                           # [Hkv, R·T, Dh]
    scores = qg @ k.transpose(0, 2, 1)                              # [Hkv, R·T, S]
    scores = scores.reshape(Hkv, H // Hkv, T, S) * q.dtype.type(1.0 / np.sqrt(Dh))
    scores = xp.where(mask, scores, q.dtype.type(-np.inf))          # [Hkv, R, T, S]
    p = softmax(scores)                                             # [Hkv, R, T, S]
    o = (p.reshape(Hkv, H // Hkv * T, S) @ v).reshape(H, T, Dh)     # [H, T, Dh]
    return (o, p) if keep else o


# NumPy + OpenBLAS: for 2+ rows x @ W takes the GEMM path, which packs the whole weight matrix first, while one
# row takes gemv, which streams the matrix once; on a CPU a stack of per-row gemv calls costs less than that GEMM
# for a few rows, and speculative verification lives exactly there. GEMV_ROWS is where the two crossed on the
# machine docs/design.md ("Performance facts") reports, beside the command that measures it.
GEMV_ROWS = 12


def linear(x, w):
    """x [T, in] @ w [in, out] -> [T, out]; on NumPy with 2..GEMV_ROWS rows, one gemv per row (same result)."""
    if 1 < x.shape[0] <= GEMV_ROWS and array_module(x) is np:
        return (x[:, None, :] @ w)[:, 0]                            # [T, 1, in] @ [in, out] -> [T, out]
    return x @ w


def silu(x):
    """x · sigmoid(x), with sigmoid written through tanh so that large |x| cannot overflow exp."""
    xp = array_module(x)
    half = x.dtype.type(0.5)
    return x * (half + half * xp.tanh(half * x))


def swiglu(x, w13, w2, keep=False):
    """SwiGLU feed-forward (Shazeer 2020): (silu(x W1) ⊙ x W3) W2, with W1|W3 fused as one [D, 2F] matrix.

    x [T, D], w13 [D, 2F], w2 [F, D] -> [T, D]; keep=True also returns (x W13 [T, 2F], the gated [T, F]) for a
    backward pass (minispec/backprop.py).
    """
    F = w2.shape[0]
    gu = linear(x, w13)                                             # [T, 2F]
    g = silu(gu[:, :F]) * gu[:, F:]                                 # [T, F]
    y = linear(g, w2)                                               # [T, D]
    return (y, (gu, g)) if keep else y
