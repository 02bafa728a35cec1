"""Block verification (Sun et al., "Block Verification Accelerates Speculative Decoding", ICLR 2025,
arXiv 2403.10444, Algorithm 2): block_accept and acceptance="block".

References: the paper's motivating example (10/9 against 11/9 expected accepted tokens, §1), its weights and
keep-probabilities worked by hand below, plain greedy decoding, and the exact law of minispec.speculative.exact_law
(which replays the real rule over every outcome; tests/test_exact_law.py runs it on the 1000-case grid).
"""
import numpy as np
import pytest

from conftest import SHIPPED
from hostguard import GUARD
from minispec import generate
from minispec.decoders.draft_verify import DraftVerifyProposer, SkipSet
from minispec.errors import UserError
from minispec.mistral.model import load
from minispec.speculative.acceptance import (block_accept, block_stop_probs, block_verify, block_weights,
                                            greedy_accept, make_rule)
from minispec.speculative.exact_law import (autoregressive_law, autoregressive_step, decoder_law, exact_law,
                                            expected_accepted, memoised, sampled_chain, step_law, tv)
from minispec.speculative.loop import Context, Stats
from minispec.speculative.sampling import GeneratorRandomness, SamplingParams
from minispec.speculative.tree import Tree
from minispec.speculative.verify import Draft
from test_exact_law import EXACT, TableCache, TableModel, oracle_probs, table

MS, MB = np.array([2 / 3, 1 / 3]), np.array([1 / 3, 2 / 3])      # the paper's draft favours a, the target b


def context_free(probs):
    return lambda prefix: np.log(probs)


@pytest.mark.parametrize("rule,expected", [("rejection", 10 / 9), ("block", 11 / 9)])
def test_the_papers_motivating_example_accepts_10_9_tokens_token_by_token_and_11_9_as_a_block(rule, expected):
    """Two context-free models on {a, b}, a draft of 2 tokens: token-level accepts 2/3 + 4/9 = 10/9 tokens per
    iteration in expectation, block verification 11/9 (the paper's §1), both keeping the target's law."""
    params = SamplingParams(1.0)
    step = step_law((0,), sampled_chain(context_free(MS), params, 2), lambda rand: make_rule(params, rule, rand),
                    context_free(MB))
    assert expected_accepted(step) == pytest.approx(expected, abs=1e-15)
    law = decoder_law((0,), 3, lambda pre: step if pre == (0,) else {(0,): MB[0], (1,): MB[1]})
    assert tv(law, autoregressive_law((0,), 3, lambda pre: MB)) < EXACT


def test_the_weights_and_keep_probabilities_of_the_motivating_example_match_the_hand_worked_values():
    """Draft a a: w = 1, 1/2, 1/4; residual after a: max(0, w_1 MB - MS) = 0, so h_1 = 0, h_2 = w_2 = 1/4.
    Draft b a: w = 1, 1, 1/2; residual after b = max(0, MB - MS) has mass 1/3 and 1 - w_1 = 0, so h_1 = 1.
    E[tau] = 4/9 · 2/4 + 2/9 · 2 + 2/9 · (2/2 + 1/2) + 1/9 · 2 = 11/9."""
    def h_of(x):
        w = block_weights(MB[list(x)], MS[list(x)])
        m = np.array([np.maximum(w[i] * MB - MS, 0).sum() for i in range(2)])
        return w, block_stop_probs(w, m)
    w, h = h_of((0, 0))
    assert np.allclose(w, [1, 1 / 2, 1 / 4], atol=1e-15) and np.allclose(h[1:], [0, 1 / 4], atol=1e-15)
    w, h = h_of((1, 0))
    assert np.allclose(w, [1, 1, 1 / 2], atol=1e-15) and np.allclose(h[1:], [1, 1 / 2], atol=1e-15)
    assert np.allclose(h_of((0, 1))[1][2], 1) and np.allclose(h_of((1, 1))[1][2], 1)
    # the real rule's law of (kept, next) on draft a a: keeps 2 w.p. 1/4 (next ~ MB), else 0 (next ~ residual = b)
    law = exact_law(lambda rand: block_accept([0, 0], np.stack([MS, MS]), np.stack([MB, MB, MB]), rand))
    assert law == pytest.approx({(2, 0): 1 / 12, (2, 1): 1 / 6, (0, 1): 3 / 4}, abs=1e-15)


def test_block_verification_stays_exact_and_never_worse_when_draft_and_verify_stops_on_low_confidence():
    """Draft & Verify ends its draft at the first token under its confidence threshold, so the draft length
    depends on the drafted tokens; the paper's analysis has a fixed length. The exact law of the real proposer
    (on a table model) and the real rules says block verification keeps the target's law there too."""
    lengths, gains = set(), []
    for seed, gamma0, params in [(0, 0.45, SamplingParams(1.0)), (1, 0.6, SamplingParams(0.7)),
                                 (2, 0.4, SamplingParams(0.9, top_p=0.8)), (3, 0.5, SamplingParams(1.2, top_k=2))]:
        V, K = 3, 3
        target, draft = table(V, 1000 + seed), table(V, 2000 + seed)
        model = TableModel(draft, V)
        proposer = DraftVerifyProposer(model, skip=SkipSet.none(1), max_draft=K, gamma0=gamma0, adaptive=False)

        def propose(prefix, rand):
            return proposer.propose(Context(prefix[-1], None, model, TableCache(prefix), params, rand, Stats()))
        lengths |= set(exact_law(lambda rand: len(propose((0,), rand).tokens) - 1))
        ref = autoregressive_law((0,), K + 1, lambda pre: oracle_probs(target(pre), params))
        ar = autoregressive_step(lambda pre: oracle_probs(target(pre), params))
        accepted = {}
        for rule in ("rejection", "block"):
            real = memoised(lambda pre: step_law(pre, propose, lambda rand: make_rule(params, rule, rand), target))
            assert tv(decoder_law((0,), K + 1, lambda pre: real(pre) if pre == (0,) else ar(pre)), ref) < EXACT
            accepted[rule] = expected_accepted(real((0,)))
        gains.append(accepted["block"] - accepted["rejection"])
    assert lengths == {1, 2, 3} and min(gains) >= -EXACT and max(gains) > 0.01


def test_block_verification_spends_one_uniform_per_decision():
    r = np.random.default_rng(0)
    q, target = r.dirichlet(np.ones(4), size=3), r.dirichlet(np.ones(4), size=4)        # [K, V], [K + 1, V]

    class Counting(GeneratorRandomness):
        n = 0

        def bernoulli(self, p, total=1.0):
            Counting.n += 1
            return super().bernoulli(p, total)

        def categorical(self, weights):
            Counting.n += 1
            return super().categorical(weights)
    for seed in range(20):
        a, b = np.random.default_rng(seed), np.random.default_rng(seed)
        Counting.n = 0
        block_accept([0, 1, 2], q, target, Counting(a))
        b.random(Counting.n)
        assert a.random() == b.random()


def test_block_verification_of_one_hot_targets_and_drafts_is_greedy_verification():
    r = np.random.default_rng(1)
    for _ in range(30):
        logits = r.standard_normal((4, 5))                                              # [K + 1, V]
        tokens = [0] + [int(t) if r.random() < 0.6 else int((t + 1) % 5) for t in logits.argmax(-1)[:3]]
        onehot = np.eye(5)[logits.argmax(-1)]                                           # [K + 1, V]
        n, bonus = block_accept(tokens[1:], np.eye(5)[tokens[1:]], onehot, np.random.default_rng(0))
        path, best = greedy_accept(Tree.chain(3), tokens, logits)
        assert (list(range(n + 1)), bonus) == (path, best)


def test_block_verification_makes_the_same_decisions_under_the_host_guard_as_on_numpy():
    """CuPy's strictness (no implicit device -> host copy), for sampled and for deterministic chains."""
    r = np.random.default_rng(2)
    target, q = r.dirichlet(np.ones(6), size=4).astype(np.float32), r.dirichlet(np.ones(6), size=3).astype(np.float32)
    for seed in range(20):
        tokens = [0] + [int(t) for t in np.random.default_rng(seed).integers(0, 6, 3)]
        for draft_q in (q, None):
            a, b = np.random.default_rng(seed), np.random.default_rng(seed)
            host = block_verify(Draft(Tree.chain(3), tokens, q=draft_q), target, a)
            guarded = block_verify(Draft(Tree.chain(3), tokens, q=None if draft_q is None else GUARD.asarray(draft_q)),
                                   GUARD.asarray(target), b)
            assert host == guarded


@pytest.fixture(scope="module")
def shipped():
    return load(SHIPPED, device="cpu")


PROMPT = [1, 851, 2897, 13, 13, 1270]


@pytest.mark.parametrize("decoder,options", [("draft_verify", {"gate": False}),
                                             ("medusa", {"tree": Tree.chain(3), "gate": False}),
                                             ("hydra", {"tree": Tree.chain(3), "gate": False}),
                                             ("hydra++", {"tree": Tree.chain(2), "gate": False})])
def test_every_chain_decoder_takes_acceptance_block_greedy_equals_plain_decoding_and_sampling_is_seeded(
        shipped, decoder, options):
    ar = generate(shipped, PROMPT, max_new_tokens=24, eos_id=None)
    greedy = generate(shipped, PROMPT, decoder=decoder, max_new_tokens=24, eos_id=None, acceptance="block", **options)
    assert greedy.tokens == ar.tokens and greedy.stats.tau > 1
    runs = [generate(shipped, PROMPT, decoder=decoder, max_new_tokens=24, eos_id=None, temperature=0.7, seed=5,
                     acceptance="block", **options).tokens for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) == 24


def test_acceptance_block_refuses_a_branching_tree_naming_it():
    model = load(SHIPPED, device="cpu")
    with pytest.raises(UserError, match=r"acceptance='block' verifies chains.*tree of 3 nodes 1 deep"):
        generate(model, PROMPT, decoder="medusa", tree=[[0], [1], [2]], max_new_tokens=4, acceptance="block")
