"""The Mistral forward pass, array by array (Mistral 7B, arXiv 2310.06825, "Architectural details"; Llama's
block structure).

    x = embed[ids]
    for each layer:  x += Wo · attention(rope(Wq · rms(x)), rope(Wk · rms(x)), Wv · rms(x))   (sliding window, GQA)
                     x += swiglu(rms(x))
    logits = output · rms(x)

`Model.forward(ids)` runs it over a whole sequence with no cache; `forward(ids, cache=c)` prefills or decodes
against a rolling cache (chunks of at most W tokens, each committed); `forward_block` is the primitive the
speculative decoders use: a block of tokens at given positions under a given mask (causal or tree), attending
to the committed cache plus the block, with the block's keys/values left in scratch until `cache.commit(rows)`.
"""
import sys
from dataclasses import dataclass

import numpy as np

from ..backend import resolve_device, to_device, to_host
from ..errors import UserError, check_token_ids, warn_if_past_max_positions
from .cache import RollingCache
from .layers import GEMV_ROWS, attention, linear, qkv_heads, rms_norm, rope_tables, sliding_window_mask, swiglu
from .mapped import MappedMatrix, MappedRows, Workspace, one_blas_thread
from .safetensors import Tensor16, bf16_to_float32
from .weights import load_config, load_tensors

DTYPES = {"float16": np.float16, "float32": np.float32, "float64": np.float64}
WEIGHTS = ("auto", "widened", "mapped")
FLOAT16_MAX = 65504.0


@dataclass
class BlockOutput:
    logits: object          # [T, V] on the model's device
    hidden: object          # [T, D] final-norm hidden states (what Medusa/Hydra heads read)


class Model:
    """Mistral weights on a device, kept [out, in] as the checkpoint stores them (a matmul reads a matrix as its
    transposed view, x @ W.T, so the (in, out) arrays the layers see need no transposed copy), fused where one
    matmul can do two. weights="widened": every matrix widened to the working dtype at load; "mapped" (CPU,
    float32): 16-bit matrices stay in their memory-mapped files and are widened block by block inside each matmul
    (minispec/mistral/mapped.py), with bit-identical logits; "auto": mapped when the widened model would not fit
    in the available memory. `model.storage` is the mode chosen, "widened" or "mapped". dtype="float16": weights
    and activations in float16, with RMSNorm statistics, softmax and the logits in float32 (the output matrix is
    kept in float32)."""

    def __init__(self, config, tensors, dtype="float32", device="auto", weights="auto"):
        if dtype not in DTYPES:
            raise UserError(f"dtype must be one of {list(DTYPES)}, not {dtype!r}")
        self.config, self.dtype = config, DTYPES[dtype]
        self.xp, self.device = resolve_device(device)
        c, xp = config, self.xp
        self.storage = choose_weights(weights, tensors, self.dtype, xp)     # how the matrices are kept
        ws = Workspace() if self.storage == "mapped" else None

        def put(name, dtype=self.dtype):     # a vector or the embedding table, in the working dtype on the device
            return to_working_dtype(xp, tensors[name], dtype, name)

        def put_t(*names, dtype=self.dtype):  # matrices [out, in] stacked along out, seen as (in, out): W.T views
            if ws is not None:
                return MappedMatrix([tensors[n] for n in names], ws)
            parts = [to_working_dtype(xp, tensors[n], dtype, n) for n in names]
            return (parts[0] if len(parts) == 1 else xp.concatenate(parts)).T

        emb = "tok_embeddings.weight"
        self.tok_embeddings = MappedRows(tensors[emb]) if ws is not None else put(emb)         # [V, D]
        self.norm = put("norm.weight")                                                         # [D]
        # float16: the logits come out of a float32 matrix (hidden [T, D] float16 @ [D, V] float32 -> float32)
        out_dtype = np.float32 if self.dtype == np.float16 else self.dtype
        self.output = put_t(emb if c.tie_embeddings else "output.weight", dtype=out_dtype)     # [D, V]
        self.layers = []
        for i in range(c.n_layers):
            p = f"layers.{i}."
            self.layers.append(dict(
                attention_norm=put(p + "attention_norm.weight"), ffn_norm=put(p + "ffn_norm.weight"),   # [D]
                wqkv=put_t(p + "attention.wq.weight", p + "attention.wk.weight",
                           p + "attention.wv.weight"),                                         # [D, (H+2Hkv)Dh]
                wo=put_t(p + "attention.wo.weight"),                                           # [H·Dh, D]
                w13=put_t(p + "feed_forward.w1.weight", p + "feed_forward.w3.weight"),         # [D, 2F]
                w2=put_t(p + "feed_forward.w2.weight")))                                       # [F, D]

    def weight_bytes(self):
        """Bytes of weights one decode step reads (every matrix once; the embedding table only a row)."""
        mats = [self.output, self.norm] + [w for lw in self.layers for w in lw.values()]
        return sum(int(w.nbytes) for w in mats)

    # ---- construction -------------------------------------------------------------------------------------------
    def new_cache(self, chunk=None):
        """An empty rolling cache: W = sliding_window slots per layer (max_seq_len where there is no window).
        chunk: tokens per prefill chunk, default min(W, 512) (a chunk's keys and values wait in scratch rows)."""
        return new_cache(self.config, self.config.n_layers, self.xp, self.dtype, chunk)

    # ---- the forward pass ---------------------------------------------------------------------------------------
    def forward(self, ids, cache=None, return_hidden=False, skip=None, warn_positions=True):
        """Logits [T, V] for ids [T]. Without a cache: one pass over the whole sequence (positions 0..T-1).
        With a cache: positions continue after the cache; processed in chunks of at most W, each committed.
        skip: a SkipSet (the Draft & Verify draft model: those attention / MLP sublayers are the identity; a
        cache filled this way holds nothing valid at the skipped attention layers). warn_positions=False: no
        max_position_embeddings warning (`generate` gives one for the whole request)."""
        ids = check_token_ids(ids, self.config.vocab_size)                                    # [T] host int64
        start = 0 if cache is None else cache.pos
        if warn_positions and start <= self.config.max_seq_len:     # once, on the call that crosses the limit
            warn_if_past_max_positions(start + len(ids), self.config.max_seq_len)
        if cache is None:
            pos = np.arange(len(ids))
            mask = block_mask(pos, None, self.config.sliding_window)                         # [T, T]
            out = self._run(ids, pos, self.xp.asarray(mask), cache=None, skip=skip)
            return (out.logits, out.hidden) if return_hidden else out.logits
        logits, hidden = [], []
        for s, e in prefill_chunks(len(ids), cache):
            out = self.forward_block(ids[s:e], cache, skip=skip)
            cache.commit()
            logits.append(out.logits)
            hidden.append(out.hidden)
        xp = self.xp
        logits = logits[0] if len(logits) == 1 else xp.concatenate(logits)
        hidden = hidden[0] if len(hidden) == 1 else xp.concatenate(hidden)
        return (logits, hidden) if return_hidden else logits

    def forward_block(self, ids, cache, depths=None, parents_mask=None, skip=None, offset=0):
        """Run a block of T tokens against the committed cache WITHOUT writing it (K/V wait in scratch).

        ids [T]; depths [T] (default 0..T-1): token t sits at position cache.pos + depths[t];
        parents_mask bool [T, T] (default causal): row t lists the block tokens t may see (its ancestors and
        itself, for a tree). The window applies on absolute positions, to cache slots and block tokens alike.
        Call `cache.commit(rows)` afterwards to keep some rows; otherwise the cache is unchanged.
        skip: a SkipSet or None (see _run). offset > 0 continues a chain already in scratch (Draft & Verify's
        one-token draft steps): the block goes to scratch rows offset.., sits at positions cache.pos + offset +
        depths, and also sees scratch rows 0..offset-1 (positions cache.pos..cache.pos + offset - 1).
        """
        ids = check_token_ids(ids, self.config.vocab_size)                                    # [T] host int64
        T = len(ids)
        depths = np.arange(T) if depths is None else np.asarray(to_host(depths), dtype=np.int64)
        block_visible = (np.tril(np.ones((T, T), bool)) if parents_mask is None
                         else np.asarray(to_host(parents_mask), bool))
        if depths.shape != (T,) or block_visible.shape != (T, T):
            raise UserError(f"forward_block: {T} ids need depths [{T}] and parents_mask [{T}, {T}], got "
                            f"{list(depths.shape)} and {list(block_visible.shape)}")
        q_pos = cache.pos + offset + depths                                                  # [T]
        mask = block_mask(q_pos, cache, self.config.sliding_window, block_visible, offset)   # [T, C + offset + T]
        cache.begin_block(T, offset)
        return self._run(ids, q_pos, self.xp.asarray(mask), cache, skip=skip)

    def _run(self, ids, positions, mask, cache, skip=None):
        """The layers. ids, positions: host int arrays [T]; mask [T, S] on the device; cache or None;
        skip: a SkipSet (minispec.decoders.draft_verify) or None — skip.attn[i] / skip.mlp[i] drop that sublayer."""
        if self.storage == "mapped" and len(ids) <= GEMV_ROWS:
            # The mapped products run on minispec's own threads (mapped.THREADS). BLAS's threads, woken by the
            # small attention products in between, would spin on the core the second of those needs (the cost
            # is measured in docs/real_mistral.md, "What it took"). Each result is the same either way.
            with one_blas_thread():
                return self._layers(ids, positions, mask, cache, skip)
        return self._layers(ids, positions, mask, cache, skip)

    def _layers(self, ids, positions, mask, cache, skip):
        c, xp = self.config, self.xp
        cos, sin = rope_tables(positions, c.head_dim, c.rope_theta, xp, self.dtype)         # [T, Dh/2]
        x = self.tok_embeddings[xp.asarray(ids)]                                             # [T, D]
        for i in range(c.n_layers):
            if skip is None or not skip.attn[i]:     # a skipped sublayer is the identity on x; writes no K/V
                x = self.attention_sublayer(i, x, cos, sin, mask, cache)                    # [T, D]
            if skip is None or not skip.mlp[i]:
                x = self.mlp_sublayer(i, x)                                                  # [T, D]
        return self.final(x)

    def attention_sublayer(self, i, x, cos, sin, mask, cache):
        """x + layer i's attention (module function attention_sublayer).   [T, D] -> [T, D]"""
        return attention_sublayer(self.layers[i], self.config, x, cos, sin, mask, cache, i)

    def mlp_sublayer(self, i, x):
        """x + layer i's SwiGLU feed-forward (module function mlp_sublayer).   [T, D] -> [T, D]"""
        return mlp_sublayer(self.layers[i], self.config, x)

    def final(self, x):
        """The final RMSNorm and the output layer.   x [T, D] -> BlockOutput(logits [T, V], hidden [T, D])"""
        hidden = rms_norm(x, self.norm, self.config.norm_eps)                                # [T, D]
        return BlockOutput(logits=linear(hidden, self.output), hidden=hidden)                # [T, V]


# ---- one decoder layer, for the model's layers and any layer built like them (Hydra++'s prefix layer) -------
def attention_sublayer(lw, config, x, cos, sin, mask, cache=None, layer=0, keep=False, last=False):
    """x + attention: RMSNorm, q/k/v with RoPE, the block's keys/values into the cache's scratch (with a cache:
    attention then reads layer `layer`'s ring + the block), attention under mask, Wo.   [T, D] -> [T, D]

    lw: one layer's weights {"attention_norm" [D], "wqkv" [D, (H+2Hkv)Dh], "wo" [H·Dh, D], ...}. keep=True also
    returns what a backward pass needs: {"x", "h1" (the normed input), "q", "k", "v" (after RoPE; with a cache
    k, v include the committed slots), "mask", "o" [H, T, Dh], "cos", "sin"}.
    last=True: the output of the last row alone, [1, D]. Every row's keys and values are still made (and
    written), but attention and Wo run for the last query only: what a stack's last layer needs when only its
    last row is read (Hydra++'s prefix layer), since a row's output feeds nothing but the layers above it."""
    c, T = config, x.shape[0]
    H, Hkv, Dh = c.n_heads, c.n_kv_heads, c.head_dim
    h = rms_norm(x, lw["attention_norm"], c.norm_eps)                                        # [T, D]
    q, k, v = qkv_heads(h, lw["wqkv"], cos, sin, H, Hkv, Dh)               # [H, T, Dh], [Hkv, T, Dh] x 2
    if cache is not None:
        cache.write_block(layer, k, v)
        k, v = cache.layer_kv(layer, T)                                                      # [Hkv, C + T, Dh]
    if last:
        x, q, mask, T = x[-1:], q[:, -1:], mask[-1:], 1                      # [1, D], [H, 1, Dh], [1, S]
    o = attention(q, k, v, mask)                                                             # [H, T, Dh]
    out = x + linear(o.transpose(1, 0, 2).reshape(T, H * Dh), lw["wo"])                     # [T, D]
    return (out, dict(x=x, h1=h, q=q, k=k, v=v, mask=mask, o=o, cos=cos, sin=sin)) if keep else out


def mlp_sublayer(lw, config, x, keep=False):
    """x + the SwiGLU feed-forward on RMSNorm(x).   [T, D] -> [T, D]; keep=True also returns {"h2": the normed
    input}."""
    h = rms_norm(x, lw["ffn_norm"], config.norm_eps)                                         # [T, D]
    out = x + swiglu(h, lw["w13"], lw["w2"])                                                 # [T, D]
    return (out, {"h2": h}) if keep else out


def block_mask(q_pos, cache, window, block_visible=None, offset=0):
    """Which keys a block of queries at positions q_pos [T] sees: [committed slots | scratch rows 0..offset-1 |
    the block], window applied on absolute positions; block_visible bool [T, T] (default causal) says which block
    rows each row may see (its ancestors, for a tree). Without a cache: the block alone.   -> bool [T, S] host"""
    T = len(q_pos)
    block_visible = np.tril(np.ones((T, T), bool)) if block_visible is None else block_visible
    own = block_visible & sliding_window_mask(q_pos, q_pos, window)                          # [T, T]
    if cache is None:
        return own
    prior = cache.pos + np.arange(offset)                                                    # [offset]
    return np.concatenate([sliding_window_mask(q_pos, cache.slot_positions(), window),      # [T, C] ring
                           sliding_window_mask(q_pos, prior, window), own], axis=1)         # [T, C + offset + T]


def new_cache(config, n_layers, xp, dtype, chunk=None):
    """An empty rolling cache for n_layers layers shaped like this config's: W = sliding_window slots per layer
    (max_seq_len where there is no window, and then it does not wrap); chunk: tokens per prefill chunk."""
    c = config
    return RollingCache(n_layers, c.n_kv_heads, c.head_dim, c.cache_slots, xp, dtype,
                        ring=c.sliding_window is not None, chunk=chunk)


def prefill_chunk(cache):
    """Tokens per prefill chunk: at most W (so a chunk never overwrites slots it still reads) and at most
    cache.chunk (512 unless the cache was made with chunk=; each chunk needs that many scratch rows)."""
    return min(cache.W, cache.chunk)


def prefill_chunks(n, cache):
    """(start, end) of each chunk of n tokens to run and commit one after another into cache."""
    step = prefill_chunk(cache)
    return [(s, min(s + step, n)) for s in range(0, n, step)]


# ---- weight storage -------------------------------------------------------------------------------------------
def proc_bytes(path, field):
    """The size on the `field:` line of a /proc file (given there in kB) in bytes; None where there is no /proc."""
    try:
        for line in open(path):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_memory():
    """MemAvailable from /proc/meminfo in bytes (None where there is no /proc)."""
    return proc_bytes("/proc/meminfo", "MemAvailable")


def choose_weights(weights, tensors, dtype, xp):
    """'widened' or 'mapped' for weights='auto' | 'widened' | 'mapped' (see Model)."""
    if weights not in WEIGHTS:
        raise UserError(f"weights must be one of {list(WEIGHTS)}, not {weights!r}")
    if weights == "widened":
        return weights
    wide = [k for k, t in tensors.items() if np.ndim(t) == 2 and not isinstance(t, Tensor16)]
    if weights == "mapped":
        if xp is not np:
            raise UserError("weights='mapped' is for the CPU (NumPy): on a GPU the weights live in device memory")
        if dtype != np.float32:
            raise UserError(f"weights='mapped' widens 16-bit blocks to float32: dtype must be 'float32', "
                             f"not {np.dtype(dtype).name!r}")
        if wide:
            raise UserError(f"weights='mapped' needs a bf16 or float16 checkpoint; tensor {wide[0]!r} is "
                             f"{np.asarray(tensors[wide[0]]).dtype} (or was not loaded lazily: use minispec.load)")
        return "mapped"
    if xp is not np or dtype != np.float32 or wide:
        return "widened"
    need = sum(t.size for t in tensors.values()) * 4
    avail = available_memory()
    if avail is not None and need > 0.75 * avail:
        print(f"minispec: the float32 weights ({need / 1e9:.1f} GB) would not fit in the available memory "
              f"({avail / 1e9:.1f} GB): keeping the 16-bit files mapped (weights='mapped')", file=sys.stderr)
        return "mapped"
    return "widened"


def to_working_dtype(xp, t, dtype, name):
    """A checkpoint tensor (array or Tensor16) as a contiguous `dtype` array on the device. 16-bit tensors go
    over as their 16 bits and are widened there. float16: a tensor whose values overflow it is refused."""
    if isinstance(t, Tensor16):
        bits = np.ascontiguousarray(t.data if t.rows is None else t.data[t.rows])        # reads the file
        if t.name is not None:      # every row is read now: refused at load, as a mapped row is at its first use
            t.check_rows(bits, 0)
        d = to_device(xp, bits)
        a = bf16_to_float32(d) if t.kind == "BF16" else d.astype(xp.float32)              # NumPy or CuPy
    else:
        a = to_device(xp, np.asarray(t))
    if dtype == np.float16 and a.dtype != np.float16:
        big = float(xp.abs(a).max()) if a.size else 0.0
        if big > FLOAT16_MAX:
            raise UserError(f"tensor {name!r}: max |w| = {big:.4g} does not fit float16 (max 65504); "
                             f"load this checkpoint with dtype='float32'")
    return xp.ascontiguousarray(a.astype(dtype, copy=False))


def load(path, dtype="float32", device="auto", weights="auto"):
    """A Model from a Hugging Face folder (config.json + safetensors) or a Mistral one (params.json +
    consolidated.safetensors). dtype: "float32" (default), "float64" or "float16"; device: "auto" | "cpu" |
    "cuda"; weights: "auto" | "widened" | "mapped" (see Model). Files are memory-mapped; nothing is read
    from a 16-bit file until a weight is widened."""
    config, layout = load_config(path)
    model = Model(config, load_tensors(path, config, layout, lazy16=True), dtype=dtype, device=device,
                  weights=weights)
    model.path = str(path)
    return model
