"""Files, search and training data that stay plausible when wrong (issue 18 part 2): the zankner/Hydra export,
the skip-set cost fit, `--min-match`, and the Hydra training batches.

References: zankner/Hydra's grounded proposal re-enacted here from its code (hydra/model/utils.py
`generate_hydra_buffers`, hydra/model/hydra_heads/mlp_head.py `_grounded_proposal`); a fake model whose
sublayer costs are known, timed by a fake clock; labels laid out by hand.
"""
import itertools

import numpy as np
import pytest

from minispec.decoders.hydra_files import hydra_tree_problem, read_hydra, write_hydra
from minispec.errors import UserError
from minispec.speculative.tree import build_tree
from minispec.training import skip_objective
from minispec.training.skip_objective import fit_cost_model
from minispec.decoders.draft_verify import SkipSet
from minispec.training.skip_search import best
from minispec.training.train_hydra import HydraTrainConfig, make_batches
from test_hydra import random_heads, tiny_model
from test_hydra_files import shared_copy


# ---------------------------------------------------------------------------------------------------------
# The zankner/Hydra export: shared blocks, and the tree
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["mlp", "prefix-mlp"])
def test_writing_hydras_format_refuses_a_difference_in_any_tensor_of_any_shared_block(tmp_path, arch):
    """Hydra's blocks 2..L are ONE module ([ResBlock(D)] * (L - 1)): its linear weight and its bias (its
    residual connection is nn.Identity, nothing to compare). Heads whose blocks 2..L are equal are written;
    changing one entry of one weight or bias of any block 2..L of any head is refused, naming that head."""
    model = tiny_model()
    heads = shared_copy(random_heads(model, arch, num_heads=3, num_layers=4))
    write_hydra(heads, tmp_path / "ok")
    for i, key, l in itertools.product(range(3), ("ws", "bs"), range(3)):
        a = heads.heads[i][key]
        old = a[l].copy()
        a[l].flat[-1] += 1e-3
        with pytest.raises(UserError, match=rf"head {i}'s blocks 2\.\.4 have different weights"):
            write_hydra(heads, tmp_path / "bad")
        a[l] = old
    write_hydra(heads, tmp_path / "ok")                            # restored: accepted again


def hydra_drafted_paths(choices):
    """The rank path of the token zankner/Hydra puts at each node of `choices`, in its node order, by
    re-enacting its code: generate_hydra_buffers' children_per_head (children of each parent at a depth,
    parents sorted) and children_to_expand_per_head (children with children), then _grounded_proposal, where a
    parent's n children are torch.topk(n), i.e. ranks 0..n-1, and only the first `children_to_expand` go on."""
    nodes = {tuple(c) for c in choices}
    depth = max(len(c) for c in choices)
    parents = [sorted({p[:-1] for p in nodes if len(p) == d + 1}) for d in range(depth)]
    rows, drafted = [()], []                         # rows: the path each row of candidates_embeddings stands for
    for d in range(depth):
        n_children = [sum(1 for p in nodes if len(p) == d + 1 and p[:-1] == par) for par in parents[d]]
        expand = [sum(1 for r in range(n) if any(len(q) == d + 2 and q[:d + 1] == par + (r,) for q in nodes))
                  for par, n in zip(parents[d], n_children)]
        nxt = []
        if len(rows) < len(parents[d]):        # Hydra has fewer rows than the tree has parents here: other paths
            return None
        for row_idx, (n, e) in enumerate(zip(n_children, expand)):
            kids = [rows[row_idx] + (r,) for r in range(n)]             # the top-n tokens of this row
            drafted += kids
            nxt += kids[:e]
        rows = nxt or rows
    return drafted


def test_hydras_re_enacted_proposal_drafts_its_own_default_tree_and_not_a_tree_with_a_gap():
    """The re-enactment itself: a tree with sorted ranks is drafted as written; [[0], [1], [1, 0]] is not
    (Hydra extends the rank-0 child)."""
    good = [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0]]
    assert hydra_drafted_paths(good) == sorted(map(tuple, good), key=lambda p: (len(p), p))
    assert hydra_drafted_paths([[0], [1], [1, 0]]) == [(0,), (1,), (0, 0)]


def test_a_tree_from_unsorted_accuracies_is_refused_for_hydra_exactly_where_hydra_would_draft_another():
    """Budgets 1..64 from accuracies whose ranks are not sorted at every depth (as measured accuracies on few
    positions can be): the check refuses a tree iff Hydra's own proposal drafts other paths than the tree's;
    some budgets are refused and some are not. The same accuracies sorted by rank give trees Hydra drafts as
    written at every budget."""
    acc = np.array([[0.60, 0.15, 0.08, 0.05, 0.03], [0.30, 0.34, 0.10, 0.06, 0.02],
                    [0.40, 0.12, 0.15, 0.05, 0.05], [0.25, 0.20, 0.21, 0.04, 0.01]])
    refused = []
    for budget in range(1, 65):
        tree, _ = build_tree(acc, budget)
        choices = [list(p) for p in tree.choices[1:]]
        same = hydra_drafted_paths(choices) == list(tree.choices[1:])
        assert (hydra_tree_problem(choices) is None) == same, (budget, choices)
        refused += [budget] * (not same)
        ok, _ = build_tree(np.sort(acc, axis=1)[:, ::-1], budget)
        assert hydra_tree_problem([list(p) for p in ok.choices[1:]]) is None
        assert hydra_drafted_paths([list(p) for p in ok.choices[1:]]) == list(ok.choices[1:])
    assert 0 < len(refused) < 64, refused


def test_write_hydra_writes_a_tree_hydra_can_draft_and_refuses_one_it_cannot(tmp_path):
    import json
    model = tiny_model()
    heads = shared_copy(random_heads(model, num_heads=2, num_layers=1))
    heads.choices = [[0], [1], [0, 0], [0, 1]]
    write_hydra(heads, tmp_path / "ok")
    assert json.loads((tmp_path / "ok" / "config.json").read_text())["hydra_choices"] == heads.choices
    back = read_hydra(tmp_path / "ok", model)                              # and reading it back keeps the tree
    assert back.choices == heads.choices and back.choices_cuda is None
    heads.choices_cuda = [[0], [1], [1, 0]]
    with pytest.raises(UserError, match=r"hydra_choices_cuda.*node \[\] extends its children of ranks \[1\]"):
        write_hydra(heads, tmp_path / "bad")
    heads.choices_cuda = [[0], [0, 1]]
    with pytest.raises(UserError, match=r"node \[0\]'s children have ranks \[1\]"):
        write_hydra(heads, tmp_path / "bad")
    assert not (tmp_path / "bad" / "config.json").exists()


# ---------------------------------------------------------------------------------------------------------
# The skip-set cost fit: a fake model whose sublayers cost known times on a fake clock
# ---------------------------------------------------------------------------------------------------------
class Clock:
    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


class Costed:
    """A model stand-in: a one-token forward_block costs base + attn per attention run + mlp per MLP run, on
    `clock`, plus a little noise that only ever adds (as preemption does)."""

    def __init__(self, L, base, attn, mlp, clock):
        from types import SimpleNamespace
        self.config = SimpleNamespace(n_layers=L, vocab_size=7)
        self.base, self.attn, self.mlp, self.clock = base, attn, mlp, clock
        self.rng = np.random.default_rng(0)

    def new_cache(self):
        from types import SimpleNamespace
        return SimpleNamespace(discard=lambda: None)

    def forward(self, ids, cache):
        pass

    def forward_block(self, ids, cache, skip=None):
        from types import SimpleNamespace
        L = self.config.n_layers
        self.clock.now += (self.base + self.attn * (L - sum(skip.attn)) + self.mlp * (L - sum(skip.mlp))
                           + abs(self.rng.normal(0, 1e-3)))
        return SimpleNamespace(logits=np.zeros((1, 7)))


@pytest.mark.parametrize("attn,mlp", [(0.2, 0.7), (0.9, 0.1)])
def test_the_cost_fit_recovers_each_sublayers_known_cost_and_prices_a_skip_set_with_it(monkeypatch, attn, mlp):
    clock = Clock()
    monkeypatch.setattr(skip_objective, "time", clock)
    L, base = 6, 1.5
    cm = fit_cost_model(Costed(L, base, attn, mlp, clock), reps=20, flat=True)
    assert abs(cm.base - base) < 1e-2 and abs(cm.attn - attn) < 1e-2 and abs(cm.mlp - mlp) < 1e-2
    skip = SkipSet.from_lists(L, attn=[1, 2, 3], mlp=[4])                 # 3 attentions and one MLP skipped
    by_hand = (base + attn * (L - 3) + mlp * (L - 1)) / (base + L * (attn + mlp))
    assert abs(cm.draft(skip) - by_hand) < 1e-2


# ---------------------------------------------------------------------------------------------------------
# --min-match
# ---------------------------------------------------------------------------------------------------------
def test_min_match_keeps_a_set_that_meets_it_exactly_and_drops_one_just_under():
    evs = [{"code": "a", "value": 1.1, "match": 0.95}, {"code": "b", "value": 1.3, "match": 0.9},
           {"code": "c", "value": 1.5, "match": 0.8999}, {"code": "d", "value": 1.6, "match": 0.99, "duplicate": True}]
    assert best(evs)["code"] == "c"
    assert best(evs, min_match=0.9)["code"] == "b"                        # 0.9 >= 0.9
    assert best(evs, min_match=0.95)["code"] == "a"
    with pytest.raises(UserError, match=r"match rate >= 0\.96"):
        best(evs, min_match=0.96)


# ---------------------------------------------------------------------------------------------------------
# Hydra training batches
# ---------------------------------------------------------------------------------------------------------
def test_hydra_batches_cover_every_position_with_a_label_for_any_head_once_per_epoch():
    """Two sequences of 6 and 5 tokens, labels from position 1 on, K = 3 heads: head i has a label at t iff
    t + i + 2 < len. A position near a sequence's end where only head 0 (or heads 0 and 1) has a label is still
    a training row; a position with no label for any head is not."""
    K, seqs = 3, [(0, 6), (6, 5)]
    labels = -np.ones((K, 11), np.int64)
    for s, n in seqs:
        for t in range(1, n):
            for i in range(K):
                if t + i + 2 < n:
                    labels[i, s + t] = 1
    want = [1, 2, 3, 7, 8]                                               # by hand: t + 2 < n, t >= 1
    assert sorted(np.flatnonzero((labels >= 0).any(axis=0))) == want
    partial = [r for r in want if not (labels[:, r] >= 0).all()]
    assert partial == [2, 3, 7, 8]
    rng = np.random.default_rng(0)
    for batch in (2, 3, 64):
        cfg = HydraTrainConfig(batch=batch)
        batches = make_batches(labels, seqs, cfg, rng, by_sequence=False)
        rows = np.concatenate(batches)
        assert sorted(rows.tolist()) == want and all(len(b) <= batch for b in batches)


@pytest.mark.parametrize("kind", ["hydra", "hydra++"])
def test_shipped_trees_suit_hydra_and_trees_from_measured_accuracies_are_refused_where_they_do_not(kind):
    """The shipped Hydra heads' measured accuracies are not sorted by rank at every depth: the trees build_tree
    makes from them at budgets 1..64 are refused exactly where Hydra's re-enacted proposal drafts other paths.
    The trees stored with the shipped heads are ones Hydra drafts as written."""
    import json
    from conftest import SHIPPED
    cfg = json.loads((SHIPPED / kind / "hydra_config.json").read_text())
    for key in ("tree", "tree_cuda"):
        if cfg.get(key):
            assert hydra_tree_problem(cfg[key]) is None
            assert hydra_drafted_paths(cfg[key]) == sorted(map(tuple, cfg[key]), key=lambda p: (len(p), p))
    for budget in range(1, 65):
        tree, _ = build_tree(cfg["accuracies"], budget)
        choices = [list(p) for p in tree.choices[1:]]
        assert (hydra_tree_problem(choices) is None) == (hydra_drafted_paths(choices) == list(tree.choices[1:]))
