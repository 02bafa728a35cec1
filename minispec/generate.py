"""generate(): one decoding loop for every decoder — propose a draft, verify it in one forward, commit, repeat.

    out = minispec.generate(model, ids, decoder="ar", max_new_tokens=64, temperature=0.0, seed=0)
    out.tokens            # the new token ids (never past max_new_tokens, never past the first EOS)
    out.stats             # steps, tokens per step (histogram, tau), forward calls, times, tokens/s

A decoder is a proposer, an object with three methods:

    start(ctx, prompt_hidden)  once, after the prefill: prompt_hidden [len(ids) - 1, D] are the final hidden states
                               of the prefilled prompt tokens (all but the last, which is the first root), so that
                               a proposer with a cache of its own (Hydra++'s prefix layer) can fill it; a proposer
                               with per-generation state resets it here
    propose(ctx) -> Draft      ctx: a Context (the root token, the hidden state at the last accepted node, the
                               model's cache, the sampling parameters, the rng, the running Stats);
                               Draft: a Tree, its node tokens, and for sampled drafts the draft's distributions q
    observe(step) -> None      called after every verification with the Verified step (the accepted path, its
                               hidden states, the tokens emitted), so that a proposer with state of its own
                               (Hydra++'s prefix cache, Draft & Verify's threshold) can update it

"ar" proposes nothing (the root-only tree), so plain decoding is the verifier's degenerate case and every decoder
shares exactly the same verification and commit code. A proposer may count its own work in ctx.stats.counters
(e.g. head calls, draft forwards) and its time is measured as stats.propose_time.
"""
import inspect
import time
from dataclasses import dataclass, field

import numpy as np

from .errors import UserError, check_int, check_token_ids, warn_if_past_max_positions
from .sampling import (SamplingParams, chain_rejection_accept, check_generation, greedy_accept, target_probs,
                       tree_rejection_accept, typical_accept)
from .tree import Tree
from .verify import Draft, verify


@dataclass
class Stats:
    steps: int = 0                                  # verification steps
    accepted: list = field(default_factory=list)    # tokens emitted per step (accepted draft tokens + bonus)
    forward_calls: int = 0                          # model forwards, prefill chunks included
    prefill_time: float = 0.0
    decode_time: float = 0.0                        # from the first step to the last token
    decode_cpu_time: float = 0.0                    # this process's CPU time (all threads) over decode_time
    propose_time: float = 0.0                       # of decode_time: inside proposer.propose / observe
    verify_time: float = 0.0                        # of decode_time: inside verify (one forward + accept + commit)
    drafted: list = field(default_factory=list)     # draft tokens proposed per step (tree nodes after the root)
    counters: dict = field(default_factory=dict)    # the proposer's own counts (head calls, draft forwards, ...)

    @property
    def new_tokens(self):
        return int(sum(self.accepted))

    @property
    def tau(self):
        """Mean tokens per verification step (1.0 for plain decoding)."""
        return self.new_tokens / self.steps if self.steps else 0.0

    @property
    def histogram(self):
        """histogram[n] = steps that emitted n tokens."""
        return np.bincount(np.asarray(self.accepted, dtype=np.int64)) if self.accepted else np.zeros(1, np.int64)

    @property
    def wall_time(self):
        return self.prefill_time + self.decode_time

    @property
    def tokens_per_s(self):
        """Generated tokens per second of decoding (prefill excluded)."""
        return self.new_tokens / self.decode_time if self.decode_time > 0 else float("nan")


@dataclass
class Output:
    tokens: list
    stats: Stats


@dataclass
class Context:
    """What a proposer sees before each step (the arguments of propose)."""
    root: int               # the newest token: chosen, not yet in the cache; the draft's node 0
    hidden: object          # [D] final hidden state at the last accepted node; None before the first step
    model: object
    cache: object           # the committed cache (cache.pos tokens); a proposer must not commit to it
    params: SamplingParams
    rng: object             # numpy Generator shared with the acceptance rule
    stats: Stats


class Autoregressive:
    """The empty draft: every step verifies only the root, i.e. one ordinary decoding step."""
    name = "ar"

    def __init__(self, model):
        self.tree = Tree.from_choices([])

    def start(self, ctx, prompt_hidden):
        pass

    def propose(self, ctx):
        return Draft(self.tree, [ctx.root])

    def observe(self, step):
        pass


DECODERS = {"ar": Autoregressive}


def _medusa(model, heads=None, tree=None, top_k=None):
    """Decoder "medusa" (minispec.medusa.MedusaProposer), imported on first use. heads: MedusaHeads or a folder."""
    from .medusa import MedusaProposer
    return MedusaProposer(model, heads=heads, tree=tree, top_k=top_k)


DECODERS["medusa"] = _medusa


def _hydra(model, heads=None, tree=None):
    """Decoder "hydra" (minispec.hydra.HydraProposer, heads at <model.path>/hydra/), imported on first use."""
    from .hydra import HydraProposer
    return HydraProposer(model, kind="hydra", heads=heads, tree=tree)


def _hydra_pp(model, heads=None, tree=None):
    """Decoder "hydra++" (Hydra++: prefix attention layer + heads at <model.path>/hydra++/)."""
    from .hydra import HydraProposer
    return HydraProposer(model, kind="hydra++", heads=heads, tree=tree)


DECODERS["hydra"] = _hydra
DECODERS["hydra++"] = _hydra_pp


def _draft_verify(model, skip=None, max_draft=None, gamma0=None, adaptive=True):
    """Decoder "draft_verify" (minispec.draft_verify.DraftVerifyProposer), imported on first use. skip: a SkipSet,
    a skip_set.json path, or None for <model>/draft_verify/skip_set.json."""
    from .draft_verify import DraftVerifyProposer
    return DraftVerifyProposer(model, skip=skip, max_draft=max_draft, gamma0=gamma0, adaptive=adaptive)


DECODERS["draft_verify"] = _draft_verify


def decoders_with_heads():
    """The registered decoders whose factory takes heads= (a folder of heads or heads object), sorted."""
    def takes(f):
        params = inspect.signature(f).parameters
        return "heads" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())
    return sorted(n for n, f in DECODERS.items() if takes(f))


def check_decoder(name, **options):
    """The factory registered as `name`, or UserError listing the registered decoders; options the factory does
    not take are refused by name (a factory that takes **options checks its own)."""
    if name not in DECODERS:
        raise UserError(f"decoder must be one of {', '.join(repr(d) for d in sorted(DECODERS))}, not {name!r}")
    factory = DECODERS[name]
    try:
        inspect.signature(factory).bind(None, **options)
    except TypeError as e:
        raise UserError(f"decoder {name!r} does not take that option: {e}") from None
    except ValueError:          # no signature (a builtin): nothing to check here
        pass
    return factory


def make_proposer(name, model, **options):
    """The proposer of registered decoder `name` for this model."""
    return check_decoder(name, **options)(model, **options)


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


def make_rule(params, acceptance, rng):
    """The acceptance rule, rule(draft, logits [N, V]) -> (path, bonus): greedy for temperature 0, lossless
    rejection sampling otherwise ("typical" on request: Medusa's lossy rule)."""
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
    raise UserError(f"acceptance must be 'greedy', 'rejection' or 'typical', not {acceptance!r}")


def generate(model, ids, decoder="ar", max_new_tokens=64, temperature=0.0, top_k=0, top_p=1.0, seed=0,
             eos_id=2, acceptance=None, on_token=None, cache=None, **decoder_options):
    """Decode up to max_new_tokens after the prompt ids with `decoder` ("ar" or a registered speculative one,
    or a proposer object). Stops at eos_id (included in the output; None disables it). on_token(id) is called
    for each new token as soon as it is final. Returns Output(tokens, stats)."""
    ids = [int(t) for t in check_token_ids(ids, model.config.vocab_size, what="prompt")]
    params = check_generation(temperature, top_k, top_p, seed, max_new_tokens)
    rng = np.random.default_rng(seed)
    rule = make_rule(params, acceptance, rng)
    if eos_id is not None:
        check_int("eos_id", eos_id, low=0, what=" or None")
    proposer = make_proposer(decoder, model, **decoder_options) if isinstance(decoder, str) else decoder
    stats = Stats()
    cache = model.new_cache() if cache is None else cache
    end = cache.pos + len(ids) + max_new_tokens - 1                  # positions the request may reach
    if not cache.ring and end > cache.W:
        raise UserError(f"the prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) do not fit the cache "
                        f"of {cache.W} positions (max_seq_len; the model has no sliding window to wrap)")
    # one warning for the whole request (the decode steps' block forwards do not check; the prefill would)
    warn_if_past_max_positions(end, model.config.max_seq_len,
                               what=f"the prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens})")
    clock = time.perf_counter
    t0 = clock()
    if len(ids) > 1:          # the last prompt token is the first root: it is verified (and committed) by step 1
        _, prompt_hidden = model.forward(ids[:-1], cache, return_hidden=True, warn_positions=False)   # [len - 1, D]
        stats.forward_calls += -(-(len(ids) - 1) // model.prefill_chunk(cache))
    else:
        prompt_hidden = model.xp.zeros((0, model.config.dim), dtype=model.dtype)            # [0, D]
    stats.prefill_time = clock() - t0
    t1 = clock()
    proposer.start(Context(ids[-1], None, model, cache, params, rng, stats), prompt_hidden)
    stats.propose_time += clock() - t1

    out, root, hidden = [], ids[-1], None
    t0, cpu0 = clock(), time.process_time()
    while len(out) < max_new_tokens:
        t1 = clock()
        draft = proposer.propose(Context(root, hidden, model, cache, params, rng, stats))
        t2 = clock()
        step = verify(model, cache, draft, rule, limit=max_new_tokens - len(out), eos_id=eos_id)
        t3 = clock()
        proposer.observe(step)
        stats.propose_time += (t2 - t1) + (clock() - t3)
        stats.verify_time += t3 - t2
        stats.steps += 1
        stats.forward_calls += 1
        new = step.tokens
        stats.accepted.append(len(new))
        stats.drafted.append(step.drafted)
        out += new
        for t in new:
            if on_token:
                on_token(t)
        if eos_id is not None and new and new[-1] == eos_id:
            break
        root, hidden = step.bonus, step.hidden
    stats.decode_time = time.perf_counter() - t0
    stats.decode_cpu_time = time.process_time() - cpu0
    return Output(tokens=out, stats=stats)
