"""Checkpoint loading: safetensors files (read here, memory-mapped), two name maps, one RoPE permutation.

Layouts read:
  * Hugging Face: config.json + model.safetensors, or shards listed in model.safetensors.index.json
  * Mistral consolidated: params.json + consolidated.safetensors
Pickle-based files (.bin, .pt, .pth) are refused: unpickling runs arbitrary code, and minispec never does it.

Canonical names are Mistral's (`layers.{i}.attention.wq.weight`, ...); each foreign layout has one explicit
map to them. Canonical q/k rows follow HF's rotate-half RoPE order, so consolidated wq/wk go through
`interleaved_to_half_rope` once at load. Every expected tensor must be present exactly once with the shape the
config implies, else one error naming the file, the key and both shapes.

The safetensors format is small enough to read directly: 8 bytes little-endian header length N, N bytes of
JSON {name: {dtype, shape, data_offsets: [begin, end]}}, then the raw little-endian data. Reading it here lets
BF16 (which NumPy lacks) be widened to float32 by a 16-bit shift, and keeps big files memory-mapped.
"""
import json
import math
import struct
from pathlib import Path

import numpy as np

from ..errors import Fields, MissingFileError, UserError, check_finite, is_int, read_json
from .config import MistralConfig

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
           "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class CheckpointError(UserError):
    """A checkpoint file or tensor is missing, duplicated, unexpected or misshaped."""


# ---------------------------------------------------------------------------------------------------------
# safetensors, read by hand
# ---------------------------------------------------------------------------------------------------------
MAX_HEADER = 100_000_000     # bytes: the safetensors format's own limit on its JSON header (MAX_HEADER_SIZE)


def read_safetensors(path, lazy16=False):
    """{name: array} for one .safetensors file; arrays are read-only memory-mapped views (BF16 widened).
    lazy16: BF16 and F16 tensors come back as `Tensor16` (left in the mapped file, widened only when read).

    The file is checked as the reference reader (the `safetensors` package) checks it, so a file it refuses is
    refused here too, naming the file and the tensor (safetensors_header)."""
    path = Path(path)
    header, n, size = safetensors_header(path)
    # a plain ndarray view of the map (np.asarray keeps the map alive): slices of an np.memmap run Python code
    # (memmap.__array_finalize__) holding the GIL, which stalled the mapped product's second thread at every block
    raw = np.asarray(np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)) if size > 8 + n else np.zeros(0, np.uint8)
    out = {}
    for name, (kind, shape, begin, end) in header.items():
        arr = raw[begin:end].view(_DTYPES[kind]).reshape(shape)
        if lazy16 and kind in ("BF16", "F16") and arr.ndim == 2:
            out[name] = Tensor16(arr, kind)
        else:
            out[name] = bf16_to_float32(arr) if kind == "BF16" else arr
    return out


def safetensors_header(path):
    """({name: (dtype, shape, begin, end)}, header length, file size) of a safetensors file, or CheckpointError.

    The format's rules, as its reference reader applies them: 8 bytes little-endian header length N (at most
    100 MB, within the file), N bytes of UTF-8 JSON holding one object {name: {"dtype", "shape", "data_offsets":
    [begin, end]}} (plus an optional "__metadata__" object of strings), shapes and offsets non-negative integers;
    sorted by offsets, the byte ranges tile the data section exactly: the first begins at 0, each begins where
    the previous ends (no overlap, no gap), each holds prod(shape) x itemsize bytes, and the last ends at the end
    of the file (no trailing bytes). minispec also refuses a tensor name given twice (JSON keeps the last)."""
    refuse_pickle(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a safetensors file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER:
                raise CheckpointError(f"{path}: header length {n} is over the format's limit of {MAX_HEADER} bytes "
                                      f"(not a safetensors file?)")
            if n > size - 8:
                raise CheckpointError(f"{path}: header length {n} runs past the end of the file ({size} bytes)")
            text = f.read(n)
    except FileNotFoundError:
        raise MissingFileError(f"{path}: no such file") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None

    def no_duplicates(pairs):
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            dup = next(k for k in keys if keys.count(k) > 1)
            raise CheckpointError(f"{path}: the header names {dup!r} twice")
        return dict(pairs)
    try:
        header = json.loads(text.decode("utf-8"), object_pairs_hook=no_duplicates)
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: header is not UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header must be a JSON object {{name: {{dtype, shape, data_offsets}}}}, "
                              f"got a {type(header).__name__}")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"{path}: header's \"__metadata__\" must be an object of strings, got {meta!r}"[:300])
    out = {}
    for name, info in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise CheckpointError(f"{where}: its entry must be an object with \"dtype\", \"shape\" and "
                                  f"\"data_offsets\", got {info!r}"[:300])
        kind, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if kind not in _DTYPES:
            raise CheckpointError(f"{where} has unsupported dtype {kind!r} (minispec reads {', '.join(_DTYPES)})")
        if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
            raise CheckpointError(f"{where}: shape must be a list of integers >= 0, got {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o) and o >= 0 for o in offsets)):
            raise CheckpointError(f"{where}: data_offsets must be [begin, end], two integers >= 0, got {offsets!r}")
        out[name] = (kind, tuple(int(d) for d in shape), int(offsets[0]), int(offsets[1]))
    data = size - 8 - n                                                     # bytes of the data section
    at = 0
    for name, (kind, shape, begin, end) in sorted(out.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin != at or end < begin:
            raise CheckpointError(f"{path}: tensor {name!r}: its byte range [{begin}, {end}) " + (
                "ends before it begins" if end < begin else
                f"overlaps the tensor before it (which ends at {at})" if begin < at else
                f"leaves the bytes [{at}, {begin}) of the data section unused") + ": the byte ranges must tile the "
                "data section in order, without overlap or gap")
        nbytes = math.prod(shape) * np.dtype(_DTYPES[kind]).itemsize
        if end - begin != nbytes:
            raise CheckpointError(f"{path}: tensor {name!r} of shape {list(shape)} {kind} needs {nbytes} bytes, "
                                  f"but its data_offsets [{begin}, {end}) hold {end - begin}")
        if end > data:
            raise CheckpointError(f"{path}: tensor {name!r}: its byte range [{begin}, {end}) runs past the end of the "
                                  f"{data}-byte data section (a truncated file?)")
        at = end
    if at != data:
        raise CheckpointError(f"{path}: the tensors cover {at} of the {data} bytes after the header: "
                              f"{data - at} trailing bytes belong to no tensor (a corrupt or mis-written file)")
    return out, n, size


class Tensor16:
    """A 16-bit [out, in] matrix left in its memory-mapped file: bf16 bits (as uint16) or float16.

    Nothing is read at construction: pages come in from the file when rows are widened. `rows` (an index array or
    None) reorders the output rows lazily, which is how a consolidated checkpoint's RoPE permutation is applied
    without touching the data. Widening is exact: a bf16 is the top half of a float32, a float16 fits a float32.
    """

    def __init__(self, data, kind, rows=None, name=None, source=None):
        self.data, self.kind, self.rows = data, kind, rows                  # data [out, in] uint16 or float16
        self.shape, self.ndim = tuple(data.shape), 2
        self.size, self.nbytes = data.size, data.size * 2
        # Non-finite weights are refused as at a widened load, but lazily: checking at load would read the whole
        # file. Rows are checked the first time they are widened (one bit test per block, on the first pass
        # only), so the first forward names the tensor; `checked[i]` says row i has been (the threads of a
        # mapped product widen different rows at the same time, so this is per row, not how far a pass got).
        self.name, self.source = name, source
        self.checked = np.zeros(self.shape[0], bool)

    def check_rows(self, src, start):
        """Refuse rows src (of this tensor, from row `start`) holding NaN or inf, naming the tensor."""
        exponent = np.uint16(0x7F80 if self.kind == "BF16" else 0x7C00)    # all ones: inf or NaN
        bad = (src.view(np.uint16) & exponent) == exponent
        if bad.any():
            first = [int(i) for i in np.argwhere(bad)[0]]
            first[0] += start
            raise UserError(f"{self.source}: tensor {self.name!r} holds NaN or inf (the first at index {first}): "
                            f"the file is corrupt or was saved from a diverged run")

    def widen_rows(self, start, stop, out):
        """Rows start..stop-1 as float32 into out [stop - start, in] (a preallocated buffer)."""
        src = self.data[start:stop] if self.rows is None else self.data[self.rows[start:stop]]
        if not self.checked[start:stop].all():
            self.check_rows(src, start)
            self.checked[start:stop] = True
        if self.kind == "BF16":
            bits = out.view(np.uint32)
            np.copyto(bits, src)                                             # the 16 bits, zero-extended
            np.left_shift(bits, 16, out=bits)                                # moved to the top half: the float32
        else:
            # float16 (NumPy's own cast is slower: docs/real_mistral.md): sign-extend the 16 bits,
            # move exponent and mantissa to float32's places (the value is then 2^-112 too small, subnormals
            # included), keep the sign bit and those 28 bits, and scale by 2^112, which is exact (with the
            # default handling of subnormal inputs; a CPU set to treat them as zero would flush those). Finite values
            # only: inf and NaN were refused by check_rows above.
            np.copyto(out.view(np.int32), src.view(np.int16))                # bits 31..15 = the sign
            bits = out.view(np.uint32)
            np.left_shift(bits, 13, out=bits)
            np.bitwise_and(bits, np.uint32(0x8FFFFFFF), out=bits)
            np.multiply(out, np.float32(2.0 ** 112), out=out)
        return out

    def widen(self, dtype=np.float32):
        """The whole matrix, widened (for the widened path and for small tensors)."""
        out = self.widen_rows(0, self.shape[0], np.empty(self.shape, np.float32))
        return out if dtype == np.float32 else out.astype(dtype)

    def __array__(self, dtype=None, copy=None):
        return self.widen(np.float32 if dtype is None else dtype)

    def permuted(self, rows):
        """The same matrix with its output rows reordered (row i of the result = row rows[i] of this one)."""
        return Tensor16(self.data, self.kind, rows if self.rows is None else self.rows[rows], self.name, self.source)


def check_float(arr, name, source):
    """A weight must be floating point (F16, BF16, F32 or F64): integer or boolean data of the right shape would be
    converted to floats silently and compute garbage."""
    if not isinstance(arr, Tensor16) and np.asarray(arr).dtype.kind != "f":
        raise CheckpointError(f"{source}: tensor {name!r} holds {np.asarray(arr).dtype} values; weights must be "
                              f"floating point (F16, BF16, F32 or F64)")


def bf16_to_float32(bits):
    """bfloat16 is the top half of a float32: shift the 16 stored bits up and reinterpret."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def refuse_pickle(path):
    if Path(path).suffix in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: refusing a pickle-based checkpoint. Unpickling can run arbitrary code, so minispec never "
            f"does it. Convert it once, in a trusted environment, to safetensors (e.g. with torch: "
            f"safetensors.torch.save_file(torch.load(path, weights_only=True), 'model.safetensors')).")


def safetensors_in(folder, filename, refuse):
    """folder/filename, a head file of a foreign format, or an error. A pickle file passed as the folder, or lying
    where the safetensors file should be (the same stem with .pt/.bin), goes to refuse(path), which raises with
    that format's conversion recipe; never unpickled."""
    folder = Path(folder)
    if folder.suffix in PICKLE_SUFFIXES:
        refuse(folder)
    path = folder / filename
    if not path.exists():
        for suffix in PICKLE_SUFFIXES:
            if (folder / f"{Path(filename).stem}{suffix}").exists():
                refuse(folder / f"{Path(filename).stem}{suffix}")
        raise CheckpointError(f"{folder}: no {filename}")
    return path


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
        return f"layers.{parts[2]}." + {"input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}[parts[3]] + ".weight"
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
            for key, n in ((f"layers.{i}.attention.wq.weight", cfg.n_heads), (f"layers.{i}.attention.wk.weight", cfg.n_kv_heads)):
                w = tensors[key]
                if isinstance(w, Tensor16):     # permute row indices, not data: nothing is read at load
                    tensors[key] = w.permuted(interleaved_to_half_rope(np.arange(w.shape[0])[:, None], n)[:, 0])
                else:
                    tensors[key] = interleaved_to_half_rope(w, n)
    return tensors
