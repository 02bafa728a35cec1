"""Per-node features for the dynamic trees' values (tools/measure_node_features.py, the features collect records in
minispec.training.calibrate): the features are what a hand-worked tree and a naive softmax say, the logistic
values are monotone in q, fall with the rank among siblings and lie in [0, 1], the growth with them keeps a tree
for every n, the fit recovers a known acceptance law, and greedy decoding with them stays AR's.

Expected values come from hand computations, math.exp, the naive oracle's logits and AR decoding.
"""
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_lossless, random_tensors, tiny_config
from test_calibration import random_calibration
from test_dynamic_tree import hand_q, random_q, table_expand
from test_hydra import random_heads as hydra_random_heads, tiny_model
from test_medusa import random_heads as medusa_random_heads
from minispec.decoders.registry import make_proposer
from minispec.mistral.model import Model
from minispec.mistral.oracle import oracle_forward
from minispec.speculative.calibration import Calibration
from minispec.speculative.dynamic_tree import grow, rank_order
from minispec.training.calibrate import collect, node_features, root_confidence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import measure_node_features as features  # noqa: E402


# ---------------------------------------------------------------------------------------------------------
# The features
# ---------------------------------------------------------------------------------------------------------
def test_node_features_are_the_parents_q_and_the_rank_0_and_rank_1_siblings_q_as_by_hand():
    """hand_q (test_dynamic_tree.py): after the root [0.6, 0.3, 0.1], after token 0 [0.5, 0.4, 0.1]; grown with
    top_k 3, depth 2, every node kept: nodes 1, 2, 3 = tokens 0, 1, 2 (q 0.6, 0.3, 0.1), then node 1's children
    4, 5, 6 (q 0.5, 0.4, 0.1). Node 5 (rank 1 under node 1): parent q 0.6, q0 0.5, q1 0.4; node 1: parent q 1
    (the root), q0 0.6, q1 0.3; node 3: q0 0.6, q1 0.3."""
    g = grow(2, table_expand(hand_q), 12, 2, 3)
    assert list(g.tokens[1:7]) == [0, 1, 2, 0, 1, 2] and list(g.parents[4:7]) == [1, 1, 1]
    parent_q, q0, q1 = node_features(g, np.array([1, 3, 5, 6]))
    assert parent_q == pytest.approx([1.0, 1.0, 0.6, 0.6])
    assert q0 == pytest.approx([0.6, 0.6, 0.5, 0.5])
    assert q1 == pytest.approx([0.3, 0.3, 0.4, 0.4])


def test_node_features_give_no_runner_up_to_an_only_child():
    g = grow(2, table_expand(hand_q), 4, 2, 1)                      # top_k 1: every node is an only child
    assert node_features(g, np.array([1, 2]))[2] == pytest.approx([0.0, 0.0])


def test_root_confidence_is_the_largest_softmax_probability_by_math_exp():
    logits = np.array([[2.0, 0.5, -1.0], [800.0, 800.0, 0.0]])
    by_hand = [math.exp(2.0) / (math.exp(2.0) + math.exp(0.5) + math.exp(-1.0)), 0.5]
    assert root_confidence(logits) == pytest.approx(by_hand, rel=1e-12)


def test_collect_gives_each_step_the_confidence_of_the_oracles_logits_that_chose_its_root():
    """On a tiny model, every record of a step whose root sits at position pos carries the largest softmax
    probability of the naive oracle's logits at pos - 1 over the prompt and the output (ungated: the first step
    is plain and emits one token, every later step drafts; a step's root sits after every token emitted before
    it)."""
    cfg = tiny_config(sliding_window=6, vocab_size=24, dim=32, n_heads=4)
    tensors = random_tensors(cfg, seed=4)
    model = Model(cfg, tensors, dtype="float64", device="cpu")
    heads = hydra_random_heads(model, "mlp", seed=4)
    ids = [1, 5, 3, 7]
    recs = collect(model, lambda: make_proposer("hydra", model, heads=heads, tree="dynamic", max_nodes=8,
                                                 calibrate=False, gate=False), [ids], 12)
    full = ids + recs["tokens"][0]
    logits = oracle_forward(cfg, tensors, full[:-1])                                    # [T - 1, V]
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    conf = (p / p.sum(axis=1, keepdims=True)).max(axis=1)
    assert set(recs["prompt"].tolist()) == {0}
    firsts = np.flatnonzero((recs["depth"] == 1) & (recs["rank"] == 0))                 # one per drafting step
    pos = len(ids) + np.cumsum([0] + [acc for acc, _ in recs["steps"]])[:-1]            # step 1 (plain) emits 1
    assert len(firsts) == len(recs["steps"]) > 3
    assert recs["root_conf"][firsts] == pytest.approx(conf[pos - 1], rel=1e-9)
    steps_of = np.cumsum(np.isin(np.arange(len(recs["q"])), firsts)) - 1                 # each record's step
    assert recs["root_conf"] == pytest.approx(conf[pos - 1][steps_of], rel=1e-9)


# ---------------------------------------------------------------------------------------------------------
# The logistic values
# ---------------------------------------------------------------------------------------------------------
def random_values(seed, depths=3, base=False):
    """NodeValues over every feature with random weights: the weight of logit q >= 0, the others of any sign;
    base=True: the features adjust random isotonic maps (test_calibration.random_calibration) instead of q."""
    rng = np.random.default_rng(seed)
    weights = []
    for d in range(1, depths + 1):
        n = (4 if d == 1 else 5) - base
        first = [rng.normal()] if base else [rng.normal(), abs(rng.normal())]
        weights.append([[np.concatenate([first, rng.normal(size=n - len(first))]) for _ in range(3)]
                        for _ in range(2)])
    if base:
        return features.NodeValues(weights, features.SETS["maps + all"], base=random_calibration(seed, depths))
    return features.NodeValues(weights, features.SETS["all"])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("base", [False, True])
def test_the_logistic_factors_are_monotone_in_q_fall_with_the_rank_and_lie_in_0_1(seed, base):
    v = random_values(seed, base=base)
    rng = np.random.default_rng(seed)
    for d in range(3):
        for parent in (-1, 0, 3):
            v.conf, v.parent_q = float(rng.random()), rng.random(5)
            top = np.sort(rng.random((5, 6)), axis=1)[:, ::-1]          # each row's q by rank
            f = v(d, top, np.full(5, parent))
            assert ((f > 0) & (f <= 1)).all()
            assert (np.diff(f, axis=1) <= 0).all(), "siblings' factors must fall with the rank"
            grid = np.linspace(0.001, 0.999, 50)                          # one row, its rank-3 child's q varied
            rows = np.repeat(top[:1], 50, axis=0)
            rows[:, 3] = np.minimum(grid, rows[0, 2])
            v.parent_q = np.repeat(v.parent_q[:1], 50)
            g = v(d, rows, np.full(50, parent))[:, 3]
            assert (np.diff(g) >= -1e-15).all(), "not non-decreasing in q"


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("base", [False, True])
def test_with_logistic_values_every_best_n_contains_each_nodes_parent_and_siblings_keep_rank_order(seed, base):
    v = random_values(seed + 10, base=base)
    v.conf = 0.3
    q = random_q(seed, 5, ties=True)
    g = grow(0, features.parent_q_expand(table_expand(q), v, 5), 60, 3, 5, calibrate=v)
    assert (g.values[1:] <= g.values[g.parents[1:]]).all()
    order = rank_order(g.values)
    for n in range(1, len(order) + 1):
        best = set(order[:n].tolist()) | {0}
        assert all(int(g.parents[m]) in best for m in order[:n])
        for m in order[:n]:
            assert all(s in best for s in np.flatnonzero((g.parents == g.parents[m]) & (g.ranks < g.ranks[m])))


def test_the_growth_hands_the_values_each_expanded_rows_own_q():
    """hand_q, top_k 2, depth 2: depth 1's rows are the root (q 1); depth 2 expands nodes 1 and 2 (q 0.6, 0.3)."""
    seen = []

    class Spy(features.NodeValues):
        def __call__(self, d, probs, parent_ranks=None, run=None):
            seen.append(list(self.parent_q))
            return super().__call__(d, probs, parent_ranks, run)
    v = Spy(random_values(0).weights, features.SETS["all"])
    grow(2, features.parent_q_expand(table_expand(hand_q), v, 2), 6, 2, 2, calibrate=v)
    assert seen == [pytest.approx([1.0]), pytest.approx([0.6, 0.3])]


def test_the_fit_recovers_a_known_logistic_acceptance_law_and_keeps_the_weight_of_q_non_negative():
    """P(accepted) = sigmoid(-1 + 1.5 logit q + 0.8 logit conf - 0.5 logit q1) at depth 1, rank 0; the fit on
    40000 records finds the weights within 0.15. With acceptance falling in q the weight of q is held at 0."""
    rng = np.random.default_rng(0)
    n = 40000
    q, conf, q1 = rng.uniform(0.05, 0.95, n), rng.uniform(0.05, 0.95, n), rng.uniform(0.01, 0.5, n)
    logit = features.logit
    truth = 1 / (1 + np.exp(-(-1 + 1.5 * logit(q) + 0.8 * logit(conf) - 0.5 * logit(q1))))
    recs = dict(depth=np.ones(n, int), rank=np.zeros(n, int), parent_rank=-np.ones(n, int), q=q, root_conf=conf,
                q1=q1, q0=q, parent_q=np.ones(n), accepted=rng.random(n) < truth)
    w = features.fit_values(recs, 1, features.SETS["all"], n_ranks=1, n_parents=1).weights[0][0][0]
    assert w == pytest.approx([-1, 1.5, 0.8, -0.5], abs=0.15)
    recs["accepted"] = rng.random(n) < 1 - q
    w = features.fit_values(recs, 1, features.SETS["q only"], n_ranks=1, n_parents=1).weights[0][0][0]
    assert w[1] == 0.0 and w[0] == pytest.approx(0.0, abs=0.1)          # the mean rate, 1/2, without q


def test_the_fit_adjusts_the_isotonic_maps_by_a_known_law_of_the_root_confidence():
    """Maps q -> q (one knot pair) as the base; P(accepted) = sigmoid(logit q - 0.3 + 0.7 logit conf): the fit
    with the root's confidence alone finds (-0.3, 0.7) within 0.15."""
    rng = np.random.default_rng(2)
    n = 40000
    q, conf = rng.uniform(0.05, 0.95, n), rng.uniform(0.05, 0.95, n)
    logit = features.logit
    truth = 1 / (1 + np.exp(-(logit(q) - 0.3 + 0.7 * logit(conf))))
    recs = dict(depth=np.ones(n, int), rank=np.zeros(n, int), parent_rank=-np.ones(n, int), q=q, root_conf=conf,
                q1=q / 2, q0=q, parent_q=np.ones(n), accepted=rng.random(n) < truth)
    base = Calibration([[[([0.0, 1.0], [0.0, 1.0])]]])
    v = features.fit_values(recs, 1, ("conf",), n_ranks=1, n_parents=1, base=base)
    assert v.weights[0][0][0] == pytest.approx([-0.3, 0.7], abs=0.15)
    v.conf = 0.5                                                      # logit 0: the factor is sigmoid(logit q - 0.3)
    assert v(0, np.array([[0.6]]))[0, 0] == pytest.approx(1 / (1 + np.exp(-(logit(0.6) + v.weights[0][0][0][0]))))


def test_the_fit_borrows_a_cell_with_few_samples_from_the_rank_bucket_before_it_then_the_depth_before():
    rng = np.random.default_rng(1)
    n = 3000
    depth, rank = np.where(np.arange(n) < 2950, 1, 2), np.where(np.arange(n) < 1500, 0, 1)
    recs = dict(depth=depth, rank=rank, parent_rank=-np.ones(n, int), q=rng.random(n), root_conf=rng.random(n),
                q1=rng.random(n), q0=rng.random(n), parent_q=rng.random(n), accepted=rng.random(n) < 0.5)
    w = features.fit_values(recs, 2, features.SETS["q only"], n_ranks=3, n_parents=2).weights
    assert w[0][0][2] is w[0][0][1]                                      # rank >= 2: none, borrows rank 1
    assert w[0][1][0] is w[0][0][0]                                      # parent bucket 1: none, borrows bucket 0
    assert w[1][0][0] is w[0][0][0]                                      # depth 2: 50 samples, borrows depth 1


# ---------------------------------------------------------------------------------------------------------
# Greedy: exactly AR's tokens
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("decoder", ["medusa", "hydra", "hydra++"])
@pytest.mark.parametrize("base", [False, True])
def test_greedy_with_the_logistic_values_emits_exactly_the_ar_tokens(decoder, base):
    model = tiny_model(W=5, seed=3, dim=64)
    heads = medusa_random_heads(model, num_heads=3, seed=3) if decoder == "medusa" else \
        hydra_random_heads(model, "mlp" if decoder == "hydra" else "prefix-mlp", seed=3)
    for seed in range(2):
        v = random_values(seed, depths=3, base=base)
        prop = make_proposer(decoder, model, heads=heads, tree="dynamic", max_nodes=8, max_depth=3, calibrate=v,
                             gate=False)
        features.attach(prop, v, model)
        stats = assert_lossless(model, prop)
        assert sum(stats.drafted) > 0
