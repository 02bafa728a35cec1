"""The cost model of speculative decoding: what a step costs, and the speed-up it predicts.

Unit of time: one plain decoding step, a one-token forward of the full model (t1 seconds). Then

    c(T)       = time of one verify forward of T tokens / t1         (the verify cost curve; c(1) = 1)
    proposal   = the drafting time of one step / t1
    speed-up   = tau / (c(N) + proposal)                             (`speedup`)

with tau the tokens emitted per step and N the tokens verified per step (the tree's nodes, root included).
Plain decoding makes 1 token per unit of time, so speculation pays only where c(N) + proposal stays under tau.
On a GPU, and for any memory-bound model, c(T) stays near 1 for dozens of tokens; for a small model whose
weights sit in a CPU's cache it grows with T (docs/medusa.md, notebook 06).

What decoding pays is a whole step, not a bare forward: `measure_steps` / `step_curve` time the real verify
step (mask, forward, acceptance, commit, gather) of N nodes, s(N) in units of one whole plain step, right after
a proposer's proposal when given (its eviction of the model's weights from the CPU's caches counted), and the
proposal right after a verify step. The cost rules, the gate (minispec.speculative.gate) and bench decode's
prediction read these curves (docs/costs.md).

The timing loop of c(T) is ONE function, `measure_costs`: interleaved round-robin over the sizes (a noisy spell hits
every size alike), with the statistic named by the caller. The curve is ONE measurement, `backend_curve(model)`:
the canonical c(T) of a model on its backend (the clock, statistic, context and sizes in `CANONICAL`), measured
once per model and used by every decoder's cost rule and by `minispec bench decode` (docs/costs.md). Every
predicted speed-up in minispec is the formula above, `speedup`, for one kind of draft:

    tree_speedup        a tree of N nodes per step                         (pick_budget's trees)
    chain_speedup       chains of K_s draft tokens, each costing r         (Draft & Verify)
    pick_budget         the static tree budget that maximises the expected speed-up
and, per step, the rate rules that size a draft while decoding (speculative.draft_length.best_length for chains,
speculative.dynamic_tree.best_size for trees) and bench decode's measured-tau prediction (bench.decode.prediction).
"""
import statistics
import time
import weakref
from dataclasses import dataclass

import numpy as np

from ..backend import to_host
from .acceptance import greedy_accept
from .tree import Tree, build_tree
from .verify import Draft, verify


def fit_context(cache, context, sizes=()):
    """(context, sizes) of a timing that fit `cache`: unchanged for a rolling cache (it has a window); a cache
    without a window holds at most half its positions as context, and only the sizes that fit after it."""
    if getattr(cache, "ring", True):
        return context, list(sizes)
    context = min(context, cache.W // 2)
    return context, [T for T in sizes if context + T <= cache.W]


def replay_step(model, cache, draft):
    """One greedy `verify` of `draft` against `cache`, then the cache position set back: a step that can be
    timed again and again against the same context."""
    pos = cache.pos
    verify(model, cache, draft, lambda d, logits: greedy_accept(d.tree, d.tokens, logits))
    cache.pos = pos


def measure_costs(model, sizes=(1, 2, 4, 8, 16, 32, 64), reps=15, context=200, clocks=(time.perf_counter,),
                  stat=statistics.median, propose=None, propose_tokens=1):
    """The verify cost curve of this model on this backend, against a cache holding `context` tokens.

    Times a T-token block forward for each T in sizes (1 always included) and, given propose(cache) (one
    proposal against that cache that drafts propose_tokens tokens), the proposal too, round-robin for reps rounds after one warm-up round,
    reading every clock in `clocks` around the same calls. Returns one (curve {T: c(T)}, t1 seconds,
    proposal cost per drafted token in units of t1 or None) per clock, with c(T) = stat(T-token times) /
    stat(one-token times)."""
    cache = model.new_cache()
    context, sizes = fit_context(cache, context, sorted(set(sizes) | {1}))
    model.forward(np.arange(context) % model.config.vocab_size, cache)
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


# ---------------------------------------------------------------------------------------------------------
# The canonical curve: one per model and backend
# ---------------------------------------------------------------------------------------------------------
CANONICAL = {"sizes": (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64), "reps": 15, "context": 200, "anchor": 8}


def backend_clock(model):
    """(clock, its name) the canonical curve is timed in: this process's CPU time on NumPy (run with one BLAS
    thread: on a shared machine a call's wall time also counts the time the neighbours hold the cores, and grows
    faster than its work), wall time on CuPy (CPU time would miss the device's work; the host waits for it)."""
    return (time.process_time, "CPU time") if model.xp is np else (time.perf_counter, "wall time")


@dataclass(frozen=True)
class BackendCurve:
    """A measured verify cost curve and how it was measured."""
    costs: dict          # {T: c(T)}, c(1) = 1
    t1: float            # seconds of one one-token forward, in `clock`
    clock: str           # "CPU time" or "wall time"
    reps: int            # interleaved rounds (after one warm-up round)
    context: int         # tokens in the cache the blocks are verified against
    anchor: int          # sizes up to it are timed together with T = 1; larger ones with T = anchor

    def describe(self):
        """The curve and its statistic in one line, as bench decode and docs/costs.md print it."""
        return (f"c(T) = median {self.clock} of a T-token block forward / that of one token, over {self.reps} "
                f"interleaved rounds against {self.context} cached tokens, T > {self.anchor} chained through "
                f"c({self.anchor}) (t1 = {self.t1 * 1e3:.2f} ms): "
                + ", ".join(f"c({T})={c:.2f}" for T, c in sorted(self.costs.items())))


_CANONICAL = weakref.WeakKeyDictionary()           # model -> BackendCurve


def backend_curve(model, max_tokens=None):
    """THE verify cost curve of this model on its backend (a `BackendCurve`), T in CANONICAL["sizes"] (1..64):
    medians over CANONICAL["reps"] (15) interleaved rounds, after one warm-up round, of the `backend_clock` time
    (CPU time on NumPy, wall time on CuPy) of T-token block forwards against a cache holding
    CANONICAL["context"] (200) tokens, in two `measure_costs` calls: the sizes up to the anchor (8) in rounds of
    their own, c(T) = median(T) / median(1) and t1 = median(1); the larger ones in rounds with T = anchor,
    c(T) = c(anchor) · median(T) / median(anchor). Why two: on the shipped model on a CPU, rounds that also run
    16- to 64-token blocks time the one-token forward about a quarter slower than rounds of small blocks do
    (docs/costs.md), slower than plain decoding runs it, which made every small c(T) look cheaper.

    Measured once per model (kept in a weak dictionary: a second call returns the same object and measures
    nothing), unless max_tokens asks for blocks beyond the sizes measured: then the sizes are extended by
    doublings up to max_tokens and the curve is measured again, once."""
    have = _CANONICAL.get(model)
    if have is not None and (max_tokens is None or max_tokens <= max(have.costs)):
        return have
    sizes = list(CANONICAL["sizes"] if have is None else sorted(have.costs))
    while max_tokens is not None and sizes[-1] < max_tokens:
        sizes.append(min(2 * sizes[-1], max_tokens))
    clock, name = backend_clock(model)
    a, reps, context = CANONICAL["anchor"], CANONICAL["reps"], CANONICAL["context"]
    costs, t1, _ = measure_costs(model, tuple(T for T in sizes if T <= a), reps, context, clocks=(clock,))[0]
    large = tuple(T for T in sizes if T >= a)
    if len(large) > 1:
        far = measure_costs(model, large, reps, context, clocks=(clock,))[0][0]
        costs.update({T: costs[a] * far[T] / far[a] for T in large})
    _CANONICAL[model] = BackendCurve(costs, t1, name, reps, context, a)
    return _CANONICAL[model]


# ---------------------------------------------------------------------------------------------------------
# Whole-step costs: the real verify step, and the proposal as it runs between verify steps
# ---------------------------------------------------------------------------------------------------------
# context: the middle of bench decode's decodes (48-token held-out prompts + 128 new tokens: positions 48..176)
STEP = {"sizes": (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 33), "reps": 11, "context": 112, "anchor": 8}


@dataclass(frozen=True)
class StepCurve:
    """What a whole decoding step costs, in units of one whole PLAIN step (a root-only `verify` after a plain
    step: forward, acceptance, commit and gather; `unit` seconds on `clock`).

    costs {N: s(N)}: a `verify` of an N-node draft (tree mask, block forward, acceptance walk, commit of the
    accepted path, gather of its hidden states), timed right after the proposal when there is one, so the
    proposal's eviction of the model's weights from the CPU's caches is counted (without a proposal the curve
    is scaled to s(1) = 1 exactly, its own root-only steps). proposal: the median proposal (timed right after a
    verify step) in the same unit, or None.
    forward: the bare one-token block forward in the same unit (to convert costs timed in one-token forwards)."""
    costs: dict
    unit: float
    forward: float
    proposal: object
    clock: str
    reps: int
    context: int

    def describe(self):
        extra = "" if self.proposal is None else f", proposal {self.proposal:.3f}"
        a = STEP["anchor"]
        chained = f", N > {a} chained through s({a})" if max(self.costs) > a else ""
        return (f"s(N) = median {self.clock} of a whole verify step of N nodes / that of a plain step, over "
                f"{self.reps} interleaved rounds against {self.context} cached tokens{chained} (plain step = "
                f"{self.unit * 1e3:.2f} ms, bare one-token forward {self.forward:.3f}{extra}): "
                + ", ".join(f"s({N})={c:.2f}" for N, c in sorted(self.costs.items())))


def measure_steps(model, sizes=STEP["sizes"], tree_of=Tree.chain, propose=None, reps=STEP["reps"],
                  context=STEP["context"], clock=None, plain_before=1):
    """A `StepCurve`: round-robin over reps rounds (after one warm-up round) against a cache holding `context`
    tokens, on `clock` (default `backend_clock`). Each round times: a plain step (a root-only greedy `verify`)
    right after another plain step (the unit, as plain decoding runs it); a bare one-token forward; and for each
    N in sizes, after an untimed plain step, propose() (when given) then a greedy `verify` of an N-node draft
    shaped tree_of(N - 1) (Tree.chain(K) by default, or a proposer's trees). Every drafting step follows a plain
    one, as in decoding (a gated decoder's drafts follow its plain steps; lookup's mostly do): a 9-node step
    right after a plain step costs about 7% more than right after another 9-node step (docs/costs.md). The
    verify commits its path; the cache position is set back after each step, so every step sees the same
    context. Statistic: medians. As in `backend_curve`, the sizes up to STEP["anchor"] (8) are timed in rounds
    of their own, with the unit, the bare forward and the proposal, and the larger ones in rounds with N = 8,
    chained through s(8): rounds that also run 10- to 33-node steps time the small steps slower, and made every
    small s(N) look cheaper than decoding pays (docs/costs.md). A cache without a window (no ring) holds at most
    half its positions as context, and only the sizes that fit after it are timed."""
    clock = clock or backend_clock(model)[0]
    V = model.config.vocab_size
    cache = model.new_cache()
    context, sizes = fit_context(cache, context, sorted(set(sizes) | {1}))
    model.forward(np.arange(context) % V, cache, warn_positions=False)
    drafts = {N: Draft(tree_of(N - 1) if N > 1 else Tree.from_choices([]), [int(t) for t in np.arange(1, N + 1) % V])
              for N in sizes}

    def step(draft):
        replay_step(model, cache, draft)

    def rounds(group):
        times = {key: [] for key in ["plain", "forward", "propose"] + group}
        for rep in range(reps + 1):
            step(drafts[1])
            t0 = clock()
            step(drafts[1])
            t1 = clock()
            to_host(model.forward_block([1], cache).logits[-1, :1])
            cache.discard()
            t2 = clock()
            if rep:
                times["plain"].append(t1 - t0)
                times["forward"].append(t2 - t1)
            for N in group:
                for _ in range(plain_before):        # every step follows plain ones, as in decoding
                    step(drafts[1])
                if propose is not None:
                    a = clock()
                    propose()
                    if rep:
                        times["propose"].append(clock() - a)
                a = clock()
                step(drafts[N])
                if rep:
                    times[N].append(clock() - a)
        return {key: statistics.median(v) for key, v in times.items() if v}
    a = STEP["anchor"]
    small = rounds([N for N in sizes if N <= a])
    cache.discard()
    unit = small["plain"]
    scale = unit if propose is not None else small[1]                        # no proposal: s(1) = 1 exactly
    costs = {N: small[N] / scale for N in sizes if N <= a}
    if any(N > a for N in sizes):                    # the larger sizes in rounds of their own, chained through s(a)
        large = rounds([N for N in sizes if N >= a])
        cache.discard()
        costs.update({N: costs[a] * large[N] / large[a] for N in sizes if N > a})
    return StepCurve(costs, unit, small["forward"] / unit, small["propose"] / unit if propose is not None else None,
                     backend_clock(model)[1], reps, context)


_STEPS = weakref.WeakKeyDictionary()            # model -> {key: StepCurve}


def step_curve(model, key=None, propose=None, sizes=STEP["sizes"], tree_of=Tree.chain):
    """THE whole-step curve of a model on its backend (`measure_steps`: CPU time on NumPy, wall time on CuPy,
    medians of STEP["reps"] interleaved rounds against STEP["context"] cached tokens, chains of N = 1..33 nodes),
    measured once per model; with a key (the proposer's heads and tree options) and propose(), the curve of
    that proposer: its verify steps timed right after its proposal, and the proposal right after a verify step,
    measured once per model and key. Every cost rule and bench decode's prediction read these curves."""
    known = _STEPS.setdefault(model, {})
    if key not in known:
        known[key] = measure_steps(model, sizes, tree_of, propose)
    return known[key]


def cost_curve(model, sizes=(1, 2, 4, 8, 16, 32, 64), reps=15, context=200):
    """(curve {T: c(T)}, t1 seconds): `measure_costs` in WALL time, medians, measured afresh at every call. Not
    the canonical curve (`backend_curve`, CPU time on NumPy): it is what a reader sees on the clock on the wall,
    noisier on a shared machine; notebooks 03 and 06, tools/choose_tree.py and `bench forward` (which may run a
    mapped 7B model, too slow for the canonical sizes) use it, each saying so."""
    curve, t1, _ = measure_costs(model, sizes, reps, context)[0]
    return curve, t1


def heads_cost(model, heads, t1, top_k=3, reps=20, num_heads=None, clock=time.perf_counter):
    """Median time of one head proposal (heads.topk: the first num_heads heads' top-k on one hidden state), in
    units of t1 (one AR step, read on the same `clock`). A proposer runs only as many heads as its tree is deep:
    pass num_heads = tree.max_depth (None times all K heads, which overstates a shallow tree's cost)."""
    hidden = model.forward([1], model.new_cache(), return_hidden=True)[1][0]
    heads.topk(hidden, top_k, num_heads=num_heads)
    ts = []
    for _ in range(reps):
        t0 = clock()
        heads.topk(hidden, top_k, num_heads=num_heads)
        ts.append(clock() - t0)
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
