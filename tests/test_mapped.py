"""Mapped 16-bit weights (minispec/mapped.py) and float16: a CI-sized Mistral-shaped bf16 checkpoint made by
tools/make_shaped_checkpoint.py (D=1024, 2 layers, F=3584, V=4096, W=8 so the rolling cache wraps).

Expected values come from the widened model (every matrix widened to float32 at load, one BLAS call per
matrix), which the package's other tests check against the naive oracle and HF transformers' logits."""
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES, REPO, rel_err

import minispec
from minispec.mistral import mapped as mapped_mod
from minispec.mistral import model as model_mod
from minispec.mistral.layers import rms_norm, softmax
from minispec.mistral.mapped import MappedMatrix, Workspace
from minispec.mistral.weights import load_config, load_tensors

sys.path.insert(0, str(REPO / "tools"))
import make_shaped_checkpoint  # noqa: E402

CI_SHAPE = dict(dim=1024, n_layers=2, n_heads=8, n_kv_heads=2, hidden_dim=3584, vocab_size=4096, sliding_window=8)


@pytest.fixture(scope="module")
def shaped(tmp_path_factory):
    """(HF folder, consolidated folder) of the same random bf16 weights."""
    root = tmp_path_factory.mktemp("shaped")
    hf = make_shaped_checkpoint.make(root / "hf", shard_gb=0.03, tokenizer=False, **CI_SHAPE)
    cons = make_shaped_checkpoint.make(root / "cons", layout="consolidated", tokenizer=False, **CI_SHAPE)
    return hf, cons


def test_the_shaped_checkpoint_has_the_hf_layout_of_mistral_7b_with_shards_and_an_index(shaped):
    hf, _ = shaped
    index = __import__("json").loads((hf / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in hf.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(np.prod(s) * 2 for _, s in make_shaped_checkpoint.tensor_list(
        dict(make_shaped_checkpoint.MISTRAL_7B_V01, **CI_SHAPE), "hf"))
    assert "model.layers.1.mlp.down_proj.weight" in index["weight_map"] and "lm_head.weight" in index["weight_map"]


def test_mistral_7b_shapes_add_up_to_the_real_checkpoints_14_48_gb():
    # mistralai/Mistral-7B-v0.1's model.safetensors.index.json: "total_size": 14483464192
    total = sum(np.prod(s) * 2 for _, s in make_shaped_checkpoint.tensor_list(make_shaped_checkpoint.MISTRAL_7B_V01, "hf"))
    assert total == 14483464192


def eager(folder):
    """The widened model from tensors read eagerly (bf16 widened at read, RoPE rows permuted as arrays):
    none of the Tensor16 code paths."""
    config, layout = load_config(folder)
    return minispec.Model(config, load_tensors(folder, config, layout), device="cpu", weights="widened")


@pytest.mark.parametrize("layout", ["hf", "consolidated"])
def test_mapped_logits_are_bit_identical_to_widened_logits_for_every_block_size(shaped, layout):
    folder = shaped[0] if layout == "hf" else shaped[1]
    wide = eager(folder)
    mapped = minispec.load(folder, device="cpu", weights="mapped")
    assert mapped.storage == "mapped" and isinstance(mapped.layers[0]["w13"], MappedMatrix)
    # several blocks per matrix in the gemv path (4 MB float32 blocks of w13, 29 MB widened), whole-matrix GEMM above
    # 12 rows
    w13 = mapped.layers[0]["w13"]
    assert Workspace.block_rows(w13.n_in, w13.n_out) * 4 < w13.n_out
    for T in (1, 2, 5, 12, 13, 20):
        ids = (np.arange(T) * 37 + 5) % wide.config.vocab_size
        assert np.array_equal(mapped.forward(ids), wide.forward(ids)), T


@pytest.mark.parametrize("threads", [1, 3])
def test_mapped_logits_are_bit_identical_to_widened_logits_whatever_the_number_of_threads(shaped, monkeypatch,
                                                                                       threads):
    """Each thread takes whole blocks, whichever it gets, so the split moves no output from one dot product to
    another (3 threads: more threads than some matrices have blocks; the default is the test above)."""
    monkeypatch.setattr(mapped_mod, "THREADS", threads)
    wide = eager(shaped[0])
    mapped = minispec.load(shaped[0], device="cpu", weights="mapped")
    assert mapped.layers[0]["w13"].ws.threads == threads
    for T in (1, 3, 13):
        ids = (np.arange(T) * 29 + 3) % wide.config.vocab_size
        assert np.array_equal(mapped.forward(ids), wide.forward(ids)), T


class Failing:
    """A 16-bit part whose rows from `bad` on cannot be widened (as a NaN row would be refused)."""

    def __init__(self, rows, cols, bad):
        self.shape, self.nbytes, self.bad = (rows, cols), rows * cols * 2, bad

    def widen_rows(self, start, stop, out):
        if stop > self.bad:
            raise ValueError(f"row {self.bad} refused")
        out[:] = 1.0
        return out


def test_an_error_in_another_threads_blocks_is_raised_by_the_product_and_the_next_product_still_runs():
    ws = Workspace(threads=2)
    rows = Workspace.block_rows(64, 10 ** 6)
    bad = MappedMatrix([Failing(4 * rows, 64, bad=3 * rows)], ws)          # the last block: the helper's half
    with pytest.raises(ValueError, match="refused"):
        np.ones(64, np.float32) @ bad
    good = MappedMatrix([Failing(4 * rows, 64, bad=4 * rows)], ws)
    assert np.array_equal(np.ones((2, 1, 64), np.float32) @ good, np.full((2, 1, 4 * rows), 64.0, np.float32))


def test_mapped_logits_are_bit_identical_on_the_bf16_fixture():
    ids = np.arange(40) * 11 % 256
    wide = minispec.load(FIXTURES / "gqa4_hd_bf16", device="cpu", weights="widened")
    mapped = minispec.load(FIXTURES / "gqa4_hd_bf16", device="cpu", weights="mapped")
    assert np.array_equal(mapped.forward(ids), wide.forward(ids))


def test_mapped_decoding_through_the_wrapping_rolling_cache_equals_widened_decoding(shaped):
    wide = minispec.load(shaped[0], device="cpu", weights="widened")
    mapped = minispec.load(shaped[0], device="cpu", weights="mapped")
    prompt = [1, 17, 300, 42, 9]
    a = minispec.generate(wide, prompt, max_new_tokens=14, eos_id=None)     # 19 positions: 2 turns of W = 8
    b = minispec.generate(mapped, prompt, max_new_tokens=14, eos_id=None)
    assert a.tokens == b.tokens
    ca, cb = wide.new_cache(), mapped.new_cache()
    la = [wide.forward([t], ca) for t in prompt + a.tokens]
    lb = [mapped.forward([t], cb) for t in prompt + a.tokens]
    assert all(np.array_equal(x, y) for x, y in zip(la, lb))
    assert np.array_equal(ca.keys, cb.keys) and np.array_equal(ca.values, cb.values)


def test_a_prefill_widens_each_matrix_once_per_chunk_not_once_per_token(shaped):
    mapped = minispec.load(shaped[0], device="cpu", weights="mapped")
    cache = mapped.new_cache()
    mapped.forward(np.arange(20), cache)                    # chunks of W = 8 tokens: 8, 8, 4
    mats = [mapped.output] + [w for lw in mapped.layers for k, w in lw.items() if "norm" not in k]
    assert [m.passes for m in mats] == [3] * len(mats)
    mapped.forward_block(np.arange(5), cache)               # a 5-token verification block: one more pass
    assert [m.passes for m in mats] == [4] * len(mats)


PROBE = textwrap.dedent("""
    import sys, numpy as np, minispec
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    anon0, file0 = status("RssAnon"), status("RssFile")
    m = minispec.load(sys.argv[1], device="cpu", weights="mapped")
    anon1, file1 = status("RssAnon"), status("RssFile")
    c = m.new_cache()
    for t in range(6):
        m.forward([t], c)
    print(anon1 - anon0, file1 - file0, status("RssAnon") - anon0)
""")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_loading_mapped_reads_no_weights_and_decoding_keeps_private_memory_far_below_float32_size(shaped):
    folder = shaped[0]
    file_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    out = subprocess.run([sys.executable, "-c", PROBE, str(folder)], capture_output=True, text=True, cwd=REPO,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    anon_load, file_load, anon_decode = map(int, out.stdout.split())
    # fresh process: load maps the files and reads their headers only (RssFile counts pages this process touched)
    assert file_load < 0.02 * file_bytes and anon_load < 0.02 * file_bytes
    # decoding: private memory is one block buffer per thread, the cache and activations, not 2x the file in
    # float32 (a buffer the size of the largest matrix, w13, would be 29 MB here)
    buffers = mapped_mod.THREADS * mapped_mod.GEMV_BLOCK_BYTES
    assert anon_decode < buffers + 0.1 * (2 * file_bytes), (anon_decode, buffers, file_bytes)


def test_auto_storage_maps_exactly_when_the_widened_model_would_not_fit(shaped, monkeypatch):
    f32_bytes = 2 * sum(p.stat().st_size for p in shaped[0].glob("*.safetensors"))
    monkeypatch.setattr(model_mod, "available_memory", lambda: int(f32_bytes * 1.2))        # 0.75 x 1.2 < 1
    assert minispec.load(shaped[0], device="cpu").storage == "mapped"
    monkeypatch.setattr(model_mod, "available_memory", lambda: int(f32_bytes * 1.5))
    assert minispec.load(shaped[0], device="cpu").storage == "widened"
    assert minispec.load(FIXTURES / "gqa4_hd", device="cpu").storage == "widened"          # float32 checkpoint


def test_mapped_weights_refuse_a_float32_checkpoint_and_a_float64_dtype_with_clear_errors(shaped):
    with pytest.raises(ValueError, match="needs a bf16 or float16 checkpoint; tensor '[a-z_.]+' is float32"):
        minispec.load(FIXTURES / "gqa4_hd", device="cpu", weights="mapped")
    with pytest.raises(ValueError, match="dtype must be 'float32', not 'float64'"):
        minispec.load(shaped[0], device="cpu", weights="mapped", dtype="float64")
    with pytest.raises(ValueError, match="weights must be one of"):
        minispec.load(shaped[0], device="cpu", weights="lazy")


# ---- float16 -----------------------------------------------------------------------------------------------------
# Tolerance of float16 logits against float32: 2e-2 of max |logit| (float16 keeps 11 significant bits, eps 9.8e-4;
# a few layers of rounding in the residual stream and the attention add up). Measured on gqa4_hd_bf16: 4.9e-3.
FP16_TOL = 2e-2


@pytest.mark.parametrize("fixture", ["gqa4_hd_bf16", "gqa4_hd"])
def test_float16_logits_are_float32_and_within_tolerance_of_the_float32_model(fixture):
    ids = np.arange(30) * 7 % 256
    ref = minispec.load(FIXTURES / fixture, device="cpu").forward(ids)
    m16 = minispec.load(FIXTURES / fixture, device="cpu", dtype="float16")
    assert m16.layers[0]["wqkv"].dtype == np.float16 and m16.output.dtype == np.float32
    cache = m16.new_cache()
    for logits in (m16.forward(ids), np.concatenate([m16.forward(ids[i:i + 1], cache) for i in range(30)])):
        assert logits.dtype == np.float32
        assert rel_err(logits, ref) < FP16_TOL


def test_float16_rms_norm_takes_its_statistic_in_float32_where_squares_overflow():
    x = np.full((2, 64), 300.0)                                     # 300² = 9e4 > 65504: inf in float16
    out = rms_norm(x.astype(np.float16), np.ones(64, np.float16), 1e-5)
    assert out.dtype == np.float16 and np.allclose(out.astype(np.float64), 1.0, atol=1e-3)


def test_float16_softmax_keeps_small_probabilities_and_returns_float16():
    x = np.array([[0.0] + [-12.0] * 4000], np.float16)                # p[-12] = 6e-6 each, sum 0.024
    p = softmax(x)
    expected = np.exp(x.astype(np.float64)) / np.exp(x.astype(np.float64)).sum()
    assert p.dtype == np.float16 and abs(float(p[0, 0]) - expected[0, 0]) < 1e-3


def test_a_bf16_tensor_beyond_float16_range_is_refused_by_name(tmp_path):
    folder = make_shaped_checkpoint.make(tmp_path / "big", tokenizer=False, dim=32, n_layers=1, n_heads=4,
                                         n_kv_heads=2, hidden_dim=64, vocab_size=64, sliding_window=8)
    f = folder / "model.safetensors"
    hdr_len = int.from_bytes(f.read_bytes()[:8], "little")
    header = __import__("json").loads(f.read_bytes()[8:8 + hdr_len])
    start = 8 + hdr_len + header["model.layers.0.mlp.up_proj.weight"]["data_offsets"][0]
    data = bytearray(f.read_bytes())
    data[start:start + 2] = np.array([0x47C3], np.uint16).tobytes()  # bf16 0x47C3 = 99840 > 65504
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"'layers.0.feed_forward.w3.weight': max \|w\| = 9.984e\+04 does not fit float16"):
        minispec.load(folder, device="cpu", dtype="float16")
    assert minispec.load(folder, device="cpu").forward([1, 2]).dtype == np.float32   # float32 is fine


def test_mapped_matrices_read_as_arrays_equal_the_widened_model_arrays():
    wide = minispec.load(FIXTURES / "gqa4_hd_bf16", device="cpu", weights="widened")
    mapped = minispec.load(FIXTURES / "gqa4_hd_bf16", device="cpu", weights="mapped")
    for name in ("wqkv", "wo", "w13", "w2"):
        assert np.array_equal(np.asarray(mapped.layers[1][name]), wide.layers[1][name]), name
    assert np.array_equal(mapped.output.copy(), wide.output) and np.array_equal(mapped.output[None][0], wide.output)
    assert np.array_equal(mapped.tok_embeddings[np.array([3, 0, 3])], wide.tok_embeddings[[3, 0, 3]])
    # a decode step reads the matrices in 16 bits (half their float32 bytes) and the norm vectors in float32
    norms = sum(4 * lw[k].size for lw in wide.layers for k in ("attention_norm", "ffn_norm")) + 4 * wide.norm.size
    assert mapped.weight_bytes() - norms == (wide.weight_bytes() - norms) // 2


def test_widening_float16_bits_gives_numpys_own_conversion_for_every_finite_float16():
    from minispec.mistral.weights import Tensor16
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    finite = bits[(bits & 0x7C00) != 0x7C00]                                 # 63488 patterns, ±0 and subnormals
    half = finite.view(np.float16).reshape(248, 256)
    out = Tensor16(half, "F16").widen()
    assert np.array_equal(out.view(np.uint32), half.astype(np.float32).view(np.uint32))   # -0.0 keeps its sign


def times(x, w):
    return x @ w


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_a_forked_child_runs_split_products_on_threads_of_its_own():
    import multiprocessing
    ws = Workspace(threads=2)
    rows = Workspace.block_rows(64, 10 ** 6)
    w = MappedMatrix([Failing(4 * rows, 64, bad=4 * rows)], ws)
    x = np.ones(64, np.float32)
    assert np.array_equal(x @ w, np.full(4 * rows, 64.0, np.float32))     # the helper thread now exists here
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        result = pool.apply_async(times, (x, w))
        assert np.array_equal(result.get(timeout=30), np.full(4 * rows, 64.0, np.float32))
