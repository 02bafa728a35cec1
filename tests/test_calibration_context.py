"""Context for calibrated values (minispec.speculative.calibration, "Context"): maps chosen by the previous step's
top-1 run. The run is the hand-counted number of leading rank-0 steps of an accepted path, the maps a step uses
are the ones of its previous step's run bucket (or the maps of every step after a step that drafted nothing),
files with and without the per-run maps load, greedy decoding stays AR's, and the fit puts each run's samples in
its own maps.

Expected values come from hand computations, hand-built files and AR decoding.
"""
import json

import numpy as np
import pytest

from conftest import assert_lossless
from test_calibration import SHIPPED, hand_calibration, random_calibration
from test_hydra import random_heads as hydra_random_heads, tiny_model
from test_medusa import random_heads as medusa_random_heads
from minispec.decoders.registry import make_proposer
from minispec.errors import UserError
from minispec.mistral.model import load
from minispec.speculative.calibration import Calibration, read_calibration, top1_run
from minispec.speculative.dynamic_tree import Grown
from minispec.speculative.gate import DraftGate
from minispec.speculative.verify import Draft
from minispec.training import calibrate as training
from minispec.training.calibrate import fit_by_run

KINDS = ["medusa", "hydra", "hydra++"]


def flat(p):
    """One map that is p for every q (a single knot)."""
    return ([0.5], [p])


def per_run_calibration():
    """Two depths, one parent bucket, one rank bucket each. The maps of every step: 0.5 everywhere; run 0: 0.1,
    run 1: 0.2, runs >= 2: 0.3 (at depth 2 the same plus 0.05)."""
    def maps(p):
        return [[[flat(p)]], [[flat(p + 0.05)]]]
    return Calibration(maps(0.5), by_run=[maps(0.1), maps(0.2), maps(0.3)])


# ---------------------------------------------------------------------------------------------------------
# The run and the maps it picks
# ---------------------------------------------------------------------------------------------------------
def test_the_top1_run_counts_the_leading_rank_0_steps_of_an_accepted_path():
    assert top1_run(()) == 0                    # the root alone
    assert top1_run((0,)) == 1
    assert top1_run((0, 0, 1)) == 2
    assert top1_run((1, 0, 0)) == 0
    assert top1_run((0, 2, 0, 0)) == 1


def test_a_step_uses_its_previous_steps_run_bucket_and_the_maps_of_every_step_when_there_was_none():
    cal = per_run_calibration()
    q = np.array([[0.9, 0.4]])
    assert cal(0, q) == pytest.approx(np.array([[0.5, 0.5]]))                     # no previous draft
    assert cal(0, q, run=None) == pytest.approx(np.array([[0.5, 0.5]]))
    for run, p in ((0, 0.1), (1, 0.2), (2, 0.3), (3, 0.3), (7, 0.3)):
        assert cal(0, q, run=run) == pytest.approx(np.array([[p, p]]))
        assert cal(1, q, [0], run=run) == pytest.approx(np.array([[p + 0.05, p + 0.05]]))
    assert hand_calibration()(0, q, run=2) == pytest.approx(hand_calibration()(0, q))   # no per-run maps


def test_a_file_with_per_run_maps_round_trips_and_the_shipped_files_without_them_still_load(tmp_path):
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(per_run_calibration().to_json()))
    back = read_calibration(path, 2)
    q = np.array([[0.3]])
    for run, p in ((None, 0.5), (0, 0.1), (1, 0.2), (5, 0.3)):
        assert back(1, q, [0], run=run) == pytest.approx(np.array([[p + 0.05]]))
    for kind in KINDS:
        cal = read_calibration(SHIPPED / kind / "calibration.json", 4)
        assert cal(0, q, run=3) == pytest.approx(cal(0, q))


@pytest.mark.parametrize("by_run, message", [
    ({"a": 1}, "key 'by_run' must be a list"),
    ([[[[{"q": [0.1], "p": [0.2]}]]]], "key 'by_run\\[0\\]' must be a list of one entry per head \\(2\\)"),
    ([[[[{"q": [0.1, 0.9], "p": [0.8, 0.2]}]]] * 2], "key 'by_run\\[0\\]\\[0\\]\\[0\\]\\[0\\]'.*non-decreasing"),
])
def test_malformed_per_run_maps_are_refused_naming_the_key(tmp_path, by_run, message):
    good = {"format": "minispec-calibration-1", "depths": [[[{"q": [0.1, 0.9], "p": [0.2, 0.8]}]]] * 2}
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(dict(good, by_run=by_run)))
    with pytest.raises(UserError, match=f"calibration.json: {message}"):
        read_calibration(path, 2)


# ---------------------------------------------------------------------------------------------------------
# Decoding: each step's maps are those of the run its previous step accepted; greedy is still AR's
# ---------------------------------------------------------------------------------------------------------
class Spy(Calibration):
    """Records the run every call is given."""

    def __init__(self, base):
        super().__init__(base.maps, base.meta, base.by_run)
        self.runs = []

    def __call__(self, d, probs, parent_ranks=None, run=None):
        self.runs.append(run)
        return super().__call__(d, probs, parent_ranks, run=run)


@pytest.fixture(scope="module")
def shipped():
    return load(str(SHIPPED))


@pytest.mark.parametrize("decoder", KINDS)
def test_each_growth_is_given_the_run_its_previous_step_accepted_and_greedy_stays_ar(shipped, decoder):
    """The shipped model and heads (random heads accept too little to show runs above 0), calibrated with
    random per-run maps."""
    base = random_calibration(1, depths=4)
    cal = Spy(Calibration(base.maps, by_run=[random_calibration(s, depths=4).maps for s in (2, 3, 4)]))
    prop = make_proposer(decoder, shipped, tree="dynamic", max_nodes=6, calibrate=cal, gate=False)
    want, observe = [], prop.observe

    def watched(step):
        if not prop.drafting:
            want.append(None)
        else:
            ranks = prop.dynamic.tree.choices[step.path[-1]]        # the accepted path's ranks, counted by hand
            n = 0
            while n < len(ranks) and ranks[n] == 0:
                n += 1
            want.append(n)
        observe(step)
    prop.observe = watched
    grown, propose = {}, prop.propose

    def counted(ctx):
        before = len(cal.runs)
        draft = propose(ctx)
        if len(cal.runs) > before:
            grown[len(want)] = cal.runs[before]                     # this step's number: len(want)
            assert set(cal.runs[before:]) == {cal.runs[before]}      # one run for the whole growth
        return draft
    prop.propose = counted
    assert_lossless(shipped, prop, ids=[1, 1017, 451, 3034, 54, 1187, 97], n=40,
                    tol=1e-5)                                        # float32: block vs one-token rounding
    assert grown[1] is None                                          # step 0 is the root alone
    assert all(grown[i] == want[i - 1] for i in grown)
    assert len(set(grown.values())) > 2, "the steps had too few distinct runs: the test shows little"


def test_after_a_step_that_drafted_nothing_the_next_growth_uses_the_maps_of_every_step():
    model = tiny_model(W=5, seed=3, dim=64)
    heads = medusa_random_heads(model, num_heads=3, seed=3)
    cal = Spy(Calibration(random_calibration(1).maps, by_run=[random_calibration(2).maps]))
    prop = make_proposer("medusa", model, heads=heads, tree="dynamic", max_nodes=6, max_depth=3, calibrate=cal,
                         gate=False)
    propose, steps = prop.propose, []

    def every_third(ctx):
        steps.append(len(cal.runs))                                  # where this step's growth starts
        if len(steps) % 3 == 0:                                      # a plain step, as a gate would make
            prop.drafting = False
            return Draft(prop.root_only, [ctx.root])
        return propose(ctx)
    prop.propose = every_third
    assert_lossless(model, prop, n=30)
    after_plain = [cal.runs[steps[i]] for i in range(3, len(steps), 3)]      # the steps after each plain one
    others = [cal.runs[steps[i]] for i in range(4, len(steps), 3)]
    assert after_plain and all(r is None for r in after_plain)
    assert others and all(r is not None for r in others)


# ---------------------------------------------------------------------------------------------------------
# Collecting and fitting
# ---------------------------------------------------------------------------------------------------------
def test_collect_counts_the_true_paths_top1_run_as_by_hand():
    """label_step's example (test_calibration.py): the true continuation 7, 8, 9 runs through nodes 1, 3, 6, all
    rank 0: ranks (0, 0, 0), run 3. With node 3 made rank 1 (and node 4 rank 0): ranks (0, 1, 0), the run stops
    after node 1: run 1; with node 1 made rank 1: ranks (1, 0, 0), run 0."""
    def grown(ranks):
        return Grown(tokens=np.array([5, 7, 3, 8, 6, 8, 9, 2]), parents=np.array([-1, 0, 0, 1, 1, 2, 3, 6]),
                     depths=np.array([0, 1, 1, 2, 2, 2, 3, 4]), ranks=np.array(ranks), values=np.ones(8),
                     kept=np.arange(1, 8), depth_rows=[], rates=[])
    full = [1, 4, 5, 7, 8, 9]
    for ranks, path, run in (([-1, 0, 1, 0, 1, 0, 0, 0], (0, 0, 0), 3), ([-1, 0, 1, 1, 0, 0, 0, 0], (0, 1, 0), 1),
                             ([-1, 1, 0, 0, 1, 0, 0, 0], (1, 0, 0), 0)):
        g = grown(ranks)
        on = training.label_step(g, full, 2)[2]
        assert training.true_path_ranks(g, on) == path
        assert top1_run(training.true_path_ranks(g, on)) == run


def test_fit_by_run_gives_each_run_bucket_its_own_maps_and_lends_the_pooled_ones_where_samples_are_few():
    """P(accepted) = q / 2 after a run 0, q after a run >= 1 (one depth, one rank, one parent bucket); records
    after no draft (run -1) only enter the maps of every step. With three run buckets, bucket 2 (runs >= 2) has
    no samples and takes the pooled maps."""
    rng = np.random.default_rng(0)
    n = 6000
    q, run = rng.random(n), rng.choice([-1, 0, 1], n, p=[0.2, 0.4, 0.4])
    truth = np.where(run == 0, q / 2, q)
    recs = dict(depth=np.ones(n, int), rank=np.zeros(n, int), q=q, parent_rank=-np.ones(n, int),
                accepted=rng.random(n) < truth, prev_run=run)
    cal = fit_by_run(recs, n_heads=1, n_runs=3, n_ranks=1, n_parents=1, bin_size=100)
    grid = np.array([[0.2], [0.8]])
    assert cal(0, grid, run=0) == pytest.approx(np.array([[0.1], [0.4]]), abs=0.07)
    assert cal(0, grid, run=1) == pytest.approx(np.array([[0.2], [0.8]]), abs=0.07)
    pooled = 0.4 * 0.5 + 0.6 * 1.0                                   # runs -1 and 1: q; run 0: q / 2
    assert cal(0, grid) == pytest.approx(np.array([[0.2 * pooled], [0.8 * pooled]]), abs=0.07)
    assert cal(0, grid, run=2) == pytest.approx(cal(0, grid))
    with pytest.raises(UserError, match="n_runs"):
        fit_by_run(recs, n_heads=1, n_runs=0)


def test_collect_labels_only_the_steps_that_drafted_when_a_gate_makes_some_steps_plain():
    """A gate that lets every other step draft: a plain step grows no tree, so it must give no samples (the
    proposer's last tree is stale then) and the next step's run is 'none' (-1)."""
    class EveryOther(DraftGate):
        yes = no = 0

        def should_draft(self, stats=None):
            draft = (self.yes + self.no) % 2 == 0
            self.yes, self.no = self.yes + draft, self.no + (not draft)
            return draft

        def observe(self, tokens, cost=None):
            pass
    model = tiny_model(W=5, seed=3, dim=64)
    heads = hydra_random_heads(model, "mlp", seed=3)
    gates = []

    def make():
        gates.append(EveryOther(costs={1: 1.0, 64: 1.0}))
        return make_proposer("hydra", model, heads=heads, tree="dynamic", max_nodes=6, max_depth=3,
                             calibrate=False, gate=gates[-1])
    recs = training.collect(model, make, [[1, 5, 3]], 20)
    assert gates[0].yes >= 5 and gates[0].no >= 5
    assert len(recs["steps"]) == gates[0].yes
    assert len(recs["prev_run"]) and (recs["prev_run"] == -1).all()          # each drafting step follows a plain one
