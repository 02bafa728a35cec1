"""Dynamic draft trees: grown afresh at every step from the draft's own confidence, and sized from the hardware.

The idea is EAGLE-2's (Li et al. 2024, arXiv 2406.16858, its context-aware dynamic draft tree: an expansion
phase, then a reranking phase; docs/dynamic_trees.md): a node's value is the product of the draft
probabilities along its path,

    value(root) = 1,    value(child) = value(parent) · q(child token | parent's path)             (`grow`)

(Hydra's heads give q conditioned on the path; Medusa's heads give a per-depth marginal, so a Medusa path's
value is the product of per-depth marginals). Growth goes depth by depth, one batched call of the draft per
depth: at depth d every node at depth d that is still among the best `max_nodes` nodes grown so far is expanded
(at most `width` of them when a width is given) into its top-k children; at the end every node is reranked by
value and the best `max_nodes` are kept.

Order. Nodes are numbered as they are created: depth by depth, and within a depth by (parent's number, rank),
which is the lexicographic order of their rank paths. The rank of a node is (-value, number): a stable sort on
-value. Since q <= 1, value(child) <= value(parent) also in floating point (a product with a factor <= 1 rounds
to at most the other factor), and a child's number is larger than its parent's, so every node ranks after its
parent: the best n nodes are closed under taking parents (a tree) for every n. For the same reason a node that
is not among the best max_nodes when its depth is expanded never will be, nor will its descendants, so
expanding only those (without `width`) keeps exactly the best max_nodes of ALL paths of at most max_depth
ranks < top_k (tests/test_dynamic_tree.py checks both against a naive enumeration).

Size (`best_size`; Sequoia, Chen et al. 2024, arXiv 2402.12374, chooses its tree's size from the hardware's
measured verify cost in the same spirit, offline and once). With c(T) the proposer's whole-step curve s(N) on
this backend (minispec.speculative.costs.step_curve, units of one whole plain decoding step) and P the proposal's cost paid so far, keeping
the best n nodes is expected to give

    rate(n) = (1 + v_1 + ... + v_n) / (c(n + 1) + P)          tokens per unit of time (plain decoding: 1)

(v_i the kept values in rank order: a node's value is the probability, under the draft, that it is accepted).
`grow` with `costs` goes one depth further while the best rate over n rises, stops at the first depth where it
does not, and keeps the n with the best rate given the cost paid; n = 0, the root alone, when no n beats it.
A sized growth expands at depth d only the depth-d nodes among the best n of the depth before (a heuristic:
the proposal's cost grows with its rows, and a node outside the best tree so far rarely pays for children).
What a proposer keeps for its dynamic trees (its options, the measured cost model, the calibration) is
dynamic_tree_sizing.py's DynamicTrees.
Shapes: N tree nodes, M grown nodes, B rows of one expansion, k children per expanded node.
"""
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from ..backend import array_module, to_host
from .costs import interp_cost, step_curve
from .tree import Tree


# ---------------------------------------------------------------------------------------------------------
# Rank and size
# ---------------------------------------------------------------------------------------------------------
def rank_order(values):
    """Node numbers 1..M of values [M + 1] (node 0 the root, not ranked) by decreasing value, ties by number."""
    return np.argsort(-np.asarray(values[1:]), kind="stable") + 1


def best_size(sorted_values, costs, paid=0.0):
    """(n, rate): the n in 0..M maximising (1 + sum of the first n values) / (c(n + 1) + paid) for values [M]
    in rank order, the smallest such n on ties; c interpolated from costs {T: c(T)} (`interp_cost`)."""
    v = np.asarray(sorted_values, dtype=np.float64)
    tau = 1.0 + np.concatenate([[0.0], np.cumsum(v)])                                  # [M + 1]
    rate = tau / (np.asarray(interp_cost(costs, np.arange(1, len(v) + 2)), np.float64) + paid)
    n = int(np.argmax(rate))
    return n, float(rate[n])


def model_costs(model):
    """(curve {N: s(N)}, unit seconds): this model's whole-step curve on its backend,
    minispec.speculative.costs.step_curve (a real verify of N nodes over a plain step; CPU time on NumPy, wall
    time on CuPy; medians of interleaved rounds against 112 cached tokens), measured once per model."""
    curve = step_curve(model)
    return curve.costs, curve.unit


# ---------------------------------------------------------------------------------------------------------
# Growth
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Grown:
    """Every node grown in one step, numbered in creation order (node 0 the root), and the ones kept.

    tokens, parents, depths, ranks int [M + 1] and values float [M + 1] (the root: its token, -1, 0, -1, 1.0);
    kept: the kept node numbers in rank order (a tree: every kept node's parent is kept or is the root);
    depth_rows [d]: the rows of each expansion; rates [d]: the best rate after each depth (sized growth only);
    probs float [M + 1]: each node's own draft probability q (the root: 1.0), before any calibration."""
    tokens: np.ndarray
    parents: np.ndarray
    depths: np.ndarray
    ranks: np.ndarray
    values: np.ndarray
    kept: np.ndarray
    depth_rows: list
    rates: list
    probs: np.ndarray = None


def depth_cost(cost, rows):
    """The proposal's cost of one expansion of `rows` rows: cost a number, or (fixed, per_row) -> a + b·rows."""
    if np.ndim(cost) == 0:
        return float(cost)
    return float(cost[0]) + float(cost[1]) * rows


def grow(root, expand, max_nodes, max_depth, top_k, width=None, costs=None, depth_costs=None, calibrate=None,
         chain=None):
    """Grow a draft tree depth by depth (module docstring) and keep its best nodes.

    expand(d, rows, tokens, parents) -> (ids int [B, k'], probs float [B, k']), k' >= top_k: the draft's top
    tokens and their probabilities, by decreasing probability, for each node in rows (node numbers at depth d,
    in creation order; tokens and parents [M + 1] describe every node grown so far, so a draft can read the
    paths). The children of row b are ids[b, :top_k] with values values[rows[b]] · probs[b, :top_k].
    max_nodes: nodes to keep besides the root (the candidate cap when sized). costs {T: c(T)} and depth_costs
    [max_depth] (each depth's expansion cost in units of one decoding step: a number, or (fixed, per row)):
    size the tree by the rate rule instead (module docstring); then only the depth-d nodes that the best tree
    so far keeps are expanded. calibrate(d, probs [B, k'], parent ranks [B]) -> factors [B, k'] in [0, 1] (a
    minispec.speculative.calibration.Calibration): the children's values are values[rows[b]] · factors instead
    (non-increasing in rank among siblings, so every argument above still holds). chain (tokens, values): a
    chain from another drafter joined to the grown nodes before the best are kept (`add_chain`; prompt lookup's
    continuation). Returns a Grown."""
    tokens, parents = np.array([int(root)], np.int64), np.array([-1], np.int64)
    depths, ranks, values, qs = np.zeros(1, np.int64), np.array([-1], np.int64), np.ones(1), np.ones(1)
    depth_rows, rates, paid, prev, n = [], [], 0.0, 1.0, max_nodes
    for d in range(max_depth if max_nodes > 0 else 0):
        if d == 0:
            rows = np.zeros(1, np.int64)
        else:
            best = rank_order(values)[:n]                               # sized: n from the best rate so far
            best = best[depths[best] == d]                              # still among the best, at depth d, by rank
            rows = np.sort(best[:width] if width else best)            # creation order
        if not len(rows):
            break
        ids, probs = expand(d, rows, tokens, parents)
        ids, probs = np.asarray(ids)[:, :top_k], np.minimum(np.asarray(probs, np.float64)[:, :top_k], 1.0)
        qs = np.concatenate([qs, probs.reshape(-1)])
        if calibrate is not None:
            probs = np.clip(calibrate(d, probs, ranks[rows]), 0.0, 1.0)
        B, k = ids.shape
        tokens = np.concatenate([tokens, ids.reshape(-1).astype(np.int64)])
        parents = np.concatenate([parents, np.repeat(rows, k)])
        depths = np.concatenate([depths, np.full(B * k, d + 1, np.int64)])
        ranks = np.concatenate([ranks, np.tile(np.arange(k, dtype=np.int64), B)])
        values = np.concatenate([values, (values[rows][:, None] * probs).reshape(-1)])
        depth_rows.append(B)
        if costs is not None:
            paid += depth_cost(depth_costs[d], B)
            n, rate = best_size(values[rank_order(values)[:max_nodes]], costs, paid)
            rates.append(rate)
            if rate <= prev:                                             # stop when it falls
                break
            prev = rate
    grown = Grown(tokens, parents, depths, ranks, values, None, depth_rows, rates, qs)
    if chain is not None:
        grown = add_chain(grown, *chain)
    order = rank_order(grown.values)[:max_nodes]
    n = best_size(grown.values[order], costs, paid)[0] if costs is not None else len(order)
    grown.kept = order[:n]
    return grown


def add_chain(grown, tokens, values):
    """The Grown with a chain of another drafter joined to it (its `kept` left None): tokens [L] continue the
    root, token j with value values[j] (non-increasing, each in [0, 1]: the probability that the chain's first
    j + 1 tokens are all accepted, as that drafter estimates it). Walking down from the root, a chain token
    that a grown node at that place already holds (a child of the chain's node so far, with the same token)
    raises that node's value to the larger of the two estimates; from the first one that none holds, the
    rest of the chain becomes new nodes, numbered after every grown node, each the child of the one before
    (rank: one past its parent's highest child rank; probs: NaN, no draft probability of their own).

    Order is kept: a node on the chain has value >= values[j] >= the next chain value, so a raised node still
    ranks after its parent and a new node (a larger number, a value no larger) after its own; the best n
    nodes stay a tree for every n. A raised node's grown children keep their values (their heads' estimate
    given the parent, which the raise does not change)."""
    tokens = [int(t) for t in tokens]
    values = np.asarray(values, dtype=np.float64)
    if len(values) != len(tokens) or np.any(np.diff(values) > 0) or np.any((values < 0) | (values > 1)):
        raise ValueError(f"add_chain: values must be one per token, non-increasing, in [0, 1]: {values}")
    g = grown
    t, par, dep, rk, val = (list(x) for x in (g.tokens, g.parents, g.depths, g.ranks, g.values))
    qs = list(g.probs) if g.probs is not None else None
    children = {}
    for n in range(1, len(t)):
        children.setdefault(par[n], []).append(n)
    node = 0
    for token, v in zip(tokens, values):
        same = [c for c in children.get(node, []) if t[c] == token]
        if same:
            node = same[0]
            val[node] = max(val[node], float(v))
            continue
        t.append(token)
        par.append(node)
        dep.append(dep[node] + 1)
        rk.append(max((rk[c] for c in children.get(node, [])), default=-1) + 1)
        val.append(min(float(v), val[node]))
        if qs is not None:
            qs.append(float("nan"))
        children.setdefault(node, []).append(len(t) - 1)
        node = len(t) - 1
    return Grown(np.array(t, np.int64), np.array(par, np.int64), np.array(dep, np.int64), np.array(rk, np.int64),
                 np.array(val), None, g.depth_rows, g.rates, None if qs is None else np.array(qs))


# ---------------------------------------------------------------------------------------------------------
# From the kept nodes to a Tree the verifier takes
# ---------------------------------------------------------------------------------------------------------
class TreeCache:
    """Tree.from_choices for the rank paths of kept nodes, remembering the last `size` distinct trees (the same
    few shapes recur from step to step, and building one is O(N²) Python)."""

    def __init__(self, size=256):
        self.trees, self.size = OrderedDict(), size

    def get(self, paths):
        key = tuple(sorted(paths, key=lambda p: (len(p), p)))
        tree = self.trees.get(key)
        if tree is None:
            tree = Tree.from_choices(key)
            self.trees[key] = tree
            if len(self.trees) > self.size:
                self.trees.popitem(last=False)
        else:
            self.trees.move_to_end(key)
        return tree


def to_tree(grown, trees):
    """(tree, tokens [N], values [N]) of the kept nodes of a Grown, in tree node order (root first, value 1).
    A node's rank path is its parent's plus its own rank among its parent's children."""
    path = {0: ()}
    for n in sorted(int(i) for i in grown.kept):                        # parents have smaller numbers
        path[n] = path[int(grown.parents[n])] + (int(grown.ranks[n]),)
    tree = trees.get([p for n, p in path.items() if n])
    node_of = {p: n for n, p in path.items()}
    order = [node_of[p] for p in tree.choices]                            # tree node i = grown node order[i]
    return tree, grown.tokens[order], grown.values[order]


def top_probs(logits, k):
    """(ids int [..., k], probs float [..., k]) on the host: the k most probable tokens of softmax(logits [..., V])
    by decreasing probability (ties by token id), and their probabilities under the full softmax."""
    xp = array_module(logits)
    k = min(k, logits.shape[-1])
    part = xp.argpartition(-logits, k - 1, axis=-1)[..., :k] if k < logits.shape[-1] else \
        xp.broadcast_to(xp.arange(logits.shape[-1]), logits.shape)                   # [..., k] unordered
    part = xp.sort(part, axis=-1)                                                      # ties: smaller id first
    vals = xp.take_along_axis(logits, part, axis=-1)                                   # [..., k]
    order = xp.argsort(-vals, axis=-1, kind="stable")
    ids, vals = xp.take_along_axis(part, order, axis=-1), xp.take_along_axis(vals, order, axis=-1)
    m = logits.max(axis=-1, keepdims=True)
    lse = m + xp.log(xp.exp(logits - m).sum(axis=-1, keepdims=True))                  # [..., 1]
    return to_host(ids).astype(np.int64), to_host(xp.exp(vals - lse)).astype(np.float64)
