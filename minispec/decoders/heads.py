"""What Medusa's and Hydra's head files share: minispec's own folder format (a JSON config + one safetensors
file), the checks every heads config gets, the refusal of pickle files, and finding the heads stored next to a
model (loaded once per model).

The math of each kind of head lives in medusa.py / hydra_heads.py; its file formats in medusa_files.py /
hydra_files.py, which import the math (never the reverse) and use the helpers here.
"""
import weakref
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from ..errors import MissingFileError, UserError, check_finite, write_json_lines
from ..mistral.model import FLOAT16_MAX
from ..mistral.safetensors import CheckpointError, check_float
from ..speculative.calibration import FILE as CALIBRATION_FILE, read_calibration
from ..speculative.tree import Tree

# model -> {folder: heads}: a decoder built for every generate() call loads its heads once per model
_LOADED = weakref.WeakKeyDictionary()


def check_head_sizes(f, model):
    """A heads config's hidden_size and vocab_size (f: its Fields) must be the base model's."""
    for key, have in (("hidden_size", model.config.dim), ("vocab_size", model.config.vocab_size)):
        v = f.int(key, low=1)
        if v != have:
            raise CheckpointError(f"{f.source}: {key} = {v}, but the base model has {have}")


def read_trees(heads, f, keys=("tree", "tree_cuda")):
    """The stored trees for the CPU and for GPUs (keys: their names in this config) onto heads.choices /
    heads.choices_cuda, each checked against the heads: no deeper than K heads, ranks below V."""
    for key, attr in zip(keys, ("choices", "choices_cuda")):
        v = f.get(key, None)
        if v is not None:
            try:
                Tree.from_choices(v, n_heads=heads.K, top_k=heads.V)
            except UserError as e:
                raise CheckpointError(f"{f.source}: key {key!r}: {e}") from None
        if v or attr == "choices":
            setattr(heads, attr, [list(c) for c in v or []])
    return heads


def read_head_trees(heads, f):
    """The stored trees (CPU and GPU), the accuracies they were built from and the base model's name, from a heads
    config (f: its Fields) onto heads, each checked against the heads (a tree no deeper than K heads, ranks below
    V, accuracies [K][k] probabilities). Returns heads."""
    read_trees(heads, f)
    acc = f.matrix("accuracies", low=0, high=1, default=None)
    if acc is not None and len(acc) != heads.K:
        raise CheckpointError(f"{f.source}: key 'accuracies' has {len(acc)} rows, but there are {heads.K} heads")
    heads.accuracies, heads.base_model = acc, f.str("base_model", default=None)
    return heads


def check_tensors(tensors, expected, source, what, optional=None):
    """A heads state dict against its expected {name: shape}: every expected tensor there with its shape, nothing
    else but the optional ones {name: shape}, everything finite; one error naming the tensor, both shapes and
    `what` the heads are (kind, sizes)."""
    optional = optional or {}
    for name, shape in expected.items():
        if name not in tensors:
            raise CheckpointError(f"{source}: missing tensor {name!r} (expected shape {list(shape)}; {what})")
    for name in sorted(tensors):
        shape = expected.get(name, optional.get(name))
        if shape is None:
            raise CheckpointError(f"{source}: unexpected tensor {name!r} (shape {list(tensors[name].shape)}) for "
                                  f"{what}")
        if tuple(tensors[name].shape) != tuple(shape):
            raise CheckpointError(f"{source}: tensor {name!r} has shape {list(tensors[name].shape)}, expected "
                                  f"{list(shape)} ({what})")
        check_finite(tensors[name], name, source)


def check_fits(tensors, model, source):
    """Head tensors must be floating point (weights.check_float) and fit the model's working dtype: in float16 a
    value over 65504 would become inf (the base model refuses its own such weights the same way,
    model.to_working_dtype)."""
    for name, a in tensors.items():
        check_float(a, name, source)
    if np.dtype(model.dtype) != np.float16:
        return
    for name, a in tensors.items():
        big = float(np.abs(np.asarray(a, np.float32)).max()) if a.size else 0.0
        if big > FLOAT16_MAX:
            raise CheckpointError(f"{source}: tensor {name!r}: max |w| = {big:.4g} does not fit float16 (max 65504); "
                                  f"load the model with dtype='float32'")


def save_folder(folder, tensors, config, config_name, weights_name):
    """minispec's heads format: folder/weights_name (safetensors) + folder/config_name (one key per line).
    Nothing is written when a tensor is not finite: saved as float16, a value over 65504 becomes inf, and a file
    that its own loader would refuse (the trained heads would be lost) is refused before it is written."""
    folder = Path(folder)
    for name, a in tensors.items():
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            why = (f"a value over {FLOAT16_MAX:g} overflows float16: save with dtype=np.float32"
                   if a.dtype == np.float16 else "the heads diverged")
            raise UserError(f"{folder / weights_name}: tensor {name!r} is not finite ({why}); nothing written")
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / weights_name))
    write_json_lines(folder / config_name, config)


def refuse_heads_pickle(path, source, convert, target):
    """The one error for a pickle-based heads file: `source` says who writes it, `convert` is the one-line torch
    conversion to `target` (a .safetensors name). Unpickling can run arbitrary code, so minispec never does it."""
    raise CheckpointError(
        f"{path}: refusing a pickle-based file ({source}). Unpickling can run arbitrary code, so minispec never "
        f"does it. Convert it once, in a trusted environment, with torch:\n    {convert}\n"
        f"and put {target} next to its config.json.")


def load_either(folder, formats):
    """Heads from a folder in the first format whose config file is there: formats [(config name, what,
    load(folder))]; one error naming every config file looked for when none is."""
    folder = Path(folder)
    for name, _, load in formats:
        if (folder / name).exists():
            return load(folder)
    looked = " nor ".join(f"{name} ({what})" for name, what, _ in formats)
    raise CheckpointError(f"{folder}: neither {looked} found")


def heads_for(model, heads, kind, load_heads, label=None):
    """The heads a decoder runs: heads itself when it is a heads object; the folder it names (a str or Path, e.g.
    `minispec generate --heads DIR`); None: <model folder>/<kind>/. A folder is loaded with load_heads(folder,
    model) once per model. label: the kind as messages name it (default kind)."""
    label = label or kind
    if heads is not None and not isinstance(heads, (str, Path)):
        return heads
    if heads is None:
        path = getattr(model, "path", None)
        folder = Path(path) / kind if path else None
        if folder is None or not folder.is_dir():
            raise MissingFileError(f"no {label} heads next to {path}: train them with "
                                   f"`minispec train-heads --kind {kind} --model {path}`")
    else:
        folder = Path(heads)
        if not folder.is_dir():
            raise MissingFileError(f"{folder}: no such folder of {label} heads")
    loaded = _LOADED.setdefault(model, {})
    key = folder.resolve()
    if key not in loaded:
        loaded[key] = attach_calibration(load_heads(folder, model), folder)
    return loaded[key]


def attach_calibration(heads, folder):
    """heads with heads.calibration: the Calibration in folder/calibration.json (one map list per head), or None
    when the folder has none (dynamic trees then rank by the raw draft probabilities, as before)."""
    path = Path(folder) / CALIBRATION_FILE
    heads.calibration = read_calibration(path, heads.K) if path.is_file() else None
    return heads
