"""Choose and store the default Medusa trees of a heads folder, per backend, from measured costs.

CPU ("tree"): the budget maximising the expected speedup tau(budget) / (c(budget + 1) + heads cost), the heads
cost being that of the tree's depth of heads (the proposer runs no more), with
c(T) the verify cost curve measured here (minispec.bench.cost_curve) and tau from the heads' held-out top-k
accuracies (minispec.tree.build_tree). GPU ("tree_cuda"): a verify of up to dozens of tokens costs about one
step there, so the tree is simply grown to --gpu-budget nodes. The heads are rewritten in --dtype.

    python tools/choose_tree.py --model weights/stdlib-mistral --heads weights/stdlib-mistral/medusa
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import minispec                                       # noqa: E402
from minispec.bench import cost_curve, heads_cost, pick_budget    # noqa: E402
from minispec.medusa import load_heads                # noqa: E402
from minispec.tree import build_tree                  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="weights/stdlib-mistral")
    ap.add_argument("--heads", default=None, help="default MODEL/medusa")
    ap.add_argument("--out", default=None, help="default: the heads folder")
    ap.add_argument("--gpu-budget", type=int, default=32)
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    args = ap.parse_args()
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
    gpu_tree, gpu_tau = build_tree(acc, args.gpu_budget)
    print("c(T):", ", ".join(f"c({T})={c:.2f}" for T, c in costs.items()), f"(1 token = {t1 * 1e3:.2f} ms)")
    print(f"heads: {proposal:.2f} AR steps per step ({cpu_tree.max_depth} of {heads.K} heads: the CPU tree's depth)")
    print(f"CPU tree: {budget} nodes, expected tau {cpu_tau:.2f}, expected speedup {speedup:.2f}x: "
          f"{[list(p) for p in cpu_tree.paths[1:]]}")
    print(f"GPU tree: {args.gpu_budget} nodes, expected tau {gpu_tau:.2f}")
    heads.choices = [list(p) for p in cpu_tree.paths[1:]]
    heads.choices_cuda = [list(p) for p in gpu_tree.paths[1:]]
    cfg = json.loads((folder / "medusa_config.json").read_text())
    extra = {k: cfg[k] for k in ("training",) if k in cfg}
    extra["tree_choice"] = {"cpu_costs": {str(T): round(c, 3) for T, c in costs.items()},
                            "heads_cost_steps": round(proposal, 3), "cpu_budget": budget,
                            "cpu_expected_tau": round(cpu_tau, 3), "cpu_expected_speedup": round(speedup, 3),
                            "gpu_budget": args.gpu_budget, "gpu_expected_tau": round(gpu_tau, 3)}
    out = Path(args.out or folder)
    heads.save(out, extra=extra, dtype=np.float16 if args.dtype == "float16" else np.float32)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
