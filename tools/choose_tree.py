"""Choose and store the default Medusa / Hydra / Hydra++ trees of a heads folder, per backend, from measured costs.

CPU ("tree"): the budget maximising the expected speedup tau(budget) / (c(budget + 1) + heads cost), the heads
cost being that of the tree's depth of heads (the proposer runs no more), with
c(T) the verify cost curve measured here (minispec.speculative.costs.cost_curve) and tau from the heads' held-out top-k
accuracies (minispec.speculative.tree.build_tree). GPU ("tree_cuda"): a verify of up to dozens of tokens costs about one
step there, so the tree is simply grown to --gpu-budget nodes. The heads are rewritten in --dtype.

    python tools/choose_tree.py --model weights/stdlib-mistral --heads weights/stdlib-mistral/medusa
    python tools/choose_tree.py --model weights/stdlib-mistral --kind hydra        # or --kind hydra++

Hydra's proposal cost grows with the tree (one batched head call per depth, on every parent there), so for
--kind hydra / hydra++ it is measured for each candidate budget's own tree (plus, for hydra++, the prefix
layer's step over the accepted path) instead of once.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import minispec                                       # noqa: E402
from minispec.speculative.costs import cost_curve, heads_cost, pick_budget  # noqa: E402
from minispec.decoders.medusa_files import load_heads  # noqa: E402
from minispec.speculative.tree import build_tree                  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="weights/stdlib-mistral")
    ap.add_argument("--kind", default="medusa", choices=["medusa", "hydra", "hydra++"])
    ap.add_argument("--heads", default=None, help="default MODEL/<kind>")
    ap.add_argument("--out", default=None, help="default: the heads folder")
    ap.add_argument("--gpu-budget", type=int, default=32)
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    ap.add_argument("--costs-from", default=None, help="hydra: take c(T) from this config's tree_choice.cpu_costs "
                                                       "(e.g. MODEL/medusa/medusa_config.json) instead of measuring it")
    args = ap.parse_args()
    if args.kind != "medusa":
        return choose_hydra(args)
    folder = Path(args.heads or Path(args.model) / "medusa")
    model = minispec.load(args.model, device="cpu")
    heads = load_heads(folder, model)
    acc = np.asarray(heads.accuracies)
    costs, t1 = cost_curve(model, sizes=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32))
    # the proposer runs only as many heads as the tree is deep: one cost per depth d = 1..K
    per_depth = [heads_cost(model, heads, t1, reps=30, num_heads=d) for d in range(1, heads.K + 1)]
    budget, speedup = pick_budget(acc, costs, per_depth)
    cpu_tree, cpu_tau = build_tree(acc, budget)
    proposal = per_depth[cpu_tree.max_depth - 1]
    print("c(T):", ", ".join(f"c({T})={c:.2f}" for T, c in costs.items()), f"(1 token = {t1 * 1e3:.2f} ms)")
    print(f"heads: {proposal:.2f} AR steps per step ({cpu_tree.max_depth} of {heads.K} heads: the CPU tree's depth)")
    save_trees(args, heads, acc, folder / "medusa_config.json", type(heads).save, costs, budget, cpu_tree, cpu_tau,
               speedup, {"heads_cost_steps": round(proposal, 3)})


def save_trees(args, heads, acc, config_path, save, costs, budget, cpu_tree, cpu_tau, speedup, choice):
    """Print the chosen CPU tree and the GPU tree, set them as the heads' trees and save the heads with the
    choice recorded in their config (its `training` record kept): the same tail for Medusa and Hydra."""
    gpu_tree, gpu_tau = build_tree(acc, args.gpu_budget)
    print(f"CPU tree: {budget} nodes, expected tau {cpu_tau:.2f}, expected speedup {speedup:.2f}x: "
          f"{[list(p) for p in cpu_tree.choices[1:]]}")
    print(f"GPU tree: {args.gpu_budget} nodes, expected tau {gpu_tau:.2f}")
    heads.choices = [list(p) for p in cpu_tree.choices[1:]]
    heads.choices_cuda = [list(p) for p in gpu_tree.choices[1:]]
    cfg = json.loads(config_path.read_text())
    extra = {k: cfg[k] for k in ("training",) if k in cfg}
    extra["tree_choice"] = {"cpu_costs": {str(T): round(c, 3) for T, c in costs.items()}, **choice,
                            "cpu_budget": budget, "cpu_expected_tau": round(cpu_tau, 3),
                            "cpu_expected_speedup": round(speedup, 3), "gpu_budget": args.gpu_budget,
                            "gpu_expected_tau": round(gpu_tau, 3)}
    out = Path(args.out or config_path.parent)
    save(heads, out, extra=extra, dtype=np.float16 if args.dtype == "float16" else np.float32)
    print(f"saved {out}")


def hydra_proposal_cost(model, heads, tree, reps=31):
    """Median seconds of one grounded proposal on `tree` (+ the prefix layer's step over a 2-token path for
    Hydra++) over the median seconds of one AR step (a 1-token forward against a 39-token cache), the two timed
    alternately so that a busy machine slows both alike."""
    import statistics
    import time
    from minispec.decoders.hydra import TreePlan, grounded_proposal
    from minispec.decoders.hydra_heads import new_prefix_cache, prefix_advance
    base = model.new_cache()
    _, hidden = model.forward(list(range(1, 40)), base, return_hidden=True)                  # [39, D]
    plan, cache = TreePlan(tree), None
    if heads.prefix is not None:
        cache = new_prefix_cache(model)
        prefix_advance(heads.prefix, heads.model_config, hidden[:-2], cache)
    tp, ta = [], []
    for r in range(reps + 1):
        t0 = time.perf_counter()
        h = hidden[-1]
        if cache is not None:           # the step's prefix work: the accepted path in (left uncommitted here)
            h = prefix_forward_uncommitted(heads, hidden[-2:], cache)[-1]
        grounded_proposal(heads, plan, h, 5)
        t1 = time.perf_counter()
        model.forward_block([7], base).logits[-1, :1]
        t2 = time.perf_counter()
        if r:
            tp.append(t1 - t0)
            ta.append(t2 - t1)
    return statistics.median(tp) / statistics.median(ta)


def prefix_forward_uncommitted(heads, x, cache):
    from minispec.decoders.hydra_heads import prefix_forward
    return prefix_forward(heads.prefix, heads.model_config, x, cache, last=True)   # waits in scratch, never committed


def choose_hydra(args):
    from minispec.decoders.hydra_files import load_heads, save
    folder = Path(args.heads or Path(args.model) / args.kind)
    model = minispec.load(args.model, device="cpu")
    heads = load_heads(folder, model)
    acc = np.asarray(heads.accuracies)
    if args.costs_from:                 # a c(T) measured earlier (a busy machine's c(T) is mostly noise)
        costs = {int(T): c for T, c in json.loads(Path(args.costs_from).read_text())["tree_choice"]["cpu_costs"].items()}
        t1 = float("nan")
    else:
        costs, t1 = cost_curve(model, sizes=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32))
    sizes, proposal_at = sorted(costs), {}

    def proposal(tree):             # a Hydra draft's cost depends on the tree's shape (one head call per node)
        proposal_at[tree.N - 1] = hydra_proposal_cost(model, heads, tree)
        return proposal_at[tree.N - 1]

    budget, speedup = pick_budget(acc, costs, proposal)
    cpu_tree, cpu_tau = build_tree(acc, budget)
    print("c(T):", ", ".join(f"c({T})={c:.2f}" for T, c in costs.items()), f"(1 token = {t1 * 1e3:.2f} ms)")
    print(f"{args.kind} proposal: {proposal_at[budget]:.2f} AR steps per step at {budget} nodes "
          f"({proposal_at[1]:.2f} at 1 node, {proposal_at[sizes[-1] - 1]:.2f} at {sizes[-1] - 1})")
    choice = {"cpu_costs_from": Path(args.costs_from).name if args.costs_from else "measured",
              "proposal_cost_steps": {str(b): round(v, 3) for b, v in proposal_at.items()}}
    save_trees(args, heads, acc, folder / "hydra_config.json", save, costs, budget, cpu_tree, cpu_tau, speedup,
               choice)


if __name__ == "__main__":
    main()
