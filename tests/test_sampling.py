"""Target distributions, sampling, and the acceptance rules, checked by hand and by χ² against plain sampling.

The losslessness tests use a tiny Markov "model": a fixed random table p(next | previous) over V tokens. The
reference is the autoregressive joint distribution of the next two tokens, p(a | x0) p(b | a), computed here
in float64 without minispec. χ² p-values come from `chi2_sf` below (no SciPy: the regularized upper
incomplete gamma function, Numerical Recipes §6.2, itself checked against closed forms).
"""
import math

import numpy as np
import pytest

from hostguard import GUARD, GuardArray
from minispec.speculative.sampling import SamplingParams, sample, target_probs
from minispec.speculative.acceptance import (chain_rejection_accept, greedy_accept, tree_rejection_accept, typical_accept)
from minispec.speculative.tree import Tree

SAME, DIFFERENT = 1e-4, 1e-6     # χ² p-value thresholds: "same distribution" passes p > SAME; "lossy" needs p < DIFFERENT


# ---------------------------------------------------------------------------------------------------------
# χ² without SciPy

def chi2_sf(x, df):
    """P(χ²_df > x) = Q(df/2, x/2), the regularized upper incomplete gamma (series below a+1, else Lentz's CF)."""
    a, x = df / 2.0, x / 2.0
    if x <= 0:
        return 1.0
    log_pre = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1:
        term = total = 1.0 / a
        n = a
        while abs(term) > abs(total) * 1e-16:
            n += 1
            term *= x / n
            total += term
        return max(0.0, 1.0 - total * math.exp(log_pre))
    tiny = 1e-300
    b = x + 1 - a
    c, d = 1 / tiny, 1 / b
    h = d
    for i in range(1, 10000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        h *= d * c
        if abs(d * c - 1) < 1e-16:
            break
    return math.exp(log_pre) * h


def chi2_test(counts, probs):
    """Pearson's χ² goodness of fit; cells expected < 5 are pooled into one. -> (statistic, df, p-value)"""
    counts, expect = np.asarray(counts, np.float64).ravel(), np.asarray(probs, np.float64).ravel() * np.sum(counts)
    small = expect < 5
    if small.any():
        counts = np.append(counts[~small], counts[small].sum())
        expect = np.append(expect[~small], expect[small].sum())
    nz = expect > 0
    assert counts[~nz].sum() == 0, "a cell of probability 0 was observed"
    stat = float(((counts[nz] - expect[nz]) ** 2 / expect[nz]).sum())
    df = int(nz.sum()) - 1
    return stat, df, chi2_sf(stat, df)


@pytest.mark.parametrize("x", [0.01, 0.5, 1.0, 3.84, 10.0, 50.0, 120.0])
def test_chi2_survival_function_matches_its_closed_forms_for_one_two_and_four_degrees_of_freedom(x):
    assert chi2_sf(x, 1) == pytest.approx(math.erfc(math.sqrt(x / 2)), rel=1e-9, abs=1e-300)
    assert chi2_sf(x, 2) == pytest.approx(math.exp(-x / 2), rel=1e-9)
    assert chi2_sf(x, 4) == pytest.approx(math.exp(-x / 2) * (1 + x / 2), rel=1e-9)


def test_chi2_survival_function_gives_the_textbook_critical_values():
    assert chi2_sf(3.841459, 1) == pytest.approx(0.05, rel=1e-5)
    assert chi2_sf(11.070498, 5) == pytest.approx(0.05, rel=1e-5)
    assert chi2_sf(37.566235, 20) == pytest.approx(0.01, rel=1e-5)


# ---------------------------------------------------------------------------------------------------------
# SamplingParams and target_probs

@pytest.mark.parametrize("kw, name", [({"temperature": -0.1}, "temperature"), ({"temperature": float("nan")}, "temperature"),
                                      ({"top_k": -1}, "top_k"), ({"top_k": 1.5}, "top_k"),
                                      ({"top_p": 0.0}, "top_p"), ({"top_p": 1.01}, "top_p")])
def test_sampling_params_reject_bad_values_naming_the_parameter(kw, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kw)


def test_sampling_params_default_to_greedy():
    assert SamplingParams().greedy and not SamplingParams(temperature=0.5).greedy


LOG4 = np.log(np.array([0.1, 0.2, 0.3, 0.4]))


@pytest.mark.parametrize("params, expect", [
    (SamplingParams(0.0), [0, 0, 0, 1]),
    (SamplingParams(1.0), [0.1, 0.2, 0.3, 0.4]),
    (SamplingParams(0.5), np.array([1, 4, 9, 16]) / 30),           # p^(1/T) renormalised
    (SamplingParams(1.0, top_k=2), [0, 0, 3 / 7, 4 / 7]),
    (SamplingParams(1.0, top_k=4), [0.1, 0.2, 0.3, 0.4]),
    (SamplingParams(1.0, top_k=9), [0.1, 0.2, 0.3, 0.4]),
    (SamplingParams(1.0, top_k=1), [0, 0, 0, 1]),
    (SamplingParams(1.0, top_p=0.5), [0, 0, 3 / 7, 4 / 7]),        # .4 < .5, .4 + .3 >= .5
    (SamplingParams(1.0, top_p=0.75), [0, 2 / 9, 3 / 9, 4 / 9]),   # .7 < .75, .9 >= .75
    (SamplingParams(1.0, top_p=0.05), [0, 0, 0, 1]),               # below the top token: it stays alone
    (SamplingParams(1.0, top_p=1.0), [0.1, 0.2, 0.3, 0.4]),
    (SamplingParams(1.0, top_k=2, top_p=0.5), [0, 0, 0, 1]),       # top-p measures mass after top-k: 4/7 >= .5
    (SamplingParams(2.0, top_k=3, top_p=0.6), np.r_[0, 0, np.sqrt([0.3, 0.4]) / np.sqrt([0.3, 0.4]).sum()]),
])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_target_probs_matches_hand_computed_temperature_top_k_and_top_p(params, expect, dtype):
    p = target_probs(LOG4.astype(dtype), params)
    assert p.shape == (4,) and p.dtype == dtype
    np.testing.assert_allclose(p, expect, rtol=1e-6 if dtype == np.float32 else 1e-12, atol=1e-7)


def test_target_probs_greedy_ties_go_to_the_first_index_and_top_k_keeps_ties():
    logits = np.array([1.0, 3.0, 3.0, 0.0])
    assert target_probs(logits, SamplingParams(0.0)).tolist() == [0, 1, 0, 0]
    np.testing.assert_allclose(target_probs(logits, SamplingParams(1.0, top_k=1)), [0, 0.5, 0.5, 0])


def test_target_probs_works_row_by_row_on_batches_and_under_the_host_guard():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 3, 7)).astype(np.float32)            # [..., V]
    for params in (SamplingParams(0.0), SamplingParams(0.8, top_k=4, top_p=0.7)):
        batch = target_probs(logits, params)
        assert batch.shape == (2, 3, 7) and batch.dtype == np.float32
        for i in range(2):
            for j in range(3):
                np.testing.assert_array_equal(batch[i, j], target_probs(logits[i, j], params))
        guarded = target_probs(GUARD.asarray(logits), params)
        assert isinstance(guarded, GuardArray)
        np.testing.assert_array_equal(guarded.get(), batch)


# ---------------------------------------------------------------------------------------------------------
# sample

def test_sample_is_the_inverse_cdf_of_one_uniform_from_the_generator():
    probs = np.array([0.0, 0.25, 0.0, 0.5, 0.25])
    rng, ref = np.random.default_rng(3), np.random.default_rng(3)
    for _ in range(200):
        u = 1.0 - ref.random()                                             # in (0, 1]
        expect = int(np.searchsorted(np.cumsum(probs), u, side="left"))    # first index with cdf >= u
        assert sample(probs, rng) == expect


def test_sample_with_the_same_seed_gives_the_same_tokens_on_numpy_and_under_the_host_guard():
    probs = np.random.default_rng(1).dirichlet(np.ones(9)).astype(np.float32)
    a = [sample(probs, np.random.default_rng(5)) for _ in range(3)]
    r1, r2 = np.random.default_rng(7), np.random.default_rng(7)
    host = [sample(probs, r1) for _ in range(100)]
    guarded = [sample(GUARD.asarray(probs), r2) for _ in range(100)]
    assert host == guarded and a == [a[0]] * 3


def test_sample_empirical_distribution_passes_chi2_and_never_draws_a_zero_probability_token():
    """20000 draws, seed 11, V = 6 with two zero-probability tokens; "same" means p > 1e-4."""
    probs = np.array([0.05, 0.0, 0.3, 0.15, 0.0, 0.5], dtype=np.float32)
    rng = np.random.default_rng(11)
    counts = np.bincount([sample(probs, rng) for _ in range(20000)], minlength=6)
    assert counts[1] == counts[4] == 0
    stat, df, p = chi2_test(counts, probs)
    print(f"sample: chi2={stat:.2f} df={df} p={p:.3g}")
    assert p > SAME


def test_sample_normalises_weights_and_refuses_a_zero_total():
    assert sample(np.array([0.0, 0.0, 7.0]), np.random.default_rng(0)) == 2
    with pytest.raises(ValueError, match="positive finite sum"):
        sample(np.zeros(3), np.random.default_rng(0))


# ---------------------------------------------------------------------------------------------------------
# greedy and typical acceptance by hand

def onehot_logits(best, V=12):
    """[N, V] logits whose argmax in row i is best[i]."""
    logits = np.zeros((len(best), V), dtype=np.float32)
    logits[np.arange(len(best)), best] = 5.0
    return logits


def test_greedy_accept_walks_the_children_that_carry_the_argmax_and_returns_the_next_argmax():
    tree = Tree.from_choices([[0], [1], [0, 0], [0, 1], [1, 0]])   # 1:[0] 2:[1] 3:[0,0] 4:[0,1] 5:[1,0]
    tokens = [10, 3, 4, 5, 6, 7]
    # root wants 4 = node 2; node 2 wants 7 = node 5 (a leaf); node 5 wants 9: the bonus
    assert greedy_accept(tree, tokens, onehot_logits([4, 0, 7, 0, 0, 9])) == ([0, 2, 5], 9)
    # root wants 8: nothing accepted, 8 is the bonus
    assert greedy_accept(tree, tokens, onehot_logits([8, 0, 7, 0, 0, 9])) == ([0], 8)
    # root wants 3 = node 1; node 1 wants 6 = node 4 (its second child)
    assert greedy_accept(tree, tokens, onehot_logits([3, 6, 0, 0, 2, 0])) == ([0, 1, 4], 2)
    guarded = greedy_accept(tree, tokens, GUARD.asarray(onehot_logits([3, 6, 0, 0, 2, 0])))
    assert guarded == ([0, 1, 4], 2)


def test_typical_accept_uses_the_threshold_min_epsilon_alpha_exp_minus_entropy():
    """Hand computation at T = 1 with probabilities given directly as log-probs."""
    tree = Tree.from_choices([[0], [1], [0, 0]])                    # 1:[0] 2:[1] 3:[0,0]
    flat = [0.25, 0.25, 0.25, 0.25]                                  # H = ln 4: 0.3 / 4 = 0.075 < 0.09
    peaked = [0.94, 0.02, 0.02, 0.02]
    h = -(0.94 * math.log(0.94) + 3 * 0.02 * math.log(0.02))       # H ≈ 0.293: threshold = min(.09, .3·e^-H) = .09
    assert min(0.09, 0.3 * math.exp(-h)) == 0.09
    logp = np.log(np.array([flat, peaked, flat, flat]))
    params, rng = SamplingParams(1.0), np.random.default_rng(0)
    # root flat: 0.25 > 0.075 so node 1 (token 0) is accepted; node 1 peaked: token 1 has 0.02 <= 0.09, rejected
    path, bonus = typical_accept(tree, [9, 0, 2, 1], logp, params, rng=rng)
    assert path == [0, 1] and 0 <= bonus < 4
    # same, but node 3 carries token 0 (0.94): accepted, path to the leaf
    assert typical_accept(tree, [9, 0, 2, 0], logp, params, rng=rng)[0] == [0, 1, 3]
    # epsilon below 0.02 makes the threshold 0.01: now node 3 with 0.02 passes too
    assert typical_accept(tree, [9, 0, 2, 1], logp, params, epsilon=0.01, rng=rng)[0] == [0, 1, 3]
    # alpha large: flat root threshold min(.09, 3.0·.25) = .09 < .25 still accepts; alpha tiny accepts anything > 0
    assert typical_accept(tree, [9, 0, 2, 1], logp, params, alpha=1e-9, rng=rng)[0] == [0, 1, 3]


def test_typical_accept_breaks_equal_lengths_toward_the_first_path_and_is_greedy_at_temperature_zero():
    tree = Tree.from_choices([[0], [1]])
    logp = np.log(np.full((3, 4), 0.25))
    path, _ = typical_accept(tree, [0, 1, 2], logp, SamplingParams(1.0), rng=np.random.default_rng(0))
    assert path == [0, 1]                                            # both children pass; the first path wins
    logits = onehot_logits([2, 5, 7])
    assert typical_accept(tree, [0, 1, 2], logits, SamplingParams(0.0)) == greedy_accept(tree, [0, 1, 2], logits)
    with pytest.raises(ValueError, match="rng"):
        typical_accept(tree, [0, 1, 2], logp, SamplingParams(1.0))


def test_rejection_rules_reduce_to_greedy_on_one_hot_targets():
    tree = Tree.from_choices([[0], [1], [0, 0], [0, 1], [1, 0]])
    tokens = [10, 3, 4, 5, 6, 7]
    rng = np.random.default_rng(0)
    for best in ([4, 0, 7, 0, 0, 9], [8, 0, 7, 0, 0, 9], [3, 6, 0, 0, 2, 0], [3, 5, 0, 1, 0, 0]):
        logits = onehot_logits(best)
        target = target_probs(logits, SamplingParams(0.0))
        assert tree_rejection_accept(tree, tokens, target, rng) == greedy_accept(tree, tokens, logits)
    chain, tokens = Tree.chain(2), [10, 3, 4]
    for best in ([3, 4, 1], [3, 2, 1], [5, 4, 1]):
        logits = onehot_logits(best)
        path, bonus = greedy_accept(chain, tokens, logits)
        draft = target_probs(onehot_logits([3, 4]), SamplingParams(0.0))    # point masses on the drafts
        target = target_probs(logits, SamplingParams(0.0))
        assert chain_rejection_accept(tokens[1:], draft, target, rng) == (len(path) - 1, bonus)


# ---------------------------------------------------------------------------------------------------------
# Losslessness: χ² against the autoregressive joint of the next two tokens

V, X0 = 5, 0


def markov_tables(seed, scale=1.0):
    """logits [V, V]: row x = the next-token logits after token x."""
    return np.random.default_rng(seed).standard_normal((V, V)) * scale


def reference_probs(logits, params):
    """Independent float64 top-k + softmax at temperature T (no minispec): [V, V]."""
    z = logits / params.temperature
    if params.top_k:
        kth = np.sort(z, axis=1)[:, -params.top_k][:, None]
        z = np.where(z >= kth, z, -np.inf)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def two_token_joint(P):
    """AR joint of the next two tokens after X0: [V, V], cell (a, b) = P[X0, a] P[a, b]."""
    return P[X0][:, None] * P


def run_two_tokens(step, n, rng):
    """Histogram [V, V] of the first two tokens emitted by repeated calls of step(last, rng) -> emitted list."""
    counts = np.zeros((V, V), dtype=np.int64)
    for _ in range(n):
        out, last = [], X0
        while len(out) < 2:
            out += step(last, rng)
            last = out[-1]
        counts[out[0], out[1]] += 1
    return counts


def draft_streams(Q, seed, n):
    """Per state s, an iterator over n independent draws from Q[s] (vectorised inverse CDF, no minispec)."""
    rng = np.random.default_rng(seed)
    cdf = np.cumsum(Q, axis=1)
    return [iter(np.minimum(np.searchsorted(cdf[s], rng.random(n) * cdf[s, -1], side="right"), V - 1).tolist())
            for s in range(V)]


@pytest.mark.parametrize("params", [SamplingParams(1.0), SamplingParams(0.7, top_k=3)], ids=["T1", "T0.7-top3"])
def test_chain_rejection_sampling_with_a_wrong_draft_reproduces_the_autoregressive_joint(params):
    """20000 runs, seed 1; draft q = softmax of an unrelated random table, chain K = 2 (drafts that the
    truncated target gives probability 0 included); "same" means p > 1e-4."""
    logits = markov_tables(0)
    P = target_probs(logits, params)                                   # [V, V] target after each token
    Q = target_probs(markov_tables(99), SamplingParams(1.0))           # [V, V] the draft model
    np.testing.assert_allclose(P, reference_probs(logits, params), rtol=1e-12)
    drafts = draft_streams(Q, 100, 60000)

    def step(last, rng):
        d1 = next(drafts[last])
        d2 = next(drafts[d1])
        n, nxt = chain_rejection_accept([d1, d2], Q[[last, d1]], P[[last, d1, d2]], rng)
        return [d1, d2][:n] + [nxt]

    counts = run_two_tokens(step, 20000, np.random.default_rng(1))
    stat, df, p = chi2_test(counts, two_token_joint(reference_probs(logits, params)))
    print(f"chain rejection {params}: chi2={stat:.2f} df={df} p={p:.3g}")
    assert p > SAME


TREE = Tree.from_choices([[0], [1], [0, 0], [0, 1], [1, 0], [1, 1]])   # two deterministic candidates per level


def topk_candidates(Q1, Q2):
    """Medusa-like deterministic candidates after each state: head 0 = top-2 of Q1[last], head 1 = top-2 of
    Q2[last] (blind to the token head 0 chose, like Medusa's heads). -> int [V, N]"""
    top2 = lambda row: np.argsort(-row, kind="stable")[:2]
    return np.stack([TREE.candidates(s, np.stack([top2(Q1[s]), top2(Q2[s])])) for s in range(V)])


def duplicate_candidates(Q1):
    """Siblings carrying the same token: each node's two children both carry argmax Q1[node's token]. -> [V, N]"""
    out = np.zeros((V, TREE.N), dtype=np.int64)
    for s in range(V):
        out[s, 0] = s
        for i in range(1, TREE.N):
            out[s, i] = np.argmax(Q1[out[s, TREE.parents[i]]])
    return out


@pytest.mark.parametrize("params, proposal", [(SamplingParams(1.0), "topk"), (SamplingParams(0.7, top_k=3), "duplicates")],
                         ids=["T1-topk", "T0.7-top3-duplicates"])
def test_tree_rejection_sampling_of_deterministic_candidates_reproduces_the_autoregressive_joint(params, proposal):
    """20000 runs, seed 2; candidates = top-2 per level of wrong proposals, or duplicated siblings under a
    truncated target (children of probability 0 included); "same" means p > 1e-4."""
    logits = markov_tables(0)
    P = target_probs(logits, params)
    Q1, Q2 = (target_probs(markov_tables(s), SamplingParams(1.0)) for s in (98, 97))
    cands = topk_candidates(Q1, Q2) if proposal == "topk" else duplicate_candidates(Q1)      # [V, N]
    if proposal == "duplicates":
        assert all(cands[s, 1] == cands[s, 2] for s in range(V))
    targets = [P[cands[s]] for s in range(V)]                                                 # [N, V] each

    def step(last, rng):
        path, bonus = tree_rejection_accept(TREE, cands[last], targets[last], rng)
        return [int(cands[last, i]) for i in path[1:]] + [bonus]

    counts = run_two_tokens(step, 20000, np.random.default_rng(2))
    stat, df, p = chi2_test(counts, two_token_joint(reference_probs(logits, params)))
    print(f"tree rejection {params} {proposal}: chi2={stat:.2f} df={df} p={p:.3g}")
    assert p > SAME


def test_typical_acceptance_is_lossy_where_tree_rejection_sampling_on_the_same_drafts_is_not():
    """5000 runs each, seed 3, T = 1. A nearly flat target (logit scale 0.3: every token clears the typical
    threshold) and a chain of K = 2 drafts from a wrong table's argmax: typical acceptance emits the drafts
    almost always (p < 1e-6: lossy); recursive rejection sampling on the same drafts and the same number of
    runs stays exact (p > 1e-4), so the χ² test has the power and the setup is fair."""
    logits = markov_tables(0, scale=0.3)
    params = SamplingParams(1.0)
    P = target_probs(logits, params)
    Q = target_probs(markov_tables(96), params)
    chain = Tree.chain(2)
    cands = np.array([[s, np.argmax(Q[s]), np.argmax(Q[np.argmax(Q[s])])] for s in range(V)])   # [V, 3]

    def typical(last, rng):
        path, bonus = typical_accept(chain, cands[last], logits[cands[last]], params, rng=rng)
        return [int(cands[last, i]) for i in path[1:]] + [bonus]

    def rejection(last, rng):
        path, bonus = tree_rejection_accept(chain, cands[last], P[cands[last]], rng)
        return [int(cands[last, i]) for i in path[1:]] + [bonus]

    joint = two_token_joint(reference_probs(logits, params))
    stat_t, df_t, p_t = chi2_test(run_two_tokens(typical, 5000, np.random.default_rng(3)), joint)
    stat_r, df_r, p_r = chi2_test(run_two_tokens(rejection, 5000, np.random.default_rng(3)), joint)
    print(f"typical: chi2={stat_t:.1f} df={df_t} p={p_t:.3g};  rejection: chi2={stat_r:.2f} df={df_r} p={p_r:.3g}")
    assert p_t < DIFFERENT and p_r > SAME


def test_acceptance_rules_make_the_same_decisions_under_the_host_guard_as_on_numpy():
    logits = markov_tables(0).astype(np.float32)
    P = target_probs(logits, SamplingParams(1.0))
    Pg, Lg = GUARD.asarray(P), GUARD.asarray(logits)
    tokens = np.array([0, 1, 2, 3, 4, 0, 1])
    tg = GUARD.asarray(tokens)
    tree = Tree.from_choices([[0], [1], [0, 0], [0, 1], [1, 0], [1, 1]])
    for seed in range(20):
        a, b = np.random.default_rng(seed), np.random.default_rng(seed)
        assert tree_rejection_accept(tree, tokens, P[tokens], a) == tree_rejection_accept(tree, tokens, Pg[tg], b)
        assert (chain_rejection_accept([1, 2], P[3:5], P[0:3], a)
                == chain_rejection_accept([1, 2], Pg[3:5], Pg[0:3], b))
        assert (typical_accept(tree, tokens, logits[tokens], SamplingParams(1.0), rng=a)
                == typical_accept(tree, tokens, Lg[tg], SamplingParams(1.0), rng=b))
