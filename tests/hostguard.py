"""An array namespace that behaves like CuPy where CuPy is strict: no implicit host conversion.

`GuardArray` wraps a NumPy array and forwards arithmetic and NumPy functions to it, but raises on exactly the
things CuPy refuses: `np.asarray(guard)` / `__array__` (implicit device -> host), and mixing a guarded array
with a plain NumPy array in one operation or index (host data leaking into device math). `GuardNumpy` is the
matching namespace (`xp`): its constructors return guarded arrays, and its `asarray` is the explicit
host -> device transfer. A model built with device=GuardNumpy() therefore fails here wherever it would fail
under CuPy.
"""
import numbers

import numpy as np

from numpy.lib.mixins import NDArrayOperatorsMixin


class HostConversionError(RuntimeError):   # not TypeError: NumPy swallows that from __array__
    pass


def _unwrap(x, where):
    if isinstance(x, GuardArray):
        return x.a
    if isinstance(x, np.ndarray) and x.ndim > 0:
        raise HostConversionError(f"host NumPy array of shape {x.shape} mixed into device code ({where})")
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(i, where) for i in x)
    if isinstance(x, slice):
        return slice(_unwrap(x.start, where), _unwrap(x.stop, where), _unwrap(x.step, where))
    return x


def _wrap(x):
    if isinstance(x, np.ndarray):
        return GuardArray(x)
    if isinstance(x, tuple):
        return tuple(_wrap(i) for i in x)
    return x


class GuardArray(NDArrayOperatorsMixin):
    def __init__(self, a):
        self.a = a

    @property
    def __minispec_namespace__(self):
        return GUARD

    def __array__(self, *args, **kwargs):
        raise HostConversionError("implicit conversion of a device array to NumPy (CuPy raises here too); "
                                  "use minispec.backend.to_host")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        inputs = _unwrap(inputs, ufunc.__name__)
        if "out" in kwargs:
            kwargs["out"] = _unwrap(kwargs["out"], ufunc.__name__)
        return _wrap(getattr(ufunc, method)(*inputs, **kwargs))

    def __array_function__(self, func, types, args, kwargs):
        return _wrap(func(*_unwrap(args, func.__name__), **_unwrap(kwargs, func.__name__)))

    def get(self):                        # CuPy's explicit device -> host copy
        return self.a.copy()

    def __getitem__(self, idx):
        return _wrap(self.a[_unwrap(idx, "indexing")])

    def __setitem__(self, idx, value):
        self.a[_unwrap(idx, "index assignment")] = _unwrap(value, "index assignment")

    def __getattr__(self, name):          # shape, dtype, ndim, T, reshape, transpose, sum, max, mean, copy, ...
        if name.startswith("__"):         # __array_interface__ & co. would hand NumPy the host buffer
            raise AttributeError(name)
        attr = getattr(self.a, name)
        if callable(attr):
            return lambda *a, **k: _wrap(attr(*_unwrap(a, name), **_unwrap(k, name)))
        return _wrap(attr)

    def __len__(self):
        return len(self.a)

    def __float__(self):                  # CuPy allows these on size-1 arrays (with a sync)
        return float(self.a)

    def __int__(self):
        return int(self.a)

    def __index__(self):
        return int(self.a)

    def __repr__(self):
        return f"GuardArray({self.a!r})"


class GuardNumpy:
    """`xp` for guarded arrays: every function returns guarded arrays; `asarray` is the explicit upload."""
    __minispec_device__ = "hostguard"

    def asarray(self, a, dtype=None):
        return GuardArray(np.array(a.a if isinstance(a, GuardArray) else a, dtype=dtype))

    def __getattr__(self, name):
        f = getattr(np, name)
        if not callable(f) or isinstance(f, type) and issubclass(f, numbers.Number):
            return f
        if isinstance(f, type):
            return f

        def call(*args, **kwargs):
            return _wrap(f(*_unwrap(args, name), **_unwrap(kwargs, name)))
        return call


GUARD = GuardNumpy()
