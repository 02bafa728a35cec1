"""Where a gated head decoder's time goes, step by step, in decoding (docs/costs.md quotes what this prints).

    OPENBLAS_NUM_THREADS=1 python tools/measure_step_parts.py [decoder] [runs]      # default: hydra++ 2

Greedy, the held-out prompts of `minispec bench decode` (8 prompts of 48 tokens), 128 new tokens each; AR and
the decoder (registry defaults: the gate, the CPU tree) decode each prompt in turn, `runs` times. Every step of
the decoder is timed in this process's CPU time, in three parts: propose, verify (one forward, acceptance,
commit) and observe; Hydra's proposal also in its two parts, the prefix layer's catch-up (Hydra++) and the
heads (`grounded_proposal`). Printed in units of AR's mean CPU time per step in the same runs:
- the drafting steps' parts, against what the cost model prices a drafting step at (s(N) of the proposer's
  curve + its proposal, the gate's price without the per-row catch-up charge);
- the plain steps' verify by how many steps after the last drafting step they come: a drafting step reads
  weights the model's forward then reads again from further away, which the cost model does not price (it
  prices every plain step at 1).
"""
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from minispec import generate                                                   # noqa: E402
from minispec.bench import heldout_prompts                                      # noqa: E402
from minispec.decoders import hydra                                             # noqa: E402
from minispec.decoders.registry import make_proposer                            # noqa: E402
from minispec.mistral.model import load                                         # noqa: E402
from minispec.mistral.tokenizer import Tokenizer                                # noqa: E402
from minispec.speculative import loop                                           # noqa: E402

MODEL = Path(__file__).resolve().parent.parent / "weights" / "stdlib-mistral"
clock = time.process_time
AFTER = ((1, 1), (2, 2), (3, 5), (6, 20), (21, 10**9))        # plain steps this many steps after a drafting step


def timed(parts, key, f):
    """f wrapped so that each call's CPU time is stored in parts[key]."""
    def g(*args, **kwargs):
        t0 = clock()
        out = f(*args, **kwargs)
        parts[key] = clock() - t0
        return out
    return g


def main(decoder="hydra++", runs=2):
    model = load(MODEL)
    prompts = heldout_prompts(MODEL, Tokenizer.from_dir(MODEL), 8)
    prop = make_proposer(decoder, model)
    kind = type(prop)
    steps, parts = [], {}
    loop.verify = timed(parts, "verify", loop.verify)                       # the loop's own verify, timed
    kind.propose = timed(parts, "propose", kind.propose)
    observe = timed(parts, "observe", kind.observe)

    def observe_and_keep(self, step):
        observe(self, step)
        steps.append(dict(parts, drafted=step.drafted))
        parts.clear()
    kind.observe = observe_and_keep
    if kind is hydra.HydraProposer:
        kind.catch_up = timed(parts, "catch_up", kind.catch_up)
        hydra.grounded_proposal = timed(parts, "heads", hydra.grounded_proposal)
    for name in ("ar", decoder):
        generate(model, prompts[0], decoder=name, max_new_tokens=16)       # warm-up: the cost models measured
    ar_cpu = ar_steps = 0
    decodes = []                                                            # the decoder's steps, per decode
    for _ in range(runs):
        for p in prompts:
            o = generate(model, p, max_new_tokens=128, eos_id=None)
            ar_cpu, ar_steps = ar_cpu + o.stats.decode_cpu_time, ar_steps + o.stats.steps
            steps.clear()
            parts.clear()
            generate(model, p, decoder=decoder, max_new_tokens=128, eos_id=None)
            decodes.append(list(steps))
    unit = ar_cpu / ar_steps
    steps = [x for d in decodes for x in d]
    gate = make_proposer(decoder, model).gate
    print(f"{decoder}: AR {unit * 1e6:.0f} us of CPU time per step; {len(steps)} steps of {runs} x {len(prompts)} "
          f"decodes; units: AR steps")
    mean = lambda xs, key: statistics.mean(x.get(key, 0.0) for x in xs) / unit          # noqa: E731
    drafting = [x for x in steps if x["drafted"]]
    for n in sorted({x["drafted"] for x in drafting}):
        xs = [x for x in drafting if x["drafted"] == n]
        split = (f" (catch-up {mean(xs, 'catch_up'):.3f}, heads {mean(xs, 'heads'):.3f})"
                 if kind is hydra.HydraProposer else "")
        total = mean(xs, "propose") + mean(xs, "verify") + mean(xs, "observe")
        print(f"  {len(xs)} drafting steps of {n + 1} nodes: propose {mean(xs, 'propose'):.3f}{split}, verify "
              f"{mean(xs, 'verify'):.3f}, observe {mean(xs, 'observe'):.3f}; total {total:.3f}; the cost model's "
              f"price {gate.step_cost(n + 1):.3f} (s({n + 1}) {gate.verify_cost(n + 1):.3f} + proposal "
              f"{gate.proposal:.3f})")
    since = []                                   # per step: steps since the decode's last drafting step, or None
    for d in decodes:
        last = None
        for x in d:
            last = 0 if x["drafted"] else (None if last is None else last + 1)
            since.append(last)
    for lo, hi in AFTER:
        xs = [x for x, s in zip(steps, since) if not x["drafted"] and s is not None and lo <= s <= hi]
        if xs:
            span = f"{lo}" if lo == hi else f"{lo}-{hi}" if hi < 10**9 else f"{lo}+"
            print(f"  plain steps {span} after a drafting step: {len(xs)}, verify {mean(xs, 'verify'):.3f}, the whole "
                  f"step {mean(xs, 'propose') + mean(xs, 'verify') + mean(xs, 'observe'):.3f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "hydra++", int(sys.argv[2]) if len(sys.argv) > 2 else 2)
