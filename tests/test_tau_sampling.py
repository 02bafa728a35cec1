"""Bugs that only show when sampling (issue 18 part 2): greedy runs cannot see them, and a lossless rule hides a
badly warped draft behind a correct output distribution. So these tests measure acceptance and the spread of
sampled outputs.

- A draft model that IS the target model (Draft & Verify skipping nothing) must have every drafted token
  accepted under rejection sampling whatever temperature / top-k / top-p: p(x)/q(x) = 1 on every token it can
  draft. A draft warped with fewer of the sampling parameters than the target drafts tokens outside the
  target's top-k or nucleus, which the target never accepts.
- Typical acceptance draws its bonus token from the target distribution at temperature > 0: several seeds give
  several outputs, and the bonus token's frequencies follow p at the last accepted node.
"""
import numpy as np
import pytest

from conftest import random_tensors, tiny_config
from minispec import generate
from minispec.decoders.draft_verify import SkipSet
from minispec.mistral.model import Model
from minispec.speculative.acceptance import typical_accept
from minispec.speculative.sampling import SamplingParams, target_probs
from minispec.speculative.tree import Tree
from test_medusa import random_heads as random_medusa_heads, tiny_model


def model3(seed=0):
    cfg = tiny_config(n_layers=3, sliding_window=6, vocab_size=24)
    return Model(cfg, random_tensors(cfg, seed=seed), dtype="float64", device="cpu")


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 3, 1.0), (0.7, 0, 0.5), (1.3, 5, 0.8)])
def test_a_draft_equal_to_the_target_is_always_accepted_when_sampling_with_top_k_and_top_p(temperature, top_k, top_p):
    model = model3()
    L = model.config.n_layers
    for seed in range(3):
        out = generate(model, [1, 5, 3], decoder="draft_verify", skip=SkipSet.none(L), max_draft=4, gamma0=0.0,
                       adaptive=False, max_new_tokens=31, temperature=temperature, top_k=top_k, top_p=top_p,
                       seed=seed, eos_id=None, gate=False)
        s = out.stats
        full = [a == d + 1 for a, d in zip(s.accepted, s.drafted)]
        assert all(full[:-1]), f"seed {seed}: emitted {s.accepted} of drafted {s.drafted}"    # the last: limit
        assert s.tau > 4


@pytest.mark.parametrize("top_k,top_p", [(3, 1.0), (0, 0.6), (5, 0.7)])
def test_a_skipping_draft_is_warped_like_the_target_and_draws_only_from_its_warped_distribution(top_k, top_p):
    """A real skip set: each row of the draft's q is target_probs of the skipped model's logits (computed here
    by the from-scratch hybrid forward of tests/test_draft_verify.py) under the SAME temperature, top-k and
    top-p, and every drafted token has q > 0 (40 proposals, 6 tokens each)."""
    from test_draft_verify import hybrid_reference, propose_once, tiny
    cfg, t, m = tiny(W=5, L=3, seed=2)
    skip = SkipSet.from_lists(3, attn=[1], mlp=[2])
    params = SamplingParams(0.9, top_k=top_k, top_p=top_p)
    context = [3, 9, 4, 1, 7, 7, 2]
    for seed in range(40):
        draft, _, _ = propose_once(m, context, 5, skip, params, max_draft=6, seed=seed)
        q = np.asarray(draft.q)                                                          # [6, V]
        ref = np.stack([target_probs(z, params) for z in hybrid_reference(cfg, t, context, draft.tokens[:-1], skip)])
        np.testing.assert_allclose(q, ref, rtol=1e-9, atol=1e-12)
        assert all(q[j, tok] > 0 for j, tok in enumerate(draft.tokens[1:]))


# ---------------------------------------------------------------------------------------------------------
# Typical acceptance's bonus token
# ---------------------------------------------------------------------------------------------------------
def test_typical_acceptance_samples_its_bonus_so_seeds_give_different_outputs():
    model = tiny_model(W=5, seed=3)
    heads = random_medusa_heads(model, num_heads=3, seed=3)
    outs = {tuple(generate(model, [1, 5, 3], decoder="medusa", heads=heads, acceptance="typical", temperature=1.0,
                           max_new_tokens=12, seed=seed, eos_id=None).tokens) for seed in range(8)}
    assert len(outs) >= 4, outs
    greedy = {tuple(generate(model, [1, 5, 3], decoder="medusa", heads=heads, acceptance="typical",
                             max_new_tokens=12, seed=seed, eos_id=None).tokens) for seed in range(3)}
    assert len(greedy) == 1


def test_typical_acceptances_bonus_follows_the_target_at_the_last_accepted_node():
    """A root with one child that is accepted (probability 0.6 > the threshold) and then nothing: the bonus is
    drawn from p at node 1. 4000 draws: every frequency within 5 sigma of p, and more than one token drawn."""
    V = 6
    logits = np.log(np.array([[0.05, 0.6, 0.1, 0.1, 0.1, 0.05],       # node 0: accepts token 1
                              [0.4, 0.3, 0.2, 0.05, 0.03, 0.02]]))     # node 1: the bonus distribution
    tree = Tree.from_choices([[0]])
    params = SamplingParams(1.0)
    rng = np.random.default_rng(0)
    n = 4000
    counts = np.zeros(V)
    for _ in range(n):
        path, bonus = typical_accept(tree, [0, 1], logits, params, rng=rng)
        assert path == [0, 1]
        counts[bonus] += 1
    p = np.exp(logits[1])
    assert np.all(np.abs(counts / n - p) < 5 * np.sqrt(p * (1 - p) / n) + 1e-9), counts / n
