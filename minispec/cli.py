"""The command line: `minispec generate`, `minispec bench`, `minispec train-heads` (python -m minispec works too).

Every user mistake ends in ONE line on stderr, `minispec: error: ...`, and exit status 2, with no traceback:
argparse's own errors (through Parser.error) and every minispec.errors.UserError (a bad value, a missing
file, a bad config key, a NaN in a checkpoint). Each command checks its arguments before it loads a model or
prints anything (the check_* functions below, which call the same validators as the Python API). Any other
exception is a bug and keeps its traceback. docs/errors.md lists the messages.
"""
import argparse
import importlib.util
import sys
from pathlib import Path

from . import __version__, bench
from .backend import resolve_device
from .decoders.draft_verify import skip_set_path
from .decoders.medusa import VERSIONS
from .decoders.registry import DECODERS, decoders_with_heads, generate, make_proposer
from .errors import UserError, check_int, check_real, utf8_problem
from .mistral.model import DTYPES, load
from .mistral.tokenizer import Tokenizer
from .mistral.weights import load_config
from .speculative.sampling import check_generation
from .training.skip_objective import from_code
from .training.skip_search import (INSTALL_HINT, best, calibration_prompts, check_trace, read_trace, run_key,
                                   run_search)
from .training.checks import check_hydra_training, check_out_folder, check_training, corpus_path
from .training.train_hydra import train_hydra
from .training.train_medusa import train_medusa

# The shipped model lives in the source tree (weights/ is not package data: a wheel does not carry it).
SOURCE_MODEL = Path(__file__).resolve().parent.parent / "weights" / "stdlib-mistral"
# API parameter name -> the flag that sets it, so a validator's message names what the user typed
FLAGS = {"temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p", "seed": "--seed",
         "max_new_tokens": "-n", "n_tokens": "-n", "runs": "--runs", "n_prompts": "--prompts",
         "decoders": "--decoders", "num_heads": "--heads", "num_layers": "--layers", "seq_len": "--seq-len",
         "epochs": "--epochs", "lr": "--lr", "batch": "--batch", "budget": "--budget"}


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (`minispec: error: ...`, status 2) instead of usage + error."""

    def error(self, message):
        fail(message)


class Help(argparse.ArgumentDefaultsHelpFormatter):
    """Show "(default: X)" where there is a default to show (not for None or a flag's False)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def fail(message):
    sys.stderr.write(f"minispec: error: {message}\n")
    sys.exit(2)


def as_flags(err, **flags):
    """A validator's message with the API parameter it names spelled as the command-line flag."""
    msg, flags = str(err), {**FLAGS, **flags}
    name = msg.split(" ", 1)[0].rstrip(":")
    if name in flags and " " in msg:
        return f"argument {flags[name]}: {msg.split(' ', 1)[1]}"
    return msg


# ---------------------------------------------------------------------------------------------------------
# Shared argument checks (before anything loads)
# ---------------------------------------------------------------------------------------------------------
def _model_arg(p):
    p.add_argument("--model", default=None,
                   help="model folder (HF or Mistral layout); default: the shipped weights/stdlib-mistral of a "
                        "source checkout")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: CuPy when a GPU is usable, else NumPy")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="working dtype of the weights")
    p.add_argument("--weights", default="auto", choices=["auto", "widened", "mapped"],
                   help="mapped: keep a 16-bit checkpoint in its file, widened block by block (CPU); "
                        "auto: mapped when float32 weights would not fit in available memory")


def check_model_args(args, tokenizer=True):
    """The model folder (config readable, tokenizer present) and the device, checked without loading weights.
    Returns the model's Tokenizer (None with tokenizer=False)."""
    if args.model is None:
        if not SOURCE_MODEL.is_dir():
            raise UserError("no --model given, and the shipped model is not installed: weights/ comes with the "
                            "source tree, not with `pip install .`; pass --model DIR (a model folder, e.g. "
                            "weights/stdlib-mistral of a minispec checkout)")
        args.model = str(SOURCE_MODEL)
    cfg, _ = load_config(args.model)
    tok = None
    if tokenizer:
        tok = Tokenizer.from_dir(args.model)
        if tok.vocab_size > cfg.vocab_size:     # its ids past the model's vocabulary would fail mid-generation
            raise UserError(f"{args.model}: the tokenizer has {tok.vocab_size} pieces, more than the model's "
                            f"vocab_size ({cfg.vocab_size}): they do not belong together")
    if args.device == "cuda":
        try:
            resolve_device("cuda")
        except UserError as e:
            raise UserError(f"argument --device: {e}") from None
    return tok


def check_prompt(prompt):
    """sys.argv carries bytes that are not UTF-8 as lone surrogates (PEP 383); name the first one."""
    problem = utf8_problem(prompt)
    if problem:
        raise UserError(f"argument --prompt: not valid UTF-8 text ({problem}); pass text in your terminal's "
                        f"UTF-8 encoding")


def check_heads(decoder, heads):
    """--heads DIR: an existing folder, for a decoder whose factory takes heads=."""
    if heads is None:
        return {}
    have = decoders_with_heads()
    if decoder not in have:
        raise UserError(f"argument --heads: decoder {decoder!r} has no heads (decoders with heads: "
                        f"{', '.join(have) or 'none'})")
    if not Path(heads).is_dir():
        raise UserError(f"argument --heads: {heads}: no such folder")
    return {"heads": heads}


# ---------------------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------------------
def check_generate(args):
    """generate's arguments, checked before the weights load (the decoder's name by argparse's choices, its
    options by check_heads). Returns (decoder options, the model's Tokenizer)."""
    try:
        check_generation(args.temperature, args.top_k, args.top_p, args.seed, args.n)
    except UserError as e:
        raise UserError(as_flags(e)) from None
    check_prompt(args.prompt)
    options = check_heads(args.decoder, args.heads)
    return options, check_model_args(args)


def cmd_generate(args):
    options, tok = check_generate(args)

    model = load(args.model, dtype=args.dtype, device=args.device, weights=args.weights)
    proposer = make_proposer(args.decoder, model, **options)     # its heads load (or fail) before any output
    ids = tok.encode(args.prompt, bos=True)
    stream = tok.stream()
    for t in ids[1:]:               # show the prompt as the tokenizer will continue it
        stream.push(t)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()

    def on_token(t):
        sys.stdout.write(stream.push(t))
        sys.stdout.flush()

    out = generate(model, ids, decoder=proposer, max_new_tokens=args.n, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, seed=args.seed, eos_id=tok.eos_id, on_token=on_token)
    sys.stdout.write(stream.flush() + "\n")
    s = out.stats
    print(f"[{args.decoder}] {s.new_tokens} tokens in {s.decode_time:.2f} s: {s.tokens_per_s:.1f} tokens/s "
          f"(prefill {len(ids)} tokens in {s.prefill_time:.2f} s), {s.steps} steps, "
          f"tau = {s.tau:.2f} tokens/step, device {model.device}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------------------------
def cmd_bench(args):
    decoders = [d.strip() for d in args.decoders.split(",")] if args.decoders.strip() else []
    try:
        bench.check_bench(args.n, args.runs, args.prompts, decoders)
    except UserError as e:
        raise UserError(as_flags(e, decoder="--decoders")) from None
    check_model_args(args, tokenizer=args.what == "decode")
    if args.what == "forward":
        bench.bench_forward(args.model, n_tokens=args.n, runs=args.runs, device=args.device, dtype=args.dtype,
                            compare_hf=not args.no_hf, weights=args.weights)
    else:
        bench.bench_decode(args.model, decoders=decoders, n_tokens=args.n, n_prompts=args.prompts,
                           runs=args.runs, device=args.device, dtype=args.dtype, prompt_set=args.prompt_set)


# ---------------------------------------------------------------------------------------------------------
# train-heads
# ---------------------------------------------------------------------------------------------------------
def check_train_heads(args):
    """train-heads' arguments, every one checked before the model loads, for every --kind: the options both
    trainers share, Hydra's own (its loss weights, --data-cache, --checkpoint), the output folder (a file in the
    way would only fail the save after training), and options the kind does not use (refused, not ignored)."""
    hydra = args.kind in ("hydra", "hydra++")
    ignored = [flag for flag, v in (("--hydra-layers", args.hydra_layers), ("--lm-weight", args.lm_weight),
                                    ("--teacher-weight", args.teacher_weight), ("--data-cache", args.data_cache),
                                    ("--checkpoint", args.checkpoint)) if v is not None]
    if not hydra and ignored:
        raise UserError(f"argument {ignored[0]}: applies to --kind hydra and hydra++ only, not {args.kind}")
    if hydra and (args.layers != 1 or args.version != "v1"):
        flag = "--layers" if args.layers != 1 else "--version"
        raise UserError(f"argument {flag}: applies to --kind medusa only (Hydra's blocks per head: --hydra-layers)")
    flags = {"n_tokens": "--tokens", "num_layers": "--hydra-layers" if hydra else "--layers",
             "lm_weight": "--lm-weight", "teacher_weight": "--teacher-weight", "data_cache": "--data-cache",
             "checkpoint": "--checkpoint", "out": "--out"}
    try:
        if hydra:
            _, _, _, args.text = check_hydra_training(
                args.kind, args.heads, args.hydra_layers, args.data, args.text, args.data_cache, args.tokens,
                args.seq_len, args.epochs, args.lr, args.batch, args.lm_weight, args.teacher_weight, args.budget,
                top_k=args.top_k, seed=args.seed, out=args.out, checkpoint=args.checkpoint, text_flag="--text")
        else:
            args.text = check_training(version=args.version, num_heads=args.heads, num_layers=args.layers,
                                       data=args.data, text=args.text, n_tokens=args.tokens, seq_len=args.seq_len,
                                       epochs=args.epochs, lr=args.lr, batch=args.batch, budget=args.budget,
                                       top_k=args.top_k, seed=args.seed, text_flag="--text", out=args.out)
    except UserError as e:
        raise UserError(as_flags(e, **flags)) from None
    check_model_args(args)
    V = load_config(args.model)[0].vocab_size
    if args.top_k > V:
        raise UserError(f"argument --top-k: {args.top_k} ranks measured, but the model has only {V} tokens")
    if args.out is None:                        # the default folder, MODEL/<kind>
        try:
            check_out_folder(Path(args.model) / args.kind)
        except UserError as e:
            raise UserError(as_flags(e, **flags)) from None


def cmd_train_heads(args):
    check_train_heads(args)
    if args.kind in ("hydra", "hydra++"):
        return cmd_train_hydra(args)
    train_medusa(args.model, out=args.out, version=args.version, num_heads=args.heads, num_layers=args.layers,
                 data=args.data, text=args.text, n_tokens=args.tokens, seq_len=args.seq_len, epochs=args.epochs,
                 lr=args.lr, batch=args.batch, budget=args.budget, top_k=args.top_k, seed=args.seed,
                 device=args.device, dtype=args.dtype)


def cmd_train_hydra(args):
    train_hydra(args.model, kind=args.kind, out=args.out, num_heads=args.heads, num_layers=args.hydra_layers,
                data=args.data, text=args.text, data_cache=args.data_cache, n_tokens=args.tokens,
                seq_len=args.seq_len, epochs=args.epochs, lr=args.lr, batch=args.batch, lm_weight=args.lm_weight,
                teacher_weight=args.teacher_weight, budget=args.budget, top_k=args.top_k, seed=args.seed,
                device=args.device, dtype=args.dtype, checkpoint=args.checkpoint)


# ---------------------------------------------------------------------------------------------------------
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


def build_parser():
    ap = Parser(prog="minispec", description="Mistral inference and speculative decoding in NumPy",
                formatter_class=Help)
    ap.add_argument("--version", action="version", version=f"minispec {__version__}")
    sub = ap.add_subparsers(dest="cmd", metavar="{generate,bench,train-heads,search-skip}")
    sub.required = True

    g = sub.add_parser("generate", help="generate text from a prompt, streaming", formatter_class=Help)
    _model_arg(g)
    g.add_argument("--prompt", default="def ", help="text to continue")
    g.add_argument("-n", type=int, default=64, help="new tokens at most")
    g.add_argument("--decoder", default="ar", choices=sorted(DECODERS),
                   help="ar (plain) or a speculative decoder (all give plain decoding's tokens at temperature 0)")
    g.add_argument("--heads", default=None, metavar="DIR",
                   help="the decoder's heads from this folder (default: the heads next to the model)")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="0: greedy (argmax; top-k and top-p then change nothing)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: no cut)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus: smallest set with this mass, in (0, 1] "
                                                            "(1: no cut)")
    g.add_argument("--seed", type=int, default=0, help="random seed (an int >= 0)")
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="honest benchmarks (median of runs after a warm-up, environment printed)",
                       formatter_class=Help)
    b.add_argument("what", choices=["forward", "decode"],
                   help="forward: decode tokens/s vs HF transformers; decode: speculative decoders vs AR")
    _model_arg(b)
    b.add_argument("-n", type=int, default=64, help="generated tokens per run (>= 2: the timer starts after one)")
    b.add_argument("--runs", type=int, default=5, help="timed runs (the median is reported)")
    b.add_argument("--no-hf", action="store_true", help="skip the HF transformers comparison")
    b.add_argument("--decoders", default="ar,medusa",
                   help=f"bench decode: comma-separated, the first is the baseline; from {', '.join(sorted(DECODERS))}")
    b.add_argument("--prompts", type=int, default=8, help="bench decode: held-out prompts")
    b.add_argument("--prompt-set", default="heldout", choices=sorted(bench.PROMPT_SETS),
                   help="bench decode: heldout (cut from held-out files) or copy (a held-out function, then its "
                        "def line again)")
    b.set_defaults(func=cmd_bench)

    t = sub.add_parser("train-heads", help="train speculative-decoding heads on the frozen model (NumPy)",
                       formatter_class=Help)
    t.add_argument("--kind", default="medusa", choices=["medusa", "hydra", "hydra++"], help="which heads")
    _model_arg(t)
    t.add_argument("--version", default="v1", choices=list(VERSIONS),
                   help="v1: each head owns a vocabulary projection; v2: heads share the model's output layer")
    t.add_argument("--heads", type=int, default=4, help="K heads (head k predicts the token k + 2 ahead)")
    t.add_argument("--layers", type=int, default=1, help="residual blocks per head")
    t.add_argument("--data", default="corpus", choices=["corpus", "self"],
                   help="corpus: labels are corpus tokens; self: the model's own greedy continuations")
    t.add_argument("--text", default=None, help="corpus text file (documents separated by \\n\\0\\n); "
                                                "default data/corpus/train.txt (tools/collect_corpus.py builds it)")
    t.add_argument("--tokens", type=int, default=100_000, help="tokens of training + held-out data")
    t.add_argument("--seq-len", type=int, default=512, help="tokens per training sequence")
    t.add_argument("--epochs", type=int, default=1, help="passes over the training data")
    t.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (warm-up, then cosine)")
    t.add_argument("--batch", type=int, default=256, help="positions per step")
    t.add_argument("--budget", type=int, default=10, help="tree nodes (root excluded) of the stored tree")
    t.add_argument("--top-k", type=int, default=10, help="ranks whose accuracy is measured per head")
    t.add_argument("--seed", type=int, default=0, help="random seed (an int >= 0)")
    t.add_argument("--out", default=None, help="output folder; default MODEL/medusa (MODEL/hydra, MODEL/hydra++)")
    t.add_argument("--hydra-layers", type=int, default=None, help="hydra: MLP blocks per head (default hydra 1, "
                                                                 "hydra++ 4)")
    t.add_argument("--lm-weight", type=float, default=None, help="hydra: weight of the CE to the labels "
                                                                "(default hydra 1, hydra++ 0)")
    t.add_argument("--teacher-weight", type=float, default=None, help="hydra: weight of the CE to the base "
                                                                     "model's distribution (hydra 0, hydra++ 1)")
    t.add_argument("--data-cache", default=None, help="hydra: .npz of the token sequences; read if it exists, "
                                                     "else written after generating them")
    t.add_argument("--checkpoint", default=None, help="hydra: checkpoint path stem (.safetensors + .json); "
                                                     "training resumes from it if it exists")
    t.set_defaults(func=cmd_train_heads)

    add_search_skip(sub, _model_arg)
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        fail(str(e))
    except KeyboardInterrupt:
        sys.stderr.write("minispec: interrupted\n")
        sys.exit(130)
    except BrokenPipeError:         # `minispec generate | head`: the reader left; not an error of ours
        sys.stderr.close()
        sys.exit(0)


if __name__ == "__main__":
    main()
