"""The one module that knows whether arrays live in NumPy (CPU) or CuPy (GPU).

Math code never imports cupy: it asks `array_module(x)` for the namespace of its inputs (CuPy's
get_array_module idiom) and builds every new array through that namespace with the working dtype, so the
same functions run on either. Host crossings (token ids in, logits or stats out) go through `to_host` /
`to_device`, which are explicit on purpose: CuPy refuses implicit conversion, and so does the guard array
type the tests use on CPU (tests/hostguard.py), so CuPy-breaking code fails in CI too.
"""
import sys

import numpy as np

from .errors import UserError

_cupy = None


class DeviceError(UserError, RuntimeError):
    """The device asked for is not usable here (no CuPy, no driver, no GPU)."""


def _try_cupy():
    """CuPy if it imports and sees a CUDA device, else None (cached)."""
    global _cupy
    if _cupy is None:
        try:
            import cupy
            cupy.cuda.runtime.getDeviceCount()
            cupy.zeros(1)
            _cupy = cupy
        except Exception:   # no cupy, no driver, no device: all mean "use NumPy"
            _cupy = False
    return _cupy or None


def resolve_device(device="auto"):
    """`device` -> (array namespace, name). "auto" picks CuPy when a GPU is usable, else NumPy with a notice.

    Any object with a `__minispec_device__` name may be passed as an array namespace (the tests' host guard).
    """
    if not isinstance(device, str):
        return device, getattr(device, "__minispec_device__", type(device).__name__)
    if device == "cpu":
        return np, "cpu"
    if device in ("cuda", "gpu"):
        cp = _try_cupy()
        if cp is None:
            raise DeviceError("device='cuda' was asked for, but CuPy with a usable CUDA device is not available "
                               "(pip install 'minispec[gpu]' on a machine with an NVIDIA GPU)")
        return cp, "cuda"
    if device == "auto":
        cp = _try_cupy()
        if cp is not None:
            return cp, "cuda"
        print("minispec: no usable GPU (CuPy + CUDA); running on the CPU with NumPy", file=sys.stderr)
        return np, "cpu"
    raise UserError(f"device must be 'auto', 'cpu' or 'cuda', not {device!r}")


def array_module(x):
    """The namespace (numpy, cupy, or a test namespace) that owns array x."""
    ns = getattr(x, "__minispec_namespace__", None)
    if ns is not None:
        return ns
    if type(x).__module__.split(".")[0] == "cupy":
        return _try_cupy()
    return np


def to_device(xp, a, dtype=None):
    """Explicit host -> device copy (a no-op view for NumPy)."""
    return xp.asarray(a, dtype=dtype)


def to_host(x):
    """Explicit device -> host copy as a NumPy array."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "get"):
        return x.get()
    return np.asarray(x)
