"""The skip-set search's encoding and objectives (the searches themselves: minispec.training.skip_search).

Which sublayers should the Draft & Verify draft model skip? A search over the 2L skip decisions.

Draft & Verify (Zhang et al., arXiv 2309.08168) picks the skipped attention / MLP sublayers offline with Bayesian
optimisation, maximising the measured tokens/s of self-speculative decoding on a few calibration prompts (the
authors' searching.py: one variable x_j in [0, 1] per decision, skipped when x_j > 0.5, attention decisions
first). SWIFT (Xia et al., arXiv 2410.06916, "context-based layer set optimization") scores a candidate set
instead by its *matchness*: the fraction of the full model's own greedy tokens that the skipped model
reproduces, teacher-forced, in ONE parallel forward over the full model's continuation. Both are here:

    measured   (the authors')  tokens/s of draft_verify decoding with the set, on calibration prompts (noisy)
    predicted  (SWIFT's)       matchness -> predicted speedup with a measured cost model (noise-free per set):

        m_j      = 1 if the skipped model's teacher-forced argmax equals the full model's greedy token j
        tau_k    = tokens per step of greedy chain drafting with k draft tokens, simulated on the m_j: a step
                   starting at token j accepts the run of ones m_j..m_{j+a-1} (a <= k), then the full model's
                   bonus token; so it emits a + 1 tokens and the next step starts at j + a + 1
                   (for independent m_j with P(m_j = 1) = alpha this is (1 - alpha^(k+1)) / (1 - alpha),
                   Leviathan et al. 2023, arXiv 2211.17192)
        c_d      = time of one draft token (a one-token forward of the skipped model) / time of one full step,
                   from a linear cost model of the sublayers (base + per attention + per MLP), measured once
        c(T)     = verify cost curve: time of a T-token block forward / time of one token (fit_cost_model: the
                   minimum over repetitions, like c_d, measured once and stored in the search trace)
        S_k      = tau_k / (k * c_d + c(k + 1))             AR makes 1 token per unit of time
        predicted speedup = max over k = 1..k_max of S_k   (the draft length it picks is reported as k)

The search space holds 2^(2L) sets (L = 6: 4096); with keep_ends the first and last layers are kept whole,
2^(2L - 4) sets.
"""
import time
from dataclasses import dataclass

import numpy as np

from ..backend import to_host
from ..decoders.draft_verify import SkipSet
from ..decoders.registry import generate
from ..errors import UserError
from ..mistral.layers import rope_tables, sliding_window_mask
from ..speculative.costs import interp_cost, measure_costs, speedup
from ..speculative.draft_length import best_draft_length


# ---------------------------------------------------------------------------------------------------------
# Encoding: a skip set <-> 2L decisions <-> an integer code <-> the authors' BO parameters x0..x{2L-1}
# ---------------------------------------------------------------------------------------------------------
def to_vector(skip):
    """bool [2L]: attention decisions of layers 0..L-1, then MLP decisions (the authors' x0..x{2L-1} order)."""
    return np.array(skip.attn + skip.mlp, dtype=bool)


def from_vector(x):
    x = np.asarray(x, dtype=bool).reshape(-1)
    L = len(x) // 2
    return SkipSet(tuple(x[:L]), tuple(x[L:]))


def to_code(skip):
    """The set as an integer: bit j = decision j of to_vector (attention of layer j for j < L)."""
    return int(sum(1 << j for j, s in enumerate(to_vector(skip)) if s))


def from_code(code, n_layers):
    return from_vector([(int(code) >> j) & 1 for j in range(2 * n_layers)])


def to_params(skip):
    """The authors' BO point: {"x0": 0.0 | 1.0, ...}."""
    return {f"x{j}": float(s) for j, s in enumerate(to_vector(skip))}


def from_params(params, n_layers):
    """A BO point back to a set: decision j is skipped when x_j > 0.5 (missing keys: kept)."""
    return from_vector([float(params.get(f"x{j}", 0.0)) > 0.5 for j in range(2 * n_layers)])


def free_decisions(n_layers, keep_ends=True):
    """bool [2L]: the decisions a search may set (keep_ends: never the first or last layer's sublayers)."""
    free = np.ones(2 * n_layers, dtype=bool)
    if keep_ends:
        for i in (0, n_layers - 1):
            free[i] = free[n_layers + i] = False
    return free


def search_space(n_layers, keep_ends=True):
    """Every code whose skipped decisions are all free, ascending: 2^(number of free decisions) sets."""
    free = np.flatnonzero(free_decisions(n_layers, keep_ends))
    return sorted(sum(1 << int(free[b]) for b in range(len(free)) if (i >> b) & 1) for i in range(1 << len(free)))


# ---------------------------------------------------------------------------------------------------------
# The predicted objective (SWIFT's matchness, turned into a speedup with a cost model)
# ---------------------------------------------------------------------------------------------------------
def chain_steps(matches, k):
    """(tokens, steps) of greedy chain drafting with k draft tokens along one continuation whose teacher-forced
    draft matches are `matches` (bool [n]): each step emits the run of matches it starts on (at most k) and the
    bonus token; the last step is cut at the continuation's end."""
    m = np.asarray(matches, dtype=bool)
    n, j, steps = len(m), 0, 0
    while j < n:
        a = 0
        while a < k and j + a < n and m[j + a]:
            a += 1
        j += a + 1
        steps += 1
    return n, steps


def chain_tau(match_list, k):
    """Tokens per step over several continuations: total tokens / total steps."""
    tokens, steps = map(sum, zip(*(chain_steps(m, k) for m in match_list)))
    return tokens / steps


def iid_tau(alpha, k):
    """Expected tokens per step for independent matches of probability alpha (Leviathan et al. 2023)."""
    return float(k + 1) if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


def depth_acceptance(match_list, max_depth):
    """[max_depth] per-depth acceptance of a chain draft from teacher-forced matches (bool [n] per sequence):
    a_d = P(draft token d matches | tokens 1..d-1 of the same chain matched), counted over every start j of every
    sequence with j + d - 1 inside it (as many d-token windows as fit). A depth no window reached takes the
    estimate of the depth before it (0 for depth 1), as AcceptanceEstimate does."""
    acc = []
    for d in range(1, max_depth + 1):
        reached = hits = 0
        for m in match_list:
            m = np.asarray(m, dtype=bool)
            if len(m) < d:
                continue
            prefix = np.ones(len(m) - d + 1, dtype=bool)                 # windows j..j+d-1 that fit
            for i in range(d - 1):
                prefix &= m[i:len(m) - d + 1 + i]
            reached += int(prefix.sum())
            hits += int((prefix & m[d - 1:]).sum())
        acc.append(hits / reached if reached else (acc[-1] if acc else 0.0))
    return acc


def cost_rule_rate(acc, draft_cost, costs, max_len=8):
    """(K*, predicted speed-up over plain decoding) of a chain drafter under the cost rule
    (minispec.speculative.draft_length.best_draft_length): max over K = 0..max_len of
    E(K) / (c(K + 1) + K r), E(K) from the per-depth acceptance acc, r = draft_cost; K* = 0 gives 1 / c(1)."""
    return best_draft_length(acc, costs, max_len, draft_cost)


@dataclass
class CostModel:
    """Seconds of a one-token forward = base + attn * (attention sublayers run) + mlp * (MLP sublayers run);
    curve {T: c(T)}: the verify cost curve (a T-token block / one token)."""
    n_layers: int
    base: float
    attn: float
    mlp: float
    curve: dict

    @property
    def full(self):
        return self.base + self.n_layers * (self.attn + self.mlp)

    def draft(self, skip):
        """c_d: one draft token (one-token forward of the skipped model) in units of one full-model token."""
        kept_attn, kept_mlp = self.n_layers - sum(skip.attn), self.n_layers - sum(skip.mlp)
        return (self.base + self.attn * kept_attn + self.mlp * kept_mlp) / self.full

    def verify(self, T):
        """c(T), interpolated between the measured sizes."""
        return interp_cost(self.curve, T)

    def to_json(self):
        return {"n_layers": self.n_layers, "base": self.base, "attn": self.attn, "mlp": self.mlp,
                "curve": {str(T): c for T, c in self.curve.items()}}

    @classmethod
    def from_json(cls, d):
        return cls(d["n_layers"], d["base"], d["attn"], d["mlp"], {int(T): c for T, c in d["curve"].items()})


def best_chain_speedup(match_list, draft_cost, verify_cost, k_max=8):
    """max over k of S_k = tau_k / (k * c_d + c(k + 1)) (module docstring; minispec.speculative.costs.speedup).
    verify_cost: {T: c(T)} or T -> c(T). Returns dict(speedup, k, tau, alpha)."""
    alpha = float(np.mean(np.concatenate([np.asarray(m, float) for m in match_list])))
    best = None
    for k in range(1, k_max + 1):
        tau = chain_tau(match_list, k)
        s = speedup(tau, interp_cost(verify_cost, k + 1), k * draft_cost)
        if best is None or s > best["speedup"]:
            best = dict(speedup=s, k=k, tau=tau, alpha=alpha)
    return best


def fit_cost_model(model, context=64, reps=60, sizes=(1, 2, 3, 4, 6, 8, 12, 16), flat=False):
    """Fit the CostModel on this machine against a cache of `context` tokens: one-token forwards with nothing /
    every attention / every MLP / everything skipped, interleaved (least squares for base, attn, mlp), and the
    verify cost curve c(T) from minispec.speculative.costs.measure_costs (flat=True: c(T) = 1 instead, a
    GPU-like backend).

    Each timing is the MINIMUM over reps, not the median: on a shared CPU a longer call is more likely to be
    preempted, which inflates medians unevenly; the minimum is the machine's cost of the work itself.

    So its c(T) is deliberately NOT the canonical curve (minispec.speculative.costs.backend_curve: medians of
    CPU time against 200 cached tokens), which prices what a decoder pays on average: the search ranks skip sets
    by their sublayers' cost, timed here in wall-clock minima, and c(T) must be timed the same way as the
    c_d it is compared with. The trace stores the curve it used; decoders never read it."""
    L, V = model.config.n_layers, model.config.vocab_size
    variants = [SkipSet.none(L), SkipSet((True,) * L, (False,) * L), SkipSet((False,) * L, (True,) * L),
                SkipSet((True,) * L, (True,) * L)]
    cache = model.new_cache()
    model.forward(np.arange(context) % V, cache)
    times = [np.inf] * len(variants)
    for r in range(reps + 1):
        for j, skip in enumerate(variants):
            t0 = time.perf_counter()
            out = model.forward_block([5], cache, skip=skip)
            to_host(out.logits[-1, :1])                      # wait for the device
            if r:                                            # the first round warms up
                times[j] = min(times[j], time.perf_counter() - t0)
            cache.discard()
    t = np.array(times)                                                                    # [4]
    A = np.array([[1, L, L], [1, 0, L], [1, L, 0], [1, 0, 0]], dtype=float)               # columns: base, attn, mlp
    base, attn, mlp = np.linalg.lstsq(A, t, rcond=None)[0]
    curve = {T: 1.0 for T in sizes} if flat else measure_costs(model, sizes, reps, context, stat=min)[0][0]
    return CostModel(L, max(float(base), 0.0), max(float(attn), 0.0), max(float(mlp), 0.0), curve)


@dataclass
class Calibration:
    """The full model's greedy continuations of calibration prompts: sequences[i] = prompt + continuation."""
    sequences: list
    starts: list            # len(prompt) of each: the first continuation token's index

    def to_json(self):
        return {"sequences": self.sequences, "starts": self.starts}

    @classmethod
    def from_json(cls, d):
        return cls([list(map(int, s)) for s in d["sequences"]], list(map(int, d["starts"])))


def calibrate(model, prompts, n_new=48):
    """Greedy AR continuations of n_new tokens (no EOS stop) of each prompt."""
    seqs = [[int(t) for t in p] + generate(model, p, max_new_tokens=n_new, eos_id=None).tokens for p in prompts]
    return Calibration(seqs, [len(p) for p in prompts])


def match_list(model, calib, skip, context="committed", caches=None):
    """Teacher-forced matches of the skipped model, one parallel forward per calibration sequence:
    bool [n_new] per sequence, True where the skipped model's argmax after tokens 0..t equals the full model's
    token t + 1, for every continuation token.

    context="committed" (default): the query at t reads the FULL model's keys/values of tokens 0..t-1 from a
    cache filled by the full model, and its own at t, exactly what draft_verify's first draft token after a
    commit at t sees (later draft tokens of a chain also see their own predecessors' keys/values, so this is
    slightly optimistic for them). context="own": the skipped model runs alone over the sequence (its own
    keys/values everywhere, as a SWIFT-style parallel draft over the context; slightly pessimistic).
    caches: a list to keep the full model's filled caches in between calls (one per sequence)."""
    if context not in ("committed", "own"):
        raise UserError(f"match_list: context must be 'committed' or 'own', not {context!r}")
    out = []
    for i, (seq, s) in enumerate(zip(calib.sequences, calib.starts)):
        want = np.asarray(seq[s:])                                                         # [n_new]
        if context == "own":
            logits = model.forward(seq[:-1], skip=skip)[s - 1:]                            # [n_new, V]
        else:
            logits = _committed_context_logits(model, seq, s, skip, caches, i)             # [n_new, V]
        out.append(np.asarray(to_host(logits.argmax(axis=-1))) == want)
    return out


def _committed_context_logits(model, seq, s, skip, caches, i):
    """Skipped-model logits at positions s-1 .. len-2, each query seeing the full model's cached keys/values of
    the positions before it and its own (a diagonal block mask), in one block forward."""
    if caches is not None and i < len(caches):
        cache = caches[i]
    else:
        cache = _full_model_cache(model, seq)
        if caches is not None:
            caches.append(cache)
    ids, q_pos, mask = _committed_block(model, seq, s, cache)
    # Model._run is the layer loop forward_block wraps; called directly for this one mask forward_block cannot
    # express (ring positions strictly before each query, the block diagonal)
    out = model._run(ids, q_pos, mask, cache, skip=skip)
    cache.discard()
    return out.logits


def _full_model_cache(model, seq):
    """A new cache holding the full model's K/V of every position of seq, committed."""
    cache = model.new_cache()
    if len(seq) > cache.W:
        raise UserError(f"match_list: a calibration sequence of {len(seq)} tokens does not fit the "
                         f"{cache.W}-slot cache; use shorter prompts/continuations or context='own'")
    model.forward(seq, cache)
    return cache


def _committed_block(model, seq, s, cache):
    """The committed-context block of seq's continuation from s: ids seq[s-1 .. len-2] at positions q_pos, and
    the mask [n_new, C + n_new] on the device (each query sees the cached slots strictly before it and itself);
    the block's scratch rows are begun (cache.discard() ends it)."""
    q_pos = np.arange(s - 1, len(seq) - 1)                                                 # [n_new]
    slots = cache.slot_positions()                                                         # [C]
    ring = sliding_window_mask(q_pos, slots, model.config.sliding_window) & (slots[None, :] < q_pos[:, None])
    mask = np.concatenate([ring, np.eye(len(q_pos), dtype=bool)], axis=1)                # [n_new, C + n_new]
    cache.begin_block(len(q_pos))
    return np.asarray(seq[s - 1:-1], dtype=np.int64), q_pos, model.xp.asarray(mask)


def all_match_lists(model, calib):
    """match_list (committed context) for EVERY one of the 4^L skip sets at once -> {code: [bool [n_new], ...]}.

    A depth-first walk over the layers: the residual stream after layers 0..i depends only on the decisions of
    those layers, so it is computed once per prefix (sum of 4^i layer passes for i = 1..L instead of L * 4^L,
    4.5x fewer for L = 6) and each of the 4 choices of the next layer continues from it; layer i's attention is
    computed once for its two MLP choices. The sublayers are the model's own (Model.attention_sublayer,
    mlp_sublayer, final) under the committed-context mask of _committed_context_logits; tests check that every
    set's result equals match_list's."""
    c, L = model.config, model.config.n_layers
    out = {}
    for i_seq, (seq, s) in enumerate(zip(calib.sequences, calib.starts)):
        cache = _full_model_cache(model, seq)
        ids, q_pos, mask = _committed_block(model, seq, s, cache)
        want = np.asarray(seq[s:])
        cos, sin = rope_tables(q_pos, c.head_dim, c.rope_theta, model.xp, model.dtype)     # [T, Dh/2]

        def walk(i, x, code):
            if i == L:
                logits = model.final(x).logits                                             # [T, V]
                out.setdefault(code, [None] * len(calib.sequences))[i_seq] = \
                    np.asarray(to_host(logits.argmax(axis=-1))) == want
                return
            # layer i's K/V go to its scratch rows, which only this attention reads (each sibling rewrites them)
            attended = model.attention_sublayer(i, x, cos, sin, mask, cache)               # [T, D]
            for skip_attn, y in ((False, attended), (True, x)):
                for skip_mlp in (False, True):
                    walk(i + 1, y if skip_mlp else model.mlp_sublayer(i, y),
                         code | (skip_attn << i) | (skip_mlp << (L + i)))

        walk(0, model.tok_embeddings[model.xp.asarray(ids)], 0)                            # x: [T, D]
        cache.discard()
    return out


class PredictedObjective:
    """SWIFT's matchness on calibration continuations, turned into a predicted speedup (module docstring)."""
    name = "predicted"

    def __init__(self, model, calib, costs, k_max=8, context="committed"):
        self.model, self.calib, self.costs, self.k_max, self.context = model, calib, costs, k_max, context
        self._caches, self._every = [], None

    def precompute(self):
        """Score every set's matches in one depth-first walk (all_match_lists); later calls only look up."""
        if self.context != "committed":
            raise UserError("precompute: the depth-first walk implements context='committed' only")
        self._every = all_match_lists(self.model, self.calib)

    def __call__(self, skip):
        if self._every is not None:
            m = self._every[to_code(skip)]
        else:
            m = match_list(self.model, self.calib, skip, self.context, self._caches)
        c_d = self.costs.draft(skip)
        r = best_chain_speedup(m, c_d, self.costs.verify, self.k_max)
        flat = best_chain_speedup(m, c_d, lambda T: 1.0, self.k_max)     # the same draft where c(T) = 1 (GPU-like)
        return dict(value=r["speedup"], match=r["alpha"], tau=r["tau"], k=r["k"], draft_cost=c_d,
                    flat_speedup=flat["speedup"], flat_k=flat["k"], flat_tau=flat["tau"])


class MeasuredObjective:
    """The authors' objective: tokens/s of draft_verify decoding (greedy) with the set on calibration prompts."""
    name = "measured"

    def __init__(self, model, prompts, n_new=32, **decoder_options):
        self.model, self.prompts, self.n_new, self.options = model, prompts, n_new, decoder_options

    def __call__(self, skip):
        tokens = steps = 0
        seconds = 0.0
        for p in self.prompts:
            o = generate(self.model, p, decoder="draft_verify", max_new_tokens=self.n_new, eos_id=None,
                         skip=skip, **self.options)
            tokens, steps, seconds = tokens + o.stats.new_tokens, steps + o.stats.steps, seconds + o.stats.decode_time
        return dict(value=tokens / seconds, tau=tokens / steps)
