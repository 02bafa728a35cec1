"""Lossless, proved exactly (issue 16): the exact output law of every acceptance rule on tiny models.

minispec.speculative.exact_law replays the REAL rules (and the drafter) once per sequence of random outcomes and
sums the probabilities; a rule is lossless iff the law of the first H generated tokens equals the target's
autoregressive law. The reference law here comes from `oracle_probs`, a plain float64 temperature / top-k /
top-p written for this file (no minispec). A grid of >= 1000 random tiny models must give total-variation
distance <= 1e-12 for every lossless rule; typical acceptance's exact bias is printed (lossy by design). The χ²
tests of tests/test_sampling.py stay as a second, independent line. A gallery of the known bugs, each a one-line
variant of the real code, shows each with exact TV >= 1e-3.
"""
import functools
import inspect
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest

from minispec.decoders.draft_verify import DraftVerifyProposer, SkipSet
from minispec.speculative import acceptance, exact_law
from minispec.speculative.acceptance import chain_rejection_accept, make_rule, tree_rejection_accept
from minispec.speculative.exact_law import (Replay, autoregressive_law, autoregressive_step, decoder_law,
                                            exact_law as law_of,
                                            expected_accepted, memoised, sampled_chain, step_law, topk_tree, tv)
from minispec.speculative.loop import Context, Stats
from minispec.speculative.sampling import GeneratorRandomness, SamplingParams, randomness, target_probs
from minispec.speculative.tree import Tree

EXACT = 1e-12          # "lossless": TV to the target within float64 rounding of sums of products
N_CASES = 1000


# ---- an independent oracle of the target distribution ------------------------------------------------------------
def oracle_probs(logits, params):
    """float64 temperature -> top-k (ties kept) -> top-p (token kept iff the mass ranked above it < top_p), no
    minispec; temperature 0: one-hot of the first argmax."""
    z = np.asarray(logits, dtype=np.float64)
    if params.temperature == 0:
        return np.eye(len(z))[int(np.argmax(z))]
    z = z / params.temperature
    if params.top_k:
        z = np.where(z >= np.sort(z)[-min(params.top_k, len(z))], z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    if params.top_p < 1:
        keep = [sum(p[j] for j in range(len(p)) if (p[j], -j) > (p[i], -i)) < params.top_p for i in range(len(p))]
        keep = np.array(keep)
        keep |= p >= p[keep].min()                       # tokens tied with the smallest kept one stay (as minispec)
        p = np.where(keep, p, 0.0)
        p /= p.sum()
    return p


# ---- tiny models -------------------------------------------------------------------------------------------------
def table(V, seed, scale=1.5, sparse=0.0, context_free=False):
    """logits_of(prefix) -> [V] float64, filled at random once per prefix (per case seed); `sparse`: each
    token is -inf with that probability (one token always stays)."""
    memo = {}

    def logits_of(prefix):
        key = () if context_free else tuple(prefix)
        if key not in memo:
            r = np.random.default_rng([seed, len(key), *key])
            z = scale * r.standard_normal(V)
            if sparse:
                keep = r.integers(V)
                z[(r.random(V) < sparse) & (np.arange(V) != keep)] = -np.inf
            memo[key] = z
        return memo[key]
    return logits_of


PARAMS = [SamplingParams(1.0), SamplingParams(0.7), SamplingParams(1.3, top_k=2), SamplingParams(0.9, top_p=0.8),
          SamplingParams(0.7, top_k=3, top_p=0.9), SamplingParams(1.0, top_p=0.6), SamplingParams(0.0)]


def random_tree(r, V):
    """A random tree of top-k ranks (< min(V, 3)), 1 to 6 nodes, depth <= 3."""
    k = min(V, 3)
    choices = [(0,)]
    for _ in range(r.integers(0, 6)):
        parent = choices[r.integers(len(choices))] if r.random() < 0.7 else ()
        if len(parent) < 3:
            c = parent + (int(r.integers(k)),)
            if c not in choices:
                choices.append(c)
    return Tree.from_choices([list(c) for c in choices])


def make_case(i):
    """Case i of the grid: a tiny target and draft, a drafter, and the H of the law to compare."""
    r = np.random.default_rng([16, i])
    V = int(r.integers(2, 6))
    params = PARAMS[int(r.integers(len(PARAMS)))]
    context_free = r.random() < 0.2
    target = table(V, 2 * i, sparse=0.3 if r.random() < 0.25 else 0.0, context_free=context_free)
    q_kind = ["full", "sparse", "equal"][int(r.choice(3, p=[0.55, 0.35, 0.1]))]
    draft = target if q_kind == "equal" else table(V, 2 * i + 1, sparse=0.5 if q_kind == "sparse" else 0.0,
                                                   context_free=context_free)
    case = SimpleNamespace(i=i, V=V, params=params, target=target, draft=draft, q_kind=q_kind,
                           prefix=(int(r.integers(V)),), context_free=context_free)
    if r.random() < 0.55:                                 # a chain sampled from q (Draft & Verify's drafter)
        reach = {2: 4, 3: 4, 4: 2, 5: 2}[V] if q_kind == "sparse" else {2: 4, 3: 3, 4: 2, 5: 2}[V]
        case.kind, case.K = "chain", int(r.integers(1, reach + 1))
        case.real_drafter = r.random() < 0.1              # the real DraftVerifyProposer on a table model
        case.rules = ["rejection", "block"] + (["greedy"] if params.greedy else [])
    else:                                                 # a deterministic top-k tree (Medusa's and Hydra's)
        case.kind, case.tree = "tree", random_tree(r, V)
        case.K = case.tree.max_depth
        case.real_drafter = False
        case.rules = ["rejection", "typical"] + (["greedy"] if params.greedy else [])
    case.H = case.K + 1                                   # every token one step can emit
    # every 4th small case: the decoder's law over as many steps as it takes, each step the real one
    case.all_steps = i % 4 == 0 and (V ** case.K <= 9 or case.kind == "tree")
    return case


# ---- the real Draft & Verify drafter on a table model ------------------------------------------------------------
class TableModel:
    """Just enough of minispec.mistral.model.Model for DraftVerifyProposer.propose: a one-token forward_block at
    draft offset j returns the draft table's logits after the committed prefix, the root and the j tokens drafted
    before it."""
    xp, dtype = np, np.float64

    def __init__(self, logits_of, V):
        self.logits_of, self.config = logits_of, SimpleNamespace(vocab_size=V, n_layers=1)

    def forward_block(self, tokens, cache, skip=None, offset=0):
        cache.scratch[offset:] = [int(tokens[0])]
        return SimpleNamespace(logits=self.logits_of(cache.committed + tuple(cache.scratch))[None, :])   # [1, V]


class TableCache:
    ring = True                     # a table has no last position: the drafter never meets the end of a cache

    def __init__(self, prefix):
        self.committed, self.scratch = tuple(prefix[:-1]), []      # the root is not in the cache yet

    def discard(self):
        self.scratch = []


def real_draft_verify(case):
    """propose(prefix, rand) with DraftVerifyProposer (no skipped sublayer: the draft is the table), K tokens."""
    model = TableModel(case.draft, case.V)
    proposer = DraftVerifyProposer(model, skip=SkipSet.none(1), max_draft=case.K, gamma0=0.0, adaptive=False)
    return lambda prefix, rand: proposer.propose(
        Context(prefix[-1], None, model, TableCache(prefix), case.params, rand, Stats()))


def drafter(case):
    if case.kind == "tree":
        return topk_tree(case.draft, case.tree)
    return real_draft_verify(case) if case.real_drafter else sampled_chain(case.draft, case.params, case.K)


def rule_maker(case, rule):
    """rand -> rule(draft, logits). make_rule's own when the case runs the real drafter end to end; otherwise the
    same acceptance functions with the processed target computed once per draft instead of once per replay."""
    if case.real_drafter or rule not in ("rejection", "block"):
        return lambda rand: make_rule(case.params, rule, rand)
    accept = acceptance.rejection_accept if rule == "rejection" else acceptance.block_verify
    processed = {}

    def target_of(logits):
        key = logits.tobytes()
        if key not in processed:
            processed[key] = target_probs(logits, case.params)
        return processed[key]
    return lambda rand: lambda draft, logits: accept(draft, target_of(logits), rand)


def step_of(case, rule):
    """The step law of `rule` (a make_rule name) on the case: the real step at the first prefix and, unless
    case.all_steps, the target's own steps after it (the first H tokens then check that one step exactly)."""
    real = memoised(lambda pre: step_law(pre, drafter(case), rule_maker(case, rule), case.target))
    if case.all_steps:
        return real
    ar = autoregressive_step(lambda pre: oracle_probs(case.target(pre), case.params))
    return lambda pre: real(pre) if tuple(pre) == case.prefix else ar(pre)


def reference(case):
    return autoregressive_law(case.prefix, case.H, lambda pre: oracle_probs(case.target(pre), case.params))


# ---- the replays themselves --------------------------------------------------------------------------------------
def test_exact_law_of_a_hand_worked_program_of_a_bernoulli_then_a_categorical():
    def program(rand):
        return (True, rand.categorical(np.array([1.0, 0.0, 3.0]))) if rand.bernoulli(1, 4) else (False, 5)
    law = law_of(program)
    assert law == pytest.approx({(True, 0): 1 / 16, (True, 2): 3 / 16, (False, 5): 3 / 4}, abs=1e-15)


def test_a_bernoulli_is_u_times_total_below_p_with_one_uniform_from_the_generator():
    a, b = np.random.default_rng(7), np.random.default_rng(7)
    rand = GeneratorRandomness(a)
    for p, total in [(0.3, 1.0), (0.2, 0.4), (0.5, 0.25), (0.0, 1.0), (0.4, 0.0)] * 20:
        assert rand.bernoulli(p, total) == (b.random() * total < p)
    assert law_of(lambda r: bool(r.bernoulli(0.2, 0.4))) == {True: 0.5, False: 0.5}
    assert law_of(lambda r: bool(r.bernoulli(0.5, 0.25))) == {True: 1.0}
    assert randomness(rand) is rand
    with pytest.raises(TypeError, match="Randomness"):
        randomness(0.5)


@pytest.mark.parametrize("K", [0, 1, 3])
def test_chain_rejection_spends_one_uniform_per_decision_k_plus_one_whatever_happens(K):
    """The contract that keeps seeded outputs unchanged: K acceptance tests, then one draw."""
    r = np.random.default_rng(3)
    V = 4
    q = r.dirichlet(np.ones(V), size=K)                                          # [K, V]
    target = r.dirichlet(np.ones(V), size=K + 1)                                 # [K + 1, V]
    for seed in range(20):
        a, b = np.random.default_rng(seed), np.random.default_rng(seed)
        chain_rejection_accept([int(np.argmax(row)) for row in q], q, target, a)
        b.random(K + 1)
        assert a.random() == b.random()


def test_a_replay_that_decides_differently_on_the_same_outcomes_is_refused():
    calls = []

    def flaky(rand):                                     # the second run cannot draw what the first one left over
        calls.append(1)
        return rand.categorical(np.array([1.0, 1.0]) if len(calls) == 1 else np.array([1.0, 0.0]))
    with pytest.raises(RuntimeError, match="different decision"):
        law_of(flaky)


def test_the_real_draft_verify_drafter_has_the_exact_draft_law_of_sampled_chain():
    """The enumerator follows DraftVerifyProposer's own randomness: the law of its drafts (tokens and q) is that
    of exact_law.sampled_chain, and that of drawing K tokens one by one from the processed draft."""
    for V, K, params in [(3, 3, SamplingParams(0.8, top_p=0.9)), (4, 2, SamplingParams(1.2, top_k=2))]:
        case = SimpleNamespace(V=V, K=K, params=params, draft=table(V, 5, sparse=0.3))
        prefix = (1, 0)
        real = law_of(lambda rand: real_draft_verify(case)(prefix, rand), key=lambda d: tuple(d.tokens))
        mine = law_of(lambda rand: sampled_chain(case.draft, params, K)(prefix, rand), key=lambda d: tuple(d.tokens))
        ar = autoregressive_law(prefix, K, lambda pre: oracle_probs(case.draft(pre), params))
        assert tv(real, mine) < EXACT and tv({k[1:]: p for k, p in real.items()}, ar) < EXACT
        d = real_draft_verify(case)(prefix, Replay())
        assert np.allclose(d.q, sampled_chain(case.draft, params, K)(prefix, Replay()).q, atol=0)


# ---- the grid ----------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def grid():
    """Every case: {rule: TV to the target}, and the first step's expected accepted tokens per rule."""
    out = []
    for i in range(N_CASES):
        case = make_case(i)
        ref = reference(case)
        case.tv, case.accepted = {}, {}
        for rule in case.rules:
            step = step_of(case, rule)
            case.tv[rule] = tv(decoder_law(case.prefix, case.H, step), ref)
            case.accepted[rule] = expected_accepted(step(case.prefix))
        out.append(case)
    return out


def test_the_grid_covers_what_the_issue_asks_for():
    cases = grid()
    print(f"grid: {len(cases)} cases, {sum(c.kind == 'chain' for c in cases)} chains "
          f"({sum(c.real_drafter for c in cases)} drafted by DraftVerifyProposer), "
          f"{sum(c.kind == 'tree' for c in cases)} trees, {sum(c.params.greedy for c in cases)} greedy, "
          f"{sum(c.all_steps for c in cases)} with every step real")
    assert len(cases) >= 1000
    assert {c.V for c in cases} == {2, 3, 4, 5}
    chains, trees = [c for c in cases if c.kind == "chain"], [c for c in cases if c.kind == "tree"]
    assert max(c.K for c in chains) == 4 and max(c.K for c in trees) == 3 and len(trees) > 300
    assert {c.q_kind for c in cases} == {"full", "sparse", "equal"}
    assert {(p.top_k > 0, p.top_p < 1, p.temperature != 1) for p in (c.params for c in cases)} >= \
        {(True, False, True), (False, True, True), (True, True, True), (False, False, True)}
    assert sum(c.real_drafter for c in cases) > 30 and max(c.H for c in cases) == 5
    assert sum(c.all_steps for c in cases) > 150 and max(c.H for c in cases if c.all_steps) >= 4
    assert sum(c.params.greedy for c in cases) > 50


def test_every_lossless_rule_has_the_targets_exact_law_on_every_grid_case():
    bad = [(c.i, rule, t) for c in grid() for rule, t in c.tv.items() if rule != "typical" and not t <= EXACT]
    worst = max(t for c in grid() for rule, t in c.tv.items() if rule != "typical")
    print(f"exact law: {sum(len(c.tv) for c in grid())} (case, rule) pairs, worst lossless TV {worst:.2e}")
    assert not bad, bad[:10]


def test_block_verification_never_accepts_fewer_tokens_than_token_level_in_expectation_on_the_grid():
    chains = [c for c in grid() if c.kind == "chain"]
    gain = [c.accepted["block"] - c.accepted["rejection"] for c in chains]
    print(f"block - token-level expected accepted tokens over {len(chains)} chains: min {min(gain):.2e}, "
          f"mean {np.mean(gain):.4f}, max {max(gain):.4f}")
    assert min(gain) >= -EXACT and max(gain) > 0.05


def test_typical_acceptance_is_lossy_and_the_exact_law_says_by_how_much():
    """Reported, not passed: the exact TV of Medusa's typical acceptance to the target on the grid's trees."""
    t = np.array([c.tv["typical"] for c in grid() if "typical" in c.tv and not c.params.greedy])
    print(f"typical acceptance exact TV to the target on {len(t)} sampled tree cases: median {np.median(t):.3f}, "
          f"max {t.max():.3f}, min {t.min():.2e}")
    assert np.median(t) > 1e-3


# ---- the gallery of known bugs: each a one-line variant of the real code -----------------------------------------
class OneUniform:
    """A Randomness whose bernoulli decisions all compare against ONE uniform u (the bug "one uniform reused
    across positions"), kept exact: given the outcomes so far u lies in [lo, hi), so u < r has probability
    (r - lo) / (hi - lo) clipped to [0, 1]. Categorical draws pass through (fresh)."""

    def __init__(self, inner):
        self.inner, self.lo, self.hi = inner, 0.0, 1.0

    def bernoulli(self, p, total=1.0):
        r = min(1.0, max(0.0, float(p) / float(total))) if total > 0 else float(p > 0)
        yes = self.inner.bernoulli(min(1.0, max(0.0, (r - self.lo) / (self.hi - self.lo))))
        self.lo, self.hi = (self.lo, min(self.hi, r)) if yes else (max(self.lo, r), self.hi)
        return yes

    def categorical(self, weights):
        return self.inner.categorical(weights)


def variant(func, old, new, **names):
    """func with the one line `old` replaced by `new`, compiled in its own module's namespace (+ names)."""
    src = textwrap.dedent(inspect.getsource(func))
    assert src.count(old) == 1, old
    changed = src.replace(old, new)
    assert sum(a != b for a, b in zip(src.splitlines(), changed.splitlines())) == 1
    ns = {**vars(inspect.getmodule(func)), **names}
    exec(compile(changed, f"<{func.__name__} variant>", "exec"), ns)
    return ns[func.__name__]


def chain_rule(accept):
    """rand -> rule(draft, logits) running `accept` (chain_rejection_accept or a variant) on the processed target."""
    return lambda params: lambda rand: lambda draft, logits: (
        lambda n_bonus: (list(range(n_bonus[0] + 1)), n_bonus[1]))(
        accept(draft.tokens[1:], draft.q, target_probs(logits, params), rand))


def tree_rule(accept):
    return lambda params: lambda rand: lambda draft, logits: accept(draft.tree, draft.tokens,
                                                                    target_probs(logits, params), rand)


GALLERY = {
    "q is not the distribution the token was drawn from": dict(
        drafter=(exact_law.sampled_chain, "tokens.append(rand.categorical(probs))",
                 "tokens.append(rand.categorical(np.exp(logits)))"),      # drawn raw, the processed q reported
        rule=chain_rule(chain_rejection_accept)),
    "no bonus after a full accept": dict(
        rule=chain_rule(variant(chain_rejection_accept, "return K, rand.categorical(target[K])",
                                "return K - 1, rand.categorical(xp.maximum(target[K - 1] - draft_probs[K - 1], 0))"))),
    "one uniform reused across positions": dict(
        rule=chain_rule(variant(chain_rejection_accept, "rand = randomness(rng)", "rand = OneUniform(randomness(rng))",
                                OneUniform=OneUniform))),
    "a processed target against a raw q": dict(
        drafter=(exact_law.sampled_chain, "q.append(probs)", "q.append(np.exp(logits) / np.exp(logits).sum())"),
        rule=chain_rule(chain_rejection_accept)),
    "a greedy draft verified with a softmax q": dict(
        drafter=(exact_law.sampled_chain, "tokens.append(rand.categorical(probs))",
                 "tokens.append(int(np.argmax(probs)))"),
        rule=chain_rule(chain_rejection_accept)),
    "the residual not renormalised": dict(
        rule=tree_rule(variant(tree_rejection_accept, "rand.bernoulli(mass[x], rest + sum(mass.values()))",
                               "rand.bernoulli(mass[x])")), tree=True),
}

GALLERY_CASES = [dict(V=3, K=2, params=SamplingParams(0.7, top_p=0.9), seed=1),
                 dict(V=4, K=2, params=SamplingParams(1.0), seed=2),
                 dict(V=2, K=3, params=SamplingParams(1.3, top_k=1), seed=3),
                 dict(V=3, K=2, params=SamplingParams(0.8, top_k=2), seed=4)]
TREE = Tree.from_choices([[0], [1], [0, 0], [0, 1], [1, 0]])


def gallery_tv(bug, V, K, params, seed, fixed=False):
    """Exact TV to the target of the bug's variant (or, fixed=True, of the real code) on one tiny case."""
    spec = GALLERY[bug]
    case = SimpleNamespace(V=V, K=K, H=K + 1, params=params, prefix=(0,),
                           target=table(V, 100 + seed), draft=table(V, 200 + seed))
    if "drafter" in spec and not fixed:
        make = variant(*spec["drafter"])(case.draft, params, K)
    elif spec.get("tree"):
        make = topk_tree(case.draft, TREE)
    else:
        make = sampled_chain(case.draft, params, K)
    rule = (lambda rand: make_rule(params, "rejection", rand)) if fixed else spec["rule"](params)
    step = memoised(lambda pre: step_law(pre, make, rule, case.target))
    return tv(decoder_law(case.prefix, case.H, step), reference(case))


@pytest.mark.parametrize("bug", list(GALLERY))
def test_each_known_bug_is_a_one_line_variant_with_exact_tv_of_at_least_a_thousandth(bug):
    tvs = [gallery_tv(bug, **c) for c in GALLERY_CASES]
    fixed = [gallery_tv(bug, fixed=True, **c) for c in GALLERY_CASES]
    print(f"{bug}: exact TV {max(tvs):.4f} (worst of {len(tvs)} cases); the real code: {max(fixed):.1e}")
    assert max(tvs) >= 1e-3 and max(fixed) <= EXACT


def test_dropping_the_bonus_outright_costs_speed_not_exactness():
    """A step that ends at its K accepted tokens without the bonus (the next step drafts from them) is exact: the
    bonus is a fresh draw from p(. | x_1..x_K), which the next step makes again. Every step real, H = K + 2."""
    drop = variant(chain_rejection_accept, "return K, rand.categorical(target[K])",
                   "return K - 1, int(draft_tokens[K - 1])")
    for seed, (V, K, params) in enumerate([(3, 2, SamplingParams(0.7, top_p=0.9)), (2, 3, SamplingParams(1.0))]):
        case = SimpleNamespace(V=V, K=K, H=K + 2, params=params, prefix=(0,), target=table(V, 300 + seed))
        step = memoised(lambda pre: step_law(pre, sampled_chain(table(V, 400 + seed), params, K),
                                             chain_rule(drop)(params), case.target))
        assert tv(decoder_law(case.prefix, case.H, step), reference(case)) < EXACT
