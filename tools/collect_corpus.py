"""Collect the training corpus of the shipped model: the Python standard library's own source.

Why this corpus: it is on every machine that has Python (no download), it is real, varied code and prose
(docstrings, tests), and its licence (PSF License Agreement, see LICENSE.txt in the same folder) permits
copying, modification and distribution of derived works, so a model trained on it can ship.

The corpus is every ``*.py`` file under the stdlib folder of the Python running this script (site-packages
and caches excluded), test folders included, read as UTF-8 (files that are not valid UTF-8 are skipped and
listed). Whole files are held out for evaluation: a file is held out when the first byte of the SHA-1 of its
relative path is below ``--heldout-bytes`` (default 8 of 256, about 3%), so the split is fixed by the paths
alone and anyone with the same Python version rebuilds exactly the same corpus.

Writes to ``--out`` (default data/corpus):
  train.txt, heldout.txt   files joined by a NUL line (the trainer splits on it again)
  train_files.txt, heldout_files.txt, skipped_files.txt, manifest.json (python version, sizes, sha256)

    python tools/collect_corpus.py --out data/corpus
"""
import argparse
import hashlib
import json
import sys
import sysconfig
from pathlib import Path

SEPARATOR = "\n\0\n"   # between documents; NUL never occurs in the stdlib's valid UTF-8 source


def stdlib_files(root):
    """Every .py file of the stdlib folder, sorted, without site-packages and caches."""
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("site-packages/") or "__pycache__" in rel:
            continue
        yield rel, path


def is_heldout(rel, heldout_bytes):
    return hashlib.sha1(rel.encode()).digest()[0] < heldout_bytes


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/corpus")
    ap.add_argument("--heldout-bytes", type=int, default=8)
    args = ap.parse_args()

    root = Path(sysconfig.get_paths()["stdlib"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    texts = {"train": [], "heldout": []}
    names = {"train": [], "heldout": [], "skipped": []}
    for rel, path in stdlib_files(root):
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            names["skipped"].append(rel)
            continue
        if "\0" in text:
            names["skipped"].append(rel)
            continue
        split = "heldout" if is_heldout(rel, args.heldout_bytes) else "train"
        texts[split].append(text)
        names[split].append(rel)

    manifest = {"python": sys.version, "stdlib": str(root), "heldout_bytes": args.heldout_bytes}
    for split in ("train", "heldout"):
        blob = SEPARATOR.join(texts[split])
        (out / f"{split}.txt").write_text(blob, encoding="utf-8")
        manifest[split] = {"files": len(names[split]), "chars": len(blob),
                           "bytes": len(blob.encode()), "sha256": hashlib.sha256(blob.encode()).hexdigest()}
    for split, lst in names.items():
        (out / f"{split}_files.txt").write_text("".join(n + "\n" for n in lst))
    manifest["skipped"] = len(names["skipped"])
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
