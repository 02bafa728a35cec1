"""Measure dynamic trees on the shipped model (docs/dynamic_trees.md quotes what this prints).

    OPENBLAS_NUM_THREADS=1 python tools/measure_dynamic_trees.py tau      # tau, dynamic vs static, + calibration
    OPENBLAS_NUM_THREADS=1 python tools/measure_dynamic_trees.py speed    # speed-up vs AR, gated, sized trees
    OPENBLAS_NUM_THREADS=1 python tools/measure_dynamic_trees.py phases   # step time: measured vs charged

Greedy, the held-out prompts of minispec.bench.heldout_prompts (8 prompts), 128 new tokens each. "static" is
the tree build_tree makes from the heads' own stored top-k accuracies at that budget; "dynamic" is
tree="dynamic" with max_nodes = that budget. Every run's tokens are checked against AR's.
"""
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from minispec import generate                                       # noqa: E402
from minispec.bench import heldout_prompts                          # noqa: E402
from minispec.decoders.registry import make_proposer                # noqa: E402
from minispec.mistral.model import load                             # noqa: E402
from minispec.mistral.tokenizer import Tokenizer                    # noqa: E402
from minispec.speculative.costs import interp_cost, step_curve     # noqa: E402
from minispec.speculative.tree import build_tree                    # noqa: E402

MODEL = Path(__file__).resolve().parent.parent / "weights" / "stdlib-mistral"
DECODERS = ("medusa", "hydra", "hydra++")
BINS = [0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0001]


def recording(prop, log):
    """Wrap a dynamic proposer so that every drafted node's value and whether it was accepted go to log, and
    every step's predicted tokens (1 + the kept values) and nodes, for the rate rule's own prediction."""
    propose, observe = prop.propose, prop.observe
    state = {}

    def rec_propose(ctx):
        d = propose(ctx)
        state["values"] = None if ctx.hidden is None else prop.dynamic.values
        return d

    def rec_observe(step):
        v = state["values"]
        if v is not None:
            on_path = np.zeros(len(v), bool)
            on_path[step.path] = True
            log["nodes"].extend(zip(v[1:].tolist(), on_path[1:].tolist()))
            log["steps"].append((float(v.sum()), len(v), prop.dynamic.last.depth_rows))
        observe(step)
    prop.propose, prop.observe = rec_propose, rec_observe
    return prop


def calibration(nodes):
    v = np.array([a for a, _ in nodes])
    acc = np.array([b for _, b in nodes], float)
    rows = []
    for lo, hi in zip(BINS[:-1], BINS[1:]):
        sel = (v >= lo) & (v < hi)
        if sel.any():
            rows.append((lo, min(hi, 1.0), int(sel.sum()), float(v[sel].mean()), float(acc[sel].mean())))
    return rows


def tau_table(model, prompts, n_tokens):
    ar = [generate(model, p, max_new_tokens=n_tokens, eos_id=None).tokens for p in prompts]
    out = {}
    for name in DECODERS:
        for budget in (4, 10, 32):
            for kind in ("static", "dynamic"):
                log = {"nodes": [], "steps": []}
                if kind == "static":
                    heads = make_proposer(name, model).heads
                    opts = dict(tree=build_tree(heads.accuracies, budget)[0], gate=False)
                else:
                    opts = dict(tree="dynamic", max_nodes=budget, gate=False)
                new = steps = 0
                for p, want in zip(prompts, ar):
                    prop = make_proposer(name, model, **opts)
                    if kind == "dynamic":
                        recording(prop, log)
                    o = generate(model, p, decoder=prop, max_new_tokens=n_tokens, eos_id=None)
                    assert o.tokens == want, f"{name} {kind} {budget}: not AR's tokens"
                    new, steps = new + o.stats.new_tokens, steps + o.stats.steps
                out[(name, budget, kind)] = (new / steps, log)
            s, d = out[(name, budget, "static")][0], out[(name, budget, "dynamic")]
            pred = np.mean([t for t, _, _ in d[1]["steps"]])
            print(f"{name:>8} budget {budget:2d}: tau static {s:.3f}  dynamic {d[0]:.3f}  ratio {d[0] / s:.3f}  "
                  f"(dynamic: predicted 1 + sum of kept values per step {pred:.3f}; identical to AR: yes)", flush=True)
    print("\ncalibration of the dynamic trees (all budgets): a node's value (its path probability under the heads) "
          "vs how often it was accepted (on the accepted path)")
    for name in DECODERS:
        nodes = sum((out[(name, b, "dynamic")][1]["nodes"] for b in (4, 10, 32)), [])
        print(f"{name}: {len(nodes)} nodes")
        print("   value bin      nodes   mean value   accepted")
        for lo, hi, n, mv, acc in calibration(nodes):
            print(f"  [{lo:.2f}, {hi:.2f})  {n:7d}      {mv:.3f}      {acc:.3f}")
    return out


def modelled(stats_list, costs):
    """(mean modelled step cost, mean s(N_s) of it) over the steps of a gated proposer's runs: its cost model's
    price of every step (stats.counters["model.step_cost"], a plain step at 1) and the verify part of it (s(N)
    of the proposer's curve for a drafting step, 1 for a plain one)."""
    steps = sum(s.steps for s in stats_list)
    total = sum(s.counters.get("model.step_cost", 0.0) for s in stats_list) / steps
    N = 1 + np.concatenate([np.asarray(s.drafted, np.float64) for s in stats_list])
    return total, float(np.mean(np.where(N > 1, interp_cost(costs, N), 1.0)))      # a plain step is charged 1


def step_costs_of(prop):
    """The whole-step curve a gated proposer prices its steps with (its gate's, or its dynamic trees')."""
    return prop.gate.costs if prop.gate is not None and prop.gate.costs is not None else prop.dynamic.costs


def speed_table(model, prompts, n_tokens, runs):
    print("whole-step curve:", step_curve(model).describe(), flush=True)
    setups = [("ar", "ar", {})]
    for name in DECODERS:
        setups.append((f"{name} static", name, {}))
        setups.append((f"{name} auto", name, dict(tree="dynamic", max_nodes="auto")))
        setups.append((f"{name} auto, no gate", name, dict(tree="dynamic", max_nodes="auto", gate=False)))
    props = {}
    for label, name, opts in setups:
        if name != "ar":
            props[label] = make_proposer(name, model, **opts)
            if opts.get("tree") == "dynamic":
                print(f"{label}: depth costs (fixed + per row, units of one plain step, CPU time) "
                      + ", ".join(f"{a:.3f} + {b:.3f}/row" for a, b in props[label].dynamic.depth_costs), flush=True)
            else:
                g = props[label].gate
                print(f"{label}: gate prices a drafting step at s(N) = {g.costs[max(g.costs)]:.3f} for its "
                      f"{max(g.costs)} nodes + proposal {g.proposal:.3f} (plain steps, CPU time)", flush=True)
    times = {label: [0.0] * runs for label, _, _ in setups}
    cpu = {label: [0.0] * runs for label, _, _ in setups}
    stats = {label: [] for label, _, _ in setups}
    ar = []
    for r in range(runs):
        for i, p in enumerate(prompts):
            for label, name, opts in setups:
                o = generate(model, p, decoder=name if name == "ar" else props[label], max_new_tokens=n_tokens,
                             eos_id=None)
                times[label][r] += o.stats.decode_time
                cpu[label][r] += o.stats.decode_cpu_time
                if r == 0:
                    if label == "ar":
                        ar.append(o.tokens)
                    assert o.tokens == ar[i], f"{label}: not AR's tokens"
                    stats[label].append(o.stats)
    print(f"{runs} interleaved runs (prompt by prompt, every setup in turn); medians over the runs; speed-up = "
          "tokens/s over AR's, in wall time and in this process's CPU time (the machine is shared: wall time also "
          "counts the neighbours); predicted = tau / the mean modelled step cost (the gate's prices: s(N) of the "
          "proposer's whole-step curve + its proposal, a plain step at 1)")
    base = statistics.median(n_tokens * len(prompts) / t for t in times["ar"])
    base_cpu = statistics.median(n_tokens * len(prompts) / t for t in cpu["ar"])
    for label, name, opts in setups:
        rate = statistics.median(n_tokens * len(prompts) / t for t in times[label])
        rate_cpu = statistics.median(n_tokens * len(prompts) / t for t in cpu[label])
        st = stats[label]
        steps = sum(s.steps for s in st)
        tau = sum(s.new_tokens for s in st) / steps
        line = (f"{label:>24}: {rate:7.1f} tokens/s  speed-up wall {rate / base:.2f}x  CPU {rate_cpu / base_cpu:.2f}x"
                f"  tau {tau:.2f}")
        if name != "ar" and all("model.step_cost" in s.counters for s in st):
            total, _ = modelled(st, step_costs_of(props[label]))
            plain = sum(s.counters.get("gate.plain_steps", 0) for s in st)
            line += (f"  predicted {tau / total:.2f}x (measured / predicted {rate_cpu / base_cpu / (tau / total):.2f})"
                     f"  plain steps (gate) {plain / steps:.0%}, nodes drafted per step "
                     f"{np.mean(np.concatenate([s.drafted for s in st])):.1f}")
        print(line, flush=True)


def phases(model, prompts, n_tokens):
    """The loop's propose and verify time per step in CPU time (the loop's clock swapped for process_time), in
    units of one plain step of the whole-step curve, beside what the cost model charged: s(N) of the proposer's
    curve for the verify and the rest of its modelled step cost for the proposal."""
    import time
    import minispec.speculative.loop as loop
    unit = step_curve(model).unit
    clock, loop.time.perf_counter = loop.time.perf_counter, time.process_time
    try:
        kinds = ({}, dict(tree="dynamic", max_nodes="auto"))
        for name, opts in [("ar", {})] + [(n, o) for n in DECODERS for o in kinds]:
            prop = name if name == "ar" else make_proposer(name, model, **opts)
            st = [generate(model, p, decoder=prop, max_new_tokens=n_tokens, eos_id=None).stats for p in prompts[:4]]
            steps = sum(s.steps for s in st)
            propose, verify = sum(s.propose_time for s in st), sum(s.verify_time for s in st)
            label = name + (" auto" if opts else (" static" if name != "ar" else ""))
            line = f"{label:>15}: per step, units of a plain step = {unit * 1e3:.2f} ms CPU: propose " \
                   f"{propose / steps / unit:.3f}  verify {verify / steps / unit:.3f}"
            if name != "ar":
                total, c = modelled(st, step_costs_of(prop))
                line += f"  | charged by the cost model: proposal {total - c:.3f}  s(N) {c:.3f}"
            print(line, flush=True)
    finally:
        loop.time.perf_counter = clock


def main():
    what = sys.argv[1] if len(sys.argv) > 1 else "tau"
    model = load(str(MODEL))
    tok = Tokenizer.from_dir(str(MODEL))
    prompts = heldout_prompts(MODEL, tok, 8)
    print(f"model {MODEL.name}, {len(prompts)} held-out prompts of {len(prompts[0])} tokens, 128 new tokens, greedy")
    if what == "tau":
        tau_table(model, prompts, 128)
    elif what == "phases":
        phases(model, prompts, 128)
    else:
        speed_table(model, prompts, 128, runs=int(sys.argv[2]) if len(sys.argv) > 2 else 3)


if __name__ == "__main__":
    main()
