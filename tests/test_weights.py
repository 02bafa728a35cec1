"""Checkpoint reading: safetensors by hand, BF16, name maps, the RoPE permutation, and clear refusals."""
import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import random_tensors, rel_err, tiny_config
from minispec.mistral.model import Model, load
from minispec.mistral.oracle import oracle_forward
from minispec.mistral.safetensors import CheckpointError, bf16_to_float32, read_safetensors
from minispec.mistral.weights import interleaved_to_half_rope, load_tensors

HF_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}


def to_hf(tensors):
    out = {}
    for k, v in tensors.items():
        if k in HF_NAMES:
            out[HF_NAMES[k]] = v
            continue
        _, i, *rest = k.split(".")
        sub = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
               "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
               "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
               "ffn_norm": "post_attention_layernorm"}[".".join(rest[:-1])]
        out[f"model.layers.{i}.{sub}.weight"] = v
    return out


def write_hf(folder, cfg, tensors):
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({
        "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers, "head_dim": cfg.head_dim,
        "intermediate_size": cfg.hidden_dim, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "vocab_size": cfg.vocab_size, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "sliding_window": cfg.sliding_window, "max_position_embeddings": cfg.max_seq_len}))
    save_file({k: np.ascontiguousarray(v) for k, v in to_hf(tensors).items()}, str(folder / "model.safetensors"))
    return folder


def test_bf16_is_widened_exactly_by_a_16_bit_shift():
    x = np.array([1.0, -2.5, 3.140625, 2.0 ** -100, -np.inf], dtype=np.float32)    # all exactly representable in bf16
    bits = (x.view(np.uint32) >> 16).astype(np.uint16)
    assert np.array_equal(bf16_to_float32(bits), x)


def test_bf16_file_reads_as_float32_rounded_values(tmp_path):
    x = np.array([[1.0, 0.5], [-3.0, 2.0 ** -10]], dtype=np.float32)
    header = json.dumps({"w": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]}}).encode()
    data = (x.view(np.uint32) >> 16).astype("<u2").tobytes()
    path = tmp_path / "x.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)
    assert np.array_equal(read_safetensors(path)["w"], x)


def test_f16_and_f32_tensors_read_back_exactly(tmp_path):
    a, b = np.arange(6, dtype=np.float16).reshape(2, 3) / 3, np.arange(4, dtype=np.float32) / 7
    save_file({"a": a, "b": b}, str(tmp_path / "m.safetensors"))
    t = read_safetensors(tmp_path / "m.safetensors")
    assert t["a"].dtype == np.float16 and np.array_equal(t["a"], a) and np.array_equal(t["b"], b)


def test_rope_permutation_maps_interleaved_pairs_to_rotate_half_pairs():
    n, Dh, D = 2, 6, 3
    w = np.arange(n * Dh * D, dtype=np.float64).reshape(n * Dh, D)
    out = interleaved_to_half_rope(w, n)
    for h in range(n):
        for i in range(Dh // 2):
            assert np.array_equal(out[h * Dh + i], w[h * Dh + 2 * i])
            assert np.array_equal(out[h * Dh + Dh // 2 + i], w[h * Dh + 2 * i + 1])


def test_hf_folder_loads_and_matches_the_oracle(tmp_path):
    cfg = tiny_config()
    t = random_tensors(cfg)
    m = load(write_hf(tmp_path / "m", cfg, t), dtype="float64", device="cpu")
    ids = np.arange(20) % cfg.vocab_size
    assert rel_err(m.forward(ids), oracle_forward(cfg, t, ids)) < 1e-12


def test_pickle_checkpoints_are_refused_with_the_reason(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"hidden_size": 8, "num_hidden_layers": 1, "intermediate_size": 8,
                                                    "num_attention_heads": 2, "vocab_size": 8}))
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*never"):
        load(folder, device="cpu")
    with pytest.raises(CheckpointError, match="(?i)unpickl"):
        read_safetensors(folder / "pytorch_model.bin")


def _break(tmp_path, edit):
    cfg = tiny_config()
    hf = to_hf(random_tensors(cfg))
    edit(hf)
    folder = write_hf(tmp_path / "m", cfg, {})
    save_file({k: np.ascontiguousarray(v) for k, v in hf.items()}, str(folder / "model.safetensors"))
    return folder


def test_missing_tensor_is_named(tmp_path):
    folder = _break(tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing.*layers\.1\.feed_forward\.w3\.weight.*\[48, 32\]"):
        load_tensors(folder)


def test_misshaped_tensor_names_the_key_and_both_shapes(tmp_path):
    folder = _break(tmp_path, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((8, 32), np.float32)}))
    with pytest.raises(CheckpointError, match=r"k_proj.weight.*\[8, 32\].*expected \[16, 32\]"):
        load_tensors(folder)


def test_unexpected_tensor_is_named(tmp_path):
    folder = _break(tmp_path, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(32, np.float32)}))
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.0.self_attn.q_proj.bias'"):
        load_tensors(folder)


def test_tensor_duplicated_across_shards_is_named(tmp_path):
    cfg = tiny_config()
    hf = {k: np.ascontiguousarray(v) for k, v in to_hf(random_tensors(cfg)).items()}
    folder = write_hf(tmp_path / "m", cfg, {})
    (folder / "model.safetensors").unlink()
    keys = sorted(hf)
    save_file({k: hf[k] for k in keys[:10]}, str(folder / "a.safetensors"))
    save_file({k: hf[k] for k in keys[9:]}, str(folder / "b.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {**{k: "a.safetensors" for k in keys[:10]}, **{k: "b.safetensors" for k in keys[10:]}}}))
    with pytest.raises(CheckpointError, match=f"'{keys[9]}' is duplicated"):
        load_tensors(folder)


def test_truncated_file_is_reported_with_its_path(tmp_path):
    path = tmp_path / "bad.safetensors"
    save_file({"w": np.zeros((4, 4), np.float32)}, str(path))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="bad.safetensors.*'w'"):
        read_safetensors(path)


def test_folder_without_config_says_what_it_looked_for(tmp_path):
    with pytest.raises(CheckpointError, match="config.json.*params.json"):
        load(tmp_path, device="cpu")


def test_large_files_are_memory_mapped_not_read(tmp_path):
    save_file({"w": np.ones((256, 256), np.float32)}, str(tmp_path / "m.safetensors"))
    w = read_safetensors(tmp_path / "m.safetensors")["w"]
    assert isinstance(w.base, np.memmap) or isinstance(w, np.memmap) or any(
        isinstance(b, np.memmap) for b in _bases(w))


def _bases(a):
    while a is not None:
        yield a
        a = getattr(a, "base", None)


def test_tied_embeddings_use_the_embedding_as_output_layer():
    cfg = tiny_config(tie_embeddings=True)
    t = random_tensors(cfg)
    assert "output.weight" not in t
    m = Model(cfg, t, dtype="float64", device="cpu")
    ids = np.arange(9)
    assert rel_err(m.forward(ids), oracle_forward(cfg, t, ids)) < 1e-12
