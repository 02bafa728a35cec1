"""Medusa trees: buffers of a hand-worked tree, chains, candidates, bad trees, and the greedy construction."""
import itertools

import numpy as np
import pytest

from minispec.speculative.tree import Tree, build_tree

# Hand-worked: choices [[0],[1],[0,0],[0,1],[1,0],[0,0,0]] (given shuffled) become nodes sorted by (depth, path):
#   0: root   1: [0]   2: [1]   3: [0,0]   4: [0,1]   5: [1,0]   6: [0,0,0]
#
#            0
#          /   \
#         1     2
#        / \     \
#       3   4     5
#       |
#       6
HAND_CHOICES = [[0, 0, 0], [1], [0, 1], [0], [1, 0], [0, 0]]


def test_hand_worked_tree_has_the_parents_depths_heads_and_ranks_drawn_above():
    t = Tree.from_choices(HAND_CHOICES)
    assert t.N == 7 and t.P == 3 and t.max_depth == 3
    assert t.choices == ((), (0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0))
    assert t.parents.tolist() == [-1, 0, 0, 1, 1, 2, 3]
    assert t.depths.tolist() == [0, 1, 1, 2, 2, 2, 3]
    assert t.head.tolist() == [-1, 0, 0, 1, 1, 1, 2]
    assert t.rank.tolist() == [-1, 0, 1, 0, 1, 0, 0]
    assert t.children == ((1, 2), (3, 4), (5,), (6,), (), (), ())


def test_hand_worked_tree_mask_lets_each_node_attend_to_its_ancestors_and_itself_only():
    t = Tree.from_choices(HAND_CHOICES)
    visible = {0: [0], 1: [0, 1], 2: [0, 2], 3: [0, 1, 3], 4: [0, 1, 4], 5: [0, 2, 5], 6: [0, 1, 3, 6]}
    expect = np.zeros((7, 7), dtype=bool)
    for i, js in visible.items():
        expect[i, js] = True
    assert t.mask.dtype == bool and t.mask.shape == (7, 7)
    np.testing.assert_array_equal(t.mask, expect)


def test_hand_worked_tree_retrieve_lists_root_to_leaf_paths_in_lexicographic_order_padded_with_minus_one():
    t = Tree.from_choices(HAND_CHOICES)
    # leaves [0,0,0] (node 6) < [0,1] (node 4) < [1,0] (node 5)
    assert t.retrieve.tolist() == [[0, 1, 3, 6], [0, 1, 4, -1], [0, 2, 5, -1]]


def test_tree_buffers_are_read_only():
    t = Tree.from_choices(HAND_CHOICES)
    for a in (t.parents, t.depths, t.mask, t.head, t.rank, t.retrieve):
        with pytest.raises(ValueError):
            a[0] = 0


def test_empty_choices_give_the_root_alone_which_is_plain_autoregressive_decoding():
    t = Tree.from_choices([])
    assert t.N == 1 and t.P == 1 and t.max_depth == 0
    assert t.parents.tolist() == [-1] and t.mask.tolist() == [[True]] and t.retrieve.tolist() == [[0]]
    assert t.children == ((),)
    assert t.candidates(7, np.zeros((0, 0), dtype=np.int64)).tolist() == [7]


@pytest.mark.parametrize("K", [0, 1, 4])
def test_chain_of_k_is_a_causal_line_of_rank_zero_tokens(K):
    t = Tree.chain(K)
    assert t.N == K + 1 and t.P == 1 and t.max_depth == K
    assert t.choices[1:] == tuple((0,) * d for d in range(1, K + 1))
    assert t.parents.tolist() == [-1] + list(range(K))
    np.testing.assert_array_equal(t.mask, np.tril(np.ones((K + 1, K + 1), dtype=bool)))
    assert t.retrieve.tolist() == [list(range(K + 1))]


def test_candidates_take_each_nodes_token_from_its_head_and_rank():
    t = Tree.from_choices(HAND_CHOICES)
    topk = np.array([[10, 11], [20, 21], [30, 31]])
    # nodes: root, [0]→h0r0, [1]→h0r1, [0,0]→h1r0, [0,1]→h1r1, [1,0]→h1r0, [0,0,0]→h2r0
    assert t.candidates(99, topk).tolist() == [99, 10, 11, 20, 21, 20, 30]


def test_candidates_refuse_a_topk_table_too_small_for_the_tree():
    t = Tree.from_choices(HAND_CHOICES)
    with pytest.raises(ValueError, match="at least 3 heads x 2 ranks"):
        t.candidates(0, np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="at least 3 heads x 2 ranks"):
        t.candidates(0, np.zeros((3, 1), dtype=np.int64))


@pytest.mark.parametrize("choices, kw, message", [
    ([[0], []], {}, r"choices\[1\] is empty \(the root is implicit"),
    ([[0], [-1]], {}, r"choices\[1\] = \[-1\] has a negative rank -1"),
    ([[0], [3]], {"top_k": 3}, r"choices\[1\] = \[3\] uses rank 3, but top_k = 3"),
    ([[0], [0, 0], [0, 0, 0]], {"n_heads": 2}, r"choices\[2\] = \[0, 0, 0\] has depth 3, but there are only n_heads = 2"),
    ([[0], [1, 0]], {}, r"choices\[1\] = \[1, 0\] has no parent: the choice \[1\] is missing"),
    ([[0], [1], [0]], {}, r"choices\[2\] = \[0\] duplicates choices\[0\]"),
    ([[0], [0.5]], {}, r"not an int"),
    ([[0], 1], {}, r"choices\[1\] = 1 is not a list of ranks"),
    ([[0]], {"top_k": 0}, r"top_k must be a positive int"),
])
def test_bad_trees_raise_value_errors_that_name_the_offending_path(choices, kw, message):
    with pytest.raises(ValueError, match=message):
        Tree.from_choices(choices, **kw)


def test_build_tree_on_hand_computable_accuracies_picks_the_three_best_paths():
    # path products: [0] .6, [1] .2, [0,0] .6*.5=.3, [0,1] .06, [1,0] .1, [1,1] .02 -> best three: [0], [0,0], [1]
    t, tau = build_tree([[0.6, 0.2], [0.5, 0.1]], 3)
    assert [list(p) for p in t.choices[1:]] == [[0], [1], [0, 0]]
    assert tau == pytest.approx(1 + 0.6 + 0.2 + 0.3, abs=1e-12)


def test_build_tree_with_budget_zero_is_the_root_and_tau_one():
    t, tau = build_tree([[0.9]], 0)
    assert t.N == 1 and tau == 1.0


def test_build_tree_stops_when_every_path_is_in_the_tree():
    t, tau = build_tree([[0.5, 0.5], [0.5, 0.5]], 100)
    assert t.N == 1 + 2 + 4 and tau == pytest.approx(1 + 2 * 0.5 + 4 * 0.25)


@pytest.mark.parametrize("seed", range(4))
def test_build_tree_is_closed_under_parents_optimal_and_its_tau_grows_with_budget(seed):
    rng = np.random.default_rng(seed)
    K, k = 3, 4
    acc = np.sort(rng.uniform(0, 1, (K, k)), axis=1)[:, ::-1]
    # brute force: every path of depth <= K, its product of per-depth accuracies
    products = sorted((float(np.prod([acc[d, r] for d, r in enumerate(p)]))
                       for depth in range(1, K + 1) for p in itertools.product(range(k), repeat=depth)),
                      reverse=True)
    last = 1.0
    for budget in range(0, len(products) + 1, 3):
        t, tau = build_tree(acc, budget)
        assert t.N == budget + 1
        assert all(p[:-1] in set(t.choices) for p in t.choices[1:])
        assert tau == pytest.approx(1 + sum(products[:budget]), abs=1e-12)
        assert tau >= last
        last = tau


@pytest.mark.parametrize("acc, budget, message", [
    ([0.5, 0.5], 2, "accuracies must be a non-empty"),
    ([[0.5, 1.5]], 2, r"in \[0, 1\]"),
    ([[0.5]], -1, "budget must be an int >= 0"),
])
def test_build_tree_rejects_bad_inputs(acc, budget, message):
    with pytest.raises(ValueError, match=message):
        build_tree(acc, budget)


def test_expected_tau_is_one_plus_the_products_of_each_paths_accuracies_by_hand():
    from minispec.speculative.tree import expected_tau
    acc = [[0.5, 0.2], [0.4, 0.1]]
    assert abs(expected_tau(acc, [[0], [1], [0, 0], [0, 1]]) - (1 + 0.5 + 0.2 + 0.5 * 0.4 + 0.5 * 0.1)) < 1e-15
    assert expected_tau(acc, []) == 1


def test_build_trees_expected_tau_is_that_of_the_paths_it_chose():
    from minispec.speculative.tree import build_tree, expected_tau
    acc = np.random.default_rng(3).uniform(0, 1, (3, 4))
    tree, tau = build_tree(acc, 9)
    assert abs(tau - expected_tau(acc, [list(p) for p in tree.choices[1:]])) < 1e-12
