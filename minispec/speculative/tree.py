"""Static candidate trees for Medusa and Hydra (Medusa, arXiv 2401.10774, §2.1.2 "tree attention", §2.3.3).

Four words, one meaning each (docs/shapes.md uses the same ones):
    tree     the N tokens one draft proposes, node 0 the root: the token already chosen (the previous step's bonus
             token). `Tree` is a tree with its buffers built; a parameter named `tree` takes a Tree or choices.
    choice   one node written as the top-k ranks on the way down to it (an entry of Medusa's `medusa_choices`):
             (0, 1) is "the rank-0 token of head 0, then the rank-1 token of head 1"; its parent is (0,), the
             root's choice is ().
    choices  a tree written as the choices of its nodes other than the root: Medusa's published `medusa_choices`
             format. Head files store them under the JSON keys "tree" and "tree_cuda" (`heads.choices`,
             `heads.choices_cuda`); `Tree.from_choices` builds the tree, `tree.choices[1:]` gives them back.
    path     a line of nodes from the root down (node indices): `retrieve` holds the P root-to-leaf paths; the
             verifier accepts one root-to-node path and commits it.
Nodes are sorted by (depth, choice), so parents come before their children and siblings are in rank order.

The buffers are what a verifier needs (Medusa's `generate_medusa_buffers`), all host NumPy, read-only:
    choices  tuple [N]       each node's choice; the root's is ()
    parents  int  [N]        parent node (-1 for the root)
    depths   int  [N]        root 0; a node's position is the root's position + its depth
    mask     bool [N, N]     ancestor-or-self: row i = the nodes node i may attend to (tree attention)
    head     int  [N]        which head supplies node i's token (depth - 1; -1 for the root)
    rank     int  [N]        which of that head's top-k it takes (-1 for the root)
    children tuple [N]       each node's children, in rank order
    retrieve int  [P, max_depth + 1]   root-to-leaf paths (node indices), leaves in lexicographic choice order,
                                       -1 padded
An empty choices list is the root alone: plain autoregressive decoding.

`build_tree` grows a tree from measured head accuracies the way Medusa chose its default trees (§2.3.3).
"""
import heapq
import numbers
from dataclasses import dataclass

import numpy as np

from ..backend import to_host
from ..errors import UserError


def _readonly(a):
    a.flags.writeable = False
    return a


@dataclass(frozen=True, eq=False)
class Tree:
    choices: tuple          # [N] each node's choice (its ranks from the root down); the root's is ()
    parents: np.ndarray     # int [N]
    depths: np.ndarray      # int [N]
    mask: np.ndarray        # bool [N, N]
    head: np.ndarray        # int [N]
    rank: np.ndarray        # int [N]
    children: tuple         # [N] tuples of node indices, rank order
    retrieve: np.ndarray    # int [P, max_depth + 1]

    @property
    def N(self):
        """Nodes, root included."""
        return len(self.choices)

    @property
    def P(self):
        """Root-to-leaf paths (rows of `retrieve`)."""
        return self.retrieve.shape[0]

    @property
    def max_depth(self):
        return int(self.depths.max())

    def __repr__(self):
        choices = [list(c) for c in self.choices[1:]]
        return f"Tree(N={self.N}, P={self.P}, max_depth={self.max_depth}, choices={choices})"

    # -------------------------------------------------------------------------------------------------
    @classmethod
    def from_choices(cls, choices, n_heads=None, top_k=None):
        """Build from Medusa's choices (one list of ranks per node). n_heads / top_k, when given, bound depth / rank."""
        for name, v in (("n_heads", n_heads), ("top_k", top_k)):
            if v is not None and (not isinstance(v, numbers.Integral) or isinstance(v, bool) or v <= 0):
                raise UserError(f"tree: {name} must be a positive int or None, got {v!r}")
        if isinstance(choices, (str, bytes)) or not hasattr(choices, "__iter__"):
            raise UserError(f"tree: choices must be a list of choices (lists of ranks), got {choices!r}")
        nodes = []
        for i, c in enumerate(choices):
            if isinstance(c, (str, bytes)) or not hasattr(c, "__iter__"):
                raise UserError(f"tree: choices[{i}] = {c!r} is not a list of ranks")
            c = list(c)
            if not c:
                raise UserError(f"tree: choices[{i}] is empty (the root is implicit; every choice needs a rank)")
            for r in c:
                if not isinstance(r, numbers.Integral) or isinstance(r, bool):
                    raise UserError(f"tree: choices[{i}] = {c} has a rank that is not an int: {r!r}")
                if r < 0:
                    raise UserError(f"tree: choices[{i}] = {c} has a negative rank {r}")
                if top_k is not None and r >= top_k:
                    raise UserError(f"tree: choices[{i}] = {c} uses rank {r}, but top_k = {top_k} "
                                    f"(ranks 0..{top_k - 1})")
            if n_heads is not None and len(c) > n_heads:
                raise UserError(f"tree: choices[{i}] = {c} has depth {len(c)}, but there are only n_heads = {n_heads}")
            nodes.append(tuple(int(r) for r in c))
        seen = {}
        for i, p in enumerate(nodes):
            if p in seen:
                raise UserError(f"tree: choices[{i}] = {list(p)} duplicates choices[{seen[p]}]")
            seen[p] = i
        for i, p in enumerate(nodes):
            if len(p) > 1 and p[:-1] not in seen:
                raise UserError(f"tree: choices[{i}] = {list(p)} has no parent: the choice {list(p[:-1])} is missing")

        nodes = [()] + sorted(nodes, key=lambda p: (len(p), p))          # node order: (depth, choice)
        index = {p: i for i, p in enumerate(nodes)}
        N = len(nodes)
        parents = np.array([-1] + [index[p[:-1]] for p in nodes[1:]], dtype=np.int64)       # [N]
        depths = np.array([len(p) for p in nodes], dtype=np.int64)                         # [N]
        head = depths - 1                                                                  # [N], root -1
        rank = np.array([-1] + [p[-1] for p in nodes[1:]], dtype=np.int64)                # [N]
        kids = [[] for _ in range(N)]
        for i in range(1, N):
            kids[parents[i]].append(i)          # node order puts siblings in rank order already

        mask = np.zeros((N, N), dtype=bool)                                                # [N, N]
        lineage = []                            # lineage[i]: root ... i
        for i in range(N):
            lineage.append((lineage[parents[i]] if i else []) + [i])
            mask[i, lineage[i]] = True

        leaves = sorted((i for i in range(N) if not kids[i]), key=lambda i: nodes[i])     # lexicographic = DFS
        D = int(depths.max())
        retrieve = np.full((len(leaves), D + 1), -1, dtype=np.int64)                       # [P, D + 1]
        for row, leaf in enumerate(leaves):
            retrieve[row, :len(lineage[leaf])] = lineage[leaf]

        return cls(choices=tuple(nodes), parents=_readonly(parents), depths=_readonly(depths), mask=_readonly(mask),
                   head=_readonly(head), rank=_readonly(rank), children=tuple(tuple(k) for k in kids),
                   retrieve=_readonly(retrieve))

    @classmethod
    def chain(cls, K):
        """The chain [[0], [0, 0], ...] of K drafted tokens (K = 0: the root alone)."""
        if not isinstance(K, numbers.Integral) or isinstance(K, bool) or K < 0:
            raise UserError(f"tree: chain length K must be an int >= 0, got {K!r}")
        return cls.from_choices([[0] * d for d in range(1, K + 1)])

    def candidates(self, root_token, topk_ids):
        """Token of every node: root first, then node i takes topk_ids[head[i], rank[i]].

        root_token int, topk_ids int [K, k] (host, or a device array copied once) -> tokens int [N] (host).
        """
        ids = np.asarray(to_host(topk_ids))                                               # [K, k]
        if ids.ndim != 2:
            raise UserError(f"tree.candidates: topk_ids must be [K heads, k], got shape {ids.shape}")
        need = (self.max_depth, int(self.rank.max()) + 1 if self.N > 1 else 0)
        if ids.shape[0] < need[0] or ids.shape[1] < need[1]:
            raise UserError(f"tree.candidates: this tree needs topk_ids of at least {need[0]} heads x {need[1]} "
                             f"ranks, got shape {ids.shape}")
        tokens = np.empty(self.N, dtype=np.int64)                                          # [N]
        tokens[0] = int(root_token)
        tokens[1:] = ids[self.head[1:], self.rank[1:]]
        return tokens


# ---------------------------------------------------------------------------------------------------------
def expected_tau(accuracies, choices):
    """1 + the sum over `choices` (one rank per depth each) of the product of their per-depth accuracies [K, k]:
    the expected tokens per step of the tree with those nodes, under `build_tree`'s independence assumption."""
    return 1 + sum(float(np.prod([accuracies[d][r] for d, r in enumerate(c)])) for c in choices)


def build_tree(accuracies, budget):
    """Medusa's tree construction (arXiv 2401.10774 §2.3.3; the choices behind `generate_medusa_buffers`' defaults).

    accuracies [K, k]: probability that head d's rank-r candidate is the correct token, measured on average over
    positions (`topk_accuracies` of the trainers) and assumed to hold also given that the path above is correct.
    Under that independence assumption a node's expected acceptance is the product of the accuracies along its
    choice. Starting from the root, repeatedly add the node with the highest expected acceptance whose parent is
    already in the tree (ties: shallower, then lexicographically smaller choice), until `budget` nodes (root
    excluded) or none is left. Since accuracies are <= 1, a child never beats its parent, so the result is also
    the set of the `budget` best choices overall.

    Returns (Tree, expected_tau), expected_tau = 1 + the sum of the chosen nodes' products: the expected tokens per
    step, the bonus token included.
    """
    acc = np.asarray(accuracies, dtype=np.float64)                                         # [K, k]
    if acc.ndim != 2 or acc.size == 0:
        raise UserError(f"build_tree: accuracies must be a non-empty [K heads, k ranks] array, got shape {acc.shape}")
    if not (np.all(np.isfinite(acc)) and np.all(acc >= 0) and np.all(acc <= 1)):
        raise UserError("build_tree: accuracies must be probabilities in [0, 1]")
    if not isinstance(budget, numbers.Integral) or isinstance(budget, bool) or budget < 0:
        raise UserError(f"build_tree: budget must be an int >= 0, got {budget!r}")
    K, k = acc.shape
    frontier = [(-acc[0, r], 1, (r,)) for r in range(k)]       # (-expected acceptance, depth, choice)
    heapq.heapify(frontier)
    chosen, tau = [], 1.0
    while frontier and len(chosen) < budget:
        neg, d, choice = heapq.heappop(frontier)
        chosen.append(list(choice))
        tau += -neg
        if d < K:
            for r in range(k):
                heapq.heappush(frontier, (neg * acc[d, r], d + 1, choice + (r,)))
    return Tree.from_choices(chosen, n_heads=K, top_k=k), tau


def proposer_tree(tree, heads, device, name):
    """The tree a heads proposer uses: `tree` when the caller gives one (a Tree or choices), else the one the
    heads store for this backend: `choices_cuda` on a GPU when stored (verifying N tokens costs about one step
    there), else `choices` (sized from the CPU's cost curve), else the chain of the K heads."""
    if tree is None:
        gpu = device == "cuda" and heads.choices_cuda
        tree = (heads.choices_cuda if gpu else heads.choices) or Tree.chain(heads.K)
    return as_tree(tree, heads.K, name, top_k=getattr(heads, "V", None))


def as_tree(tree, n_heads, name, top_k=None):
    """A Tree from a Tree or a choices list, refused (naming the decoder) if it is deeper than the n_heads that
    fill it or uses a rank >= top_k (the candidates a head has: its vocabulary)."""
    if not isinstance(tree, Tree):
        if isinstance(tree, np.ndarray):        # a choices array: its rows are the paths
            tree = tree.tolist()
        try:
            tree = Tree.from_choices(tree, n_heads=n_heads, top_k=top_k)
        except UserError as e:
            raise UserError(f"{name}: {e}") from None
    if tree.max_depth > n_heads:
        raise UserError(f"{name}: the tree is {tree.max_depth} deep, but there are only {n_heads} heads")
    if top_k is not None and tree.N > 1 and int(tree.rank.max()) >= top_k:
        raise UserError(f"{name}: the tree uses rank {int(tree.rank.max())}, but a head has only {top_k} candidates")
    return tree
