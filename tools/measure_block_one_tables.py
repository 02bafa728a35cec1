"""What Hydra's block-1 tables (minispec.decoders.hydra_heads.BlockOneTables) buy in decoding: each decoder with
its defaults (the gate, the CPU tree, head_vocab "auto"), once with the tables and once without, beside plain
decoding (docs/hydra.md, "Block 1 as a lookup", quotes what this prints).

    OPENBLAS_NUM_THREADS=1 python tools/measure_block_one_tables.py [runs] [kinds]     # default: 3 hydra,hydra++

Greedy, the held-out prompts of `minispec bench decode` (8 prompts of 48 tokens), 128 new tokens each. The three
setups (AR, the decoder with tables, the decoder without) run prompt by prompt in turn, the order rotating from
one prompt to the next, `runs` times; every run's tokens are checked equal to AR's. "Without" is a copy of the
same heads with `table_budget = 0`: a separate object, so its gate prices drafting with its own measured
proposal, as a decoder without tables would. Printed per setup: the speed-up over AR in CPU time (all runs'
decodes summed, the clock of the project's cost model), the wall time of a head call in decoding
(stats.counters head_time_s / head_calls: its weights as the step before left the caches), tau, and the steps
that drafted.
"""
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from minispec import generate                                                   # noqa: E402
from minispec.bench import heldout_prompts                                      # noqa: E402
from minispec.decoders.registry import make_proposer                            # noqa: E402
from minispec.mistral.model import load                                         # noqa: E402
from minispec.mistral.tokenizer import Tokenizer                                # noqa: E402

MODEL = Path(__file__).resolve().parent.parent / "weights" / "stdlib-mistral"


def without_tables(heads):
    """A copy of heads (the same arrays) whose heads run block 1 as matmuls."""
    out = copy.copy(heads)
    out.table_budget = 0
    return out


def main(runs=3, kinds=("hydra", "hydra++")):
    model = load(MODEL)
    prompts = heldout_prompts(MODEL, Tokenizer.from_dir(MODEL), 8)
    for kind in kinds:
        heads = make_proposer(kind, model).heads                   # the defaults' heads (cut to 1024 on a CPU)
        assert heads.tables() is not None
        setups = {"ar": ("ar", {}), "tables": (kind, {}), "matmul": (kind, {"heads": without_tables(heads)})}
        names = list(setups)
        for name in names:                                          # warm-up: tables made, costs measured
            generate(model, prompts[0], decoder=setups[name][0], max_new_tokens=16, **setups[name][1])
        cpu = dict.fromkeys(names, 0.0)
        new = dict.fromkeys(names, 0)
        steps, drafted, head_s, calls = (dict.fromkeys(names, 0) for _ in range(4))
        same = dict.fromkeys(names, True)
        k = 0
        for _ in range(runs):
            for p in prompts:
                order = names[k % 3:] + names[:k % 3]
                k += 1
                outs = {}
                for name in order:
                    d, opts = setups[name]
                    o = generate(model, p, decoder=d, max_new_tokens=128, eos_id=None, **opts)
                    s = o.stats
                    cpu[name] += s.decode_cpu_time
                    new[name] += s.new_tokens
                    steps[name] += s.steps
                    drafted[name] += sum(1 for n in s.drafted if n)
                    head_s[name] += s.counters.get("head_time_s", 0.0)
                    calls[name] += s.counters.get("head_calls", 0)
                    outs[name] = o.tokens
                for name in names:
                    same[name] &= outs[name] == outs["ar"]
        per_token = {name: cpu[name] / new[name] for name in names}
        print(f"{kind}: AR {new['ar'] / cpu['ar']:.0f} tokens per CPU second; {runs} runs of {len(prompts)} prompts")
        for name in names[1:]:
            print(f"  {name:>7}: {per_token['ar'] / per_token[name]:.3f}x AR (CPU time), tau "
                  f"{new[name] / steps[name]:.2f}, {drafted[name]} of {steps[name]} steps drafted, a head call "
                  f"{head_s[name] / max(calls[name], 1) * 1e6:.0f} us (wall), outputs identical to AR: "
                  f"{'yes' if same[name] else 'NO'}")
        print(f"  tables / matmul: {per_token['matmul'] / per_token['tables']:.3f}x")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3,
         tuple(sys.argv[2].split(",")) if len(sys.argv) > 2 else ("hydra", "hydra++"))
