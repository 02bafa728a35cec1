"""User mistakes: the error type they raise and the checks every entry point shares (docs/errors.md lists them).

A `UserError` is a mistake in what was passed (a parameter out of range, a file that is not there, a config key
of the wrong type): its message names the thing and says what would be right, in one line. The command line
prints exactly that line (`minispec: error: ...`, exit status 2) and no traceback; any other exception is a bug
of minispec and keeps its traceback. UserError subclasses ValueError, so `except ValueError` keeps working.

The checks live here, once, and are called at the top of the public functions (model.forward, forward_block,
generate, the config readers, the weight loader), so that a rule is the same wherever it applies.
"""
import json
import numbers
import warnings
from pathlib import Path

import numpy as np


class UserError(ValueError):
    """Bad input from a user: a parameter, a file, a key or a tensor. The message is one line naming it."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user pointed to (or that should sit next to it) is not there."""


# ---------------------------------------------------------------------------------------------------------
# Scalars
# ---------------------------------------------------------------------------------------------------------
def is_int(v):
    """A true integer: Python or NumPy int, not a bool (True is an int to Python, never a count here)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def is_real(v):
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def check_int(name, v, low=None, what=""):
    """v itself if it is an int >= low, else UserError naming `name`. what: the meaning, for the message."""
    if not is_int(v) or (low is not None and v < low):
        bound = f" >= {low}" if low is not None else ""
        raise UserError(f"{name} must be an int{bound}{what}, got {v!r}")
    return int(v)


def check_real(name, v, low=None, high=None, low_open=False, high_open=False, what=""):
    """float(v) if v is a finite real in the interval, else UserError naming `name` and the interval."""
    ok = is_real(v) and np.isfinite(v)
    if ok and low is not None:
        ok = v > low if low_open else v >= low
    if ok and high is not None:
        ok = v < high if high_open else v <= high
    if not ok:
        if low is not None and high is not None:
            rng = f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low is not None:
            rng = f" {'>' if low_open else '>='} {low:g}"
        else:
            rng = ""
        raise UserError(f"{name} must be a finite number{rng}{what}, got {v!r}")
    return float(v)


# ---------------------------------------------------------------------------------------------------------
# Token ids (model.forward, forward_block, generate)
# ---------------------------------------------------------------------------------------------------------
def check_token_ids(ids, vocab_size, what="ids"):
    """ids as a host int64 array [T], or UserError: a 1-D, non-empty sequence of integer ids in [0, V).

    Refused rather than "fixed": a 2-D array (flattening it would silently join rows), floats and bools
    (truncation and True == 1 hide a mistake), ids outside the vocabulary (a negative id would read another
    row of the embedding). Its cost is a few Python-level checks per call, small beside a forward (docs/design.md,
    "Errors", gives the command that times it).
    """
    if hasattr(ids, "get") and not isinstance(ids, np.ndarray):     # CuPy: one explicit copy to the host
        ids = ids.get()
    try:
        a = np.asarray(ids)
    except ValueError as e:             # ragged nested lists
        raise UserError(f"{what} must be a 1-D sequence of token ids, got a ragged sequence ({e})") from None
    if a.ndim == 1 and a.size == 0:                                 # [] is float64 to NumPy: before the dtype
        raise UserError(f"{what} is empty: a prompt needs at least one token (e.g. BOS)")
    if a.dtype.kind not in "iu":                                    # bool is kind "b", floats "f", objects "O"
        kind = "bool" if a.dtype == np.bool_ else a.dtype.name if a.dtype.kind != "O" else "object"
        raise UserError(f"{what} must hold integer token ids, got dtype {kind} (convert explicitly if intended)")
    if a.ndim != 1:
        raise UserError(f"{what} must be 1-D (one sequence of token ids), got shape {a.shape}")
    if a.size <= 16:                # a decode step's few ids: Python's min/max beat two NumPy reductions
        values = a.tolist()
        lo, hi = min(values), max(values)
    else:
        lo, hi = int(a.min()), int(a.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        at = int(np.flatnonzero(a == bad)[0])
        raise UserError(f"{what}[{at}] = {bad} is not a token id: ids must be in [0, {vocab_size}) "
                        f"(the model's vocab_size)")
    return a.astype(np.int64, copy=False)


def warn_if_past_max_positions(end, max_positions, what="the cached tokens + ids"):
    """A warning (not an error: RoPE still computes) when positions reach past max_position_embeddings."""
    if end > max_positions:
        warnings.warn(f"{what} reach {end} positions, more than the model's max_position_embeddings "
                      f"({max_positions}): the model was not trained that far, expect worse text", stacklevel=3)


# ---------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------
def utf8_problem(text):
    """Where str `text` cannot be encoded as UTF-8, e.g. "byte 0xff at character 4" (sys.argv carries bytes that
    are not UTF-8 as lone surrogates, PEP 383), or None when it can."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        ch = text[e.start]
        what = f"byte 0x{ord(ch) - 0xDC00:02x}" if 0xDC80 <= ord(ch) <= 0xDCFF else f"character {ch!r}"
        return f"{what} at character {e.start}"
    return None


def read_json(path, expect=dict):
    """The JSON value in `path` (a dict unless told otherwise), or UserError naming the file and the line."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not a JSON file")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MissingFileError(f"{path}: no such file") from None
    except OSError as e:                    # unreadable (permissions, a device): one line, not a traceback
        raise UserError(f"{path}: cannot be read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}, line {e.lineno}, column {e.colno}: invalid JSON ({e.msg})") from None
    if expect is not None and not isinstance(value, expect):
        raise UserError(f"{path}: must hold a JSON {'object' if expect is dict else expect.__name__} "
                        f"({{\"key\": value, ...}}), got a {type(value).__name__}")
    return value


def write_json_lines(path, d):
    """Write the dict d as a JSON object with one key per line and each value on one line (a tree or a layer
    list stays readable, and a diff shows which entry changed)."""
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in d.items()]
    Path(path).write_text("{\n" + ",\n".join(lines) + "\n}\n")


def check_finite(arr, name, source):
    """Refuse a weight tensor holding NaN or inf, naming it.

    Cheap enough for every load: one sum (accumulated in float32 or wider, no temporary array); only when the
    sum is not finite is the tensor scanned element-wise, which also tells a true NaN/inf from a sum that
    merely overflowed (values near float32's maximum: accepted)."""
    if arr.dtype.kind != "f" or arr.size == 0:
        return
    acc = np.float64 if arr.dtype == np.float64 else np.float32
    with np.errstate(over="ignore", invalid="ignore"):      # an overflowing sum is handled below, not warned about
        if np.isfinite(np.add.reduce(arr.reshape(-1), dtype=acc)):
            return
    bad = ~np.isfinite(arr)
    n = int(bad.sum())
    if n:
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        kinds = " and ".join(k for k, m in (("NaN", np.isnan(arr).any()), ("inf", np.isinf(arr).any())) if m)
        raise UserError(f"{source}: tensor {name!r} holds {kinds} ({n} of {arr.size} values, the first at "
                        f"index {list(first)}): the file is corrupt or was saved from a diverged run")


# ---------------------------------------------------------------------------------------------------------
# Config files: typed, ranged, named fields
# ---------------------------------------------------------------------------------------------------------
REQUIRED = object()


class Fields:
    """Typed, ranged reads of one JSON object (a config file); every error names the file and the key.

        f = Fields(read_json(path), path, CheckpointError)
        K = f.int("num_heads", low=1)                   # required: missing, 2.0, True, "4" or 0 is an error
        arch = f.choice("arch", ("mlp", "prefix-mlp"))
        eps = f.real("gamma0", low=0, high=1, default=0.6)

    A key whose value is null counts as absent when a default is given (JSON's way of saying "unset").
    error: the UserError subclass raised (e.g. CheckpointError for head files)."""

    def __init__(self, d, source, error=UserError, what=""):
        if not isinstance(d, dict):
            raise error(f"{source}: must hold a JSON object ({{\"key\": value, ...}}), got a {type(d).__name__}")
        self.d, self.source, self.error, self.what = d, source, error, what

    def fail(self, key, message):
        raise self.error(f"{self.source}: key {key!r} {message}")

    def get(self, key, default=REQUIRED):
        """The raw value; REQUIRED (the default) makes a missing key an error."""
        if key not in self.d or (self.d[key] is None and default is not REQUIRED):
            if default is REQUIRED:
                raise self.error(f"{self.source}: missing key {key!r}{self.what}")
            return default
        return self.d[key]

    def int(self, key, low=None, high=None, default=REQUIRED):
        v = self.get(key, default)
        if v is default and default is not REQUIRED:
            return v
        if not is_int(v) or (low is not None and v < low) or (high is not None and v > high):
            rng = (f" in [{low}, {high}]" if low is not None and high is not None else
                   f" >= {low}" if low is not None else f" <= {high}" if high is not None else "")
            self.fail(key, f"must be an integer{rng}, got {v!r}")
        return int(v)

    def real(self, key, low=None, high=None, default=REQUIRED, low_open=False):
        v = self.get(key, default)
        if v is default and default is not REQUIRED:
            return v
        ok = is_real(v) and np.isfinite(v) and (low is None or (v > low if low_open else v >= low)) \
            and (high is None or v <= high)
        if not ok:
            rng = (f" in {'(' if low_open else '['}{low:g}, {high:g}]" if low is not None and high is not None else
                   f" {'>' if low_open else '>='} {low:g}" if low is not None else "")
            self.fail(key, f"must be a finite number{rng}, got {v!r}")
        return float(v)

    def flag(self, key, default=REQUIRED):
        v = self.get(key, default)
        if not isinstance(v, bool):
            self.fail(key, f"must be true or false, got {v!r}")
        return v

    def typed(self, key, ok, must, default=REQUIRED):
        """The value at `key` when ok(value) holds (`default` where the key is absent), else the error
        "key 'key' {must}, got value"."""
        v = self.get(key, default)
        if v is default and default is not REQUIRED:
            return v
        if not ok(v):
            self.fail(key, f"{must}, got {v!r}")
        return v

    def str(self, key, default=REQUIRED):
        return self.typed(key, lambda v: isinstance(v, str), "must be a string", default)

    def choice(self, key, choices, default=REQUIRED):
        return self.typed(key, lambda v: isinstance(v, str) and v in choices,
                          f"must be one of {', '.join(repr(c) for c in choices)}", default)

    def table(self, key, default=REQUIRED):
        return self.typed(key, lambda v: isinstance(v, dict), "must be a JSON object", default)

    def int_list(self, key, low=None, high=None, default=REQUIRED, unique=False):
        """A list of ints in [low, high] (e.g. layer indices); unique: no index twice."""
        v = self.get(key, default)
        if v is default and default is not REQUIRED:
            return v
        rng = f" in [{low}, {high}]" if low is not None and high is not None else ""
        if not isinstance(v, list) or not all(is_int(i) and (low is None or i >= low) and (high is None or i <= high)
                                              for i in v):
            self.fail(key, f"must be a list of integers{rng}, got {v!r}")
        if unique and len(set(v)) != len(v):
            self.fail(key, f"lists an index twice: {v!r}")
        return [int(i) for i in v]

    def matrix(self, key, low=None, high=None, default=REQUIRED):
        """A non-empty list of equally long, non-empty lists of finite numbers in [low, high] (e.g. accuracies)."""
        v = self.get(key, default)
        if v is default and default is not REQUIRED:
            return v
        ok = isinstance(v, list) and v and all(isinstance(r, list) and r and len(r) == len(v[0]) for r in v) \
            and all(is_real(x) and np.isfinite(x) and (low is None or x >= low) and (high is None or x <= high)
                    for r in v for x in r)
        if not ok:
            rng = f" in [{low:g}, {high:g}]" if low is not None and high is not None else ""
            self.fail(key, f"must be a list of equally long lists of numbers{rng}, got {v!r}"[:300])
        return [[float(x) for x in r] for r in v]
