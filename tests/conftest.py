import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))   # tests/hostguard.py

from minispec.mistral.config import MistralConfig        # noqa: E402
from minispec.mistral.weights import canonical_names     # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).parent.parent
SHIPPED = REPO / "weights" / "stdlib-mistral"


def random_tensors(cfg, seed=0, scale=0.3):
    """Canonical tensors of a random model whose logits are far from uniform (norm weights around 1)."""
    rng = np.random.default_rng(seed)
    return {k: (1 + 0.1 * rng.standard_normal(s) if len(s) == 1 else scale * rng.standard_normal(s)).astype(np.float32)
            for k, s in canonical_names(cfg).items()}


def tiny_config(**kw):
    base = dict(dim=32, n_layers=2, head_dim=8, hidden_dim=48, n_heads=4, n_kv_heads=2, vocab_size=61,
                sliding_window=6, max_seq_len=256)
    base.update(kw)
    return MistralConfig(**base)


def numgrad(f, a, eps=1e-6, entries=None):
    """Central finite differences of the scalar f() with respect to every entry of array a (changed in place and
    restored), or only at the index tuples `entries` (the rest stay 0): the independent reference every
    hand-derived gradient is checked against."""
    g = np.zeros_like(a)
    for i in np.ndindex(a.shape) if entries is None else entries:
        old = a[i]
        a[i] = old + eps
        up = f()
        a[i] = old - eps
        down = f()
        a[i] = old
        g[i] = (up - down) / (2 * eps)
    return g


def rel_err(a, b):
    """max |a - b| / max |b|: the error measure every logit comparison in these tests uses."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture
def tiny():
    cfg = tiny_config()
    return cfg, random_tensors(cfg)


@pytest.fixture
def cli_model(tmp_path):
    """(folder, cfg, tensors): a tiny random model in HF layout with the shipped 4096-piece tokenizer, for the
    command line end to end (skipped where the tokenizer is not in the checkout)."""
    import shutil
    from test_weights import write_hf
    tokenizer = SHIPPED / "tokenizer.model"
    if not tokenizer.exists():
        pytest.skip("no shipped tokenizer")
    cfg = tiny_config(dim=16, n_layers=1, head_dim=8, hidden_dim=24, n_heads=2, n_kv_heads=1, vocab_size=4096,
                      sliding_window=8)
    tensors = random_tensors(cfg, seed=1)
    folder = write_hf(tmp_path / "model", cfg, tensors)
    shutil.copy(tokenizer, folder / "tokenizer.model")
    return folder, cfg, tensors


def code_corpus(path):
    """A small text file of Python-like documents separated by NUL lines (what --text reads)."""
    path.write_text("\n\0\n".join(f"def f{i}(x):\n    return x + {i}\n" * 3 for i in range(12)))
    return path


def assert_lossless(model, decoder, ids=(1, 5, 3), n=40, tol=1e-12):
    """A speculative decoder's greedy tokens == AR's, and its committed cache == AR's at the same length: both
    caches must hold exactly the prompt and the output minus its newest token, even when the decoder's last step
    accepted more than max_new_tokens allowed. Returns the decoder's stats."""
    from minispec import generate
    cache = model.new_cache()
    spec = generate(model, list(ids), decoder=decoder, max_new_tokens=n, eos_id=None, cache=cache)
    ar_cache = model.new_cache()
    ar = generate(model, list(ids), max_new_tokens=n, eos_id=None, cache=ar_cache)
    assert spec.tokens == ar.tokens
    assert cache.pos == ar_cache.pos == len(ids) + n - 1
    assert rel_err(cache.keys, ar_cache.keys) < tol and rel_err(cache.values, ar_cache.values) < tol
    return spec.stats
