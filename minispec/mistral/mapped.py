"""Mapped 16-bit weights: a 7B checkpoint that stays in its bf16 file and is widened block by block when used.

A Mistral 7B in float32 is 29 GB; its bf16 file is 14.5 GB. On a CPU, `Model(..., weights="mapped")` keeps each
matrix in the memory-mapped file (`weights.Tensor16`, [out, in] as stored) and widens it to float32 only inside a
matmul, a block of output rows at a time, into a reused buffer sized for the cache, right before the block's
product. Private memory is then the buffers, the cache and the activations, not the weights; the page cache
holds the file and is shared and reclaimable.

Why per block of OUTPUT rows: output j of `x @ W.T` is the dot product of x with row j of W, so computing the
outputs block by block does exactly the same floating-point operations as one product with the whole widened
matrix — the logits are bit-identical to the widened path, which stores its float32 matrices [out, in] the same
way (tests/test_mapped.py checks it bit for bit). Why small blocks: a block widened just before its product is
still in cache when BLAS reads it, so the memory traffic is one read of the 16-bit bytes; widening a whole matrix
first would write and re-read twice its size in float32 from DRAM.

Why two threads: widening costs the core more than reading the bytes costs the memory (one core widens and
multiplies at about a third of what the memory delivers), so the blocks of each product are shared between
THREADS threads, each with its own buffer. Whole blocks per thread keep every output one dot product.

A block is widened once for all the rows of x: a verification block of T tokens widens each matrix once
(`MappedMatrix.passes` counts) and then makes T matrix-vector products on it, so c(T) grows more slowly than on
a model whose weights sit widened in memory, but the T products are not free (docs/real_mistral.md).
"""
import contextlib
import os
import queue
import threading

import numpy as np

from .safetensors import Tensor16

# float32 bytes of one widened block for a matrix-vector product: small enough to stay in the CPU's last-level
# cache while gemv reads it, large enough that Python's per-call overhead is a small part of a block's work
# (smaller blocks pay it more often, larger ones fall out of cache; docs/real_mistral.md has the sizes measured).
# Rows per block are a multiple of 16 so that BLAS's gemv kernel (4 or 8 rows at a time) splits a block's outputs
# the way it splits the whole matrix's; each output is one dot product either way (checked bit for bit in the
# tests).
GEMV_BLOCK_BYTES = 4 << 20

# Threads that widen and multiply blocks of one product at the same time: the CPUs this process may use, at most
# 8. Widening takes the core longer than reading the 16-bit bytes takes the memory (docs/real_mistral.md), so
# more cores go faster until the memory's bandwidth is reached. Each thread has its own buffer and takes whole
# blocks, so every output is still the same single dot product.
THREADS = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


_blas = []


def one_blas_thread():
    """A context in which OpenBLAS runs single-threaded (threadpoolctl, where installed). The block products are
    matrix-vector calls of a few MB: waking BLAS's own threads for each costs more than it saves, and on a shared
    VM they can stall waiting for a core (docs/real_mistral.md). minispec's own threads split the blocks instead.
    Each output is still one dot product, so the logits do not change."""
    if not _blas:
        try:
            from threadpoolctl import ThreadpoolController
            _blas.append(ThreadpoolController())
        except ImportError:
            _blas.append(None)
    return _blas[0].limit(limits=1, user_api="blas") if _blas[0] is not None else contextlib.nullcontext()


class Helper(threading.Thread):
    """A daemon thread that runs one function call at a time for `Workspace.split`: NumPy's ufuncs and `np.dot`
    release the GIL while they loop, so its blocks are widened and multiplied on another core. (`products` calls
    `np.dot`, whose matrix-vector products overlap on two threads; `np.matmul` on these shapes did not gain from a
    second thread in the run docs/real_mistral.md reports.)"""

    def __init__(self):
        super().__init__(daemon=True, name="minispec-mapped")
        self.jobs, self.done = queue.Queue(), queue.Queue()
        self.start()

    def run(self):
        while True:
            f, args = self.jobs.get()
            try:
                f(*args)
                self.done.put(None)
            except BaseException as e:     # handed to the caller, which raises it
                self.done.put(e)


_helpers, _helpers_pid = [], [os.getpid()]
_split_lock = threading.Lock()      # one split product at a time in a process (the helpers are shared)


def helpers(n):
    """n helper threads of this process. A child made by fork inherits the list but not the threads: it starts
    its own (else its first product would wait forever on threads that do not exist there)."""
    if _helpers_pid[0] != os.getpid():
        _helpers.clear()
        _helpers_pid[0] = os.getpid()
    while len(_helpers) < n:
        _helpers.append(Helper())
    return _helpers[:n]


class Workspace:
    """The float32 buffers of a model's mapped matrices (one buffer per thread; one matmul runs at a time).

    A matrix-vector product (x with one row per matrix, as decoding and `linear`'s per-row path make) widens
    blocks of GEMV_BLOCK_BYTES, THREADS at a time. A matrix-matrix product (a prefill chunk, a block of more than
    layers.GEMV_ROWS tokens) widens the WHOLE matrix into the buffer first: OpenBLAS's GEMM does not give
    bit-identical outputs when its right operand is cut into column blocks (its thread split and kernel choice
    depend on the sizes), and GEMM is compute-bound, so the extra pass is cheap there. The buffer then grows to
    the largest matrix (the output layer: V·D floats, 0.5 GB for Mistral 7B) and stays.
    """

    def __init__(self, threads=None):
        self.threads = THREADS if threads is None else threads
        self.flat = [np.empty(0, np.float32) for _ in range(self.threads)]

    @staticmethod
    def block_rows(n_in, n_out):
        """Output rows widened per block of an [out, in] matrix (the unit `split` hands out)."""
        return min(n_out, max(16, GEMV_BLOCK_BYTES // (4 * n_in) // 16 * 16))

    def buffer(self, rows, n_in, k=0):
        """Thread k's buffer as [rows, in] float32 (reused; grown when too small)."""
        if self.flat[k].size < rows * n_in:
            self.flat[k] = np.empty(rows * n_in, np.float32)
        return self.flat[k][:rows * n_in].reshape(rows, n_in)

    def split(self, n_in, n_out, work):
        """Run work(start, stop, k) once per block of output rows start..stop-1 of an [n_out, n_in] matrix
        (`block_rows` at a time) on the threads k = 0.. (0 is the caller), and return when all are done; an
        exception in any is raised. Blocks are handed out one at a time to whichever thread is free, so a core
        the hypervisor takes away for a while (on a shared VM) does not hold up the rest."""
        rows = self.block_rows(n_in, n_out)
        blocks = -(-n_out // rows)
        n = min(self.threads, blocks)
        taken, lock = [0], threading.Lock()

        def run(k):
            while True:
                with lock:
                    b = taken[0]
                    taken[0] += 1
                if b >= blocks:
                    return
                work(b * rows, min(n_out, (b + 1) * rows), k)

        with _split_lock:
            others = helpers(n - 1)
            for k, h in enumerate(others, 1):
                h.jobs.put((run, (k,)))
            errors = []
            try:
                run(0)
            except BaseException as e:
                errors.append(e)
            errors += [e for e in (h.done.get() for h in others) if e is not None]   # wait for all, always
        if errors:
            raise errors[0]


class MappedMatrix:
    """A weight used as an (in, out) float32 matrix, `x @ w`, whose storage is 16-bit [out, in] parts in files.

    parts: Tensor16 matrices stacked along the output (wq | wk | wv fused, as the widened path fuses them).
    `x @ w` for x [..., in] returns float32 [..., out] computed block by block of output rows, each block the same
    product (same BLAS call on the same transposed layout) the widened path makes on the whole matrix.
    """
    __array_ufunc__ = None          # make NumPy hand `x @ w` to __rmatmul__ instead of converting w

    def __init__(self, parts, workspace):
        self.parts, self.ws = list(parts), workspace
        self.n_in = self.parts[0].shape[1]
        self.n_out = sum(p.shape[0] for p in self.parts)
        self.shape, self.ndim, self.dtype = (self.n_in, self.n_out), 2, np.dtype(np.float32)
        self.size = self.n_in * self.n_out
        self.nbytes = sum(p.nbytes for p in self.parts)                     # bytes read per use (16-bit)
        self.passes = 0             # widening passes over the whole matrix: one per product

    def __rmatmul__(self, x):
        """x [..., in] @ self -> [..., out] float32."""
        y = np.empty(x.shape[:-1] + (self.n_out,), np.float32)               # [..., out]
        if x.ndim == 1 or x.shape[-2] == 1:
            self.products(x.reshape(-1, self.n_in), y.reshape(-1, self.n_out))
        else:
            self.product(x, y)
        self.passes += 1
        return y

    def products(self, x, y):
        """y[t] = x[t] @ self for each row t of x [P, in] -> y [P, out]: one gemv per row on each widened block
        (a verification block of T <= layers.GEMV_ROWS tokens arrives here as T rows of one), so a block is
        widened once whatever P is, and each row gets exactly the dot products a one-row decode step gets."""
        def work(s, e, k):
            buf = self.widen_rows(s, e, self.ws.buffer(e - s, self.n_in, k))       # [rows, in] float32, in cache
            for t in range(x.shape[0]):
                np.dot(buf, x[t], out=y[t, s:e])                                 # [rows] (gemv, releases the GIL)

        with one_blas_thread():
            self.ws.split(self.n_in, self.n_out, work)

    def product(self, x, y):
        """y = x @ self for x [..., T, in] with T > 1: the whole matrix widened (the threads share the rows), then
        one GEMM with BLAS's own threads."""
        buf = self.ws.buffer(self.n_out, self.n_in)                           # [out, in] float32
        self.ws.split(self.n_in, self.n_out, lambda start, stop, k: self.widen_rows(start, stop, buf[start:stop]))
        np.matmul(x, buf.T, out=y)                                            # [..., T, out]

    def widen_rows(self, start, stop, out):
        """Rows start..stop-1 of the fused [out, in] matrix (they may span parts) into out [stop - start, in]."""
        j = 0
        for p in self.parts:
            lo, hi = max(start, j), min(stop, j + p.shape[0])
            if lo < hi:
                p.widen_rows(lo - j, hi - j, out[lo - start:hi - start])
            j += p.shape[0]
        return out

    def __array__(self, dtype=None, copy=None):
        """The whole (in, out) matrix widened: a full float32 copy (what code that needs an array gets)."""
        w = np.concatenate([p.widen() for p in self.parts]).T
        return w if dtype is None else w.astype(dtype)

    def copy(self):
        return np.ascontiguousarray(np.asarray(self))                        # [in, out] float32

    def __getitem__(self, key):
        return np.asarray(self)[key]


class MappedRows:
    """The embedding table left in its file: `emb[ids]` widens only the rows asked for.   ids [T] -> [T, D]"""

    def __init__(self, tensor):
        self.tensor = tensor
        self.shape, self.ndim, self.dtype = tensor.shape, 2, np.dtype(np.float32)
        self.size, self.nbytes = tensor.size, tensor.nbytes

    def __getitem__(self, ids):
        ids = np.asarray(ids).reshape(-1)
        rows = ids if self.tensor.rows is None else self.tensor.rows[ids]
        src = self.tensor.data[rows]                                        # [T, D] 16-bit
        if self.tensor.name is not None:
            self.tensor.check_rows(src, 0)                                  # the rows looked up (ids, not 0..)
        return Tensor16(src, self.tensor.kind).widen()                      # [T, D]

    def __array__(self, dtype=None, copy=None):
        w = self.tensor.widen()
        return w if dtype is None else w.astype(dtype)
