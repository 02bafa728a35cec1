"""The safetensors format, read by hand: every tensor memory-mapped, BF16 widened by a 16-bit shift (NumPy has no
bfloat16), and every rule of the format checked (minispec.mistral.weights reads checkpoints with it).

The format: 8 bytes little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets: [begin,
end]}} (plus an optional "__metadata__" of strings), then the raw little-endian data; the byte ranges tile the
data section in order, without overlap or gap. Pickle-based files (.bin, .pt, .pth) are refused: unpickling runs
arbitrary code, and minispec never does it.
"""
import json
import math
import struct
from pathlib import Path

import numpy as np

from ..errors import MissingFileError, UserError, is_int

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
