"""The benchmarks' prompt sets: held-out code, and prompts whose natural continuation copies the prompt."""
import re
from pathlib import Path


def heldout_prompts(model_dir, tok, n_prompts=8, prompt_tokens=48):
    """Prompts cut from the shipped held-out files (heldout_sample.txt next to the weights): each starts at
    a line start and holds ~prompt_tokens tokens. Falls back to a fixed code prompt where there is no sample."""
    sample = Path(model_dir) / "heldout_sample.txt"
    if not sample.exists():
        return [tok.encode("def quicksort(arr):\n")] * n_prompts
    lines = sample.read_text(encoding="utf-8").replace("\0", "").split("\n")
    prompts, step = [], max(1, len(lines) // n_prompts)
    for i in range(n_prompts):
        ids, j = [tok.bos_id], i * step
        while len(ids) < prompt_tokens and j < len(lines):
            ids += tok.encode(lines[j] + "\n", bos=False)
            j += 1
        prompts.append(ids[:prompt_tokens])
    return prompts


def copy_prompts(model_dir, tok, n_prompts=8, min_lines=6, max_lines=30):
    """Prompts whose natural continuation copies the prompt: a function from the held-out sample (dedented, of
    min_lines..max_lines lines, spread over the file), two blank lines, then its own `def` line again, as in "write
    this function again". Falls back to held-out prompts where there is no sample."""
    sample = Path(model_dir) / "heldout_sample.txt"
    if not sample.exists():
        return heldout_prompts(model_dir, tok, n_prompts)
    lines = sample.read_text(encoding="utf-8").replace("\0", "").split("\n")
    funcs = []
    for i, line in enumerate(lines):
        m = re.match(r"( *)def \w+\(", line)
        if not m:
            continue
        indent, j = len(m.group(1)), i + 1
        while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > indent):
            j += 1
        body = [ln[indent:] for ln in lines[i:j]]
        while body and not body[-1].strip():
            body.pop()
        if min_lines <= len(body) <= max_lines:
            funcs.append(body)
    if not funcs:
        return heldout_prompts(model_dir, tok, n_prompts)
    step = max(1, len(funcs) // n_prompts)
    return [tok.encode("\n".join(f) + "\n\n\n" + f[0] + "\n") for f in (funcs[::step] * n_prompts)[:n_prompts]]


PROMPT_SETS = {"heldout": heldout_prompts, "copy": copy_prompts}
