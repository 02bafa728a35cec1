"""Prompt lookup decoding and the cost rule that sizes its drafts.

References are independent of the code under test: hand-worked n-gram matches and a naive scan over every
earlier position (the index's oracle), hand-computed tokens-per-time of the cost rule, plain greedy decoding
(tokens and cache, conftest.assert_lossless), and the autoregressive joint of the next two tokens from the naive
float64 oracle for the χ² tests.
"""
import numpy as np
import pytest

from conftest import SHIPPED, assert_lossless, random_tensors, tiny_config
from hostguard import GUARD
from minispec import generate
from minispec.decoders.lookup import LookupProposer, NgramIndex
from minispec.decoders.registry import DECODERS
from minispec.errors import UserError
from minispec.mistral.model import Model
from minispec.mistral.oracle import oracle_forward
from minispec.speculative.draft_length import AcceptanceEstimate, best_draft_length, expected_tokens
from minispec.speculative.sampling import SamplingParams
from test_sampling import SAME, chi2_test, reference_probs

FLAT = {1: 1.0, 64: 1.0}                 # a GPU-shaped cost curve: verifying more tokens costs nothing extra
STEEP = {1: 1.0, 2: 10.0, 64: 100.0}     # no draft can pay


def tiny(W=6, V=24, seed=0, dtype="float64", device="cpu"):
    cfg = tiny_config(sliding_window=W, vocab_size=V)
    t = random_tensors(cfg, seed=seed)
    return cfg, t, Model(cfg, t, dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------------------
# 1. The n-gram match

def matched(text, min_n=1, max_n=3, which="last", max_len=4):
    index = NgramIndex(min_n, max_n)
    index.extend(text)
    n, start = index.match(which)
    return n, start, (index.continuation(start, max_len) if n else None)


def test_the_longest_suffix_that_occurred_before_proposes_what_followed_it_hand_worked():
    text = [5, 6, 7, 8, 5, 6, 9, 5, 6]           # suffix "5 6" occurred at 0..1 and 4..5; "9 5 6" never before
    assert matched(text, which="first") == (2, 2, [7, 8, 5, 6])                 # HF / PLD: the first occurrence
    assert matched(text, which="last") == (2, 6, [9, 5, 6, 9])                  # the latest, then periodic: 9 5 6 9
    assert matched(text, max_n=1, which="first") == (1, 2, [7, 8, 5, 6])        # only unigrams: "6" first at 1
    assert matched([1, 2, 3], which="first") == (0, None, None)                 # nothing repeats
    assert matched([1, 2, 3, 2], min_n=2) == (0, None, None)                    # "2" repeats, but 1-grams are off
    # the longer match wins although a shorter suffix occurred later: "2 3 4" at 1..3, "3 4" also at 6..7
    assert matched([1, 2, 3, 4, 9, 9, 3, 4, 0, 2, 3, 4]) == (3, 4, [9, 9, 3, 4])
    assert matched([4, 7, 7], max_len=5) == (1, 2, [7, 7, 7, 7, 7])             # period 1: the text repeats "7"


def naive_match(text, min_n, max_n, which):
    """Scan every earlier position for each suffix length, longest first: (n, index after the occurrence)."""
    L = len(text)
    for n in range(min(max_n, L - 1), min_n - 1, -1):
        ends = [i + n - 1 for i in range(L - n) if text[i:i + n] == text[L - n:]]
        if ends:
            return n, (ends[0] if which == "first" else ends[-1]) + 1
    return 0, None


@pytest.mark.parametrize("which", ["first", "last"])
def test_the_index_finds_the_same_match_as_a_naive_scan_while_the_text_grows(which):
    rng = np.random.default_rng(0)
    for trial in range(60):
        min_n, max_n = sorted(rng.integers(1, 5, size=2))
        text = rng.integers(0, 1 + trial % 5, size=rng.integers(1, 40)).tolist()     # small vocabularies repeat
        index = NgramIndex(int(min_n), int(max_n))
        for cut in range(0, len(text), 7):            # extended in pieces, as observe() does
            index.extend(text[cut:cut + 7])
            assert index.match(which) == naive_match(text[:cut + 7], min_n, max_n, which), (trial, cut)


# ---------------------------------------------------------------------------------------------------------
# 2. The cost rule

def test_expected_tokens_is_one_plus_the_sum_of_the_products_of_acceptance_along_the_chain():
    assert expected_tokens([0.8, 0.5, 0.1], 0) == 1.0
    assert expected_tokens([0.8, 0.5, 0.1], 3) == pytest.approx(1 + 0.8 + 0.4 + 0.04)


def test_the_draft_length_maximises_tokens_per_unit_time_hand_computed():
    costs = {1: 1.0, 2: 1.2, 3: 1.5, 4: 2.0}
    # K = 0: 1/1;  K = 1: 1.8/1.2 = 1.5;  K = 2: 2.2/1.5 = 1.467;  K = 3: 2.24/2.0 = 1.12
    assert best_draft_length([0.8, 0.5, 0.1], costs, 3) == (1, pytest.approx(1.5))
    assert best_draft_length([0.8, 0.5, 0.1], costs, 0) == (0, 1.0)               # nothing found: plain decoding
    # nothing pays: K = 1: 1.1/1.2 = 0.917; K = 2: 1.19/1.5 = 0.793
    assert best_draft_length([0.1, 0.9], costs, 2) == (0, 1.0)
    # the draft's own cost per token r: K = 1 gives 1.8/(1.2 + 0.5) = 1.06 with r = 0.5, 1.8/1.9 = 0.947 with r = 0.7
    assert best_draft_length([0.8], costs, 1, draft_cost=0.5) == (1, pytest.approx(1.8 / 1.7))
    assert best_draft_length([0.8], costs, 1, draft_cost=0.7)[0] == 0
    # a flat curve (a GPU's): every token with any chance of acceptance pays
    assert best_draft_length([0.9, 0.2, 0.05], FLAT, 3)[0] == 3


def test_the_acceptance_estimate_counts_reached_and_accepted_depths_with_a_prior_and_fades_hand_worked():
    e = AcceptanceEstimate(3, prior=0.5, weight=2.0, decay=1.0)
    np.testing.assert_allclose(e.acc, [0.5, 0.5, 0.5])
    e.observe(drafted=3, accepted=1)          # depths 1 and 2 reached, depth 1 accepted
    a1 = (1 + 2 * 0.5) / (1 + 2)
    a2 = (0 + 2 * a1) / (1 + 2)                # depth 2's prior: depth 1's estimate
    np.testing.assert_allclose(e.acc, [a1, a2, a2])
    e = AcceptanceEstimate(3, prior=0.5, weight=2.0, decay=0.5)
    e.observe(3, 1)
    e.observe(0, 0)                            # a step without a draft only fades: reached [.5, .5, 0]
    assert e.acc[0] == pytest.approx((0.5 + 1) / (0.5 + 2))


# ---------------------------------------------------------------------------------------------------------
# 3. Greedy: exactly AR's tokens and cache

def test_greedy_lookup_emits_exactly_the_ar_tokens_and_cache_across_window_wraps():
    kinds = {"full": 0, "partial": 0, "reject": 0, "none": 0}
    for W in (4, 5, 6, 8):
        for seed in range(3):
            _, _, m = tiny(W=W, seed=10 * W + seed)
            for options in (dict(sizing="max", max_draft=4), dict(costs={1: 1.0, 2: 1.3, 9: 2.5}, max_ngram=2)):
                stats = assert_lossless(m, LookupProposer(m, **options), ids=[1, 5, 3, 1, 5, 7, 1, 5], n=5 * W)
                for a, d in zip(stats.accepted[:-1], stats.drafted[:-1]):
                    kinds["none" if d == 0 else "full" if a - 1 == d else "reject" if a == 1 else "partial"] += 1
    assert all(v > 0 for v in kinds.values()), kinds


def test_lookup_never_exceeds_max_new_tokens_and_stops_right_after_eos():
    _, _, m = tiny(W=5, seed=5)
    prompt = [1, 2, 3, 1, 2]
    free = generate(m, prompt, max_new_tokens=30, eos_id=None).tokens
    for n in (0, 1, 2, 3, 7, 12):
        assert generate(m, prompt, decoder="lookup", sizing="max", max_new_tokens=n, eos_id=None).tokens == free[:n]
    for eos in dict.fromkeys(free[3:20]):
        first = free.index(eos)
        out = generate(m, prompt, decoder="lookup", costs=FLAT, max_new_tokens=30, eos_id=eos)
        assert out.tokens == free[:first + 1]


def test_the_cost_rule_drafts_nothing_where_no_draft_pays_and_everything_found_where_verifying_is_free():
    _, _, m = tiny(W=6, seed=2)
    prompt = [1, 5, 3, 1, 5, 7, 1, 5]
    steep = generate(m, prompt, decoder="lookup", costs=STEEP, max_new_tokens=30, eos_id=None).stats
    assert sum(steep.drafted) == 0 and steep.counters["lookup.matched"] > 0        # it found, and drafted nothing
    flat = generate(m, prompt, decoder="lookup", costs=FLAT, max_draft=5, max_new_tokens=30, eos_id=None).stats
    assert set(flat.drafted) <= {0, 5} and flat.drafted.count(5) == flat.counters["lookup.matched"]


def test_the_estimate_learns_from_the_emitted_tokens_even_while_nothing_is_drafted():
    """c(T) = 1 + 0.6 (T - 1): at the prior (0.5 at every depth) no draft pays (1.5 / 1.6 < 1, and longer ones
    earn less still), so every step starts plain. The chain found is judged against the emitted tokens all
    the same (ContextChain), and on a text that repeats itself the estimate rises until drafts pay: drafting
    starts. An estimate fed only by drafted tokens would stay at its prior and never draft."""
    _, _, m = tiny(W=6, V=5, seed=4)
    costs = {1: 1.0, 9: 5.8}
    prompt = [1, 3, 2, 1, 3, 2, 1, 3]
    stats = assert_lossless(m, LookupProposer(m, costs=costs), ids=prompt, n=40)
    first = next(i for i, d in enumerate(stats.drafted) if d)
    assert first > 1 and sum(stats.drafted) > 10 and stats.counters["lookup.accepted"] > 5
    assert stats.drafted[:first] == [0] * first


def test_lookup_runs_under_the_host_guard_with_the_same_tokens():
    cfg = tiny_config(sliding_window=5, vocab_size=24)
    t = random_tensors(cfg, seed=6)
    guarded, plain = Model(cfg, t, device=GUARD), Model(cfg, t, device="cpu")
    for temp in (0.0, 0.8):
        a, b = (generate(mm, [1, 2, 1, 2], decoder="lookup", costs=FLAT, max_new_tokens=14, eos_id=None,
                         temperature=temp, seed=1).tokens for mm in (guarded, plain))
        assert a == b


def test_greedy_lookup_on_the_shipped_model_equals_ar_past_the_window_and_drafts_usefully():
    from minispec import load
    from minispec.mistral.tokenizer import Tokenizer
    if not (SHIPPED / "model.safetensors").exists():
        pytest.skip("no shipped model")
    model = load(SHIPPED, device="cpu")
    prompt = Tokenizer.from_dir(SHIPPED).encode("import os\nimport sys\n\n\ndef main(argv):\n")
    stats = assert_lossless(model, LookupProposer(model, costs={1: 1.0, 2: 1.2, 9: 2.2}), ids=prompt,
                            n=model.config.sliding_window + 40, tol=1e-5)
    assert stats.tau > 1.5


# ---------------------------------------------------------------------------------------------------------
# 4. Sampling: lossless (recursive rejection sampling of the point-mass draft)

@pytest.mark.parametrize("params", [SamplingParams(1.0), SamplingParams(0.7, top_k=3)], ids=["T1", "T0.7-top3"])
def test_sampled_lookup_reproduces_the_autoregressive_joint_of_the_next_two_tokens(params):
    """V = 5; the prompt repeats, so every first step drafts (two tokens); 1500 runs; "same" means p > 1e-4."""
    cfg = tiny_config(n_layers=2, sliding_window=6, vocab_size=5)
    t = random_tensors(cfg, seed=0, scale=0.2)
    m = Model(cfg, t, dtype="float64", device="cpu")
    prompt = [1, 0, 2, 1, 0]                        # drafts "2 1": p(2) is about 0.25, p(1 | 2) about 0.27
    p1 = reference_probs(oracle_forward(cfg, t, prompt)[-1:], params)[0]                       # [V]
    joint = np.stack([p1[a] * reference_probs(oracle_forward(cfg, t, prompt + [a])[-1:], params)[0]
                      for a in range(5)])                                                     # [V, V]
    counts, accepts, rejects = np.zeros((5, 5), np.int64), 0, 0
    for run in range(1500):
        out = generate(m, prompt, decoder="lookup", sizing="max", max_draft=2, max_new_tokens=2,
                       temperature=params.temperature, top_k=params.top_k, seed=run, eos_id=None)
        counts[out.tokens[0], out.tokens[1]] += 1
        accepts += out.stats.accepted[0] > 1
        rejects += out.stats.accepted[0] == 1
    stat, df, p = chi2_test(counts, joint)
    print(f"lookup {params}: chi2={stat:.2f} df={df} p={p:.3g}; first draft token accepted {accepts}, "
          f"rejected {rejects}")
    assert p > SAME and accepts > 100 and rejects > 100


# ---------------------------------------------------------------------------------------------------------
# 5. The registry and bad options

def test_lookup_is_registered_and_refuses_bad_options_by_name():
    _, _, m = tiny()
    assert DECODERS["lookup"] is LookupProposer
    for kw, name in [(dict(match="middle"), "match"), (dict(sizing="some"), "sizing"), (dict(max_draft=0), "max_draft"),
                     (dict(min_ngram=3, max_ngram=2), "max_ngram"), (dict(costs={2: 1.3}), "costs"),
                     (dict(decay=0.0), "decay")]:
        with pytest.raises(UserError, match=name):
            LookupProposer(m, **{"costs": FLAT, **kw})


# ---------------------------------------------------------------------------------------------------------
# 6. The same rule caps Draft & Verify's drafts (sizing="cost"): the threshold says where a draft may stop, the
#    cost check whether another draft token pays

def dv_runs(m, n=30, **options):
    from minispec.decoders.draft_verify import DraftVerifyProposer, SkipSet
    skip = SkipSet.from_lists(2, attn=[1], mlp=[])
    prop = DraftVerifyProposer(m, skip=skip, max_draft=4, gamma0=0.3, **options)
    return assert_lossless(m, prop, ids=[1, 2, 3], n=n)


def test_draft_and_verify_with_the_cost_rule_stays_greedy_and_drafts_as_the_threshold_alone_when_verifying_is_free():
    for W in (4, 6):
        _, _, m = tiny(W=W, seed=W)
        alone = dv_runs(m)
        free = dv_runs(m, sizing="cost", costs=FLAT, draft_cost=0.0)
        assert free.drafted == alone.drafted and max(alone.drafted) == 4
        costly = dv_runs(m, sizing="cost", costs={1: 1.0, 2: 1.25, 5: 2.0}, draft_cost=0.83)
        # one draft token costs 1.25 + 0.83 > 2 steps and emits at most 2 tokens: it never pays
        assert sum(costly.drafted) == 0 and costly.counters.get("draft_verify.forwards", 0) == 0
        mid = dv_runs(m, sizing="cost", costs={1: 1.0, 2: 1.1, 5: 3.5}, draft_cost=0.05)
        assert 0 < max(mid.drafted) < 4                # the steep tail caps the drafts the threshold allowed


def test_draft_and_verify_measures_its_costs_once_per_model_and_skip_set():
    from minispec.decoders.draft_verify import DraftVerifyProposer, SkipSet
    _, _, m = tiny(W=6, seed=1)
    skip = SkipSet.from_lists(2, attn=[1], mlp=[])
    a = DraftVerifyProposer(m, skip=skip, max_draft=3, sizing="cost")
    b = DraftVerifyProposer(m, skip=skip, max_draft=3, sizing="cost")
    from minispec.speculative.costs import STEP, step_curve
    assert a.costs is b.costs is step_curve(m).costs                     # the whole-step curve, measured once
    assert sorted(a.costs) == list(STEP["sizes"]) and a.costs[1] == 1.0 and a.draft_cost > 0
    with pytest.raises(UserError, match="sizing"):
        DraftVerifyProposer(m, skip=skip, sizing="always")


# ---------------------------------------------------------------------------------------------------------
# 7. bench decode's lookup columns

def test_the_bench_line_counts_matches_and_where_they_came_from(capsys):
    from minispec.bench import print_lookup
    from minispec.speculative.loop import Stats
    s = Stats(steps=3, accepted=[1, 3, 2], drafted=[0, 2, 2], propose_time=0.006,
              counters={"lookup.matched": 2, "lookup.prompt_matched": 1, "lookup.accepted": 3,
                        "lookup.prompt_accepted": 2})
    print_lookup([s])          # its predicted speed-up is the generic line's (tests/test_bench_speculation.py)
    text = capsys.readouterr().out
    assert "lookup draft lengths (tokens: steps) {0: 1, 2: 2}" in text
    assert "2 of 3 steps matched, 1 of them in the prompt" in text and "3, 2 of them copied from the prompt" in text


def test_copy_prompts_end_with_the_def_line_of_the_function_they_hold():
    from minispec.bench import copy_prompts
    from minispec.mistral.tokenizer import Tokenizer
    if not (SHIPPED / "heldout_sample.txt").exists():
        pytest.skip("no held-out sample")
    tok = Tokenizer.from_dir(SHIPPED)
    prompts = copy_prompts(SHIPPED, tok, 4)
    assert len(prompts) == 4 and len({tuple(p) for p in prompts}) == 4
    for p in prompts:
        text = tok.decode(p)
        head = text.rstrip("\n").split("\n")[-1]
        assert head.startswith("def ") and text.startswith(head) and text.count(head) >= 2 and "\n\n\n" in text


def test_bench_decode_runs_lookup_end_to_end_on_a_tiny_model_and_prints_its_lines(cli_model, capsys):
    from minispec.bench import bench_decode
    folder, _, _ = cli_model
    results, _ = bench_decode(str(folder), decoders=("ar", "lookup"), n_tokens=12, n_prompts=2, runs=1,
                              device="cpu", prompt_set="copy")
    text = capsys.readouterr().out
    assert set(results) == {"ar", "lookup"} and "identical output: NO" not in text
    assert "lookup draft lengths" in text and "predicted tau / (s(N) + proposal)" in text
    with pytest.raises(UserError, match="prompt_set"):
        bench_decode(str(folder), decoders=("ar", "lookup"), n_tokens=4, n_prompts=1, runs=1, prompt_set="news")
