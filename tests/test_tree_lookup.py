"""Prompt lookup inside the dynamic trees (option lookup=L of medusa, hydra and hydra++ with tree="dynamic";
minispec.speculative.dynamic_tree.add_chain, minispec.decoders.lookup.ContextChain): the chain joins the grown
tree as a hand computation says, the best n nodes stay a tree, the chain's values follow its own acceptance
estimate, greedy decoding stays AR's (windows that wrap included), sampling keeps the target's exact law, and a
step that verifies the chain alone is priced s(N) without touching the heads' gate.

Expected values come from hand computations, a naive parent walk, AR decoding and the exact-law harness.
"""
import numpy as np
import pytest

import minispec.decoders.medusa as medusa_module
from conftest import assert_lossless, random_tensors, rel_err, tiny_config
from hostguard import GUARD
from test_dynamic_tree import hand_q, random_q, table_expand
from test_exact_law import EXACT, oracle_probs, table
from test_hydra import random_heads as hydra_random_heads, ref_prefix, tiny_model
from test_medusa import random_heads as medusa_random_heads
from minispec import generate
from minispec.decoders.hydra_heads import HydraHeads
from minispec.decoders.lookup import ContextChain, NgramIndex
from minispec.decoders.registry import make_proposer
from minispec.errors import UserError
from minispec.mistral.model import Model
from minispec.speculative.acceptance import make_rule
from minispec.speculative.costs import interp_cost
from minispec.speculative.dynamic_tree import Grown, TreeCache, add_chain, grow, rank_order, to_tree
from minispec.speculative.dynamic_tree_sizing import DynamicTrees
from minispec.speculative.exact_law import autoregressive_law, decoder_law, memoised, step_law, tv
from minispec.speculative.gate import DraftGate
from minispec.speculative.sampling import SamplingParams
from minispec.speculative.verify import Draft


def hand_grown():
    """Root (token 7); node 1: token 0 (rank 0, value 0.6); node 2: token 1 (rank 1, 0.3); node 3: token 2 under
    node 1 (rank 0, 0.3)."""
    return Grown(tokens=np.array([7, 0, 1, 2]), parents=np.array([-1, 0, 0, 1]), depths=np.array([0, 1, 1, 2]),
                 ranks=np.array([-1, 0, 1, 0]), values=np.array([1.0, 0.6, 0.3, 0.3]), kept=None, depth_rows=[1, 1],
                 rates=[], probs=np.array([1.0, 0.6, 0.3, 0.5]))


def parent_closed(g, n):
    kept = set(int(i) for i in rank_order(g.values)[:n])
    return all(int(g.parents[i]) == 0 or int(g.parents[i]) in kept for i in kept)


# ---------------------------------------------------------------------------------------------------------
# Joining a chain to a grown tree
# ---------------------------------------------------------------------------------------------------------
def test_a_chain_raises_the_node_it_shares_and_continues_as_new_nodes_as_worked_by_hand():
    """Chain [1, 5, 6] with values [0.9, 0.5, 0.2]: token 1 is node 2 (raised 0.3 -> 0.9); 5 is no child of node
    2, so nodes 4 (5, under 2, rank 0, depth 2, 0.5) and 5 (6, under 4, rank 0, depth 3, 0.2) are new. By value:
    2 (0.9), 1 (0.6), 4 (0.5), 3 (0.3), 5 (0.2)."""
    g = add_chain(hand_grown(), [1, 5, 6], [0.9, 0.5, 0.2])
    assert g.tokens.tolist() == [7, 0, 1, 2, 5, 6]
    assert g.parents.tolist() == [-1, 0, 0, 1, 2, 4]
    assert g.depths.tolist() == [0, 1, 1, 2, 2, 3]
    assert g.ranks.tolist() == [-1, 0, 1, 0, 0, 0]
    assert g.values.tolist() == pytest.approx([1.0, 0.6, 0.9, 0.3, 0.5, 0.2])
    assert np.isnan(g.probs[4:]).all() and g.probs[:4].tolist() == [1.0, 0.6, 0.3, 0.5]
    assert rank_order(g.values).tolist() == [2, 1, 4, 3, 5]
    g.kept = rank_order(g.values)[:3]
    tree, tokens, values = to_tree(g, TreeCache())
    # kept: token 1 (rank path (1,)), token 0 ((0,)), token 5 under token 1 ((1, 0))
    assert sorted(map(tuple, tree.choices)) == [(), (0,), (1,), (1, 0)]                 # the root's path is ()
    by_path = {tuple(c): (int(t), float(v)) for c, t, v in zip(tree.choices[1:], tokens[1:], values[1:])}
    assert by_path == {(0,): (0, 0.6), (1,): (1, pytest.approx(0.9)), (1, 0): (5, 0.5)}


def test_a_chain_no_grown_node_shares_hangs_from_the_root_one_rank_past_its_children():
    g = add_chain(hand_grown(), [4, 4], [0.7, 0.1])
    assert g.tokens.tolist()[4:] == [4, 4] and g.parents.tolist()[4:] == [0, 4]
    assert g.ranks.tolist()[4:] == [2, 0] and g.depths.tolist()[4:] == [1, 2]
    assert g.values.tolist()[4:] == pytest.approx([0.7, 0.1])


def test_a_chain_whose_estimate_is_below_the_heads_leaves_their_values():
    g = add_chain(hand_grown(), [0, 2], [0.2, 0.1])
    assert len(g.tokens) == 4 and g.values.tolist() == pytest.approx([1.0, 0.6, 0.3, 0.3])


def test_bad_chain_values_are_refused():
    for values in ([0.5, 0.6], [1.2, 0.5], [0.5]):
        with pytest.raises(ValueError, match="non-increasing"):
            add_chain(hand_grown(), [1, 2], values)


@pytest.mark.parametrize("seed", range(6))
def test_with_a_chain_joined_every_best_n_by_value_is_still_a_tree(seed):
    rng = np.random.default_rng(seed)
    q = random_q(seed, 4, ties=seed % 2 == 0)
    g = grow(0, table_expand(q), 12, 3, 3)
    chain = rng.integers(0, 4, size=int(rng.integers(1, 7))).tolist()
    values = np.sort(rng.choice([0.0, 0.3, 0.6, 1.0], len(chain)))[::-1]
    joined = add_chain(g, chain, values)
    for n in range(1, len(joined.tokens)):
        assert parent_closed(joined, n), n
    node = 0                                  # the chain is a path of the joined tree, token by token
    for t in chain:
        node = [c for c in range(1, len(joined.tokens)) if joined.parents[c] == node and joined.tokens[c] == t][0]


def test_grow_with_a_chain_keeps_the_best_nodes_of_heads_and_chain_together():
    """hand_q's draft grows 0 (0.6), 1 (0.3), 0-0 (0.3), ...; a chain [1, 0] at [0.95, 0.9] puts token 1 first,
    then 1-0 (0.9) before token 0 (0.6)."""
    g = grow(9, table_expand(hand_q), 3, 2, 3, chain=([1, 0], [0.95, 0.9]))
    kept = [(tuple(int(g.tokens[m]) for m in path_of(g, n)), round(float(g.values[n]), 6)) for n in g.kept]
    assert kept == [((1,), 0.95), ((1, 0), 0.9), ((0,), 0.6)]


def path_of(g, n):
    out = []
    while n > 0:
        out.append(int(n))
        n = int(g.parents[n])
    return out[::-1]


def test_a_chain_alone_is_sized_by_the_cost_rule_with_nothing_paid():
    """Cumulative values 0.9, 0.8, 0.1 on c(T) = 1, 1.2, 1.4, 2.0 (T = 1..4): rates 1, 1.9/1.2 = 1.583,
    2.7/1.4 = 1.929, 2.8/2 = 1.4 -> two tokens; with limit 1, one token at 1.583; without a curve all of them."""
    c = ContextChain(3)
    c.price({1: 1.0, 2: 1.2, 3: 1.4, 4: 2.0})
    c.acc = [0.9, 0.8 / 0.9, 0.1 / 0.8]
    K, rate, draft = c.alone(5, [3, 4, 5], 8)
    assert (K, draft.tree.N, draft.tokens) == (2, 3, [5, 3, 4]) and rate == pytest.approx(2.7 / 1.4)
    K, rate, draft = c.alone(5, [3, 4, 5], 1)
    assert (K, draft.tokens) == (1, [5, 3]) and rate == pytest.approx(1.9 / 1.2)
    c.price(None)
    K, rate, draft = c.alone(5, [3, 4, 5], 8)
    assert (K, rate, draft.tokens) == (3, None, [5, 3, 4, 5]) and draft.tree.max_depth == 3


# ---------------------------------------------------------------------------------------------------------
# The context's chain and its values
# ---------------------------------------------------------------------------------------------------------
def test_the_context_chain_continues_the_latest_match_and_learns_from_what_was_emitted_by_hand():
    """Text 5 6 7 5 6: the suffix 5 6 occurred before, followed by 7 5 6 (then periodic: 7). Prior 0.5 at every
    depth: values 0.5, 0.25, 0.125, 0.0625. The step emits 7 5 9: three tokens judged, two right, so the
    2-gram estimate becomes a_1 = (1 + 1) / 3, a_2 = (1 + 2 a_1) / 3, a_3 = (0 + 2 a_2) / 3, a_4 = a_3."""
    c = ContextChain(4)
    c.start([5, 6, 7, 5, 6])
    tokens, values = c.propose()
    assert tokens == [7, 5, 6, 7] and values == pytest.approx([0.5, 0.25, 0.125, 0.0625])
    c.observe([7, 5, 9])
    a1 = 2 / 3
    a2 = (1 + 2 * a1) / 3
    a3 = 2 * a2 / 3
    assert c.estimates[2].acc == pytest.approx([a1, a2, a3, a3])
    assert c.estimates[1].acc == pytest.approx([0.5] * 4) and c.estimates[3].acc == pytest.approx([0.5] * 4)
    assert c.propose() is None                          # ... 5 9: 9 never occurred before
    assert c.index.text == [5, 6, 7, 5, 6, 7, 5, 9]


def test_the_context_chain_is_the_lookup_decoders_own_match():
    rng = np.random.default_rng(3)
    for _ in range(20):
        text = rng.integers(0, 4, size=int(rng.integers(2, 15))).tolist()
        c, idx = ContextChain(5), NgramIndex(1, 3)
        c.start(text)
        idx.extend(text)
        n, start = idx.match("last")
        got = c.propose()
        assert (got is None) == (n == 0)
        if n:
            assert got[0] == idx.continuation(start, 5)


def test_lookup_is_refused_with_a_static_tree_and_when_not_a_positive_int():
    model = tiny_model(W=5, seed=1)
    heads = hydra_random_heads(model, "mlp", seed=1)
    with pytest.raises(UserError, match="lookup is an option of tree='dynamic'"):
        make_proposer("hydra", model, heads=heads, tree=[[0]], lookup=4)
    for bad in (0, 2.5, "8"):
        with pytest.raises(UserError, match="lookup"):
            make_proposer("hydra", model, heads=heads, tree="dynamic", lookup=bad)
    with pytest.raises(UserError, match="lookup"):
        make_proposer("medusa", model, heads=medusa_random_heads(model, 3, seed=1), tree="dynamic", lookup=-1)


# ---------------------------------------------------------------------------------------------------------
# Decoding: greedy is AR's, the chain is used, a chain-alone step's price
# ---------------------------------------------------------------------------------------------------------
REPEATS = (1, 3, 2, 1, 3, 2, 1, 3)       # a prompt that repeats itself; with V = 5 the greedy output repeats too


@pytest.mark.parametrize("W", [4, 7])
@pytest.mark.parametrize("decoder", ["medusa", "hydra", "hydra++"])
def test_greedy_with_lookup_in_the_trees_emits_exactly_the_ar_tokens_and_the_chain_is_accepted(W, decoder):
    model = tiny_model(W=W, V=5, seed=W, dim=64)
    if decoder == "medusa":
        heads = medusa_random_heads(model, num_heads=3, seed=W)
    else:
        heads = hydra_random_heads(model, "mlp" if decoder == "hydra" else "prefix-mlp", num_heads=3, seed=W)
    taus = {}
    for lookup in (None, 6):
        for opts in (dict(max_nodes=6, gate=False), dict(max_nodes="auto", costs={1: 1.0, 4: 1.3, 16: 2.5},
                                                          depth_costs=[0.1] * 3)):
            prop = make_proposer(decoder, model, heads=heads, tree="dynamic", lookup=lookup, **opts)
            stats = assert_lossless(model, prop, ids=REPEATS, n=40)
            taus[(lookup, opts["max_nodes"])] = np.mean(stats.accepted)
    print(decoder, W, taus)
    assert taus[(6, 6)] > taus[(None, 6)] and taus[(6, "auto")] > taus[(None, "auto")]


@pytest.mark.parametrize("decoder", ["medusa", "hydra++"])
def test_the_chains_own_cpu_time_is_counted_at_every_step_with_lookup_and_never_without(decoder, monkeypatch):
    """Option lookup runs prompt lookup's chain (propose, and observe; alone where the chain may draft alone) at
    every step: the CPU time of exactly those calls lands in stats.counters["lookup.chain_cpu_s"], for bench
    decode's prediction. Here a fake clock ticks 1 per call to time.process_time, so each timed chain call adds
    exactly 1: the counter is the number of chain calls, counted by wrapping ContextChain's methods."""
    model = tiny_model(W=6, V=5, seed=2, dim=64)
    heads = (medusa_random_heads(model, num_heads=3, seed=2) if decoder == "medusa"
             else hydra_random_heads(model, "prefix-mlp", num_heads=3, seed=2))
    ticks = iter(range(10 ** 6))
    monkeypatch.setattr(medusa_module.time, "process_time", lambda: float(next(ticks)))
    calls = []
    for name in ("propose", "alone", "observe"):
        method = getattr(ContextChain, name)
        monkeypatch.setattr(ContextChain, name,
                            lambda self, *a, _m=method, _n=name: (calls.append(_n), _m(self, *a))[1])
    for lookup in (None, 6):
        calls.clear()
        gate = DraftGate({1: 1.0, 4: 1.3, 16: 2.5}, proposal=0.1)
        prop = make_proposer(decoder, model, heads=heads, tree="dynamic", max_nodes=6, lookup=lookup, gate=gate)
        out = generate(model, list(REPEATS), decoder=prop, max_new_tokens=24, eos_id=None)
        n = out.stats.counters.get("lookup.chain_cpu_s")
        if lookup is None:
            assert n is None and not calls
        else:
            assert n == len(calls) and calls.count("propose") == calls.count("observe") == out.stats.steps


def test_a_step_whose_heads_the_gate_skips_verifies_the_chain_alone_priced_s_n_and_the_gate_learns_nothing():
    """A gate ruled out (hopeless): no head ever runs; every step that drafted verified lookup's chain alone, and
    stats' model.step_cost is the sum of s(drafted + 1) over the steps (1 for a plain step), computed here from
    the curve; the gate's fading sums stay 0."""
    model = tiny_model(W=6, V=5, seed=3, dim=64)
    heads = hydra_random_heads(model, "mlp", num_heads=3, seed=3)
    costs = {1: 1.0, 2: 1.1, 4: 1.3, 8: 1.9, 16: 3.0}
    gate = DraftGate(costs, proposal=0.2)
    gate.hopeless = True
    prop = make_proposer("hydra", model, heads=heads, tree="dynamic", max_nodes="auto", costs=costs,
                         depth_costs=[0.1] * 3, lookup=8, gate=gate)
    calls = []
    expand_at = prop.expand_at
    prop.expand_at = lambda h, stats=None: calls.append(1) or expand_at(h, stats)
    out = generate(model, list(REPEATS), decoder=prop, max_new_tokens=40, eos_id=None)
    assert out.tokens == generate(model, list(REPEATS), max_new_tokens=40, eos_id=None).tokens
    drafted = out.stats.drafted
    assert not calls and sum(drafted) > 0
    assert out.stats.counters["lookup.alone_steps"] == sum(1 for d in drafted if d)
    want = sum(float(interp_cost(costs, d + 1)) if d else 1.0 for d in drafted)
    assert out.stats.counters["model.step_cost"] == pytest.approx(want, rel=1e-12)
    assert gate.tokens == 0.0 and gate.cost == 0.0


def test_the_heads_run_only_where_no_chain_alone_is_expected_to_earn_what_the_gate_estimates():
    """A flat curve (s(N) = 1): a chain alone is expected to earn 1 + the sum of its values per step. Where the
    gate says draft, the heads run only when there is no chain or the gate's rate beats that; else the chain is
    verified alone and the gate counts the step plain (its history is exactly the steps the heads ran). Some
    steps where the gate said draft did go to the chain (so the rule is exercised), and the heads ran somewhere."""
    model = tiny_model(W=6, V=5, seed=3, dim=64)
    heads = hydra_random_heads(model, "mlp", num_heads=3, seed=3)
    prop = make_proposer("hydra", model, heads=heads, tree="dynamic", max_nodes="auto", costs={1: 1.0, 64: 1.0},
                         depth_costs=[0.1] * 3, lookup=4)
    steps = []                              # per step: (chain's expected rate or None, gate said draft, its rate)
    heads_ran = []
    propose, expand_at = prop.context.propose, prop.expand_at

    def chain():
        out = propose()
        steps.append((None if out is None else 1.0 + sum(out[1]), prop.gate.drafting, prop.gate.rate))   # flat
        heads_ran.append(False)
        return out

    def expand(h, stats=None):
        heads_ran[-1] = True
        return expand_at(h, stats)
    prop.context.propose, prop.expand_at = chain, expand
    out = generate(model, list(REPEATS), decoder=prop, max_new_tokens=30, eos_id=None)
    assert out.tokens == generate(model, list(REPEATS), max_new_tokens=30, eos_id=None).tokens
    for i, ((chain_rate, said, rate), ran) in enumerate(zip(steps, heads_ran)):
        assert ran == (i > 0 and said and (chain_rate is None or rate > chain_rate)), i
    assert prop.gate.history == heads_ran[1:]
    assert any(heads_ran) and any(i > 0 and c is not None and said for i, (c, said, _) in enumerate(steps))


# ---------------------------------------------------------------------------------------------------------
# Sampling: the trees with a chain joined keep the target's exact law
# ---------------------------------------------------------------------------------------------------------
def softmax(z):
    e = np.exp(z - np.max(z))
    return e / e.sum()


@pytest.mark.parametrize("i", range(40))
def test_trees_with_a_lookup_chain_verified_by_the_real_rules_emit_the_targets_exact_law(i):
    """As tests/test_exact_law_dynamic.py, with the chain that prompt lookup finds in the prefix (values from a
    fixed table) joined to every tree: the candidates stay a deterministic function of the context."""
    r = np.random.default_rng(2000 + i)
    V = int(r.integers(2, 5))
    params = [SamplingParams(0.0), SamplingParams(1.0), SamplingParams(0.7, top_k=int(r.integers(1, V + 1))),
              SamplingParams(1.3, top_p=float(r.uniform(0.5, 0.95)))][i % 4]
    max_nodes, max_depth, top_k = int(r.integers(1, 6)), int(r.integers(1, 3)), int(r.integers(1, V + 1))
    target, draft = table(V, seed=3 * i), table(V, seed=3 * i + 1)
    values = np.sort(r.uniform(0, 1, 4))[::-1]
    grower = DynamicTrees("test", n_heads=max_depth, max_nodes=max_nodes, max_depth=max_depth, top_k=top_k)

    def propose(prefix, rand):
        idx = NgramIndex(1, 2)
        idx.extend(prefix)
        n, start = idx.match("last")
        chain = (idx.continuation(start, 4), values) if n else None
        expand = table_expand(lambda path: softmax(draft(tuple(prefix) + path)))
        tree, tokens = grower.grow(int(prefix[-1]), expand, chain)
        return Draft(tree, [int(t) for t in tokens])
    prefix = tuple(int(t) for t in r.integers(0, V, size=3))
    H = 3
    step = memoised(lambda pre: step_law(pre, propose, lambda rand: make_rule(params, None, rand), target))
    got = decoder_law(prefix, H, step)
    want = autoregressive_law(prefix, H, lambda pre: oracle_probs(target(pre), params))
    assert tv(got, want) <= EXACT, (i, tv(got, want))


@pytest.mark.parametrize("decoder", ["medusa", "hydra++"])
def test_trees_with_lookup_run_without_implicit_host_conversions_and_match_numpy(decoder):
    """Under tests/hostguard.py's CuPy-strict namespace (no GPU needed), fixed and sized trees with the chain."""
    cfg = tiny_config(sliding_window=5, vocab_size=6)
    t = random_tensors(cfg, seed=2)
    outs, drafted = [], []
    for model in (Model(cfg, t, device=GUARD), Model(cfg, t, device="cpu")):
        if decoder == "medusa":
            heads = medusa_random_heads(model, 3, seed=2)
        else:                                    # random heads, their noise uploaded explicitly
            heads = HydraHeads.create(model, 3, 2, "prefix-mlp", seed=2)
            rng = np.random.default_rng(2)
            for p in heads.heads + [heads.prefix]:
                for k in p:
                    p[k] = p[k] + model.xp.asarray(0.3 * rng.standard_normal(p[k].shape).astype(model.dtype))
        for opts in (dict(max_nodes=6, gate=False), dict(max_nodes="auto", costs={1: 1.0, 8: 1.2},
                                                         depth_costs=[0.05] * 3)):
            prop = make_proposer(decoder, model, heads=heads, tree="dynamic", lookup=4, **opts)
            o = generate(model, list(REPEATS), decoder=prop, max_new_tokens=16, eos_id=None)
            outs.append(o.tokens)
            drafted.append(o.stats.counters.get("lookup.alone_steps", 0))    # the chain was found and drafted
    assert outs[:2] == outs[2:] and min(drafted) > 0


def test_hydra_pp_heads_read_the_prefix_output_over_every_committed_state_also_after_chain_alone_steps():
    """Steps that verify lookup's chain alone run no head and leave their committed hidden states pending for
    Hydra++'s prefix layer, as plain steps do. Each time the heads run, the h they read must be the prefix layer's
    output at the last committed position over ALL committed states (test_hydra.ref_prefix, from scratch over
    the model's own hidden states of the committed sequence); some of those head steps follow chain-alone steps."""
    model = tiny_model(W=5, V=5, seed=7, dim=64)
    heads = hydra_random_heads(model, "prefix-mlp", num_heads=3, seed=7)
    prop = make_proposer("hydra++", model, heads=heads, tree="dynamic", max_nodes="auto",
                         costs={1: 1.0, 4: 1.3, 16: 2.5}, depth_costs=[0.1] * 3, lookup=4)
    seen, kinds = [], []                     # per heads step: (committed positions, h); per step: heads or chain
    expand_at, propose = prop.expand_at, prop.propose

    def expand(h, stats=None):
        seen.append((prop.cache.pos, np.array(h)))
        kinds[-1] = "heads"
        return expand_at(h, stats)

    def step(ctx):
        kinds.append("other")
        d = propose(ctx)
        if kinds[-1] == "other" and d.tree.N > 1:
            kinds[-1] = "chain"
        return d
    prop.expand_at, prop.propose = expand, step
    ids = list(REPEATS)
    out = generate(model, ids, decoder=prop, max_new_tokens=30, eos_id=None)
    seq = ids + out.tokens
    _, H = model.forward(seq, return_hidden=True)
    ref, _, _ = ref_prefix(prop.heads.prefix, model.config, np.asarray(H))          # [T, D]
    assert seen and any(a == "chain" and b == "heads" for a, b in zip(kinds, kinds[1:]))
    for pos, h in seen:
        assert rel_err(h, ref[pos - 1]) < 1e-10, pos
