"""How long a chain draft should be this step: the cost rule (issue 17; the idea of Sequoia's hardware-aware
sizing, Chen et al., arXiv 2402.12374, §3.2, applied to a chain).

A chain of K draft tokens, each accepted (given that all before it were) with probability a_d at depth d, emits
on average

    E(K) = 1 + sum_{d=1..K} prod_{j=1..d} a_j          tokens per step (the bonus token always comes)

and costs c(K + 1) + K r + p units of time (one unit = one plain decoding step): c(T) the verify cost curve of
this backend (minispec.speculative.costs), r the cost of drafting one token, p a fixed proposal cost. The rule
picks the K (up to what the proposer has to offer) that maximises tokens per unit time,

    K* = argmax_K  E(K) / (c(K + 1) + K r + p)          K = 0 (plain decoding) when no draft pays.

The a_d come from what the verifier accepted so far (`AcceptanceEstimate`): per depth, accepted / reached, with a
prior of `weight` pseudo-observations at `prior`, and old observations fading by `decay` every step, so a proposer
that stopped drafting (K* = 0) drifts back to its prior and tries again once the context may have changed.
"""
import time
import weakref

import numpy as np

from ..errors import check_int, check_real
from .costs import interp_cost, measure_costs


def expected_tokens(acc, K):
    """E(K) = 1 + sum_{d<=K} prod_{j<=d} acc[j-1]: tokens per step of a K-token chain whose depth-d token is
    accepted with probability acc[d-1] given its ancestors were."""
    return 1.0 + float(np.sum(np.cumprod(np.asarray(acc[:K], dtype=np.float64))))


def best_draft_length(acc, costs, max_len, draft_cost=0.0, fixed_cost=0.0):
    """(K*, tokens per unit time at K*): the K in 0..max_len maximising E(K) / (c(K + 1) + K draft_cost +
    fixed_cost); acc [>= max_len] per-depth acceptance, costs a verify cost curve {T: c(T)} or a function.
    Ties go to the shorter draft (it risks less)."""
    best, best_k = -1.0, 0
    for K in range(0, max_len + 1):
        rate = expected_tokens(acc, K) / (interp_cost(costs, K + 1) + K * draft_cost + fixed_cost)
        if rate > best + 1e-12:
            best, best_k = rate, K
    return best_k, best


class AcceptanceEstimate:
    """Per-depth acceptance a_d = (accepted_d + weight prior) / (reached_d + weight), observations fading by
    `decay` each step (1.0: never). reached_d counts the steps whose draft had a depth-d token and whose first
    d - 1 tokens were accepted; accepted_d those of them that also accepted the depth-d token."""

    def __init__(self, max_depth, prior=0.5, weight=2.0, decay=0.98):
        self.max_depth = check_int("max_depth", max_depth, low=1)
        self.prior = check_real("prior", prior, 0.0, 1.0)
        self.weight = check_real("weight", weight, 0.0, low_open=True)
        self.decay = check_real("decay", decay, 0.0, 1.0, low_open=True)
        self.reset()

    def reset(self):
        self.reached = np.zeros(self.max_depth)        # [K] fading counts
        self.accepted = np.zeros(self.max_depth)       # [K]

    def observe(self, drafted, accepted):
        """One verified step: `drafted` draft tokens, the first `accepted` of them accepted."""
        self.reached *= self.decay
        self.accepted *= self.decay
        n = min(drafted, self.max_depth)
        self.reached[:min(accepted + 1, n)] += 1          # depths 1..accepted + 1 were reached (if drafted)
        self.accepted[:min(accepted, n)] += 1

    @property
    def acc(self):
        """[K] the current estimates a_1..a_K. The prior of depth 1 is `prior`, that of depth d > 1 the estimate
        of depth d - 1 (a depth never drafted yet is taken to be as good as the one before it)."""
        out, prior = np.empty(self.max_depth), self.prior
        for d in range(self.max_depth):
            out[d] = prior = (self.accepted[d] + self.weight * prior) / (self.reached[d] + self.weight)
        return out


_COSTS = weakref.WeakKeyDictionary()


def verify_costs(model, max_tokens=9, reps=15):
    """This model's verify cost curve on its backend for blocks of 1..max_tokens tokens, {T: c(T)}: medians of
    `reps` interleaved rounds of minispec.speculative.costs.measure_costs against 200 cached tokens, measured
    once per model and kept for the next decoder. On NumPy the clock is this process's CPU time (run with one
    BLAS thread): on a shared machine wall times of the same work vary with the other jobs, CPU times far less.
    On CuPy it is wall time (the host waits for the device)."""
    sizes = tuple(sorted({s for s in (1, 2, 3, 4, 6, 8) if s < max_tokens} | {max_tokens}))
    have = _COSTS.get(model)
    if have is None or max(have) < max_tokens:
        clock = time.process_time if model.xp is np else time.perf_counter
        _COSTS[model] = measure_costs(model, sizes, reps, clocks=(clock,))[0][0]
    return _COSTS[model]
