"""Hydra heads with their own projections (the shipped weights/stdlib-mistral/hydra) against Hydra heads that share
the base output layer (`minispec train-heads --kind hydra --version v2`), on the same static trees
(docs/hydra.md, "A shared output layer", quotes what this prints).

    OPENBLAS_NUM_THREADS=1 python tools/measure_shared_heads.py [SHARED_DIR] [runs]
    OPENBLAS_NUM_THREADS=1 python tools/measure_shared_heads.py profile [SHARED_DIR]

profile: the parts of one proposal, each timed right after a one-token verify forward against 112 cached tokens,
in phases that read one kind of heads at a time, medians, in units of that forward (CPU time). Only the model,
one kind of heads and the timed part run, so the heads' weights stay in the CPU's cache: this is the parts'
compute, without the evictions of a real decode (which the decoding runs above include).

SHARED_DIR (default data/hydra-shared, where docs/hydra.md's command trains them; minispec ships no such heads)
must hold heads trained with `--version v2`; runs defaults to 1. Greedy, the held-out prompts
(minispec.bench.heldout_prompts, 8 prompts of 48 tokens), 128 new tokens each, every step drafting (gate=False,
so that τ is the trees' own). Trees: the 3-node chain [[0], [0, 0], [0, 0, 0]] and build_tree's 10- and 32-node
trees built from the shipped heads' accuracies (the same trees for both), then each heads' own 10- and 32-node
trees (built from their own accuracies), then the 3-node chain with the gate on (the decoder's default). Every
setup runs prompt by prompt in turn (interleaved) with plain decoding, and every output is checked equal to
AR's. Proposal = the CPU time inside propose/observe per drafting step (steps the gate left plain excluded), in
AR steps (AR's CPU time per token in the same runs; the project's backend_clock, time.process_time).
"""
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from minispec import generate                                                   # noqa: E402
from minispec.bench import heldout_prompts                                      # noqa: E402
from minispec.decoders.hydra import TreePlan, grounded_proposal                 # noqa: E402
from minispec.decoders.hydra_heads import head_forward                          # noqa: E402
from minispec.mistral.layers import linear, silu                                # noqa: E402
from minispec.decoders.registry import make_proposer                            # noqa: E402
from minispec.mistral.model import load                                         # noqa: E402
from minispec.mistral.tokenizer import Tokenizer                                # noqa: E402
from minispec.speculative.tree import Tree, build_tree                          # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MODEL, SHARED = REPO / "weights" / "stdlib-mistral", REPO / "data" / "hydra-shared"
CHAIN = [[0], [0, 0], [0, 0, 0]]


def choices(accuracies, budget):
    return [list(p) for p in build_tree(accuracies, budget)[0].choices[1:]]


def profile(model, heads, rounds=300, phases=4):
    """Rounds of (one-token verify forward, one chain-3 proposal) for one kind of heads at a time, the kinds taking
    turns phase by phase (own, shared, own, shared, ...): within a phase only that kind's weights are read, as in a
    decode; the parts of a head (block, projection) are timed the same way in phases of their own."""
    V, D = model.config.vocab_size, model.config.dim
    cache = model.new_cache()
    _, hidden = model.forward(np.arange(1, 113) % V, cache, return_hidden=True)
    h = hidden[-1]                                                                     # [D]
    plan = TreePlan(Tree.from_choices(CHAIN))
    own, shared = heads["own"].heads, heads["shared"].heads
    a2 = np.concatenate([h, model.tok_embeddings[5], model.tok_embeddings[6], model.tok_embeddings[7]])[None]
    y = np.ones((1, D), model.dtype)                                                   # [1, D]
    parts = {
        "proposal, chain 3, own projections": lambda: grounded_proposal(heads["own"], plan, h, 5),
        "proposal, chain 3, shared output layer": lambda: grounded_proposal(heads["shared"], plan, h, 5),
        "  head 2 (a [1, 4D]), own projection + bias": lambda: head_forward(own[2], a2),
        "  head 2 (a [1, 4D]), shared output layer": lambda: head_forward(shared[2], a2),
        "  head 2's block only (res + silu(a W1 + b1))": lambda: linear(a2, own[2]["res_w"]) + own[2]["res_b"]
        + silu(linear(a2, own[2]["w1"]) + own[2]["b1"]),
        "  [1, D] @ head 2's own projection [D, V] + bias": lambda: y @ own[2]["proj_w"] + own[2]["proj_b"],
        "  [1, D] @ the model's output layer [D, V]": lambda: y @ model.output,
    }
    times = {k: [] for k in parts}
    step = []
    clock = time.process_time
    for phase in range(phases):
        for label, f in parts.items():
            for r in range(rounds // phases + 1):
                t0 = clock()
                model.forward_block(np.array([7]), cache)                             # a one-token verify
                t1 = clock()
                f()
                t2 = clock()
                if r:                                                                  # the phase's first warms up
                    step.append(t1 - t0)
                    times[label].append(t2 - t1)
    cache.discard()
    t = statistics.median(step)
    print(f"one-token verify forward against 112 cached tokens: {t * 1e6:.0f} us CPU time (median of {len(step)}); "
          f"each part timed right after one, {phases} phases of {rounds // phases} rounds per part, medians")
    for label in parts:
        m = statistics.median(times[label])
        print(f"  {label:52s} {m * 1e6:7.1f} us  {m / t:.3f} steps", flush=True)


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "profile":
        model = load(MODEL, device="cpu")
        shared = Path(sys.argv[2]) if len(sys.argv) > 2 else SHARED
        return profile(model, {"own": make_proposer("hydra", model, head_vocab=None).heads,
                               "shared": make_proposer("hydra", model, heads=shared, head_vocab=None).heads})
    shared = Path(sys.argv[1]) if len(sys.argv) > 1 else SHARED
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    model = load(MODEL, device="cpu")
    tok = Tokenizer.from_dir(MODEL)
    prompts, n_tokens = heldout_prompts(MODEL, tok), 128
    heads = {"own": make_proposer("hydra", model, head_vocab=None).heads,
             "shared": make_proposer("hydra", model, heads=shared, head_vocab=None).heads}
    assert heads["shared"].shared_output and not heads["own"].shared_output
    trees = {"chain 3": CHAIN}
    for b in (10, 32):
        trees[f"tree {b} (shipped acc.)"] = choices(heads["own"].accuracies, b)
    setups = [(f"{h:>6} {t}", h, tree, False) for t, tree in trees.items() for h in heads]
    for h in heads:
        for b in (10, 32):
            setups.append((f"{h:>6} tree {b} (own acc.)", h, choices(heads[h].accuracies, b), False))
    setups += [(f"{h:>6} chain 3, gate on", h, CHAIN, True) for h in heads]
    labels = ["ar"] + [s[0] for s in setups]
    cpu, prop = {k: [0.0] * runs for k in labels}, {k: 0.0 for k in labels}
    steps, tokens, plain = {k: 0 for k in labels}, {k: 0 for k in labels}, {k: 0 for k in labels}
    ar = []
    for r in range(runs):
        for i, p in enumerate(prompts):
            for label in labels:
                if label == "ar":
                    dec = "ar"
                else:
                    _, h, tree, gate = next(s for s in setups if s[0] == label)
                    dec = make_proposer("hydra", model, heads=heads[h], tree=tree, gate=gate, head_vocab=None)
                o = generate(model, p, decoder=dec, max_new_tokens=n_tokens, eos_id=None)
                if label == "ar" and r == 0:
                    ar.append(o.tokens)
                assert o.tokens == ar[i], f"{label}: not AR's tokens"
                cpu[label][r] += o.stats.decode_cpu_time
                prop[label] += o.stats.propose_cpu_time
                steps[label] += o.stats.steps
                tokens[label] += o.stats.new_tokens
                plain[label] += o.stats.counters.get("gate.plain_steps", 0)
    ar_step = statistics.median(cpu["ar"]) / (n_tokens * len(prompts))
    print(f"{runs} interleaved run(s), {len(prompts)} prompts x {n_tokens} tokens, greedy, gate off unless said; "
          f"outputs identical to AR: yes (every setup); CPU time, one AR step {ar_step * 1e3:.2f} ms")
    for t, tree in trees.items():
        print(f"  {t}: {len(tree)} nodes {tree if len(tree) <= 10 else ''}")
    for label in labels[1:]:
        speed = statistics.median(cpu["ar"]) / statistics.median(cpu[label])
        drafting = steps[label] - plain[label]
        print(f"{label:>31}: tau {tokens[label] / steps[label]:.3f}  proposal {prop[label] / drafting / ar_step:.3f} "
              f"steps per drafting step ({drafting} of {steps[label]} steps drafting)  speed-up {speed:.2f}x (CPU)",
              flush=True)


if __name__ == "__main__":
    main()
