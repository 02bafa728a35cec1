"""Mapped 16-bit weights: a 7B checkpoint that stays in its bf16 file and is widened block by block when used.

A Mistral 7B in float32 is 29 GB; its bf16 file is 14.5 GB. On a CPU, `Model(..., weights="mapped")` keeps each
matrix in the memory-mapped file (`weights.Tensor16`, [out, in] as stored) and widens it to float32 only inside a
matmul, a block of output rows at a time, into one reused buffer sized for the cache, right before the block's
product. Private memory is then the buffer, the cache and the activations, not the weights; the page cache holds
the file and is shared and reclaimable.

Why per block of OUTPUT rows: output j of `x @ W.T` is the dot product of x with row j of W, so computing the
outputs block by block does exactly the same floating-point operations as one product with the whole widened
matrix — the logits are bit-identical to the widened path, which stores its float32 matrices [out, in] the same
way (tests/test_mapped.py checks it bit for bit). Why small blocks: a block widened just before its product is
still in cache when BLAS reads it, so the memory traffic is one read of the 16-bit bytes; widening a whole matrix
first would write and re-read twice its size in float32 from DRAM.

A block of T rows is widened once for all T rows: a prefill chunk or a verification block widens each matrix
once (`MappedMatrix.passes` counts), which is why verifying T tokens costs about one decode step here for small
T (docs/real_mistral.md).
"""
import contextlib

import numpy as np

from .weights import Tensor16

# float32 bytes of one widened block for a matrix-vector product: it stays in L2 while gemv reads it. Rows per
# block are a multiple of 16 so that BLAS's gemv kernel (4 or 8 rows at a time) splits a block's outputs the way
# it splits the whole matrix's; each output is one dot product either way (checked bit for bit in the tests).
GEMV_BLOCK_BYTES = 1 << 20


_blas = []


def one_blas_thread():
    """A context in which OpenBLAS runs single-threaded (threadpoolctl, where installed). The block products are
    1 MB matrix-vector calls: waking a second BLAS thread for each costs more than it saves, and on a shared VM
    it stalls (measured here: a T=1 step of a mapped 93 M-parameter model took 0.14-0.27 s of CPU with 2 BLAS
    threads, 0.03 s with 1). Each output is still one dot product, so the logits do not change."""
    if not _blas:
        try:
            from threadpoolctl import ThreadpoolController
            _blas.append(ThreadpoolController())
        except ImportError:
            _blas.append(None)
    return _blas[0].limit(limits=1, user_api="blas") if _blas[0] is not None else contextlib.nullcontext()


class Workspace:
    """One float32 buffer shared by all mapped matrices of a model (one matmul runs at a time).

    A matrix-vector product (x with one row per matrix, as decoding and `linear`'s per-row path make) widens
    blocks of GEMV_BLOCK_BYTES. A matrix-matrix product (a prefill chunk, a block of more than
    layers.GEMV_ROWS tokens) widens the WHOLE matrix into the buffer first: OpenBLAS's GEMM does not give
    bit-identical outputs when its right operand is cut into column blocks (its thread split and kernel choice
    depend on the sizes), and GEMM is compute-bound, so the extra pass is cheap there. The buffer then grows to
    the largest matrix (the output layer: V·D floats, 0.5 GB for Mistral 7B) and stays.
    """

    def __init__(self):
        self.flat = np.empty(0, np.float32)

    @staticmethod
    def block_rows(n_in, n_out, x_rows):
        """Output rows widened per block for a product whose left operand has x_rows rows per matrix."""
        if x_rows == 1:
            return min(n_out, max(16, GEMV_BLOCK_BYTES // (4 * n_in) // 16 * 16))
        return n_out

    def buffer(self, rows, n_in):
        if self.flat.size < rows * n_in:
            self.flat = np.empty(rows * n_in, np.float32)
        return self.flat[:rows * n_in].reshape(rows, n_in)                 # [rows, in] float32, reused


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
        x_rows = x.shape[-2] if x.ndim > 1 else 1
        rows = self.ws.block_rows(self.n_in, self.n_out, x_rows)
        with one_blas_thread() if x_rows == 1 else contextlib.nullcontext():
            for s in range(0, self.n_out, rows):
                e = min(s + rows, self.n_out)
                buf = self.widen_rows(s, e, self.ws.buffer(e - s, self.n_in))  # [rows, in] float32, in cache
                y[..., s:e] = x @ buf.T                                       # [..., rows]
        self.passes += 1
        return y

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
