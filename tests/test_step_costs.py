"""What a gated step pays is what its cost model charges: Hydra++'s prefix catch-up priced by the rows it runs
(hand-worked), a plain step of Draft & Verify that builds nothing, and Draft & Verify's cost rule starting from
its skip set's calibration acceptance."""
from types import SimpleNamespace

import numpy as np
import pytest

from minispec import generate
from minispec.decoders.draft_verify import DraftVerifyProposer, SkipSet, calibration_prior
from minispec.decoders.hydra import PrefixCost, prefix_cost
from minispec.decoders.registry import make_proposer
from minispec.errors import UserError
from minispec.mistral.model import load
from minispec.speculative.gate import DraftGate
from minispec.speculative.loop import Stats
from minispec.speculative.tree import Tree
from minispec.speculative.verify import Verified

MODEL = "weights/stdlib-mistral"


@pytest.fixture(scope="module")
def model():
    return load(MODEL)


def path_step(x, drafted):
    """A verified step whose accepted path has the hidden states x [n, D] (n tokens emitted)."""
    return Verified(path=list(range(len(x))), bonus=1, hidden=None, tokens=[1] * len(x), path_hidden=x,
                    drafted=drafted)


# ---- Hydra++: the catch-up is charged by its rows -------------------------------------------------------------------
def test_a_prefix_cost_is_fixed_plus_per_row_and_nothing_for_no_rows():
    cost = PrefixCost(fixed=0.2, per_row=0.01, rows=(1, 33))
    assert cost(0) == 0.0 and cost(1) == pytest.approx(0.21) and cost(30) == pytest.approx(0.5)


def test_hydra_pp_charges_a_drafting_step_the_catch_up_rows_its_timed_proposal_did_not_run(model):
    """Gate costs s(N) = 1 for every N, proposal 0.5 (timed with the prefix layer on 2 rows); catch-up 0.01 per
    row past those 2 (set by hand). Plain steps emit paths of 1, 3 and 1 tokens (5 rows pending); the drafting
    step after them verifies 3 nodes and catches up those 5 rows: 1 + 0.5 + 3 · 0.01 = 1.53. Its own 2-token path
    waits; the plain step after it is charged 1. Then a probe catches up 2 + 1 = 3 rows: 1.51; the drafting step
    right after it only the probe's 1 row: 1.5.
    model.step_cost: 1 + 1 + 1 + 1.53 + 1 + 1.51 + 1.5 = 8.54."""
    rng = np.random.default_rng(0)
    D = model.config.dim
    rows = lambda n: rng.standard_normal((n, D)).astype(model.dtype)          # noqa: E731  [n, D]
    prop = make_proposer("hydra++", model, gate=DraftGate(costs={1: 1.0, 64: 1.0}, proposal=0.5))
    prop.prefix_cost = PrefixCost(0.2, 0.01, (1, 33))
    prop.start(SimpleNamespace(model=model), rows(6))
    prop.stats = Stats()
    charged = []

    def step(drafting, x, drafted=0):
        before = prop.stats.counters.get("model.step_cost", 0.0)
        prop.drafting = prop.gate.drafting = drafting
        if drafting:
            prop.catch_up()
        prop.observe(path_step(x, drafted))
        charged.append(prop.stats.counters["model.step_cost"] - before)
    for n in (1, 3, 1):
        step(False, rows(n))
    step(True, rows(2), drafted=2)
    step(False, rows(1))
    step(True, rows(1), drafted=2)
    step(True, rows(1), drafted=2)
    assert charged == pytest.approx([1.0, 1.0, 1.0, 1.53, 1.0, 1.51, 1.5])
    assert prop.stats.counters["model.step_cost"] == pytest.approx(8.54)
    assert prop.cache.pos == 6 + 5 + 3 + 1                   # every caught-up row committed, the last path pending


def test_a_dynamic_hydra_pp_tree_is_charged_the_same_rows_past_the_two_its_timed_proposal_ran(model):
    """A dynamic tree's timed proposal also ran the prefix layer on 2 rows: 5 rows caught up add 3 · 0.01."""
    prop = make_proposer("hydra++", model, gate=DraftGate(costs={1: 1.0, 64: 1.0}), tree="dynamic", max_nodes=4)
    prop.prefix_cost, prop.caught = PrefixCost(0.2, 0.01, (1, 33)), 5
    assert prop.prefix_paid() == pytest.approx(0.03)
    prop.caught = 1
    assert prop.prefix_paid() == 0.0


def test_the_measured_prefix_cost_grows_with_the_rows_and_is_measured_once_per_heads(model):
    """Measured with the decoders' own number of rounds: since the catch-up runs the layer's last row alone, a
    row past the first costs about 0.004 of a forward, too little for medians of 2 rounds on a shared machine."""
    prop = make_proposer("hydra++", model, gate=False)
    cost = prefix_cost(model, prop.heads, forward=1.0)
    assert cost.fixed > 0 and cost.per_row > 0 and cost.rows == (1, 33)
    assert cost(33) > cost(1) > 0
    assert prefix_cost(model, prop.heads, forward=1.0) is cost
    assert prefix_cost(model, make_proposer("hydra", model, gate=False).heads, forward=1.0) is None


# ---- Draft & Verify: a plain step costs what plain decoding's does --------------------------------------------------
def test_a_plain_step_of_draft_and_verify_builds_no_tree_and_runs_no_draft_forward(model, monkeypatch):
    """A gate that rules every draft out: 40 plain steps, not one Tree made while decoding (plain decoding makes
    none either) and no draft forward."""
    gate = DraftGate(costs={1: 1.0, 64: 1000.0})
    prop = make_proposer("draft_verify", model, gate=gate)
    assert gate.hopeless
    built = []
    for name in ("chain", "from_choices"):
        real = getattr(Tree, name)
        monkeypatch.setattr(Tree, name, classmethod(lambda cls, *a, _real=real, **k: built.append(1) or _real(*a, **k)))
    ids = [1, 400, 17, 905, 33]
    out = generate(model, ids, decoder=prop, max_new_tokens=40, eos_id=None)
    assert out.stats.steps == 40 and out.stats.counters["gate.plain_steps"] == 40
    assert out.stats.counters.get("draft_verify.forwards", 0) == 0
    assert built == []
    monkeypatch.undo()
    assert out.tokens == generate(model, ids, max_new_tokens=40, eos_id=None).tokens


# ---- Draft & Verify's cost rule: its prior is the skip set's calibration acceptance --------------------------------
def test_the_cost_rule_starts_from_the_skip_sets_calibration_match_rate(model):
    calibrated = SkipSet.from_lists(6, [0, 1], [1, 2, 4], meta={"calibration": {"match": 0.8}})
    assert calibration_prior(calibrated) == 0.8
    assert calibration_prior(SkipSet.from_lists(6, [1], [3])) == 0.5
    with pytest.raises(UserError, match="calibration match"):
        calibration_prior(SkipSet.from_lists(6, [1], [3], meta={"calibration": {"match": 1.5}}))
    prop = DraftVerifyProposer(model, skip=calibrated, sizing="cost", costs={1: 1.0, 64: 1.0}, draft_cost=0.1)
    assert prop.estimate.prior == 0.8 and prop.estimate.acc[0] == pytest.approx(0.8)
