"""The shipped model (weights/stdlib-mistral): HF's logits, golden greedy completions, the data card's loss.

References come from HF transformers run on the shipped bf16 files (tools/make_shipped_reference.py) and from
the PyTorch evaluation that wrote the data card (tools/datacard.py) — never from minispec itself.
"""
import json

import numpy as np
import pytest

from conftest import FIXTURES, SHIPPED, rel_err
from minispec import generate, load
from minispec.mistral.tokenizer import Tokenizer
from minispec.mistral.weights import read_safetensors

SEPARATOR = "\n\0\n"        # between files in heldout_sample.txt (tools/collect_corpus.py)


@pytest.fixture(scope="module")
def model():
    return load(SHIPPED, device="cpu")


@pytest.fixture(scope="module")
def ref():
    return {k: np.array(v) for k, v in read_safetensors(FIXTURES / "stdlib-mistral_reference.safetensors").items()}


def test_shipped_files_are_hf_layout_bf16_with_a_sentencepiece_tokenizer():
    cfg = json.loads((SHIPPED / "config.json").read_text())
    header_len = int.from_bytes((SHIPPED / "model.safetensors").read_bytes()[:8], "little")
    header = json.loads((SHIPPED / "model.safetensors").read_bytes()[8:8 + header_len])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    assert cfg["model_type"] == "mistral" and cfg["num_key_value_heads"] < cfg["num_attention_heads"]
    assert cfg["sliding_window"] < 4 * cfg["sliding_window"] <= cfg["max_position_embeddings"]
    tok = Tokenizer.from_dir(SHIPPED)
    assert (tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2) and tok.vocab_size == cfg["vocab_size"]


def test_logits_on_held_out_text_match_hf_transformers_past_three_windows(model, ref):
    assert len(ref["ids"]) > 3 * model.config.sliding_window
    got = model.forward(ref["ids"])[ref["rows"]]
    assert rel_err(got, ref["logits"]) < 1e-4


def test_rolling_cache_decoding_matches_hf_logits_on_the_shipped_model(model, ref):
    cache = model.new_cache()
    ids = ref["ids"]
    parts = [model.forward(ids[:100], cache)] + [model.forward(ids[i:i + 1], cache) for i in range(100, len(ids))]
    assert rel_err(np.concatenate(parts)[ref["rows"]], ref["logits"]) < 1e-4


@pytest.mark.parametrize("i", [0, 1])
def test_golden_greedy_completion_equals_hf_generate(model, ref, i):
    prompt, golden = ref[f"golden{i}_prompt"], ref[f"golden{i}_tokens"]
    out = generate(model, prompt, max_new_tokens=len(golden), eos_id=None)
    assert out.tokens == golden.tolist()


def test_held_out_loss_matches_the_data_card_within_one_percent(model):
    card = json.loads((SHIPPED / "datacard.json").read_text())["heldout_sample"]
    tok = Tokenizer.from_dir(SHIPPED)
    docs = (SHIPPED / "heldout_sample.txt").read_text(encoding="utf-8").split(SEPARATOR)
    ids = np.concatenate([[tok.bos_id] + tok.encode(d, bos=False) + [tok.eos_id] for d in docs]).astype(np.int64)
    ctx, total, count = card["ctx"], 0.0, 0
    for s in range(0, len(ids) - 1, ctx):          # non-overlapping windows, as the card's evaluation
        x, y = ids[s:s + ctx], ids[s + 1:s + ctx + 1]
        x = x[:len(y)]
        logits = model.forward(x).astype(np.float64)
        m = logits.max(-1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
        total -= logp[np.arange(len(y)), y].sum()
        count += len(y)
    assert count == card["tokens"]
    assert abs(total / count - card["loss"]) < 0.01 * card["loss"]


def test_greedy_medusa_on_the_shipped_model_equals_ar_across_the_window_with_the_same_cache(model):
    """Several windows of generation (the ring wraps twice): identical tokens, identical final cache, and the
    shipped heads really speculate (some steps emit more than one token)."""
    tok = Tokenizer.from_dir(SHIPPED)
    prompt = tok.encode("import os\nimport sys\n\n\ndef main(argv):\n")
    n = 2 * model.config.sliding_window + 40
    c_ar, c_md = model.new_cache(), model.new_cache()
    ar = generate(model, prompt, decoder="ar", max_new_tokens=n, eos_id=None, cache=c_ar)
    md = generate(model, prompt, decoder="medusa", max_new_tokens=n, eos_id=None, cache=c_md, gate=False)
    assert md.tokens == ar.tokens
    assert c_md.pos == c_ar.pos == len(prompt) + n - 1
    assert rel_err(c_md.keys, c_ar.keys) < 1e-5 and rel_err(c_md.values, c_ar.values) < 1e-5
    assert md.stats.tau > 1.2 and md.stats.steps < ar.stats.steps


def test_the_readme_command_streams_text_and_reports_tau_and_speed(capsys):
    """`minispec generate` (the README's main job) on the shipped model: streamed text, then the statistics."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "minispec", "generate", "--decoder", "medusa", "--device", "cpu",
                        "--prompt", "def quicksort(arr):", "-n", "24", "--temperature", "0.7", "--top-p", "0.9"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("def quicksort(arr):") and len(r.stdout) > len("def quicksort(arr):") + 10
    assert "[medusa] 24 tokens" in r.stderr and "tau = " in r.stderr and "tokens/s" in r.stderr
