"""The acceptance rules of speculative decoding (docs/design.md, "One verifier"): which drafted tokens to keep.

    rule                     drafts                      lossless?   source
    greedy_accept            tree (or chain)             exact       argmax match (Medusa §2.1.2, Stern et al. 2018)
    typical_accept           tree (or chain)             NO          Medusa §2.3.1 (arXiv 2401.10774)
    chain_rejection_accept   chain drawn from q          yes         Leviathan et al. 2023, Chen et al. 2023
    block_accept             chain drawn from q          yes         block verification (Sun et al. 2025, Algorithm 2)
    tree_rejection_accept    tree of top-k candidates    yes         recursive rejection sampling (SpecInfer, Sequoia)

All rules take the target distributions from `target_probs` on the verifier's logits; only token ids, a few
probabilities, and accept/reject bits cross to the host. `make_rule` binds one of them to the sampling parameters
for the verifier (minispec.speculative.verify).

Every random decision goes through a Randomness (minispec.speculative.sampling: bernoulli(p, total) and
categorical(weights)); an `rng` argument is a numpy Generator or a Randomness. minispec.speculative.exact_law
replays these very functions once per sequence of outcomes to compute their exact output law (docs/lossless.md).

Trees are duck-typed: the rules read `tree.children` (and `tree.retrieve`, `tree.parents` for typical
acceptance) of a minispec.speculative.tree.Tree; `Tree.chain(K)` is the chain case. Shapes: N tree nodes,
V vocab, K draft.
"""
import numpy as np

from ..backend import array_module, to_device, to_host
from ..errors import UserError
from .sampling import randomness, target_probs



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
    return best, randomness(rng).categorical(p[last])


def chain_rows(draft_tokens, target):
    """(xp, rows [K], x [K]) of a drafted chain on the target's device: row i of the chain carries token x_i."""
    xp = array_module(target)
    return xp, xp.arange(len(draft_tokens)), to_device(xp, np.asarray(draft_tokens, dtype=np.int64))


def chain_rejection_accept(draft_tokens, draft_probs, target, rng):
    """Speculative sampling of a chain (Leviathan et al. 2023, arXiv 2211.17192 / Chen et al. 2023,
    arXiv 2302.01318). Lossless: the emitted tokens follow the target distribution exactly.

    draft_tokens [K] host ints, drawn one by one from draft_probs [K, V]; target [K + 1, V] the target's
    distributions after the prefix and after each draft token. Draft x_i is accepted with probability
    min(1, p_i(x_i) / q_i(x_i)); at the first rejection the next token is drawn from norm(max(0, p_i - q_i));
    if all K are accepted the bonus is drawn from target[K]. Returns (n_accepted, next_token): the step emits
    draft_tokens[:n_accepted] + [next_token]. Makes K + 1 random decisions (K uniforms, then one), whatever happens.
    """
    rand = randomness(rng)
    K = len(draft_tokens)
    if K == 0:
        return 0, rand.categorical(target[0])
    xp, rows, x = chain_rows(draft_tokens, target)                               # [K], [K] on the device
    p = to_host(target[rows, x]).astype(np.float64)                              # [K] p_i(x_i)
    q = to_host(draft_probs[rows, x]).astype(np.float64)                         # [K] q_i(x_i)
    accept = [rand.bernoulli(p[i], q[i]) for i in range(K)]                     # [K] u_i · q_i < p_i
    for i in range(K):
        if not accept[i]:
            residual = xp.maximum(target[i] - draft_probs[i].astype(target.dtype), target.dtype.type(0))   # [V]
            # p_i(x_i) < q_i(x_i) leaves positive residual mass; the fallback only guards float rounding
            return i, rand.categorical(residual if float(residual.sum()) > 0 else target[i])
    return K, rand.categorical(target[K])


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
    rand = randomness(rng)
    path = [0]
    while True:
        u = path[-1]
        row = target[u]                                                          # [V]
        kids = tree.children[u]
        if not kids:
            return path, rand.categorical(row)
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
            if rand.bernoulli(mass[x], rest + sum(mass.values())):              # r(x) / sum(r)
                path.append(c)
                break
            mass[x] = 0.0
        else:
            # rest == 0 means the last child was accepted with probability 1; the fallback guards rounding only
            return path, rand.categorical(residual if rest > 0 else row)


def block_weights(p_x, q_x):
    """Block verification's weights (Sun et al. 2025, arXiv 2403.10444, Algorithm 2: the paper's p_i):

        w_0 = 1,   w_i = min(1, w_{i-1} · p(x_i | x_<i) / q(x_i | x_<i))      i = 1..K

    p_x [K], q_x [K]: target and draft probability of each draft token (host). w_i is the target-to-draft
    likelihood ratio of the block x_1..x_i, capped at 1 after every token: a surplus p/q > 1 of a later token
    makes up for an earlier deficit, never more. (q = 0 cannot have been drawn: guarded only.) Returns w [K + 1]."""
    w = np.ones(len(p_x) + 1)
    for i, (p, q) in enumerate(zip(p_x, q_x)):
        w[i + 1] = min(1.0, w[i] * float(p) / float(q)) if q > 0 else 1.0
    return w


def block_stop_probs(w, m):
    """The probability h_i of keeping the first i draft tokens in block verification's scan from the end
    (Sun et al. 2025, arXiv 2403.10444, Algorithm 2):

        h_i = m_i / (m_i + 1 - w_i)   1 <= i < K,       h_K = w_K,
        m_i = sum_x max(0, w_i · p(x | x_<=i) - q(x | x_<=i))   (the residual mass after i tokens)

    w [K + 1] from block_weights, m [K] (host). A 0/0 (w_i = 1 and an empty residual: the draft covers the
    target exactly there) is 1. Returns h [K + 1]; h_0 = 0 (it is never drawn: the block keeps 0 tokens when
    every h_i fails)."""
    K = len(m)
    h = np.zeros(K + 1)
    for i in range(1, K):
        den = m[i] + (1.0 - w[i])
        h[i] = m[i] / den if den > 0 else 1.0
    h[K] = w[K]
    return h


def block_accept(draft_tokens, draft_probs, target, rng):
    """Block verification of a chain (Sun et al., "Block Verification Accelerates Speculative Decoding", ICLR 2025,
    arXiv 2403.10444, Algorithm 2). Lossless, and in expectation over the drafts never fewer accepted tokens than
    chain_rejection_accept (the paper proves it optimal among lossless verifiers); on one draft it may keep fewer.

    draft_tokens [K] host ints drawn one by one from draft_probs [K, V]; target [K + 1, V] as for
    chain_rejection_accept. Weights w = block_weights, keep-probabilities h = block_stop_probs; the kept length
    tau is the LARGEST i with a success of an independent Bernoulli(h_i) (0 if none), found by drawing from i = K
    down and stopping at the first success (the same law as drawing all K, one uniform each). The next token
    is drawn from target[K] if tau = K, else from the weighted residual norm(max(0, w_tau · target[tau] -
    draft_probs[tau])). Token-level verification judges x_i on its own; here a poor token can be rescued by good
    ones after it (w carries the surplus p/q > 1 forward, up to 1). Returns (n_accepted, next_token).
    """
    rand = randomness(rng)
    K = len(draft_tokens)
    if K == 0:
        return 0, rand.categorical(target[0])
    xp, rows, x = chain_rows(draft_tokens, target)                               # [K], [K] on the device
    q = draft_probs.astype(target.dtype)                                        # [K, V]
    w = block_weights(to_host(target[rows, x]).astype(np.float64), to_host(q[rows, x]).astype(np.float64))  # [K+1]
    residual = xp.maximum(to_device(xp, w[:K].astype(target.dtype))[:, None] * target[:K] - q,
                          target.dtype.type(0))                                  # [K, V]
    m = to_host(residual.sum(axis=-1)).astype(np.float64)                       # [K] residual masses
    h = block_stop_probs(w, m)                                                   # [K + 1]
    tau = next((i for i in range(K, 0, -1) if rand.bernoulli(h[i])), 0)
    if tau == K:
        return K, rand.categorical(target[K])
    # tau < K is drawn only with a non-empty residual; the fallback guards float rounding only
    return tau, rand.categorical(residual[tau] if m[tau] > 0 else target[tau])


def chain_of(draft, acceptance):
    """(K, q [K, V]) of a chain draft for a chain-only rule: draft.q when it was sampled, else point masses at its
    tokens (a deterministic chain is a draft drawn from one-hot distributions). A branching tree is refused."""
    K = draft.tree.N - 1
    if draft.tree.max_depth != K:
        raise UserError(f"acceptance={acceptance!r} verifies chains, but this draft is a tree of {K} nodes "
                        f"{draft.tree.max_depth} deep (give the decoder tree=Tree.chain(K), or use "
                        f"acceptance='rejection')")
    return K, draft.q


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


def block_verify(draft, target, rng):
    """Block verification (block_accept) of a chain draft against target [N, V]: with its q when sampled, with
    point masses at its tokens when deterministic. Returns (path, bonus)."""
    K, q = chain_of(draft, "block")
    if q is None:
        xp = array_module(target)
        q = xp.zeros((K, target.shape[-1]), dtype=target.dtype)                  # [K, V] one-hot rows
        q[xp.arange(K), to_device(xp, np.asarray(draft.tokens[1:], dtype=np.int64))] = 1
    n, bonus = block_accept(draft.tokens[1:], q, target, rng)
    return list(range(n + 1)), bonus


def make_rule(params, acceptance, rng):
    """The acceptance rule, rule(draft, logits [N, V]) -> (path, bonus): greedy for temperature 0, lossless
    rejection sampling otherwise ("typical" on request: Medusa's lossy rule; "block": block verification of a
    chain, lossless). rng: a numpy Generator or a Randomness."""
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
    if acceptance == "block":
        return lambda draft, logits: block_verify(draft, target_probs(logits, params), rng)
    raise UserError(f"acceptance must be 'greedy', 'rejection', 'typical' or 'block', not {acceptance!r}")
