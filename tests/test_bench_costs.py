"""The cost model that picks the CPU tree charges a tree only for the heads its depth runs."""
import numpy as np

from minispec.speculative.costs import pick_budget


def test_pick_budget_charges_each_tree_the_heads_cost_of_its_own_depth():
    # Hand-worked: c(T) = 1 everywhere; budget 1 = chain [0] (depth 1, tau 1.9), budget 2 = [0], [0,0]
    # (depth 2, tau 1 + 0.9 + 0.81 = 2.71), budget 3 adds [1] (depth 2, tau 2.76).
    acc = np.array([[0.9, 0.05], [0.9, 0.05]])
    costs = {1: 1.0, 2: 1.0, 4: 1.0}
    # one head costs 0.1 steps, two heads 2.0: 1.9 / 1.1 = 1.73 beats 2.71 / 3 and 2.76 / 3
    budget, ratio = pick_budget(acc, costs, [0.1, 2.0])
    assert budget == 1 and abs(ratio - 1.9 / 1.1) < 1e-9
    # a flat 0.1 for any depth: 2.76 / 1.1 wins
    budget, ratio = pick_budget(acc, costs, 0.1)
    assert budget == 3 and abs(ratio - 2.76 / 1.1) < 1e-9
    # a cost of the tree itself (Hydra: one head call per node): 0.5 per node -> 1.9 / 1.5, 2.71 / 2, 2.76 / 2.5
    budget, ratio = pick_budget(acc, costs, lambda tree: 0.5 * (tree.N - 1))
    assert budget == 2 and abs(ratio - 2.71 / 2.0) < 1e-9

