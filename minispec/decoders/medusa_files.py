"""Medusa head files: minispec's own format and FasterDecoding/Medusa's.

minispec's format, a folder:  medusa_config.json + medusa_heads.safetensors.
FasterDecoding's format (FasterDecoding/Medusa), a folder:  config.json (medusa_num_heads, medusa_num_layers,
base_model_name_or_path) + medusa_lm_head.safetensors. Both hold state_dict(heads): FasterDecoding's
tensor names in Hugging Face (out, in) orientation.
"""
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from ..backend import to_device, to_host
from ..errors import Fields, read_json
from ..mistral.safetensors import CheckpointError, read_safetensors, safetensors_in
from .heads import (check_fits, check_head_sizes, check_tensors, load_either, read_head_trees, refuse_heads_pickle,
                    save_folder)
from .medusa import VERSIONS, MedusaHeads, model_name

CONFIG_NAME, WEIGHTS_NAME = "medusa_config.json", "medusa_heads.safetensors"
FD_CONFIG_NAME, FD_WEIGHTS_NAME = "config.json", "medusa_lm_head.safetensors"


# ---------------------------------------------------------------------------------------------------------
# FasterDecoding's tensor names, both formats
# ---------------------------------------------------------------------------------------------------------
def state_dict_shapes(num_heads, num_layers, D, V, version):
    """{FasterDecoding tensor name: (out, in) shape} of K heads."""
    shapes = {}
    for k in range(num_heads):
        for layer in range(num_layers):
            shapes[f"{k}.{layer}.linear.weight"] = (D, D)
            shapes[f"{k}.{layer}.linear.bias"] = (D,)
        if version == "v1":
            shapes[f"{k}.{num_layers}.weight"] = (V, D)
    return shapes


def from_state_dict(model, tensors, num_heads, num_layers, version=None, source="state dict"):
    """MedusaHeads from FasterDecoding-named host tensors in (out, in) orientation; transposed once to (in, out).

    version None: v1 if head 0's projection key is present, else v2. Every expected key must be present with
    its shape (one error naming the key and both shapes); any other key is an error too."""
    D, V = model.config.dim, model.config.vocab_size
    if version is None:
        version = "v1" if f"0.{num_layers}.weight" in tensors else "v2"
    check_tensors(tensors, state_dict_shapes(num_heads, num_layers, D, V, version), source,
                  f"Medusa {version}, {num_heads} heads x {num_layers} layers, D={D}, V={V} from the base model")
    xp, dt = model.xp, model.dtype
    K, L = num_heads, num_layers
    W, b = np.empty((K, L, D, D), dt), np.empty((K, L, D), dt)               # host staging, then one copy
    for k in range(K):
        for layer in range(L):
            W[k, layer] = np.asarray(tensors[f"{k}.{layer}.linear.weight"], dt).T     # (out, in) -> (in, out)
            b[k, layer] = np.asarray(tensors[f"{k}.{layer}.linear.bias"], dt)
    proj = None
    if version == "v1":
        proj = np.empty((K, D, V), dt)
        for k in range(K):
            proj[k] = np.asarray(tensors[f"{k}.{L}.weight"], dt).T                   # [V, D] -> [D, V]
    put = lambda a: None if a is None else to_device(xp, np.ascontiguousarray(a))    # noqa: E731
    return MedusaHeads(put(W), put(b), put(proj), model.output, version, base_model=model_name(model))


def state_dict(heads, dtype=np.float32):
    """{FasterDecoding name: host array in (out, in) orientation}."""
    W, b = to_host(heads.W), to_host(heads.b)
    out = {}
    for k in range(heads.K):
        for layer in range(heads.L):
            out[f"{k}.{layer}.linear.weight"] = np.ascontiguousarray(W[k, layer].T, dtype=dtype)
            out[f"{k}.{layer}.linear.bias"] = np.ascontiguousarray(b[k, layer], dtype=dtype)
        if heads.proj is not None:
            out[f"{k}.{heads.L}.weight"] = np.ascontiguousarray(to_host(heads.proj[k]).T, dtype=dtype)
    return out


# ---------------------------------------------------------------------------------------------------------
# minispec's format
# ---------------------------------------------------------------------------------------------------------
def config(heads):
    """The heads' medusa_config.json entries."""
    return {"kind": "medusa", "version": heads.version, "num_heads": heads.K, "num_layers": heads.L,
            "hidden_size": heads.D, "vocab_size": heads.V, "tree": heads.choices, "tree_cuda": heads.choices_cuda,
            "accuracies": heads.accuracies, "base_model": heads.base_model}


def save(heads, folder, extra=None, dtype=np.float32):
    """folder/medusa_config.json (+ `extra` entries, e.g. a training record) and folder/medusa_heads.safetensors
    (float32, or float16 to halve the file; widened again at load)."""
    save_folder(folder, state_dict(heads, dtype), {**config(heads), **(extra or {})}, CONFIG_NAME, WEIGHTS_NAME)


def load(folder, model):
    """Heads saved by `save`, onto the model's device and dtype (the sizes must match the model). Every key of
    medusa_config.json is checked: kind "medusa", version, num_heads >= 1, num_layers >= 0, hidden_size and
    vocab_size the model's, the trees, accuracies and base_model (heads.read_head_trees)."""
    folder = Path(folder)
    f = Fields(read_json(folder / CONFIG_NAME), folder / CONFIG_NAME, CheckpointError)
    f.choice("kind", ("medusa",))
    version = f.choice("version", VERSIONS)
    num_heads, num_layers = f.int("num_heads", low=1), f.int("num_layers", low=0)
    check_head_sizes(f, model)
    tensors = read_safetensors(folder / WEIGHTS_NAME)
    check_fits(tensors, model, folder / WEIGHTS_NAME)
    heads = from_state_dict(model, tensors, num_heads, num_layers, version,
                           source=str(folder / WEIGHTS_NAME))
    return read_head_trees(heads, f)


# ---------------------------------------------------------------------------------------------------------
# FasterDecoding/Medusa interoperability
# ---------------------------------------------------------------------------------------------------------
def _refuse_pickle(path):
    refuse_heads_pickle(path, "FasterDecoding ships medusa_lm_head.pt",
                  f"python -c \"import torch, safetensors.torch as st; st.save_file(torch.load({str(path)!r}, "
                  f"weights_only=True), 'medusa_lm_head.safetensors')\"", FD_WEIGHTS_NAME)


def read_fasterdecoding(folder, model):
    """Heads from a FasterDecoding/Medusa folder: config.json (medusa_num_heads, medusa_num_layers) +
    medusa_lm_head.safetensors, onto `model`'s device (the model supplies D, V and, for v2, the output layer).

    A file without the projection keys ({head}.{num_layers}.weight) is read as minispec "v2": heads that share
    the base model's output layer. A .pt/.bin file is refused with the one-line torch conversion. Tensor names
    may carry the `medusa_head.` prefix of full-model Medusa checkpoints."""
    weights = safetensors_in(folder, FD_WEIGHTS_NAME, _refuse_pickle)
    folder = Path(folder)
    f = Fields(read_json(folder / FD_CONFIG_NAME), folder / FD_CONFIG_NAME, CheckpointError,
               what=" (not a FasterDecoding Medusa config?)")
    num_heads, num_layers = f.int("medusa_num_heads", low=1), f.int("medusa_num_layers", low=0)
    base = f.str("base_model_name_or_path", default=None)
    tensors = read_safetensors(weights)
    if tensors and all(n.startswith("medusa_head.") for n in tensors):
        tensors = {n[len("medusa_head."):]: a for n, a in tensors.items()}
    check_fits(tensors, model, weights)
    heads = from_state_dict(model, tensors, num_heads, num_layers, source=str(weights))
    heads.base_model = base if base is not None else heads.base_model
    return heads


def write_fasterdecoding(heads, folder):
    """Write FasterDecoding's layout: config.json + medusa_lm_head.safetensors (float32; v2: no projection keys,
    so FasterDecoding itself cannot run a v2 file: its heads always own a projection)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state_dict(heads), str(folder / FD_WEIGHTS_NAME))
    cfg = {"medusa_num_heads": heads.K, "medusa_num_layers": heads.L, "base_model_name_or_path": heads.base_model}
    (folder / FD_CONFIG_NAME).write_text(json.dumps(cfg, indent=1) + "\n")


def load_heads(folder, model):
    """Heads from a folder in either format (minispec's medusa_config.json, or FasterDecoding's config.json)."""
    return load_either(folder, [(CONFIG_NAME, "minispec", lambda f: load(f, model)),
                                (FD_CONFIG_NAME, "FasterDecoding", lambda f: read_fasterdecoding(f, model))])
