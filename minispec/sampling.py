"""Sampling and the acceptance rules of speculative decoding (docs/design.md, "One verifier").

Reading order: the target distribution (temperature, top-k, top-p), drawing one token from it, then the four
acceptance rules a verifier can apply to a drafted chain or tree:

    rule                     drafts                      lossless?   source
    greedy_accept            tree (or chain)             exact       argmax match (Medusa §2.1.2, Stern et al. 2018)
    typical_accept           tree (or chain)             NO          Medusa §2.3.1 (arXiv 2401.10774)
    chain_rejection_accept   chain drawn from q          yes         Leviathan et al. 2023, Chen et al. 2023
    tree_rejection_accept    tree of top-k candidates    yes         recursive rejection sampling (SpecInfer, Sequoia)

All rules take the target distributions from `target_probs` on the verifier's logits, computed on the logits'
device; only token ids, a few probabilities, and accept/reject bits cross to the host. Randomness comes from a
host `numpy.random.Generator`, one uniform number per decision, so a NumPy and a CuPy run with the same seed make
the same decisions (up to the rare uniform that lands within float rounding of a CDF boundary).

Trees are duck-typed: the rules read `tree.children` (and `tree.retrieve`, `tree.parents` for typical
acceptance) of a minispec.tree.Tree; `Tree.chain(K)` is the chain case. Shapes: N tree nodes, V vocab, K draft.
"""
from dataclasses import dataclass

import numpy as np

from .backend import array_module, to_device, to_host
from .errors import UserError, check_int, check_real
from .layers import softmax


MIN_TEMPERATURE = 1e-6      # smaller: logits / T can overflow float32 (|logits| > 3e32); greedy is spelled 0


@dataclass(frozen=True)
class SamplingParams:
    """How the target distribution is shaped from logits. temperature 0 means greedy (argmax).

    top_k 0 means no top-k cut; top_p 1 means no nucleus cut. Applied in the order temperature, top-k, top-p,
    as Hugging Face's logits warpers and vLLM do (top-p measures mass after the top-k cut). At temperature 0
    the argmax is taken and top_k / top_p change nothing (they are still checked, with the same rules).
    Invalid values raise minispec.errors.UserError naming the parameter (`check_generation` adds seed and
    max_new_tokens: it is the one validator generate() and the command line share).
    """
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        check_real("temperature", self.temperature, low=0, what=" (0: greedy)")
        if 0 < self.temperature < MIN_TEMPERATURE:
            raise UserError(f"temperature must be 0 (greedy) or >= {MIN_TEMPERATURE:g}: a smaller one overflows "
                            f"logits / temperature in float32 (and samples the argmax anyway), got {self.temperature!r}")
        check_int("top_k", self.top_k, low=0, what=" (0: no top-k cut)")
        check_real("top_p", self.top_p, low=0, high=1, low_open=True, what=" (1: no nucleus cut)")

    @property
    def greedy(self):
        return self.temperature == 0


def check_generation(temperature=0.0, top_k=0, top_p=1.0, seed=0, max_new_tokens=64):
    """The one check of generate()'s sampling arguments (the command line calls it before loading anything):
    SamplingParams' rules, plus seed (None or an int >= 0, what numpy.random.default_rng accepts; None draws
    fresh entropy) and max_new_tokens (an int >= 0; a float or a bool is refused, not truncated).
    Returns the SamplingParams."""
    if seed is not None:
        check_int("seed", seed, low=0)
    check_int("max_new_tokens", max_new_tokens, low=0)
    return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)


# ---------------------------------------------------------------------------------------------------------
# The target distribution and one draw from it

def target_probs(logits, params):
    """logits [..., V] -> the distribution sampling draws from, [..., V], same namespace and dtype.

    temperature 0: the one-hot of the argmax (first index on ties), so that acceptance rules treat greedy
    decoding as sampling from a point mass. Otherwise softmax(logits / temperature), then
      top-k: keep the k largest logits (all tokens tied with the k-th are kept, as in Hugging Face's TopK warper);
      top-p: keep the smallest set of most probable tokens whose mass reaches top_p (nucleus sampling,
             Holtzman et al. 2020), i.e. token x stays iff the mass of the tokens ranked above it is < top_p;
             the top token always stays;
    and renormalise.
    """
    xp = array_module(logits)
    V = logits.shape[-1]
    dt = logits.dtype.type
    if params.temperature == 0:
        best = logits.argmax(axis=-1)[..., None]                                 # [..., 1]
        return (xp.arange(V) == best).astype(logits.dtype)                       # [..., V]
    z = logits / dt(params.temperature)                                          # [..., V]
    if 0 < params.top_k < V:
        kth = xp.sort(z, axis=-1)[..., V - params.top_k:V - params.top_k + 1]    # [..., 1] k-th largest
        z = xp.where(z >= kth, z, dt(-np.inf))
    p = softmax(z)                                                               # [..., V]
    if params.top_p < 1:
        ranked = xp.sort(p, axis=-1)[..., ::-1]                                  # [..., V] descending
        above = xp.cumsum(ranked, axis=-1) - ranked                              # mass ranked strictly above
        n_keep = (above < dt(params.top_p)).sum(axis=-1, keepdims=True)          # [..., 1], >= 1
        cutoff = xp.take_along_axis(ranked, n_keep - 1, axis=-1)                 # [..., 1] smallest kept prob
        p = xp.where(p >= cutoff, p, dt(0))
        p = p / p.sum(axis=-1, keepdims=True)
    return p


def sample(probs, rng):
    """One token id (python int) from probs [V] (any non-negative weights; normalised here).

    Inverse CDF on the device: u = 1 - rng.random() in (0, 1] from the host generator, token = the number of
    CDF entries below u · total. u > 0 means a zero-probability token is never returned. Exactly one uniform is
    drawn per call, so the same seed gives the same tokens on NumPy and CuPy.
    """
    cdf = array_module(probs).cumsum(probs)                                      # [V]
    total = float(cdf[-1])
    if not 0 < total < np.inf:
        raise ValueError(f"sample: probabilities must have a positive finite sum, got {total}")
    u = 1.0 - rng.random()
    # u · total <= total, and a python float compares in the array's dtype on NumPy 2 and CuPy alike
    return min(int((cdf < u * total).sum()), probs.shape[-1] - 1)


# ---------------------------------------------------------------------------------------------------------
# Acceptance rules

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
