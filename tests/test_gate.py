"""The gate (minispec.speculative.gate): drafting nothing costs nothing, and decides only from the past.

Its decisions on a hand-worked example and its re-probe schedule; greedy decoding equal to plain decoding with
the gate forced closed, forced open and off, for every gated decoder; Hydra++'s prefix layer catching up on
plain steps in one batch against the layer run over the whole sequence at once; the exact output law of a gated
sampling decoder on tiny models against the target's own; and the shape and units of the whole-step curve.
"""
import copy
import inspect
from types import SimpleNamespace

import numpy as np
import pytest

from minispec import generate
from minispec.decoders.registry import make_proposer
from minispec.mistral.model import Model, load
from minispec.speculative.acceptance import make_rule
from minispec.speculative.costs import measure_steps
from minispec.speculative.exact_law import autoregressive_law, autoregressive_step, step_law, topk_tree, tv
from minispec.bench import heldout_prompts
from minispec.bench.gate_trace import gate_like, gate_trace
from minispec.mistral.tokenizer import Tokenizer
from minispec.decoders.draft_verify import SkipSet
from minispec.decoders import hydra
from minispec.decoders.hydra import PrefixCost
from minispec.speculative.gate import DraftGate, best_schedule, replay_gate, trace_step
from minispec.speculative.loop import Stats
from minispec.speculative.tree import Tree
from minispec.speculative.verify import Verified
from minispec.decoders.hydra_heads import prefix_forward
from minispec.errors import UserError
from test_exact_law import PARAMS, oracle_probs, table

MODEL = "weights/stdlib-mistral"


@pytest.fixture(scope="module")
def model():
    return load(MODEL)


# ---- the decisions -------------------------------------------------------------------------------------------------
def test_the_gate_closes_probes_and_reopens_as_worked_by_hand():
    """decay 0.5, weight 1, prior 1.5; a drafting step verifies 3 nodes: s(3) = 2 + proposal 0.5 = 2.5.
    step 1 draft, 1 token:  T = 1, C = 2.5, rate 2.5 / 3.5 = 0.714 -> close, wait 1 (next wait 2)
    step 2 plain:           T = 0.5, C = 1.25, rate 2 / 2.25 = 0.889
    step 3 probe, 3 tokens: T = 0.25 + 3 = 3.25, C = 0.625 + 2.5 = 3.125, rate 4.75 / 4.125 = 1.152 -> open
    step 4 draft, 1 token:  T = 2.625, C = 4.0625, rate 4.125 / 5.0625 = 0.815 -> close, wait 1 (next 2)
    step 5 plain:           T = 1.3125, C = 2.03125, rate 2.8125 / 3.03125 = 0.928
    step 6 probe, 1 token:  T = 1.65625, C = 3.515625, rate 3.15625 / 4.515625 = 0.699 -> close, wait 2 (next 4)
    steps 7, 8 plain; step 9 probes."""
    gate = DraftGate(costs={1: 1.0, 3: 2.0}, proposal=0.5, decay=0.5, weight=1.0, prior=1.5, max_wait=4)
    emitted = [1, 1, 3, 1, 1, 1, 1, 1, 1]
    decisions, rates = [], []
    for tokens in emitted:
        drafting = gate.should_draft()
        decisions.append(drafting)
        gate.observe(tokens, gate.step_cost(3) if drafting else None)
        rates.append(round(gate.rate, 3))
    assert decisions == [True, False, True, True, False, True, False, False, True]
    assert rates[:6] == [0.714, 0.889, 1.152, 0.815, 0.928, 0.699]
    assert gate.step_cost(3) == 2.5 and gate.step_cost(2, extra=0.25) == pytest.approx(2.25)


def test_replaying_a_trace_decides_as_the_worked_example_above():
    """The worked example's steps, laid out on positions: the drafting steps at positions 0 (1 token), 2 (3
    tokens), 5, 7 and 10 (1 token each), plain steps at 1, 6, 8 and 9: 11 tokens for 5 x 2.5 + 4 = 16.5."""
    gate = DraftGate(costs={1: 1.0, 3: 2.0}, proposal=0.5, decay=0.5, weight=1.0, prior=1.5, max_wait=4)
    emits = {0: 1, 2: 3, 5: 1, 7: 1, 10: 1}
    trace = [trace_step(emits.get(t, 1), 2.5) for t in range(11)]
    assert replay_gate(trace, gate) == (16.5, 5, 4)
    assert gate.history == [True, False, True, True, False, True, False, False, True]
    assert gate.rate == pytest.approx(2.70703125 / 3.939453125)


def test_the_best_schedule_drafts_only_where_it_pays_worked_by_hand():
    """Positions 0..3: drafting at 0 emits 3 tokens for 2, at 1 one token for 2, at 2 two tokens for 1.5, at 3
    nothing can be drafted. From the end: best(3) = 1, best(2) = min(1 + 1, 1.5 + 0) = 1.5, best(1) = min(1 +
    1.5, 2 + 1.5) = 2.5, best(0) = min(1 + 2.5, 2 + best(3)) = 3: draft at 0, then a plain step."""
    trace = [trace_step(3, 2.0), trace_step(1, 2.0), trace_step(2, 1.5), None]
    assert best_schedule(trace) == (3.0, 1)
    assert best_schedule(trace[2:]) == (1.5, 1)
    always = DraftGate(costs={1: 1.0}, enabled=False)              # always drafts: 0 (3 tokens), then 3 (plain)
    assert replay_gate(trace, always) == (3.0, 1, 1)


REPLAYED = [("medusa", {}), ("hydra++", {}), ("draft_verify", dict(adaptive=False, draft_cost=0.4, gamma0=0.3))]


@pytest.mark.parametrize("name,opts", REPLAYED)
def test_a_replayed_trace_decides_and_prices_as_the_gated_decoder_itself(model, name, opts):
    """minispec.bench.gate_trace records, at every position of a plain greedy decode, what drafting there gives
    and costs; replaying a gate over it must make the very decisions, and sum the very modelled costs, of a real
    decode with that gate (Hydra++: with its per-row catch-up charge; Draft & Verify: with its one-token probes)."""
    ids, n = heldout_prompts(MODEL, Tokenizer.from_dir(MODEL), 1)[0], 64
    costs = {1: 1.0, 2: 1.2, 3: 1.35, 4: 1.5, 9: 2.5}

    def build():
        gate = DraftGate(costs=costs, proposal=0.0 if name == "draft_verify" else 0.3)
        prop = make_proposer(name, model, gate=gate, **opts)
        if name == "hydra++":
            prop.prefix_cost = PrefixCost(0.1, 0.05, (1, 33))
        return prop, gate
    prop, gate = build()
    real = generate(model, ids, decoder=prop, max_new_tokens=n, eos_id=None)
    traced, traced_gate = build()
    trace, tokens = gate_trace(model, traced, ids, n)
    assert tokens == real.tokens
    replayed = gate_like(traced_gate)
    cost, drafted, plain = replay_gate(trace, replayed)
    assert cost == pytest.approx(real.stats.counters["model.step_cost"], abs=1e-9)
    assert drafted == sum(1 for k in real.stats.drafted if k > 0) and 0 < drafted < real.stats.steps - 1
    assert [d for d in replayed.history] == gate.history[:len(replayed.history)]
    text = list(ids) + tokens                                     # the trace's "match": prompt lookup's, naively
    for t, rec in enumerate(trace):
        if rec is not None:
            seen = text[:len(ids) + t]                            # the prompt and output up to the root
            longest = [k for k in (3, 2, 1) if any(seen[i:i + k] == seen[-k:] for i in range(len(seen) - k))]
            assert rec["match"] == (longest[0] if longest else 0), t


def test_a_gated_sized_dynamic_tree_is_charged_its_verify_and_the_depth_costs_its_growth_paid(model):
    """Medusa, tree="dynamic", max_nodes="auto", a given cost model: each drafting step costs s(N) (linear between
    the given sizes) + the fixed and per-row cost of every depth it expanded (also when it kept no node: the
    heads ran), a plain step 1; their sum over the decode, computed here from the trees the proposer grew, is
    what it summed in model.step_cost."""
    costs = {1: 1.0, 2: 1.1, 4: 1.3, 8: 1.7, 16: 2.5}
    depth_costs = [(0.05, 0.01)] * 4
    prop = make_proposer("medusa", model, tree="dynamic", max_nodes="auto", costs=costs, depth_costs=depth_costs,
                         gate=DraftGate(costs=costs))
    grown, propose = [], prop.propose

    def recording(ctx):
        draft = propose(ctx)
        grown.append(list(prop.dynamic.last.depth_rows) if prop.drafting else None)    # heads ran: charged
        return draft
    prop.propose = recording
    out = generate(model, heldout_prompts(MODEL, Tokenizer.from_dir(MODEL), 1)[0], decoder=prop, max_new_tokens=48,
                   eos_id=None)
    want = 0.0
    for rows, k in zip(grown, out.stats.drafted):
        if rows is None:
            want += 1.0
            continue
        N = k + 1
        lo, hi = max(n for n in costs if n <= N), min(n for n in costs if n >= N)
        s_N = costs[lo] if lo == hi else costs[lo] + (costs[hi] - costs[lo]) * (N - lo) / (hi - lo)
        want += s_N + sum(a + b * r for (a, b), r in zip(depth_costs, rows))
    assert sum(1 for r in grown if r is not None) > 3
    assert out.stats.counters["model.step_cost"] == pytest.approx(want, abs=1e-9)


def test_failing_probes_double_the_wait_up_to_max_wait_and_a_probe_that_pays_starts_again_from_one():
    gate = DraftGate(costs={1: 1.0, 8: 1.0}, proposal=4.0, decay=1.0, max_wait=4)    # 1 token for 5: never pays
    pattern = []
    for _ in range(20):
        d = gate.should_draft()
        pattern.append("D" if d else ".")
        gate.observe(1, gate.step_cost(2) if d else None)
    # draft, wait 1, probe, wait 2, probe, wait 4, probe, wait 4 (max_wait), probe ...
    assert "".join(pattern) == "D.D..D....D....D...."
    gate = DraftGate(costs={1: 1.0, 8: 1.0}, proposal=4.0, decay=0.0 + 1e-9, max_wait=8)   # forgets at once
    seq = []
    for tokens in [1, 1, 1, 1, 1, 50, 1, 1, 1]:
        d = gate.should_draft()
        seq.append("D" if d else ".")
        gate.observe(tokens, gate.step_cost(2) if d else None)
    # D (fail: wait 1) . D (fail: wait 2) . . D (50 tokens for 5: pays) D (fail: wait 1 again) .
    assert "".join(seq) == "D.D..DD.D"


def test_draft_and_verify_never_drafts_where_even_a_fully_accepted_draft_would_not_pay(model):
    """K draft tokens emit at most K + 1 and cost s(K + 1) + K r. With s = {1: 1, 2: 1.25, 9: 3} and r = 0.9:
    K = 1 costs 2.15 for 2 tokens, K = 8 costs 3 + 7.2 for 9: none pays, so no step drafts, not even a probe.
    With r = 0.5, K = 1 costs 1.75 for 2 tokens (2 > 1.1 x 1.75 = 1.925): probes run. With r = 0.7, K tokens
    cost s(K + 1) + 0.7 K = 1 + 0.95 K (s(N) = 1.25 + 0.25 (N - 2) between 2 and 9) for K + 1 tokens: more than a
    plain step, but less than 10% more (1.1 (1 + 0.95 K) >= K + 1 for K <= 8): ruled out too."""
    ids = [1, 400, 17, 905, 33, 12, 700, 5]
    costs = {1: 1.0, 2: 1.25, 9: 3.0}
    for r, hopeless in ((0.9, True), (0.5, False), (0.7, True)):
        gate = DraftGate(costs=costs)
        out = generate(model, ids, decoder=make_proposer("draft_verify", model, gate=gate, draft_cost=r),
                       max_new_tokens=40, eos_id=None)
        assert gate.hopeless == hopeless
        assert (sum(out.stats.drafted) == 0) == hopeless and out.stats.counters.get("draft_verify.forwards", 0) \
            == sum(out.stats.drafted)


def test_draft_and_verify_never_drafts_where_no_draft_is_expected_to_pay_at_its_skip_sets_match_rate(model):
    """K draft tokens accepted one after another with probability p each are expected to emit 1 + p + ... + p^K
    tokens. With s = {1: 1, 2: 1.25, 9: 3} and r = 0.5, K = 1 costs 1.75 (it could emit 2: not ruled out at best).
    p = 0.7: K = 1 expects 1.7 < 1.75, K = 2 expects 2.19 < s(3) + 1 = 2.5, K = 8 expects 3.19 < 3 + 4: no
    length pays on average, so no step drafts. p = 0.8: K = 1 expects 1.8 > 1.75: drafting stays possible."""
    ids = [1, 400, 17, 905, 33, 12, 700, 5]
    costs = {1: 1.0, 2: 1.25, 9: 3.0}
    shipped = make_proposer("draft_verify", model, gate=False).skip
    for p, hopeless in ((0.7, True), (0.8, False)):
        skip = SkipSet(shipped.attn, shipped.mlp, dict(shipped.meta, calibration={"match": p}))
        gate = DraftGate(costs=costs)
        out = generate(model, ids, decoder=make_proposer("draft_verify", model, skip=skip, gate=gate,
                                                         draft_cost=0.5), max_new_tokens=40, eos_id=None)
        assert gate.hopeless == hopeless
        assert (sum(out.stats.drafted) == 0) == hopeless


def test_a_disabled_gate_always_drafts_and_bad_options_are_refused():
    gate = DraftGate(costs={1: 1.0}, proposal=9.0, enabled=False)
    for _ in range(5):
        assert gate.should_draft()
        gate.observe(1, gate.step_cost(1))
    with pytest.raises(UserError, match="decay"):
        DraftGate(decay=0.0)
    with pytest.raises(UserError, match="gate must be"):
        make_proposer("draft_verify", load(MODEL), gate="yes")


# ---- greedy decoding stays plain decoding, gate closed, open or off ------------------------------------------------
CLOSED = dict(costs={1: 1.0, 64: 1.0}, proposal=10.0)        # no draft ever pays: probes only
OPEN = dict(costs={1: 1.0, 64: 1.0}, proposal=0.0, prior=1.5)   # every draft pays (>= 1 token for 1 unit)


def closed_gate(name):
    """A gate closed from the first step. For Draft & Verify a draft of 8 could still pay (9 tokens for 2.5), so
    it is not ruled out, but a one-token probe (2 tokens at most, for 2.5) never does."""
    gate = DraftGate(**(dict(CLOSED, proposal=1.5) if name == "draft_verify" else CLOSED))
    reset = gate.reset

    def closed():
        reset()
        gate.open = False
    gate.reset = closed
    return gate


SETUPS = [("medusa", {}), ("medusa", dict(tree="dynamic", max_nodes=4)), ("hydra", {}),
          ("hydra", dict(tree="dynamic", max_nodes=4)), ("hydra++", {}), ("hydra++", dict(tree="dynamic", max_nodes=4)),
          ("draft_verify", dict(draft_cost=0.0, gamma0=0.0))]


@pytest.mark.parametrize("name,opts", SETUPS)
def test_greedy_decoding_with_the_gate_forced_closed_open_or_off_emits_plain_decodings_tokens(model, name, opts):
    ids = [1, 400, 17, 905, 33, 12, 700, 5]
    want = generate(model, ids, max_new_tokens=40, eos_id=None).tokens
    counts = {}
    for label, gate in (("closed", closed_gate(name)), ("open", DraftGate(**OPEN)), ("off", False)):
        prop = make_proposer(name, model, gate=gate, **opts)
        out = generate(model, ids, decoder=prop, max_new_tokens=40, eos_id=None)
        assert out.tokens == want, f"{name} {opts} gate {label}"
        plain = out.stats.counters.get("gate.plain_steps", 0)
        drafted = sum(1 for k in out.stats.drafted if k > 0)
        counts[label] = (plain, drafted)
        if gate is not False:
            assert plain == gate.plain_steps                      # a plain step is one the gate decided
            assert drafted <= len(gate.history) - plain           # only a step the gate let draft drafts
        if name == "draft_verify" and label == "closed":               # closed from the start: one-token probes
            assert max(out.stats.drafted) == 1
        if name == "medusa" and not opts:                         # no head runs on a plain step
            assert out.stats.counters.get("head_calls", 0) == prop.tree.max_depth * (len(gate.history) - plain
                                                                                     if gate else out.stats.steps - 1)
    assert counts["closed"][0] > 0.5 * sum(counts["closed"])      # mostly plain: the probes back off
    assert counts["open"][0] == 0 and counts["off"][0] == 0


# ---- Hydra++: the prefix layer catches up in one batch -------------------------------------------------------------
def test_hydra_pp_catch_up_after_plain_steps_equals_the_prefix_layer_over_the_whole_sequence(model):
    """Plain steps leave their committed hidden states pending; the next drafting step runs them through the
    prefix layer in one batch. Reference: the prefix layer run without a cache over every committed position at
    once (its causal mask, positions 0..T-1), and the per-step update of a proposer without a gate."""
    rng = np.random.default_rng(0)
    D = model.config.dim
    prompt = rng.standard_normal((9, D)).astype(model.dtype)                 # [9, D]
    paths = [rng.standard_normal((n, D)).astype(model.dtype) for n in (1, 3, 1, 2, 1)]
    batched = make_proposer("hydra++", model, gate=DraftGate(**OPEN))
    per_step = make_proposer("hydra++", model, gate=False)
    for prop in (batched, per_step):
        prop.start(SimpleNamespace(model=model), prompt)
        prop.stats, prop.drafting = Stats(), False
        for x in paths:
            prop.observe(Verified(path=list(range(len(x))), bonus=1, hidden=None, tokens=[1] * len(x),
                                  path_hidden=x, drafted=0))
    assert len(batched.pending) == len(paths)                                 # nothing run yet
    batched.catch_up()
    whole = prefix_forward(batched.heads.prefix, model.config, np.concatenate([prompt] + paths))   # [T, D]
    np.testing.assert_allclose(batched.h, whole[-1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(per_step.h, whole[-1], rtol=1e-4, atol=1e-5)
    assert batched.cache.pos == per_step.cache.pos == len(whole) and not batched.pending


# ---- sampling stays lossless: the exact law of a gated decoder -----------------------------------------------------
def gated_law(prefix, H, gate, tree, target, draft, params, cost):
    """{first H tokens: probability} of a decoder whose steps are plain (the target's own) or a top-k tree draft
    verified by rejection sampling, as the gate decides from the tokens emitted so far (the gate copied along
    every branch)."""
    probs_of = lambda pre: oracle_probs(target(pre), params)                          # noqa: E731
    plain = autoregressive_step(probs_of)
    rule = lambda rand: make_rule(params, "rejection", rand)                          # noqa: E731
    out = {}

    def walk(pre, h, g, p):
        if h == 0:
            out[()] = out.get((), 0.0)
            return
        g = copy.deepcopy(g)
        drafting = g.should_draft()
        law = step_law(pre, topk_tree(draft, tree), rule, target) if drafting else plain(pre)
        for emitted, q in law.items():
            e = emitted[:h]
            g2 = copy.deepcopy(g)
            g2.observe(len(emitted), cost if drafting else None)
            if len(e) == h:
                key = pre[len(prefix):] + e
                out[key] = out.get(key, 0.0) + p * q
            else:
                walk(pre + e, h - len(e), g2, p * q)
    walk(tuple(prefix), H, gate, 1.0)
    return {k: v for k, v in out.items() if k}


@pytest.mark.parametrize("case", range(12))
def test_a_gated_sampling_decoder_has_the_targets_exact_law(case):
    r = np.random.default_rng([17, case])
    V = int(r.integers(2, 4))
    params = [p for p in PARAMS if not p.greedy][case % 6]
    target, draft = table(V, 100 + case), table(V, 200 + case)
    tree = Tree.from_choices([[0], [1], [0, 0]] if V > 2 else [[0], [0, 0]])
    gate = DraftGate(costs={1: 1.0, 4: 1.0}, proposal=float(r.uniform(0.2, 1.5)), decay=0.5, max_wait=2)
    H = 4
    prefix = (int(r.integers(V)),)
    got = gated_law(prefix, H, gate, tree, target, draft, params, gate.step_cost(tree.N))
    want = autoregressive_law(prefix, H, lambda pre: oracle_probs(target(pre), params))
    assert tv(got, want) <= 1e-12


# ---- the whole-step curve: its shape and units ---------------------------------------------------------------------
def test_the_step_curve_prices_whole_verify_steps_in_plain_steps_and_times_the_proposal_between_them(model):
    calls = []
    big = np.ones((256, 256))

    def propose():
        calls.append(1)
        for _ in range(20):
            big @ big
    bare = measure_steps(model, sizes=(2, 4), reps=2)
    curve = measure_steps(model, sizes=(2, 4), propose=propose, reps=2)
    assert sorted(bare.costs) == sorted(curve.costs) == [1, 2, 4]
    assert bare.costs[1] == 1.0 and bare.proposal is None                   # no proposal: scaled to s(1) = 1
    assert len(calls) == 3 * 3                                              # one per size per round, warm-up too
    assert curve.proposal > 0 and 0 < curve.unit < 1 and 0.1 < curve.forward < 10   # units (about 1), not timing
    assert curve.clock == "CPU time" and curve.reps == 2 and curve.context == 112    # where bench decode runs
    cache = model.new_cache()
    assert cache.pos == 0


def test_a_gates_settings_name_every_constructor_argument_and_rebuild_an_equal_gate():
    """gate_like (the replays) rebuilds gates from settings(): a constructor argument it left out would be
    silently reset to its default in every replay."""
    params = set(inspect.signature(DraftGate.__init__).parameters) - {"self"}
    g = DraftGate(costs={1: 1.0, 4: 1.5}, proposal=0.3, decay=0.8, weight=2.0, prior=1.2, max_wait=16, enabled=False)
    assert set(g.settings()) == params
    h = DraftGate(**g.settings())
    assert all(getattr(h, k) == getattr(g, k) for k in params)
    assert gate_like(g, max_wait=4).max_wait == 4 and gate_like(g).enabled and gate_like(g).prior == 1.2


def test_a_gated_decoder_built_again_for_the_same_model_runs_nothing_through_the_model_or_the_prefix_layer(
        monkeypatch):
    """generate() builds its decoder afresh at every call: once a model's costs are measured, building one again
    must not run a forward to time a proposal it will never time (that cost about 4 ms a call)."""
    model = load(MODEL)
    for kind in ("medusa", "hydra", "hydra++"):
        make_proposer(kind, model)                                   # the first build measures its cost model

    def refuse(*args, **kwargs):
        raise AssertionError("a forward while building a decoder whose costs are known")
    monkeypatch.setattr(Model, "forward_block", refuse)
    monkeypatch.setattr(hydra, "prefix_advance", refuse)
    monkeypatch.setattr(hydra, "prefix_forward", refuse)
    for kind in ("medusa", "hydra", "hydra++"):
        assert make_proposer(kind, model).gate is not None
