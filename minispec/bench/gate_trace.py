"""What drafting would give at every position of a greedy decode, for replaying a draft gate without a model
(minispec.speculative.gate: `trace_step`, `replay_gate`, `best_schedule`; tools/measure_gate.py; docs/costs.md,
"What the gate earns").

Greedy output does not depend on the drafts. So one decode that runs plain steps only, and at every position also
verifies the decoder's draft without committing it (its scratch rows discarded), records what a drafting step
there would emit and what the decoder's own cost model prices it at. A gated decode of the same prompt is that
trace replayed: the same positions, the same decisions, the same modelled cost.
"""
import numpy as np

from ..backend import to_host
from ..decoders.hydra import PREFIX_ROWS
from ..decoders.lookup import NgramIndex
from ..speculative.acceptance import greedy_accept
from ..speculative.gate import DraftGate, trace_step
from ..speculative.loop import Context, Stats
from ..speculative.sampling import SamplingParams
from ..speculative.tree import Tree
from ..speculative.verify import Draft, verify
from ..training.calibrate import root_confidence


def draft_price(prop, path, drafted):
    """(tokens, cost, per_row, probe) of the drafting step just proposed, `drafted` draft tokens of which the
    greedy walk accepted `path` (root included): its modelled cost as the proposer's gate prices it
    (`drafting_cost`); per_row: Hydra++'s catch-up charge per row (0 for others); probe: (tokens, cost) of a
    probe, for a proposer whose probe drafts only its first PROBE tokens (Draft & Verify), else None."""
    k = getattr(prop, "PROBE", None)
    probe = None if k is None else (1 + min(len(path) - 1, k), prop.drafting_cost(k))
    pc = getattr(prop, "prefix_cost", None)
    return len(path), prop.drafting_cost(drafted), (pc.per_row if pc is not None else 0.0), probe


def gate_trace(model, prop, ids, n_tokens):
    """The trace of one prompt (a list of `trace_step` records, None where the proposer drafts nothing) for a
    gated proposer `prop` (its gate is switched to always draft, so every position gets a record); each record
    also holds two cheap features of the context a gate could read before deciding: "confidence", the target's
    top probability where it chose that position's root (None at the first), and "match", the length of the
    longest suffix of the text (prompt and output, root included) of 1 to 3 tokens that occurs earlier in it
    (prompt lookup's match, minispec.decoders.lookup; 0 when none). Greedy, n_tokens plain steps. Returns (trace,
    the tokens emitted: plain decoding's)."""
    prop.gate.enabled = False
    params, rng, stats, seen = SamplingParams(), np.random.default_rng(0), Stats(), {}

    def plain_rule(draft, logits):              # greedy, and the target's confidence in the token it picks
        seen["confidence"] = float(root_confidence(to_host(logits[0])))
        return greedy_accept(draft.tree, draft.tokens, logits)
    cache = model.new_cache()
    _, prompt_hidden = model.forward(ids[:-1], cache, return_hidden=True, warn_positions=False)
    prop.start(Context(ids[-1], None, model, cache, params, rng, stats, prompt=ids), prompt_hidden)
    root, hidden, confidence, out, records, plain = ids[-1], None, None, [], [], Tree.from_choices([])
    text = NgramIndex(1, 3)
    text.extend(ids)
    for t in range(n_tokens):
        draft = prop.propose(Context(root, hidden, model, cache, params, rng, stats, n_tokens - t, prompt=ids))
        rec = None
        if draft.tree.N > 1:
            o = model.forward_block(draft.tokens, cache, depths=draft.tree.depths, parents_mask=draft.tree.mask)
            path, _ = greedy_accept(draft.tree, draft.tokens, o.logits)
            cache.discard()                                       # never committed: the ring is untouched
            tokens, cost, per_row, probe = draft_price(prop, path, draft.tree.N - 1)
            rec = trace_step(tokens, cost, per_row, PREFIX_ROWS, probe)
            rec["confidence"], rec["match"] = confidence, text.match()[0]
        records.append(rec)
        step = verify(model, cache, Draft(plain, [root]), plain_rule)
        prop.observe(step)
        confidence = seen["confidence"]
        out += step.tokens
        text.extend(step.tokens)
        root, hidden = step.bonus, step.hidden
    return records, out


def gate_like(gate, **changes):
    """A fresh, enabled DraftGate on `gate`'s cost model and settings, with the changes given (and its
    rule-out kept)."""
    kw = dict(gate.settings(), enabled=True)
    kw.update(changes)
    g = DraftGate(**kw)
    g.hopeless = gate.hopeless
    return g
