"""What Medusa's and Hydra's head files share: minispec's own folder format (a JSON config + one safetensors
file), the checks every heads config gets, the refusal of pickle files, and finding the heads stored next to a
model (loaded once per model).

The math of each kind of head lives in medusa.py / hydra.py; its file formats in medusa_files.py /
hydra_files.py, which import the math (never the reverse) and use the helpers here.
"""
import weakref
from pathlib import Path

from safetensors.numpy import save_file

from ..errors import MissingFileError, check_finite, write_json_lines
from ..mistral.weights import CheckpointError

# model -> {folder: heads}: a decoder built for every generate() call loads its heads once per model
_LOADED = weakref.WeakKeyDictionary()


def check_head_sizes(cfg, model, path):
    """A heads config's hidden_size and vocab_size must be the base model's."""
    for key, have in (("hidden_size", model.config.dim), ("vocab_size", model.config.vocab_size)):
        if cfg.get(key) != have:
            raise CheckpointError(f"{path}: {key} = {cfg.get(key)}, but the base model has {have}")


def read_head_trees(heads, cfg):
    """The stored trees (CPU and GPU), the accuracies they were built from and the base model's name, from a
    heads config onto heads. Returns heads."""
    heads.choices = [list(c) for c in cfg.get("tree") or []]
    heads.choices_cuda = [list(c) for c in cfg["tree_cuda"]] if cfg.get("tree_cuda") else None
    heads.accuracies, heads.base_model = cfg.get("accuracies"), cfg.get("base_model")
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
            raise CheckpointError(f"{source}: unexpected tensor {name!r} (shape {list(tensors[name].shape)}) for {what}")
        if tuple(tensors[name].shape) != tuple(shape):
            raise CheckpointError(f"{source}: tensor {name!r} has shape {list(tensors[name].shape)}, expected "
                                  f"{list(shape)} ({what})")
        check_finite(tensors[name], name, source)


def save_folder(folder, tensors, config, config_name, weights_name):
    """minispec's heads format: folder/weights_name (safetensors) + folder/config_name (one key per line)."""
    folder = Path(folder)
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
        loaded[key] = load_heads(folder, model)
    return loaded[key]
