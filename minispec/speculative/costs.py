"""The cost model of speculative decoding: what a step costs, and the speed-up it predicts.

Unit of time: one plain decoding step, a one-token forward of the full model (t1 seconds). Then

    c(T)       = time of one verify forward of T tokens / t1         (the verify cost curve; c(1) = 1)
    proposal   = the drafting time of one step / t1
    speed-up   = tau / (c(N) + proposal)                             (`speedup`)

with tau the tokens emitted per step and N the tokens verified per step (the tree's nodes, root included).
Plain decoding makes 1 token per unit of time, so speculation pays only where c(N) + proposal stays under tau.
On a GPU, and for any memory-bound model, c(T) stays near 1 for dozens of tokens; for a small model whose
weights sit in a CPU's cache it grows with T (docs/medusa.md, notebook 06).

The curve is measured in ONE place, `measure_costs`: interleaved round-robin over the sizes (a noisy spell hits
every size alike), with the statistic named by the caller (the median by default; the minimum for a search
that wants the cost of the work itself). Every predicted speed-up in minispec is one of the three below, each
the formula above for one kind of draft:

    tree_speedup        a tree of N nodes per step on average              (bench decode, any decoder)
    chain_speedup       chains of K_s draft tokens, each costing r         (Draft & Verify)
    pick_budget         the tree budget that maximises the expected speed-up (static trees)
"""
import statistics
import time

import numpy as np

from ..backend import to_host
from .tree import build_tree


def measure_costs(model, sizes=(1, 2, 4, 8, 16, 32, 64), reps=15, context=200, clocks=(time.perf_counter,),
                  stat=statistics.median, propose=None, propose_tokens=1):
    """The verify cost curve of this model on this backend, against a cache holding `context` tokens.

    Times a T-token block forward for each T in sizes (1 always included) and, given propose(cache) (one
    proposal against that cache that drafts propose_tokens tokens), the proposal too, round-robin for reps rounds after one warm-up round,
    reading every clock in `clocks` around the same calls. Returns one (curve {T: c(T)}, t1 seconds,
    proposal cost per drafted token in units of t1 or None) per clock, with c(T) = stat(T-token times) /
    stat(one-token times)."""
    cache = model.new_cache()
    model.forward(np.arange(context) % model.config.vocab_size, cache)
    sizes = sorted(set(sizes) | {1})
    jobs = {T: np.arange(1, T + 1) % model.config.vocab_size for T in sizes}
    if propose is not None:
        jobs["propose"] = None
    times = [{key: [] for key in jobs} for _ in clocks]
    for rep in range(reps + 1):
        for key, ids in jobs.items():
            t0 = [clock() for clock in clocks]
            if ids is None:
                propose(cache)
            else:
                to_host(model.forward_block(ids, cache).logits[-1, :1])       # wait for the device
            t1 = [clock() for clock in clocks]
            if rep:                                                             # round 0 warms up
                for ts, a, b in zip(times, t0, t1):
                    ts[key].append(b - a)
    cache.discard()
    out = []
    for ts in times:
        s = {key: stat(v) for key, v in ts.items()}
        proposal = s["propose"] / propose_tokens / s[1] if propose is not None else None
        out.append(({T: s[T] / s[1] for T in sizes}, s[1], proposal))
    return out


def cost_curve(model, sizes=(1, 2, 4, 8, 16, 32, 64), reps=15, context=200):
    """(curve {T: c(T)}, t1 seconds): `measure_costs` in wall time, medians."""
    curve, t1, _ = measure_costs(model, sizes, reps, context)[0]
    return curve, t1


def heads_cost(model, heads, t1, top_k=3, reps=20, num_heads=None):
    """Median time of one head proposal (heads.topk: the first num_heads heads' top-k on one hidden state), in
    units of t1 (one AR step). A proposer runs only as many heads as its tree is deep: pass num_heads =
    tree.max_depth (None times all K heads, which overstates a shallow tree's cost)."""
    hidden = model.forward([1], model.new_cache(), return_hidden=True)[1][0]
    heads.topk(hidden, top_k, num_heads=num_heads)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        heads.topk(hidden, top_k, num_heads=num_heads)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) / t1


def interp_cost(costs, T):
    """c(T) of a verify cost curve {T: c(T)}, interpolated linearly between its measured sizes (held constant
    beyond them), or costs(T) when costs is a function; T a number (-> float) or an array (-> array)."""
    if callable(costs):
        return costs(T)
    sizes = sorted(costs)
    c = np.interp(T, sizes, [costs[s] for s in sizes])
    return float(c) if np.ndim(c) == 0 else c


def speedup(tau, verify_steps, proposal_steps):
    """The cost model: tau tokens per step for verify_steps + proposal_steps units of time per step."""
    return tau / (verify_steps + proposal_steps)


def tree_speedup(tau, nodes, proposal_steps, costs):
    """tau / (c(N) + proposal), N the verified nodes per step (root included)."""
    return speedup(tau, interp_cost(costs, nodes), proposal_steps)


def chain_speedup(tau, drafted, draft_cost, costs):
    """tau / mean over steps s of (K_s · r + c(K_s + 1)): drafted [steps] the draft tokens K_s of each step, each
    drafted token costing draft_cost r (one drafting forward / one full one-token forward)."""
    K = np.asarray(drafted, dtype=np.float64)
    c = np.asarray(interp_cost(costs, K + 1), dtype=np.float64)
    return float(speedup(tau, np.mean(c), np.mean(K * draft_cost)))


def pick_budget(accuracies, costs, proposal_cost=0.0):
    """The tree budget (nodes besides the root) maximising the expected speedup over AR on this backend,
    tau(budget) / (c(budget + 1) + proposal_cost), with c interpolated between measured sizes and
    proposal_cost the drafting time per step in units of one AR step: one number, a sequence whose entry
    d - 1 is the cost of drafting a tree d deep (d heads run), or a function of the tree (a proposer whose cost
    depends on the tree's shape). Returns (budget, expected speedup)."""
    if callable(proposal_cost):
        cost_of = proposal_cost
    elif np.isscalar(proposal_cost):
        cost_of = lambda tree: proposal_cost                                          # noqa: E731
    else:
        cost_of = lambda tree: proposal_cost[tree.max_depth - 1]                      # noqa: E731
    best = (0.0, 0)
    for budget in range(1, max(costs)):
        tree, tau = build_tree(accuracies, budget)
        best = max(best, (tree_speedup(tau, budget + 1, cost_of(tree), costs), budget))
    return best[1], best[0]
