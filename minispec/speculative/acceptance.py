"""The acceptance rules of speculative decoding (docs/design.md, "One verifier"): which drafted tokens to keep.

    rule                     drafts                      lossless?   source
    greedy_accept            tree (or chain)             exact       argmax match (Medusa §2.1.2, Stern et al. 2018)
    typical_accept           tree (or chain)             NO          Medusa §2.3.1 (arXiv 2401.10774)
    chain_rejection_accept   chain drawn from q          yes         Leviathan et al. 2023, Chen et al. 2023
    tree_rejection_accept    tree of top-k candidates    yes         recursive rejection sampling (SpecInfer, Sequoia)

All rules take the target distributions from `target_probs` on the verifier's logits; only token ids, a few
probabilities, and accept/reject bits cross to the host. `make_rule` binds one of them to the sampling parameters
for the verifier (minispec.speculative.verify).

Trees are duck-typed: the rules read `tree.children` (and `tree.retrieve`, `tree.parents` for typical
acceptance) of a minispec.speculative.tree.Tree; `Tree.chain(K)` is the chain case. Shapes: N tree nodes,
V vocab, K draft.
"""
import numpy as np

from ..backend import array_module, to_device, to_host
from ..errors import UserError
from .sampling import sample, target_probs



def greedy_accept(tree, tokens, logits):
    """Greedy verification (exact: the output equals greedy decoding of the target model).

    tokens [N] host ints of the tree's nodes (node 0 = root, already chosen), logits [N, V] the verifier's logits
    at every node. Walk from the root: at node u the target token is argmax(logits[u]); move to the child of u
    carrying it, if any, else stop. Returns (path, bonus): the node indices walked, root included, and the argmax
    at the last of them (the token the target model adds itself). Medusa §2.1.2 / Stern et al. 2018 blockwise
    parallel decoding.
    """
    best = to_host(logits.argmax(axis=-1))                                       # [N] host
    path = [0]
    while True:
        u = path[-1]
        nxt = next((c for c in tree.children[u] if int(tokens[c]) == int(best[u])), None)
        if nxt is None:
            return path, int(best[u])
        path.append(nxt)


def typical_accept(tree, tokens, logits, params, epsilon=0.09, alpha=0.3, rng=None):
    """Medusa's typical acceptance (arXiv 2401.10774 §2.3.1; FasterDecoding/Medusa `evaluate_posterior`). LOSSY.

    p = target_probs(logits, params) at every node [N, V]. Node c with parent u is accepted iff
        p_u(tokens[c]) > min(epsilon, alpha · exp(-H(p_u))),    H the entropy (0 log 0 = 0)
    (Medusa computes H with log(p + 1e-5); epsilon = their posterior_threshold, alpha = their posterior_alpha).
    Among the root-to-leaf paths (tree.retrieve) take the longest accepted prefix; ties go to the first path
    (Medusa breaks ties by the prefix's likelihood). The bonus token is sampled from p at the last accepted node
    with `rng` (argmax at temperature 0, where this rule is greedy_accept). Returns (path, bonus).

    NOT lossless: a plausible-enough candidate is accepted with probability 1, so the output does not follow the
    target distribution (tests/test_sampling.py measures the deviation). It trades exactness for acceptance.
    """
    xp = array_module(logits)
    p = target_probs(logits, params)                                             # [N, V]
    plogp = p * xp.log(xp.where(p > 0, p, p.dtype.type(1)))
    threshold = xp.minimum(p.dtype.type(epsilon), p.dtype.type(alpha) * xp.exp(plogp.sum(axis=-1)))   # [N]
    N = len(tokens)
    accepted = np.zeros(N, dtype=bool)                                           # [N] host; root: True
    accepted[0] = True
    if N > 1:
        par = to_device(xp, np.asarray(tree.parents[1:], dtype=np.int64))        # [N-1]
        tok = to_device(xp, np.asarray(tokens[1:], dtype=np.int64))              # [N-1]
        accepted[1:] = to_host(p[par, tok] > threshold[par])
    best = [0]
    for row in tree.retrieve:                                                    # [D+1] root ... leaf, -1 padded
        n = 1
        while n < len(row) and row[n] >= 0 and accepted[row[n]]:
            n += 1
        if n > len(best):
            best = [int(i) for i in row[:n]]
    last = best[-1]
    if params.temperature == 0:
        return best, int(to_host(p[last].argmax()))
    if rng is None:
        raise ValueError("typical_accept: temperature > 0 needs rng (a numpy Generator) to sample the bonus token")
    return best, sample(p[last], rng)


def chain_rejection_accept(draft_tokens, draft_probs, target, rng):
    """Speculative sampling of a chain (Leviathan et al. 2023, arXiv 2211.17192 / Chen et al. 2023,
    arXiv 2302.01318). Lossless: the emitted tokens follow the target distribution exactly.

    draft_tokens [K] host ints, drawn one by one from draft_probs [K, V]; target [K + 1, V] the target's
    distributions after the prefix and after each draft token. Draft x_i is accepted with probability
    min(1, p_i(x_i) / q_i(x_i)); at the first rejection the next token is drawn from norm(max(0, p_i - q_i));
    if all K are accepted the bonus is drawn from target[K]. Returns (n_accepted, next_token): the step emits
    draft_tokens[:n_accepted] + [next_token]. Draws K + 1 uniforms from rng, whatever happens.
    """
    K = len(draft_tokens)
    if K == 0:
        return 0, sample(target[0], rng)
    xp = array_module(target)
    rows = xp.arange(K)
    x = to_device(xp, np.asarray(draft_tokens, dtype=np.int64))                 # [K]
    p = to_host(target[rows, x]).astype(np.float64)                              # [K] p_i(x_i)
    q = to_host(draft_probs[rows, x]).astype(np.float64)                         # [K] q_i(x_i)
    u = rng.random(K)
    for i in range(K):
        if not u[i] * q[i] < p[i]:                                               # reject: u >= p / q
            residual = xp.maximum(target[i] - draft_probs[i].astype(target.dtype), target.dtype.type(0))   # [V]
            # p_i(x_i) < q_i(x_i) leaves positive residual mass; the fallback only guards float rounding
            return i, sample(residual if float(residual.sum()) > 0 else target[i], rng)
    return K, sample(target[K], rng)


def tree_rejection_accept(tree, tokens, target, rng):
    """Recursive rejection sampling over a tree of deterministic top-k candidates. Lossless.

    tokens [N] host ints (node 0 = root), target [N, V] the target distribution at every node. Each child is a
    point-mass draft, so multi-draft speculative sampling (SpecInfer, Miao et al. 2023, arXiv 2305.09781;
    Sequoia, Chen et al. 2024, arXiv 2402.12374) reduces to: at node u with children c_1..c_m in rank
    order, residual r = target[u];
        for each child c: accept with probability r(x_c) / sum(r); if accepted, move to c and start over with
                          r = target[c]; if rejected, set r(x_c) = 0;
        if every child is rejected (or u is a leaf), the bonus token is drawn from r / sum(r).
    This is sampling x ~ target[u] one candidate at a time, so the emitted tokens follow the target exactly.
    Two children carrying the same token are fine: after the first is rejected its residual mass is 0, and
    the copy is accepted with probability 0 (no uniform is drawn for it). Greedy (one-hot targets) becomes
    greedy_accept. No public Medusa or Hydra implementation that we found has this rule: they verify trees
    greedily or with typical acceptance. Returns (path, bonus).
    """
    xp = array_module(target)
    path = [0]
    while True:
        u = path[-1]
        row = target[u]                                                          # [V]
        kids = tree.children[u]
        if not kids:
            return path, sample(row, rng)
        kid_tok = [int(tokens[c]) for c in kids]
        distinct = list(dict.fromkeys(kid_tok))
        idx = to_device(xp, np.asarray(distinct, dtype=np.int64))                # [m']
        mass = dict(zip(distinct, to_host(row[idx]).astype(np.float64).tolist()))
        residual = row.copy()                                                    # [V] target with the children removed
        residual[idx] = row.dtype.type(0)
        rest = float(residual.sum())                                             # mass outside the children
        for c, x in zip(kids, kid_tok):
            if mass[x] <= 0:
                continue
            if rng.random() * (rest + sum(mass.values())) < mass[x]:
                path.append(c)
                break
            mass[x] = 0.0
        else:
            # rest == 0 means the last child was accepted with probability 1; the fallback guards rounding only
            return path, sample(residual if rest > 0 else row, rng)


def rejection_accept(draft, target, rng):
    """Lossless rejection sampling of a draft against the target distributions target [N, V]: chain rejection
    sampling with the draft's own q when the draft was sampled (draft.q is set; the tree must be a chain),
    recursive rejection sampling of point-mass candidates otherwise. Returns (path, bonus)."""
    if draft.q is None:
        return tree_rejection_accept(draft.tree, draft.tokens, target, rng)
    K = draft.tree.N - 1
    if draft.tree.max_depth != K:
        raise ValueError("a draft with q (sampled tokens) must be a chain")
    n, bonus = chain_rejection_accept(draft.tokens[1:], draft.q, target, rng)
    return list(range(n + 1)), bonus        # a chain's nodes are 0..K in order


def make_rule(params, acceptance, rng):
    """The acceptance rule, rule(draft, logits [N, V]) -> (path, bonus): greedy for temperature 0, lossless
    rejection sampling otherwise ("typical" on request: Medusa's lossy rule)."""
    if acceptance is None:
        acceptance = "greedy" if params.greedy else "rejection"
    if acceptance == "greedy":
        if not params.greedy:
            raise UserError("acceptance='greedy' needs temperature=0")
        return lambda draft, logits: greedy_accept(draft.tree, draft.tokens, logits)
    if acceptance == "rejection":
        return lambda draft, logits: rejection_accept(draft, target_probs(logits, params), rng)
    if acceptance == "typical":
        return lambda draft, logits: typical_accept(draft.tree, draft.tokens, logits, params, rng=rng)
    raise UserError(f"acceptance must be 'greedy', 'rejection' or 'typical', not {acceptance!r}")
