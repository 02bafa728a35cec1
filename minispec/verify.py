"""The one verifier every speculative decoder shares (DESIGN.md, "Decoders: one verifier, pluggable proposers").

A draft is a tree of tokens (a chain is a tree; autoregressive decoding is the tree with only a root). Node 0,
the root, is the token chosen at the previous step and not yet in the cache. One forward runs all N nodes
against the committed cache under the tree's ancestor mask, with node i at position cache.pos + depth(i); the
acceptance rule walks the tree and returns the accepted root-to-node path and the bonus token (the target
model's own next token after that path); only the path's keys and values are committed. A rejected branch
therefore never touches the ring, also when the step crosses the ring's wrap.
"""
from dataclasses import dataclass


@dataclass
class Verified:
    path: list          # accepted node indices, root first
    bonus: int          # the target's token after the path (the next root)
    hidden: object      # [D] final hidden state at the last accepted node (the next proposal reads it)
    tokens: list        # tokens emitted this step: the accepted draft tokens after the root, then the bonus


def verify(model, cache, tree, tokens, accept, limit=None, eos_id=None):
    """Run the draft `tokens` [N] (tree node order, tokens[0] = root) and commit the accepted path.

    accept(tree, tokens, logits [N, V]) -> (path, bonus) is one of minispec.sampling's rules (bound to its
    parameters). The emitted tokens stop after `limit` tokens and after eos_id; only what precedes the last
    emitted token is committed (root included), so the cache always holds exactly the sequence minus its
    newest token, whether or not the step was cut short. Returns a Verified.
    """
    out = model.forward_block(tokens, cache, depths=tree.depths, parents_mask=tree.mask)
    path, bonus = accept(tree, tokens, out.logits)
    emitted = [int(tokens[i]) for i in path[1:]] + [int(bonus)]
    if eos_id is not None and eos_id in emitted:
        emitted = emitted[:emitted.index(eos_id) + 1]
    if limit is not None:
        emitted = emitted[:limit]
    path = list(path[:max(1, len(emitted))])     # emitted[i] follows path[i]: commit the nodes before the last
    cache.commit(path)
    return Verified(path=path, bonus=emitted[-1] if emitted else int(bonus), hidden=out.hidden[path[-1]],
                    tokens=emitted)
