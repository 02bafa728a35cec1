"""`minispec search-skip`: Draft & Verify's skip-set search (minispec.training.skip_search) from the command line,
every option checked before the model loads."""
import importlib.util
from pathlib import Path

from ..decoders.draft_verify import skip_set_path
from ..errors import UserError, check_int, check_real
from ..mistral.model import load
from ..mistral.tokenizer import Tokenizer
from ..mistral.weights import load_config
from ..training.checks import check_out_folder
from ..training.data import corpus_path
from ..training.skip_objective import from_code
from ..training.skip_search import (INSTALL_HINT, best, calibration_prompts, check_trace, read_trace, run_key,
                                   run_search)
from .common import check_model_args


def check_search_skip(args):
    """search-skip's arguments, every one checked before the model loads: counts in range, known and distinct
    methods (bo's optional package installed), --min-match in [0, 1] and only where it is used (with --write and
    the predicted objective, whose evaluations record a match rate), the calibration fitting a cache without a
    window, and an existing --trace readable and made for a model of this many layers (skip_search.check_trace).
    Returns (the trace path, the calibration text or None when the trace is resumed)."""
    for flag, v, low in (("--budget", args.budget, 1), ("--seed", args.seed, 0), ("--prompts", args.prompts, 1),
                         ("--prompt-len", args.prompt_len, 1), ("--new", args.new, 1)):
        check_int(f"argument {flag}:", v, low=low)
    methods = [m.strip() for m in args.method.split(",")]
    bad = [m for m in methods if m not in ("bo", "random", "exhaustive")]
    if bad or len(set(methods)) != len(methods):
        raise UserError(f"argument --method: a comma-separated list of distinct methods from bo, random, "
                        f"exhaustive, got {args.method!r}")
    args.method = ",".join(methods)
    if args.min_match is not None:
        check_real("argument --min-match:", args.min_match, low=0, high=1)
        if not args.write or args.objective != "predicted":
            raise UserError("argument --min-match: only used with --write and --objective predicted (the "
                            "evaluations that record a match rate)")
    check_model_args(args, tokenizer=False)         # the model folder (default: the shipped one) and the device
    cfg, _ = load_config(args.model)
    if cfg.sliding_window is None and args.prompt_len + args.new > cfg.cache_slots:
        raise UserError(f"argument --new: --prompt-len {args.prompt_len} + --new {args.new} tokens do not fit the "
                        f"model's cache of {cfg.cache_slots} positions (no sliding window)")
    out = Path(args.trace) if args.trace else Path(skip_set_path(args.model)).parent / "search_trace.json"
    text = None                                         # a resumed search has its prompts
    if out.is_file():
        data = read_trace(out)
        check_trace(data, cfg, out)
        check_resumed_settings(args, data, out)
    elif out.is_dir():
        raise UserError(f"argument --trace: {out} is a folder, not a trace file")
    else:
        try:
            check_out_folder(out.parent)
        except UserError as e:
            raise UserError(f"argument --trace: {str(e).split(' ', 1)[1]}") from None
        text = corpus_path(args.text, "--text")
    if "bo" in methods and importlib.util.find_spec("bayes_opt") is None:
        raise UserError(f"argument --method: {INSTALL_HINT}")
    return out, text


def check_resumed_settings(args, data, path):
    """A resumed trace keeps its calibration and cost model (its header wins): options that would have made them
    otherwise are refused, not ignored (the trace's own values are what the options must say)."""
    seqs, starts = data["calibration"]["sequences"], data["calibration"]["starts"]
    new = {len(q) - st for q, st in zip(seqs, starts)}
    flat = all(c == 1.0 for c in data["cost_model"]["curve"].values())
    for flag, ok, made in (("--prompts", args.prompts == len(seqs), len(seqs)),
                           ("--prompt-len", args.prompt_len >= max(starts), max(starts)),
                           ("--new", new == {args.new}, min(new)), ("--flat-cost", args.flat_cost == flat, flat)):
        if not ok:
            raise UserError(f"argument {flag}: {path} was made with {flag} {made}; a resumed search keeps its "
                            f"calibration and cost model: give the same settings or another --trace file")


def cmd_search_skip(args):
    """`minispec search-skip`: Draft & Verify's skip-set search (minispec.training.skip_search)."""
    out, text = check_search_skip(args)
    model = load(args.model, dtype=args.dtype, device=args.device)
    prompts = None
    if text is not None:
        prompts = calibration_prompts(Tokenizer.from_dir(args.model), text, args.prompts, args.prompt_len, args.seed)
    try:
        trace = run_search(model, str(out), [m for m in args.method.split(",") if m], args.objective, args.budget,
                           args.seed, not args.all_layers, prompts, args.new, flat=args.flat_cost)
    except ImportError as e:
        raise UserError(f"search-skip: {e}") from None
    print(f"trace: {out}")
    if args.write:
        key = run_key(args.method.split(",")[0], args.objective, not args.all_layers)
        b = best(trace.evaluations(key, trace.data["runs"][key]["settings"]), args.min_match)
        skip = from_code(b["code"], model.config.n_layers)
        how = key if args.min_match is None else f"{key}, the best set with a match rate >= {args.min_match}"
        skip = type(skip)(skip.attn, skip.mlp, {"chosen_by": how, "search_trace": out.name, "calibration": {
            k: v for k, v in b.items() if k not in ("code", "params")}})
        path = Path(skip_set_path(args.model))
        skip.save(path)
        print(f"wrote {path}: {skip}")


def add_search_skip(sub, model_arg):
    """The `search-skip` subcommand."""
    s = sub.add_parser("search-skip", help="search the Draft & Verify skip set (BO vs random vs exhaustive)")
    model_arg(s)
    s.add_argument("--method", default="bo,random", help="comma-separated: bo, random, exhaustive")
    s.add_argument("--objective", default="predicted", choices=["predicted", "measured"],
                   help="predicted: teacher-forced matchness + cost model (noise-free); measured: tokens/s")
    s.add_argument("--budget", type=int, default=60, help="distinct sets evaluated per method (bo, random)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--all-layers", action="store_true", help="also let the search skip the first/last layer")
    s.add_argument("--trace", default=None, help="trace JSON (default MODEL/draft_verify/search_trace.json); "
                                                 "an existing one is resumed")
    s.add_argument("--text", default=None, help="calibration text (default data/corpus/train.txt)")
    s.add_argument("--prompts", type=int, default=8, help="calibration prompts")
    s.add_argument("--prompt-len", type=int, default=32, help="tokens per calibration prompt")
    s.add_argument("--new", type=int, default=48, help="greedy tokens per calibration prompt")
    s.add_argument("--flat-cost", action="store_true", help="c(T) = 1 (a GPU-like backend) in the cost model")
    s.add_argument("--write", action="store_true", help="write MODEL/draft_verify/skip_set.json: the best set "
                                                        "of the first method")
    s.add_argument("--min-match", type=float, default=None, help="--write: the best set among those whose "
                                                                 "teacher-forced match rate reaches this (predicted)")
    s.set_defaults(func=cmd_search_skip)


