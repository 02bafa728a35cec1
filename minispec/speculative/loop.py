"""The decoding loop every decoder runs, and the contract a decoder (a Proposer) keeps with it.

    propose a draft -> verify it in one forward (minispec.speculative.verify) -> commit -> repeat

A decoder is a Proposer, an object with three methods:

    start(ctx, prompt_hidden)  once, after the prefill: prompt_hidden [len(ids) - 1, D] are the final hidden states
                               of the prefilled prompt tokens (all but the last, which is the first root), so that
                               a proposer with a cache of its own (Hydra++'s prefix layer) can fill it; a proposer
                               with per-generation state resets it here
    propose(ctx) -> Draft      ctx: a Context (the root token, the hidden state at the last accepted node, the
                               model's cache, the sampling parameters, the rng, the running Stats, the tokens
                               the request has left, the prompt ids);
                               Draft: a Tree, its node tokens, and for sampled drafts the draft's distributions q
    observe(step) -> None      called after every verification with the Verified step (the accepted path, its
                               hidden states, the tokens emitted), so that a proposer with state of its own
                               (Hydra++'s prefix cache, Draft & Verify's threshold) can update it

Plain decoding is the proposer whose draft is the root alone, so every decoder shares exactly the same
verification and commit code. A proposer may count its own work in ctx.stats.counters (e.g. head calls, draft
forwards) and its time is measured as stats.propose_time. This module knows no decoder: the registry of names
(minispec.decoders.registry) sits above it.
"""
import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ..mistral.model import prefill_chunks
from .sampling import SamplingParams
from .verify import Draft, Verified, cut_draft, verify


@dataclass
class Stats:
    steps: int = 0                                  # verification steps
    accepted: list = field(default_factory=list)    # tokens emitted per step (accepted draft tokens + bonus)
    forward_calls: int = 0                          # model forwards, prefill chunks included
    prefill_time: float = 0.0
    decode_time: float = 0.0                        # from the first step to the last token
    decode_cpu_time: float = 0.0                    # this process's CPU time (all threads) over decode_time
    propose_time: float = 0.0                       # of decode_time: inside proposer.propose / observe
    propose_cpu_time: float = 0.0                   # the same calls in this process's CPU time (all threads)
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
    left: int = None        # tokens the request may still emit (None: unbounded); a draft deeper than left - 1
                            # cannot be used in full, so a proposer may stop drafting there
    prompt: list = None     # the prompt ids (host ints, ending with the first root): for a proposer that reads text


class Proposer(Protocol):
    """What run_loop asks of a decoder (see the module docstring)."""
    name: str

    def start(self, ctx: Context, prompt_hidden) -> None: ...

    def propose(self, ctx: Context) -> Draft: ...

    def observe(self, step: Verified) -> None: ...


def run_loop(model, ids, proposer, rule, params, rng, max_new_tokens, eos_id, on_token, cache):
    """Prefill ids[:-1] into `cache`, then propose / verify / commit until max_new_tokens tokens or eos_id.

    ids: checked host ints; rule(draft, logits) -> (path, bonus) an acceptance rule bound to `params` and `rng`
    (minispec.speculative.acceptance.make_rule); cache: the model's cache to decode into. The caller has checked
    that the request fits the cache; near the end of a cache without a window each draft is cut to the positions
    left (verify.cut_draft), so every decoder finishes a request that fits.
    Returns Output(tokens, stats).
    """
    stats = Stats()
    clock = time.perf_counter
    t0 = clock()
    if len(ids) > 1:          # the last prompt token is the first root: it is verified (and committed) by step 1
        _, prompt_hidden = model.forward(ids[:-1], cache, return_hidden=True, warn_positions=False)   # [len - 1, D]
        stats.forward_calls += len(prefill_chunks(len(ids) - 1, cache))
    else:
        prompt_hidden = model.xp.zeros((0, model.config.dim), dtype=model.dtype)            # [0, D]
    stats.prefill_time = clock() - t0
    t1, c1 = clock(), time.process_time()
    proposer.start(Context(ids[-1], None, model, cache, params, rng, stats, prompt=ids), prompt_hidden)
    stats.propose_time += clock() - t1
    stats.propose_cpu_time += time.process_time() - c1

    out, root, hidden = [], ids[-1], None
    t0, cpu0 = clock(), time.process_time()
    while len(out) < max_new_tokens:
        t1, c1 = clock(), time.process_time()
        left = max_new_tokens - len(out)
        draft = proposer.propose(Context(root, hidden, model, cache, params, rng, stats, left, prompt=ids))
        if not cache.ring:      # a cache without a window: the draft fits the positions left (verify.cut_draft)
            draft = cut_draft(draft, cache.W - cache.pos)
        t2, c2 = clock(), time.process_time()
        step = verify(model, cache, draft, rule, limit=max_new_tokens - len(out), eos_id=eos_id)
        t3, c3 = clock(), time.process_time()
        proposer.observe(step)
        stats.propose_time += (t2 - t1) + (clock() - t3)
        stats.propose_cpu_time += (c2 - c1) + (time.process_time() - c3)
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
