"""Checkpoint loading: safetensors files (read here, memory-mapped), two name maps, one RoPE permutation.

Layouts read:
  * Hugging Face: config.json + model.safetensors, or shards listed in model.safetensors.index.json
  * Mistral consolidated: params.json + consolidated.safetensors
Pickle-based files (.bin, .pt, .pth) are refused: unpickling runs arbitrary code, and minispec never does it.

Canonical names are Mistral's (`layers.{i}.attention.wq.weight`, ...); each foreign layout has one explicit
map to them. Canonical q/k rows follow HF's rotate-half RoPE order, so consolidated wq/wk go through
`interleaved_to_half_rope` once at load. Every expected tensor must be present exactly once with the shape the
config implies, else one error naming the file, the key and both shapes.

The files themselves are read by minispec.mistral.safetensors (memory-mapped, BF16 widened, the format's rules
checked).
"""
from pathlib import Path

import numpy as np

from ..errors import Fields, MissingFileError, check_finite, read_json
from .config import MistralConfig
from .safetensors import PICKLE_SUFFIXES, CheckpointError, Tensor16, check_float, read_safetensors, refuse_pickle


# ---------------------------------------------------------------------------------------------------------
# Name maps (foreign -> canonical) and the RoPE permutation
# ---------------------------------------------------------------------------------------------------------
def canonical_names(cfg):
    """{canonical name: expected shape (as stored, (out, in) for matrices)} for this config."""
    D, F, V, Dh = cfg.dim, cfg.hidden_dim, cfg.vocab_size, cfg.head_dim
    H, Hkv = cfg.n_heads, cfg.n_kv_heads
    names = {"tok_embeddings.weight": (V, D), "norm.weight": (D,)}
    if not cfg.tie_embeddings:
        names["output.weight"] = (V, D)
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        names.update({p + "attention.wq.weight": (H * Dh, D), p + "attention.wk.weight": (Hkv * Dh, D),
                      p + "attention.wv.weight": (Hkv * Dh, D), p + "attention.wo.weight": (D, H * Dh),
                      p + "feed_forward.w1.weight": (F, D), p + "feed_forward.w2.weight": (D, F),
                      p + "feed_forward.w3.weight": (F, D),
                      p + "attention_norm.weight": (D,), p + "ffn_norm.weight": (D,)})
    return names


def hf_to_canonical(name):
    """HF MistralForCausalLM name -> canonical name (None for names that are not weights of the model)."""
    fixed = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
             "lm_head.weight": "output.weight"}
    if name in fixed:
        return fixed[name]
    parts = name.split(".")
    if len(parts) == 6 and parts[:2] == ["model", "layers"]:
        i, group, proj = parts[2], parts[3], parts[4]
        sub = {("self_attn", "q_proj"): "attention.wq", ("self_attn", "k_proj"): "attention.wk",
               ("self_attn", "v_proj"): "attention.wv", ("self_attn", "o_proj"): "attention.wo",
               ("mlp", "gate_proj"): "feed_forward.w1", ("mlp", "down_proj"): "feed_forward.w2",
               ("mlp", "up_proj"): "feed_forward.w3"}.get((group, proj))
        if sub and parts[5] == "weight":
            return f"layers.{i}.{sub}.weight"
    if len(parts) == 5 and parts[:2] == ["model", "layers"] and parts[4] == "weight" \
            and parts[3] in ("input_layernorm", "post_attention_layernorm"):
        norm = {"input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}[parts[3]]
        return f"layers.{parts[2]}.{norm}.weight"
    return name    # unknown names pass through and are then reported as unexpected


def interleaved_to_half_rope(w, n_heads):
    """Reorder the rows of a q/k projection from interleaved RoPE pairs to rotate-half pairs.

    Mistral/Meta rotate pairs (x[2i], x[2i+1]) of each head; HF rotates (x[i], x[i + Dh/2]). Rows [out, in] of
    each head are permuted so that row 2i -> i and row 2i+1 -> i + Dh/2; q·k is unchanged because q and k get
    the same permutation. It is the permutation transformers' convert_mistral_weights_to_hf applies (`permute`).
    """
    out_dim, in_dim = w.shape
    Dh = out_dim // n_heads
    # [n, Dh/2, 2, in] -> [n, 2, Dh/2, in]: the even rows first, then the odd rows, per head
    return w.reshape(n_heads, Dh // 2, 2, in_dim).transpose(0, 2, 1, 3).reshape(out_dim, in_dim)


# ---------------------------------------------------------------------------------------------------------
# Folder readers
# ---------------------------------------------------------------------------------------------------------
def _safetensors_files(folder):
    """(the safetensors files of a model folder, the shard index's weight_map or None)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = shard_index(index)
        return [folder / f for f in sorted(set(weight_map.values()))], weight_map
    for name in ("model.safetensors", "consolidated.safetensors"):
        if (folder / name).exists():
            return [folder / name], None
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return found, None
    pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        refuse_pickle(folder / pickles[0])
    raise CheckpointError(f"{folder}: no model.safetensors, model.safetensors.index.json or consolidated.safetensors")


def shard_index(index):
    """The weight_map {tensor name: shard file} of a model.safetensors.index.json, checked: an object of
    non-empty names to plain .safetensors file names of the same folder, each of them there as a file."""
    weight_map = Fields(read_json(index), index, CheckpointError).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: \"weight_map\" must be a non-empty object {{tensor name: shard file}}, "
                              f"got {weight_map!r}"[:300])
    for name, shard in weight_map.items():
        if not (isinstance(shard, str) and shard.endswith(".safetensors") and Path(shard).name == shard
                and shard not in (".", "..")):
            raise CheckpointError(f"{index}: weight_map[{name!r}] = {shard!r} is not the name of a .safetensors "
                                  f"file in this folder")
        if not (index.parent / shard).is_file():
            raise MissingFileError(f"{index}: weight_map[{name!r}] names the shard {shard!r}, which is not in "
                                   f"{index.parent}")
    return weight_map


def load_config(folder):
    """(config, layout) of a model folder; layout is 'hf' or 'mistral'."""
    folder = Path(folder)
    if not folder.exists():
        raise MissingFileError(f"{folder}: no such model folder (--model / load() takes a folder with config.json "
                               f"or params.json and *.safetensors)")
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder (--model / load() takes the model's folder, not a file "
                              f"inside it)")
    if (folder / "config.json").exists():
        return MistralConfig.from_hf_config(folder / "config.json"), "hf"
    if (folder / "params.json").exists():
        return MistralConfig.from_params_json(folder / "params.json"), "mistral"
    raise CheckpointError(f"{folder}: neither config.json (Hugging Face) nor params.json (Mistral) found")


def load_tensors(folder, cfg=None, layout=None, lazy16=False):
    """Canonical {name: array (out, in), float32/float64/float16 as stored, bf16 widened} of a model folder.
    lazy16: 16-bit matrices stay in their mapped files as `Tensor16` (nothing is read here)."""
    folder = Path(folder)
    if cfg is None:
        cfg, layout = load_config(folder)
    expected = canonical_names(cfg)
    tensors, where = {}, {}
    files, weight_map = _safetensors_files(folder)
    for file in files:
        found = read_safetensors(file, lazy16)
        index = folder / "model.safetensors.index.json"
        for name, arr in found.items():
            key = hf_to_canonical(name) if layout == "hf" else name
            if key in tensors:
                raise CheckpointError(f"{file}: tensor {name!r} is duplicated (also in {where[key]})")
            if weight_map is not None and weight_map.get(name) != file.name:    # the index and the shards agree
                raise CheckpointError(f"{file}: holds tensor {name!r}, but {index.name} puts it "
                                      + (f"in {weight_map[name]}" if name in weight_map else "in no shard"))
            if key not in expected:
                if layout == "hf" and name.endswith("rotary_emb.inv_freq"):
                    continue            # old HF checkpoints store the RoPE table; it is recomputed here
                raise CheckpointError(f"{file}: unexpected tensor {name!r} (shape {list(arr.shape)})")
            if tuple(arr.shape) != expected[key]:
                raise CheckpointError(f"{file}: tensor {name!r} has shape {list(arr.shape)}, "
                                      f"expected {list(expected[key])} from the config")
            check_float(arr, name, file)
            if isinstance(arr, Tensor16):           # mapped: checked as its rows are first widened (nothing read now)
                arr.name, arr.source = name, file
            else:
                check_finite(arr, name, file)       # one sum per tensor: cheap (docs/errors.md)
            tensors[key], where[key] = arr, file
    if weight_map is not None:
        lost = [n for n, f in weight_map.items() if (hf_to_canonical(n) if layout == "hf" else n) not in tensors
                and not n.endswith("rotary_emb.inv_freq")]
        if lost:
            raise CheckpointError(f"{folder / 'model.safetensors.index.json'}: lists tensor {lost[0]!r} in "
                                  f"{weight_map[lost[0]]}, which does not hold it")
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise CheckpointError(f"{folder}: missing tensor(s) {missing[:4]}{' ...' if len(missing) > 4 else ''} "
                              f"(canonical names; expected shape of the first {list(expected[missing[0]])})")
    if layout == "mistral":
        for i in range(cfg.n_layers):
            for key, n in ((f"layers.{i}.attention.wq.weight", cfg.n_heads),
                           (f"layers.{i}.attention.wk.weight", cfg.n_kv_heads)):
                w = tensors[key]
                if isinstance(w, Tensor16):     # permute row indices, not data: nothing is read at load
                    tensors[key] = w.permuted(interleaved_to_half_rope(np.arange(w.shape[0])[:, None], n)[:, 0])
                else:
                    tensors[key] = interleaved_to_half_rope(w, n)
    return tensors
