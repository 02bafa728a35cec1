"""Checkpoint files that the safetensors format refuses are refused by minispec too (issue 18, "Checkpoint files").

The reference is the `safetensors` package itself: every malformed file below is first shown to be refused by
safetensors.numpy.load_file, then minispec must refuse it with one CheckpointError naming the file (and the
tensor, where one is at fault), never load it with wrong weights. Shard indexes get the same care.
"""
import json
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import random_tensors, tiny_config
from test_weights import to_hf, write_hf
from minispec.errors import MissingFileError, UserError
from minispec.mistral.weights import CheckpointError, load_tensors, read_safetensors

F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def entry(shape, begin, end, dtype="F32"):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def write(path, header, data=b"", n=None):
    """A safetensors file from a header (a dict, dumped, or raw bytes) and the data section's bytes; n: the header
    length to write instead of the true one."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h) if n is None else n) + h + data)
    return path


DATA8, DATA12 = bytes(range(8)), bytes(range(12))
# name: (header, data section, header length override, words the message must hold besides the file name)
MALFORMED = {
    "overlapping ranges": ({"a": entry([2], 0, 8), "b": entry([2], 4, 12)}, DATA12, None, ["'b'", "overlaps"]),
    "a gap between ranges": ({"a": entry([1], 0, 4), "b": entry([1], 8, 12)}, DATA12, None, ["'b'", "unused"]),
    "a first range not at 0": ({"a": entry([1], 4, 8)}, DATA8, None, ["'a'", "unused"]),
    "a range that ends before it begins": ({"a": entry([0], 4, 0), "b": entry([1], 0, 4)}, DATA8[:4], None,
                                           ["'a'", "ends before it begins"]),
    "a range past the file": ({"a": entry([4], 0, 16)}, DATA8, None, ["'a'", "past the end"]),
    "bytes that do not match dtype x shape": ({"a": entry([3], 0, 8)}, DATA8, None, ["'a'", "needs 12 bytes"]),
    "a bf16 range half as long as its shape": ({"a": entry([4], 0, 4, "BF16")}, DATA8[:4], None,
                                               ["'a'", "needs 8 bytes", "hold 4"]),
    "trailing bytes": ({"a": F32x2}, DATA12, None, ["4 trailing bytes"]),
    "no tensors but data": ({}, b"xx", None, ["trailing"]),
    "a header that is a list": (b"[1, 2]", b"", None, ["JSON object"]),
    "a header that is a number": (b"3", b"", None, ["JSON object"]),
    "a header that is not JSON": (b'{"a": ', b"", None, ["not valid JSON"]),
    "an empty header": (b"", b"", None, ["not valid JSON"]),
    "a header that is not UTF-8": (b'{"a\xff": 1}', b"", None, ["not UTF-8"]),
    "a header length past the file": ({"a": F32x2}, DATA8, 10_000, ["runs past the end"]),
    "a header length over the format's limit": ({}, b"", 100_000_001, ["limit"]),
    "an unknown dtype": ({"a": entry([2], 0, 8, "F17")}, DATA8, None, ["'a'", "'F17'"]),
    "a lower-case dtype": ({"a": entry([2], 0, 8, "f32")}, DATA8, None, ["'a'", "'f32'"]),
    "a negative dimension": ({"a": entry([-2], 0, 8)}, DATA8, None, ["'a'", "shape"]),
    "a float dimension": ({"a": entry([2.0], 0, 8)}, DATA8, None, ["'a'", "shape"]),
    "a boolean dimension": ({"a": entry([True, 2], 0, 8)}, DATA8, None, ["'a'", "shape"]),
    "a shape that is not a list": ({"a": entry(2, 0, 8)}, DATA8, None, ["'a'", "shape"]),
    "three offsets": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 8]}}, DATA8, None,
                      ["'a'", "data_offsets"]),
    "a float offset": ({"a": entry([2], 0, 8.0)}, DATA8, None, ["'a'", "data_offsets"]),
    "a negative offset": ({"a": entry([2], -8, 0)}, DATA8, None, ["'a'", "data_offsets"]),
    "an entry that is not an object": ({"a": [1]}, b"", None, ["'a'", "entry"]),
    "an entry without data_offsets": ({"a": {"dtype": "F32", "shape": [2]}}, DATA8, None, ["'a'", "data_offsets"]),
    "metadata that is not strings": ({"__metadata__": {"format": 1}, "a": F32x2}, DATA8, None, ["__metadata__"]),
    "metadata that is a list": ({"__metadata__": ["pt"], "a": F32x2}, DATA8, None, ["__metadata__"]),
    "one name twice, two ranges": (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                                   b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', DATA8, None,
                                   ["'a'", "twice"]),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_file_the_safetensors_format_refuses_is_refused_naming_the_file(tmp_path, case):
    header, data, n, words = MALFORMED[case]
    path = write(tmp_path / "bad.safetensors", header, data, n)
    with pytest.raises(Exception):                      # the reference reader refuses it too
        load_file(str(path))
    with pytest.raises(CheckpointError) as e:
        read_safetensors(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    for w in words:
        assert w in msg, (w, msg)


def test_a_file_shorter_than_its_header_length_is_refused(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(Exception):
        load_file(str(path))
    with pytest.raises(CheckpointError, match="shorter than its 8-byte header length"):
        read_safetensors(path)


@pytest.mark.parametrize("case", ["ranges listed out of order", "an empty tensor", "a scalar", "padded header",
                                  "an unknown field", "U16"])
def test_what_the_format_accepts_is_read_as_the_reference_reads_it(tmp_path, case):
    """The other side of the rule: files the reference reads are read, with the same values (not stricter by
    accident). The header may list tensors in any order (the byte ranges are sorted), pad with spaces, carry
    fields it does not need."""
    header, data = {
        "ranges listed out of order": ({"b": entry([1], 4, 8), "a": entry([1], 0, 4)}, DATA8),
        "an empty tensor": ({"e": entry([0, 3], 0, 0), "a": entry([2], 0, 8)}, DATA8),
        "a scalar": ({"s": entry([], 0, 4)}, DATA8[:4]),
        "padded header": (json.dumps({"a": F32x2}).encode() + b"      ", DATA8),
        "an unknown field": ({"a": {**F32x2, "note": "x"}}, DATA8),
        "U16": ({"u": entry([4], 0, 8, "U16")}, DATA8),
    }[case]
    path = write(tmp_path / "ok.safetensors", header, data)
    ref, ours = load_file(str(path)), read_safetensors(path)
    assert sorted(ref) == sorted(ours)
    for k in ref:
        assert ours[k].dtype == ref[k].dtype and np.array_equal(ours[k], ref[k])


def test_a_folder_where_the_safetensors_file_should_be_is_one_clear_error(tmp_path):
    (tmp_path / "model.safetensors").mkdir()
    with pytest.raises(CheckpointError, match="is a folder, not a safetensors file"):
        read_safetensors(tmp_path / "model.safetensors")


# ---------------------------------------------------------------------------------------------------------
# Shard indexes: model.safetensors.index.json and its shards must agree, both ways
# ---------------------------------------------------------------------------------------------------------
def sharded(tmp_path):
    """A tiny HF model split over two shards with a correct index: (folder, tensor names, {name: shard})."""
    cfg = tiny_config()
    folder = write_hf(tmp_path / "m", cfg, random_tensors(cfg))
    hf = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    keys = sorted(hf)
    half = len(keys) // 2
    save_file({k: hf[k] for k in keys[:half]}, str(folder / "a.safetensors"))
    save_file({k: hf[k] for k in keys[half:]}, str(folder / "b.safetensors"))
    wm = {k: "a.safetensors" if i < half else "b.safetensors" for i, k in enumerate(keys)}
    return folder, keys, wm


def write_index(folder, weight_map):
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_a_correct_shard_index_loads(tmp_path):
    folder, keys, wm = sharded(tmp_path)
    write_index(folder, wm)
    assert len(load_tensors(folder)) == len(keys)


@pytest.mark.parametrize("case", ["a missing shard", "a tensor listed in the wrong shard", "a tensor in no shard",
                                  "a tensor the index does not list", "a shard path outside the folder",
                                  "a shard that is not a string", "an empty weight_map", "a weight_map list",
                                  "a shard that is a folder"])
def test_a_shard_index_that_disagrees_with_its_shards_is_refused_naming_the_tensor_or_shard(tmp_path, case):
    folder, keys, wm = sharded(tmp_path)
    k0, k_last = keys[0], keys[-1]
    error, words = CheckpointError, []
    if case == "a missing shard":
        wm[k0], error, words = "c.safetensors", MissingFileError, ["c.safetensors", k0]
    elif case == "a tensor listed in the wrong shard":
        wm[k0], words = "b.safetensors", [k0, "a.safetensors"]
    elif case == "a tensor in no shard":
        wm["model.extra.weight"], words = "a.safetensors", ["model.extra.weight", "does not hold it"]
    elif case == "a tensor the index does not list":
        del wm[k_last]
        words = [k_last, "in no shard"]
    elif case == "a shard path outside the folder":
        wm[k0], words = "../a.safetensors", [k0, "../a.safetensors"]
    elif case == "a shard that is not a string":
        wm[k0], words = 3, [k0]
    elif case == "an empty weight_map":
        wm, words = {}, ["weight_map"]
    elif case == "a weight_map list":
        wm, words = list(wm), ["weight_map"]
    elif case == "a shard that is a folder":
        (folder / "c.safetensors").mkdir()
        wm[k0], error, words = "c.safetensors", MissingFileError, ["c.safetensors"]
    write_index(folder, wm)
    with pytest.raises(error) as e:
        load_tensors(folder)
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_to_hf_is_the_name_map_the_shards_use():
    """(guards the helper above: the shards hold HF names, so the index must too)"""
    cfg = tiny_config()
    assert all(k.startswith(("model.", "lm_head")) for k in to_hf(random_tensors(cfg)))
