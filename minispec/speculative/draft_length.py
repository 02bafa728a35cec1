"""How long a chain draft should be this step: the cost rule (issue 17). The idea is Sequoia's hardware-aware
sizing (Chen et al., arXiv 2402.12374: choose the draft size that maximises expected tokens per unit of time on
the hardware at hand) and EAGLE-2's per-step, context-dependent drafts (Li et al., arXiv 2406.16858), applied to
a chain.

A chain of K draft tokens, each accepted (given that all before it were) with probability a_d at depth d, emits
on average

    E(K) = 1 + sum_{d=1..K} prod_{j=1..d} a_j          tokens per step (the bonus token always comes)

and costs c(K + 1) + K r + p units of time (one unit = one plain decoding step): c(T) the verify cost curve of
this backend (minispec.speculative.costs), r the cost of drafting one token, p a fixed proposal cost. The rule
picks the K (up to what the proposer has to offer) that maximises tokens per unit time,

    K* = argmax_K  E(K) / (c(K + 1) + K r + p)          K = 0 (plain decoding) when no draft pays.

The a_d come from what was accepted so far (`AcceptanceEstimate`): per depth, accepted / reached, with a prior of
`weight` pseudo-observations at `prior`, and old observations fading by `decay` every step. A proposer fed only by
its drafted tokens (Draft & Verify) drifts back to its prior once it stops drafting (K* = 0) and tries again once
the context may have changed; prompt lookup judges every chain it finds against the emitted tokens, drafted or
not (minispec.decoders.lookup.ContextChain), so it keeps learning while it drafts nothing.
"""
import numpy as np

from ..errors import UserError, check_int, check_real
from .costs import interp_cost, step_curve


def expected_tokens(acc, K):
    """E(K) = 1 + sum_{d<=K} prod_{j<=d} acc[j-1]: tokens per step of a K-token chain whose depth-d token is
    accepted with probability acc[d-1] given its ancestors were."""
    return 1.0 + float(np.sum(np.cumprod(np.asarray(acc[:K], dtype=np.float64))))


def step_costs(costs, max_len, draft_cost=0.0, fixed_cost=0.0):
    """[max_len + 1] (a list) the time of a step that drafts K = 0..max_len tokens,
    c(K + 1) + K draft_cost + fixed_cost, costs a verify cost curve {T: c(T)} or a function of an array of sizes.
    A proposer computes it once."""
    K = np.arange(max_len + 1)
    return (np.asarray(interp_cost(costs, K + 1), dtype=np.float64) + K * draft_cost + fixed_cost).tolist()


def best_length(acc, cost):
    """(K*, tokens per unit time at K*) for step times cost [max_len + 1] (`step_costs`): the K maximising
    E(K) / cost[K], acc [>= max_len] the per-depth acceptance. Ties go to the shorter draft (it risks less).
    Plain Python floats: a proposer calls it every step, on a handful of numbers."""
    best, best_rate, tokens, reach = 0, 1.0 / float(cost[0]), 1.0, 1.0
    for K in range(1, len(cost)):
        reach *= float(acc[K - 1])                     # P(the first K draft tokens are all accepted)
        tokens += reach                                # E(K)
        rate = tokens / float(cost[K])
        if rate > best_rate + 1e-12:
            best, best_rate = K, rate
    return best, best_rate


def best_draft_length(acc, costs, max_len, draft_cost=0.0, fixed_cost=0.0):
    """(K*, tokens per unit time at K*): the K in 0..max_len maximising E(K) / (c(K + 1) + K draft_cost +
    fixed_cost); acc [>= max_len] per-depth acceptance, costs a verify cost curve {T: c(T)} or a function."""
    return best_length(acc, step_costs(costs, max_len, draft_cost, fixed_cost))


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
        self.reached = [0.0] * self.max_depth          # [K] fading counts (plain floats: updated every step)
        self.accepted = [0.0] * self.max_depth         # [K]

    def observe(self, drafted, accepted):
        """One verified step: `drafted` draft tokens, the first `accepted` of them accepted."""
        n, f = min(drafted, self.max_depth), self.decay
        for d in range(self.max_depth):
            self.reached[d] = f * self.reached[d] + (d < min(accepted + 1, n))    # depth d + 1 was reached
            self.accepted[d] = f * self.accepted[d] + (d < min(accepted, n))      # and accepted

    @property
    def acc(self):
        """[K] the current estimates a_1..a_K. The prior of depth 1 is `prior`, that of depth d > 1 the estimate
        of depth d - 1 (a depth never drafted yet is taken to be as good as the one before it)."""
        out, prior = [], self.prior
        for hit, seen in zip(self.accepted, self.reached):
            prior = (hit + self.weight * prior) / (seen + self.weight)
            out.append(prior)
        return out


def verify_costs(model, max_tokens=9):
    """This model's whole-step curve on its backend, {N: s(N)} for N up to at least max_tokens, in units of one
    whole plain step: minispec.speculative.costs.step_curve (a real verify of an N-token chain, CPU time on
    NumPy, medians of interleaved rounds against 112 cached tokens, each step after a plain one, measured once
    per model and shared by lookup and Draft & Verify)."""
    costs = step_curve(model).costs
    if max_tokens > max(costs):
        raise UserError(f"drafts of {max_tokens - 1} tokens are beyond the measured step curve (N <= {max(costs)})")
    return costs
