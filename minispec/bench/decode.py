"""`minispec bench decode`: every decoder on the same prompts, interleaved, with tau, tokens/s, the speed-up over
the first decoder in CPU and wall time, and the cost model's prediction beside each measurement
(minispec.speculative.costs: the canonical c(T) of this backend and each proposal's measured cost).
"""
import statistics

import numpy as np

from ..decoders.draft_verify import measured_draft_costs
from ..decoders.registry import generate, make_proposer, parse_setups
from ..errors import UserError
from ..mistral.model import load
from ..mistral.tokenizer import Tokenizer
from ..speculative.costs import (backend_clock, chain_speedup, heads_cost, interp_cost, pick_budget, speedup,
                                 step_curve)
from ..speculative.tree import expected_tau
from .forward import check_bench, environment
from .prompts import PROMPT_SETS


# ---------------------------------------------------------------------------------------------------------
# Speculative decoding: tau, tokens/s and wall speedup vs AR in one run; the verify cost curve c(T)
# ---------------------------------------------------------------------------------------------------------


def draft_summary(stats_list):
    """Decoder-agnostic draft statistics over several generations: {"drafted": histogram {K: steps},
    "counters": summed int counters, "series": {name: list-valued counters (e.g. Draft & Verify's threshold over
    the steps), each generation's list concatenated}}."""
    hist, counters, series = {}, {}, {}
    for s in stats_list:
        for k in s.drafted:
            hist[int(k)] = hist.get(int(k), 0) + 1
        for name, v in s.counters.items():
            if isinstance(v, list):
                series.setdefault(name, []).extend(float(x) for x in v)
            else:
                counters[name] = counters.get(name, 0) + v
    return {"drafted": dict(sorted(hist.items())), "counters": counters, "series": series}


def print_draft_verify(model, proposer, stats_list, tau):
    """Draft & Verify's columns: draft lengths and the threshold over time from the bench's runs; then what its
    cost rule (sizing="cost") believes, tau / mean(K r + s(K + 1)) with the whole-step curve s(N) and r one draft
    token timed on the same clock (`measured_draft_costs`), beside the generic prediction."""
    skip = proposer.skip
    summary = draft_summary(stats_list)
    gam = np.asarray(summary["series"].get("draft_verify.gamma", [np.nan]))
    ends = [(s.counters["draft_verify.gamma"][0], s.counters["draft_verify.gamma"][-1])
            for s in stats_list if s.counters.get("draft_verify.gamma")]
    print(f"draft_verify skip set {skip} ({skip.n_skipped} of {2 * skip.n_layers} sublayers skipped): draft "
          f"lengths (tokens: steps) {summary['drafted']}; threshold gamma over each generation: starts "
          f"{np.mean([a for a, _ in ends]):.3f}, ends {np.mean([b for _, b in ends]):.3f} (mean over prompts), "
          f"range {gam.min():.3f}..{gam.max():.3f}")
    drafted = [k for s in stats_list for k in s.drafted]
    r, c = measured_draft_costs(model, skip, max(drafted, default=0) + 1)
    pred = chain_speedup(tau, drafted, r, c)
    print(f"draft_verify cost rule's inputs: one draft token r = {r:.2f} plain steps ({backend_clock(model)[1]}), "
          f"s(N) the whole-step curve; tau / mean(K r + s(K + 1)) = {pred:.2f}x")
    return {"predicted": pred, "r": r}


def print_lookup(stats_list):
    """Prompt lookup's columns: the draft lengths the cost rule chose and where the matches came from (the prompt
    or the generated text). Its prediction is the generic one (`prediction`)."""
    summary = draft_summary(stats_list)
    n = summary["counters"]
    steps = sum(s.steps for s in stats_list)
    print(f"lookup draft lengths (tokens: steps) {summary['drafted']}; {n.get('lookup.matched', 0)} of {steps} "
          f"steps matched, {n.get('lookup.prompt_matched', 0)} of them in the prompt; accepted draft tokens "
          f"{n.get('lookup.accepted', 0)}, {n.get('lookup.prompt_accepted', 0)} of them copied from the prompt")
    return summary


def bench_decode(model_dir, decoders=("ar", "medusa"), n_tokens=128, n_prompts=8, runs=2, device="auto",
                 dtype="float32", prompt_set="heldout", control=False):
    """Every decoder on the same prompts, interleaved prompt by prompt over `runs` runs (the decoders' order changing
    from one prompt to the next, `balanced_orders`), greedy: tokens/s (median
    of the runs), tau, the speed-up over the first decoder (the baseline, plain decoding) and whether its tokens
    are the baseline's. Then, per decoder, the cost model's PREDICTED speed-up beside the MEASURED one:

        predicted = tau / (mean over steps s of s(N_s) + proposal)        (`prediction`)

    from numbers each measured separately: tau and N_s (the tokens verified at step s, root included) counted in
    this bench's runs; s(N) the whole-step curve of the model on its backend (`step_curve`: CPU time on NumPy,
    medians of 11 interleaved rounds against 112 cached tokens, printed with its statistic); the step costs the
    gated proposers modelled (their own curves, proposal and Hydra++'s prefix catch-up, measured before decoding),
    or for lookup its drafting time per step in this bench's runs (Stats.propose_cpu_time, on the clock of the
    curve) over t1, the curve's plain step. Measured: the baseline's CPU seconds per token over the decoder's, the
    CPU time of the same interleaved decodes (Stats.decode_cpu_time; the curve's clock, run with
    OPENBLAS_NUM_THREADS=1), with a 95% interval for it (a paired bootstrap over the decodes, `speedup_interval`)
    and the wall-time speed-up of the table beside it. The prediction prices a plain
    step at exactly t1: what the loop adds around the forward shows as the baseline's own step cost in t1.
    decoders: names, each with options if wanted, NAME[:KEY=VALUE]... ("hydra:tree=dynamic:max_nodes=auto",
    minispec.decoders.registry.parse_setup), labelled so in the table.
    control=True: the baseline runs a second time in every prompt's turn, labelled "<baseline> (control)", and its
    speed-up over the baseline is printed with its interval: it does the baseline's work, so its distance from
    1.00x is what this run's noise does to identical work (an A/A comparison).
    Returns (tokens/s per decoder label, the whole-step curve {N: s(N)})."""
    check_bench(n_tokens, runs, n_prompts, decoders)
    setups = parse_setups(decoders)                 # {label: (decoder name, its options)}
    decoders = list(setups)
    control = f"{decoders[0]} (control)" if control else None
    if control is not None:
        setups[control] = setups[decoders[0]]
        decoders.append(control)
    if prompt_set not in PROMPT_SETS:
        raise UserError(f"prompt_set must be one of {', '.join(PROMPT_SETS)}, not {prompt_set!r}")
    print("environment:", environment())
    model = load(model_dir, dtype=dtype, device=device)
    tok = Tokenizer.from_dir(model_dir)
    prompts = PROMPT_SETS[prompt_set](model_dir, tok, n_prompts)
    print(f"model {model_dir} on {model.device} ({dtype}); {len(prompts)} {prompt_set} prompts of "
          f"{min(map(len, prompts))}..{max(map(len, prompts))} tokens, {n_tokens} new tokens each, greedy; median "
          f"of {runs} interleaved runs after a warm-up")
    for name in decoders:
        generate(model, prompts[0], decoder=setups[name][0], max_new_tokens=16, **setups[name][1])  # warm-up
    # runs interleave the decoders (prompt by prompt), so that a slow phase of a shared machine hits all alike, and
    # the order changes from one prompt to the next (`balanced_orders`): every decoder goes first, and right after
    # every other one, equally often
    orders = balanced_orders(decoders)
    times = {name: [0.0] * runs for name in decoders}
    blocks = {name: [] for name in decoders}        # per (run, prompt), in the same order: (CPU seconds, tokens)
    outs = {name: [] for name in decoders}
    stats = {name: [] for name in decoders}
    for r in range(runs):
        for i, p in enumerate(prompts):
            for name in orders[(r * len(prompts) + i) % len(orders)]:
                o = generate(model, p, decoder=setups[name][0], max_new_tokens=n_tokens, eos_id=None,
                             **setups[name][1])
                times[name][r] += o.stats.decode_time
                blocks[name].append((o.stats.decode_cpu_time, o.stats.new_tokens))
                if r == 0:
                    outs[name].append(o.tokens)
                    stats[name].append(o.stats)
    results, results_tau = {}, {}
    width = max(8, *map(len, decoders))                # the labels right-aligned, as long as the longest
    for name in decoders:
        new = sum(s.new_tokens for s in stats[name])
        steps = sum(s.steps for s in stats[name])
        hist = np.zeros(max(len(s.histogram) for s in stats[name]), np.int64)
        for s in stats[name]:
            hist[:len(s.histogram)] += s.histogram
        results[name] = statistics.median(new / t for t in times[name])
        results_tau[name] = new / steps
        same = outs[name] == outs[decoders[0]]
        print(f"{name:>{width}}: {results[name]:7.1f} tokens/s  tau = {results_tau[name]:.2f} tokens/step  "
              f"speedup vs {decoders[0]} {results[name] / results[decoders[0]]:.2f}x  "
              f"identical output: {'yes' if same else 'NO'}  histogram (tokens/step: steps) "
              f"{ {i: int(c) for i, c in enumerate(hist) if c} }")
    curve = step_curve(model)
    costs, t1 = curve.costs, curve.unit
    print(f"whole-step cost curve on {model.device} (minispec.speculative.costs.step_curve): {curve.describe()}")
    base, b = stats[decoders[0]], decoders[0]
    base_step = sum(s.decode_time for s in base) / sum(s.steps for s in base)      # wall seconds per baseline step
    base_cpu = cpu_per_token(blocks[b])                                             # CPU seconds per baseline token
    print(f"{b:>8}: one step costs {base_cpu * results_tau[b] / t1:.2f} plain steps of the curve in {curve.clock} "
          f"(the model prices it at 1.00); speed-ups below: predicted from the cost model (each proposer's "
          f"modelled step costs where it keeps them, else s(N) and the measured proposal), measured in "
          f"{curve.clock} (wall time beside it)")
    if control is not None:
        same, (lo, hi) = base_cpu / cpu_per_token(blocks[control]), speedup_interval(blocks[b], blocks[control])
        print(f"{control}: the baseline once more, in the same turns: measured {same:.2f}x in {curve.clock} "
              f"[95% over the decodes: {lo:.2f}-{hi:.2f}], {results[control] / results[b]:.2f}x in "
              f"wall time; it does the baseline's work, so its distance from 1.00x is this run's noise on identical "
              f"work")
        decoders.remove(control)
    props = {name: make_proposer(setups[name][0], model, **setups[name][1])     # as generate made them (heads
             for name in decoders[1:]}                                          # cached on the model)
    predictions = {}
    for name in decoders[1:]:
        tree = getattr(props[name], "tree", None)                      # a static tree's depth, if it has one
        measured_cpu = base_cpu / cpu_per_token(blocks[name])
        line, predictions[name] = speculation_line(
            name, stats[name], costs, t1, measured_cpu, results[name] / results[b],
            None if tree is None else tree.max_depth, base_step, speedup_interval(blocks[b], blocks[name]))
        print(line)
    kinds = {name: setups[name][0] for name in decoders}
    for name in [n for n in decoders[1:] if kinds[n] in ("hydra", "hydra++")]:
        if tree_of(props[name]) is not None and props[name].heads.accuracies is not None:
            choices = [list(p) for p in props[name].tree.choices[1:]]
            expected = expected_tau(props[name].heads.accuracies, choices)
            print(tree_tau_line(name, len(choices), expected, "the heads' stored top-k accuracies", stats[name]))
    for name in [n for n in decoders[1:] if kinds[n] in ("medusa", "hydra", "hydra++")]:
        keep = getattr(props[name].heads, "keep", None)                # restricted heads (head_vocab)
        if keep is not None:
            print(f"{name}: the heads draft among the {len(keep)} most frequent of the model's "
                  f"{model.config.vocab_size} tokens (head_vocab; 'auto', the default, on a CPU with a static tree)")
    for name in [n for n in decoders if kinds[n] == "lookup"]:
        if name != "lookup":
            print(f"{name}:")
        print_lookup(stats[name])
    for name in [n for n in decoders[1:] if kinds[n] == "draft_verify"]:
        if name != "draft_verify":
            print(f"{name}:")
        print_draft_verify(model, props[name], stats[name], results_tau[name])
    for name in [n for n in decoders[1:] if kinds[n] == "medusa" and tree_of(props[n]) is not None]:
        heads, shipped = props[name].heads, props[name].tree          # the tree the proposer ran
        if heads.accuracies is not None:
            choices = [list(p) for p in shipped.choices[1:]]
            expected = expected_tau(heads.accuracies, choices)
            print(tree_tau_line(name, len(choices), expected, "the heads' held-out top-k accuracies", stats[name]))
            per_depth = [heads_cost(model, heads, t1, num_heads=d, clock=backend_clock(model)[0])
                         for d in range(1, heads.K + 1)]
            proposal = per_depth[shipped.max_depth - 1]           # the proposer runs tree.max_depth heads
            budget, ratio = pick_budget(np.asarray(heads.accuracies), costs, per_depth)
            print(f"medusa heads cost {proposal:.2f} AR steps per step ({shipped.max_depth} of {heads.K} heads, as "
                  f"deep as the tree, {curve.clock}); the tree budget maximising the expected "
                  f"speedup tau / (c(budget + 1) + heads) here is {budget} nodes (expected {ratio:.2f}x); the "
                  f"shipped tree has {len(choices)} nodes")
    return results, costs


def whole_tree_tau(stats_list, drafted):
    """Tokens per step over the steps that verified a whole static tree of `drafted` draft nodes, and how many such
    steps there were: (tau, steps), tau None without any. The plain steps of a gate and shorter drafts (a step
    cut short at the end of a generation, a gate's probe) are left out: they did not verify that tree."""
    acc = np.concatenate([np.asarray(s.accepted, np.float64) for s in stats_list])          # [steps]
    dr = np.concatenate([np.asarray(s.drafted, np.int64) for s in stats_list])              # [steps]
    whole = dr == drafted
    return (float(acc[whole].mean()) if whole.any() else None), int(whole.sum())


def tree_tau_line(name, drafted, expected, source, stats_list):
    """The line that sets a static tree's expected tau beside what the steps that verified it emitted. The
    decoder's own tau (its table row) also counts the gate's plain steps, so it is not the tree's."""
    tau, n = whole_tree_tau(stats_list, drafted)
    steps = sum(s.steps for s in stats_list)
    measured = "no step verified it" if tau is None else f"measured {tau:.2f} over the {n} of {steps} steps that did"
    return (f"{name} tree of {drafted} draft nodes: expected tau {expected:.2f} per step that verifies it (from "
            f"{source}, assumed independent) vs {measured}")


def balanced_orders(items):
    """Orders of items in which each item comes first equally often and right after each other item equally often
    (a Williams design, balanced for carry-over: what a decoder leaves in the caches hits every other one alike).
    n items: n orders, 2n when n is odd (the orders and their reverses). The first order is 0, 1, n-1, 2, n-2, ...,
    the k-th that one with every index + k (mod n); for n = 2 they are (a, b) and (b, a)."""
    n = len(items)
    first, lo, hi = [0], 1, n - 1
    while len(first) < n:
        first.append(lo)
        lo += 1
        if len(first) < n:
            first.append(hi)
            hi -= 1
    orders = [[items[(j + k) % n] for j in first] for k in range(n)]
    return orders + [o[::-1] for o in orders] if n % 2 else orders


def tree_of(proposer):
    """A proposer's static tree, or None (a chain drafter, or dynamic trees)."""
    tree = getattr(proposer, "tree", None)
    return tree if getattr(tree, "choices", None) is not None else None


def cpu_per_token(decodes):
    """CPU seconds per token over decodes [(CPU seconds, tokens)], both summed."""
    seconds, tokens = np.asarray(decodes, np.float64).sum(axis=0)
    return seconds / tokens


def speedup_interval(base, other, level=0.95, draws=2000, seed=0):
    """How far the measured speed-up could move with other prompts like these: a paired bootstrap over the
    bench's decodes. base, other: per decode (one prompt of one run, in the same order for both) (CPU seconds,
    tokens). The speed-up is base's seconds per token over other's, both summed over the decodes. Each draw
    resamples the decodes with replacement, the same ones for both (a slow moment of the machine hits the
    pair alike), and recomputes it. Returns (lo, hi), the central `level` of `draws` draws (a fixed seed: the
    same numbers give the same interval)."""
    b, o = np.asarray(base, np.float64), np.asarray(other, np.float64)          # [n, 2] each
    if b.shape != o.shape or b.ndim != 2 or b.shape[1] != 2 or len(b) == 0:
        raise UserError(f"speedup_interval: base and other must be the same non-empty [n, 2] (seconds, tokens), "
                        f"got {list(b.shape)} and {list(o.shape)}")
    pick = np.random.default_rng(seed).integers(0, len(b), (draws, len(b)))     # [draws, n] decodes drawn
    sb, so = b[pick].sum(axis=1), o[pick].sum(axis=1)                            # [draws, 2] each
    ratio = (sb[:, 0] / sb[:, 1]) / (so[:, 0] / so[:, 1])                        # [draws]
    tail = (1 - level) / 2
    return float(np.quantile(ratio, tail)), float(np.quantile(ratio, 1 - tail))


# ---------------------------------------------------------------------------------------------------------
# Any speculative decoder: per-depth acceptance, proposal cost, the cost model's speedup beside the measured one
# ---------------------------------------------------------------------------------------------------------
def depth_acceptance(stats_list, max_depth=None):
    """acc[d-1] = P(the depth-d draft token is accepted | the first d-1 were), over the steps whose draft reached
    depth d: along the accepted path, so a chain of 3 reports three rates and so does a tree 3 deep. max_depth:
    the depth of the decoder's (static) tree; None for chains, whose depth is the drafted count of each step."""
    a = np.concatenate([np.asarray(s.accepted[:len(s.drafted)], np.int64) - 1 for s in stats_list])  # draft tokens kept
    depth = np.concatenate([np.asarray(s.drafted, np.int64) for s in stats_list])                   # [steps]
    if max_depth is not None:
        depth = np.where(depth > 0, max_depth, 0)
    out = []
    for d in range(1, int(depth.max(initial=0)) + 1):
        reached = (a >= d - 1) & (depth >= d)
        if reached.sum() == 0:
            break
        out.append(float((a >= d)[reached].mean()))
    return out


def prediction(stats_list, costs, t1):
    """The cost model's predicted speed-up over plain decoding from one decoder's runs, in units of one plain
    step (t1 seconds, the step curve's unit): tau = tokens per step; c = the mean over steps s of s(N_s),
    N_s = 1 + the tokens drafted at step s (interpolated on `costs`, the whole-step curve). The step's cost:
    where the proposer kept its cost model's price of every step (stats.counters["model.step_cost"]: the gated
    decoders, whose verify steps and proposals were timed together once, before decoding), their mean, and
    proposal = that mean - c, plus, with prompt lookup's chain in the trees (option lookup), the chain's CPU time
    per step in these runs (stats.counters["lookup.chain_cpu_s"]) / t1, Python work every step pays that no
    price of the gate includes; else c + proposal with proposal = the proposer's CPU time per step in these runs
    (Stats.propose_cpu_time) / t1 (lookup: its drafts are Python work with no cost model of their own).
    predicted = tau / (step cost). Returns {"tau", "nodes" (mean N_s), "c", "proposal", "predicted",
    "modelled" (True when the proposer's own step costs were used)}."""
    steps = sum(s.steps for s in stats_list)
    tau = sum(s.new_tokens for s in stats_list) / steps
    N = 1 + np.concatenate([np.asarray(s.drafted, np.float64) for s in stats_list])          # [steps]
    c = float(np.mean(interp_cost(costs, N)))
    modelled = all("model.step_cost" in s.counters for s in stats_list)
    if modelled:
        proposal = sum(s.counters["model.step_cost"] for s in stats_list) / steps - c
        proposal += sum(s.counters.get("lookup.chain_cpu_s", 0.0) for s in stats_list) / steps / t1
    else:
        proposal = sum(s.propose_cpu_time for s in stats_list) / steps / t1
    return {"tau": tau, "nodes": float(N.mean()), "c": c, "proposal": proposal,
            "predicted": speedup(tau, c, proposal), "modelled": modelled}


def speculation_line(name, stats_list, costs, t1, measured, measured_wall=None, max_depth=None, base_step=None,
                     interval=None):
    """One decoder's line and its `prediction`: per-depth acceptance, tokens verified per step and their mean
    c(N) (and, given base_step, the baseline's wall seconds per step in the same interleaved runs, the verify
    time per step as this run measured it), head calls, the proposal cost per step (CPU time over t1; with the
    share of it the heads took, from the wall times the proposer counted), and the predicted speed-up beside
    the measured one (`measured`: in CPU time, with its 95% bootstrap interval (lo, hi) over the decodes when
    given, `speedup_interval`; `measured_wall`: in wall time)."""
    pred = prediction(stats_list, costs, t1)
    steps = sum(s.steps for s in stats_list)
    counters = draft_summary(stats_list)["counters"]       # counts and times summed (lists, e.g. gamma: not)
    wall = sum(s.propose_time for s in stats_list)
    heads = (f", heads {pred['proposal'] * counters['head_time_s'] / wall:.2f} of them"
             if "head_time_s" in counters and wall > 0 else "")
    calls = f", {counters['head_calls'] / steps:.1f} head calls/step" if "head_calls" in counters else ""
    acc = ", ".join(f"{a:.2f}" for a in depth_acceptance(stats_list, max_depth))
    c_run = (f" (in this run {sum(s.verify_time for s in stats_list) / steps / base_step:.2f}, wall)"
             if base_step else "")
    wall_text = f", {measured_wall:.2f}x in wall time" if measured_wall is not None else ""
    plain = counters.get("gate.plain_steps", 0)
    gated = f", {plain} of {steps} steps plain (the gate)" if plain else ""
    source = "modelled" if pred["modelled"] else "measured in this run"
    spread = f" [95% over the decodes: {interval[0]:.2f}-{interval[1]:.2f}]" if interval is not None else ""
    line = (f"{name:>8}: per-depth acceptance [{acc}]; {pred['nodes']:.1f} nodes verified/step{gated}, s(N) = "
            f"{pred['c']:.2f}{c_run}{calls}; proposal {pred['proposal']:.2f} plain steps/step ({source}){heads}; "
            f"speedup predicted tau / (s(N) + proposal) = {pred['predicted']:.2f}x, measured {measured:.2f}x in CPU "
            f"time{spread} (measured / predicted {measured / pred['predicted']:.2f}){wall_text}")
    return line, pred
