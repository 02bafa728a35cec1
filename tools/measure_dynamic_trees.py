"""Measure dynamic trees on the shipped model (docs/dynamic_trees.md quotes what this prints).

    OPENBLAS_NUM_THREADS=1 python tools/measure_dynamic_trees.py tau      # tau, dynamic vs static, + calibration
    OPENBLAS_NUM_THREADS=1 python tools/measure_dynamic_trees.py speed    # speed-up vs AR, gated, sized trees
    OPENBLAS_NUM_THREADS=1 python tools/measure_dynamic_trees.py phases   # step time: measured vs charged
    OPENBLAS_NUM_THREADS=1 python tools/measure_dynamic_trees.py expected # what the calibrated values expect
    OPENBLAS_NUM_THREADS=1 python tools/measure_dynamic_trees.py context [n]  # maps per previous top-1 run
                                                                          # or not, fitted on n prompts (48)
    OPENBLAS_NUM_THREADS=1 python tools/measure_dynamic_trees.py lookup   # tau with prompt lookup in the trees

Greedy, the held-out prompts of minispec.bench.heldout_prompts (8 prompts), 128 new tokens each. "static" is
the tree build_tree makes from the heads' own stored top-k accuracies at that budget; "dynamic" is
tree="dynamic" with max_nodes = that budget, "raw" ranking by the heads' own probabilities (calibrate=False),
"calibrated" by the heads' calibration.json (tools/fit_calibration.py); "oracle" keeps, of a wide growth's
candidates, the true continuation's chain (`oracle_proposer`). Every run's tokens are checked against AR's.
Static trees run the heads' full vocabulary (head_vocab=None), as the dynamic ones do, so the two compare the
trees alone (on a CPU the decoders' default for a static tree drafts among 1024 tokens: docs/medusa.md).
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
from minispec.speculative.dynamic_tree import to_tree  # noqa: E402
from minispec.speculative.verify import Draft                       # noqa: E402
from minispec.training.calibrate import collect, fit, fit_by_run, fit_prompts, label_step   # noqa: E402
from minispec.speculative.tree import build_tree                    # noqa: E402

from fit_calibration import training_texts                          # noqa: E402  (tools/)

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


def oracle_proposer(name, model, budget, full):
    """The oracle bound at `budget` nodes: the candidates a raw dynamic growth of 64 nodes with top_k = budget
    grows, of which the oracle keeps the chain of the true continuation (full: prompt + AR's tokens), at most
    budget nodes deep: the best budget-node tree of those candidates under the true acceptance of each step."""
    prop = make_proposer(name, model, tree="dynamic", max_nodes=64, top_k=budget, calibrate=False,
                         gate=False)
    propose = prop.propose

    def oracle(ctx):
        draft = propose(ctx)
        if ctx.hidden is None:
            return draft
        grown = prop.dynamic.last
        on = label_step(grown, full, ctx.cache.pos)[2]
        chain = np.flatnonzero(on[1:]) + 1
        grown.kept = chain[grown.depths[chain] <= budget]
        tree, tokens, prop.dynamic.values = to_tree(grown, prop.dynamic.trees)
        return Draft(tree, tokens)
    prop.propose = oracle
    return prop


def tau_table(model, prompts, n_tokens):
    ar = [generate(model, p, max_new_tokens=n_tokens, eos_id=None).tokens for p in prompts]
    out = {}
    kinds = ("static", "raw", "calibrated", "oracle")
    for name in DECODERS:
        for budget in (4, 10, 32):
            for kind in kinds:
                log = {"nodes": [], "steps": []}
                if kind == "static":
                    heads = make_proposer(name, model, head_vocab=None).heads
                    opts = dict(tree=build_tree(heads.accuracies, budget)[0], gate=False, head_vocab=None)
                else:
                    opts = dict(tree="dynamic", max_nodes=budget, gate=False, calibrate=kind == "calibrated")
                new = steps = 0
                for p, want in zip(prompts, ar):
                    if kind == "oracle":
                        prop = oracle_proposer(name, model, budget, list(p) + want)
                    else:
                        prop = make_proposer(name, model, **opts)
                    if kind in ("raw", "calibrated"):
                        recording(prop, log)
                    o = generate(model, p, decoder=prop, max_new_tokens=n_tokens, eos_id=None)
                    assert o.tokens == want, f"{name} {kind} {budget}: not AR's tokens"
                    new, steps = new + o.stats.new_tokens, steps + o.stats.steps
                out[(name, budget, kind)] = (new / steps, log)
            s = out[(name, budget, "static")][0]
            r, c = out[(name, budget, "raw")], out[(name, budget, "calibrated")]
            pr, pc = (np.mean([t for t, _, _ in x[1]["steps"]]) for x in (r, c))
            o = out[(name, budget, "oracle")][0]
            print(f"{name:>8} budget {budget:2d}: tau static {s:.3f}  dynamic raw {r[0]:.3f} (ratio {r[0] / s:.3f}, "
                  f"predicted {pr:.3f})  calibrated {c[0]:.3f} (ratio {c[0] / s:.3f}, predicted {pc:.3f})  "
                  f"oracle {o:.3f}  (all identical to AR: yes)", flush=True)
    for kind in ("raw", "calibrated"):
        print(f"\ncalibration of the {kind} dynamic trees (all budgets): a kept node's value vs how often it was "
              "accepted (on the accepted path)")
        for name in DECODERS:
            nodes = sum((out[(name, b, kind)][1]["nodes"] for b in (4, 10, 32)), [])
            rows = calibration(nodes)
            gap = sum(n * abs(mv - acc) for _, _, n, mv, acc in rows) / len(nodes)
            print(f"{name}: {len(nodes)} nodes; mean |value - accepted| over the bins, weighted by nodes: {gap:.3f}")
            print("   value bin      nodes   mean value   accepted")
            for lo, hi, n, mv, acc in rows:
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


def expected_table(model, prompts, n_tokens):
    """What the calibrated values expect of the dynamic tree against the static one, step by step: each step
    grows the best 64 nodes of all paths (top_k = budget) under the calibrated values and verifies the best
    `budget` of them (the dynamic tree of that budget); the expected tokens of a tree are 1 + the sum of its
    nodes' values, for the dynamic tree and for the static tree's rank paths (a static path outside the 64 grown
    counts 0: a lower bound, the count of such paths is printed)."""
    ar = [generate(model, p, max_new_tokens=n_tokens, eos_id=None).tokens for p in prompts]
    for name in DECODERS:
        for budget in (4, 10, 32):
            heads = make_proposer(name, model, head_vocab=None).heads
            static = [tuple(c) for c in build_tree(heads.accuracies, budget)[0].choices if len(c)]
            dyn, sta, missing, new, steps = [], [], 0, 0, 0
            for p, want in zip(prompts, ar):
                prop = make_proposer(name, model, tree="dynamic", max_nodes=64, top_k=budget, calibrate=True,
                                     gate=False)
                propose = prop.propose

                def expected(ctx, prop=prop, propose=propose):
                    nonlocal missing
                    draft = propose(ctx)
                    if ctx.hidden is None:
                        return draft
                    g = prop.dynamic.last
                    path = {0: ()}
                    for n in range(1, len(g.tokens)):
                        path[n] = path[int(g.parents[n])] + (int(g.ranks[n]),)
                    value = {path[n]: float(g.values[n]) for n in g.kept}
                    g.kept = g.kept[:budget]                              # the dynamic tree of this budget
                    dyn.append(1 + float(g.values[g.kept].sum()))
                    sta.append(1 + sum(value.get(c, 0.0) for c in static))
                    missing += sum(c not in value for c in static)
                    tree, tokens, prop.dynamic.values = to_tree(g, prop.dynamic.trees)
                    prop.dynamic.tree = tree                              # the tree verified (DynamicTrees.observe)
                    return Draft(tree, tokens)
                prop.propose = expected
                o = generate(model, p, decoder=prop, max_new_tokens=n_tokens, eos_id=None)
                assert o.tokens == want, f"{name} {budget}: not AR's tokens"
                new, steps = new + o.stats.new_tokens, steps + o.stats.steps
            print(f"{name:>8} budget {budget:2d}: expected tokens per step under the calibrated values: dynamic "
                  f"{np.mean(dyn):.3f}, static >= {np.mean(sta):.3f} (ratio <= {np.mean(dyn) / np.mean(sta):.3f}; "
                  f"{missing} static nodes of {len(sta) * len(static)} outside the 64 grown); measured tau of the "
                  f"dynamic tree {new / steps:.3f} (identical to AR: yes)", flush=True)


def context_table(model, tok, prompts, n_tokens, n_fit=48, n_runs=3):
    """Maps per top-1 run of the previous step (training.calibrate.fit_by_run) against maps fitted on the same
    records without them (`fit`): records from n_fit training-split prompts (tools/fit_calibration.py's texts,
    seed 7), decoded ungated by a raw dynamic tree of 64 nodes (top_k 16); tau on the held-out prompts at 4 / 10
    / 32 nodes, static / without / with, and each dynamic tree's predicted tau (1 + the kept values)."""
    texts = training_texts(MODEL)
    fit_on = fit_prompts(tok, texts, n_fit, seed=7)
    print(f"fit: {len(fit_on)} training-split prompts, {n_tokens} greedy tokens each, ungated raw dynamic trees of "
          f"64 nodes (top_k 16); maps per run: runs 0 .. {n_runs - 2} alone, >= {n_runs - 1} together", flush=True)
    ar = [generate(model, p, max_new_tokens=n_tokens, eos_id=None).tokens for p in prompts]
    for name in DECODERS:
        recs = collect(model, lambda: make_proposer(name, model, tree="dynamic", max_nodes=64, top_k=16,
                                                    calibrate=False, gate=False), fit_on, n_tokens)
        heads = make_proposer(name, model, head_vocab=None).heads
        cals = {"without": fit(recs, heads.K), "with": fit_by_run(recs, heads.K, n_runs=n_runs)}
        for budget in (4, 10, 32):
            res = {}
            for kind in ("static", "without", "with"):
                static = dict(tree=build_tree(heads.accuracies, budget)[0], gate=False, head_vocab=None)
                opts = static if kind == "static" else \
                    dict(tree="dynamic", max_nodes=budget, gate=False, calibrate=cals[kind])
                new = steps = 0
                log = {"nodes": [], "steps": []}
                for p, want in zip(prompts, ar):
                    prop = make_proposer(name, model, **opts)
                    if kind != "static":
                        recording(prop, log)
                    o = generate(model, p, decoder=prop, max_new_tokens=n_tokens, eos_id=None)
                    assert o.tokens == want, f"{name} {kind} {budget}: not AR's tokens"
                    new, steps = new + o.stats.new_tokens, steps + o.stats.steps
                res[kind] = (new / steps, np.mean([t for t, _, _ in log["steps"]]) if log["steps"] else 0.0)
            s = res["static"][0]
            print(f"{name:>8} budget {budget:2d}: tau static {s:.3f}  " + "  ".join(
                f"{k} runs {res[k][0]:.3f} (ratio {res[k][0] / s:.3f}, predicted {res[k][1]:.3f})"
                for k in ("without", "with")) + "  (all identical to AR: yes)", flush=True)


def lookup_table(model, prompts, n_tokens, max_draft=8):
    """Prompt lookup inside the dynamic trees (option lookup): tau at equal node budgets of the static tree, the
    calibrated dynamic tree, the same with lookup's chain of up to max_draft tokens joined (lookup=max_draft), and
    lookup alone (decoder "lookup", its chain of min(budget, max_draft) tokens all verified: sizing="max");
    ungated, every output checked against AR's."""
    ar = [generate(model, p, max_new_tokens=n_tokens, eos_id=None).tokens for p in prompts]
    for name in DECODERS:
        heads = make_proposer(name, model, head_vocab=None).heads
        for budget in (4, 10, 32):
            setups = {"static": (name, dict(tree=build_tree(heads.accuracies, budget)[0], gate=False, head_vocab=None)),
                      "dynamic": (name, dict(tree="dynamic", max_nodes=budget, gate=False)),
                      "dynamic + lookup": (name, dict(tree="dynamic", max_nodes=budget, gate=False,
                                                      lookup=max_draft)),
                      "lookup alone": ("lookup", dict(max_draft=min(budget, max_draft), sizing="max"))}
            tau = {}
            for kind, (dec, opts) in setups.items():
                new = steps = 0
                for p, want in zip(prompts, ar):
                    o = generate(model, p, decoder=make_proposer(dec, model, **opts), max_new_tokens=n_tokens,
                                 eos_id=None)
                    assert o.tokens == want, f"{name} {kind} {budget}: not AR's tokens"
                    new, steps = new + o.stats.new_tokens, steps + o.stats.steps
                tau[kind] = new / steps
            s = tau["static"]
            print(f"{name:>8} budget {budget:2d}: tau static {s:.3f}  dynamic {tau['dynamic']:.3f} (ratio "
                  f"{tau['dynamic'] / s:.3f})  dynamic + lookup {tau['dynamic + lookup']:.3f} (ratio "
                  f"{tau['dynamic + lookup'] / s:.3f})  lookup alone {tau['lookup alone']:.3f}  (all identical to "
                  f"AR: yes)", flush=True)


def speed_table(model, prompts, n_tokens, runs):
    print("whole-step curve:", step_curve(model).describe(), flush=True)
    setups = [("ar", "ar", {})]
    for name in DECODERS:
        setups.append((f"{name} static", name, dict(head_vocab=None)))
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
        kinds = (dict(head_vocab=None), dict(tree="dynamic", max_nodes="auto"))
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
    elif what == "expected":
        expected_table(model, prompts, 128)
    elif what == "context":
        context_table(model, tok, prompts, 128, int(sys.argv[2]) if len(sys.argv) > 2 else 48)
    elif what == "phases":
        phases(model, prompts, 128)
    elif what == "lookup":
        lookup_table(model, prompts, 128)
    else:
        speed_table(model, prompts, 128, runs=int(sys.argv[2]) if len(sys.argv) > 2 else 3)


if __name__ == "__main__":
    main()
