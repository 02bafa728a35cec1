"""The one verifier every speculative decoder shares (docs/design.md, "One verifier").

A draft is a tree of tokens (a chain is a tree; autoregressive decoding is the tree with only a root). Node 0,
the root, is the token chosen at the previous step and not yet in the cache. One forward runs all N nodes
against the committed cache under the tree's ancestor mask, with node i at position cache.pos + depth(i); the
acceptance rule walks the tree and returns the accepted root-to-node path and the bonus token (the target
model's own next token after that path); only the path's keys and values are committed. A rejected branch
therefore never touches the ring, also when the step crosses the ring's wrap.
"""
from dataclasses import dataclass

import numpy as np

from ..backend import to_device
from ..errors import UserError
from .tree import Tree


@dataclass
class Draft:
    """What a proposer hands the verifier.

    tree: a minispec.speculative.tree.Tree (a chain is a tree; the root-only tree is plain decoding);
    tokens [N]: host ints in tree node order, tokens[0] = the root (already chosen, not yet in the cache);
    q [N - 1, V] or None: for a draft SAMPLED from a distribution (Draft & Verify's chain), row i is the draft's
    distribution that tokens[i + 1] was drawn from; chain rejection sampling needs it. None for deterministic
    candidates (Medusa's and Hydra's top-k), which tree rejection sampling treats as point-mass drafts.
    """
    tree: object
    tokens: list
    q: object = None


@dataclass
class Verified:
    path: list          # accepted node indices, root first
    bonus: int          # the target's token after the path (the next root)
    hidden: object      # [D] final hidden state at the last accepted node (the next proposal reads it)
    tokens: list        # tokens emitted this step: the accepted draft tokens after the root, then the bonus
    path_hidden: object = None   # [len(path), D] final hidden states of the committed path's nodes, root first
    drafted: int = 0    # draft tokens proposed this step (tree nodes after the root)


def count(stats, name, n=1):
    """stats.counters[name] += n: a proposer's bookkeeping (head calls, draft forwards), shown by bench."""
    stats.counters[name] = stats.counters.get(name, 0) + n


def cut_draft(draft, room):
    """The draft cut to its first `room` nodes (root included), for the end of a cache without a sliding window.

    A verify forward of N nodes needs N free positions there (the cache refuses a block past its end), but a
    request accepted up front may reach the cache's last position mid-step. Node order is (depth, path), so the
    first `room` nodes are a tree: every kept node's parent is kept, and no node sits deeper than room - 1, i.e.
    past the cache's end. A chain keeps its first room - 1 drafted tokens and their q rows. The draft itself when
    it fits (room >= N): nothing changes away from the end of the cache."""
    tree = draft.tree
    if room >= tree.N:
        return draft
    if room < 1:
        raise UserError(f"cut_draft: no room for the root ({room} positions left)")
    cut = Tree.from_choices([list(p) for p in tree.choices[1:room]])
    q = None if draft.q is None else draft.q[:room - 1]                          # [room - 1, V]
    return Draft(cut, list(draft.tokens[:room]), q=q)


def verify(model, cache, draft, accept, limit=None, eos_id=None):
    """Run the draft (a Draft: tree, tokens [N] in tree node order, tokens[0] = root) and commit the accepted path.

    accept(draft, logits [N, V]) -> (path, bonus) is one of minispec.speculative.acceptance's rules bound to its
    parameters (minispec.speculative.acceptance.make_rule). The emitted tokens stop after `limit` tokens and after
    eos_id; only what precedes the last emitted token is committed (root included), so the cache always holds
    exactly the sequence minus its newest token, whether or not the step was cut short. Returns a Verified.
    """
    tree, tokens = draft.tree, draft.tokens
    out = model.forward_block(tokens, cache, depths=tree.depths, parents_mask=tree.mask)
    path, bonus = accept(draft, out.logits)
    emitted = [int(tokens[i]) for i in path[1:]] + [int(bonus)]
    if eos_id is not None and eos_id in emitted:
        emitted = emitted[:emitted.index(eos_id) + 1]
    if limit is not None:
        emitted = emitted[:limit]
    path = list(path[:max(1, len(emitted))])     # emitted[i] follows path[i]: commit the nodes before the last
    cache.commit(path)
    return Verified(path=path, bonus=emitted[-1] if emitted else int(bonus), hidden=out.hidden[path[-1]],
                    tokens=emitted, path_hidden=out.hidden[to_device(model.xp, np.asarray(path, dtype=np.int64))],
                    drafted=tree.N - 1)
