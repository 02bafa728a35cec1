"""Dynamic trees are lossless, exactly: the trees the real DynamicTrees grower (minispec.speculative.dynamic_tree,
EAGLE-2's path-probability growth and rerank) builds from a tiny draft table, verified by the real acceptance
rules, emit the target's own law of the first H tokens (total-variation distance <= 1e-12), whatever the node
budget, depth, width, and temperature / top-k / top-p. The candidates are a deterministic function of the context,
so recursive rejection sampling of point masses applies (docs/lossless.md); this checks it on the code that grows
them, not on a fixed tree."""
import numpy as np
import pytest

from minispec.speculative.acceptance import make_rule
from minispec.speculative.dynamic_tree_sizing import DynamicTrees
from minispec.speculative.exact_law import autoregressive_law, decoder_law, memoised, step_law, tv
from minispec.speculative.sampling import SamplingParams
from minispec.speculative.verify import Draft
from test_dynamic_tree import table_expand
from test_exact_law import EXACT, oracle_probs, table

N_CASES = 120


def softmax(z):
    e = np.exp(z - np.max(z))
    return e / e.sum()


def dynamic_drafter(draft_logits, max_nodes, max_depth, top_k, width):
    """propose(prefix, rand) -> Draft: DynamicTrees.grow with expand() reading the draft table after each row's path
    (as Hydra's heads read the path; the draft is deterministic, so rand is never used)."""
    grower = DynamicTrees("test", n_heads=max_depth, max_nodes=max_nodes, max_depth=max_depth, top_k=top_k,
                          width=width)

    def propose(prefix, rand):
        expand = table_expand(lambda path: softmax(draft_logits(tuple(prefix) + path)))   # q(path) [V]
        tree, tokens = grower.grow(int(prefix[-1]), expand)
        return Draft(tree, [int(t) for t in tokens])
    return propose


def case(i):
    r = np.random.default_rng(1000 + i)
    V = int(r.integers(2, 6))
    params = [SamplingParams(0.0), SamplingParams(1.0), SamplingParams(0.7, top_k=int(r.integers(1, V + 1))),
              SamplingParams(1.3, top_p=float(r.uniform(0.5, 0.95)))][i % 4]
    max_depth = int(r.integers(1, 4))
    max_nodes = int(r.integers(1, 7))
    top_k = int(r.integers(1, V + 1))
    width = [None, 1, 2][i % 3]
    target = table(V, seed=2 * i, sparse=0.2 if i % 5 == 0 else 0.0)
    draft = table(V, seed=2 * i + 1)
    return V, params, (max_nodes, max_depth, top_k, width), target, draft, r


@pytest.mark.parametrize("i", range(N_CASES))
def test_dynamic_trees_verified_by_the_real_rules_emit_the_targets_exact_law(i):
    V, params, opts, target, draft, r = case(i)
    prefix = tuple(int(t) for t in r.integers(0, V, size=int(r.integers(1, 3))))
    H = 3
    propose = dynamic_drafter(draft, *opts)
    step = memoised(lambda pre: step_law(pre, propose, lambda rand: make_rule(params, None, rand), target))
    got = decoder_law(prefix, H, step)
    want = autoregressive_law(prefix, H, lambda pre: oracle_probs(target(pre), params))
    assert tv(got, want) <= EXACT, (i, V, params, opts, tv(got, want))


def test_the_grown_trees_really_branch_and_reach_their_depth_on_the_grid():
    """The grid is not vacuous: some grown trees have several nodes at a depth, and some reach depth 3."""
    shapes = []
    for i in range(N_CASES):
        V, params, opts, target, draft, r = case(i)
        prefix = tuple(int(t) for t in r.integers(0, V, size=int(r.integers(1, 3))))
        d = dynamic_drafter(draft, *opts)(prefix, None)
        shapes.append((d.tree.N, d.tree.max_depth, max(np.bincount(d.tree.depths))))
    assert any(depth == 3 for _, depth, _ in shapes)
    assert any(width > 1 for _, _, width in shapes) and sum(n > 2 for n, _, _ in shapes) > N_CASES // 3
