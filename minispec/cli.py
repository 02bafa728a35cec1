"""The command line: `minispec generate`, `minispec bench`, `minispec train-heads` (python -m minispec works too)."""
import argparse
import sys
from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "weights" / "stdlib-mistral"


def _model_arg(p):
    p.add_argument("--model", default=str(DEFAULT_MODEL),
                   help="model folder (HF or Mistral layout); default: the shipped weights/stdlib-mistral")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16"])
    p.add_argument("--weights", default="auto", choices=["auto", "widened", "mapped"],
                   help="mapped: keep a 16-bit checkpoint in its file, widened block by block (CPU); "
                        "auto: mapped when float32 weights would not fit in available memory")


def cmd_generate(args):
    from .generate import generate
    from .model import load
    from .tokenizer import Tokenizer

    model = load(args.model, dtype=args.dtype, device=args.device, weights=args.weights)
    tok = Tokenizer.from_dir(args.model)
    ids = tok.encode(args.prompt, bos=True)
    stream = tok.stream()
    for t in ids[1:]:               # show the prompt as the tokenizer will continue it
        stream.push(t)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()

    def on_token(t):
        sys.stdout.write(stream.push(t))
        sys.stdout.flush()

    out = generate(model, ids, decoder=args.decoder, max_new_tokens=args.n, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, seed=args.seed, eos_id=tok.eos_id, on_token=on_token)
    sys.stdout.write(stream.flush() + "\n")
    s = out.stats
    print(f"[{args.decoder}] {s.new_tokens} tokens in {s.decode_time:.2f} s: {s.tokens_per_s:.1f} tokens/s "
          f"(prefill {len(ids)} tokens in {s.prefill_time:.2f} s), {s.steps} steps, "
          f"tau = {s.tau:.2f} tokens/step, device {model.device}", file=sys.stderr)


def cmd_bench(args):
    from . import bench
    if args.what == "forward":
        bench.bench_forward(args.model, n_tokens=args.n, runs=args.runs, device=args.device, dtype=args.dtype,
                            compare_hf=not args.no_hf, weights=args.weights)
    else:
        bench.bench_decode(args.model, decoders=args.decoders.split(","), n_tokens=args.n, n_prompts=args.prompts,
                           runs=args.runs, device=args.device, dtype=args.dtype)


def cmd_train_heads(args):
    from .train_heads import train_medusa
    train_medusa(args.model, out=args.out, version=args.version, num_heads=args.heads, num_layers=args.layers,
                 data=args.data, text=args.text, n_tokens=args.tokens, seq_len=args.seq_len, epochs=args.epochs,
                 lr=args.lr, batch=args.batch, budget=args.budget, top_k=args.top_k, seed=args.seed,
                 device=args.device, dtype=args.dtype)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="minispec", description="Mistral inference and speculative decoding in NumPy")
    sub = ap.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt, streaming")
    _model_arg(g)
    g.add_argument("--prompt", default="def ")
    g.add_argument("-n", type=int, default=64, help="new tokens at most")
    g.add_argument("--decoder", default="ar", help="ar (plain) or a speculative decoder")
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="honest benchmarks (median of runs after a warm-up, environment printed)")
    b.add_argument("what", choices=["forward", "decode"],
                   help="forward: decode tokens/s vs HF transformers; decode: speculative decoders vs AR")
    _model_arg(b)
    b.add_argument("-n", type=int, default=64, help="generated tokens per run")
    b.add_argument("--runs", type=int, default=5)
    b.add_argument("--no-hf", action="store_true", help="skip the HF transformers comparison")
    b.add_argument("--decoders", default="ar,medusa", help="bench decode: comma-separated, the first is the baseline")
    b.add_argument("--prompts", type=int, default=8, help="bench decode: held-out prompts")
    b.set_defaults(func=cmd_bench)

    t = sub.add_parser("train-heads", help="train speculative-decoding heads on the frozen model (NumPy)")
    t.add_argument("--kind", default="medusa", choices=["medusa"])
    _model_arg(t)
    t.add_argument("--version", default="v1", choices=["v1", "v2"],
                   help="v1: each head owns a vocabulary projection; v2: heads share the model's output layer")
    t.add_argument("--heads", type=int, default=4, help="K heads (head k predicts the token k + 2 ahead)")
    t.add_argument("--layers", type=int, default=1, help="residual blocks per head")
    t.add_argument("--data", default="corpus", choices=["corpus", "self"],
                   help="corpus: labels are corpus tokens; self: the model's own greedy continuations")
    t.add_argument("--text", default=None, help="corpus text file (documents separated by \\n\\0\\n); "
                                                "default data/corpus/train.txt")
    t.add_argument("--tokens", type=int, default=100_000, help="tokens of training + held-out data")
    t.add_argument("--seq-len", type=int, default=512, help="tokens per training sequence")
    t.add_argument("--epochs", type=int, default=1)
    t.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (warm-up, then cosine)")
    t.add_argument("--batch", type=int, default=256, help="positions per step")
    t.add_argument("--budget", type=int, default=10, help="tree nodes (root excluded) of the stored tree")
    t.add_argument("--top-k", type=int, default=10, help="ranks whose accuracy is measured per head")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", default=None, help="output folder; default MODEL/medusa")
    t.set_defaults(func=cmd_train_heads)

    args = ap.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
