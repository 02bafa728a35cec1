"""Dynamic trees (minispec.speculative.dynamic_tree; tree="dynamic" of Medusa, Hydra, Hydra++): the growth keeps
exactly the best paths of a naive enumeration, the kept set is a tree for every size, the rate rule stops where a
hand computation says, the drafted tokens and values are the heads' own, greedy decoding is AR's, sampling is
lossless.

Expected values come from hand computations, a naive enumeration of all paths, the reference heads of
test_hydra.py / test_medusa.py, AR decoding and the model's own forward pass.
"""
import itertools

import numpy as np
import pytest

from conftest import assert_lossless
from test_hydra import (assert_stops_at_the_limit_and_right_after_eos, assert_two_token_joint, bigram_heads,
                        oracle_heads, random_heads as hydra_random_heads, ref_head, tiny_model)
from test_medusa import random_heads as medusa_random_heads, ref_head_logits
from minispec import generate
from minispec.decoders.hydra import HydraProposer
from minispec.decoders.hydra_heads import HydraHeads
from minispec.decoders.medusa import MedusaProposer
from minispec.decoders.registry import make_proposer
from minispec.errors import UserError
from minispec.speculative.acceptance import make_rule
from minispec.speculative.dynamic_tree import best_size, grow, rank_order, to_tree, TreeCache
from minispec.speculative.loop import Context, Stats
from minispec.speculative.sampling import SamplingParams

ARCHS = ["mlp", "prefix-mlp"]


# ---------------------------------------------------------------------------------------------------------
# A draft written as a table: q(next token | path) for every path, and the naive enumeration of all paths
# ---------------------------------------------------------------------------------------------------------
def table_expand(q, calls=None):
    """expand() for grow from q(path tuple of tokens) -> probabilities [V]: ids by decreasing probability (ties
    by id), so a node's children are its path's top tokens."""
    def expand(d, rows, tokens, parents):
        if calls is not None:
            calls.append((d, [int(r) for r in rows]))
        ids, probs = [], []
        for r in rows:
            path, n = [], int(r)
            while n > 0:
                path.append(int(tokens[n]))
                n = int(parents[n])
            p = np.asarray(q(tuple(reversed(path))), np.float64)
            order = sorted(range(len(p)), key=lambda t: (-p[t], t))
            ids.append(order)
            probs.append(p[order])
        return np.array(ids), np.array(probs)
    return expand


def naive_best(q, V, max_depth, top_k, n):
    """Every rank path of at most max_depth ranks < top_k, its tokens and value (the product of q along it),
    sorted by (-value, depth, rank path); the first n as {rank path: (tokens, value)}."""
    rows = []
    for depth in range(1, max_depth + 1):
        for ranks in itertools.product(range(top_k), repeat=depth):
            toks, value = (), 1.0
            for r in ranks:
                p = np.asarray(q(toks), np.float64)
                t = sorted(range(V), key=lambda i: (-p[i], i))[r]
                value *= min(p[t], 1.0)
                toks += (t,)
            rows.append((-value, depth, ranks, toks))
    rows.sort()
    return {ranks: (toks, -neg) for neg, _, ranks, toks in rows[:n]}


def kept_paths(g):
    """{rank path: (tokens, value)} of a Grown's kept nodes, walking parents by hand."""
    out = {}
    for n in g.kept:
        ranks, toks, m = [], [], int(n)
        while m > 0:
            ranks.append(int(g.ranks[m]))
            toks.append(int(g.tokens[m]))
            m = int(g.parents[m])
        out[tuple(reversed(ranks))] = (tuple(reversed(toks)), float(g.values[n]))
    return out


def hand_q(path):
    """The hand-worked draft of the tests below (V = 3): after the root [0.6, 0.3, 0.1]; after token 0
    [0.5, 0.4, 0.1]; after token 1 [0.9, 0.05, 0.05]; deeper: [0.5, 0.5, 0]."""
    return {(): [0.6, 0.3, 0.1], (0,): [0.5, 0.4, 0.1], (1,): [0.9, 0.05, 0.05]}.get(path, [0.5, 0.5, 0.0])


def random_q(seed, V, ties):
    """A draft whose every path has its own distribution over V tokens; ties=True draws from a few values (1, 0
    and repeats included), so that many paths tie."""
    cache = {}

    def q(path):
        if path not in cache:
            rng = np.random.default_rng([seed, len(path)] + list(path))
            p = rng.choice([0.0, 0.25, 0.5, 1.0], V) if ties else rng.random(V) ** 3
            if ties and rng.random() < 0.3:
                p = np.eye(V)[rng.integers(V)]                      # certain: a child equals its parent's value
            cache[path] = p / p.sum() if p.sum() > 0 else np.full(V, 1.0 / V)
        return cache[path]
    return q


# ---------------------------------------------------------------------------------------------------------
# Growth and rerank
# ---------------------------------------------------------------------------------------------------------
def test_on_the_hand_worked_draft_the_best_nodes_are_those_computed_by_hand_ties_going_to_the_shallower():
    """Values: [0] 0.6, [1] 0.3, [0,0] 0.6·0.5 = 0.3 (a tie with [1], also in floating point), [1,0] 0.27,
    [0,1] 0.24, [1,1] 0.015. By (-value, depth, path): [0], [1], [0,0], [1,0], [0,1], [1,1]."""
    expected = [((0,), (0,), 0.6), ((1,), (1,), 0.3), ((0, 0), (0, 0), 0.3), ((1, 0), (1, 0), 0.27),
                ((0, 1), (0, 1), 0.24), ((1, 1), (1, 1), 0.015)]
    for n in range(7):
        g = grow(2, table_expand(hand_q), n, 2, 2)
        got = kept_paths(g)
        assert sorted(got) == sorted(r for r, _, _ in expected[:n])
        for ranks, toks, value in expected[:n]:
            assert got[ranks][0] == toks and got[ranks][1] == pytest.approx(value, abs=1e-15)
    tree, tokens, values = to_tree(grow(2, table_expand(hand_q), 3, 2, 2), TreeCache())
    assert [list(p) for p in tree.choices] == [[], [0], [1], [0, 0]]
    assert list(tokens) == [2, 0, 1, 0] and values == pytest.approx([1.0, 0.6, 0.3, 0.3])


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ties", [False, True])
def test_the_growth_keeps_exactly_the_paths_a_naive_enumeration_of_all_paths_picks(seed, ties):
    V, max_depth, top_k = 4, 3, 3
    q = random_q(seed, V, ties)
    for n in (1, 2, 5, 9, 17, 40):
        got = kept_paths(grow(0, table_expand(q), n, max_depth, top_k))
        want = naive_best(q, V, max_depth, top_k, n)
        assert set(got) == set(want), f"n={n}"
        for ranks in want:
            assert got[ranks][0] == want[ranks][0] and got[ranks][1] == pytest.approx(want[ranks][1], abs=1e-15)


@pytest.mark.parametrize("seed", range(8))
def test_every_best_n_by_value_with_ties_broken_by_creation_order_contains_each_nodes_parent(seed):
    """The proof the module relies on, checked: value(child) <= value(parent) in floating point and a child is
    created after its parent, so for EVERY n the best n grown nodes (not only the kept ones) form a tree."""
    q = random_q(seed, 5, ties=True)
    g = grow(0, table_expand(q), 60, 4, 5)
    assert np.all(g.values[1:] <= g.values[g.parents[1:]])
    assert np.all(np.arange(1, len(g.values)) > g.parents[1:])
    order = rank_order(g.values)
    for n in range(len(order) + 1):
        best = set(order[:n].tolist()) | {0}
        assert all(int(g.parents[m]) in best for m in order[:n])


def test_only_nodes_still_among_the_best_are_expanded_one_call_per_depth():
    calls = []
    grow(2, table_expand(hand_q, calls), 2, 3, 2)
    # depth 1 gives [0] 0.6, [1] 0.3: both among the best 2; depth 2 gives [0,0] 0.3 which ties [1] and loses
    assert calls == [(0, [0]), (1, [1, 2])]        # nothing at depth 2 is among the best 2: no third call


# ---------------------------------------------------------------------------------------------------------
# The rate rule
# ---------------------------------------------------------------------------------------------------------
COSTS = {1: 1.0, 2: 1.2, 4: 1.6, 8: 3.0}       # c(3) = 1.4, c(5) = 1.95, c(6) = 2.3, c(7) = 2.65 by interpolation


def test_best_size_is_the_n_with_the_best_rate_by_hand():
    # values 0.6, 0.3, paid 0.1: rates 1/1.1 = 0.909, 1.6/1.3 = 1.231, 1.9/1.5 = 1.267 -> n = 2
    n, rate = best_size([0.6, 0.3], COSTS, 0.1)
    assert n == 2 and rate == pytest.approx(1.9 / 1.5)
    assert best_size([0.6, 0.3], {1: 1.0, 2: 2.0}, 0.1) == (0, pytest.approx(1 / 1.1))


def test_the_rate_rule_stops_at_the_depth_where_the_best_rate_falls_as_computed_by_hand():
    """Depth 1 (paid 0.1): best n = 2, rate 1.9 / 1.5 = 1.2667 > 1 (plain decoding): grow. Depth 2 expands
    both depth-1 nodes (2 rows, paid 0.1 + 0.1 + 2 · 0.05 = 0.3); values 0.6, 0.3, 0.3, 0.27, 0.24, 0.015:
    rates 1/1.3, 1.6/1.5, 1.9/1.7, 2.2/1.9 = 1.1579 (n = 3), 2.47/2.25, 2.71/2.6, 2.725/2.95: the best,
    1.1579, is below 1.2667: stop; keep the best 3 at the cost paid. Depth 3 is never grown."""
    calls = []
    g = grow(2, table_expand(hand_q, calls), 32, 3, 2, costs=COSTS, depth_costs=[0.1, (0.1, 0.05), 0.1])
    assert [d for d, _ in calls] == [0, 1]
    assert g.rates == pytest.approx([1.9 / 1.5, 2.2 / 1.9])
    assert sorted(kept_paths(g)) == [(0,), (0, 0), (1,)]


def test_the_rate_rule_grows_on_while_the_rate_rises_as_computed_by_hand():
    """The same draft with a free depth 2 (paid 0.1): depth 2's rates 1.9/1.5 = 1.2667 (n = 2), 2.2/1.7 = 1.2941
    (n = 3), 2.47/2.05 = 1.2049 (n = 4): 1.2941 > 1.2667, so depth 3 is grown: it expands the depth-2 nodes
    among the best 3 ([0,0] only, 1 row, paid 0.2), children 0.3·0.5 = 0.15 twice. Values 0.6, 0.3, 0.3,
    0.27, 0.24, 0.15, 0.15, 0.015: rates with paid 0.2: n=3 2.2/1.8 = 1.2222, n=4 2.47/2.15 = 1.1488:
    1.2222 < 1.2941, stop; the best at paid 0.2 is n = 3."""
    calls = []
    g = grow(2, table_expand(hand_q, calls), 32, 3, 2, costs=COSTS, depth_costs=[0.1, 0.0, 0.1])
    assert calls[2] == (2, [3])                                        # node 3 = [0, 0]
    assert g.rates == pytest.approx([1.9 / 1.5, 2.2 / 1.7, 2.2 / 1.8])
    assert sorted(kept_paths(g)) == [(0,), (0, 0), (1,)]


def test_when_nothing_pays_the_rule_drafts_nothing_after_one_head_call():
    """c(2) = 2: depth 1's rates are 1/1.1, 1.6/2.1, ...: the best is n = 0 (0.909 <= 1): stop, root alone."""
    calls = []
    g = grow(2, table_expand(hand_q, calls), 32, 3, 2, costs={1: 1.0, 2: 2.0, 4: 4.0}, depth_costs=[0.1] * 3)
    assert len(calls) == 1 and len(g.kept) == 0
    tree, tokens, _ = to_tree(g, TreeCache())
    assert tree.N == 1 and list(tokens) == [2]


# ---------------------------------------------------------------------------------------------------------
# The decoders' drafts: tokens and values are the heads' own
# ---------------------------------------------------------------------------------------------------------
def softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def context(model, root, hidden):
    return Context(root, hidden, model, model.new_cache(), SamplingParams(), np.random.default_rng(0), Stats())


@pytest.mark.parametrize("arch", ARCHS)
def test_a_hydra_nodes_token_and_value_come_from_its_heads_on_its_own_path(arch):
    model = tiny_model(W=6, seed=2)
    heads = hydra_random_heads(model, arch, seed=2)
    prop = HydraProposer(model, heads, tree="dynamic", max_nodes=12, top_k=3)
    _, hidden = model.forward([1, 2, 3], return_hidden=True)
    prop.h = hidden[-1]                                  # Hydra++: stands in for the prefix output
    d = prop.propose(context(model, 7, hidden[-1]))
    E, tree = np.asarray(model.tok_embeddings), d.tree
    assert tree.N == 13 and tree.max_depth >= 2
    for n in range(1, tree.N):
        chain, m = [], n
        while m > 0:
            chain.append(m)
            m = int(tree.parents[m])
        chain.reverse()                                  # root's child ... n
        value, path_tokens = 1.0, []
        for m in chain:
            a = np.concatenate([hidden[-1], E[7]] + [E[t] for t in path_tokens])
            p = softmax(ref_head(heads.heads[len(path_tokens)], a[None])[0])
            tok = int(np.argsort(-p, kind="stable")[tree.rank[m]])
            assert int(d.tokens[m]) == tok
            value *= p[tok]
            path_tokens.append(tok)
        assert prop.dynamic.values[n] == pytest.approx(value, rel=1e-9)


def test_a_medusa_nodes_value_is_the_product_of_its_heads_marginals():
    model = tiny_model(W=6, seed=3)
    heads = medusa_random_heads(model, num_heads=3, seed=3)
    prop = MedusaProposer(model, heads, tree="dynamic", max_nodes=9)
    _, hidden = model.forward([1, 2, 3], return_hidden=True)
    d = prop.propose(context(model, 5, hidden[-1]))
    W, b, proj = (np.asarray(x) for x in (heads.W, heads.b, heads.proj))
    probs = [softmax(ref_head_logits(W, b, proj, None, hidden[-1], k)) for k in range(3)]
    tops = [np.argsort(-p, kind="stable") for p in probs]
    for n in range(1, d.tree.N):
        path = d.tree.choices[n]
        assert int(d.tokens[n]) == tops[len(path) - 1][path[-1]]
        want = np.prod([probs[k][tops[k][r]] for k, r in enumerate(path)])
        assert prop.dynamic.values[n] == pytest.approx(want, rel=1e-9)


# ---------------------------------------------------------------------------------------------------------
# Greedy: exactly AR's tokens and cache (conftest.assert_lossless), windows that wrap
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("W", [4, 7])
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("max_nodes", [1, 4, 12])
def test_greedy_hydra_with_dynamic_trees_emits_exactly_the_ar_tokens(W, arch, max_nodes):
    model = tiny_model(W=W, seed=W, dim=64)
    heads = oracle_heads(model, arch, [1, 5, 3], 40, corrupt=0.2, seed=W)
    stats = assert_lossless(model, HydraProposer(model, heads, tree="dynamic", max_nodes=max_nodes))
    steps = stats.accepted[1:-1]
    assert max(steps) > 2 if max_nodes > 1 else max(steps) == 2, "no accepted drafts"
    assert sum(stats.drafted) > sum(a - 1 for a in stats.accepted), "nothing was ever rejected"
    assert_lossless(model, HydraProposer(model, hydra_random_heads(model, arch, seed=W), tree="dynamic",
                                         max_nodes=max_nodes, width=2))


@pytest.mark.parametrize("W", [4, 6])
def test_greedy_medusa_with_dynamic_trees_emits_exactly_the_ar_tokens(W):
    model = tiny_model(W=W, seed=W)
    heads = medusa_random_heads(model, num_heads=4, seed=W)
    for max_nodes in (3, 10):
        stats = assert_lossless(model, MedusaProposer(model, heads, tree="dynamic", max_nodes=max_nodes))
        assert max(stats.accepted[1:-1]) > 1, "no draft token was ever accepted"


@pytest.mark.parametrize("decoder", ["medusa", "hydra", "hydra++"])
def test_greedy_with_hardware_sized_trees_is_ar_on_a_flat_and_a_steep_cost_curve(decoder):
    """A GPU-shaped flat curve drafts more nodes per step than a steep CPU-shaped one; both stay AR's tokens."""
    model = tiny_model(W=5, seed=9, dim=64)
    if decoder == "medusa":
        heads = medusa_random_heads(model, num_heads=3, seed=9)
    else:
        heads = hydra_random_heads(model, "mlp" if decoder == "hydra" else "prefix-mlp", seed=9)
    drafted = []
    for costs in ({1: 1.0, 64: 1.05}, {1: 1.0, 2: 1.3, 4: 1.9, 8: 3.5, 64: 30.0}):
        stats = assert_lossless(model, make_proposer(decoder, model, heads=heads, tree="dynamic", max_nodes="auto",
                                                     costs=costs, depth_costs=[0.05] * 3, max_depth=3))
        drafted.append(np.mean(stats.drafted[1:]))
    print(decoder, "mean nodes drafted, flat vs steep curve:", drafted)
    assert drafted[0] > drafted[1] + 1


def test_dynamic_trees_never_exceed_max_new_tokens_and_stop_right_after_eos():
    model = tiny_model(W=5, seed=4, dim=64)
    prop = HydraProposer(model, oracle_heads(model, "mlp", [1, 2], 40, corrupt=0.1, seed=4), tree="dynamic",
                         max_nodes=8)
    assert_stops_at_the_limit_and_right_after_eos(model, prop)


def test_dynamic_options_are_checked_and_refused_with_a_static_tree():
    model = tiny_model(W=5, seed=1)
    heads = hydra_random_heads(model, "mlp", seed=1)
    for opts, msg in [(dict(tree="dynamic", max_nodes=-1), "max_nodes"), (dict(tree="dynamic", max_depth=9), "max_depth"),
                      (dict(tree="dynamic", max_nodes=4, costs={1: 1.0}), "costs"),
                      (dict(tree=[[0]], max_nodes=4), "max_nodes is an option of tree='dynamic'")]:
        with pytest.raises(UserError, match=msg):
            make_proposer("hydra", model, heads=heads, **opts)


# ---------------------------------------------------------------------------------------------------------
# Sampling: recursive rejection sampling of the dynamic tree's point-mass candidates is lossless (χ²)
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("decoder", ["hydra", "medusa"])
def test_rejection_sampling_of_a_dynamic_draft_reproduces_the_models_own_two_token_joint(decoder):
    """10000 draws, seed 0, T = 1, V = 5, as test_hydra's static test: one dynamic draft (6 nodes) verified by
    one forward, the rule applied 10000 times; when only the bonus comes out, the second token is drawn from
    the model. The first two tokens' histogram must be p(b | prompt) p(c | prompt, b); "same" is p > 1e-4."""
    model = tiny_model(W=6, V=5, seed=11)
    ids = [1, 3, 2]
    ar = generate(model, ids, max_new_tokens=20, eos_id=None).tokens
    if decoder == "hydra":
        prop = HydraProposer(model, bigram_heads(model, "mlp", [2] + ar, num_heads=2, corrupt=0.3, seed=1),
                             tree="dynamic", max_nodes=6)
    else:
        prop = MedusaProposer(model, medusa_random_heads(model, num_heads=2, seed=4), tree="dynamic", max_nodes=6)
    cache = model.new_cache()
    _, hidden = model.forward(ids[:-1], cache, return_hidden=True)
    rng, params = np.random.default_rng(0), SamplingParams(1.0)
    draft = prop.propose(Context(ids[-1], hidden[-1], model, cache, params, rng, Stats()))
    assert draft.tree.N == 7 and draft.tree.max_depth == 2
    assert_two_token_joint(model, ids, cache, draft, make_rule(params, None, rng), f"{decoder} dynamic tree rejection")


@pytest.mark.parametrize("decoder", ["medusa", "hydra", "hydra++"])
def test_dynamic_trees_run_without_implicit_host_conversions_and_match_numpy(decoder):
    """Under tests/hostguard.py's CuPy-strict namespace (no GPU needed), sized trees included."""
    from conftest import random_tensors, tiny_config
    from hostguard import GUARD
    from minispec.mistral.model import Model
    cfg = tiny_config(sliding_window=5, vocab_size=24)
    t = random_tensors(cfg, seed=2)
    outs = []
    for model in (Model(cfg, t, device=GUARD), Model(cfg, t, device="cpu")):
        if decoder == "medusa":
            heads = medusa_random_heads(model, 3, seed=2)
        else:                                    # test_hydra's random_heads, with its noise uploaded explicitly
            heads = HydraHeads.create(model, 3, 2, "mlp" if decoder == "hydra" else "prefix-mlp", seed=2)
            rng = np.random.default_rng(2)
            for p in heads.heads + ([heads.prefix] if heads.prefix is not None else []):
                for k in p:
                    p[k] = p[k] + model.xp.asarray(0.3 * rng.standard_normal(p[k].shape).astype(model.dtype))
        for opts in (dict(max_nodes=6), dict(max_nodes="auto", costs={1: 1.0, 8: 1.2}, depth_costs=[0.05] * 3)):
            prop = make_proposer(decoder, model, heads=heads, tree="dynamic", **opts)
            outs.append(generate(model, [1, 2], decoder=prop, max_new_tokens=12, eos_id=None).tokens)
    assert outs[:2] == outs[2:]
