"""Draft & Verify's skip sets ranked by the cost rule, then measured (docs/draft_and_verify.md, "The shipped skip
set, revisited with the cost rule", quotes what this prints).

    OPENBLAS_NUM_THREADS=1 python tools/rank_skip_sets.py predict    # every set's acceptance, r, the rule's rate
    OPENBLAS_NUM_THREADS=1 python tools/rank_skip_sets.py measure    # the short list on held-out prompts vs AR
    OPENBLAS_NUM_THREADS=1 python tools/rank_skip_sets.py measure --sets "previous,5 skipped (MLP 2)" --sizings threshold

predict: the per-depth acceptance of all 4096 skip sets on the search trace's calibration continuations
(teacher-forced matches, skip_objective.all_match_lists; depth_acceptance), never on the held-out prompts. The
candidates: the shipped set; the short list below; for each number of skipped sublayers, the set whose first draft
token matches most often; the search's two best sets (search_trace.json); each set once. For each, r (one draft token over one full step,
CPU time) from draft_verify.measured_draft_costs and c(T) the canonical curve; the cost rule's K* and predicted
speed-up E(K*) / (c(K* + 1) + K* r) (skip_objective.cost_rule_rate), the best K >= 1 beside it, and the
acceptance a 1-token draft needs to break even, c(2) + r - 1. Then the best K >= 1 over ALL 4096 sets, r from a
least-squares line through the measured r's (r = b0 + b1 * sublayers skipped).

measure: greedy, the held-out prompts of minispec.bench.heldout_prompts, AR and every set of the short list with
sizing="threshold" (the default) and sizing="cost", interleaved prompt by prompt (the order rotating), CPU time
(run with one BLAS thread). Speed-up = AR's CPU seconds per token / the decoder's, per run; the median over runs
and the range are printed, with tau, the mean draft length, the per-depth acceptance on these prompts, whether
every output equals AR's, and each run's speed-up over the "previous" set's with the same sizing (when measured).
--prompts, --tokens and --runs size the measurement (8, 128, 3); --sets and --sizings pick from the short list.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from minispec import generate                                                          # noqa: E402
from minispec.bench import heldout_prompts                                             # noqa: E402
from minispec.bench.decode import depth_acceptance as held_out_acceptance              # noqa: E402
from minispec.decoders.draft_verify import SkipSet, find_skip_set, measured_draft_costs  # noqa: E402
from minispec.decoders.registry import make_proposer                                   # noqa: E402
from minispec.mistral.model import load                                                # noqa: E402
from minispec.mistral.tokenizer import Tokenizer                                       # noqa: E402
from minispec.speculative.costs import interp_cost                                     # noqa: E402
from minispec.speculative.draft_length import expected_tokens                          # noqa: E402
from minispec.training.skip_objective import (Calibration, all_match_lists, cost_rule_rate,  # noqa: E402
                                              depth_acceptance, from_code, to_code)
from minispec.training.skip_search import read_trace                                   # noqa: E402

MODEL = Path(__file__).resolve().parent.parent / "weights" / "stdlib-mistral"
MAX_DRAFT = 8
# the short list measured on held-out prompts (chosen from what `predict` printed): the set shipped before this
# revisit (the search's best with a match rate >= 0.9), the predicted-best sets skipping 4 to 7 sublayers, and the
# search's optimum over all layers; "5 skipped (MLP 2)" is the set shipped since (skip_set.json)
SHORT_LIST = {
    "previous": ([1], [3]),
    "4 skipped": ([0, 1], [1, 3]),
    "5 skipped": ([0, 1], [1, 3, 4]),
    "5 skipped (MLP 2)": ([0, 1], [1, 2, 4]),
    "6 skipped": ([0, 1, 3], [1, 3, 4]),
    "7 skipped": ([0, 1, 2, 3], [1, 3, 4]),
    "search optimum": ([0, 1, 2, 3], [1, 2, 4]),
}


def rate_at(acc, r, costs, K):
    """E(K) / (c(K + 1) + K r): the cost rule's predicted speed-up of a K-token draft."""
    return expected_tokens(acc, K) / (float(interp_cost(costs, K + 1)) + K * r)


def best_draft(acc, r, costs):
    """(K, rate) of the best K >= 1 (the rule itself may choose K = 0)."""
    return max(((K, rate_at(acc, r, costs, K)) for K in range(1, MAX_DRAFT + 1)), key=lambda kr: kr[1])


def candidates(acc, n_layers, shipped, trace):
    """{label: code}: the shipped set and the short list; per number of sublayers skipped, the set with the best
    first-token acceptance; the best set of the search over all layers and with the first and last layers kept."""
    pairs = [("shipped", to_code(shipped))]
    pairs += [(label, to_code(SkipSet.from_lists(n_layers, *sets))) for label, sets in SHORT_LIST.items()]
    for n in range(1, 2 * n_layers):
        codes = [c for c in acc if bin(c).count("1") == n]
        pairs.append((f"best a1, {n} skipped", max(codes, key=lambda c: acc[c][0])))
    for key, label in (("exhaustive/predicted", "search optimum, all layers"), ("bo/predicted", "search, ends kept")):
        run = trace["runs"].get(key)
        if run:
            cols = run["columns"]
            pairs.append((label, int(cols["code"][int(np.argmax(cols["value"]))])))
    out = {}
    for label, code in pairs:                                  # each set once, under its first label
        if code not in out.values():
            out[label] = code
    return out


def predict(model):
    trace = read_trace(str(MODEL / "draft_verify" / "search_trace.json"))
    calib = Calibration.from_json(trace["calibration"])
    t0 = time.process_time()
    every = all_match_lists(model, calib)                                   # {code: [bool [48]] x 8}
    acc = {c: depth_acceptance(m, MAX_DRAFT) for c, m in every.items()}
    L = model.config.n_layers
    print(f"per-depth acceptance of all {len(acc)} skip sets on the search trace's calibration "
          f"({len(calib.sequences)} continuations of {len(every[0][0])} tokens; {time.process_time() - t0:.0f} s)")
    measured = {}
    rows = []
    for label, code in candidates(acc, L, find_skip_set(model), trace).items():
        skip = from_code(code, L)
        r, costs = measured_draft_costs(model, skip, MAX_DRAFT)
        measured[code] = r
        K, rate = cost_rule_rate(acc[code], r, costs, MAX_DRAFT)
        k1, rate1 = best_draft(acc[code], r, costs)
        rows.append((label, skip, acc[code], r, float(interp_cost(costs, 2)) + r - 1, K, rate, k1, rate1))
    print("c(T) canonical, CPU time: " + ", ".join(f"c({T})={costs[T]:.2f}" for T in sorted(costs) if T <= 9))
    print("| candidate | attention, MLP skipped | n | a1, a2, a3 (calibration) | r | a1 to break even, c(2)+r-1 "
          "| K*, rule's speed-up | best K >= 1, speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for label, skip, a, r, even, K, rate, k1, rate1 in rows:
        print(f"| {label} | {skip.attn_layers}, {skip.mlp_layers} | {skip.n_skipped} | {a[0]:.3f}, {a[1]:.3f}, "
              f"{a[2]:.3f} | {r:.2f} | {even:.2f} | {K}, {rate:.2f}x | {k1}, {rate1:.2f}x |")
    n = np.array([bin(c).count("1") for c in measured], float)
    b1, b0 = np.polyfit(n, np.array(list(measured.values())), 1)
    fit = {c: b0 + b1 * bin(c).count("1") for c in acc}
    scored = sorted(((best_draft(acc[c], fit[c], costs), c) for c in acc), key=lambda x: -x[0][1])
    (k1, rate1), c = scored[0]
    print(f"r fitted over the {len(measured)} measured sets: r = {b0:.3f} {b1:+.3f} * sublayers skipped "
          f"(largest residual {max(abs(fit[c2] - r2) for c2, r2 in measured.items()):.3f}); the best of all "
          f"{len(acc)} sets with it: {from_code(c, L)}, K = {k1}, {rate1:.3f}x; sets predicted >= 1.0x: "
          f"{sum(x[0][1] >= 1.0 for x in scored)}")


def measure(model, n_prompts, n_tokens, runs, sets, sizings):
    tok = Tokenizer.from_dir(str(MODEL))
    prompts = heldout_prompts(str(MODEL), tok, n_prompts)
    L = model.config.n_layers
    props = {"ar": "ar"}
    for label in sets:
        skip = SkipSet.from_lists(L, *SHORT_LIST[label])
        for sizing in sizings:
            props[(label, sizing)] = make_proposer("draft_verify", model, skip=skip, sizing=sizing)
    names = list(props)
    for name in names:                                                       # warm-up
        generate(model, prompts[0], decoder=props[name], max_new_tokens=16)
    cpu = {name: [0.0] * runs for name in names}
    toks = {name: [0] * runs for name in names}
    stats = {name: [] for name in names}
    outs = {name: [] for name in names}
    for run in range(runs):
        for i, p in enumerate(prompts):
            k = (i + run) % len(names)
            for name in names[k:] + names[:k]:                               # the order rotates prompt by prompt
                o = generate(model, p, decoder=props[name], max_new_tokens=n_tokens, eos_id=None)
                cpu[name][run] += o.stats.decode_cpu_time
                toks[name][run] += o.stats.new_tokens
                if run == 0:
                    stats[name].append(o.stats)
                    outs[name].append(o.tokens)
    print(f"{len(prompts)} held-out prompts, {n_tokens} new tokens each, greedy, {runs} interleaved runs; "
          f"speed-up = AR's CPU seconds per token / the decoder's (median of the runs, range)")
    print("| set | sizing | tau | mean K | per-depth acceptance (held-out) | speed-up, CPU time | identical "
          "| over the previous set, per run |")
    print("|---|---|---|---|---|---|---|---|")
    ar = [c / t for c, t in zip(cpu["ar"], toks["ar"])]
    for name in names[1:]:
        label, sizing = name
        s = [a / (c / t) for a, c, t in zip(ar, cpu[name], toks[name])]
        tau = sum(x.new_tokens for x in stats[name]) / sum(x.steps for x in stats[name])
        drafted = [k for x in stats[name] for k in x.drafted]
        acc = ", ".join(f"{a:.2f}" for a in held_out_acceptance(stats[name])[:3])
        ship = ("previous", sizing)
        vs = (", ".join(f"{(c0 / t0) / (c / t):.2f}" for c0, t0, c, t in zip(cpu[ship], toks[ship], cpu[name],
                                                                              toks[name])) if ship in cpu else "-")
        print(f"| {label} | {sizing} | {tau:.2f} | {np.mean(drafted):.2f} | {acc or '-'} | "
              f"{statistics.median(s):.2f}x ({min(s):.2f}..{max(s):.2f}) | "
              f"{'yes' if outs[name] == outs['ar'] else 'NO'} | {vs} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["predict", "measure"])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--sets", default=",".join(SHORT_LIST), help="labels of SHORT_LIST, comma-separated")
    ap.add_argument("--sizings", default="threshold,cost")
    args = ap.parse_args()
    model = load(str(MODEL), device="cpu")
    if args.what == "predict":
        predict(model)
    else:
        measure(model, args.prompts, args.tokens, args.runs, args.sets.split(","), args.sizings.split(","))


if __name__ == "__main__":
    main()
