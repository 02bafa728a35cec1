"""Drafting nothing costs nothing: the gate that decides, before a step, whether to draft at all (issue 17).

A speculative step pays for its proposal (heads, draft forwards) and for a verify forward of N tokens; a plain
step pays 1 (the unit: one whole plain decoding step). When the context makes the draft's tokens unlikely to be
accepted, the cheapest draft is none: the proposer then skips its proposal entirely (no head call, no draft
forward) and hands the verifier the root alone, a plain step.

The gate keeps a running estimate of what drafting earns, from the steps that drafted:

    rate = (T + weight · prior) / (C + weight)         T = fading sum of the tokens those steps emitted,
                                                       C = fading sum of their MODELLED costs (units of a plain step)

Both sums fade by `decay` at every step (drafted or not), so old evidence counts less the longer ago it was.
Drafting pays while rate > 1 (a plain step earns 1 token per unit). After a drafting step whose update leaves
rate <= 1 the gate closes: the next `wait` steps are plain, then one step drafts again (a probe) and its
outcome decides anew. Waits back off exponentially while probes keep failing (1, 2, 4, ... up to `max_wait`
plain steps) and start again from 1 after a probe that pays, so a context where speculation pays is found
again, at a cost of at most one probe per max_wait steps where it does not. A proposer whose every draft would
gain less than 10% over plain steps even if every token were accepted, or whose every draft is expected to emit
fewer tokens than it costs (`rule_out`), never drafts at all.

Deterministic and lossless: a step's cost is the cost model's number for the draft it ran (never a live
timing), so the decisions are a function of the tokens emitted so far; they use no random draw and depend only
on the past, so every acceptance rule keeps its output law, and a seeded sampling run is reproducible.
"""
from ..errors import UserError, check_int, check_real
from .costs import interp_cost
from .verify import count


class DraftGate:
    """Whether to draft this step (`should_draft`), from the tokens and modelled costs of the steps that did.

    costs: the cost model's step curve {N: s(N)} (units of one plain step, s(1) = 1) or a function of N;
    proposal: the fixed cost of one proposal in the same units; a drafting step that verified N tokens and paid
    `extra` more (the grown tree's expansions, the draft forwards) costs s(N) + proposal + extra (`step_cost`).
    enabled=False: always draft (the gate only keeps its estimate)."""

    def __init__(self, costs=None, proposal=0.0, decay=0.9, weight=1.0, prior=1.0, max_wait=32, enabled=True):
        self.costs = costs
        self.proposal = check_real("gate: proposal", proposal, 0.0)
        self.decay = check_real("gate: decay", decay, 0.0, 1.0, low_open=True)
        self.weight = check_real("gate: weight", weight, 0.0, low_open=True)
        self.prior = check_real("gate: prior", prior, 0.0)
        self.max_wait = check_int("gate: max_wait", max_wait, low=1)
        if not isinstance(enabled, bool):
            raise UserError(f"gate: enabled must be True or False, got {enabled!r}")
        self.enabled = enabled
        self.hopeless = False     # set by a proposer whose every draft costs more than it could emit: never draft
        self.reset()

    def reset(self):
        """A new generation: no evidence (the estimate is the prior), the gate open."""
        self.tokens, self.cost = 0.0, 0.0            # fading sums over the drafting steps
        self.open, self.wait, self.backoff = True, 0, 1
        self.drafting = self.probing = False          # the decision of the step under way; a probe (gate closed)
        self.history = []                             # per step: True drafted, False plain (for tests and bench)

    def settings(self):
        """The constructor's arguments that made this gate: DraftGate(**gate.settings()) is a fresh gate like it."""
        return dict(costs=self.costs, proposal=self.proposal, decay=self.decay, weight=self.weight,
                    prior=self.prior, max_wait=self.max_wait, enabled=self.enabled)

    @property
    def rate(self):
        """Tokens per unit of time the drafting steps earn, as estimated now."""
        return (self.tokens + self.weight * self.prior) / (self.cost + self.weight)

    def step_cost(self, nodes, extra=0.0):
        """The modelled cost of a drafting step that verified `nodes` tokens (root included) and paid `extra`."""
        return self.verify_cost(nodes) + self.proposal + float(extra)

    def verify_cost(self, nodes):
        """s(nodes) alone: the modelled cost of a step that verified `nodes` tokens and ran no proposal."""
        if self.costs is None:
            raise UserError("gate: no step cost curve (costs) to price a drafting step with")
        return float(interp_cost(self.costs, nodes))

    def should_draft(self, stats=None):
        """The decision for the step about to run (call once per step, before proposing); a plain step is counted
        in stats.counters["gate.plain_steps"] when stats (the loop's Stats) are given."""
        self.probing = False
        if self.enabled and self.hopeless:
            self.drafting = False
        elif not self.enabled or self.open:
            self.drafting = True
        elif self.wait > 0:
            self.wait -= 1
            self.drafting = False
        else:
            self.drafting = self.probing = True       # a probe: a proposer may make it its cheapest draft
        self.history.append(self.drafting)
        if not self.drafting:
            self._count_plain(stats)
        return self.drafting

    def _count_plain(self, stats):
        """One more plain step in stats.counters["gate.plain_steps"] (stats: the loop's Stats, or None)."""
        if stats is not None:
            count(stats, "gate.plain_steps", 1)

    def forgo(self, stats=None):
        """After `should_draft` said draft: the proposer drafts something cheaper this step instead (prompt
        lookup's chain alone, expected to earn more than the gate's estimate), so for the gate it is a plain
        step (counted in stats.counters["gate.plain_steps"] when stats are given)."""
        if self.drafting:
            self.drafting = self.probing = False
            self.history[-1] = False
            self._count_plain(stats)

    def rule_out(self, best_case, margin=0.1, expected=None):
        """best_case [(tokens, nodes, extra)]: every draft the proposer could make, with the most tokens it could
        emit if all were accepted. When none of them beats a plain step by more than `margin` even then
        (tokens <= (1 + margin) · its step cost: a draft that gains less at best cannot win back the probes that
        fail), the gate never drafts, not even to probe (`hopeless`). expected [(tokens, nodes, extra)], when the
        proposer knows its acceptance in advance: the same drafts with the tokens they are expected to emit; when
        none is expected to emit more than it costs, no draft pays on average either, and the gate never drafts.
        Returns hopeless."""
        if self.costs is None:
            self.hopeless = False
            return False
        at_best = all(t <= (1 + margin) * self.step_cost(n, e) for t, n, e in best_case)
        on_average = expected is not None and all(t <= self.step_cost(n, e) for t, n, e in expected)
        self.hopeless = at_best or on_average
        return self.hopeless

    def observe(self, tokens, cost=None):
        """After the step: `tokens` emitted; cost its modelled cost (`step_cost`) when it drafted, None when it was
        a plain step (then only the fading runs)."""
        f = self.decay
        self.tokens, self.cost = f * self.tokens, f * self.cost
        if cost is None or not self.drafting:
            return
        self.tokens += float(tokens)
        self.cost += float(cost)
        if not self.enabled:
            return
        if self.rate > 1.0:
            self.open, self.backoff = True, 1
        else:
            self.open, self.wait = False, self.backoff
            self.backoff = min(2 * self.backoff, self.max_wait)

    def settle(self, stats, tokens, cost=None, plain_cost=1.0):
        """`observe` the step, and add its modelled cost (`cost`, or plain_cost for a step that did not draft: 1,
        or s(N) for one that verified a chain drafted for free, without the proposal) to
        stats.counters["model.step_cost"], the price bench decode's prediction reads."""
        self.observe(tokens, cost)
        count(stats, "model.step_cost", plain_cost if cost is None else cost)

    @property
    def plain_steps(self):
        """Steps of this generation the gate made plain."""
        return sum(1 for d in self.history if not d)


def make_gate(gate, name, costs=None, proposal=0.0):
    """A proposer's gate from its `gate` option: True (a DraftGate on the given cost model), False (none: always
    draft), or a DraftGate (used as given). Returns a DraftGate or None."""
    if isinstance(gate, DraftGate):
        return gate
    if gate is False:
        return None
    if gate is True:
        return DraftGate(costs, proposal)
    raise UserError(f"{name}: gate must be True, False or a DraftGate, got {gate!r}")


# ---------------------------------------------------------------------------------------------------------
# Replaying a gate, and the best any gate could do, on a trace of what drafting would have given
# ---------------------------------------------------------------------------------------------------------
def trace_step(tokens, cost, per_row=0.0, free_rows=0, probe=None):
    """What drafting at one position of a greedy decode would have given (a record of `replay_gate`'s trace):
    tokens emitted (the accepted draft tokens + the bonus), the modelled cost of the step (units of one plain
    step), per_row: a further charge per position committed since the last drafting step began, beyond
    free_rows (Hydra++'s prefix catch-up), probe: (tokens, cost) of the proposer's probe when it drafts less on
    a probe (Draft & Verify's one-token draft), else None."""
    return {"tokens": int(tokens), "cost": float(cost), "per_row": float(per_row), "free_rows": int(free_rows),
            "probe": probe}


def replay_gate(trace, gate, n_tokens=None, on_record=None):
    """Decode along a trace as a gated decoder would, without a model: trace[t] is a `trace_step` (what drafting
    at position t of the greedy output gives) or None (a position where the proposer drafts nothing, e.g. the
    first step). Greedy output does not depend on the drafts, so the positions a gated decode visits, and every
    decision of the gate, follow from the trace alone. on_record(trace[t]), when given, is called before each
    step's decision (for a gate that reads more of the context than its own past). Returns (modelled cost of
    the n_tokens tokens in plain steps, drafting steps, plain steps); n_tokens / cost is the gate's modelled
    speed-up."""
    n = len(trace) if n_tokens is None else n_tokens
    gate.reset()
    t, cost, drafted, plain, last = 0, 0.0, 0, 0, 0
    while t < n:
        rec = trace[t]
        if on_record is not None:
            on_record(rec)
        if rec is not None and gate.should_draft():
            tokens, c = rec["probe"] if gate.probing and rec["probe"] is not None else (rec["tokens"], rec["cost"])
            c += rec["per_row"] * max(0, t - last - rec["free_rows"])
            tokens = min(tokens, n - t)
            gate.observe(tokens, c)
            cost, drafted, last, t = cost + c, drafted + 1, t, t + tokens
        else:
            if rec is not None:
                gate.observe(1, None)
            cost, plain, t = cost + 1.0, plain + 1, t + 1
    return cost, drafted, plain


def best_schedule(trace, n_tokens=None):
    """The least modelled cost of decoding along the trace when each step may draft or not knowing the outcome in
    advance (an oracle gate; a catch-up charge as after a drafting step): best[t] = min(1 + best[t + 1],
    cost_t + best[t + tokens_t]) from the end. A bound no real gate reaches. Returns (cost, drafting steps)."""
    n = len(trace) if n_tokens is None else n_tokens
    best, steps = [0.0] * (n + 1), [0] * (n + 1)
    for t in range(n - 1, -1, -1):
        best[t], steps[t] = 1.0 + best[t + 1], steps[t + 1]
        rec = trace[t]
        if rec is not None:
            nxt = min(n, t + rec["tokens"])
            if rec["cost"] + best[nxt] < best[t]:
                best[t], steps[t] = rec["cost"] + best[nxt], steps[nxt] + 1
    return best[0], steps[0]
