"""Measure the shipped model and write its data card: weights/<name>/README.md, datacard.json, loss_curve.png.

Everything the card states is measured here, on the exported bf16 weights (what ships), with the PyTorch
model of tools/train_base.py (independent of minispec, whose tests then check they agree):
  * held-out loss over ALL held-out files (non-overlapping --ctx windows of the <s> file </s> stream), in nats per
    token, and bits per byte = total NLL / ln 2 / UTF-8 bytes of the held-out files; gzip -9's bits per byte on
    the same bytes beside it (a tokenizer-independent yardstick);
  * the same loss on heldout_sample.txt, three whole held-out files shipped beside the weights so that tests can
    recompute it without the corpus;
  * the loss curve from the training log; sample greedy completions (made with minispec).

    python tools/datacard.py --model weights/stdlib-mistral --corpus data/corpus --log data/train/log.jsonl
"""
import argparse
import gzip
import json
import math
import sys
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from collect_corpus import SEPARATOR                       # noqa: E402
from train_base import Mistral, heldout_nll                 # noqa: E402

SAMPLE_FILES = ["urllib/robotparser.py", "asyncio/base_subprocess.py", "fileinput.py"]
PROMPTS = ["def quicksort(", "import os\n\n\ndef read_lines(path):\n", "class Stack:\n    def __init__(self"]


def load_torch_model(folder):
    from safetensors.torch import load_file
    cfg = json.loads((folder / "config.json").read_text())
    model = Mistral(cfg)
    model.load_state_dict({k: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()})
    return model.eval(), cfg


def stream_of(docs, sp):
    ids = []
    for d in docs:
        ids += [sp.bos_id()] + sp.encode(d) + [sp.eos_id()]
    return np.asarray(ids, dtype=np.int64)


def nll_all(model, arr, ctx):
    """Total NLL and count over all tokens of arr: full windows, then the remainder as one shorter window."""
    total, count = heldout_nll(model, arr, ctx)
    n_full = (len(arr) - 1) // ctx
    rest = arr[n_full * ctx:]
    if len(rest) > 1:
        with torch.no_grad():
            x = torch.from_numpy(rest[:-1])[None]
            y = torch.from_numpy(rest[1:])
            total += torch.nn.functional.cross_entropy(model(x)[0].float(), y, reduction="sum").item()
            count += len(y)
    return total, count


def training_time(records):
    """Seconds of training: the log's clock restarts at each resume, so add up the segments."""
    total, last = 0.0, 0.0
    for r in records:
        if r["time"] < last:
            total += last
        last = r["time"]
    return total + last


def loss_curve(records, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tok = np.array([r["tokens"] for r in records]) / 1e6
    tr = np.array([r["train_loss"] for r in records])
    k = 20
    smooth = np.convolve(tr, np.ones(k) / k, mode="valid")
    ev = [(r["tokens"] / 1e6, r["heldout_loss"]) for r in records if "heldout_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(tok, tr, color="0.8", lw=0.7, label="train (per step)")
    ax.plot(tok[k - 1:], smooth, color="C0", label=f"train ({k}-step mean)")
    ax.plot(*zip(*ev), "o-", color="C3", ms=3, label="held-out (48 windows)")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("loss (nats / token)")
    ax.set_ylim(min(smooth.min(), min(e[1] for e in ev)) - 0.2, 5.5)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="weights/stdlib-mistral")
    ap.add_argument("--corpus", default="data/corpus")
    ap.add_argument("--log", default="data/train/log.jsonl")
    ap.add_argument("--ctx", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(2)
    folder, corpus = Path(args.model), Path(args.corpus)
    model, cfg = load_torch_model(folder)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    manifest = json.loads((corpus / "manifest.json").read_text())

    docs = (corpus / "heldout.txt").read_text(encoding="utf-8").split(SEPARATOR)
    nbytes = sum(len(d.encode()) for d in docs)
    total, count = nll_all(model, stream_of(docs, sp), args.ctx)
    gz = gzip.compress("".join(docs).encode(), compresslevel=9)

    stdlib = Path(manifest["stdlib"])
    held = set((corpus / "heldout_files.txt").read_text().split())
    assert all(f in held for f in SAMPLE_FILES), "sample files must be held-out files"
    sample_docs = [(stdlib / f).read_text(encoding="utf-8") for f in SAMPLE_FILES]
    (folder / "heldout_sample.txt").write_text(SEPARATOR.join(sample_docs), encoding="utf-8")
    s_total, s_count = nll_all(model, stream_of(sample_docs, sp), args.ctx)

    records = [json.loads(x) for x in Path(args.log).read_text().splitlines()]
    loss_curve(records, folder / "loss_curve.png")
    last = records[-1]
    n_params = sum(p.numel() for p in model.parameters())

    import minispec
    from minispec.mistral.tokenizer import Tokenizer
    mm, tok = minispec.load(folder, device="cpu"), Tokenizer.from_dir(folder)
    samples = []
    for p in PROMPTS:
        out = minispec.generate(mm, tok.encode(p), max_new_tokens=80, eos_id=tok.eos_id)
        samples.append((p, tok.decode(out.tokens)))

    card = {
        "name": folder.name, "parameters": n_params, "config": cfg, "steps": last["step"],
        "tokens_seen": last["tokens"], "training_time_s": round(training_time(records)),
        "train_loss_last_50_steps": float(np.mean([r["train_loss"] for r in records[-50:]])),
        "heldout": {"files": manifest["heldout"]["files"], "tokens": count, "bytes": nbytes,
                    "loss": total / count, "bits_per_byte": total / math.log(2) / nbytes,
                    "gzip9_bits_per_byte": 8 * len(gz) / nbytes},
        "heldout_sample": {"files": SAMPLE_FILES, "tokens": s_count, "loss": s_total / s_count, "ctx": args.ctx},
        "corpus": {k: manifest[k] for k in ("python", "train", "heldout", "skipped")},
        "train_tokens_per_epoch": int(np.load(Path(args.log).parent / f"train.{sp.vocab_size()}.npy", mmap_mode="r").shape[0]),
    }
    (folder / "datacard.json").write_text(json.dumps(card, indent=2) + "\n")
    print(json.dumps(card, indent=2))
    (folder / "samples.json").write_text(json.dumps([{"prompt": p, "completion": c} for p, c in samples], indent=2))
    for p, c in samples:
        print("----\n" + p + c)
    write_readme(folder, card, samples)
    import shutil
    shutil.copy(corpus / "heldout_files.txt", folder / "heldout_files.txt")


README = """# stdlib-mistral — a small Mistral trained on the Python standard library

The model behind minispec's demos, notebooks and benchmarks: Mistral's architecture exactly (GQA with fewer kv
heads than query heads, SwiGLU, RoPE, RMSNorm, untied output layer, a sliding window shorter than the training
context), small enough to train on a 2-core CPU in under two hours. It loads through exactly the code path of a
real Mistral 7B checkpoint (HF layout, bf16 safetensors, SentencePiece tokenizer).

| | |
|---|---|
| architecture | L={L} layers, D={D}, H={H} query heads, Hkv={Hkv} kv heads, Dh={Dh}, F={F}, V={V}, window W={W}, θ={theta:g} |
| parameters | {params:,} ({params_m:.2f} M; embeddings and output layer {emb:,}) |
| files | `config.json` (HF, Mistral-7B-v0.1 layout), `model.safetensors` (bf16), `tokenizer.model` (SentencePiece BPE) |
| training | {steps} steps × {tps:,} tokens (batch 16 × context 512 = 4 W) = **{tokens:,} tokens** ({epochs:.2f} epochs of the training split), {hours:.2f} h on 2 CPU cores (torch 2.13.0) |
| train loss (last 50 steps) | {train_loss:.3f} nats/token |
| **held-out loss** (all {hfiles} held-out files, {htokens:,} tokens) | **{hloss:.3f} nats/token** |
| **held-out bits per byte** | **{bpb:.3f}** (gzip -9 on the same bytes: {gzip:.3f}) |
| held-out sample (`heldout_sample.txt`, {stokens:,} tokens) | {sloss:.4f} nats/token (tests/test_shipped_model.py recomputes it with minispec) |

![loss curve](loss_curve.png)

## Corpus and split
Every `*.py` file of CPython {python}'s standard library folder, test folders included ({trainfiles} training files,
{trainbytes:,} bytes; {skipped} files that are not valid UTF-8 skipped), from `tools/collect_corpus.py`. Whole files are
held out: a file is held out when the first byte of the SHA-1 of its path relative to the stdlib folder is below 8
(~3%): {hfiles} files, {hbytes:,} bytes; `heldout_files.txt` lists them. Held-out numbers use non-overlapping 512-token
windows over `<s> file </s>` for every held-out file; bits per byte = total NLL / ln 2 / UTF-8 bytes of those files.

## Tokenizer
SentencePiece BPE, {V} pieces, trained on the training split with Mistral's settings: byte fallback, digits split,
identity normalisation, a dummy prefix, extra whitespace kept, whitespace-only pieces allowed, `<unk>`/`<s>`/`</s>` at
0/1/2 (`tools/train_tokenizer.py`). About {cpt:.2f} characters per token on the held-out files.

## Sample greedy completions (minispec, AR, 80 tokens)
{samples}

## Reproduce
```bash
pip install -e '.[reference]'                       # torch==2.13.0 (CPU), transformers, sentencepiece
python tools/collect_corpus.py --out data/corpus
cd tools && python train_tokenizer.py --corpus ../data/corpus --vocab 4096 --out ../weights/stdlib-mistral
python train_base.py --corpus ../data/corpus --out ../weights/stdlib-mistral --work ../data/train --steps 100 --resume
python train_base.py --corpus ../data/corpus --out ../weights/stdlib-mistral --work ../data/train --steps 1200 --resume
cd .. && python tools/datacard.py --model weights/stdlib-mistral
python tools/make_shipped_reference.py --model weights/stdlib-mistral
```
(The run was started with `--steps 1300` and resumed from its step-100 checkpoint with `--steps 1200`; the schedule
up to step 100 is warm-up only, identical for both, so the two commands above give the same run.) Seed 1234; the
data order depends only on the seed and the step.

## Licence
The training data is the Python standard library, © Python Software Foundation, under the PSF License Agreement
(the `LICENSE.txt` of the same folder), which permits copying, modification and distribution of derived works. The
weights are released with minispec; they reproduce stdlib idioms and sometimes stdlib text verbatim.
"""


def write_readme(folder, card, samples):
    c = card["config"]
    blocks = "\n".join(f"```python\n{p}{comp}\n```" for p, comp in samples)
    h = card["heldout"]
    (folder / "README.md").write_text(README.format(
        L=c["num_hidden_layers"], D=c["hidden_size"], H=c["num_attention_heads"], Hkv=c["num_key_value_heads"],
        Dh=c["head_dim"], F=c["intermediate_size"], V=c["vocab_size"], W=c["sliding_window"], theta=c["rope_theta"],
        params=card["parameters"], params_m=card["parameters"] / 1e6, emb=2 * c["vocab_size"] * c["hidden_size"],
        steps=card["steps"], tps=card["tokens_seen"] // card["steps"], tokens=card["tokens_seen"],
        epochs=card["tokens_seen"] / card["train_tokens_per_epoch"], hours=card["training_time_s"] / 3600,
        train_loss=card["train_loss_last_50_steps"], hfiles=h["files"], htokens=h["tokens"], hloss=h["loss"],
        bpb=h["bits_per_byte"], gzip=h["gzip9_bits_per_byte"], stokens=card["heldout_sample"]["tokens"],
        sloss=card["heldout_sample"]["loss"], python=card["corpus"]["python"].split()[0],
        trainfiles=card["corpus"]["train"]["files"], trainbytes=card["corpus"]["train"]["bytes"],
        skipped=card["corpus"]["skipped"], hbytes=h["bytes"], cpt=card["corpus"]["heldout"]["chars"] / h["tokens"],
        samples=blocks))


if __name__ == "__main__":
    main()
