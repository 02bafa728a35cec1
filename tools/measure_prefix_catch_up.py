"""What Hydra++'s prefix catch-up costs with the whole layer on every row against the last row alone
(docs/hydra.md, "Only the last row is computed in full", quotes what this prints).

    OPENBLAS_NUM_THREADS=1 python tools/measure_prefix_catch_up.py [rounds]

The shipped Hydra++ heads' prefix layer catches up n = 1, 3, 8, 16, 33 committed rows (random hidden states)
against a prefix cache of 100 positions, and is set back after each. Both ways run in every round, each right
after a one-token forward of the model against 100 cached tokens (as in decoding, where a verify comes first):
"whole layer" is prefix_forward on every row, then commit; "last row" is prefix_advance (every row's keys and
values, the rest of the layer for the last row alone). Medians over the rounds (default 200) of CPU time, in
units of that bare one-token forward.
"""
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from minispec.decoders.heads import heads_for                                    # noqa: E402
from minispec.decoders.hydra_files import load_heads                             # noqa: E402
from minispec.decoders.hydra_heads import new_prefix_cache, prefix_advance, prefix_forward   # noqa: E402
from minispec.mistral.model import load, prefill_chunks                          # noqa: E402

MODEL = Path(__file__).resolve().parent.parent / "weights" / "stdlib-mistral"
ROWS = (1, 3, 8, 16, 33)


def whole_layer(p, config, x, cache):
    """The catch-up as it ran before last=True: the layer's output on every row, then commit."""
    for s, e in prefill_chunks(x.shape[0], cache):
        out = prefix_forward(p, config, x[s:e], cache)                           # [e - s, D]
        cache.commit()
    return out[-1]


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    model = load(MODEL, device="cpu")
    heads = heads_for(model, None, "hydra++", load_heads)
    p, c = heads.prefix, heads.model_config
    x = np.random.default_rng(0).standard_normal((100 + max(ROWS), c.dim)).astype(model.dtype)   # [133, D]
    cache, base = new_prefix_cache(model), model.new_cache()
    prefix_advance(p, c, x[:100], cache)
    model.forward(np.arange(100) % c.vocab_size, base, warn_positions=False)
    times = {"forward": []}
    for _ in range(rounds):
        for n in ROWS:
            for way, f in (("whole layer", whole_layer), ("last row", prefix_advance)):
                model.forward_block([1], base)
                base.discard()
                pos, a = cache.pos, time.process_time()
                f(p, c, x[100:100 + n], cache)
                times.setdefault((way, n), []).append(time.process_time() - a)
                cache.pos = pos
        a = time.process_time()
        model.forward_block([1], base)
        base.discard()
        times["forward"].append(time.process_time() - a)
    unit = statistics.median(times["forward"])
    print(f"bare one-token forward: {unit * 1e6:.0f} us CPU time (median of {rounds} rounds)")
    for way in ("whole layer", "last row"):
        print(f"{way:>11}: " + ", ".join(f"{n} rows {statistics.median(times[(way, n)]) / unit:.3f}" for n in ROWS)
              + " one-token forwards")


if __name__ == "__main__":
    main()
