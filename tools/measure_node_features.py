"""Per-node features for the dynamic trees' values: do they raise dynamic tau? (docs/dynamic_trees.md, "Per-node
features" quotes what this prints; nothing of it is shipped.)

    OPENBLAS_NUM_THREADS=1 python tools/measure_node_features.py [--records DIR] [--kinds K1,K2] [--decoders D]

The calibrated values (minispec.speculative.calibration) see a node's depth, its rank, its parent's rank and its
own q. This tool fits a richer model of P(edge accepted | parent accepted) on the same kind of training-split
records (tools/fit_calibration.py's prompts, seed 7, decoded ungated by a raw 64-node tree, top_k 16) and
measures it as a tau on the held-out prompts (8 x 128 tokens, greedy, every run checked equal to AR's).

The model, per cell (depth d, parent bucket: the root or a rank-0 parent / a parent of rank >= 1, rank bucket
0 / 1 / >= 2), is a logistic regression g = sigmoid(w . x) on features known before the verify:

    lq    logit of the node's own q (its weight kept >= 0: g is non-decreasing in q)
    conf  logit of the target's own confidence at the root (the largest softmax probability of the logits that
          chose the root: a per-step feature)
    pq    logit of the parent's raw q (depth >= 2)
    sib   logit of the top-1 mass q0 of the distribution the node was drawn from (rank buckets >= 1), or of its
          runner-up q1 (rank bucket 0, where q0 is the node's own q): how peaked that distribution is
    tok   the logit of the node's token's acceptance rate on the fit's records (cross-fitted between odd and
          even prompts, shrunk to the mean rate)

A node's factor is the running minimum of g over its elder siblings and itself, so the factors of siblings fall
with the rank and lie in (0, 1): value(child) = value(parent) . factor <= value(parent), the closure argument of
minispec.speculative.dynamic_tree holds as it does for the calibrated maps. Kinds (SETS): "q only" (lq alone,
the control: the maps' information in another form), "all" (lq, conf, pq, sib), "all + token", the single
features added to lq, and "maps + all" (conf, pq, sib adjusting the isotonic maps fitted on the same records:
the maps' logit is an offset, so the factor stays non-decreasing in q).

It prints (1) held-out log-loss of each kind on the training split (fitted on prompts 0..47, scored on prompts
48..95: records only, no held-out prompt), then (2) for fits on 48 and on 96 prompts, tau at 4 / 10 / 32
nodes: static, the isotonic maps fitted on the same records (on 96 prompts: the shipped maps) and each kind of
--kinds.
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from minispec import generate                                       # noqa: E402
from minispec.backend import to_host                                # noqa: E402
from minispec.bench import heldout_prompts                          # noqa: E402
from minispec.decoders.registry import make_proposer                # noqa: E402
from minispec.mistral.layers import linear                          # noqa: E402
from minispec.mistral.model import load                             # noqa: E402
from minispec.mistral.tokenizer import Tokenizer                    # noqa: E402
from minispec.speculative.calibration import Calibration            # noqa: E402
from minispec.speculative.tree import build_tree                    # noqa: E402
from minispec.training.calibrate import collect, fit, fit_prompts, root_confidence   # noqa: E402

from fit_calibration import training_texts                          # noqa: E402  (tools/)
from measure_dynamic_trees import recording                         # noqa: E402  (tools/)

MODEL = Path(__file__).resolve().parent.parent / "weights" / "stdlib-mistral"
DECODERS = ("medusa", "hydra", "hydra++")
KEYS = ("depth", "q", "rank", "accepted", "parent_rank", "prev_run", "parent_q", "q0", "q1", "root_conf", "prompt",
        "token")
SETS = {"q only": ("lq",), "q + conf": ("lq", "conf"), "q + parent q": ("lq", "pq"), "q + sibling": ("lq", "sib"),
        "q + token": ("lq", "tok"), "all": ("lq", "conf", "pq", "sib"),
        "all + token": ("lq", "conf", "pq", "sib", "tok"), "maps + all": ("conf", "pq", "sib")}
BASED = ("maps + all",)                 # these adjust the isotonic maps fitted on the same records (an offset)
EPS = 1e-6


def logit(p):
    p = np.clip(np.asarray(p, np.float64), EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def design(feats, d, b, c):
    """The feature matrix [S, 1 + F] of one cell (depth d 1-based, rank bucket b) for the named features, from
    c: {"q", "root_conf", "parent_q", "q0", "q1"} arrays [S] (and "tok" [S], the token's logit rate, with tok)."""
    cols = [np.ones_like(c["q"])]
    for f in feats:
        if f == "lq":
            cols.append(logit(c["q"]))
        elif f == "conf":
            cols.append(logit(c["root_conf"]))
        elif f == "pq" and d > 1:
            cols.append(logit(c["parent_q"]))
        elif f == "sib":
            cols.append(logit(c["q1"] if b == 0 else c["q0"]))
        elif f == "tok":
            cols.append(c["tok"])
    return np.stack(cols, axis=-1)


def token_logits(recs, sel, V, prior=50):
    """[V] the logit of each token's acceptance rate over the records sel, shrunk towards their mean rate as
    (accepted + prior . mean) / (samples + prior)."""
    tok, acc = recs["token"][sel], recs["accepted"][sel].astype(np.float64)
    mean = acc.mean()
    return logit((np.bincount(tok, acc, V) + prior * mean) / (np.bincount(tok, minlength=V) + prior))


def fit_logistic(X, y, lam=1.0, iters=50, offset=None):
    """Weights w [F] maximising the Bernoulli log-likelihood of y [S] under sigmoid(offset + X w) minus
    lam/2 |w[1:]|^2 (Newton's method; offset [S], default 0), with w[1] (the weight of logit q) >= 0 when there
    is no offset: refitted without that column when it comes out negative."""
    off = np.zeros(len(y)) if offset is None else offset

    def newton(X):
        w = np.zeros(X.shape[1])
        reg = np.full(X.shape[1], lam)
        reg[0] = 1e-6
        for _ in range(iters):
            p = 1 / (1 + np.exp(-(off + X @ w)))
            g = X.T @ (p - y) + reg * w
            H = (X * (p * (1 - p))[:, None]).T @ X + np.diag(reg)
            step = np.linalg.solve(H, g)
            w -= step
            if np.abs(step).max() < 1e-9:
                break
        return w
    w = newton(X)
    if offset is None and w[1] < 0:
        w = np.insert(newton(np.delete(X, 1, axis=1)), 1, 0.0)
    return w


class NodeValues(Calibration):
    """The logistic values, called as a Calibration by DynamicTrees (run ignored). Per step the proposer wrapper
    (`attach`) sets conf (the root's confidence) and, per expansion, parent_q [B] (the rows' own raw q)."""

    def __init__(self, weights, feats, n_parents=2, n_ranks=3, token_logit=None, base=None):
        self.weights, self.feats, self.P, self.R, self.base = weights, feats, n_parents, n_ranks, base
        self.maps, self.by_run, self.meta = [[[(np.zeros(1), np.zeros(1))]]], [], {}
        self.conf, self.parent_q, self.ids, self.token_logit = 0.5, None, None, token_logit

    def __call__(self, d, probs, parent_ranks=None, run=None):
        probs = np.asarray(probs, np.float64)
        B, k = probs.shape
        dd = min(d, len(self.weights) - 1)
        a = np.zeros(B, np.int64) if parent_ranks is None else \
            np.minimum(np.maximum(np.asarray(parent_ranks, np.int64), 0), self.P - 1)
        pq = np.ones(B) if self.parent_q is None else np.asarray(self.parent_q, np.float64)
        q0 = np.repeat(probs[:, :1], k, 1)
        q1 = np.repeat(probs[:, 1:2] if k > 1 else np.zeros((B, 1)), k, 1)
        c = dict(q=probs, root_conf=np.full((B, k), self.conf), parent_q=np.repeat(pq[:, None], k, 1), q0=q0, q1=q1)
        if self.token_logit is not None:
            c["tok"] = self.token_logit[np.asarray(self.ids)[:, :k]]
        g = np.empty_like(probs)
        off = np.zeros_like(probs) if self.base is None else logit(self.base(d, probs, parent_ranks))
        for r in range(k):
            b = min(r, self.R - 1)
            for cell in range(self.P):
                rows = a == cell
                if rows.any():
                    X = design(self.feats, dd + 1, b, {key: v[rows, r] for key, v in c.items()})
                    g[rows, r] = 1 / (1 + np.exp(-(off[rows, r] + X @ self.weights[dd][cell][b])))
        return np.minimum.accumulate(g, axis=1)             # siblings' factors fall with the rank


def fit_values(recs, n_heads, feats, n_parents=2, n_ranks=3, min_samples=200, V=4096, base=None):
    """NodeValues fitted on records (collect's) per cell; a cell with fewer than min_samples samples borrows
    the cell of the rank bucket before it, then of parent bucket 0, then of the depth before. With "tok" the
    token rates are cross-fitted (a record of an even prompt gets the rates of the odd prompts' records and
    the other way round) and the values keep the rates of every record. base: a Calibration whose factor's logit
    is each record's offset (the features then adjust the isotonic maps; feats without "lq")."""
    depth, q, acc = recs["depth"], recs["q"], recs["accepted"].astype(np.float64)
    offset = None if base is None else logit(calibrated(base, recs))
    table = None
    if "tok" in feats:
        odd = recs["prompt"] % 2 == 1
        recs = dict(recs, tok=np.where(odd, token_logits(recs, ~odd, V)[recs["token"]],
                                       token_logits(recs, odd, V)[recs["token"]]))
        table = token_logits(recs, np.ones(len(q), bool), V)
    a_all = np.minimum(np.maximum(recs["parent_rank"], 0), n_parents - 1)
    b_all = np.minimum(recs["rank"], n_ranks - 1)
    weights = []
    for d in range(1, n_heads + 1):
        rows = []
        for a in range(n_parents):
            row = []
            for b in range(n_ranks):
                sel = (depth == d) & (a_all == a) & (b_all == b)
                if sel.sum() >= min_samples:
                    X = design(feats, d, b, {key: v[sel] for key, v in recs.items()})
                    row.append(fit_logistic(X, acc[sel], offset=None if base is None else offset[sel]))
                elif b:
                    row.append(row[-1])
                elif a:
                    row = list(rows[0])
                    break
                else:
                    row = list(weights[-1][0])
                    break
            rows.append(row)
        weights.append(rows)
    return NodeValues(weights, feats, n_parents, n_ranks, table, base)


def calibrated(cal, recs):
    """[S] each record's factor under the isotonic maps cal (its own q at its rank; elder siblings at q = 1,
    so they do not lower it)."""
    out = np.empty(len(recs["q"]))
    for d in np.unique(recs["depth"]):
        for r in np.unique(recs["rank"][recs["depth"] == d]):
            s = (recs["depth"] == d) & (recs["rank"] == r)
            grid = np.ones((s.sum(), int(r) + 1))
            grid[:, int(r)] = recs["q"][s]
            out[s] = cal(int(d) - 1, grid, recs["parent_rank"][s])[:, int(r)]
    return out


def log_loss(values, recs, sel):
    """Mean log-loss of the model's g (before the running minimum) on the records sel."""
    total = 0.0
    if values.token_logit is not None:
        recs = dict(recs, tok=values.token_logit[recs["token"]])
    for d in np.unique(recs["depth"][sel]):
        for a in range(values.P):
            for b in range(values.R):
                s = sel & (recs["depth"] == d) & (np.minimum(np.maximum(recs["parent_rank"], 0), values.P - 1) == a) \
                    & (np.minimum(recs["rank"], values.R - 1) == b)
                if not s.any():
                    continue
                dd = min(int(d), len(values.weights)) - 1
                X = design(values.feats, dd + 1, b, {key: v[s] for key, v in recs.items()})
                off = 0.0 if values.base is None else logit(calibrated(values.base, {k: v[s] for k, v in recs.items()}))
                p = np.clip(1 / (1 + np.exp(-(off + X @ values.weights[dd][a][b]))), EPS, 1 - EPS)
                y = recs["accepted"][s]
                total += -(y * np.log(p) + (1 - y) * np.log(1 - p)).sum()
    return total / sel.sum()


def isotonic_log_loss(cal, recs, sel):
    """The same score for the isotonic maps (minispec.training.calibrate.fit) on the records sel."""
    p = np.clip(calibrated(cal, {k: v[sel] for k, v in recs.items()}), EPS, 1 - EPS)
    y = recs["accepted"][sel]
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def attach(prop, values, model):
    """Give `values` what it reads per step and per expansion: the root's confidence from ctx.hidden (the final
    hidden state whose logits chose the root) and the expanded rows' own raw q."""
    propose, dyn = prop.propose, prop.dynamic
    grow = dyn.grow

    def attached_propose(ctx):
        if ctx.hidden is not None:
            values.conf = float(root_confidence(to_host(linear(ctx.hidden[None], model.output)))[0])
        return propose(ctx)

    def attached_grow(root, expand, chain=None):
        return grow(root, parent_q_expand(expand, values, dyn.top_k), chain)
    prop.propose, dyn.grow = attached_propose, attached_grow
    return prop


def parent_q_expand(expand, values, top_k):
    """expand for one growth (minispec.speculative.dynamic_tree.grow) that also sets values.parent_q [B], the
    expanded rows' own raw q (1.0 for the root), from the probabilities it returned for earlier depths (grow
    numbers the children of rows [B] in order, top_k each, after the nodes grown so far)."""
    qs = [1.0]

    def expand_q(d, rows, tokens, parents):
        ids, probs = expand(d, rows, tokens, parents)
        values.parent_q, values.ids = np.array([qs[int(r)] for r in rows]), np.asarray(ids)
        qs.extend(np.minimum(np.asarray(probs, np.float64)[:, :top_k], 1.0).reshape(-1).tolist())
        return ids, probs
    return expand_q


def records_for(model, name, prompts, n_tokens, folder):
    saved = Path(folder) / f"{name}.npz" if folder else None
    if saved is not None and saved.is_file():
        with np.load(saved) as f:
            return {k: f[k] for k in f.files}
    recs = collect(model, lambda: make_proposer(name, model, tree="dynamic", max_nodes=64, top_k=16,
                                                calibrate=False, gate=False), prompts, n_tokens)
    recs = {k: np.asarray(recs[k]) for k in KEYS}
    if saved is not None:
        saved.parent.mkdir(parents=True, exist_ok=True)
        np.savez(saved, **recs)
    return recs


def tau_of(model, name, prompts, ar, opts, values=None):
    new = steps = 0
    log = {"nodes": [], "steps": []}
    for p, want in zip(prompts, ar):
        prop = make_proposer(name, model, **opts)
        if values is not None:
            attach(prop, values, model)
        if opts.get("tree") == "dynamic":
            recording(prop, log)
        o = generate(model, p, decoder=prop, max_new_tokens=128, eos_id=None)
        assert o.tokens == want, f"{name} {opts}: not AR's tokens"
        new, steps = new + o.stats.new_tokens, steps + o.stats.steps
    return new / steps, (np.mean([t for t, _, _ in log["steps"]]) if log["steps"] else 0.0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", default=None, help="keep each decoder's records in <records>/<name>.npz")
    ap.add_argument("--decoders", default=",".join(DECODERS))
    ap.add_argument("--fits", default="48,96")
    ap.add_argument("--kinds", default="q only,all,all + token,maps + all", help="the feature sets measured as a "
                    "tau")
    args = ap.parse_args()
    model = load(str(MODEL))
    tok = Tokenizer.from_dir(str(MODEL))
    prompts = heldout_prompts(MODEL, tok, 8)
    fit_on = fit_prompts(tok, training_texts(MODEL), 96, seed=7)
    print(f"model {MODEL.name}, {len(prompts)} held-out prompts of {len(prompts[0])} tokens, 128 new tokens, "
          f"greedy; records: {len(fit_on)} training-split prompts (seed 7), 128 greedy tokens each, ungated raw "
          "dynamic trees of 64 nodes (top_k 16)", flush=True)
    ar = [generate(model, p, max_new_tokens=128, eos_id=None).tokens for p in prompts]
    for name in args.decoders.split(","):
        recs = records_for(model, name, fit_on, 128, args.records)
        K = make_proposer(name, model, head_vocab=None).heads.K
        first, second = recs["prompt"] < 48, recs["prompt"] >= 48
        sub = {k: v[first] for k, v in recs.items()}
        iso = fit(sub, K)
        fitted = {label: fit_values(sub, K, feats, base=iso if label in BASED else None)
                  for label, feats in SETS.items()}
        print(f"{name:>8}: {len(recs['q'])} records; log-loss on prompts 48..95 of a fit on prompts 0..47 (lower is "
              "better), over every record / over those with q >= 0.05:", flush=True)
        for sel in (second, second & (recs["q"] >= 0.05)):
            print(f"    isotonic maps {isotonic_log_loss(iso, recs, sel):.4f}  " + "  ".join(
                f"{label} {log_loss(v, recs, sel):.4f}" for label, v in fitted.items()), flush=True)
        heads = make_proposer(name, model, head_vocab=None).heads
        for n_fit in (int(x) for x in args.fits.split(",")):
            part = {k: v[recs["prompt"] < n_fit] for k, v in recs.items()}
            iso_cal = fit(part, K)
            kinds = {"isotonic": None, **{k: fit_values(part, K, SETS[k], base=iso_cal if k in BASED else None)
                                          for k in args.kinds.split(",")}}
            for budget in (4, 10, 32):
                res = {"static": tau_of(model, name, prompts, ar,
                                        dict(tree=build_tree(heads.accuracies, budget)[0], gate=False,
                                             head_vocab=None))}
                for label, values in kinds.items():
                    opts = dict(tree="dynamic", max_nodes=budget, gate=False,
                                calibrate=iso_cal if values is None else values)
                    res[label] = tau_of(model, name, prompts, ar, opts, values)
                s = res["static"][0]
                print(f"  fit {n_fit:2d} {name:>8} budget {budget:2d}: tau static {s:.3f}  " + "  ".join(
                    f"{k} {res[k][0]:.3f} (ratio {res[k][0] / s:.3f}, predicted {res[k][1]:.3f})"
                    for k in kinds) + "  (all identical to AR: yes)", flush=True)


if __name__ == "__main__":
    main()
