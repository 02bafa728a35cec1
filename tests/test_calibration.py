"""Calibrated values of dynamic trees (minispec.speculative.calibration, minispec.training.calibrate): the maps are
monotone and in [0, 1], the kept set is still exactly the best of all paths and closed under parents, greedy
decoding is still AR's, a bad calibration.json is refused by name, and the fit reproduces hand-worked examples.

Expected values come from hand computations, a naive enumeration of all paths (test_dynamic_tree.py's), AR
decoding and the shipped files' own knots.
"""
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_lossless
from test_dynamic_tree import kept_paths, random_q, table_expand
from test_hydra import random_heads as hydra_random_heads, tiny_model
from test_medusa import random_heads as medusa_random_heads
from minispec import generate
from minispec.decoders.registry import make_proposer
from minispec.errors import UserError
from minispec.mistral.model import load
from minispec.speculative.calibration import Calibration, read_calibration
from minispec.speculative.dynamic_tree import grow, rank_order
from minispec.speculative.dynamic_tree import Grown
from minispec.training.calibrate import fit, fit_map, isotonic, label_step

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "weights" / "stdlib-mistral"
KINDS = ["medusa", "hydra", "hydra++"]


def hand_calibration():
    """Depth 1: rank 0 q -> 0.2 + 0.6 q (knots (0, 0.2), (1, 0.8)), ranks >= 1 q -> q / 2; depth 2 and deeper:
    under a parent of rank 0 every rank q -> 0.9 q, under a parent of rank >= 1 q -> 0.3 q. By hand, rank 1 at
    depth 1 gets min(0.2 + 0.6 q, q / 2) = q / 2 for q <= 1."""
    return Calibration([[[([0.0, 1.0], [0.2, 0.8]), ([0.0, 1.0], [0.0, 0.5])]],
                        [[([0.0, 1.0], [0.0, 0.9])], [([0.0, 1.0], [0.0, 0.3])]]])


def random_calibration(seed, depths=3, buckets=3, parents=2):
    """Monotone maps with random knots, some flat stretches (ties) and some at 0 and 1."""
    rng = np.random.default_rng(seed)
    maps = []
    for _ in range(depths):
        depth = []
        for _ in range(parents):
            row = []
            for _ in range(buckets):
                q = np.unique(np.round(rng.random(rng.integers(1, 6)), 3))
                p = np.sort(rng.choice([0.0, 0.1, 0.3, 0.3, 0.7, 1.0], len(q)))
                row.append((q, p))
            depth.append(row)
        maps.append(depth)
    return Calibration(maps)


# ---------------------------------------------------------------------------------------------------------
# The maps
# ---------------------------------------------------------------------------------------------------------
def test_a_calibrated_factor_is_the_hand_computed_one_capped_by_every_lower_ranks_map():
    cal = hand_calibration()
    probs = np.array([[0.5, 0.3, 0.1], [1.0, 0.0, 0.0]])
    assert cal(0, probs, [-1, -1]) == pytest.approx(np.array([[0.5, 0.15, 0.05], [0.8, 0.0, 0.0]]))
    assert cal(1, probs, [0, 0]) == pytest.approx(0.9 * probs)
    assert cal(1, probs, [3, 0]) == pytest.approx(np.array([0.3, 0.9])[:, None] * probs)
    assert cal(3, probs, [-1, 1]) == pytest.approx(np.array([0.9, 0.3])[:, None] * probs)   # deeper: the last depth


@pytest.mark.parametrize("kind", KINDS)
def test_the_shipped_maps_are_monotone_in_q_non_increasing_in_rank_and_within_0_and_1(kind):
    cal = read_calibration(SHIPPED / kind / "calibration.json", 4)
    check_monotone(cal)


@pytest.mark.parametrize("seed", range(5))
def test_random_maps_give_factors_monotone_in_q_non_increasing_in_rank_and_within_0_and_1(seed):
    check_monotone(random_calibration(seed))


def check_monotone(cal):
    grid = np.linspace(0, 1, 201)
    for d in range(cal.depths):
        for parent in (-1, 0, 1, 2, 5):
            f = cal(d, np.repeat(grid[:, None], 6, axis=1), np.full(201, parent))    # [201, 6]: every rank, every q
            assert (f >= 0).all() and (f <= 1).all()
            assert (np.diff(f, axis=0) >= 0).all(), "not non-decreasing in q"
            assert (np.diff(f, axis=1) <= 0).all(), "not non-increasing in rank"


# ---------------------------------------------------------------------------------------------------------
# The growth with calibrated values: still the best of all paths, still a tree for every n
# ---------------------------------------------------------------------------------------------------------
def naive_best_calibrated(q, cal, V, max_depth, top_k, n):
    """Every rank path of at most max_depth ranks < top_k, its value the product of the calibrated factors along
    it (each edge: its row's sorted probabilities through cal under the parent's rank, the rank's column), sorted
    by (-value, depth, rank path); the first n as {rank path: (tokens, value)}."""
    rows = []
    for depth in range(1, max_depth + 1):
        for ranks in itertools.product(range(top_k), repeat=depth):
            toks, value = (), 1.0
            for d, r in enumerate(ranks):
                p = np.asarray(q(toks), np.float64)
                order = sorted(range(V), key=lambda i: (-p[i], i))
                parent = ranks[d - 1] if d else -1
                value *= float(cal(d, np.minimum(p[order], 1.0)[None, :top_k], [parent])[0, r])
                toks += (order[r],)
            rows.append((-value, depth, ranks, toks))
    rows.sort()
    return {ranks: (toks, -neg) for neg, _, ranks, toks in rows[:n]}


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ties", [False, True])
def test_with_calibration_the_growth_keeps_exactly_the_paths_a_naive_enumeration_picks(seed, ties):
    V, max_depth, top_k = 4, 3, 3
    q, cal = random_q(seed, V, ties), random_calibration(seed)
    for n in (1, 2, 5, 9, 17, 39):
        got = kept_paths(grow(0, table_expand(q), n, max_depth, top_k, calibrate=cal))
        want = naive_best_calibrated(q, cal, V, max_depth, top_k, n)
        assert set(got) == set(want), f"n={n}"
        for ranks in want:
            assert got[ranks][0] == want[ranks][0] and got[ranks][1] == pytest.approx(want[ranks][1], abs=1e-15)


@pytest.mark.parametrize("seed", range(6))
def test_with_calibration_every_best_n_contains_each_nodes_parent_and_siblings_keep_rank_order(seed):
    q, cal = random_q(seed, 5, ties=True), random_calibration(seed + 10)
    g = grow(0, table_expand(q), 60, 3, 5, calibrate=cal)
    assert (g.values[1:] <= g.values[g.parents[1:]]).all()
    order = rank_order(g.values)
    for n in range(1, len(order) + 1):
        best = set(order[:n].tolist()) | {0}
        assert all(int(g.parents[m]) in best for m in order[:n])
        for m in order[:n]:                       # an elder sibling (same parent, lower rank) is kept too
            assert all(s in best for s in np.flatnonzero((g.parents == g.parents[m]) & (g.ranks < g.ranks[m])))


def test_on_the_hand_worked_draft_calibrated_values_are_the_hand_computed_products():
    """hand_q of test_dynamic_tree.py (after the root [0.6, 0.3, 0.1], after token 0 [0.5, 0.4, 0.1], after token
    1 [0.9, 0.05, 0.05]) through hand_calibration: [0] 0.2 + 0.6·0.6 = 0.56, [1] 0.3 / 2 = 0.15, [0,0] 0.56·0.9·0.5
    = 0.252, [0,1] 0.56·0.9·0.4 = 0.2016, [1,0] 0.15·0.3·0.9 = 0.0405 (its parent has rank 1); raw q is kept in
    Grown.probs."""
    from test_dynamic_tree import hand_q
    g = grow(2, table_expand(hand_q), 5, 2, 2, calibrate=hand_calibration())
    got = kept_paths(g)
    assert {r: v for r, (_, v) in got.items()} == pytest.approx({(0,): 0.56, (0, 0): 0.252, (0, 1): 0.2016,
                                                                 (1,): 0.15, (1, 0): 0.0405})
    assert sorted(g.probs[1:3]) == pytest.approx([0.3, 0.6])


# ---------------------------------------------------------------------------------------------------------
# Greedy: exactly AR's tokens with calibration, every decoder
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("decoder", KINDS)
@pytest.mark.parametrize("max_nodes", [3, 12, "auto"])
def test_greedy_with_calibrated_dynamic_trees_emits_exactly_the_ar_tokens(decoder, max_nodes):
    model = tiny_model(W=5, seed=3, dim=64)
    heads = medusa_random_heads(model, num_heads=3, seed=3) if decoder == "medusa" else \
        hydra_random_heads(model, "mlp" if decoder == "hydra" else "prefix-mlp", seed=3)
    sized = dict(costs={1: 1.0, 64: 1.05}, depth_costs=[0.05] * 3) if max_nodes == "auto" else {}
    sized["max_depth"] = 3
    for seed in range(2):
        cal = random_calibration(seed, depths=3)
        assert_lossless(model, make_proposer(decoder, model, heads=heads, tree="dynamic", max_nodes=max_nodes,
                                             calibrate=cal, **sized))


@pytest.fixture(scope="module")
def shipped():
    return load(str(SHIPPED))


@pytest.mark.parametrize("kind", KINDS)
def test_the_shipped_heads_use_their_calibration_by_default_and_stay_ar_with_and_without_it(shipped, kind):
    ids = [1, 1017, 451, 3034, 54, 1187, 97]
    want = generate(shipped, ids, max_new_tokens=24, eos_id=None).tokens
    values = {}
    for calibrate in (None, False):
        prop = make_proposer(kind, shipped, tree="dynamic", max_nodes=10, calibrate=calibrate)
        assert (prop.dynamic.calibration is not None) == (calibrate is None)
        assert generate(shipped, ids, decoder=prop, max_new_tokens=24, eos_id=None).tokens == want
        g = prop.dynamic.last
        values[calibrate] = g.values
        if calibrate is False:
            assert g.values[1:] == pytest.approx(g.values[g.parents[1:]] * g.probs[1:], rel=1e-12)
    assert not np.allclose(values[None][1:4], values[False][1:4]), "the calibration changed nothing"


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------
GOOD = {"format": "minispec-calibration-1", "depths": [[[{"q": [0.1, 0.9], "p": [0.2, 0.8]}]]] * 2}


@pytest.mark.parametrize("change, message", [
    (dict(format="other"), "key 'format'"),
    (dict(depths=[[[{"q": [0.1, 0.9], "p": [0.2, 0.8]}]]]), "key 'depths' must be a list of one entry per head"),
    (dict(depths=[[], [[{"q": [0.5], "p": [0.5]}]]]), "key 'depths\\[0\\]'"),
    (dict(depths=[[[]], [[{"q": [0.5], "p": [0.5]}]]]), "key 'depths\\[0\\]\\[0\\]'"),
    (dict(depths=[[[{"q": [0.1, 0.9], "p": [0.8, 0.2]}]]] * 2), "depths\\[0\\]\\[0\\]\\[0\\].*non-decreasing"),
    (dict(depths=[[[{"q": [0.9, 0.1], "p": [0.2, 0.8]}]]] * 2), "strictly increasing"),
    (dict(depths=[[[{"q": [0.1, 0.9], "p": [0.2, 1.5]}]]] * 2), "in \\[0, 1\\]"),
    (dict(depths=[[[{"q": [0.1, 0.9], "p": [0.2]}]]] * 2), "equally long"),
    (dict(depths=[[[{"q": [0.1, "x"], "p": [0.2, 0.3]}]]] * 2), "lists of numbers"),
    (dict(depths=[[[{"q": [0.1, 0.9], "p": [0.2, 0.8], "r": 1}]]] * 2), "keys 'q' and 'p'"),
    (dict(depths=[[{"q": [0.1, 0.9], "p": [0.2, 0.8]}]] * 2), "depths\\[0\\]\\[0\\]' must be a non-empty list of maps"),
])
def test_a_malformed_calibration_file_is_refused_naming_the_file_and_the_key(tmp_path, change, message):
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(dict(GOOD, **change)))
    with pytest.raises(UserError, match=f"calibration.json.*{message}"):
        read_calibration(path, 2)
    path.write_text(json.dumps(GOOD))
    assert read_calibration(path, 2).depths == 2


def test_heads_with_a_bad_calibration_file_are_refused_at_load_and_calibrate_is_checked(shipped, tmp_path):
    folder = tmp_path / "hydra"
    shutil.copytree(SHIPPED / "hydra", folder)
    bad = '{"format": "minispec-calibration-1", "depths": [[[{"q": [2], "p": [1]}]]]}'        # one depth, not 4
    (folder / "calibration.json").write_text(bad)
    with pytest.raises(UserError, match="hydra/calibration.json: key 'depths'"):
        make_proposer("hydra", shipped, heads=str(folder), tree="dynamic")
    (folder / "calibration.json").unlink()
    assert make_proposer("hydra", shipped, heads=str(folder), tree="dynamic").dynamic.calibration is None
    with pytest.raises(UserError, match="calibrate=True, but these heads have no calibration.json"):
        make_proposer("hydra", shipped, heads=str(folder), tree="dynamic", calibrate=True)
    with pytest.raises(UserError, match="calibrate must be"):
        make_proposer("hydra", shipped, tree="dynamic", calibrate="yes")
    with pytest.raises(UserError, match="calibrate is an option of tree='dynamic'"):
        make_proposer("medusa", shipped, calibrate=False)


# ---------------------------------------------------------------------------------------------------------
# The fit, against hand-worked examples
# ---------------------------------------------------------------------------------------------------------
def test_isotonic_regression_pools_the_violators_as_by_hand():
    """y = [0.2, 0.6, 0.4, 0.8], unit weights: 0.6 > 0.4 pool into 0.5 (weight 2)."""
    vals, wts, ends = isotonic([0.2, 0.6, 0.4, 0.8], [1, 1, 1, 1])
    assert vals == pytest.approx([0.2, 0.5, 0.8]) and list(wts) == [1, 2, 1] and list(ends) == [1, 3, 4]
    vals, wts, ends = isotonic([0.9, 0.1, 0.2], [1, 3, 1])                # (0.9 + 0.3) / 4 = 0.3 > 0.2: pool all
    assert vals == pytest.approx([1.4 / 5]) and list(ends) == [3]


def test_fit_map_bins_the_samples_pools_the_bins_and_puts_knots_at_the_pooled_means_as_by_hand():
    """q 0.1..0.6, accepted 1 1 0 1 1 1, bins of 2, add-half rates (k + 1/2) / 3: 5/6 (mean q 0.15), 1/2 (0.35),
    5/6 (0.55); the first two pool into 2/3 at q 0.25: knots (0.25, 2/3), (0.55, 5/6)."""
    q, p = fit_map([0.6, 0.1, 0.3, 0.2, 0.5, 0.4], [1, 1, 0, 1, 1, 1], bin_size=2)
    assert q == pytest.approx([0.25, 0.55]) and p == pytest.approx([2 / 3, 5 / 6], abs=1e-6)
    q, p = fit_map([0.1, 0.2, 0.3], [0, 0, 0], bin_size=3)                 # none accepted: 1/8, not 0
    assert q == pytest.approx([0.2]) and p == pytest.approx([0.125])


def test_label_step_marks_the_nodes_whose_parent_is_on_the_true_continuation_as_by_hand():
    """Root 5 at position 2 of full = [1, 4, 5, 7, 8, 9]: the true continuation is 7, 8, 9. Grown: node 1 = 7
    (depth 1), node 2 = 3 (depth 1), node 3 = 8 under node 1, node 4 = 6 under node 1, node 5 = 8 under node 2,
    node 6 = 9 under node 3 (depth 3, inside full), node 7 = 2 under node 6 (depth 4: past the end of full).
    Labelled: 1 (yes), 2 (no), 3 (yes), 4 (no), 6 (yes); 5 has a parent off the path, 7 is past the end."""
    g = Grown(tokens=np.array([5, 7, 3, 8, 6, 8, 9, 2]), parents=np.array([-1, 0, 0, 1, 1, 2, 3, 6]),
              depths=np.array([0, 1, 1, 2, 2, 2, 3, 4]), ranks=np.array([-1, 0, 1, 0, 1, 0, 0, 0]),
              values=np.ones(8), kept=np.arange(1, 8), depth_rows=[], rates=[])
    nodes, accepted, on = label_step(g, [1, 4, 5, 7, 8, 9], 2)
    assert list(nodes) == [1, 2, 3, 4, 6] and list(accepted) == [True, False, True, False, True]
    assert list(np.flatnonzero(on)) == [0, 1, 3, 6]


def test_fit_gives_each_depth_parent_and_rank_bucket_its_own_map_and_borrows_where_samples_are_few():
    """P(accepted) = q at depth 1, q / 2 at depth 2 under a rank-0 parent, q / 4 under a lower-ranked one, halved
    again for a rank >= 1 node; depth 1 has only the root as a parent (its parent bucket 1 borrows bucket 0), and
    depth 3 has no samples (it borrows depth 2 whole)."""
    rng = np.random.default_rng(0)
    n = 8000
    depth, rank, q = rng.integers(1, 3, n), rng.integers(0, 3, n), rng.random(n)
    parent = np.where(depth == 1, -1, rng.integers(0, 3, n))
    truth = q * np.where(depth == 1, 1.0, np.where(parent == 0, 0.5, 0.25)) * np.where(rank == 0, 1.0, 0.5)
    recs = dict(depth=depth, rank=rank, q=q, parent_rank=parent, accepted=rng.random(n) < truth)
    cal = fit(recs, n_heads=3, n_ranks=2, n_parents=2, bin_size=100)
    grid = np.array([[0.2, 0.2], [0.8, 0.8]])
    assert cal(0, grid, [-1, -1]) == pytest.approx(np.array([[0.2, 0.1], [0.8, 0.4]]), abs=0.08)
    assert cal(0, grid, [1, 1]) == pytest.approx(cal(0, grid, [-1, -1]))
    assert cal(1, grid, [0, 0]) == pytest.approx(np.array([[0.1, 0.05], [0.4, 0.2]]), abs=0.08)
    assert cal(1, grid, [2, 2]) == pytest.approx(np.array([[0.05, 0.025], [0.2, 0.1]]), abs=0.06)
    for parents in ([0, 0], [1, 1]):
        assert cal(2, grid, parents) == pytest.approx(cal(1, grid, parents))    # depth 3: depth 2's maps
    only_top = dict(recs, parent_rank=np.where(depth == 1, -1, 0))          # no depth-2 node under a rank-1 parent
    cal = fit(only_top, n_heads=2, n_ranks=2, n_parents=2, bin_size=100)
    assert cal(1, grid, [1, 1]) == pytest.approx(cal(1, grid, [0, 0]))       # depth 2's own bucket 0, not depth 1's
    assert not np.allclose(cal(1, grid, [1, 1]), cal(0, grid, [-1, -1]))
    with pytest.raises(UserError, match="samples of depth 1, rank 0"):
        fit({k: v[:10] for k, v in recs.items()}, n_heads=2)
