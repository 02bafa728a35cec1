"""The command line: `minispec generate`, `minispec bench`, `minispec train-heads` (python -m minispec works too).

Every user mistake ends in ONE line on stderr, `minispec: error: ...`, and exit status 2, with no traceback:
argparse's own errors (through Parser.error) and every minispec.errors.UserError (a bad value, a missing
file, a bad config key, a NaN in a checkpoint). Each command checks its arguments before it loads a model or
prints anything (the check_* functions below, which call the same validators as the Python API). Any other
exception is a bug and keeps its traceback. docs/errors.md lists the messages.
"""
import sys
from pathlib import Path

from .. import __version__, bench
from ..decoders.medusa import VERSIONS
from ..decoders.registry import (DECODERS, check_decoder, decoders_with_heads, generate, make_proposer, option_value,
                                 parse_option, setup_label, split_outside)
from ..errors import UserError
from ..mistral.model import load
from ..mistral.weights import load_config
from ..speculative.acceptance import make_rule
from ..speculative.sampling import check_generation
from ..training.checks import check_hydra_training, check_out_folder, check_training
from ..training.train_hydra import train_hydra
from ..training.train_medusa import train_medusa
from .common import Help, Parser, _model_arg, as_flags, check_model_args, check_prompt, fail
from .search_skip import add_search_skip


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


def check_decoder_options(args):
    """The decoder's options from --heads, --tree, --max-nodes and each --option KEY=VALUE (VALUE read by
    registry.option_value: JSON where it parses, else text), every one an option the decoder takes
    (registry.check_decoder: the error names the decoder, the option and the options it takes), none set twice.
    Their values are checked when the decoder is made (after the model loads, before any output)."""
    options = check_heads(args.decoder, args.heads)
    given = {"heads": "--heads"} if options else {}
    for key, flag, text in (("tree", "--tree", args.tree), ("max_nodes", "--max-nodes", args.max_nodes)):
        if text is not None:
            options[key], given[key] = option_value(text), flag
    for text in args.option or []:
        try:
            key, value = parse_option(text)
        except UserError as e:
            raise UserError(f"argument --option: {e}") from None
        if key in given:
            raise UserError(f"argument --option: {key} is set twice (by {given[key]} and --option {text})")
        options[key], given[key] = value, "--option"
    for key, value in options.items():
        try:
            check_decoder(args.decoder, **{key: value})
        except UserError as e:
            raise UserError(f"argument {given[key]}: {e}") from None
    return options


def check_chain_rule(acceptance, proposer, decoder):
    """--acceptance block verifies chains: a decoder drafting trees (dynamic, or a static tree that branches) is
    refused before any output, not at its first step."""
    tree = getattr(proposer, "tree", None)
    if acceptance == "block" and (getattr(proposer, "dynamic", None) is not None
                                  or (tree is not None and tree.max_depth != tree.N - 1)):
        raise UserError(f"argument --acceptance: block verifies chains, but decoder {decoder!r} drafts a tree "
                        f"here (give it a chain, e.g. --tree '[[0],[0,0]]', or use --acceptance rejection)")


# ---------------------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------------------
def check_generate(args):
    """generate's arguments, checked before the weights load (the decoder's name by argparse's choices, its
    options by check_decoder_options, the acceptance rule against the temperature). Returns (decoder options,
    the model's Tokenizer)."""
    try:
        params = check_generation(args.temperature, args.top_k, args.top_p, args.seed, args.n)
    except UserError as e:
        raise UserError(as_flags(e)) from None
    try:
        make_rule(params, args.acceptance, None)
    except UserError as e:
        raise UserError(f"argument --acceptance: {e}") from None
    check_prompt(args.prompt)
    options = check_decoder_options(args)
    return options, check_model_args(args)


def cmd_generate(args):
    options, tok = check_generate(args)

    model = load(args.model, dtype=args.dtype, device=args.device, weights=args.weights)
    proposer = make_proposer(args.decoder, model, **options)     # its heads load (or fail) before any output
    check_chain_rule(args.acceptance, proposer, args.decoder)
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
                   top_k=args.top_k, top_p=args.top_p, seed=args.seed, eos_id=tok.eos_id,
                   acceptance=args.acceptance, on_token=on_token)
    sys.stdout.write(stream.flush() + "\n")
    s = out.stats
    label = setup_label(args.decoder, {k: v for k, v in options.items() if k != "heads"})
    print(f"[{label}] {s.new_tokens} tokens in {s.decode_time:.2f} s: {s.tokens_per_s:.1f} tokens/s "
          f"(prefill {len(ids)} tokens in {s.prefill_time:.2f} s), {s.steps} steps, "
          f"tau = {s.tau:.2f} tokens/step, device {model.device}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------------------------
def cmd_bench(args):
    decoders = [d.strip() for d in split_outside(args.decoders, ",")] if args.decoders.strip() else []
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
                           runs=args.runs, device=args.device, dtype=args.dtype, prompt_set=args.prompt_set,
                           control=args.control)


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
    if hydra and args.layers != 1:
        raise UserError("argument --layers: applies to --kind medusa only (Hydra's blocks per head: --hydra-layers)")
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
                device=args.device, dtype=args.dtype, checkpoint=args.checkpoint, shared_output=args.version == "v2")


# ---------------------------------------------------------------------------------------------------------
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
    g.add_argument("--tree", default=None, metavar="dynamic|CHOICES",
                   help="medusa, hydra, hydra++: dynamic (a tree grown per step from the heads' probabilities) or a "
                        "static tree as JSON choices, e.g. '[[0],[0,0],[1]]' (default: the stored tree)")
    g.add_argument("--max-nodes", default=None, metavar="N|auto",
                   help="with --tree dynamic: nodes per tree (default 10), or auto (sized per step from this "
                        "backend's verify cost c(T))")
    g.add_argument("--acceptance", default=None, choices=["greedy", "rejection", "typical", "block"],
                   help="acceptance rule (default: greedy at temperature 0, else rejection sampling); typical is "
                        "Medusa's lossy rule, block verifies chains")
    g.add_argument("--option", action="append", default=None, metavar="KEY=VALUE",
                   help="any other option of the decoder, repeatable, e.g. --option max_depth=2 --option "
                        "sizing=cost; VALUE is JSON where it parses (3, 0.5, true, null, [[0],[1]]), else text")
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
                   help=f"bench decode: comma-separated, the first is the baseline; from "
                        f"{', '.join(sorted(DECODERS))}, each with options if wanted (NAME:KEY=VALUE:..., as "
                        f"generate's --option), e.g. ar,hydra,hydra:tree=dynamic:max_nodes=auto")
    b.add_argument("--prompts", type=int, default=8, help="bench decode: held-out prompts")
    b.add_argument("--prompt-set", default="heldout", choices=sorted(bench.PROMPT_SETS),
                   help="bench decode: heldout (cut from held-out files) or copy (a held-out function, then its "
                        "def line again)")
    b.add_argument("--control", action="store_true",
                   help="bench decode: run the baseline a second time in every prompt's turn and print its speed-up "
                        "over the baseline with its interval: the noise of this run on identical work")
    b.set_defaults(func=cmd_bench)

    t = sub.add_parser("train-heads", help="train speculative-decoding heads on the frozen model (NumPy)",
                       formatter_class=Help)
    t.add_argument("--kind", default="medusa", choices=["medusa", "hydra", "hydra++"], help="which heads")
    _model_arg(t)
    t.add_argument("--version", default="v1", choices=list(VERSIONS),
                   help="v1: each head owns a vocabulary projection; v2: heads share the model's output layer "
                        "(Medusa and Hydra alike)")
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
