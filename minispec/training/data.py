"""The data heads train on, shared by the Medusa and the Hydra trainers: token sequences (corpus pieces or the
base model's own greedy continuations), the heads' labels, and the frozen base model's hidden states, computed once.

Reading order: the corpus file -> labels -> sequences (corpus pieces, prompts, self-distillation) -> the held-out
split and the sequence cache (.npz, no pickle) -> hidden states.

`--data corpus`: documents of a text corpus, labels = the corpus tokens. `--data self` (self-distillation, Medusa
§2.3.2, arXiv 2401.10774): the base model greedily continues prompts cut from the corpus and the labels are ITS
tokens (prompt positions carry no label). Greedy verification accepts a draft exactly when it equals the base
model's own argmax, so self-distilled labels train the heads for the very thing they are judged on, at the cost of
running the base model once per generated token. Shapes: N tokens of data, D dim, K heads.
"""
from pathlib import Path

import numpy as np

from ..backend import to_host
from ..decoders.registry import generate
from ..errors import MissingFileError, UserError
from ..mistral.layers import linear, qkv_heads, rms_norm, rope_tables, softmax
from .progress import Progress

DOC_SEPARATOR = "\n\0\n"         # between documents of data/corpus/*.txt (tools/collect_corpus.py SEPARATOR)
REPO = Path(__file__).resolve().parents[2]
DEFAULT_TEXT = REPO / "data" / "corpus" / "train.txt"


def corpus_path(text, flag=None):
    """The corpus to train on: the file `text`, or data/corpus/train.txt when text is None; MissingFileError if
    there is none. flag: the command-line option that gives text (e.g. "--text"), named in the message."""
    build = "build one with `python tools/collect_corpus.py --out data/corpus` in a minispec checkout"
    if text is None:
        if not DEFAULT_TEXT.is_file():
            raise MissingFileError(f"no corpus: no {flag or 'text'} given and no {DEFAULT_TEXT.relative_to(REPO)} "
                                   f"here; {build}, or pass {f'{flag} FILE' if flag else 'a text file'}")
        return DEFAULT_TEXT
    if not Path(text).is_file():
        raise MissingFileError(f"{f'argument {flag}: ' if flag else ''}{text}: no such corpus file; {build}, or "
                               f"pass an existing text file")
    return text


def text_record(text):
    """The corpus as a training record names it: its path in the repository, else its file name (None: none)."""
    if text is None:
        return None
    path = Path(text).resolve()
    return str(path.relative_to(REPO) if path.is_relative_to(REPO) else path.name)


# ---------------------------------------------------------------------------------------------------------
# Labels: head k at position t is trained on the token at t + k + 2
# ---------------------------------------------------------------------------------------------------------
def make_labels(ids, num_heads, first_label=0):
    """labels[k, t] = ids[t + k + 2]: the base LM head predicts t + 1, head k (0-based) the token k + 1 after it.

    ids [T] -> int64 [K, T]; -1 where t + k + 2 is past the end, or is a position before `first_label` (the
    prompt of a self-distilled sequence: those tokens are not the base model's own)."""
    ids = np.asarray(ids, dtype=np.int64)
    T = len(ids)
    labels = np.full((num_heads, T), -1, dtype=np.int64)                     # [K, T]
    for k in range(num_heads):
        off = k + 2
        if T > off:
            labels[k, :T - off] = ids[off:]
        labels[k, :max(0, min(T, first_label - off))] = -1
    return labels


# ---------------------------------------------------------------------------------------------------------
# Sequences: corpus pieces, or the base model's own continuations of corpus prompts
# ---------------------------------------------------------------------------------------------------------
def corpus_sequences(tokenizer, text_path, n_tokens, seq_len=512, seed=0):
    """[(ids, 0), ...] of about n_tokens: documents in a random order, each wrapped <s> doc </s> (as the base
    model was trained) and cut into pieces of at most seq_len tokens."""
    docs = [d for d in Path(text_path).read_text(encoding="utf-8").split(DOC_SEPARATOR) if d.strip()]
    out, total = [], 0
    for i in np.random.default_rng(seed).permutation(len(docs)):
        ids = [tokenizer.bos_id] + tokenizer.encode(docs[i], bos=False) + [tokenizer.eos_id]
        for s in range(0, len(ids), seq_len):
            piece = ids[s:s + seq_len][:n_tokens - total]
            if len(piece) >= 3:                 # shorter pieces hold no label at all
                out.append((piece, 0))
                total += len(piece)
            if total >= n_tokens:
                return out
    return out


def corpus_prompts(tokenizer, text_path, prompt_len=16, seed=0):
    """Endless prompts: prompt_len-token windows at random places of random corpus documents (<s> doc </s>)."""
    docs = [d for d in Path(text_path).read_text(encoding="utf-8").split(DOC_SEPARATOR) if d.strip()]
    rng = np.random.default_rng(seed)
    while True:
        ids = [tokenizer.bos_id] + tokenizer.encode(docs[rng.integers(len(docs))], bos=False) + [tokenizer.eos_id]
        start = int(rng.integers(0, max(1, len(ids) - prompt_len)))
        yield ids[start:start + prompt_len]


def self_distilled_sequences(model, prompts, gen_len, eos_id, n_tokens=None, progress=False, batch=1):
    """[(prompt + greedy continuation, len(prompt)), ...]: the base model continues each prompt greedily for
    gen_len tokens (stopping after eos_id), until n_tokens tokens in all (None: every prompt). The labels are
    then the model's own greedy tokens. batch > 1: `batch` prompts at a time through `batched_greedy` (the same
    sequences up to the rounding of batched products: a near-tie between two tokens may break the other way)."""
    out, total = [], 0
    bar = Progress(total=n_tokens, desc="self-distillation", unit="tok", disable=not progress)
    prompts = iter(prompts)
    while n_tokens is None or total < n_tokens:
        chunk = [[int(t) for t in p] for _, p in zip(range(batch), prompts)]
        if not chunk:
            break
        full = greedy_continuations(model, chunk, gen_len, eos_id) if batch > 1 else None
        for j, prompt in enumerate(chunk):
            if n_tokens is not None and total >= n_tokens:
                break
            room = gen_len if n_tokens is None else max(1, min(gen_len, n_tokens - total - len(prompt)))
            new = (generate(model, prompt, max_new_tokens=room, eos_id=eos_id).tokens if full is None
                   else stop_after_eos(full[j][:room], eos_id))
            out.append((prompt + new, len(prompt)))
            total += len(prompt) + len(new)
            bar.update(len(prompt) + len(new))
    bar.close()
    return out


def stop_after_eos(tokens, eos_id):
    """tokens up to and including the first eos_id (generate's stopping rule)."""
    return tokens[:tokens.index(eos_id) + 1] if eos_id in tokens else tokens


def greedy_continuations(model, prompts, gen_len, eos_id):
    """gen_len greedy tokens after each prompt (lists; eos not yet applied), prompts of one length at a time."""
    full = [None] * len(prompts)
    for n in sorted({len(p) for p in prompts}):
        idx = [j for j, p in enumerate(prompts) if len(p) == n]
        for j, row in zip(idx, batched_greedy(model, np.array([prompts[j] for j in idx]), gen_len).tolist()):
            full[j] = row
    return full


def batched_greedy(model, prompts, gen_len):
    """Greedy decoding of B prompts of one length in lockstep, one token of every sequence per step: the
    model's own layers (rms_norm, qkv_heads, linear, mlp_sublayer, final) on [B, D] rows, with a plain key/value
    array per sequence instead of the rolling cache, so it needs the whole sequence inside the sliding window.
    Self-distillation runs the base model once per generated token; B at a time makes those products B rows
    wide instead of 1.  prompts int [B, n] -> int64 [B, gen_len] (host)."""
    c, xp, dt = model.config, model.xp, model.dtype
    B, n = prompts.shape
    total = n + gen_len
    if total - 1 > min(c.sliding_window or c.cache_slots, c.cache_slots):
        raise UserError(f"batched self-distillation needs prompt + continuation ({total} tokens) inside the "
                        f"sliding window ({c.sliding_window}): lower gen_len")
    H, Hkv, Dh = c.n_heads, c.n_kv_heads, c.head_dim
    keys = xp.zeros((c.n_layers, B, Hkv, total, Dh), dtype=dt)                 # [L, B, Hkv, n+gen, Dh]
    values = xp.zeros_like(keys)
    toks = np.zeros((B, total), dtype=np.int64)
    toks[:, :n] = prompts
    scale = dt(1.0 / np.sqrt(Dh))
    for pos in range(total - 1):
        x = model.tok_embeddings[xp.asarray(toks[:, pos])]                     # [B, D]
        cos, sin = rope_tables([pos], Dh, c.rope_theta, xp, dt)                # [1, Dh/2]: one position for all
        for i, lw in enumerate(model.layers):
            q, k, v = qkv_heads(rms_norm(x, lw["attention_norm"], c.norm_eps), lw["wqkv"], cos, sin, H, Hkv, Dh)
            keys[i, :, :, pos], values[i, :, :, pos] = k.transpose(1, 0, 2), v.transpose(1, 0, 2)   # [B, Hkv, Dh]
            qg = q.transpose(1, 0, 2).reshape(B, Hkv, H // Hkv, Dh)            # [B, Hkv, R, Dh] head g·R + r
            p = softmax(qg @ keys[i, :, :, :pos + 1].transpose(0, 1, 3, 2) * scale)      # [B, Hkv, R, pos+1]
            o = (p @ values[i, :, :, :pos + 1]).reshape(B, H * Dh)             # [B, H·Dh]
            x = model.mlp_sublayer(i, x + linear(o, lw["wo"]))                 # [B, D]
        if pos + 1 >= n:
            toks[:, pos + 1] = to_host(model.final(x).logits.argmax(axis=-1))
    return toks[:, n:]


def training_sequences(model, tok, data, text, n_tokens, seq_len, seed, prompt_len, gen_len, progress, batch=1):
    """The [(tokens, start)] sequences heads train on (Medusa and Hydra alike): data="corpus" cuts the text
    into seq_len pieces; "self": the model's own greedy continuations of prompts cut from it (self-distillation;
    batch: prompts continued at once)."""
    if data == "corpus":
        return corpus_sequences(tok, text, n_tokens, seq_len, seed)
    return self_distilled_sequences(model, corpus_prompts(tok, text, prompt_len, seed),
                                    min(gen_len, seq_len - prompt_len), tok.eos_id, n_tokens, progress, batch)


# ---------------------------------------------------------------------------------------------------------
# The held-out split, and a cache of sequences (an .npz of int arrays)
# ---------------------------------------------------------------------------------------------------------
def split_heldout(seqs, heldout):
    """(training, held-out) sequences: the last round(heldout · n) are held out, at least 1 and leaving 1."""
    if len(seqs) < 2:
        raise UserError(f"need at least 2 sequences (train + held-out), got {len(seqs)}: raise --tokens")
    n_held = min(len(seqs) - 1, max(1, int(round(heldout * len(seqs)))))
    return seqs[:-n_held], seqs[-n_held:]


def load_sequences(path, vocab_size=None):
    """[(ids, first_label)] from an .npz of int arrays ids (all sequences back to back), lens, first, checked: the
    three arrays there and integer, the lengths adding up to ids, each first label inside its sequence, the ids
    below vocab_size (a cache made with another model's tokenizer would train on wrong tokens)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            ids, lens, first = (np.asarray(z[k]) for k in ("ids", "lens", "first"))
    except (OSError, ValueError, KeyError, EOFError) as e:
        raise UserError(f"{path}: not a data cache of token sequences (an .npz with ids, lens, first): {e}") from None
    if not (all(a.ndim == 1 and a.dtype.kind in "iu" for a in (ids, lens, first)) and len(lens) == len(first)
            and lens.size and (lens >= 1).all() and int(lens.sum()) == ids.size and (first >= 0).all()
            and (first <= lens).all() and (ids >= 0).all()):
        raise UserError(f"{path}: a broken data cache: ids, lens and first must be 1-D integer arrays, lens >= 1 "
                        f"adding up to len(ids), 0 <= first <= lens, ids >= 0; delete it to rebuild it")
    if vocab_size is not None and ids.size and int(ids.max()) >= vocab_size:
        raise UserError(f"{path}: token id {int(ids.max())} is outside the model's vocabulary ({vocab_size}): a data "
                        f"cache of another model; delete it to rebuild it")
    at = np.concatenate([[0], np.cumsum(lens)])
    return [(ids[at[j]:at[j + 1]].tolist(), int(first[j])) for j in range(len(lens))]


def save_sequences(path, seqs):
    """Write [(ids, first_label)] for load_sequences: ids back to back, lens, first (int64 arrays)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, ids=np.concatenate([np.asarray(s, np.int64) for s, _ in seqs]),
             lens=np.array([len(s) for s, _ in seqs], np.int64), first=np.array([f for _, f in seqs], np.int64))


# ---------------------------------------------------------------------------------------------------------
# The frozen base model's hidden states, once
# ---------------------------------------------------------------------------------------------------------
def hidden_states(model, sequences, num_heads, progress=False):
    """The frozen base model's final hidden states over the sequences, computed once, and the heads' labels.

    sequences: [(ids, first_label)] -> hidden [N, D] on the model's device (N = all tokens), labels int64 [K, N]
    host.
    Each sequence runs through model.forward with a fresh rolling cache, i.e. in chunks of at most W tokens,
    so memory stays one window of keys/values whatever its length. Labels never cross a sequence boundary."""
    xp = model.xp
    N = sum(len(ids) for ids, _ in sequences)
    hidden = xp.empty((N, model.config.dim), dtype=model.dtype)                   # [N, D]
    labels = np.empty((num_heads, N), dtype=np.int64)                             # [K, N]
    at = 0
    for ids, first in Progress(sequences, desc="hidden states", unit="seq", disable=not progress):
        n = len(ids)
        hidden[at:at + n] = model.forward(ids, cache=model.new_cache(), return_hidden=True)[1]   # [n, D]
        labels[:, at:at + n] = make_labels(ids, num_heads, first)
        at += n
    return hidden, labels
