"""The naive oracle: Mistral written as plainly as possible, for tests to hold the fast path against.

No cache, no fused weights, no grouped reshape: every head is a loop iteration, kv heads are copied with
repeat_kv, the mask is the full band matrix, RoPE is the paper's interleaved-pair rotation applied to the
weights' rotate-half layout by undoing the permutation per head, and everything runs in float64 on NumPy.
It shares no code with minispec/layers.py on purpose, so a bug there cannot hide here.
"""
import numpy as np


def oracle_forward(config, tensors, ids):
    """Logits [T, V] (float64) of canonical tensors (minispec.weights.load_tensors) for token ids [T]."""
    c = config
    w = {k: np.asarray(v, dtype=np.float64) for k, v in tensors.items()}
    ids = np.asarray(ids, dtype=np.int64)
    T, Dh = len(ids), c.head_dim

    def rms(x, g):
        return x / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + c.norm_eps) * g

    def rope(x):                      # x [T, Dh] in rotate-half layout: pair i is (x[i], x[i + Dh/2])
        out = np.empty_like(x)
        for i in range(Dh // 2):
            theta = c.rope_theta ** (-2.0 * i / Dh)
            for t in range(T):
                a = t * theta
                x1, x2 = x[t, i], x[t, i + Dh // 2]
                out[t, i] = x1 * np.cos(a) - x2 * np.sin(a)
                out[t, i + Dh // 2] = x1 * np.sin(a) + x2 * np.cos(a)
        return out

    allowed = np.zeros((T, T), dtype=bool)
    for i in range(T):
        for j in range(T):
            allowed[i, j] = j <= i and (c.sliding_window is None or j > i - c.sliding_window)

    x = w["tok_embeddings.weight"][ids]                                     # [T, D]
    for layer in range(c.n_layers):
        p = f"layers.{layer}."
        h = rms(x, w[p + "attention_norm.weight"])
        q = h @ w[p + "attention.wq.weight"].T                              # [T, H·Dh]
        k = h @ w[p + "attention.wk.weight"].T                              # [T, Hkv·Dh]
        v = h @ w[p + "attention.wv.weight"].T
        kv_k = [k[:, g * Dh:(g + 1) * Dh] for g in range(c.n_kv_heads)]
        kv_v = [v[:, g * Dh:(g + 1) * Dh] for g in range(c.n_kv_heads)]
        heads = []
        for hd in range(c.n_heads):
            g = hd // (c.n_heads // c.n_kv_heads)                           # repeat_kv: kv head of query head hd
            qh, kh, vh = rope(q[:, hd * Dh:(hd + 1) * Dh]), rope(kv_k[g]), kv_v[g]
            s = qh @ kh.T / np.sqrt(Dh)
            s = np.where(allowed, s, -np.inf)
            e = np.exp(s - s.max(axis=1, keepdims=True))
            heads.append((e / e.sum(axis=1, keepdims=True)) @ vh)           # [T, Dh]
        x = x + np.concatenate(heads, axis=1) @ w[p + "attention.wo.weight"].T
        h = rms(x, w[p + "ffn_norm.weight"])
        g1, g3 = h @ w[p + "feed_forward.w1.weight"].T, h @ w[p + "feed_forward.w3.weight"].T
        x = x + (g1 / (1 + np.exp(-g1)) * g3) @ w[p + "feed_forward.w2.weight"].T
    out = w["tok_embeddings.weight"] if c.tie_embeddings else w["output.weight"]
    return rms(x, w["norm.weight"]) @ out.T
