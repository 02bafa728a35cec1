"""generate(): one decoding loop for every decoder — propose a draft, verify it in one forward, commit, repeat.

    out = minispec.generate(model, ids, decoder="ar", max_new_tokens=64, temperature=0.0, seed=0)
    out.tokens            # the new token ids (never past max_new_tokens, never past the first EOS)
    out.stats             # steps, tokens per step (histogram, tau), forward calls, times, tokens/s

A decoder is a proposer: given the current root token and the hidden state at the last accepted node, it
returns a Tree and the tokens of its nodes. "ar" proposes nothing (the root-only tree), so plain decoding is the
verifier's degenerate case and every decoder shares exactly the same verification and commit code.
"""
import time
from dataclasses import dataclass, field

import numpy as np

from .backend import to_host
from .sampling import SamplingParams, greedy_accept, target_probs, tree_rejection_accept, typical_accept
from .tree import Tree
from .verify import verify


@dataclass
class Stats:
    steps: int = 0                                  # verification steps
    accepted: list = field(default_factory=list)    # tokens emitted per step (accepted draft tokens + bonus)
    forward_calls: int = 0                          # model forwards, prefill chunks included
    prefill_time: float = 0.0
    decode_time: float = 0.0                        # from the first step to the last token

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


class Autoregressive:
    """The empty draft: every step verifies only the root, i.e. one ordinary decoding step."""
    name = "ar"

    def __init__(self, model):
        self.tree = Tree.from_choices([])

    def propose(self, root, hidden):
        return self.tree, [root]


DECODERS = {"ar": Autoregressive}


def _medusa(model, **options):
    """Decoder "medusa" (minispec.medusa.MedusaProposer), imported on first use."""
    from .medusa import MedusaProposer
    return MedusaProposer(model, **options)


DECODERS["medusa"] = _medusa


def make_rule(params, acceptance, rng):
    """The acceptance rule: greedy for temperature 0, lossless tree rejection sampling otherwise ("typical" on
    request: Medusa's lossy rule)."""
    if acceptance is None:
        acceptance = "greedy" if params.greedy else "rejection"
    if acceptance == "greedy":
        if not params.greedy:
            raise ValueError("acceptance='greedy' needs temperature=0")
        return greedy_accept
    if acceptance == "rejection":
        return lambda tree, tokens, logits: tree_rejection_accept(tree, tokens, target_probs(logits, params), rng)
    if acceptance == "typical":
        return lambda tree, tokens, logits: typical_accept(tree, tokens, logits, params, rng=rng)
    raise ValueError(f"acceptance must be 'greedy', 'rejection' or 'typical', not {acceptance!r}")


def generate(model, ids, decoder="ar", max_new_tokens=64, temperature=0.0, top_k=0, top_p=1.0, seed=0,
             eos_id=2, acceptance=None, on_token=None, cache=None, **decoder_options):
    """Decode up to max_new_tokens after the prompt ids with `decoder` ("ar" or a registered speculative one,
    or a proposer object). Stops at eos_id (included in the output; None disables it). on_token(id) is called
    for each new token as soon as it is final. Returns Output(tokens, stats)."""
    ids = [int(t) for t in np.asarray(to_host(ids)).reshape(-1)]
    if not ids:
        raise ValueError("generate: the prompt must hold at least one token (e.g. BOS)")
    if max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    rng = np.random.default_rng(seed)
    rule = make_rule(params, acceptance, rng)
    if isinstance(decoder, str):
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {sorted(DECODERS)}, not {decoder!r}")
        proposer = DECODERS[decoder](model, **decoder_options)
    else:
        proposer = decoder
    stats = Stats()
    cache = model.new_cache() if cache is None else cache

    t0 = time.perf_counter()
    if len(ids) > 1:          # the last prompt token is the first root: it is verified (and committed) by step 1
        model.forward(ids[:-1], cache)
        stats.forward_calls += -(-(len(ids) - 1) // model.prefill_chunk(cache))
    stats.prefill_time = time.perf_counter() - t0

    out, root, hidden = [], ids[-1], None
    t0 = time.perf_counter()
    while len(out) < max_new_tokens:
        tree, tokens = proposer.propose(root, hidden)
        step = verify(model, cache, tree, tokens, rule, limit=max_new_tokens - len(out), eos_id=eos_id)
        stats.steps += 1
        stats.forward_calls += 1
        new = step.tokens
        stats.accepted.append(len(new))
        out += new
        for t in new:
            if on_token:
                on_token(t)
        if eos_id is not None and new and new[-1] == eos_id:
            break
        root, hidden = step.bonus, step.hidden
    stats.decode_time = time.perf_counter() - t0
    return Output(tokens=out, stats=stats)
