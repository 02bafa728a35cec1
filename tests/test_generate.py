"""generate(): plain decoding through the shared verifier, its stops and its statistics."""
import numpy as np
import pytest

from conftest import random_tensors, tiny_config
from minispec import generate
from minispec.mistral.model import Model
from minispec.mistral.oracle import oracle_forward


@pytest.fixture(scope="module")
def model():
    cfg = tiny_config(sliding_window=5, vocab_size=40)
    t = random_tensors(cfg, seed=7)
    return cfg, t, Model(cfg, t, dtype="float64", device="cpu")


def test_greedy_generation_equals_argmax_of_the_naive_oracle_token_by_token(model):
    cfg, t, m = model
    ids = [1, 7, 3]
    out = generate(m, ids, max_new_tokens=18, eos_id=None)
    seq = list(ids)
    for _ in range(18):
        seq.append(int(np.argmax(oracle_forward(cfg, t, seq)[-1])))
    assert out.tokens == seq[3:]


def test_max_new_tokens_is_exact_and_the_stats_add_up(model):
    _, _, m = model
    out = generate(m, [1, 2], max_new_tokens=11, eos_id=None)
    s = out.stats
    assert len(out.tokens) == 11 == s.new_tokens and s.steps == 11 and s.tau == 1.0
    assert s.histogram.tolist() == [0, 11] and s.forward_calls == 12     # one prefill chunk + 11 steps
    assert s.tokens_per_s > 0 and s.wall_time >= s.decode_time
    assert 0 < s.decode_cpu_time and s.propose_time + s.verify_time <= s.decode_time
    assert generate(m, [1, 2], max_new_tokens=0).tokens == []


def test_generation_stops_right_after_eos(model):
    _, _, m = model
    free = generate(m, [1, 2], max_new_tokens=30, eos_id=None).tokens
    eos = free[6]
    first = free.index(eos)
    out = generate(m, [1, 2], max_new_tokens=30, eos_id=eos)
    assert out.tokens == free[:first + 1]


def test_sampling_is_reproducible_with_a_seed_and_varies_across_seeds(model):
    _, _, m = model
    a = generate(m, [1], max_new_tokens=15, temperature=1.0, seed=3, eos_id=None).tokens
    b = generate(m, [1], max_new_tokens=15, temperature=1.0, seed=3, eos_id=None).tokens
    c = generate(m, [1], max_new_tokens=15, temperature=1.0, seed=4, eos_id=None).tokens
    assert a == b and a != c


def test_bad_arguments_are_named(model):
    _, _, m = model
    with pytest.raises(ValueError, match="decoder"):
        generate(m, [1], decoder="nope")
    with pytest.raises(ValueError, match="temperature"):
        generate(m, [1], temperature=-1)
    with pytest.raises(ValueError, match="prompt"):
        generate(m, [])
    with pytest.raises(ValueError, match="greedy"):
        generate(m, [1], temperature=1.0, acceptance="greedy")
