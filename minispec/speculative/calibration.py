"""Calibrated values for dynamic draft trees: the draft's probability q of an edge mapped to the probability that
the edge is accepted given that its parent was (docs/dynamic_trees.md, "Calibrated values").

A dynamic tree (minispec.speculative.dynamic_tree) ranks its nodes by value = the product along the path of a
per-edge factor. The factor that makes the value P(node accepted) is P(edge accepted | parent accepted): the
draft's own q is off from it (over-confident, under-confident, or for Medusa a per-depth marginal that ignores
the path: a deeper head's top token is far more often right under its parent's top token than under a
lower-ranked one). A Calibration holds, for every depth d (1..K: the edge into a depth-d node), every parent
bucket a (the parent's rank among its siblings: the root and rank 0 in bucket 0, rank r >= 1 in bucket
min(r, P - 1)) and every rank bucket b (the node's own rank, ranks >= R - 1 sharing the last bucket), a monotone
map g_{d,a,b}: q -> [0, 1], piecewise linear through its knots (q_i, p_i), constant beyond the first and last
knot. The factor of an edge of rank r under a parent of rank r' is

    f(d, r', r, q) = min over b <= bucket(r) of g_{d,bucket(r'),b}(q)                      (`Calibration.__call__`)

so f is non-decreasing in q and non-increasing in r. Siblings share their parent and q falls with the rank,
so f does too: the kept set stays a tree of sibling-ordered rank paths, and f <= 1 keeps value(child) <=
value(parent), the closure argument of dynamic_tree.py. The maps are fitted by minispec.training.calibrate and
stored next to the heads as calibration.json (`read_calibration`; minispec.decoders.heads attaches it to the
heads it loads).

Context. A step's maps may also depend on what the step before it showed, known before this step's draft and
free to read: its top-1 run, the number of leading depths of its accepted path at which the accepted token was
its parent's rank-0 child (`top1_run`; a path of ranks (0, 0, 1) has run 2). The optional `by_run` holds one
full set of maps per run bucket c (runs 0 .. C - 2 alone, runs >= C - 1 in the last bucket); a step whose
previous step drafted nothing (the first step, a gated plain step) or a file without them uses `maps`, the
maps fitted on every step. Every context's maps keep the invariants above, so the argument holds per step.
"""
import numpy as np

from ..errors import is_real, read_json
from ..mistral.safetensors import CheckpointError

FILE = "calibration.json"
FORMAT = "minispec-calibration-1"


class Calibration:
    """maps [K][P][R] of (q knots [n], p knots [n]) host float arrays: q strictly increasing in [0, 1], p
    non-decreasing in [0, 1] (K depths, P parent buckets, R rank buckets; the lists may differ in length from
    depth to depth). Called as calibrate(d, probs, parent_ranks) with d the expansion's depth (0-based: the
    children are at depth d + 1), probs [B, k] the draft's probabilities of each row's children by rank (column
    j = rank j) and parent_ranks [B] each row's own rank (-1 for the root; None: all bucket 0) -> the factors
    [B, k]. A depth deeper than the maps uses the last depth's. meta: what the file says about its fit. by_run:
    optional maps [C][K][P][R], one set per top-1 run bucket of the previous step (module docstring, "Context"),
    chosen by calibrate(..., run=r)."""

    def __init__(self, maps, meta=None, by_run=None):
        self.maps = checked_maps(maps, "calibration")
        self.by_run = [checked_maps(m, f"calibration: run bucket {c}") for c, m in enumerate(by_run or [])]
        self.meta = dict(meta or {})

    @property
    def depths(self):
        return len(self.maps)

    def context_maps(self, run):
        """The maps a step uses whose previous step's top-1 run was `run` (None: it drafted nothing)."""
        if run is None or run < 0 or not self.by_run:
            return self.maps
        return self.by_run[min(int(run), len(self.by_run) - 1)]

    def __call__(self, d, probs, parent_ranks=None, run=None):
        """The factors [B, k] (class docstring); run: the previous step's top-1 run (`top1_run`), None: none."""
        probs = np.asarray(probs, np.float64)
        maps = self.context_maps(run)
        depth = maps[min(d, len(maps) - 1)]
        bucket = np.zeros(probs.shape[0], np.int64) if parent_ranks is None else \
            np.minimum(np.maximum(np.asarray(parent_ranks, np.int64), 0), len(depth) - 1)      # [B]
        out = np.empty_like(probs)
        for a in np.unique(bucket):
            rows = bucket == a
            out[rows] = self.factors(depth[a], probs[rows])
        return out

    @staticmethod
    def factors(maps, probs):
        """probs [B, k] through one parent bucket's rank maps [R], each column under every lower rank's map."""
        R, k = len(maps), probs.shape[-1]
        out = np.empty_like(probs)
        for b in range(min(R, k)):
            cols = slice(b, b + 1) if b < R - 1 else slice(b, k)            # ranks >= R - 1 share the last map
            q = probs[:, cols]
            f = np.interp(q, *maps[b])
            for a in range(b):                                               # below every lower rank's map
                f = np.minimum(f, np.interp(q, *maps[a]))
            out[:, cols] = f
        return out

    def to_json(self):
        """The file's content (write with minispec.errors.write_json_lines)."""
        def js(maps):
            return [[[{"q": [round(float(x), 6) for x in q], "p": [round(float(x), 6) for x in p]}
                      for q, p in ranks] for ranks in depth] for depth in maps]
        out = {"format": FORMAT, **self.meta, "depths": js(self.maps)}
        if self.by_run:
            out["by_run"] = [js(m) for m in self.by_run]
        return out


def checked_maps(maps, what):
    """maps [K][P][R] of (q, p) as float64 arrays, one CheckpointError naming the map on bad knots."""
    maps = [[[(np.asarray(q, np.float64), np.asarray(p, np.float64)) for q, p in ranks] for ranks in depth]
            for depth in maps]
    for d, depth in enumerate(maps):
        for a, ranks in enumerate(depth):
            for b, (q, p) in enumerate(ranks):
                problem = knots_problem(q, p)
                if problem:
                    raise CheckpointError(f"{what}: depth {d + 1}, parent bucket {a}, rank bucket {b}: {problem}")
    return maps


def top1_run(rank_path):
    """The top-1 run of an accepted path given by its ranks (tree.choices of its last node): how many leading
    ranks are 0. top1_run((0, 0, 1)) == 2, top1_run((1, 0)) == 0, top1_run(()) == 0."""
    run = 0
    for r in rank_path:
        if int(r) != 0:
            break
        run += 1
    return run


def knots_problem(q, p):
    """What is wrong with one map's knots (None when nothing): equally long, non-empty, finite, in [0, 1], q
    strictly increasing, p non-decreasing."""
    if q.ndim != 1 or p.shape != q.shape or not len(q):
        return f"q and p must be equally long non-empty lists, got {len(q)} and {len(p)} values"
    if not (np.isfinite(q).all() and np.isfinite(p).all()):
        return "knots must be finite numbers"
    if q.min() < 0 or q.max() > 1 or p.min() < 0 or p.max() > 1:
        return "knots must lie in [0, 1]"
    if (np.diff(q) <= 0).any():
        return "q must be strictly increasing"
    if (np.diff(p) < 0).any():
        return "p must be non-decreasing in q (a monotone map)"
    return None


def read_calibration(path, n_heads):
    """The Calibration in `path` (calibration.json) for heads with n_heads heads: key "depths", one entry per
    head, each a non-empty list of parent buckets, each a non-empty list of {"q": [...], "p": [...]} (one per
    rank bucket). One CheckpointError naming the file and the key on anything malformed."""
    d = read_json(path)
    if d.get("format") != FORMAT:
        raise CheckpointError(f"{path}: key 'format' must be {FORMAT!r}, got {d.get('format')!r}")
    maps = read_maps(path, d.get("depths"), n_heads, "depths")
    by_run = d.get("by_run", [])
    if not isinstance(by_run, list):
        raise CheckpointError(f"{path}: key 'by_run' must be a list of one 'depths'-like entry per run bucket, "
                              f"got {by_run!r}"[:200])
    by_run = [read_maps(path, m, n_heads, f"by_run[{c}]") for c, m in enumerate(by_run)]
    meta = {k: v for k, v in d.items() if k not in ("format", "depths", "by_run")}
    return Calibration(maps, meta, by_run)


def read_maps(path, depths, n_heads, key):
    """maps [K][P][R] of (q, p) from the file's entry `key` (a list of one entry per head, each a non-empty list
    of parent buckets, each a non-empty list of {"q": [...], "p": [...]}); one CheckpointError naming the key."""
    if not isinstance(depths, list) or len(depths) != n_heads:
        got = f"{len(depths)} depths" if isinstance(depths, list) else repr(depths)[:60]
        raise CheckpointError(f"{path}: key {key!r} must be a list of one entry per head ({n_heads}), got {got}")
    maps = []
    for i, depth in enumerate(depths):
        if not isinstance(depth, list) or not depth:
            raise CheckpointError(f"{path}: key '{key}[{i}]' must be a non-empty list of parent buckets, got "
                                  f"{depth!r}"[:200])
        buckets = []
        for a, ranks in enumerate(depth):
            if not isinstance(ranks, list) or not ranks:
                raise CheckpointError(f"{path}: key '{key}[{i}][{a}]' must be a non-empty list of maps, got "
                                      f"{ranks!r}"[:200])
            row = []
            for b, m in enumerate(ranks):
                where = f"{key}[{i}][{a}][{b}]"
                if not isinstance(m, dict) or set(m) != {"q", "p"}:
                    raise CheckpointError(f"{path}: key {where!r} must be an object with keys 'q' and 'p', got "
                                          f"{m!r}"[:200])
                if not all(isinstance(m[k], list) and all(is_real(x) for x in m[k]) for k in ("q", "p")):
                    raise CheckpointError(f"{path}: key {where!r}: q and p must be lists of numbers")
                q, p = (np.array(m[k], dtype=np.float64) for k in ("q", "p"))
                problem = knots_problem(q, p)
                if problem:
                    raise CheckpointError(f"{path}: key {where!r}: {problem}")
                row.append((q, p))
            buckets.append(row)
        maps.append(buckets)
    return maps
