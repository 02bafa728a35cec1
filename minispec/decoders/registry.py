"""The decoders by name, and generate(): minispec's one entry point for decoding.

    out = minispec.generate(model, ids, decoder="ar", max_new_tokens=64, temperature=0.0, seed=0)
    out.tokens            # the new token ids (never past max_new_tokens, never past the first EOS)
    out.stats             # steps, tokens per step (histogram, tau), forward calls, times, tokens/s

A decoder name maps to a factory factory(model, **options) -> Proposer (minispec.speculative.loop). "ar"
proposes nothing (the root-only tree), so plain decoding is the verifier's degenerate case. The registry sits
above the loop: the loop knows no decoder, and a new decoder is one file in this folder and one line here.
"""
import inspect
import json
from pathlib import Path

import numpy as np

from ..errors import UserError, check_int, check_token_ids, warn_if_past_max_positions
from ..speculative.acceptance import make_rule
from ..speculative.loop import run_loop
from ..speculative.sampling import check_generation
from ..speculative.tree import Tree
from ..speculative.verify import Draft
from .draft_verify import DraftVerifyProposer
from .heads import heads_for
from .hydra import HydraProposer
from .hydra_files import load_heads as load_hydra
from .lookup import LookupProposer
from .medusa import MedusaProposer
from .medusa_files import load_heads as load_medusa


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


def medusa(model, heads=None, tree=None, top_k=None, max_nodes=None, max_depth=None, width=None, costs=None,
           depth_costs=None, cap=None, head_vocab="auto", token_counts=None, gate=True, calibrate=None, lookup=None):
    """Decoder "medusa": K independent heads on the last hidden state. heads: MedusaHeads, a folder, or None for
    <model>/medusa/. tree: a static tree (Tree or choices; default the stored one) or "dynamic" (grown at every
    step from the heads' probabilities: max_nodes an int or "auto", max_depth, top_k, width, costs, depth_costs,
    cap, calibrate; minispec.speculative.dynamic_tree). head_vocab=M: draft only among the M most frequent tokens
    of token_counts (default <model>/token_counts.json; minispec.decoders.head_vocab); "auto" (default): M = 1024
    for a static tree on a CPU, None (the full vocabulary) on a GPU or for tree="dynamic". gate: True (default: a step
    drafts only while the acceptance so far says drafting pays on this backend's cost model;
    minispec.speculative.gate), False, or a DraftGate. lookup=L (dynamic trees): prompt lookup's continuation of
    the context, up to L tokens, joins every tree (minispec.decoders.lookup.ContextChain)."""
    return MedusaProposer(model, heads_for(model, heads, "medusa", load_medusa, "Medusa"), tree=tree, top_k=top_k,
                          max_nodes=max_nodes, max_depth=max_depth, width=width, costs=costs,
                          depth_costs=depth_costs, cap=cap, head_vocab=head_vocab, token_counts=token_counts,
                          gate=gate, calibrate=calibrate, lookup=lookup)


def hydra_heads(model, heads, kind):
    """Hydra heads of `kind` for a decoder of that name: a Hydra++ decoder refuses plain Hydra heads and back."""
    given = heads
    heads = heads_for(model, heads, kind, load_hydra)
    if heads.kind != kind:
        where = f"{given} holds" if isinstance(given, (str, Path)) else "these are"
        raise UserError(f"decoder {kind!r} needs {kind} heads, but {where} {heads.kind} heads (arch {heads.arch!r})")
    return heads


def hydra(model, heads=None, tree=None, max_nodes=None, max_depth=None, top_k=None, width=None, costs=None,
          depth_costs=None, cap=None, head_vocab="auto", token_counts=None, gate=True, calibrate=None, lookup=None):
    """Decoder "hydra": sequentially dependent heads (heads at <model>/hydra/ unless given). tree: static (default
    the stored one) or "dynamic" with the options of `medusa` (lookup included); head_vocab and token_counts as
    for `medusa`."""
    return HydraProposer(model, hydra_heads(model, heads, "hydra"), tree=tree, max_nodes=max_nodes,
                         max_depth=max_depth, top_k=top_k, width=width, costs=costs, depth_costs=depth_costs, cap=cap,
                         head_vocab=head_vocab, token_counts=token_counts, gate=gate, calibrate=calibrate,
                         lookup=lookup)


def hydra_pp(model, heads=None, tree=None, max_nodes=None, max_depth=None, top_k=None, width=None, costs=None,
             depth_costs=None, cap=None, head_vocab="auto", token_counts=None, gate=True, calibrate=None,
             lookup=None):
    """Decoder "hydra++": Hydra's heads after a prefix attention layer (heads at <model>/hydra++/ unless given).
    tree: static (default the stored one) or "dynamic" with the options of `medusa` (lookup included); head_vocab
    and token_counts as for `medusa`."""
    return HydraProposer(model, hydra_heads(model, heads, "hydra++"), tree=tree, max_nodes=max_nodes,
                         max_depth=max_depth, top_k=top_k, width=width, costs=costs, depth_costs=depth_costs, cap=cap,
                         head_vocab=head_vocab, token_counts=token_counts, gate=gate, calibrate=calibrate,
                         lookup=lookup)


def draft_verify(model, skip=None, max_draft=None, gamma0=None, adaptive=True, sizing="threshold", costs=None,
                 draft_cost=None, gate=True):
    """Decoder "draft_verify": the model itself with some sublayers skipped drafts a chain. skip: a SkipSet, a
    skip_set.json path, or None for <model>/draft_verify/skip_set.json; sizing="cost": the cost rule caps drafts."""
    return DraftVerifyProposer(model, skip=skip, max_draft=max_draft, gamma0=gamma0, adaptive=adaptive,
                               sizing=sizing, costs=costs, draft_cost=draft_cost, gate=gate)


DECODERS = {"ar": Autoregressive, "medusa": medusa, "hydra": hydra, "hydra++": hydra_pp, "draft_verify": draft_verify,
            "lookup": LookupProposer}


def decoders_with_heads():
    """The registered decoders whose factory takes heads= (a folder of heads or heads object), sorted."""
    def takes(f):
        params = inspect.signature(f).parameters
        return "heads" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())
    return sorted(n for n, f in DECODERS.items() if takes(f))


def decoder_options(name):
    """The options the factory of registered decoder `name` takes (its keyword parameters after the model), and
    whether it also takes **options (then it checks its own)."""
    params = list(inspect.signature(DECODERS[name]).parameters.values())[1:]
    named = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return named, any(p.kind == p.VAR_KEYWORD for p in params)


def check_decoder(name, **options):
    """The factory registered as `name`, or UserError listing the registered decoders; an option the factory does
    not take is refused naming the decoder, the option and the options it takes (a factory that takes **options
    checks its own)."""
    if name not in DECODERS:
        raise UserError(f"decoder must be one of {', '.join(repr(d) for d in sorted(DECODERS))}, not {name!r}")
    try:
        named, open_ended = decoder_options(name)
    except ValueError:          # no signature (a builtin): nothing to check here
        return DECODERS[name]
    unknown = [k for k in options if k not in named]
    if unknown and not open_ended:
        takes = f"its options: {', '.join(named)}" if named else "it takes no options"
        raise UserError(f"decoder {name!r} has no option {unknown[0]!r} ({takes})")
    return DECODERS[name]


def make_proposer(name, model, **options):
    """The proposer of registered decoder `name` for this model."""
    return check_decoder(name, **options)(model, **options)


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
    if not all(callable(getattr(proposer, m, None)) for m in ("start", "propose", "observe")):
        raise UserError(f"decoder must be a registered name ({', '.join(sorted(DECODERS))}) or a Proposer (an object "
                        f"with start, propose and observe: minispec.speculative.loop), not {type(decoder).__name__}")
    if decoder_options and not isinstance(decoder, str):
        raise UserError(f"decoder options {sorted(decoder_options)} go with a decoder name; this decoder is a "
                        f"{type(decoder).__name__} object, already built")
    cache = model.new_cache() if cache is None else cache
    end = cache.pos + len(ids) + max_new_tokens - 1                  # positions the request may reach
    if not cache.ring and end > cache.W:
        raise UserError(f"the prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) do not fit the cache "
                        f"of {cache.W} positions (max_seq_len; the model has no sliding window to wrap)")
    # one warning for the whole request (the decode steps' block forwards do not check; the prefill would)
    warn_if_past_max_positions(end, model.config.max_seq_len,
                               what=f"the prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens})")
    return run_loop(model, ids, proposer, rule, params, rng, max_new_tokens, eos_id, on_token, cache)


# ---------------------------------------------------------------------------------------------------------
# Decoder options as text (the command line: `--option KEY=VALUE`, `--decoders ar,hydra:tree=dynamic`)
# ---------------------------------------------------------------------------------------------------------
WORDS = {"True": True, "False": False, "None": None}


def int_keys(d):
    """A JSON object whose keys are all whole numbers with int keys (a cost curve {T: c(T)}: JSON keys are text)."""
    return {int(k): v for k, v in d.items()} if all(k.isdigit() for k in d) else d


def option_value(text):
    """A decoder option's value from text: JSON where it parses (3, 0.5, true, null, [[0], [0, 0]], "quoted
    text", {"1": 1.0, "2": 1.3} read as {1: 1.0, 2: 1.3}), Python's True / False / None, else the text itself
    ("dynamic", "auto", a path)."""
    text = text.strip()
    if text in WORDS:
        return WORDS[text]
    try:
        return json.loads(text, object_hook=int_keys)
    except ValueError:
        return text


def option_text(value):
    """The text that option_value (and split_outside) read back as `value`: plain text where it can be, JSON
    otherwise (a label's spelling: no spaces in lists)."""
    if isinstance(value, str) and option_value(value) == value and not set(value) & set(":,=[]{}()\"' "):
        return value
    return json.dumps(value, separators=(",", ":"))


def split_outside(text, sep):
    """text split at each `sep` that is outside brackets and quotes, so that a JSON value keeps its commas and
    colons: split_outside("ar,medusa:tree=[[0],[1]]", ",") == ["ar", "medusa:tree=[[0],[1]]"]."""
    parts, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth = max(depth - 1, 0)
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


def parse_option(text, within=None):
    """("key", value) from "key=value" (option_value reads the value); UserError naming the text otherwise."""
    key, eq, value = text.partition("=")
    key = key.strip()
    if not eq or not key.isidentifier():
        where = f" in {within!r}" if within is not None else ""
        raise UserError(f"decoder option {text!r}{where} must be KEY=VALUE (e.g. max_nodes=auto)")
    return key, option_value(value)


def setup_label(name, options):
    """A decoder with its options as one word: "hydra:tree=dynamic:max_nodes=auto" (parse_setup reads it)."""
    return "".join([name] + [f":{k}={option_text(v)}" for k, v in options.items()])


def parse_setup(spec):
    """(name, options) of a decoder setup written NAME[:KEY=VALUE]..., e.g. "hydra:tree=dynamic:max_nodes=auto",
    checked by check_decoder (the name registered, every option one the decoder takes; values are checked when
    the decoder is made)."""
    if not isinstance(spec, str):
        raise UserError(f"decoder setup must be a string NAME[:KEY=VALUE]..., got {spec!r}")
    name, *parts = split_outside(spec.strip(), ":")
    options = {}
    for part in parts:
        key, value = parse_option(part, within=spec)
        if key in options:
            raise UserError(f"decoder option {key!r} given twice in {spec!r}")
        options[key] = value
    check_decoder(name.strip(), **options)
    return name.strip(), options


def parse_setups(specs):
    """{label: (name, options)} of decoder setups (parse_setup), in order; the same setup twice is refused."""
    setups = {}
    for spec in specs:
        name, options = parse_setup(spec)
        label = setup_label(name, options)
        if label in setups:
            raise UserError(f"decoders: {label!r} is listed twice")
        setups[label] = (name, options)
    return setups
