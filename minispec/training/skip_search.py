"""Skip-set search for Draft & Verify: Bayesian optimisation vs random search vs every set (`minispec search-skip`).

    minispec search-skip --model DIR                       # BO and random, 60 evaluations each, predicted objective
    minispec search-skip --model DIR --method exhaustive   # every set: the ground truth of the predicted objective
    minispec search-skip --model DIR --objective measured  # the authors' objective: measured tokens/s (noisy)

The objectives and the encoding live in minispec.training.skip_objective. The methods:

    random      the sets of the search space in a seeded random order, without repetition
    bo          the authors' Bayesian optimisation (bayes_opt, a Gaussian process with a Matern kernel and the
                authors' GP noise alpha = 1e-2; UCB acquisition with kappa = 2.5 as in SWIFT's code): one
                variable x_j in [0, 1] per free decision, skipped when x_j > 0.5; a few random points first. A
                suggestion that rounds to a set already scored is registered again with its known value and costs
                no budget (after max_duplicates = 5 such suggestions in a row the next unseen set of a seeded random
                order is taken instead).
    exhaustive  every set of the space (4096 for L = 6 with all layers, 256 with keep_ends)

Every method spends its budget in evaluations of distinct sets. The trace (a JSON file, default
<model>/draft_verify/search_trace.json) holds the calibration continuations, the cost model and one column table
per run ("bo/predicted", ...), rewritten after each evaluation. A rerun continues every run where it stopped; each
BO suggestion is a pure function of (the trace so far, the seed, the step), so a resumed search proposes exactly
what the uninterrupted one would have.
"""
import json
import os

import numpy as np

from ..backend import to_host
from ..errors import Fields, UserError, is_int, is_real, read_json
from .skip_objective import (CostModel, Calibration, MeasuredObjective, PredictedObjective, calibrate, free_decisions,
                             fit_cost_model, from_code, from_params, search_space, to_code, to_params)
from .data import corpus_prompts
from .progress import Progress

FORMAT = "minispec-skip-search/1"
INSTALL_HINT = "bo needs the optional package bayesian-optimization: pip install 'minispec[search]'"
DIGITS = 6                  # every recorded number is rounded once, so that a trace read back is what was in memory


# ---------------------------------------------------------------------------------------------------------
# The trace: header (calibration, cost model) + one column table per run
# ---------------------------------------------------------------------------------------------------------
class Trace:
    def __init__(self, path, data):
        self.path, self.data = path, data

    @classmethod
    def open(cls, path, header):
        """Read `path` if it exists (its header wins: a resumed search reuses its calibration and cost model),
        else start one from header (a dict, or a callable making it, so nothing is measured when resuming)."""
        if path is not None and os.path.exists(path):
            return cls(path, read_trace(path, header=False))
        return cls(path, {"format": FORMAT, **(header() if callable(header) else header), "runs": {}})

    def evaluations(self, key, settings):
        """The recorded evaluations (list of dicts) of run `key`; its settings must match a resumed run's."""
        run = self.data["runs"].setdefault(key, {"settings": settings, "columns": {}})
        if run["settings"] != settings:
            raise UserError(f"{self.path}: run {key!r} was made with {run['settings']}, not {settings}; "
                             f"use another --trace file or the same settings")
        cols = run["columns"]
        n = len(cols.get("code", []))
        return [{k: v[i] for k, v in cols.items() if v[i] is not None} for i in range(n)]

    def store(self, key, evaluations):
        """Columns of the run's evaluations, then an atomic rewrite of the file (an interrupted write leaves the
        previous trace)."""
        keys = list(dict.fromkeys(k for e in evaluations for k in e))
        self.data["runs"][key]["columns"] = {k: [e.get(k) for e in evaluations] for k in keys}
        if self.path is None:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, separators=(",", ":"))
            f.write("\n")
        os.replace(tmp, self.path)


def read_trace(path, header=True):
    """The JSON of an existing trace file, every field the search reads typed and ranged (format, n_layers,
    the calibration's sequences and starts, the cost model, the context, each run's settings and equally long
    columns), or one UserError naming the file and the key. header=False: the format and the runs only (a trace
    whose header the caller supplies, as the tests' small traces)."""
    try:
        data = read_json(path)
    except UserError as e:
        raise UserError(f"{e}; delete it to start the search afresh") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        got = data.get("format") if isinstance(data, dict) else None
        raise UserError(f"{path}: not a skip-search trace (format {got!r}, want {FORMAT!r})")
    f = Fields(data, path)
    for key, run in f.table("runs", default={}).items():
        r = Fields(run, f"{path}: run {key!r}")
        r.table("settings")
        cols = r.table("columns")
        if cols and (not all(isinstance(c, list) for c in cols.values()) or "code" not in cols
                     or len({len(c) for c in cols.values()}) != 1):
            raise UserError(f"{path}: run {key!r} key 'columns' must hold equally long lists, 'code' among them")
    if not header:
        return data
    L = f.int("n_layers", low=1)
    f.choice("context", ("committed", "own"), default="committed")
    cal = Fields(f.table("calibration"), f"{path}: calibration")
    seqs, starts = cal.get("sequences"), cal.int_list("starts", low=1)
    if not (isinstance(seqs, list) and seqs and all(isinstance(q, list) and all(is_int(t) and t >= 0 for t in q)
                                                     for q in seqs)):
        raise UserError(f"{path}: calibration key 'sequences' must be a non-empty list of token id lists")
    if len(starts) != len(seqs) or any(not st < len(q) for st, q in zip(starts, seqs)):
        raise UserError(f"{path}: calibration key 'starts' must give, for each of the {len(seqs)} sequences, where "
                        f"its continuation starts (1 <= start < its length), got {starts}")
    cost = Fields(f.table("cost_model"), f"{path}: cost_model")
    if cost.int("n_layers", low=1) != L:
        raise UserError(f"{path}: cost_model is for {cost.int('n_layers')} layers, the trace for {L}")
    for key in ("base", "attn", "mlp"):
        cost.real(key, low=0)
    curve = cost.table("curve")
    if "1" not in curve or not all(k.isdigit() and int(k) >= 1 and is_real(c) and np.isfinite(c) and c > 0
                                   for k, c in curve.items()):
        raise UserError(f"{path}: cost_model key 'curve' must map token counts T >= 1 (1 included) to costs > 0, "
                        f"got {curve}"[:300])
    return data


def check_trace(data, config, path):
    """An existing trace read by read_trace must be for this model's shape: its n_layers, token ids below its
    vocab_size (a trace of another model would score skip sets of that model)."""
    if data["n_layers"] != config.n_layers:
        raise UserError(f"{path}: a trace of a {data['n_layers']}-layer model ({data.get('model')!r}), but this "
                        f"model has {config.n_layers} layers; use another --trace file")
    top = max(max(q) for q in data["calibration"]["sequences"] if q)
    if top >= config.vocab_size:
        raise UserError(f"{path}: calibration token id {top} is outside this model's vocabulary ({config.vocab_size}):"
                        f" a trace of another model; use another --trace file")


def check_calibration(model, calib, path, min_agree=0.9):
    """The calibration continuations are the model's own greedy tokens: a trace of ANOTHER model with the same
    shape would pass check_trace and then score skip sets against that model's text. One teacher-forced forward
    per sequence; its argmax must give the stored continuation (at least min_agree of it: float32 near-ties)."""
    agree = total = 0
    for seq, start in zip(calib.sequences, calib.starts):
        logits = to_host(model.forward(seq[:-1], cache=model.new_cache(), warn_positions=False))    # [len - 1, V]
        pred = np.asarray(logits).argmax(axis=-1)[start - 1:]
        agree += int((pred == np.asarray(seq[start:])).sum())
        total += len(seq) - start
    if total and agree < min_agree * total:
        raise UserError(f"{path}: its calibration continuations are not this model's greedy tokens (only "
                        f"{agree} of {total} agree): a trace of another model; use another --trace file")


def _record(skip, result, **extra):
    r = {"code": to_code(skip), **extra}
    for k, v in result.items():
        r[k] = v if isinstance(v, (int, bool, np.integer)) else round(float(v), DIGITS)
    return {k: int(v) if isinstance(v, np.integer) else v for k, v in r.items()}


# ---------------------------------------------------------------------------------------------------------
# The searches: objective(SkipSet) -> dict(value=..., ...); each extends `evaluations` up to the budget
# ---------------------------------------------------------------------------------------------------------
def random_search(objective, n_layers, budget, seed=0, keep_ends=True, evaluations=None, save=None, bar=None):
    """Distinct sets of the space in a seeded random order; continues a partial `evaluations` list."""
    order = np.random.default_rng(seed).permutation(search_space(n_layers, keep_ends))
    evaluations = [] if evaluations is None else evaluations
    while len(evaluations) < min(budget, len(order)):
        skip = from_code(order[len(evaluations)], n_layers)
        evaluations.append(_record(skip, objective(skip)))
        _tick(save, bar, evaluations)
    return evaluations


def exhaustive_order(n_layers, keep_ends=False):
    """Every set of the space: the 2L single-sublayer sets first, then the sets that keep the first and last
    layers, then the rest, each group ascending (so a partial run already holds the smaller spaces whole)."""
    singles = [1 << j for j in range(2 * n_layers)]
    ends = search_space(n_layers, True)
    order = list(dict.fromkeys(singles + ends + search_space(n_layers, keep_ends)))
    allowed = set(search_space(n_layers, keep_ends))
    return [c for c in order if c in allowed]


def exhaustive_search(objective, n_layers, keep_ends=False, evaluations=None, save=None, bar=None, save_every=32):
    """Every set of the space, in exhaustive_order."""
    space = exhaustive_order(n_layers, keep_ends)
    evaluations = [] if evaluations is None else evaluations
    while len(evaluations) < len(space):
        skip = from_code(space[len(evaluations)], n_layers)
        evaluations.append(_record(skip, objective(skip)))
        _tick(save if len(evaluations) % save_every == 0 or len(evaluations) == len(space) else None, bar, evaluations)
    return evaluations


def bo_search(objective, n_layers, budget, seed=0, keep_ends=True, init_points=5, kappa=2.5, max_duplicates=5,
              evaluations=None, save=None, bar=None):
    """The authors' Bayesian optimisation over the free decisions (module docstring)."""
    free = np.flatnonzero(free_decisions(n_layers, keep_ends))
    keys = [f"x{j}" for j in free]
    space = search_space(n_layers, keep_ends)
    evaluations = [] if evaluations is None else evaluations
    seen = {e["code"]: e for e in evaluations if not e.get("duplicate")}
    streak = 0
    while len(seen) < min(budget, len(space)):
        step = len(evaluations)
        if len(seen) < init_points:
            x = np.random.default_rng([seed, step]).random(len(keys))                      # [free]
            point = dict(zip(keys, x))
        else:
            point = _suggest(evaluations, keys, seed, step, kappa)
        skip = from_params(point, n_layers)
        code = to_code(skip)
        if code in seen and streak < max_duplicates:
            streak += 1
            evaluations.append(dict(seen[code], duplicate=True, params=_round(point, keys)))
            continue
        if code in seen:          # BO is stuck on known sets: the next unseen one of a seeded random order
            order = np.random.default_rng([seed, step]).permutation(space)
            code = int(next(c for c in order if c not in seen))
            skip = from_code(code, n_layers)
            point = {k: v for k, v in to_params(skip).items() if k in keys}
        streak = 0
        rec = _record(skip, objective(skip), params=_round(point, keys))
        evaluations.append(rec)
        seen[code] = rec
        _tick(save, bar, evaluations)
    return evaluations


def _round(point, keys):
    return [round(float(point[k]), DIGITS) for k in keys]


def _suggest(evaluations, keys, seed, step, kappa):
    """One UCB suggestion from a Gaussian process fitted afresh on every evaluation so far (duplicates included),
    seeded by (seed, step): the same trace gives the same suggestion, resumed or not."""
    try:
        from bayes_opt import BayesianOptimization, acquisition
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    rs = seed * 100_003 + step
    opt = BayesianOptimization(f=None, pbounds={k: (0.0, 1.0) for k in keys}, random_state=rs, verbose=0,
                               acquisition_function=acquisition.UpperConfidenceBound(kappa=kappa),
                               allow_duplicate_points=True)
    opt.set_gp_params(alpha=1e-2)
    for e in evaluations:
        opt.register(params=dict(zip(keys, e["params"])), target=e["value"])
    return opt.suggest()


def _tick(save, bar, evaluations):
    if save is not None:
        save(evaluations)
    if bar is not None:
        bar.n = sum(not e.get("duplicate") for e in evaluations)
        best = max(evaluations, key=lambda e: e["value"])
        bar.set_postfix(best=f"{best['value']:.4f}", refresh=False)
        bar.refresh()


def best(evaluations, min_match=None):
    """The evaluation with the highest value (the first of equals); min_match: only among the sets whose match
    rate reaches it (the shipped set: 0.9, the adaptive draft exit's target acceptance rate)."""
    pool = [e for e in evaluations if not e.get("duplicate") and (min_match is None or e["match"] >= min_match)]
    if not pool:
        raise UserError(f"no evaluated set has a match rate >= {min_match}")
    return max(pool, key=lambda e: e["value"])


def best_so_far(evaluations):
    """[n] the best value among the first i + 1 distinct evaluations: the search trace plotted in notebook 05."""
    vals = [e["value"] for e in evaluations if not e.get("duplicate")]
    return np.maximum.accumulate(vals) if vals else np.zeros(0)


# ---------------------------------------------------------------------------------------------------------
# `minispec search-skip`: calibration + cost model (once, kept in the trace), the runs, the chosen set
# ---------------------------------------------------------------------------------------------------------
def calibration_prompts(tok, text, n_prompts=8, prompt_len=32, seed=0):
    """Calibration prompts cut from a training text at random places (minispec.training.data.corpus_prompts)."""
    g = corpus_prompts(tok, text, prompt_len, seed=seed)
    return [next(g) for _ in range(n_prompts)]


def run_search(model, trace_path, methods=("bo", "random"), objective="predicted", budget=60, seed=0,
               keep_ends=True, prompts=None, n_new=48, context="committed", flat=False, progress=True, log=print):
    """Run (or resume) each method on one objective, recording into the trace. prompts: calibration prompts
    (only read when the trace is new). Returns the Trace."""
    L = model.config.n_layers

    def header():
        log(f"calibration: {len(prompts)} prompts of {len(prompts[0])} tokens, {n_new} greedy tokens each; "
            f"measuring the cost model ...")
        return {"model": os.path.basename(os.path.normpath(getattr(model, "path", "model"))), "n_layers": L,
                "calibration": calibrate(model, prompts, n_new).to_json(),
                "cost_model": fit_cost_model(model, flat=flat).to_json(), "context": context}

    resumed = trace_path is not None and os.path.exists(trace_path)
    trace = Trace.open(trace_path, header)
    if resumed:                                         # a whole trace, made for this model, not another
        check_trace(read_trace(trace_path), model.config, trace_path)
    calib = Calibration.from_json(trace.data["calibration"])
    if resumed:
        check_calibration(model, calib, trace_path)
    costs = CostModel.from_json(trace.data["cost_model"])
    if objective == "predicted":
        fn = PredictedObjective(model, calib, costs, context=trace.data.get("context", context))
    elif objective == "measured":
        fn = MeasuredObjective(model, [s[:n] for s, n in zip(calib.sequences, calib.starts)])
    else:
        raise UserError(f"--objective must be 'predicted' or 'measured', not {objective!r}")
    for method in methods:
        if method not in ("bo", "random", "exhaustive"):
            raise UserError(f"--method: unknown method {method!r} (bo, random, exhaustive)")
        ends = keep_ends and method != "exhaustive"           # exhaustive: every set (restrict afterwards)
        settings = {"method": method, "objective": objective, "keep_ends": ends, "seed": seed,
                    "budget": len(search_space(L, ends)) if method == "exhaustive" else budget}
        key = run_key(method, objective, keep_ends)
        done = trace.evaluations(key, settings)
        bar = Progress(total=settings["budget"], desc=key, unit="set", disable=not progress,
                   initial=sum(not e.get("duplicate") for e in done))

        def save(evs, key=key):
            trace.store(key, evs)
        if method == "random":
            evs = random_search(fn, L, budget, seed, ends, done, save, bar)
        elif method == "bo":
            evs = bo_search(fn, L, budget, seed, ends, evaluations=done, save=save, bar=bar)
        else:
            if objective == "predicted" and fn.context == "committed" and len(done) < 4 ** L:
                log("exhaustive: every set's matches in one depth-first walk over the layers ...")
                fn.precompute()
            evs = exhaustive_search(fn, L, False, done, save, bar)
        bar.close()
        trace.store(key, evs)
        b = best(evs)
        log(f"{key}: best of {sum(not e.get('duplicate') for e in evs)} sets: {from_code(b['code'], L)} "
            + ", ".join(f"{k} {v}" for k, v in b.items() if k not in ("code", "params", "duplicate")))
    return trace


def run_key(method, objective, keep_ends):
    """A run's name in the trace: e.g. "bo/predicted", "random-all/measured" (-all: the first and last layers may
    be skipped too; an exhaustive run always covers every set)."""
    return f"{method}{'-all' if method != 'exhaustive' and not keep_ends else ''}/{objective}"
