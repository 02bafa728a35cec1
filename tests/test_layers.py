"""Each layer function against an independent formula, with its shape and dtype (docs/design.md, "Code style")."""
import numpy as np
import pytest

from minispec.mistral.layers import (apply_rope, attention, qkv_heads, repeat_kv, rms_norm, rope_tables, silu,
                             sliding_window_mask, softmax, swiglu)

DTYPES = [np.float32, np.float64]


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_divides_by_root_mean_square_and_keeps_shape_and_dtype(dtype):
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((5, 12)).astype(dtype), rng.standard_normal(12).astype(dtype)
    y = rms_norm(x, w, 1e-5)
    assert y.shape == (5, 12) and y.dtype == dtype
    for t in range(5):
        expect = [x[t, d] / np.sqrt(sum(float(v) ** 2 for v in x[t]) / 12 + 1e-5) * w[d] for d in range(12)]
        np.testing.assert_allclose(y[t], expect, rtol=1e-5 if dtype == np.float32 else 1e-13)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_rotates_each_pair_as_a_complex_number_by_position_times_frequency(dtype):
    rng = np.random.default_rng(1)
    H, T, Dh, theta = 3, 7, 10, 10000.0
    x = rng.standard_normal((H, T, Dh)).astype(dtype)
    pos = np.arange(5, 5 + T)
    cos, sin = rope_tables(pos, Dh, theta, np, dtype)
    assert cos.shape == (T, Dh // 2) and cos.dtype == dtype
    y = apply_rope(x, cos, sin)
    assert y.shape == (H, T, Dh) and y.dtype == dtype
    z = x[..., :Dh // 2] + 1j * x[..., Dh // 2:]                    # pair i = (x[i], x[i + Dh/2])
    freq = theta ** (-np.arange(0, Dh, 2) / Dh)
    rot = z * np.exp(1j * pos[:, None] * freq[None, :])
    np.testing.assert_allclose(y[..., :Dh // 2], rot.real, rtol=1e-5, atol=1e-5 if dtype == np.float32 else 1e-12)
    np.testing.assert_allclose(y[..., Dh // 2:], rot.imag, rtol=1e-5, atol=1e-5 if dtype == np.float32 else 1e-12)


def test_rope_keeps_dot_products_relative_to_position_offset():
    rng = np.random.default_rng(2)
    q, k = rng.standard_normal((1, 1, 16)), rng.standard_normal((1, 1, 16))
    dots = []
    for base in (0, 100, 3001):
        cq, sq = rope_tables([base + 9], 16, 1e4, np, np.float64)
        ck, sk = rope_tables([base + 2], 16, 1e4, np, np.float64)
        dots.append(float((apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()))
    np.testing.assert_allclose(dots, dots[0], rtol=1e-9)


@pytest.mark.parametrize("window", [1, 3, 8, None])
def test_sliding_window_mask_shows_each_query_W_keys_including_itself(window):
    T = 12
    m = sliding_window_mask(np.arange(T), np.arange(T), window)
    assert m.shape == (T, T) and m.dtype == bool
    for i in range(T):
        visible = [j for j in range(T) if m[i, j]]
        lo = 0 if window is None else max(0, i - window + 1)
        assert visible == list(range(lo, i + 1))


def test_sliding_window_mask_hides_empty_cache_slots():
    m = sliding_window_mask(np.array([5]), np.array([3, -1, 4, 5]), 4)
    assert m.tolist() == [[True, False, True, True]]


@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2), (8, 2), (4, 1)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_attention_equals_per_head_softmax_attention_with_repeated_kv(H, Hkv, dtype):
    rng = np.random.default_rng(3)
    T, S, Dh = 5, 9, 6
    q = rng.standard_normal((H, T, Dh)).astype(dtype)
    k, v = rng.standard_normal((Hkv, S, Dh)).astype(dtype), rng.standard_normal((Hkv, S, Dh)).astype(dtype)
    mask = sliding_window_mask(np.arange(4, 4 + T), np.arange(S), 4)
    out = attention(q, k, v, mask)
    assert out.shape == (H, T, Dh) and out.dtype == dtype
    kr, vr = repeat_kv(k, H // Hkv), repeat_kv(v, H // Hkv)
    assert kr.shape == (H, S, Dh)
    for h in range(H):
        assert np.array_equal(kr[h], k[h // (H // Hkv)])
        for t in range(T):
            s = np.array([q[h, t] @ kr[h, j] / np.sqrt(Dh) if mask[t, j] else -np.inf for j in range(S)], np.float64)
            p = np.exp(s - s.max())
            np.testing.assert_allclose(out[h, t], (p / p.sum()) @ vr[h], rtol=1e-4 if dtype == np.float32 else 1e-12,
                                       atol=1e-5 if dtype == np.float32 else 1e-13)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_gives_exact_zeros_for_masked_entries_and_rows_summing_to_one(dtype):
    x = np.array([[1.0, -np.inf, 3.0], [-np.inf, 0.0, -np.inf]], dtype=dtype)
    p = softmax(x)
    assert p.dtype == dtype and p[0, 1] == 0 and p[1, 0] == 0 and p[1, 1] == 1
    np.testing.assert_allclose(p.sum(-1), 1, rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_qkv_heads_projects_with_each_weight_splits_heads_and_rotates_q_and_k_only(dtype):
    rng = np.random.default_rng(5)
    T, D, H, Hkv, Dh = 3, 8, 4, 2, 4
    h = rng.standard_normal((T, D)).astype(dtype)
    wq, wk, wv = (rng.standard_normal((D, n * Dh)).astype(dtype) for n in (H, Hkv, Hkv))
    cos, sin = rope_tables(np.arange(5, 5 + T), Dh, 10000.0, np, dtype)
    q, k, v = qkv_heads(h, np.concatenate([wq, wk, wv], axis=1), cos, sin, H, Hkv, Dh)
    assert (q.shape, k.shape, v.shape) == ((H, T, Dh), (Hkv, T, Dh), (Hkv, T, Dh))
    assert q.dtype == k.dtype == v.dtype == dtype
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    for got, w, n, rotated in ((q, wq, H, True), (k, wk, Hkv, True), (v, wv, Hkv, False)):
        for head in range(n):                                      # head j owns columns j·Dh .. (j+1)·Dh - 1
            x = (h.astype(np.float64) @ w[:, head * Dh:(head + 1) * Dh])[None]          # [1, T, Dh]
            want = apply_rope(x, cos.astype(np.float64), sin.astype(np.float64))[0] if rotated else x[0]
            np.testing.assert_allclose(got[head], want, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_is_silu_gate_times_up_then_down_projection(dtype):
    rng = np.random.default_rng(4)
    T, D, F = 3, 8, 12
    x = rng.standard_normal((T, D)).astype(dtype)
    w1, w3, w2 = (rng.standard_normal(s).astype(dtype) for s in ((D, F), (D, F), (F, D)))
    y = swiglu(x, np.concatenate([w1, w3], axis=1), w2)
    assert y.shape == (T, D) and y.dtype == dtype
    g = x.astype(np.float64) @ w1
    expect = ((g / (1 + np.exp(-g))) * (x.astype(np.float64) @ w3)) @ w2
    np.testing.assert_allclose(y, expect, rtol=1e-4 if dtype == np.float32 else 1e-12, atol=1e-4)


def test_silu_does_not_overflow_for_large_negative_inputs():
    with np.errstate(all="raise"):
        y = silu(np.array([-1000.0, -80.0, 0.0, 80.0], dtype=np.float32))
    np.testing.assert_allclose(y, [0.0, -80.0 / (1 + np.exp(80.0)), 0.0, 80.0], atol=1e-30)


@pytest.mark.parametrize("T", [1, 2, 5, 12, 13, 40])
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_equals_the_matrix_product_for_every_row_count(T, dtype):
    from minispec.mistral.layers import linear
    rng = np.random.default_rng(T)
    x, w = rng.standard_normal((T, 7)).astype(dtype), rng.standard_normal((7, 5)).astype(dtype)
    y = linear(x, w)
    assert y.shape == (T, 5) and y.dtype == dtype
    np.testing.assert_allclose(y, x.astype(np.float64) @ w, rtol=1e-5 if dtype == np.float32 else 1e-13, atol=1e-5)
