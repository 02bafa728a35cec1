"""What the draft gate earns, against never drafting, always drafting and an oracle (docs/costs.md quotes this).

    OPENBLAS_NUM_THREADS=1 python tools/measure_gate.py                       # held-out prompts, the defaults
    OPENBLAS_NUM_THREADS=1 python tools/measure_gate.py --prompt-set train    # 32 training-split prompts
    OPENBLAS_NUM_THREADS=1 python tools/measure_gate.py --grid               # also other gate settings

For each decoder (as the registry builds it, gate on) and prompt, one greedy decode of --tokens tokens runs plain
steps only, and at every position the decoder's draft is also verified without being committed: a trace of
what drafting there would have emitted, and what the decoder's own cost model prices that step at (its gate's
step_cost, with the dynamic tree's depth costs, Draft & Verify's draft tokens and Hydra++'s catch-up per row).
Greedy output does not depend on the drafts, so a gated decode is the trace replayed
(minispec.speculative.gate.replay_gate; the traces: minispec.bench.gate_trace): the printed speed-ups are the cost model's, without timing noise, and
the gate's decisions are exactly those a real decode with the same gate makes. Two caveats: Draft & Verify's
threshold stays at its initial value (a real run adapts it; the bench saw it within 0.59..0.61), and the oracle
(best_schedule) charges Hydra++'s catch-up as after a drafting step.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from minispec.bench import heldout_prompts                          # noqa: E402
from minispec.decoders.registry import generate, make_proposer, parse_setups, split_outside  # noqa: E402
from minispec.mistral.model import load                             # noqa: E402
from minispec.mistral.tokenizer import Tokenizer                    # noqa: E402
from minispec.bench.gate_trace import gate_like, gate_trace         # noqa: E402
from minispec.speculative.gate import best_schedule, replay_gate    # noqa: E402
from minispec.training.calibrate import fit_prompts                 # noqa: E402

from fit_calibration import training_texts                          # noqa: E402  (tools/)

MODEL = Path(__file__).resolve().parent.parent / "weights" / "stdlib-mistral"
DECODERS = "medusa,hydra,hydra++,draft_verify,medusa:tree=dynamic:max_nodes=auto,hydra:tree=dynamic:max_nodes=auto"


class BucketGate:
    """One DraftGate (as `gate`) per bucket of a feature of the trace's records ("confidence": the target's in the
    root; "match": prompt lookup's match length) (edges: the buckets' boundaries): each step asks, and tells, the
    gate of its own bucket. For replay_gate, which hands it the trace's records through `record` (its
    on_record)."""

    def __init__(self, gate, edges, feature="confidence"):
        self.edges, self.feature = list(edges), feature
        self.gates, self.current = [gate_like(gate) for _ in range(len(edges) + 1)], None

    def reset(self):
        for g in self.gates:
            g.reset()

    def record(self, rec):
        x = rec.get(self.feature) if rec is not None else None
        self.current = self.gates[0 if x is None else int(np.searchsorted(self.edges, x, side="right"))]

    def should_draft(self):
        return self.current.should_draft()

    @property
    def probing(self):
        return self.current.probing

    def observe(self, tokens, cost=None):
        self.current.observe(tokens, cost)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--decoders", default=DECODERS)
    ap.add_argument("--prompt-set", choices=("heldout", "train"), default="heldout")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--grid", action="store_true", help="also replay other gate settings")
    ap.add_argument("--buckets", action="append", default=[], type=lambda v: [float(x) for x in v.split(",")],
                    help="also replay one gate per bucket of the target's confidence in the root (edges, e.g. "
                    "0.5,0.99; may be repeated)")
    ap.add_argument("--match-buckets", action="append", default=[], type=lambda v: [float(x) for x in v.split(",")],
                    help="also replay one gate per bucket of prompt lookup's match length at the root (edges, e.g. "
                    "1 for no match / a match, or 1,2,3; may be repeated)")
    ap.add_argument("--save", default=None, help="write every decoder's traces and its gate's cost model to this "
                    "JSON file")
    ap.add_argument("--features", action="store_true", help="drafting's rate by the target's confidence in the root and by prompt lookup's match length")
    ap.add_argument("--check", action="store_true", help="also decode each prompt with the decoder itself (gate "
                    "as shipped) and print its modelled cost beside the replay's")
    ap.add_argument("--factor", type=float, default=1.0, help="price every drafting step at this multiple of "
                    "its modelled cost (what if drafting costs more than modelled)")
    args = ap.parse_args()
    model, tok = load(MODEL, device="cpu"), Tokenizer.from_dir(MODEL)
    if args.prompt_set == "heldout":
        prompts = heldout_prompts(MODEL, tok, args.prompts)
    else:
        prompts = fit_prompts(tok, training_texts(MODEL), args.prompts, seed=11)
    print(f"model {MODEL.name}, {len(prompts)} {args.prompt_set} prompts, {args.tokens} greedy tokens each; "
          f"speed-ups are the cost model's (units of one plain step), drafting steps priced x{args.factor}")
    setups = parse_setups(split_outside(args.decoders, ","))
    saved = {}
    for label, (name, options) in setups.items():
        traces, gates = [], None
        for ids in prompts:
            prop = make_proposer(name, model, **options)
            gates = prop.gate
            records, _ = gate_trace(model, prop, ids, args.tokens)
            for r in records:
                if r is not None:
                    r["cost"] *= args.factor
                    r["per_row"] *= args.factor
                    if r["probe"] is not None:
                        r["probe"] = (r["probe"][0], r["probe"][1] * args.factor)
            traces.append(records)
        saved[label] = {"traces": traces, "costs": {str(k): v for k, v in gates.costs.items()},
                        "proposal": gates.proposal, "hopeless": gates.hopeless}
        n = args.tokens * len(traces)
        curve = ", ".join(f"s({N})={c:.2f}" for N, c in sorted(gates.costs.items()) if N <= 9)
        extra = f", one draft token r = {prop.draft_cost:.2f}" if name == "draft_verify" else ""
        print(f"{label}: its gate's cost model {curve}, proposal {gates.proposal:.3f}{extra}"
              f"{'; ruled out (hopeless): never drafts' if gates.hopeless else ''}")
        always = sum(replay_gate(tr, gate_like(gates, enabled=False))[0] for tr in traces)
        oracle = [best_schedule(tr) for tr in traces]
        print(f"    never 1.000x  always {n / always:.3f}x  oracle gate {n / sum(c for c, _ in oracle):.3f}x "
              f"({sum(s for _, s in oracle)} drafting steps)")
        if args.check:
            real = [generate(model, ids, decoder=name, max_new_tokens=args.tokens, eos_id=None, **options)
                    for ids in prompts]
            rep = [replay_gate(tr, gate_like(gates)) for tr in traces]
            print(f"    check: the decoder's own modelled cost {sum(o.stats.counters['model.step_cost'] for o in real):.2f}"
                  f" in {sum(o.stats.steps for o in real)} steps ({sum(o.stats.counters.get('gate.plain_steps', 0) for o in real)} plain), the replay's "
                  f"{sum(c for c, _, _ in rep):.2f} in {sum(d + p for _, d, p in rep)} ({sum(p for _, _, p in rep)} plain)")
        if args.features:
            recs = [r for tr in traces for r in tr if r is not None and r.get("confidence") is not None]
            conf = np.array([r["confidence"] for r in recs])
            tok = np.array([r["tokens"] for r in recs], float)
            cst = np.array([r["cost"] for r in recs])
            edges = [0, 0.3, 0.5, 0.7, 0.85, 0.95, 0.99, 1.01]
            cells = []
            for lo, hi in zip(edges[:-1], edges[1:]):
                m = (conf >= lo) & (conf < hi)
                if m.any():
                    cells.append(f"[{lo:.2f},{hi:.2f}) n {m.sum()} tokens {tok[m].mean():.2f} cost {cst[m].mean():.2f} "
                                 f"rate {tok[m].sum() / cst[m].sum():.2f}")
            print("    by the target's confidence in the root: " + "; ".join(cells))
            match = np.array([r["match"] for r in recs])
            cells = [f"{label} n {m.sum()} rate {tok[m].sum() / cst[m].sum():.2f}" for label, m in
                     (("no match", match == 0), ("1", match == 1), ("2", match == 2), ("3", match == 3)) if m.any()]
            print("    by prompt lookup's match length at the root: " + "; ".join(cells))
        settings = [{}]
        if args.grid:
            settings += [dict(max_wait=w, decay=d) for d in (0.8, 0.9, 0.95) for w in (32, 128)]
        for ch in settings:
            res = [replay_gate(tr, gate_like(gates, **ch)) for tr in traces]
            cost = sum(c for c, _, _ in res)
            print(f"    gate {ch or 'as shipped'}: {n / cost:.3f}x  ({sum(d for _, d, _ in res)} drafting, "
                  f"{sum(p for _, _, p in res)} plain steps)")
        for edges in args.buckets:
            res = [replay_gate(tr, bg, on_record=bg.record) for tr in traces for bg in [BucketGate(gates, edges)]]
            print(f"    one gate per bucket of the target's confidence in the root, edges {list(edges)}: "
                  f"{n / sum(c for c, _, _ in res):.3f}x  ({sum(d for _, d, _ in res)} drafting steps)")
        for edges in args.match_buckets:
            res = [replay_gate(tr, bg, on_record=bg.record) for tr in traces
                   for bg in [BucketGate(gates, edges, "match")]]
            print(f"    one gate per bucket of prompt lookup's match length, edges {list(edges)}: "
                  f"{n / sum(c for c, _, _ in res):.3f}x  ({sum(d for _, d, _ in res)} drafting steps)")
    if args.save:
        Path(args.save).write_text(json.dumps(saved))


if __name__ == "__main__":
    main()
