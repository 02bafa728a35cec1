"""The naive oracle: Mistral written as plainly as possible, for tests to hold the fast path against.

No cache, no fused weights, no grouped reshape: every head is a loop iteration, kv heads are copied with
repeat_kv, the mask is the full band matrix, and everything runs in float64 on NumPy.

RoPE is done the other way from the model, on purpose. minispec's canonical tensors are in Hugging Face's
rotate-half layout, where head rows i and i + Dh/2 form a rotated pair. The oracle first puts the q and k rows
of every head back into Mistral's native order with its own loop (`native_rope_rows`: HF row s·Dh/2 + i was
Mistral row 2i + s), then rotates consecutive pairs (x[2i], x[2i+1]) as the complex number x[2i] + j·x[2i+1]
times e^{j·t·θ_i}, as mistral-inference does (`view_as_complex`, `precompute_freqs_cis` in
src/mistral_inference/rope.py). Attention scores q·k are unchanged when q and k get the same row permutation,
so the oracle and the model agree only if both the permutation and the pairing are right.
It shares no code with minispec/layers.py or minispec/weights.py, so a bug there cannot hide here.
"""
import numpy as np


def native_rope_rows(w, n_heads):
    """Rows of a q/k projection [n·Dh, D] from HF's rotate-half order back to Mistral's interleaved order.

    HF's conversion script (transformers' convert_mistral_weights_to_hf, `permute`) sends Mistral row 2i + s of
    each head (s = 0, 1) to row s·Dh/2 + i; this loop sends every row back, one at a time.
    """
    Dh = w.shape[0] // n_heads
    native = np.empty_like(w)
    for hd in range(n_heads):
        for i in range(Dh // 2):
            for s in (0, 1):
                native[hd * Dh + 2 * i + s] = w[hd * Dh + s * (Dh // 2) + i]
    return native


def oracle_forward(config, tensors, ids):
    """Logits [T, V] (float64) of canonical tensors (minispec.mistral.weights.load_tensors) for token ids [T]."""
    c = config
    w = {k: np.asarray(v, dtype=np.float64) for k, v in tensors.items()}
    ids = np.asarray(ids, dtype=np.int64)
    T, Dh = len(ids), c.head_dim

    def rms(x, g):
        return x / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + c.norm_eps) * g

    # RoFormer (arXiv 2104.09864) in complex form: pair i of position t turns by t·θ_i, θ_i = theta^(-2i/Dh)
    freqs = c.rope_theta ** (-np.arange(0, Dh, 2, dtype=np.float64) / Dh)   # [Dh/2]
    turn = np.exp(1j * np.outer(np.arange(T, dtype=np.float64), freqs))     # [T, Dh/2] complex

    def rope(x):                      # x [T, Dh] in Mistral's interleaved order: pair i is (x[2i], x[2i+1])
        z = (x[:, 0::2] + 1j * x[:, 1::2]) * turn                           # [T, Dh/2] complex
        out = np.empty_like(x)
        out[:, 0::2], out[:, 1::2] = z.real, z.imag
        return out

    allowed = np.zeros((T, T), dtype=bool)
    for i in range(T):
        for j in range(T):
            allowed[i, j] = j <= i and (c.sliding_window is None or j > i - c.sliding_window)

    x = w["tok_embeddings.weight"][ids]                                     # [T, D]
    for layer in range(c.n_layers):
        p = f"layers.{layer}."
        h = rms(x, w[p + "attention_norm.weight"])
        q = h @ native_rope_rows(w[p + "attention.wq.weight"], c.n_heads).T      # [T, H·Dh], interleaved
        k = h @ native_rope_rows(w[p + "attention.wk.weight"], c.n_kv_heads).T   # [T, Hkv·Dh], interleaved
        v = h @ w[p + "attention.wv.weight"].T                                   # [T, Hkv·Dh], never permuted
        kv_k = [k[:, g * Dh:(g + 1) * Dh] for g in range(c.n_kv_heads)]
        kv_v = [v[:, g * Dh:(g + 1) * Dh] for g in range(c.n_kv_heads)]
        heads = []
        for hd in range(c.n_heads):
            g = hd // (c.n_heads // c.n_kv_heads)                           # repeat_kv: kv head of query head hd
            qh, kh, vh = rope(q[:, hd * Dh:(hd + 1) * Dh]), rope(kv_k[g]), kv_v[g]
            s = qh @ kh.T / np.sqrt(Dh)                                     # [T, T]
            s = np.where(allowed, s, -np.inf)
            e = np.exp(s - s.max(axis=1, keepdims=True))
            heads.append((e / e.sum(axis=1, keepdims=True)) @ vh)           # [T, Dh]
        x = x + np.concatenate(heads, axis=1) @ w[p + "attention.wo.weight"].T
        h = rms(x, w[p + "ffn_norm.weight"])
        g1, g3 = h @ w[p + "feed_forward.w1.weight"].T, h @ w[p + "feed_forward.w3.weight"].T
        x = x + (g1 / (1 + np.exp(-g1)) * g3) @ w[p + "feed_forward.w2.weight"].T
    out = w["tok_embeddings.weight"] if c.tie_embeddings else w["output.weight"]
    return rms(x, w["norm.weight"]) @ out.T
