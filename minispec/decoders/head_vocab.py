"""A cheaper head: draft only among the M most frequent tokens (`head_vocab=M` of the decoders medusa, hydra and
hydra++).

The idea is FR-Spec's (Zhao et al. 2025, arXiv 2502.14856, "FR-Spec: Accelerating Large-Vocabulary Language
Models via Frequency-Ranked Speculative Sampling"): the draft's vocabulary projection is restricted to the M
tokens that occur most often in the training text, so a head projects onto [D, M] instead of [D, V] and its
softmax and top-k read M logits instead of V. The verifier keeps the full vocabulary, so greedy decoding still
emits exactly plain decoding's tokens and sampling stays lossless: only which tokens the draft can propose
changes (a token outside the M is never drafted, and costs acceptance when it is the one the model picks).

The kept ids are sorted by id, so a restricted head's logit j belongs to token keep[j] and ties between logits
still go to the smaller token id. A restricted head's probabilities (the values of a dynamic tree) are a proper
softmax over the M kept tokens, not over all V: a kept token's probability is its full-vocabulary probability
divided by the mass the kept tokens hold.

The frequency table is a file next to the model, token_counts.json (written by tools/count_tokens.py from the
training text): {"counts": [V counts], "vocab_size": V, ...}. Restricted heads are built once per (heads, kept
ids) and never saved (their vocab_size is M).
Shapes: V the model's vocabulary, M the kept tokens, D dim.
"""
import weakref
from pathlib import Path

import numpy as np

from ..errors import Fields, MissingFileError, UserError, check_int, read_json

COUNTS_FILE = "token_counts.json"
CPU_HEAD_VOCAB = 1024      # head_vocab="auto" on a CPU (docs/medusa.md, "A cheaper head": the M measured there)

_RESTRICTED = weakref.WeakKeyDictionary()         # heads -> {kept ids as bytes: restricted heads}
_COUNTS = {}                                      # (file, size, mtime, V) -> its checked counts


def read_token_counts(path, vocab_size):
    """The counts [V] (host int64, read-only) in a token_counts.json file, checked: a list of vocab_size ints >= 0,
    not all zero, and vocab_size the model's. A file is read and checked once while it stays the same (its size
    and modification time): every generate() call builds its decoder afresh, and checking 4096 counts took about
    as long as decoding a few tokens."""
    try:
        st = Path(path).stat()
    except OSError:                          # read_json says what is wrong with the file, naming it
        return check_token_counts(path, vocab_size)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns, vocab_size)
    if key not in _COUNTS:
        counts = check_token_counts(path, vocab_size)
        counts.flags.writeable = False
        _COUNTS[key] = counts
    return _COUNTS[key]


def check_token_counts(path, vocab_size):
    """`read_token_counts` without the memory: read and check the file now."""
    f = Fields(read_json(path), str(path))
    v = f.int("vocab_size", low=1)
    if v != vocab_size:
        f.fail("vocab_size", f"is {v}, but the model's vocabulary has {vocab_size} tokens")
    counts = f.int_list("counts", low=0)
    if len(counts) != vocab_size:
        f.fail("counts", f"has {len(counts)} entries, expected vocab_size = {vocab_size}")
    if not any(counts):
        f.fail("counts", "are all zero")
    return np.asarray(counts, dtype=np.int64)


def token_counts(model, counts=None):
    """The frequency table of a model: counts None -> <model folder>/token_counts.json; a str or Path -> that
    file; else a sequence of V counts (ints >= 0). Returns host int64 [V]."""
    V = model.config.vocab_size
    if counts is None:
        path = getattr(model, "path", None)
        if not path or not (Path(path) / COUNTS_FILE).exists():
            raise MissingFileError(f"head_vocab: no {COUNTS_FILE} next to the model ({path}): count the training "
                                   f"text's tokens with tools/count_tokens.py, or pass token_counts")
        counts = Path(path) / COUNTS_FILE
    if isinstance(counts, (str, Path)):
        return read_token_counts(counts, V)
    a = np.asarray(counts)
    if a.shape != (V,) or a.dtype.kind not in "iu" or (a < 0).any() or not a.any():
        raise UserError(f"token_counts must be {V} integer counts >= 0, not all zero (got shape {list(a.shape)}, "
                        f"dtype {a.dtype})")
    return a.astype(np.int64)


def kept_ids(counts, m):
    """The m most frequent token ids of counts [V] (ties: the smaller id), sorted by id -> host int64 [m]."""
    order = np.argsort(-np.asarray(counts), kind="stable")                 # [V] most frequent first
    return np.sort(order[:m]).astype(np.int64)


def auto_head_vocab(model, heads, head_vocab, counts, tree):
    """head_vocab itself, except "auto" (the registry decoders' default): CPU_HEAD_VOCAB for a static tree on
    NumPy, i.e. a CPU, where the heads' [D, V] projection is most of a head's time, when the model has a frequency
    table (counts given, or token_counts.json next to it) and more tokens than that; None, the heads as given, on
    a GPU, for tree="dynamic" (its values are calibrated on the full vocabulary), without a table, or for heads
    already restricted (heads.keep set)."""
    if not (isinstance(head_vocab, str) and head_vocab == "auto"):
        return head_vocab
    if getattr(heads, "keep", None) is not None:
        return None
    path = getattr(model, "path", None)
    table = counts is not None or bool(path and (Path(path) / COUNTS_FILE).exists())
    dynamic = isinstance(tree, str) and tree == "dynamic"
    if dynamic or getattr(model, "xp", np) is not np or not table or model.config.vocab_size <= CPU_HEAD_VOCAB:
        return None
    return CPU_HEAD_VOCAB


def vocab_heads(model, heads, head_vocab, counts, name, tree=None):
    """heads itself when head_vocab is None, else heads restricted to the head_vocab most frequent tokens
    (heads.restricted(keep), built once per heads and kept set). head_vocab: an int in 1..V, or "auto"
    (`auto_head_vocab`, for the proposer's `tree` option)."""
    head_vocab = auto_head_vocab(model, heads, head_vocab, counts, tree)
    if head_vocab is None:
        if counts is not None:
            raise UserError(f"{name}: token_counts is used only with head_vocab")
        return heads
    V = model.config.vocab_size
    m = check_int(f"{name}: head_vocab", head_vocab, low=1, what=f" (the tokens a head may draft, at most {V}) or "
                  f"'auto'")
    if m > V:
        raise UserError(f"{name}: head_vocab must be at most the vocabulary's {V} tokens, got {m}")
    keep = kept_ids(token_counts(model, counts), m)
    cache = _RESTRICTED.setdefault(heads, {})
    key = keep.tobytes()
    if key not in cache:
        cache[key] = heads.restricted(keep)
    return cache[key]


def token_ids(heads, ids):
    """Token ids of a head's top-k: ids [...] index the head's logits; for restricted heads they index the kept
    tokens (heads.keep), which this maps back to the model's token ids. Host int64 in, host int64 out."""
    keep = getattr(heads, "keep", None)
    return ids if keep is None else keep[ids]


def slice_columns(xp, w, keep):
    """w [..., V] restricted to the columns keep [M], as a C-contiguous array [..., M] on w's device."""
    return xp.ascontiguousarray(w[..., xp.asarray(keep)])
