"""Draft & Verify: self-speculative decoding by skipping layers (Zhang et al., arXiv 2309.08168, ACL 2024).

The draft model is the model itself with some attention and MLP sublayers skipped (a skipped sublayer is the
identity on the residual stream); it drafts a chain one token at a time until its confidence falls under an
adaptive threshold, and the full model verifies the chain in one forward (minispec.speculative.verify). No extra weights.

    skip = SkipSet.from_lists(n_layers=6, attn=[2, 3], mlp=[4])       # skip attention of layers 2, 3 and MLP of 4
    logits = model.forward(ids, skip=skip)                              # the draft model, no cache
    out = minispec.generate(model, ids, decoder="draft_verify")        # finds <model.path>/draft_verify/skip_set.json

The shipped skip set of a model lives at <model.path>/draft_verify/skip_set.json (made by
`minispec search-skip --model DIR`). Its keys (the first two as in the authors' skip_layers.json):

    "attention": [int, ...]   indices of the layers whose attention sublayer is skipped (0-based, sorted)
    "mlp":       [int, ...]   indices of the layers whose MLP sublayer is skipped
    "n_layers":  int          L of the model it was chosen for (checked at load)
    "max_draft", "gamma0"     optional: the decoder's defaults for this skip set (else 8 and 0.6)
    anything else             optional provenance (objective, search trace file, measured tau and speedup), kept
                              in SkipSet.meta and ignored by decoding
"""
import os
import time
import weakref
from dataclasses import dataclass, field

import numpy as np

from ..backend import to_host
from ..errors import Fields, MissingFileError, UserError, check_int, check_real, is_int, read_json, write_json_lines
from ..speculative.costs import backend_clock, measure_costs, step_curve
from ..speculative.draft_length import AcceptanceEstimate, best_length, step_costs
from ..speculative.gate import make_gate
from ..speculative.loop import Context, Stats
from ..speculative.sampling import SamplingParams, randomness, target_probs
from ..speculative.tree import Tree
from ..speculative.verify import Draft, count

SKIP_SET_FILE = os.path.join("draft_verify", "skip_set.json")


# ---- the skip set -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SkipSet:
    """Which sublayers the draft model skips: attn[i] / mlp[i] True = layer i's attention / MLP is the identity."""
    attn: tuple
    mlp: tuple
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        object.__setattr__(self, "attn", tuple(bool(a) for a in self.attn))
        object.__setattr__(self, "mlp", tuple(bool(m) for m in self.mlp))
        if len(self.attn) != len(self.mlp):
            raise UserError(f"SkipSet: attn has {len(self.attn)} layers but mlp has {len(self.mlp)}")

    @classmethod
    def from_lists(cls, n_layers, attn=(), mlp=(), meta=None):
        """From lists of skipped layer indices (the authors' form): attn=[2, 3], mlp=[4]."""
        for name, idx in (("attention", attn), ("mlp", mlp)):
            bad = [int(i) for i in idx if not 0 <= int(i) < n_layers]
            if bad:
                raise UserError(f"SkipSet: {name} layer indices {bad} outside 0..{n_layers - 1}")
        a, m = set(int(i) for i in attn), set(int(i) for i in mlp)
        return cls(tuple(i in a for i in range(n_layers)), tuple(i in m for i in range(n_layers)), dict(meta or {}))

    @classmethod
    def none(cls, n_layers):
        """Skip nothing (the draft model is the full model)."""
        return cls((False,) * n_layers, (False,) * n_layers)

    @property
    def n_layers(self):
        return len(self.attn)

    @property
    def attn_layers(self):
        return [i for i, s in enumerate(self.attn) if s]

    @property
    def mlp_layers(self):
        return [i for i, s in enumerate(self.mlp) if s]

    @property
    def n_skipped(self):
        """Skipped sublayers, out of 2L."""
        return sum(self.attn) + sum(self.mlp)

    def __str__(self):
        return f"SkipSet(attention={self.attn_layers}, mlp={self.mlp_layers})"

    # ---- JSON ---------------------------------------------------------------------------------------------------
    def to_json(self):
        """The file's dict: {"attention": [...], "mlp": [...], "n_layers": L, **meta}."""
        return {"attention": self.attn_layers, "mlp": self.mlp_layers, "n_layers": self.n_layers, **self.meta}

    @classmethod
    def from_json(cls, d, n_layers=None, where="skip set"):
        """From the file's dict; n_layers (the model's L) is checked against the file's when given. Every key the
        decoder reads is typed and ranged: n_layers >= 1, attention / mlp lists of distinct layer indices in
        0..L-1, max_draft an int >= 1 and gamma0 in [0, 1] when present (null: unset)."""
        if not isinstance(d, dict):
            raise UserError(f"{where}: expected a JSON object with keys 'attention', 'mlp', 'n_layers'")
        missing = [k for k in ("attention", "mlp") if k not in d]
        if missing:
            raise UserError(f"{where}: missing key(s) {missing} (lists of skipped layer indices)")
        f = Fields(d, where)
        L = f.int("n_layers", low=1, default=n_layers)
        if L is None:
            raise UserError(f"{where}: missing key 'n_layers'")
        if n_layers is not None and L != n_layers:
            raise UserError(f"{where}: made for n_layers={L}, but the model has {n_layers} layers")
        for k in ("attention", "mlp"):
            if not isinstance(d[k], list) or not all(is_int(i) for i in d[k]):
                raise UserError(f"{where}: key {k!r} must be a list of layer indices (ints), got {d[k]!r}")
            if len(set(d[k])) != len(d[k]):
                raise UserError(f"{where}: key {k!r} lists a layer twice: {d[k]!r}")
        meta = {k: v for k, v in d.items() if k not in ("attention", "mlp", "n_layers")}
        for k, check in (("max_draft", lambda: f.int("max_draft", low=1, default=None)),
                         ("gamma0", lambda: f.real("gamma0", low=0, high=1, default=None))):
            if check() is None:
                meta.pop(k, None)
        try:
            return cls.from_lists(L, d["attention"], d["mlp"], meta)
        except ValueError as e:
            raise UserError(f"{where}: {e}") from None

    def save(self, path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_json_lines(path, self.to_json())      # lists on one line: a diff shows which layer changed

    @classmethod
    def load(cls, path, n_layers=None):
        return cls.from_json(read_json(path), n_layers=n_layers, where=str(path))


def skip_set_path(model_dir):
    """Where a model's shipped skip set lives: <model_dir>/draft_verify/skip_set.json."""
    return os.path.join(str(model_dir), SKIP_SET_FILE)


def find_skip_set(model):
    """The skip set shipped beside a loaded model (model.path), or a clear error saying how to make one."""
    base = getattr(model, "path", None)
    if base is None:
        raise UserError("draft_verify: this model was not loaded from a folder (no model.path); "
                         "pass skip=SkipSet(...) or skip={'attention': [...], 'mlp': [...]}")
    path = skip_set_path(base)
    if not os.path.exists(path):
        raise MissingFileError(f"draft_verify: no skip set at {path}; make one with "
                                f"`minispec search-skip --model {base}` or pass skip=...")
    return SkipSet.load(path, n_layers=model.config.n_layers)


# ---- the adaptive draft exit (the paper's adaptive draft-exiting; the authors' decoding.py) ----------------------
@dataclass(frozen=True)
class ExitRule:
    """Constants of the adaptive threshold update. Defaults: the authors' decoding.py, whose
    auto_parameters = [1, 0.5, 0.9, 1e-2, 0.9] are [update every step, beta1, alpha, epsilon, beta2]; gamma0 = 0.6
    is the starting threshold of their sampling evaluation (evaluate_code.ipynb)."""
    beta1: float = 0.5      # smoothing of the acceptance-rate estimate m
    alpha: float = 0.9      # target acceptance rate: under it the threshold rises (drafts get shorter)
    epsilon: float = 0.01   # step of the threshold
    beta2: float = 0.9      # smoothing of the threshold
    gamma0: float = 0.6     # starting threshold


def update_threshold(gamma, m, accepted, drafted, hit_max, rule=ExitRule()):
    """One adaptive draft-exit update after a verification -> (gamma, m).

        m      <- beta1 * m + (1 - beta1) * accepted / drafted            (smoothed acceptance rate)
        gamma' =  gamma + epsilon   if m < alpha                          (too many rejections: stop earlier)
                  gamma             elif the draft reached its maximum    (accepted and already as long as allowed)
                  gamma - epsilon   otherwise                             (accepted: draft longer)
        gamma  <- beta2 * gamma + (1 - beta2) * gamma'

    accepted: draft tokens the verifier accepted (the bonus token not counted); drafted: draft tokens (>= 1).
    """
    m = rule.beta1 * m + (1 - rule.beta1) * accepted / drafted
    if m < rule.alpha:
        target = gamma + rule.epsilon
    elif hit_max:
        target = gamma
    else:
        target = gamma - rule.epsilon
    return rule.beta2 * gamma + (1 - rule.beta2) * target, m


# ---- the proposer -------------------------------------------------------------------------------------------------
def _as_skip_set(skip, model):
    if skip is None:
        return find_skip_set(model)
    if isinstance(skip, SkipSet):
        s = skip
    elif isinstance(skip, dict):
        s = SkipSet.from_json(skip, n_layers=model.config.n_layers, where="skip=")
    elif isinstance(skip, (str, os.PathLike)):
        s = SkipSet.load(skip, n_layers=model.config.n_layers)
    else:
        raise UserError(f"draft_verify: skip must be a SkipSet, a dict or a JSON path, not {type(skip).__name__}")
    if s.n_layers != model.config.n_layers:
        raise UserError(f"draft_verify: skip set has {s.n_layers} layers, the model {model.config.n_layers}")
    return s


class DraftVerifyProposer:
    """Decoder "draft_verify": the skipped model drafts a chain, one one-token partial forward per draft token.

    Draft token j runs at position cache.pos + j through the kept sublayers only; at a kept attention layer it
    reads the committed ring (the FULL model's keys/values of the accepted tokens: the skipped model has no cache
    of its own) and the scratch rows 0..j of this draft (the skipped model's own keys/values of the draft
    tokens before it). The ring is never written; the scratch rows are discarded before verification, which
    recomputes every draft token with the full model (the draft's K/V came from a different network).

    Greedy: the draft takes its argmax. Sampling: the draft samples from its own warped distribution (the same
    temperature / top-k / top-p as the target) with ctx.rng, and hands those distributions to the verifier as
    Draft.q (chain rejection sampling). Drafting stops after max_draft tokens, after left - 1 tokens when the
    request wants only `left` more (ctx.left), or after the first
    token whose draft probability is under the threshold gamma (that token is kept); gamma adapts after every
    verification (update_threshold) unless adaptive=False.

    sizing="cost" adds the cost rule of minispec.speculative.draft_length: before drafting, the K* that maximises
    expected tokens per unit time E(K) / (c(K + 1) + K r) (per-depth acceptance estimated from the steps so far,
    r the cost of one draft token) caps the draft, so the threshold says where a draft may stop and the cost
    check whether another token pays; K* = 0 drafts nothing (a plain decoding step). costs {T: c(T)} and
    draft_cost r unless given: the canonical curve and r timed on its clock (`measured_draft_costs`).

    gate: False (the class's default: draft at every step), True (the registry's default, decoder
    "draft_verify") or a DraftGate (minispec.speculative.gate): when the acceptance so far says no
    draft pays (a step of K draft tokens costing s(K + 1) + K r on the cost model), the step is a plain one
    with no draft forward, re-probed now and then by a one-token draft. When the skip set's calibration match
    rate p (`calibration_prior`) says that no draft length is expected to pay even on average (K tokens accepted
    one after another with probability p each: 1 + p + ... + p^K tokens for s(K + 1) + K r), the gate rules
    drafting out (`DraftGate.rule_out`) and the decoder runs plain steps only (docs/costs.md, "Ruled out").

    Counts in ctx.stats.counters: "draft_verify.forwards" (one-token draft forwards) and
    "draft_verify.gamma" (a list: the threshold in force at each step, before its update).
    """
    name = "draft_verify"
    PROBE = 1                                              # the draft tokens of a probe (gate closed)

    def __init__(self, model, skip=None, max_draft=None, gamma0=None, adaptive=True, rule=None, sizing="threshold",
                 costs=None, draft_cost=None, gate=False):
        self.model, self.skip = model, _as_skip_set(skip, model)
        self.rule = rule or ExitRule()
        # unset options: the skip set file's own (its meta), else the authors' decoding.py defaults
        max_draft = self.skip.meta.get("max_draft", 8) if max_draft is None else max_draft
        gamma0 = self.skip.meta.get("gamma0", self.rule.gamma0) if gamma0 is None else gamma0
        self.max_draft = check_int("draft_verify: max_draft", max_draft, low=1)
        self.gamma0 = check_real("draft_verify: gamma0", gamma0, low=0, high=1)
        if not isinstance(adaptive, bool):
            raise UserError(f"draft_verify: adaptive must be True or False, got {adaptive!r}")
        self.adaptive, self._chains = adaptive, {0: Tree.chain(0)}     # a plain step builds no tree
        if sizing not in ("threshold", "cost"):
            raise UserError(f"draft_verify: sizing must be 'threshold' or 'cost', not {sizing!r}")
        self.sizing, self.cap = sizing, self.max_draft
        if sizing == "cost":
            if costs is None or draft_cost is None:
                r, c = measured_draft_costs(model, self.skip, self.max_draft)
                costs, draft_cost = (c if costs is None else costs), (r if draft_cost is None else draft_cost)
            self.costs, self.draft_cost = costs, float(draft_cost)
            self.step_cost = step_costs(costs, self.max_draft, self.draft_cost)               # [max_draft + 1]
            self.estimate = AcceptanceEstimate(self.max_draft, prior=calibration_prior(self.skip))
        if gate is True:
            r, c = (self.draft_cost, self.costs) if sizing == "cost" else measured_draft_costs(model, self.skip,
                                                                                               self.max_draft)
            self.draft_cost, gate = r, make_gate(True, "draft_verify", c)
        self.gate, self.drafting = make_gate(gate, "draft_verify"), False
        if self.gate is not None and not hasattr(self, "draft_cost"):       # a DraftGate given: r as given, or 0
            self.draft_cost = 0.0 if draft_cost is None else check_real("draft_verify: draft_cost", draft_cost, 0.0)
        if self.gate is not None:         # K tokens drafted emit at most K + 1 and cost s(K + 1) + K r
            p = calibration_prior(self.skip, default=None)       # the skip set's match rate, when it was measured
            expected = None if p is None else [(sum(p ** i for i in range(K + 1)), K + 1, K * self.draft_cost)
                                               for K in range(1, self.max_draft + 1)]
            self.gate.rule_out([(K + 1, K + 1, K * self.draft_cost) for K in range(1, self.max_draft + 1)],
                               expected=expected)
        self.start(None, None)

    def start(self, ctx, prompt_hidden):
        """Per-generation state: the threshold back to gamma0, the acceptance estimate to 0 (as the authors)."""
        self.gamma, self.m = self.gamma0, 0.0
        if self.sizing == "cost":
            self.estimate.reset()
        if getattr(self, "gate", None) is not None:
            self.gate.reset()

    def propose(self, ctx):
        self.drafting, self.stats = False, ctx.stats
        if self.gate is not None and not self.gate.should_draft(ctx.stats):      # a plain step: nothing else to do
            ctx.stats.counters.setdefault("draft_verify.gamma", []).append(self.gamma)
            return Draft(self._chains[0], [int(ctx.root)])
        model, cache, xp = self.model, ctx.cache, self.model.xp
        tokens, tok = [int(ctx.root)], int(ctx.root)
        sampled = not ctx.params.greedy
        if self.sizing == "cost":                           # the cost check: how many draft tokens may pay
            self.cap, _ = best_length(self.estimate.acc, self.step_cost)
        # a step emits at most K + 1 tokens: K <= left - 1 (docs/draft_and_verify.md, "The last step"); at the end
        # of a cache without a window the draft's forwards and its verification must stay inside it: K <= room - 1
        k_max = self.cap if ctx.left is None else max(0, min(self.cap, int(ctx.left) - 1))
        self.drafting = k_max > 0
        if self.gate is not None and self.gate.probing:     # a probe drafts one token: the cheapest evidence
            k_max = min(k_max, self.PROBE)
        if not cache.ring:
            k_max = max(0, min(k_max, cache.W - cache.pos - 1))
        q = xp.empty((k_max, model.config.vocab_size), dtype=model.dtype) if sampled else None   # [K, V]
        for j in range(k_max):
            out = model.forward_block([tok], cache, skip=self.skip, offset=j)              # logits [1, V]
            logits = out.logits[0]                                                        # [V]
            if sampled:
                q[j] = target_probs(logits, ctx.params)                                   # [V] the draft's warped q
                tok = randomness(ctx.rng).categorical(q[j])
            else:
                tok = int(to_host(logits.argmax()))
            # confidence: the draft's own (temperature-1) probability of the token it drafted (= its top-1 when greedy)
            z = logits - logits.max()                                                     # [V]
            conf = float(to_host(xp.exp(z[tok]) / xp.exp(z).sum()))
            tokens.append(tok)
            if conf < self.gamma:
                break
        cache.discard()                                     # the draft's K/V: never committed, never verified
        K = len(tokens) - 1
        count(ctx.stats, "draft_verify.forwards", K)
        ctx.stats.counters.setdefault("draft_verify.gamma", []).append(self.gamma)
        q = q[:K] if sampled and K else None                                              # [K, V]
        if K not in self._chains:
            self._chains[K] = Tree.chain(K)
        return Draft(self._chains[K], tokens, q=q)

    def drafting_cost(self, drafted):
        """The modelled cost of a drafting step of `drafted` draft tokens (gate on): s(drafted + 1) + drafted r."""
        return self.gate.step_cost(drafted + 1, drafted * self.draft_cost)

    def observe(self, step):
        if self.adaptive and step.drafted:
            self.gamma, self.m = update_threshold(self.gamma, self.m, len(step.path) - 1, step.drafted,
                                                  step.drafted == self.cap, self.rule)
        if self.sizing == "cost" and (self.gate is None or self.drafting):
            self.estimate.observe(step.drafted, len(step.path) - 1)
        if self.gate is not None:
            cost = self.drafting_cost(step.drafted) if self.drafting else None
            self.gate.settle(self.stats, len(step.tokens), cost)


def calibration_prior(skip, default=0.5):
    """The acceptance prior of sizing="cost" and of the gate's rule-out: the skip set's calibration match rate
    (meta "calibration" "match": how often the skipped model's greedy token equals the full model's on the
    search's calibration texts, stored by `minispec search-skip`), else `default` (AcceptanceEstimate's 0.5)."""
    calib = skip.meta.get("calibration")
    if not isinstance(calib, dict) or "match" not in calib:
        return default
    return check_real("draft_verify: the skip set's calibration match", calib["match"], 0.0, 1.0)


# ---- the cost model's inputs ------------------------------------------------------------------------------------
_MEASURED = weakref.WeakKeyDictionary()


def measured_draft_costs(model, skip, max_draft):
    """(r, {N: s(N)} covering N = 1..max_draft + 1) of this model and skip set, in units of one whole plain
    step: s(N) the whole-step curve (minispec.speculative.costs.step_curve: a real verify of an N-token chain,
    shared by lookup), r one draft token, timed by `draft_cost_inputs` over a one-token forward on the curve's
    clock (medians of interleaved rounds) and converted with the curve's one-token forward; measured once per
    model and skip set. The draft forwards run the model's own weights, so they evict nothing the verify needs
    and the curve is timed without a proposal between its steps."""
    have = _MEASURED.setdefault(model, {})
    curve = step_curve(model)
    if max_draft + 1 > max(curve.costs):
        raise UserError(f"draft_verify: max_draft = {max_draft} is beyond the measured step curve (N <= "
                        f"{max(curve.costs)} tokens)")
    if skip not in have:
        have[skip] = draft_cost_inputs(model, skip, (1,), clock=backend_clock(model)[0])[0] * curve.forward
    return have[skip], curve.costs


def draft_cost_inputs(model, skip, sizes, reps=25, context=200, clock=time.process_time, K=4):
    """Draft & Verify's cost-model inputs (r, {T: c(T)}) for minispec.speculative.costs.chain_speedup (a list of
    them, one per clock, when clock is a tuple): r = one draft token (the proposer's own work per token: its
    skipped one-token forward, argmax or sampling, confidence; timed as whole proposals of K tokens) / one full
    one-token forward, c(T) the verify cost curve, all timed round-robin against a cache holding `context`
    tokens by measure_costs (medians).

    The default clock is CPU time of this process (run with one BLAS thread): on a shared machine a call's WALL
    time grows faster than its work (a longer call is preempted more often), CPU time does not."""
    proposer = DraftVerifyProposer(model, skip=skip, max_draft=K, gamma0=0.0, adaptive=False, gate=False)

    def propose(cache):
        proposer.propose(Context(1, None, model, cache, SamplingParams(), np.random.default_rng(0), Stats()))
    clocks = clock if isinstance(clock, tuple) else (clock,)
    out = [(r, curve) for curve, _, r in measure_costs(model, sizes, reps, context, clocks, propose=propose,
                                                        propose_tokens=K)]
    return out if isinstance(clock, tuple) else out[0]
