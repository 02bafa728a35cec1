"""Reference values for the shipped model from HF transformers, for tests/test_shipped_model.py.

Loads weights/<name>/ (the bf16 files that ship) with transformers' MistralForCausalLM in float32, eager
attention, and writes tests/fixtures/<name>_reference.safetensors:
  ids            int64 [T]: the first T tokens of <s> heldout_sample.txt (T > 3 W, so the window slides)
  rows, logits   int64 [R], float32 [R, V]: the full-sequence logits at R chosen positions (all would be
                 T x V floats; the rows cover the start, every 16th position, and the end)
  golden{i}_prompt, golden{i}_tokens: HF greedy generate() continuations of two prompts, the second longer
                 than the window so the rolling cache wraps during generation
  golden{i}_min_gap float64 [1]: the smallest top-1 minus top-2 logit gap along that greedy path (a tie would
                 make the golden fragile; the tool prints it)

    python tools/make_shipped_reference.py --model weights/stdlib-mistral
"""
import argparse
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
from safetensors.numpy import save_file
from transformers import MistralForCausalLM

GOLDEN = [("def quicksort(", 48), ("import os\nimport sys\n\n\nclass Config:\n    \"\"\"", 160)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="weights/stdlib-mistral")
    ap.add_argument("--out", default="tests/fixtures")
    ap.add_argument("--T", type=int, default=448)
    args = ap.parse_args()
    torch.set_num_threads(1)
    folder = Path(args.model)
    model = MistralForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    W = model.config.sliding_window
    text = (folder / "heldout_sample.txt").read_text(encoding="utf-8")
    ids = np.array([sp.bos_id()] + sp.encode(text)[:args.T - 1], dtype=np.int64)
    assert len(ids) > 3 * W
    with torch.no_grad():
        logits = model(torch.from_numpy(ids)[None]).logits[0].numpy()
    rows = np.unique(np.concatenate([np.arange(8), np.arange(0, len(ids), 16), np.arange(len(ids) - 8, len(ids))]))
    out = {"ids": ids, "rows": rows.astype(np.int64), "logits": np.ascontiguousarray(logits[rows])}
    for i, (prompt, n) in enumerate(GOLDEN):
        p = [sp.bos_id()] + sp.encode(prompt)
        with torch.no_grad():
            g = model.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                               pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        toks = g.sequences[0, len(p):].numpy()
        top2 = torch.stack(g.logits)[:, 0].topk(2, dim=-1).values.numpy()
        gap = float((top2[:, 0] - top2[:, 1]).min())
        out[f"golden{i}_prompt"], out[f"golden{i}_tokens"] = np.array(p, np.int64), toks.astype(np.int64)
        out[f"golden{i}_min_gap"] = np.array([gap])
        print(f"golden {i}: {len(p)} + {len(toks)} tokens, min top-2 gap {gap:.2e}\n{prompt}{sp.decode(toks.tolist())}\n")
    path = Path(args.out) / f"{folder.name}_reference.safetensors"
    save_file(out, str(path))
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB), T={len(ids)}, {len(rows)} logit rows, W={W}")


if __name__ == "__main__":
    main()
