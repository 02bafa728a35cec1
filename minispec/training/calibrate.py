"""Fit the calibration of a dynamic tree's values (minispec.speculative.calibration) on real decoding runs.

The draft's probability q of an edge is mapped to P(edge accepted | parent accepted), per depth and per rank
bucket, by isotonic regression. The data: the real dynamic proposer (a wide tree, so that many nodes are seen)
decodes greedily from prompts that are NOT the benchmark's held-out prompts (`fit_prompts` cuts them from files
the caller picks: stdlib files of the training split). Greedy decoding emits exactly the AR tokens, so after a
run the model's argmax after any prefix of the true continuation is known: for every grown node whose parent
lies on the true continuation (the root always does), "accepted" means its token is the next true token. Nodes
the tree did not keep count too (they were grown, and whether they would have been accepted is known), which
makes the data wider than the accepted paths alone.

    recs = collect(model, lambda: make_proposer("hydra", model, tree="dynamic", max_nodes=64, top_k=16,
                                                 calibrate=False), prompts, 128)
    cal = fit(recs, n_heads=4)                         # a Calibration; cal.to_json() is calibration.json
    cal = fit_by_run(recs, n_heads=4, n_runs=3)        # plus maps per previous step's top-1 run: 0, 1, 2+

Shapes: S samples (grown nodes whose parent was on the true path), K heads (depths), R rank buckets.
"""
import numpy as np

from ..backend import to_host
from ..decoders.registry import generate
from ..errors import UserError, check_int
from ..mistral.layers import softmax
from ..speculative.calibration import Calibration, top1_run


# ---------------------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------------------
def fit_prompts(tok, texts, n_prompts, prompt_tokens=48, seed=0):
    """n_prompts prompts of prompt_tokens tokens (BOS first), each from a random line start of a random text of
    `texts` (a list of str, e.g. stdlib files that are not held out), as minispec.bench.heldout_prompts cuts its
    own; texts too short for a prompt are skipped."""
    rng = np.random.default_rng(seed)
    prompts = []
    for i in rng.permutation(len(texts)):
        lines = texts[i].replace("\0", "").split("\n")
        if len(lines) < 20:
            continue
        ids, j = [tok.bos_id], int(rng.integers(0, len(lines) - 10))
        while len(ids) < prompt_tokens and j < len(lines):
            ids += tok.encode(lines[j] + "\n", bos=False)
            j += 1
        if len(ids) >= prompt_tokens:
            prompts.append(ids[:prompt_tokens])
        if len(prompts) == n_prompts:
            break
    return prompts


# ---------------------------------------------------------------------------------------------------------
# Records: (depth, q, rank, accepted) of every grown node whose parent lay on the true continuation
# ---------------------------------------------------------------------------------------------------------
def label_step(grown, full, pos):
    """For one step's Grown (minispec.speculative.dynamic_tree) whose root sits at position pos of the final
    sequence `full` (prompt + greedy output): (nodes, accepted) for every grown node whose parent is on the true
    continuation and whose depth is still inside `full`; accepted[i]: its token is the true next token.
    Also returns on [M + 1], whether each node lies on the true continuation (the root does)."""
    M1 = len(grown.tokens)
    on = np.zeros(M1, bool)
    on[0] = True
    for n in range(1, M1):                                  # parents have smaller numbers
        d, p = int(grown.depths[n]), int(grown.parents[n])
        on[n] = on[p] and pos + d < len(full) and int(grown.tokens[n]) == full[pos + d]
    nodes = np.array([n for n in range(1, M1) if on[int(grown.parents[n])]
                      and pos + int(grown.depths[n]) < len(full)], np.int64)
    return nodes, on[nodes], on


def true_path_ranks(grown, on):
    """The ranks of the grown nodes on the true continuation, depth by depth from the root's child (`on`, from
    label_step: at most one child of a node is on it, siblings holding distinct tokens); the step's top-1 run is
    calibration.top1_run of them."""
    ranks, node = [], 0
    while True:
        kids = np.flatnonzero((grown.parents == node) & on)
        if not len(kids):
            return tuple(ranks)
        node = int(kids[0])
        ranks.append(int(grown.ranks[node]))


def node_features(grown, nodes):
    """Per-node features of a step's grown nodes [S] that the draft knew before the verify: (parent_q, q0, q1),
    each [S]: the parent's own raw q (1.0 for the root), and the raw q of the node's rank-0 and rank-1 siblings
    (itself included; the top-1 mass and the runner-up of the distribution it was drawn from; 0 without one)."""
    par = grown.parents[nodes]
    first = nodes - grown.ranks[nodes]                                  # siblings are numbered by rank
    second = np.minimum(first + 1, len(grown.tokens) - 1)
    has_second = (second > first) & (grown.parents[second] == par)
    return grown.probs[par], grown.probs[first], np.where(has_second, grown.probs[second], 0.0)


def root_confidence(logits):
    """The largest softmax probability of each row of logits [..., V] (host floats [...]): how sure the target
    was of the token these logits chose."""
    return softmax(np.asarray(logits, np.float64)).max(axis=-1)


def collect(model, make_proposer, prompts, n_tokens):
    """Decode each prompt greedily with a fresh make_proposer() (a dynamic Medusa or Hydra proposer) and label
    every step's grown nodes (`label_step`). Returns {"depth", "q", "rank", "accepted", "parent_rank"}: arrays
    [S] (depth 1..K, q the raw draft probability, rank among siblings, the parent's rank, -1 for the root),
    what else was known of each node before the verify, arrays [S] ("parent_q", "q0", "q1": `node_features`;
    "root_conf": the target's largest softmax probability at the step's root, i.e. of the logits that chose the
    root, `root_confidence`; "token": the node's token), "prompt" [S] the prompt's index, plus "steps": per
    step (accepted tokens, deepest grown node on the true continuation) and "tokens": the outputs. The outputs
    must be AR's; it is checked."""
    out = {"depth": [], "q": [], "rank": [], "accepted": [], "parent_rank": [], "prev_run": [], "parent_q": [],
           "q0": [], "q1": [], "root_conf": [], "prompt": [], "token": [], "steps": [], "tokens": []}
    for index, ids in enumerate(prompts):
        prop = make_proposer()
        if getattr(prop, "dynamic", None) is None:
            raise UserError("calibration: make_proposer must build a proposer with tree='dynamic'")
        steps, propose = [], prop.propose

        def recording(ctx, propose=propose, steps=steps):
            draft = propose(ctx)
            drafted = ctx.hidden is not None and getattr(prop, "drafting", True)   # a gated plain step: no tree
            steps.append((ctx.cache.pos, prop.dynamic.last if drafted else None))
            return draft
        prop.propose = recording
        o = generate(model, ids, decoder=prop, max_new_tokens=n_tokens, eos_id=None)
        ar = generate(model, ids, max_new_tokens=n_tokens, eos_id=None).tokens
        if o.tokens != ar:
            raise AssertionError("calibration: the dynamic proposer's greedy output is not AR's")
        full = list(ids) + o.tokens
        conf = root_confidence(to_host(model.forward(full[:-1], warn_positions=False)))   # [len(full) - 1]
        run = -1                                        # the previous step's top-1 run (-1: no previous draft)
        for (pos, grown), acc in zip(steps, o.stats.accepted):
            if grown is None:
                run = -1
                continue
            nodes, accepted, on = label_step(grown, full, pos)
            out["prev_run"].append(np.full(len(nodes), run, np.int64))
            run = top1_run(true_path_ranks(grown, on))
            out["depth"].append(grown.depths[nodes])
            out["q"].append(grown.probs[nodes])
            out["rank"].append(grown.ranks[nodes])
            out["accepted"].append(accepted)
            par = grown.parents[nodes]
            out["parent_rank"].append(np.where(par > 0, grown.ranks[np.maximum(par, 0)], -1))
            for key, f in zip(("parent_q", "q0", "q1"), node_features(grown, nodes)):
                out[key].append(f)
            out["root_conf"].append(np.full(len(nodes), conf[pos - 1]))      # the logits at pos - 1 chose the root
            out["prompt"].append(np.full(len(nodes), index, np.int64))
            out["token"].append(grown.tokens[nodes])
            out["steps"].append((acc, int(grown.depths[on].max())))
        out["tokens"].append(o.tokens)
    for k in [k for k in out if k not in ("steps", "tokens")]:                 # the per-node arrays [S]
        out[k] = np.concatenate(out[k]) if out[k] else np.zeros(0)
    return out


# ---------------------------------------------------------------------------------------------------------
# The fit: binned isotonic regression per depth and rank bucket
# ---------------------------------------------------------------------------------------------------------
def isotonic(y, w):
    """The non-decreasing sequence closest to y [n] in weighted least squares (pool adjacent violators), as
    (block values [m], block weights [m], block ends [m]: one past each block's last index)."""
    vals, wts, ends = [], [], []
    for i, (v, c) in enumerate(zip(np.asarray(y, np.float64), np.asarray(w, np.float64))):
        vals.append(v)
        wts.append(c)
        ends.append(i + 1)
        while len(vals) > 1 and vals[-2] > vals[-1]:
            c2, v2 = wts.pop(), vals.pop()
            ends.pop()
            vals[-1] = (vals[-1] * wts[-1] + v2 * c2) / (wts[-1] + c2)
            wts[-1] += c2
            ends[-1] = i + 1
    return np.array(vals), np.array(wts), np.array(ends)


def fit_map(q, accepted, bin_size=50):
    """One monotone map: (q knots, p knots). The samples, sorted by q, are cut into bins of bin_size (sizes
    differing by at most one), each bin's acceptance rate is estimated as (accepted + 1/2) / (samples + 1) (the
    add-half estimator: a finite bin never claims a rate of exactly 0 or 1, so no node's value is 0 and every
    extra node adds some expected tokens), isotonic regression pools the bins' rates, and each pooled block
    becomes a knot at its mean q with its rate, both rounded to 6 decimals (as the file stores them); knots at
    equal q are merged, the first one kept."""
    order = np.argsort(q, kind="stable")
    q, a = np.asarray(q, np.float64)[order], np.asarray(accepted, np.float64)[order]
    n_bins = max(1, len(q) // bin_size)
    edges = np.linspace(0, len(q), n_bins + 1).astype(int)
    bq = np.array([q[s:e].mean() for s, e in zip(edges[:-1], edges[1:])])
    ba = np.array([(a[s:e].sum() + 0.5) / (e - s + 1) for s, e in zip(edges[:-1], edges[1:])])   # add-half
    bw = np.diff(edges).astype(np.float64)
    vals, wts, ends = isotonic(ba, bw)
    starts = np.concatenate([[0], ends[:-1]])
    kq = np.array([np.average(bq[s:e], weights=bw[s:e]) for s, e in zip(starts, ends)])
    kq, first = np.unique(np.round(np.clip(kq, 0.0, 1.0), 6), return_index=True)   # strictly increasing knots,
    return kq, np.round(np.clip(vals[first], 0.0, 1.0), 6)                         # as calibration.json stores them


def fit(records, n_heads, n_ranks=3, n_parents=2, bin_size=50, min_samples=200):
    """A Calibration from collect()'s records: for each depth 1..n_heads, parent bucket a (the root and parent
    rank 0 in bucket 0, parent ranks 1 .. n_parents - 2 alone, the rest together) and rank bucket b (ranks 0 ..
    n_ranks - 2 alone, the rest together) the monotone map of `fit_map`. Where a bucket has fewer than
    min_samples samples: rank bucket b > 0 reuses rank bucket b - 1; parent bucket a > 0 (at rank 0) reuses
    parent bucket 0 whole; depth d > 1 (parent bucket 0, rank 0) reuses the depth before it whole."""
    check_int("calibration: n_heads", n_heads, low=1)
    check_int("calibration: n_ranks", n_ranks, low=1)
    check_int("calibration: n_parents", n_parents, low=1)
    depth, q, acc = np.asarray(records["depth"]), np.asarray(records["q"]), np.asarray(records["accepted"])
    bucket = np.minimum(np.asarray(records["rank"]), n_ranks - 1)
    parent = np.minimum(np.maximum(np.asarray(records["parent_rank"]), 0), n_parents - 1)
    maps, counts = [], []
    for d in range(1, n_heads + 1):
        depth_maps, depth_n = [], []
        for a in range(n_parents):
            row, row_n = [], []
            for b in range(n_ranks):
                sel = (depth == d) & (parent == a) & (bucket == b)
                n = int(sel.sum())
                row_n.append(n)
                if n >= min_samples:
                    row.append(fit_map(q[sel], acc[sel], bin_size))
                elif b:
                    row.append(row[-1])
                else:
                    row = None                  # too few at rank 0: borrowed whole (below)
                    break
            if row is None and a:
                row = list(depth_maps[0])
            elif row is None and not maps:
                raise UserError(f"calibration: only {row_n[0]} samples of depth 1, rank 0 (need {min_samples}): "
                                f"decode more prompts")
            elif row is None:
                depth_maps = None
                break
            depth_maps.append(row)
            depth_n.append(row_n + [0] * (n_ranks - len(row_n)))
        maps.append(depth_maps if depth_maps is not None else [list(r) for r in maps[-1]])
        counts.append(depth_n if depth_maps is not None else [[0] * n_ranks] * n_parents)
    meta = {"what": "P(edge accepted | parent accepted) by depth (outer list, 1..K), parent bucket (the root and "
                    "parent rank 0 first, then parent ranks 1, 2, ..., the last bucket taking the rest) and rank "
                    "bucket (ranks 0, 1, ..., the last bucket taking the rest): a monotone map q -> p through its "
                    "knots",
            "samples": counts, "bin_size": bin_size}
    return Calibration(maps, meta)


def fit_by_run(records, n_heads, n_runs=3, min_samples=200, **options):
    """`fit` on every record (the maps of a step after one that drafted nothing), plus one set of maps per run
    bucket c of the previous step's top-1 run (records["prev_run"]: runs 0 .. n_runs - 2 alone, the rest
    together; minispec.speculative.calibration, "Context"), each fitted by `fit` on that bucket's records alone.
    A bucket with fewer than min_samples samples at depth 1, rank 0 takes the maps fitted on every record."""
    check_int("calibration: n_runs", n_runs, low=1)
    pooled = fit(records, n_heads, min_samples=min_samples, **options)
    run = np.asarray(records["prev_run"])
    bucket = np.minimum(run, n_runs - 1)                 # run -1 (no draft before) stays in no bucket
    by_run, counts = [], []
    for c in range(n_runs):
        sel = bucket == c
        sub = {k: np.asarray(records[k])[sel] for k in ("depth", "q", "rank", "accepted", "parent_rank")}
        first = int(((sub["depth"] == 1) & (sub["rank"] == 0)).sum())
        cal = fit(sub, n_heads, min_samples=min_samples, **options) if first >= min_samples else pooled
        by_run.append(cal.maps)
        counts.append(cal.meta["samples"] if first >= min_samples else "the maps of every step")
    meta = dict(pooled.meta, by_run=f"maps per top-1 run of the previous step: runs 0 .. {n_runs - 2} alone, runs "
                f">= {n_runs - 1} together (the 'depths' maps: a step after one that drafted nothing)",
                by_run_samples=counts)
    return Calibration(pooled.maps, meta, by_run)
