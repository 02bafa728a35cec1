"""The naive oracle is itself checked against sources that do not involve minispec's model code."""
import numpy as np
import pytest

from conftest import FIXTURES, rel_err
from minispec.mistral.oracle import native_rope_rows, oracle_forward
from minispec.mistral.weights import load_config, load_tensors, read_safetensors


@pytest.mark.parametrize("name", ["mha_w8", "gqa2_nowin", "gqa4_hd", "mqa_w6_v5cfg"])
def test_the_oracle_matches_hf_pure_float64_logits_to_1e_12(name):
    ref = read_safetensors(FIXTURES / name / "reference.safetensors")
    cfg, _ = load_config(FIXTURES / name)
    got = oracle_forward(cfg, load_tensors(FIXTURES / name), np.array(ref["ids"]))
    assert rel_err(got, np.array(ref["logits_f64"])) < 1e-12


def test_the_oracles_unpermuted_q_k_rows_are_the_consolidated_checkpoints_rows():
    # gqa4_hd_consolidated was written by tools/make_reference.py (through torch, not minispec) in Mistral's
    # interleaved layout; the oracle's own inverse permutation of the HF rows must give back exactly those rows.
    cfg, _ = load_config(FIXTURES / "gqa4_hd")
    hf = read_safetensors(FIXTURES / "gqa4_hd" / "model.safetensors")
    native = read_safetensors(FIXTURES / "gqa4_hd_consolidated" / "consolidated.safetensors")
    for layer in range(cfg.n_layers):
        for proj, heads in (("q", cfg.n_heads), ("k", cfg.n_kv_heads)):
            w = np.array(hf[f"model.layers.{layer}.self_attn.{proj}_proj.weight"])
            want = np.array(native[f"layers.{layer}.attention.w{proj}.weight"])
            assert np.array_equal(native_rope_rows(w, heads), want)


def test_native_rope_rows_is_a_permutation_that_keeps_each_heads_rows_inside_the_head():
    # Dh = 4, two heads: HF rows (0, 1 | 2, 3) of a head hold pairs (0, 2), (1, 3) -> native (0, 2, 1, 3)
    w = np.arange(8, dtype=np.float64)[:, None]
    assert native_rope_rows(w, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
