"""Where a head's time goes on this backend, and what a reduced draft vocabulary (head_vocab=M) buys
(docs/medusa.md, "A cheaper head", quotes what this prints).

    OPENBLAS_NUM_THREADS=1 python tools/measure_cheap_heads.py profile        # the parts of one proposal
    OPENBLAS_NUM_THREADS=1 python tools/measure_cheap_heads.py speed [runs]   # tau, proposal cost, speed-up vs AR

Every time is this process's CPU time (the project's backend_clock: the machine is shared), as a median, in
units of one plain decoding step (one token through the model against 60 cached tokens, timed in the same run).
"speed": greedy, the held-out prompts (minispec.bench.heldout_prompts, 8 prompts of 48 tokens), 128 new tokens
each; every setup runs prompt by prompt in turn (interleaved), `runs` times (default 2); every run's tokens are
checked equal to AR's. Proposal cost = the CPU time inside propose/observe per step, in AR steps. "medusa v1
copies" runs the shipped v2 heads as v1 heads whose own projections are copies of the base output layer: the same
function (the same tokens), but each head reads its own [D, V] matrix instead of the shared one.
"""
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from minispec import generate                                                   # noqa: E402
from minispec.bench import heldout_prompts                                      # noqa: E402
from minispec.decoders.head_vocab import kept_ids, token_counts                 # noqa: E402
from minispec.decoders.hydra import grounded_proposal  # noqa: E402
from minispec.decoders.hydra_heads import head_forward as hydra_head  # noqa: E402
from minispec.decoders.hydra_heads import new_prefix_cache, prefix_advance, prefix_forward  # noqa: E402
from minispec.decoders.medusa import MedusaHeads, topk_ids                                  # noqa: E402
from minispec.decoders.registry import make_proposer                            # noqa: E402
from minispec.mistral.layers import silu                                        # noqa: E402
from minispec.mistral.model import load                                         # noqa: E402
from minispec.mistral.tokenizer import Tokenizer                                # noqa: E402
from minispec.speculative.dynamic_tree import top_probs                         # noqa: E402

MODEL = Path(__file__).resolve().parent.parent / "weights" / "stdlib-mistral"
clock = time.process_time


def timed(f, n=200, rounds=5):
    out = []
    for _ in range(rounds):
        t0 = clock()
        for _ in range(n):
            f()
        out.append((clock() - t0) / n)
    return statistics.median(out)


def v1_copies(v2):
    """The shipped v2 heads (sharing the base output layer) as v1 heads whose own projections are copies of it:
    the same function, but each head reads its own [D, V] matrix."""
    return MedusaHeads(v2.W, v2.b, np.stack([np.array(v2.base_output)] * v2.K), v2.base_output, "v1", v2.choices)


def old_top1(logits):
    """topk_ids(logits, 1) before its argmax case: a partial selection, then a sort of the survivor."""
    part = np.argpartition(-logits, 0, axis=-1)[..., :1]
    vals = np.take_along_axis(logits, part, axis=-1)
    return np.take_along_axis(part, np.argsort(-vals, axis=-1), axis=-1)


def profile(model):
    ids = [1] + list(range(100, 160))
    cache = model.new_cache()
    model.forward(ids[:-1], cache=cache)
    step = timed(lambda: model.forward(ids[-1:], cache=cache), 100)
    h = model.forward([1, 2, 3], model.new_cache(), return_hidden=True)[1][-1]          # [D]
    x = h[None]                                                                        # [1, D]
    keep = kept_ids(token_counts(model), 1024)
    med, hyd, hpp = (make_proposer(n, model, head_vocab=None) for n in ("medusa", "hydra", "hydra++"))
    med1k, hyd1k = make_proposer("medusa", model, head_vocab=1024), make_proposer("hydra", model, head_vocab=1024)
    v1 = v1_copies(med.heads)
    P, P1k = med.heads.base_output, np.ascontiguousarray(med.heads.base_output[:, keep])  # [D, V], [D, 1024]
    logits = x @ P                                                                     # [1, V]
    p0 = hyd.heads.heads[0]
    a = np.concatenate([h, model.tok_embeddings[5]])[None]                             # [1, 2D]
    y8 = np.zeros((8, model.config.dim), model.dtype)                                  # [8, D]
    pc = new_prefix_cache(model)
    X = np.zeros((34, model.config.dim), model.dtype)
    prefix_advance(hpp.heads.prefix, hpp.heads.model_config, X[:32], pc)
    parts = [
        ("Medusa, shipped tree: its 2 heads' top-1 (heads.topk)", lambda: med.heads.topk(h, 1, 2)),
        ("  the same, head_vocab=1024", lambda: med1k.heads.topk(h, 1, 2)),
        ("  the same as v1 heads, each with its own copy of the output layer", lambda: v1.topk(h, 1, 2)),
        ("  one residual block [1, D] @ [D, D]", lambda: x + silu(x @ med.heads.W[0, 0] + med.heads.b[0, 0])),
        ("  one projection [1, D] @ [D, V]", lambda: x @ P),
        ("  one projection [1, D] @ [D, 1024]", lambda: x @ P1k),
        ("  top-1 of [1, V] (argmax)", lambda: topk_ids(logits, 1)),
        ("  top-1 of [1, V] as topk_ids did it before (argpartition, then sort)", lambda: old_top1(logits)),
        ("  top-10 ids + softmax probabilities of [1, V] (dynamic trees)", lambda: top_probs(logits, 10)),
        ("  the same of [1, 1024]", lambda: top_probs(logits[:, :1024], 10)),
        ("Hydra head 0 on 1 row (blocks + projection + bias)", lambda: hydra_head(p0, a)),
        ("  its projection + bias [1, D] @ [D, V]", lambda: y8[:1] @ p0["proj_w"] + p0["proj_b"]),
        ("  projection + bias on 8 rows [8, D] @ [D, V]", lambda: y8 @ p0["proj_w"] + p0["proj_b"]),
        ("Hydra, shipped tree (3-node chain): grounded proposal", lambda: grounded_proposal(hyd.heads, hyd.plan, h, 5)),
        ("  the same, head_vocab=1024", lambda: grounded_proposal(hyd1k.heads, hyd1k.plan, h, 5)),
        ("Hydra++, shipped tree: grounded proposal", lambda: grounded_proposal(hpp.heads, hpp.plan, h, 5)),
        ("Hydra++ prefix layer on 2 committed rows (observe, every step)",
         lambda: prefix_forward(hpp.heads.prefix, hpp.heads.model_config, X[32:], pc, last=True)),
    ]
    print(f"one plain decoding step: {step * 1e6:.0f} us CPU time ({model.dtype.__name__}); each part in us and in "
          f"steps (median of 5 rounds)")
    for label, f in parts:
        t = timed(f)
        print(f"  {label:66s} {t * 1e6:7.1f} us  {t / step:.3f} steps", flush=True)


def speed(model, runs):
    tok = Tokenizer.from_dir(MODEL)
    prompts, n_tokens = heldout_prompts(MODEL, tok), 128
    setups = [("ar", "ar", {})]
    v1 = v1_copies(make_proposer("medusa", model, head_vocab=None).heads)
    setups.append(("medusa v1 copies", "medusa", dict(heads=v1, head_vocab=None)))
    for name in ("medusa", "hydra", "hydra++"):
        for hv in (None, 1024, 512):
            setups.append((f"{name} static M={hv or 'all'}", name, dict(head_vocab=hv)))
        for hv in (None, 1024):
            setups.append((f"{name} auto M={hv or 'all'}", name, dict(tree="dynamic", max_nodes="auto",
                                                                      head_vocab=hv)))
    for label, name, opts in setups:        # the sized trees measure their costs once, before any timing
        if opts.get("tree"):
            make_proposer(name, model, **opts)
    cpu = {s[0]: [0.0] * runs for s in setups}
    prop_cpu = {s[0]: 0.0 for s in setups}
    tokens, steps, ar = {s[0]: 0 for s in setups}, {s[0]: 0 for s in setups}, []
    for r in range(runs):
        for i, p in enumerate(prompts):
            for label, name, opts in setups:
                prop = name if name == "ar" else make_proposer(name, model, **opts)
                o = generate(model, p, decoder=prop, max_new_tokens=n_tokens, eos_id=None)
                cpu[label][r] += o.stats.decode_cpu_time
                prop_cpu[label] += o.stats.propose_cpu_time
                if r == 0:
                    if label == "ar":
                        ar.append(o.tokens)
                    assert o.tokens == ar[i], f"{label}: not AR's tokens"
                steps[label] += o.stats.steps
                tokens[label] += o.stats.new_tokens
    ar_step = statistics.median(cpu["ar"]) / (n_tokens * len(prompts))
    base = statistics.median(n_tokens * len(prompts) / t for t in cpu["ar"])
    print(f"{runs} interleaved runs, medians; CPU time; identical to AR: yes (every setup)")
    for label, _, _ in setups:
        rate = statistics.median(n_tokens * len(prompts) / t for t in cpu[label])
        print(f"{label:>22}: {rate:6.1f} tokens/s  speed-up {rate / base:.2f}x  tau {tokens[label] / steps[label]:.2f}"
              f"  proposal {prop_cpu[label] / steps[label] / ar_step:.3f} steps/step", flush=True)


def main():
    model = load(MODEL, device="cpu")
    what = sys.argv[1] if len(sys.argv) > 1 else "profile"
    if what == "profile":
        profile(model)
    elif what == "speed":
        speed(model, int(sys.argv[2]) if len(sys.argv) > 2 else 2)
    else:
        sys.exit("usage: measure_cheap_heads.py profile | speed [runs]")


if __name__ == "__main__":
    main()
