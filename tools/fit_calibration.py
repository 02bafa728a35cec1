"""Fit calibration.json for the shipped heads (minispec.training.calibrate; docs/dynamic_trees.md quotes what this
prints).

    OPENBLAS_NUM_THREADS=1 python tools/fit_calibration.py                  # medusa, hydra, hydra++
    OPENBLAS_NUM_THREADS=1 python tools/fit_calibration.py --kinds hydra --prompts 16 --out-dir /some/where

The prompts are cut from the Python standard library files of the training split (the stdlib folder of the
Python running this, as tools/collect_corpus.py reads it, without the files in weights/stdlib-mistral/
heldout_files.txt), so they are disjoint from the benchmark's held-out prompts (minispec.bench.heldout_prompts,
cut from heldout_sample.txt, whose files are held out). Each prompt is decoded greedily (128 new tokens) by the
kind's dynamic proposer with a wide tree (max_nodes 64, top_k 16), raw values (calibrate=False) and no gate
(every step drafts).
"""
import argparse
import sys
import sysconfig
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from minispec.decoders.registry import make_proposer                # noqa: E402
from minispec.errors import write_json_lines                        # noqa: E402
from minispec.mistral.model import load                             # noqa: E402
from minispec.mistral.tokenizer import Tokenizer                    # noqa: E402
from minispec.speculative.calibration import FILE                   # noqa: E402
from minispec.training.calibrate import collect, fit, fit_by_run, fit_prompts   # noqa: E402

MODEL = Path(__file__).resolve().parent.parent / "weights" / "stdlib-mistral"


def training_texts(model_dir):
    """The stdlib .py files of this Python that are not held out (heldout_files.txt), as tools/collect_corpus.py
    lists them (site-packages, caches and files that are not UTF-8 left out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    held = set((Path(model_dir) / "heldout_files.txt").read_text().split())
    texts = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("site-packages/") or "__pycache__" in rel or rel in held:
            continue
        try:
            texts.append(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            continue
    return texts


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kinds", default="medusa,hydra,hydra++")
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--runs", type=int, default=1, help="with N > 1, also fit maps per top-1 run of the "
                    "previous step (runs 0 .. N - 2 alone, the rest together; training.calibrate.fit_by_run)")
    ap.add_argument("--records", default=None, help="keep each kind's labelled nodes in <records>/<kind>.npz and "
                    "fit from that file when it is there (to refit without decoding again)")
    ap.add_argument("--out-dir", default=None, help="write <out-dir>/<kind>/calibration.json (default: the heads' "
                                                    "own folders)")
    args = ap.parse_args()
    model = load(str(MODEL))
    tok = Tokenizer.from_dir(str(MODEL))
    texts = training_texts(MODEL)
    prompts = fit_prompts(tok, texts, args.prompts, seed=args.seed)
    print(f"{len(texts)} stdlib files of the training split; {len(prompts)} prompts of {len(prompts[0])} tokens, "
          f"{args.tokens} new tokens each, greedy; dynamic trees max_nodes 64, top_k 16, raw values", flush=True)
    for kind in args.kinds.split(","):
        saved = Path(args.records) / f"{kind}.npz" if args.records else None
        if saved is not None and saved.is_file():
            with np.load(saved) as f:
                recs = {k: f[k] for k in f.files}
        else:
            recs = collect(model, lambda: make_proposer(kind, model, tree="dynamic", max_nodes=64, top_k=16,
                                                        calibrate=False, gate=False), prompts, args.tokens)
            if saved is not None:
                saved.parent.mkdir(parents=True, exist_ok=True)
                np.savez(saved, **{k: recs[k] for k in ("depth", "q", "rank", "accepted", "parent_rank",
                                                        "prev_run")})
        K = make_proposer(kind, model, head_vocab=None).heads.K
        cal = fit_by_run(recs, K, n_runs=args.runs) if args.runs > 1 else fit(recs, K)
        cal.meta.update(kind=kind, data=f"{len(prompts)} prompts of {len(prompts[0])} tokens cut from stdlib files of "
                        f"the training split (not heldout_files.txt), seed {args.seed}, {args.tokens} greedy tokens "
                        "each, dynamic trees max_nodes 64, top_k 16, raw values",
                        command="OPENBLAS_NUM_THREADS=1 python tools/fit_calibration.py")
        folder = Path(args.out_dir) / kind if args.out_dir else MODEL / kind
        folder.mkdir(parents=True, exist_ok=True)
        write_json_lines(folder / FILE, cal.to_json())
        print(f"{kind}: {len(recs['q'])} labelled nodes, samples per depth x parent bucket x rank bucket "
              f"{cal.meta['samples']}; "
              f"wrote {folder.name}/{FILE}")
        for d, depth in enumerate(cal.maps):
            for a in range(len(depth) if d else 1):                    # depth 1: every parent is the root
                for b in range(len(depth[a])):
                    grid = np.repeat(np.array([[0.1], [0.3], [0.5], [0.7], [0.9]]), b + 1, axis=1)   # [5, b + 1]
                    at = cal(d, grid, np.full(5, a))[:, b]            # the factor a rank-b node gets
                    last = b == len(depth[a]) - 1
                    print(f"  depth {d + 1} parent rank {'>=' if a and a == len(depth) - 1 else '  '}{a} "
                          f"rank {'>=' if last else '  '}{b}: {len(depth[a][b][0]):3d} knots;  q = 0.1 0.3 0.5 0.7 "
                          f"0.9 -> " + " ".join(f"{x:.2f}" for x in at), flush=True)

if __name__ == "__main__":
    main()
