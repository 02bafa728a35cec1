"""The exact output law of speculative decoding on a tiny model: "lossless" as a computation, not a p-value
(docs/lossless.md; notebooks/07_lossless_exactly.ipynb).

The acceptance rules and a sampling drafter make every random decision through a Randomness
(minispec.speculative.sampling: bernoulli(p, total), categorical(weights)). `Replay` is a Randomness that
follows a script of outcomes; `exact_law(fn)` runs fn(rand) once per possible sequence of outcomes, weighting
each run by the product of its outcomes' probabilities. That is the law of the REAL code, not of a second copy
of its arithmetic: no decision can hide from it, and one that is biased shows up in the sums.

A tiny model is a function logits_of(prefix) -> [V] float64 logits (prefix: a tuple of token ids, the newest
last), e.g. a table filled at random. Then

    step_law(prefix, propose, make_rule, logits_of)   law of the tokens one verification step emits
    decoder_law(prefix, H, step)                      law of the first H generated tokens, over as many steps as
                                                      it takes (steps are memoised by prefix)
    autoregressive_law(prefix, H, probs_of)            the target's own law of the next H tokens
    autoregressive_step(probs_of)                      the target's own one-token step (to check one real step)
    tv(law_a, law_b)                                  total-variation distance

Drafters for tiny models, written as Draft & Verify's (sampled chain) and Medusa's (deterministic top-k tree)
are: sampled_chain, topk_tree. Shapes: V vocab, K draft length, N tree nodes.
"""
import numpy as np

from ..backend import to_host
from .sampling import target_probs
from .tree import Tree
from .verify import Draft


class Replay:
    """A Randomness that replays `script` (a list of outcomes) and, past its end, takes the first possible
    outcome of each new decision, noting a script for each other outcome in `pending`. `prob` is the
    probability of the outcomes taken so far.

    A Bernoulli is decided when its value is first read (bool()): chain_rejection_accept draws its K tests at
    once (one uniform each, as it always did) but reads them only up to the first rejection, and an outcome never
    read is never enumerated. The decisions are independent draws, so deciding them late changes no law; it
    turns 2^K replays into K + 1.
    """

    def __init__(self, script=()):
        self.script, self.n, self.prob, self.pending = list(script), 0, 1.0, []

    def _decide(self, options):                # options: [(outcome, probability > 0), ...]
        if self.n < len(self.script):
            outcome = self.script[self.n]
            prob = dict(options).get(outcome)
            if prob is None:
                raise RuntimeError("exact_law: a replay made a different decision with the same outcomes before it "
                                   "(the function must depend on nothing but its Randomness)")
        else:
            outcome, prob = options[0]
            self.pending += [self.script + [o] for o, _ in options[1:]]
            self.script.append(outcome)
        self.n += 1
        self.prob *= prob
        return outcome

    def bernoulli(self, p, total=1.0):
        """True with probability p / total, as GeneratorRandomness' u · total < p for u uniform on [0, 1); a
        truth value read with bool() (an `if` reads it) when it is not certain."""
        p, total = float(p), float(total)
        r = (1.0 if p > 0 else 0.0) if total <= 0 else min(1.0, max(0.0, p / total))
        options = [(o, pr) for o, pr in ((True, r), (False, 1.0 - r)) if pr > 0]
        return options[0][0] if len(options) == 1 else _Unread(self, options)

    def categorical(self, weights):
        """Index i with probability weights[i] / sum(weights); zero weights are never drawn."""
        w = np.asarray(to_host(weights), dtype=np.float64)                        # [V]
        total = float(w.sum())
        if not 0 < total < np.inf:
            raise ValueError(f"categorical: weights must have a positive finite sum, got {total}")
        return self._decide([(int(i), float(w[i]) / total) for i in np.flatnonzero(w > 0)])


class _Unread:
    """A Bernoulli outcome of a Replay, decided (and enumerated) when bool() first reads it."""
    __slots__ = ("replay", "options", "value")

    def __init__(self, replay, options):
        self.replay, self.options, self.value = replay, options, None

    def __bool__(self):
        if self.value is None:
            self.value = self.replay._decide(self.options)
        return self.value


def exact_cases(fn, key=lambda out: out):
    """[(output, probability)] of fn(rand) over every sequence of outcomes of its Randomness `rand`, outputs
    with the same key(output) merged (the first one kept). Replays fn once per sequence."""
    found, stack = {}, [[]]
    while stack:
        rand = Replay(stack.pop())
        out = fn(rand)
        k = key(out)
        if k in found:
            found[k][1] += rand.prob
        else:
            found[k] = [out, rand.prob]
        stack += rand.pending
    return [(out, p) for out, p in found.values()]


def exact_law(fn, key=lambda out: out):
    """{key(fn(rand)): probability} over every sequence of outcomes of the Randomness fn draws from."""
    return {key(out): p for out, p in exact_cases(fn, key)}


def tv(a, b):
    """Total-variation distance between two laws {outcome: probability}: half the L1 distance."""
    return 0.5 * sum(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in set(a) | set(b))


def _add(law, k, p):
    law[k] = law.get(k, 0.0) + p


# ---- the tiny model's laws ---------------------------------------------------------------------------------------
def autoregressive_law(prefix, H, probs_of):
    """{next H tokens: probability} when the target samples them one by one, probs_of(prefix) -> [V] its
    next-token distribution (e.g. lambda pre: target_probs(logits_of(pre), params))."""
    law = {(): 1.0}
    for _ in range(H):
        nxt = {}
        for seq, p in law.items():
            probs = np.asarray(to_host(probs_of(tuple(prefix) + seq)), dtype=np.float64)   # [V]
            for t in np.flatnonzero(probs > 0):
                _add(nxt, seq + (int(t),), p * float(probs[t]))
        law = nxt
    return law


def autoregressive_step(probs_of):
    """The target's own step for decoder_law: one token, {(t,): probs_of(prefix)[t]}. Mixed with a real step
    (the real one at the first prefix, this one after), the law of the first H tokens checks that one step
    exactly, at the cost of enumerating one step."""
    def step(prefix):
        probs = np.asarray(to_host(probs_of(tuple(prefix))), dtype=np.float64)    # [V]
        return {(int(t),): float(probs[t]) for t in np.flatnonzero(probs > 0)}
    return step


def node_logits(logits_of, prefix, draft):
    """[N, V]: what the verifier sees, row i = logits_of(prefix + the tokens on the path root -> node i, root
    excluded). prefix ends with the root (draft.tokens[0])."""
    tree, rows = draft.tree, []
    for i in range(tree.N):
        path, j = [], i
        while j > 0:
            path.append(int(draft.tokens[j]))
            j = int(tree.parents[j])
        rows.append(logits_of(tuple(prefix) + tuple(reversed(path))))
    return np.stack(rows)


def step_law(prefix, propose, make_rule, logits_of):
    """{tokens emitted by one verification step: probability} after `prefix` (its last token is the root).

    propose(prefix, rand) -> Draft (a drafter; its own randomness through rand); make_rule(rand) -> rule(draft,
    logits [N, V]) -> (path, bonus), e.g. lambda rand: make_rule(params, "block", rand). The drafter is replayed
    over its outcomes, then the rule over its own for each draft; the step emits the path's tokens, then the bonus
    (as minispec.speculative.verify.verify)."""
    law = {}
    for draft, pd in exact_cases(lambda rand: propose(prefix, rand), key=lambda d: tuple(int(t) for t in d.tokens)):
        logits = node_logits(logits_of, prefix, draft)                            # [N, V]
        for (path, bonus), pr in exact_law(lambda rand: make_rule(rand)(draft, logits),
                                           key=lambda out: (tuple(int(i) for i in out[0]), int(out[1]))).items():
            _add(law, tuple(int(draft.tokens[i]) for i in path[1:]) + (bonus,), pd * pr)
    return law


def memoised(step):
    """step(prefix) -> law, computed once per prefix."""
    memo = {}

    def cached(prefix):
        prefix = tuple(prefix)
        if prefix not in memo:
            memo[prefix] = step(prefix)
        return memo[prefix]
    return cached


def decoder_law(prefix, H, step):
    """{first H generated tokens: probability} of a decoder whose steps emit step(prefix) -> {tokens: prob},
    over as many steps as it takes (a step's tokens past H are cut, as generate's max_new_tokens does)."""
    memo = {}

    def law(pre, h):
        if h == 0:
            return {(): 1.0}
        if (pre, h) not in memo:
            out = {}
            for emitted, p in step(pre).items():
                e = emitted[:h]
                if len(e) == h:
                    _add(out, e, p)
                else:
                    for rest, p2 in law(pre + e, h - len(e)).items():
                        _add(out, e + rest, p * p2)
            memo[(pre, h)] = out
        return memo[(pre, h)]
    return law(tuple(prefix), H)


def expected_accepted(law):
    """E[draft tokens accepted] of a step law {emitted: prob} (the bonus not counted): tau - 1."""
    return sum(p * (len(e) - 1) for e, p in law.items())


# ---- drafters for a tiny draft model ----------------------------------------------------------------------------
def sampled_chain(logits_of, params, K):
    """A drafter like Draft & Verify's (minispec.decoders.draft_verify): K tokens, token j drawn with
    rand.categorical from the draft's processed distribution q_j = target_probs(logits_of(...), params) (the
    same temperature / top-k / top-p as the target), and those q handed to the verifier as Draft.q [K, V]."""
    chain, processed = Tree.chain(K), memoised(lambda at: target_probs(logits_of(at), params))

    def propose(prefix, rand):
        tokens, q = [int(prefix[-1])], []
        for _ in range(K):
            at = tuple(prefix) + tuple(tokens[1:])
            logits = logits_of(at)  # noqa: F841  [V] (the tests' bug variants read it)
            probs = processed(at)                                                 # [V] target_probs(logits, params)
            tokens.append(rand.categorical(probs))                                # the token is drawn from q ...
            q.append(probs)                                                       # ... and q goes to the verifier
        return Draft(chain, tokens, q=np.stack(q))                                 # q [K, V]
    return propose


def topk_tree(logits_of, tree):
    """A deterministic drafter like Medusa's: node i carries the rank[i]-th most probable token (ties: the
    smaller id) of the draft's logits after its parent's path. No randomness; Draft.q is None."""
    def propose(prefix, rand):
        tokens = [int(prefix[-1])]
        for i in range(1, tree.N):
            path, j = [], int(tree.parents[i])
            while j > 0:
                path.append(tokens[j])
                j = int(tree.parents[j])
            logits = logits_of(tuple(prefix) + tuple(reversed(path)))             # [V]
            tokens.append(int(np.argsort(-logits, kind="stable")[tree.rank[i]]))
        return Draft(tree, tokens)
    return propose
