"""The rolling-buffer KV cache (Mistral 7B, arXiv 2310.06825, "Rolling Buffer Cache").

W slots per layer; the token at absolute position p lives in slot p % W, its key stored after RoPE, so a slot
is simply overwritten once its token has left every future query's window. Where the model has no sliding
window, W is the maximum sequence length and writing past it is an error instead of a wrap.

Speculation needs one more thing: a block of new tokens (a prefill chunk, a draft chain, a draft tree) is run
against the committed slots WITHOUT being written into them. Its keys and values go to a scratch area beside
the ring (the T rows after the ring's slots in the same buffer, so attention reads one contiguous range and
nothing is concatenated), and `commit(rows)` then copies only the chosen rows into their ring slots. A block
that is never committed leaves the ring bit-identical, also when its positions would have wrapped around it.

The ring is allocated as it fills: `capacity` slots, 0 at first, at least doubled by a commit that needs more,
until it holds all W (the scratch rows likewise grow with the longest block seen). Until then no position has
reached W, so slot p % W is p and lies inside; attention reads the slots written so far, not all W (for Mistral
7B, W = 4096 slots of 32 layers hold 1.07 GB in float32, which a 20-token prompt would otherwise read at every
step).
"""
import numpy as np

from ..errors import UserError


class RollingCache:
    def __init__(self, n_layers, n_kv_heads, head_dim, slots, xp, dtype, ring=True, chunk=None):
        self.W, self.ring, self.xp = slots, ring, xp
        self.L, self.Hkv, self.Dh = n_layers, n_kv_heads, head_dim
        self.pos = 0                         # committed tokens = the next token's absolute position
        self.block_len = 0                   # rows of the last block waiting in scratch
        self.offset = 0                      # scratch rows before the current block (a draft chain continued)
        self.chunk = chunk if chunk is not None else min(slots, 512)       # tokens per prefill chunk (at most)
        self.capacity = 0                    # ring slots allocated so far (grows to W; see the module's notes)
        self.scratch = 0                     # scratch rows allocated so far (grows with the longest block)
        shape = (n_layers, n_kv_heads, self.capacity + self.scratch, head_dim)   # [L, Hkv, capacity + scratch, Dh]
        self._k, self._v = xp.zeros(shape, dtype=dtype), xp.zeros(shape, dtype=dtype)

    def _resize(self, capacity, scratch):
        """New buffers with `capacity` ring slots and `scratch` rows; the ring and the last block's scratch rows
        (which a commit is about to copy, or a continued chain still reads) are copied over."""
        shape = (self.L, self.Hkv, capacity + scratch, self.Dh)
        k, v = self.xp.zeros(shape, dtype=self._k.dtype), self.xp.zeros(shape, dtype=self._v.dtype)
        C, S = self.capacity, self.scratch
        k[:, :, :C], v[:, :, :C] = self._k[:, :, :C], self._v[:, :, :C]
        n = min(self.block_len, S, scratch)
        k[:, :, capacity:capacity + n], v[:, :, capacity:capacity + n] = self._k[:, :, C:C + n], self._v[:, :, C:C + n]
        self._k, self._v, self.capacity, self.scratch = k, v, capacity, scratch

    def _grow_scratch(self, T):
        """Room for a block larger than any before (a big tree): at least twice the rows, so that a draft chain
        growing by one row a step reallocates only now and then."""
        self._resize(self.capacity, max(T, 2 * self.scratch))

    # ---- what a block forward reads -------------------------------------------------------------------------
    @property
    def keys(self):
        """The committed ring, [L, Hkv, capacity, Dh] (a view; capacity = W once the ring is full)."""
        return self._k[:, :, :self.capacity]

    @property
    def values(self):
        return self._v[:, :, :self.capacity]

    def slot_positions(self):
        """Absolute position held by each slot, -1 for a slot never written.   -> int64 [capacity] (host)"""
        s = np.arange(self.capacity)
        if not self.ring:
            return np.where(s < self.pos, s, -1)
        last = self.pos - 1                                              # newest committed position
        p = last - ((last - s) % self.W)                                 # the latest p <= last with p % W == s
        return np.where(p >= 0, p, -1)

    def ring_positions(self):
        """slot_positions() over all W slots, -1 also for the slots not allocated yet.   -> int64 [W] (host)"""
        out = np.full(self.W, -1)
        out[:self.capacity] = self.slot_positions()
        return out

    def begin_block(self, T, offset=0):
        """Make room for a block of T rows in scratch (called once per block forward). offset > 0: the block
        continues the chain already in scratch rows 0..offset-1 and goes to rows offset..offset+T-1."""
        if offset + T > self.scratch:
            self._grow_scratch(offset + T)
        T += offset
        if not self.ring and self.pos + T > self.W:
            raise UserError(f"cache full: {self.pos} + {T} tokens exceed max_seq_len = {self.W} "
                             f"(the model has no sliding window, so the cache cannot wrap)")
        self.block_len, self.offset = T, offset

    def layer_kv(self, layer, T):
        """Ring + the block's scratch rows of one layer: [Hkv, capacity + offset + T, Dh] views for attention."""
        end = self.capacity + self.offset + T
        return self._k[layer, :, :end], self._v[layer, :, :end]

    def write_block(self, layer, k, v):
        """Put a block's keys/values [Hkv, T, Dh] in scratch (never in the ring)."""
        T, s = k.shape[1], self.capacity + self.offset
        self._k[layer, :, s:s + T] = k
        self._v[layer, :, s:s + T] = v

    # ---- commit -------------------------------------------------------------------------------------------------
    def commit(self, rows=None):
        """Copy block rows (indices into the last block, in order; default all) to the ring at the next positions.

        The rows must be the tokens that follow the committed ones, in order: a prefill chunk, or a draft's
        accepted root-to-node path. Their keys were computed at those positions, so nothing is recomputed.
        """
        rows = np.arange(self.block_len) if rows is None else np.asarray(rows, dtype=np.int64)
        n = len(rows)
        if n == 0:
            self.block_len = self.offset = 0
            return
        if rows.min() < 0 or rows.max() >= self.block_len:
            raise IndexError(f"commit rows {rows.tolist()} outside the last block of {self.block_len} rows")
        if n > self.W:          # only the last W rows can still be seen; the ring keeps those
            rows, skipped = rows[-self.W:], n - self.W
        else:
            skipped = 0
        if self.capacity < min(self.W, self.pos + n):                    # the ring grows (not yet full)
            self._resize(min(self.W, max(self.pos + n, 2 * self.capacity)), self.scratch)
        dest = (self.pos + skipped + np.arange(len(rows))) % self.W if self.ring else self.pos + np.arange(len(rows))
        src = self.capacity + rows
        xp = self.xp
        src_d, dest_d = xp.asarray(src), xp.asarray(dest)
        self._k[:, :, dest_d] = self._k[:, :, src_d]
        self._v[:, :, dest_d] = self._v[:, :, src_d]
        self.pos += n
        self.block_len = self.offset = 0

    def discard(self):
        """Forget the rows waiting in scratch (a draft's K/V); the ring is untouched."""
        self.block_len = self.offset = 0
