"""The training options' rules, checked before a model loads (`minispec train-heads`, train_medusa, train_hydra
and their tests share them), and the readers of what training is given: the corpus path, Hydra's data cache.

Every rule raises one UserError naming the option as the API spells it (the command line turns the name into its
flag, cli.as_flags): counts in range, seq_len >= num_heads + 2 (head k's label sits k + 2 tokens ahead), a
learning rate > 0, Hydra's loss weights >= 0 and not both 0, the output folder not blocked by a file.
"""
from pathlib import Path

from ..decoders.hydra_heads import KIND_ARCH
from ..decoders.medusa import VERSIONS
from ..errors import UserError, check_int, check_real
from .data import corpus_path, load_sequences



def check_training(version="v1", num_heads=4, num_layers=1, data="corpus", text=None, n_tokens=100_000, seq_len=512,
                   epochs=1, lr=1e-3, batch=256, budget=10, top_k=10, seed=0, text_flag=None, out=None):
    """The training options' rules (train_medusa and `minispec train-heads` share them, checked before the
    model loads). Returns the corpus path (`corpus_path`; text_flag: the option that gives it, for messages).
    seq_len >= num_heads + 2: head k's label sits k + 2 tokens ahead, so a shorter sequence leaves the far heads
    nothing to learn. out: the output folder (None: the default), refused when a file is in the way."""
    if version not in VERSIONS:
        raise UserError(f"version must be 'v1' or 'v2', not {version!r}")
    if data not in ("corpus", "self"):
        raise UserError(f"data must be 'corpus' or 'self', not {data!r}")
    check_counts(num_heads=num_heads, num_layers=num_layers, n_tokens=n_tokens, seq_len=seq_len, epochs=epochs,
                 batch=batch, budget=budget, top_k=top_k, seed=seed)
    check_real("lr", lr, low=0, low_open=True)
    check_out_folder(out)
    return corpus_path(text, text_flag)


def check_counts(num_heads, num_layers, n_tokens, seq_len, epochs, batch, budget, top_k, seed, layers_low=0):
    """The integer options both trainers share, each an int in its range (see check_training)."""
    for name, v, low in (("num_heads", num_heads, 1), ("num_layers", num_layers, layers_low), ("n_tokens", n_tokens, 1),
                         ("epochs", epochs, 1), ("batch", batch, 1), ("budget", budget, 0), ("top_k", top_k, 1),
                         ("seed", seed, 0)):
        check_int(name, v, low=low)
    check_int("seq_len", seq_len, low=num_heads + 2,
              what=f" (num_heads + 2: head k is trained on the token k + 2 ahead, so {num_heads} heads need "
                   f"{num_heads + 2}-token sequences)")


def check_out_folder(out):
    """out, a folder the heads can be saved in (new or existing), or UserError before any training: a file at out
    or at a folder above it would only make the save fail after training."""
    if out is None:
        return
    p = Path(out)
    for q in [p, *p.parents]:
        if q.exists():
            if not q.is_dir():
                why = "give another path" if q == p else f"a file lies where a folder of {p} should be"
                raise UserError(f"out: {q} is a file, not a folder: the heads are saved as a folder ({why})")
            break


def check_hydra_training(kind="hydra", num_heads=4, num_layers=None, data="self", text=None, data_cache=None,
                         n_tokens=150_000, seq_len=512, epochs=2, lr=1e-3, batch=256, lm_weight=None,
                         teacher_weight=None, budget=10, gpu_budget=32, top_k=10, heldout=0.1, seed=0, out=None,
                         checkpoint=None, text_flag=None, weight_decay=0.0, dropout=0.0):
    """train_hydra's options, checked before the model loads (`minispec train-heads --kind hydra|hydra++` and
    the API share them): the checks Medusa training gets (train_medusa.check_training) and Hydra's own: blocks
    per head >= 1, loss weights finite and >= 0 and not both 0 (the heads would learn nothing), a held-out
    fraction in (0, 1), a data cache that is a file when it exists, a checkpoint stem whose files are not
    folders. Returns (num_layers, lm_weight, teacher_weight, the corpus path or None when the cache has the data),
    the per-kind defaults filled in."""
    if kind not in KIND_ARCH:
        raise UserError(f"--kind must be one of {sorted(KIND_ARCH)} for Hydra training, not {kind!r}")
    check_real("weight_decay", weight_decay, low=0)
    check_real("dropout", dropout, low=0, high=1, high_open=True)
    plus = kind == "hydra++"
    num_layers = (4 if plus else 1) if num_layers is None else num_layers
    lm_weight = (0.0 if plus else 1.0) if lm_weight is None else lm_weight
    teacher_weight = (1.0 if plus else 0.0) if teacher_weight is None else teacher_weight
    if data not in ("corpus", "self"):
        raise UserError(f"--data must be 'corpus' or 'self', not {data!r}")
    check_counts(num_heads=num_heads, num_layers=num_layers, n_tokens=n_tokens, seq_len=seq_len, epochs=epochs,
                 batch=batch, budget=budget, top_k=top_k, seed=seed, layers_low=1)
    check_int("gpu_budget", gpu_budget, low=0)
    check_real("lr", lr, low=0, low_open=True)
    check_real("lm_weight", lm_weight, low=0)
    check_real("teacher_weight", teacher_weight, low=0)
    if lm_weight == 0 and teacher_weight == 0:
        raise UserError("both loss weights are 0 (lm_weight and teacher_weight: --lm-weight, --teacher-weight): the "
                        "loss would be 0 and the heads would learn nothing (defaults: hydra 1 / 0, hydra++ 0 / 1)")
    check_real("heldout", heldout, low=0, high=1, low_open=True)
    if heldout >= 1:
        raise UserError(f"heldout must be a fraction in (0, 1), got {heldout!r}")
    check_out_folder(out)
    for name, path in (("data_cache", data_cache),
                       ("checkpoint", None if checkpoint is None else Path(checkpoint).with_suffix(".json")),
                       ("checkpoint", None if checkpoint is None else Path(checkpoint).with_suffix(".safetensors"))):
        if path is not None and Path(path).exists() and not Path(path).is_file():
            raise UserError(f"{name}: {path} is a folder, not a file")
        if path is not None:
            check_out_folder(Path(path).parent)
    if checkpoint is not None and Path(checkpoint).with_suffix(".json").exists() \
            and not Path(checkpoint).with_suffix(".safetensors").is_file():
        raise UserError(f"checkpoint: {Path(checkpoint).with_suffix('.json')} has no "
                        f"{Path(checkpoint).with_suffix('.safetensors').name} beside it: not a checkpoint to resume")
    cached = data_cache is not None and Path(data_cache).exists()
    if cached:
        load_sequences(data_cache)                      # a broken cache fails now, not after the model loads
    return num_layers, lm_weight, teacher_weight, None if cached else corpus_path(text, text_flag)
