"""Count how often each token id occurs in the shipped model's training text (the frequency table behind the
heads' reduced draft vocabulary, `head_vocab=M`: docs/medusa.md, "A cheaper head").

The training text is rebuilt exactly as tools/collect_corpus.py builds it: every .py file of the running
Python's stdlib that is valid UTF-8, minus the held-out files (the same SHA-1 rule), joined by the same
separator. Its SHA-256 must equal the data card's, so the counts come from the text the model was trained on
and never from the held-out files the benchmarks' prompts are cut from. Each file is tokenized on its own
(BOS first), and the counts are written one key per line:

    python tools/count_tokens.py            # writes weights/stdlib-mistral/token_counts.json
"""
import argparse
import hashlib
import json
import sys
import sysconfig
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
from collect_corpus import SEPARATOR, is_heldout, stdlib_files     # noqa: E402
from minispec.errors import write_json_lines                       # noqa: E402
from minispec.mistral.tokenizer import Tokenizer                   # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "weights" / "stdlib-mistral"))
    args = ap.parse_args()
    model = Path(args.model)
    card = json.loads((model / "datacard.json").read_text())
    tok = Tokenizer.from_dir(model)
    V = card["config"]["vocab_size"]
    texts = []
    for rel, path in stdlib_files(Path(sysconfig.get_paths()["stdlib"])):
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        if "\0" not in text and not is_heldout(rel, 8):
            texts.append(text)
    sha = hashlib.sha256(SEPARATOR.join(texts).encode()).hexdigest()
    if sha != card["corpus"]["train"]["sha256"]:
        sys.exit(f"this Python's stdlib is not the training text (sha256 {sha}, the data card has "
                 f"{card['corpus']['train']['sha256']}): run with {card['corpus']['python'].split()[0]}")
    counts = np.zeros(V, np.int64)
    for text in texts:
        counts += np.bincount(tok.encode(text), minlength=V)
    order = np.argsort(-counts, kind="stable")
    cover = np.cumsum(counts[order]) / counts.sum()
    write_json_lines(model / "token_counts.json", {
        "what": "occurrences of each token id in the training text (tools/count_tokens.py), BOS once per file",
        "text_sha256": sha, "files": len(texts), "tokens": int(counts.sum()), "vocab_size": V,
        "counts": counts.tolist()})
    for m in (256, 512, 1024, 2048):
        print(f"the {m} most frequent tokens cover {cover[m - 1]:.4f} of the training tokens")
    print(f"{len(texts)} files, {int(counts.sum())} tokens, sha256 {sha} (matches the data card)")


if __name__ == "__main__":
    main()
