"""Hydra and Hydra++ draft heads (Ankner et al. 2024, arXiv 2402.05109, "Hydra: Sequentially-Dependent Draft
Heads for Medusa Decoding"): one head's forward, Hydra++'s prefix attention layer and the HydraHeads of a
model. The proposer that walks a tree with them (the grounded proposal) is in hydra.py.

Medusa's head k guesses the token at t+k+2 from h_t alone. Hydra's head i (0-based) also reads the tokens
already on the path (the paper's Hydra heads; section numbers are not cited here, see docs/hydra.md):

    a_i = concat(h_t, E(x_{t+1}), ..., E(x_{t+i+1}))                        [(i+2)·D]
    y_1 = res_i(a_i) + silu(a_i W_1 + b_1)                                  [D]   block 1: width (i+2)D -> D
    y_l = y_{l-1} + silu(y_{l-1} W_l + b_l)      (l = 2 .. num_layers)      [D]
    logits_i = y_L P_i + c_i                                                [V]   (shared output: y_L W_out)

h_t is the base model's final-norm hidden state, E the base model's own embedding table, x_{t+1} the root
(the base model's own next token, already chosen) and x_{t+2} ... the tokens drafted along the path. W_1 starts
at zero, res_i is a learned Linear((i+2)D -> D), P_i starts as a copy of the base output layer.

Shared output layer (minispec's own variant, like Medusa's "v2"; `HydraHeads(..., shared_output=True)`): every
head's projection IS the base model's frozen output layer W_out [D, V] (the same array, not a copy) and there is
no bias c_i, so a head owns only its blocks. One [D, V] matrix serves the heads and the verifier alike: on a CPU
whose cache holds the model, a proposal no longer reads a private 192 x 4096 projection per head call.

Hydra++ (the paper's tuned recipe with a prefix attention layer, zankner/Hydra's head arch "prefix-mlp")
replaces h_t by the output of one extra decoder layer run over the base model's final-norm hidden states: here one Mistral
decoder layer (GQA, RoPE, the model's sliding window) followed by an RMSNorm, with its own rolling cache that
only ever holds committed (accepted) positions.

Parameters, minispec layout: host or device arrays in the model's dtype, (in, out) orientation, so x @ w.
Head i (HydraHeads.heads[i], a dict), L = num_layers, I = (i+2)·D:
    "res_w" [I, D]   "res_b" [D]            res_i, block 1's residual projection
    "w1"    [I, D]   "b1"    [D]            block 1's linear (zero at init)
    "ws"    [L-1, D, D]  "bs" [L-1, D]      blocks 2..L, each its own weights (see "shared blocks" below)
    "proj_w" [D, V]  "proj_b" [V]           the vocabulary projection with its bias (shared output: "proj_w"
                                            is the model's output layer itself and there is no "proj_b")
Prefix layer (HydraHeads.prefix, a dict, None for plain Hydra), the layout of minispec.mistral.model's layers:
    "attention_norm" [D]   "wqkv" [D, (H + 2Hkv)·Dh] (q | k | v columns)   "wo" [H·Dh, D]
    "ffn_norm" [D]         "w13" [D, 2F] (w1 | w3 columns)                  "w2" [F, D]
    "norm" [D]             the final RMSNorm
The file formats (minispec's and zankner/Hydra's, both with zankner/Hydra's tensor names) are in hydra_files.py.

Decoding on a CPU, block 1 is looked up instead (`BlockOneTables`): the path's embeddings enter it linearly, so
what each token adds to it is a row of a table made once, and a head call reads only block 1's h part.

Shared blocks. zankner/Hydra builds blocks 2..L of a head as `[ResBlock(D)] * (L - 1)`: one module object
repeated, so those blocks share a single weight matrix. minispec gives every block its own weights, the
ordinary reading of an L-layer MLP (and what 4 layers buy in capacity); a shared-weight file from zankner/Hydra
loads as independent blocks holding equal copies (the same function), and writing Hydra's format refuses a
head whose blocks 2..L differ, since Hydra would silently keep only one of them.
"""

from pathlib import Path

import numpy as np

from ..backend import array_module
from ..errors import UserError
from ..mistral.layers import linear, rms_norm, rope_tables, silu
from ..mistral.model import attention_sublayer, block_mask, mlp_sublayer, new_cache, prefill_chunks
from .head_vocab import slice_columns

ARCHS = ("mlp", "prefix-mlp")          # zankner/Hydra's hydra_head_arch values: Hydra, Hydra++
KIND_ARCH = {"hydra": "mlp", "hydra++": "prefix-mlp"}


# ---------------------------------------------------------------------------------------------------------
# One head's forward (the Hydra head equation above)
# ---------------------------------------------------------------------------------------------------------
def head_input_width(i, D):
    """Width of head i's input: h_t and the embeddings of the root and of i drafted tokens, (i + 2)·D."""
    return (i + 2) * D


def head_forward(p, a, keep=False):
    """Hydra head on a batch: a [B, (i+2)·D] = concat(h_t, E(x_{t+1}), ..., E(x_{t+i+1})) -> logits [B, V].

    keep=True also returns what a backward pass needs: {"a": a, "r": res_i(a) [B, D], "z": [z_1 .. z_L]
    (pre-activations, each [B, D]), "y": [y_1 .. y_L] (block outputs, each [B, D]; y_L feeds the projection)}.
    """
    r = linear(a, p["res_w"]) + p["res_b"]                                   # [B, D] res_i(a)
    z = linear(a, p["w1"]) + p["b1"]                                         # [B, D]
    y = r + silu(z)                                                          # [B, D] block 1
    zs, ys = [z], [y]
    logits = head_tail(p, y, zs, ys)                                         # [B, V]
    return (logits, {"a": a, "r": r, "z": zs, "y": ys}) if keep else logits


def head_tail(p, y, zs=None, ys=None):
    """Blocks 2..L and the projection of a head, from block 1's output y [B, D] -> logits [B, V]; zs, ys: lists
    that get each block's pre-activation and output appended (for a backward pass)."""
    for W, b in zip(p["ws"], p["bs"]):
        z = linear(y, W) + b                                                 # [B, D]
        y = y + silu(z)                                                      # [B, D] blocks 2..L
        if zs is not None:
            zs.append(z)
            ys.append(y)
    logits = linear(y, p["proj_w"])                                          # [B, V]
    if "proj_b" in p:                                                        # no bias with a shared output layer
        logits += p["proj_b"]
    return logits


def init_head(model, i, num_layers, rng=None, scale=0.0, shared_output=False):
    """Head i before training: W_1 = 0 and blocks 2..L zero (silu(0) = 0: blocks 2..L are the identity), c_i = 0,
    P_i = the base output layer, res_i = [I_D; 0] (it passes h_t through; zankner/Hydra leaves res_i at torch's
    random default init instead) plus `scale` times standard normal noise drawn from rng. shared_output: P_i is
    the model's output layer itself (not a copy) and the head has no bias."""
    xp, dt, D, V = model.xp, model.dtype, model.config.dim, model.config.vocab_size
    I = head_input_width(i, D)
    res_w = np.zeros((I, D))
    res_w[:D] = np.eye(D)
    if scale:
        res_w += scale * (rng or np.random.default_rng(i)).standard_normal((I, D))
    put = lambda a: xp.asarray(np.asarray(a, dtype=dt))                      # noqa: E731
    p = {"res_w": put(res_w), "res_b": xp.zeros(D, dt),                      # [I, D], [D]
         "w1": xp.zeros((I, D), dt), "b1": xp.zeros(D, dt),                  # [I, D], [D]
         "ws": xp.zeros((num_layers - 1, D, D), dt), "bs": xp.zeros((num_layers - 1, D), dt)}
    if shared_output:
        return dict(p, proj_w=model.output)                                  # [D, V], the model's own
    return dict(p, proj_w=model.output.copy(), proj_b=xp.zeros(V, dt))      # [D, V], [V]


# ---------------------------------------------------------------------------------------------------------
# Block 1 as a lookup: what the path's tokens add to it depends on the tokens alone (a CPU's fast path)
# ---------------------------------------------------------------------------------------------------------
TABLE_BUDGET = 128 * 2**20     # bytes the tables of one set of heads may take (all heads); larger: no tables


class BlockOneTables:
    """Block 1 of every head without reading its [(i+2)·D, D] matrices at each call.

    Block 1 reads a = concat(h, E(x_1), ..., E(x_{i+1})) through res_i and W_1. Put their matrices side by side,
    U_i = ["res_w" | "w1"] [(i+2)·D, 2D] with bias ["res_b" | "b1"] [2D], and cut U_i into its D-row slices
    U_i^0 .. U_i^(i+1):

        a U_i = h U_i^0 + sum_j E(x_j) U_i^j          (j = 1 .. i+1: the root, then the drafted tokens)

    E(x) U_i^j depends on the token x alone, so it is a row of a table T_i^j = E U_i^j [V, 2D], made once. A head
    call then reads U_i^0 [D, 2D] and i + 1 table rows, not all of U_i: 1 / (i + 2) of block 1's weights. The sum
    runs in another order than the matmul, so the pre-activations agree to rounding (tests/test_hydra.py), not
    bit for bit; the verifier decides what is emitted either way. The price is memory: one [V, 2D] table per
    (head, slot), 10 for 4 heads, made for a head the first time it runs (the shipped model's 4 heads would take
    62.9 MB; its CPU tree, a chain of 3, runs heads 0-2, 6 tables, 37.7 MB). `HydraHeads.tables()` gives them
    on NumPy when all would fit TABLE_BUDGET, else None (a GPU, a large vocabulary: the matmuls run as written).

    Weights that change after the tables were made (a head trained further in place, an array replaced) would
    leave them stale, so each call compares the head's block-1 arrays (which arrays, and SAMPLES of their
    entries, spread over each) with those the tables were made from, and remakes that head's tables if any
    differ."""

    SAMPLES = 16

    def __init__(self, embed, D):
        self.embed, self.D, self.built = embed, D, {}          # built: head i -> (key, U_i^0, bias, tables)
        self.spots = {}                                         # array size -> the positions sampled in it

    @staticmethod
    def nbytes(heads):
        """The bytes all heads' tables would take: K(K+1)/2 tables of [V, 2D] in the heads' dtype."""
        K, D = heads.K, heads.D
        return K * (K + 1) // 2 * heads.model_config.vocab_size * 2 * D * heads.embed.dtype.itemsize

    def samples(self, p):
        """SAMPLES entries of each of head p's block-1 arrays, evenly spread over it.   -> [4 · SAMPLES]"""
        arrays = (p["res_w"], p["w1"], p["res_b"], p["b1"])
        return np.concatenate([a.reshape(-1)[self.where(a.size)] for a in arrays])

    def where(self, size):
        """The flat positions sampled in an array of `size` entries (computed once per size)."""
        if size not in self.spots:
            self.spots[size] = np.linspace(0, size - 1, self.SAMPLES).astype(np.int64)
        return self.spots[size]

    def head(self, i, p):
        """Head i's (U_i^0 [D, 2D], bias [2D], [T_i^1 .. T_i^(i+1)] each [V, 2D]) for its parameters p, made on
        first use and again when p's block-1 weights are not those they were made from."""
        ids, picks = (id(p["res_w"]), id(p["w1"]), id(p["res_b"]), id(p["b1"])), self.samples(p)
        have = self.built.get(i)
        if have is None or have[0][0] != ids or not (have[0][1] == picks).all():
            E, D, xp = self.embed, self.D, array_module(p["w1"])
            U = xp.concatenate([p["res_w"], p["w1"]], axis=1)                                 # [(i+2)D, 2D]
            slots = [xp.ascontiguousarray(E @ U[j * D:(j + 1) * D]) for j in range(1, i + 2)]  # i+1 x [V, 2D]
            self.built[i] = ((ids, picks), xp.ascontiguousarray(U[:D]), xp.concatenate([p["res_b"], p["b1"]]),
                             slots)
        return self.built[i][1:]

    def block1(self, i, p, h, paths):
        """Block 1's output y_1 = res_i(a) + silu(a W_1 + b_1) [B, D] of head i (parameters p) on the rows whose
        paths are paths [B, i+1] (host int64 token ids: the root, then the i drafted tokens), all reading h [D]."""
        Uh, bias, slots = self.head(i, p)
        u = linear(h[None], Uh) + bias                                          # [1, 2D] the part all rows share
        for j, table in enumerate(slots):
            u = u + table[paths[:, j]]                                          # [B, 2D]
        return u[:, :self.D] + silu(u[:, self.D:])                              # [B, D]


# ---------------------------------------------------------------------------------------------------------
# Hydra++'s prefix attention layer: one Mistral decoder layer + RMSNorm over base hidden states
# ---------------------------------------------------------------------------------------------------------
def init_prefix(model, rng=None, scale=0.02):
    """A prefix layer with random projections (std `scale`) and unit norms (HF's init for a Mistral layer)."""
    c, xp, dt = model.config, model.xp, model.dtype
    D, H, Hkv, Dh, F = c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.hidden_dim
    rng = rng or np.random.default_rng(0)
    put = lambda shape: xp.asarray((scale * rng.standard_normal(shape)).astype(dt))   # noqa: E731
    return {"attention_norm": xp.ones(D, dt), "wqkv": put((D, (H + 2 * Hkv) * Dh)), "wo": put((H * Dh, D)),
            "ffn_norm": xp.ones(D, dt), "w13": put((D, 2 * F)), "w2": put((F, D)), "norm": xp.ones(D, dt)}


def new_prefix_cache(model, chunk=None):
    """The prefix layer's own rolling cache: 1 layer, the base model's Hkv, Dh and window."""
    return new_cache(model.config, 1, model.xp, model.dtype, chunk)


def prefix_forward(p, config, x, cache=None, keep=False, last=False):
    """The prefix layer over base final-norm hidden states x [T, D] -> [T, D] (Hydra++'s prefix attention): the
    base model's own decoder-layer functions (minispec.mistral.model attention_sublayer, mlp_sublayer,
    block_mask) on the prefix layer's weights, then its final RMSNorm.

    Without a cache: the whole sequence at positions 0 .. T-1 under the causal sliding-window mask.
    With a cache: positions cache.pos .. cache.pos + T - 1 against the committed slots; the block's keys and
    values wait in scratch, as in Model.forward_block: call cache.commit() to keep them (`prefix_advance` does).
    last=True: the output of the last row alone, [1, D] (every row's keys and values are still made); the
    heads read the layer at the last committed position only, and it is the only layer, so nothing else reads
    the other rows' outputs. keep=True also returns the intermediates a backward needs: attention_sublayer's and
    mlp_sublayer's, and "x1" (after attention), "x2" (after the FFN, before the final norm).
    """
    c, xp = config, array_module(x)
    pos = (cache.pos if cache is not None else 0) + np.arange(x.shape[0])       # [T]
    mask = xp.asarray(block_mask(pos, cache, c.sliding_window))                  # [T, C + T] or [T, T]
    cos, sin = rope_tables(pos, c.head_dim, c.rope_theta, xp, x.dtype)           # [T, Dh/2]
    if cache is not None:
        cache.begin_block(x.shape[0])
    x1, att = attention_sublayer(p, c, x, cos, sin, mask, cache, 0, keep=True, last=last)   # [T or 1, D]
    x2, ffn = mlp_sublayer(p, c, x1, keep=True)                                  # [T or 1, D]
    out = rms_norm(x2, p["norm"], c.norm_eps)                                    # [T or 1, D]
    return (out, dict(att, **ffn, x1=x1, x2=x2)) if keep else out


def prefix_advance(p, config, x, cache):
    """Run committed positions x [T, D] through the prefix layer and commit them all, chunk by chunk as the
    model's prefill does (minispec.mistral.model.prefill_chunks). Returns the output at the last position, [D]:
    the only one the heads read (so each chunk runs `prefix_forward(..., last=True)`: every row's keys and
    values, and the rest of the layer for its last row alone)."""
    for s, e in prefill_chunks(x.shape[0], cache):
        out = prefix_forward(p, config, x[s:e], cache, last=True)                # [1, D]
        cache.commit()
    return out[0]


# ---------------------------------------------------------------------------------------------------------
# The heads of one model
# ---------------------------------------------------------------------------------------------------------
class HydraHeads:
    """K Hydra heads (arch "mlp") or Hydra++ heads (arch "prefix-mlp": + the prefix layer) on a model's device.

    heads: list of K parameter dicts (module docstring); prefix: the prefix layer's dict or None; embed: the base
    model's embedding table [V, D] (shared, not owned); model_config: the base model's MistralConfig (its D, V, and
    the prefix layer's shapes); choices / choices_cuda: stored trees (Medusa's choices)
    for the CPU and for GPUs; accuracies [K][k]: the measured top-k accuracies they were built from.
    shared_output: every head's projection is the model's output layer (set here: the head dicts must have no
    "proj_b"; their "proj_w", if any, is replaced by model.output)."""

    def __init__(self, heads, prefix, model, arch=None, choices=(), choices_cuda=None, accuracies=None,
                 shared_output=False):
        arch = arch or ("mlp" if prefix is None else "prefix-mlp")
        if arch not in ARCHS:
            raise UserError(f"Hydra head arch must be one of {ARCHS}, not {arch!r}")
        if (prefix is None) != (arch == "mlp"):
            raise UserError(f"Hydra arch {arch!r}: " + ("needs a prefix layer" if prefix is None
                                                         else "has no prefix layer"))
        self.heads, self.prefix, self.arch = list(heads), prefix, arch
        self.shared_output = bool(shared_output)
        if self.shared_output:
            if any("proj_b" in p for p in self.heads):
                raise UserError("Hydra heads with a shared output layer have no projection bias (proj_b)")
            self.heads = [dict(p, proj_w=model.output) for p in self.heads]           # [D, V], the model's own
        self.model_config, self.embed, self.xp = model.config, model.tok_embeddings, model.xp
        self.choices = [list(map(int, c)) for c in choices]
        self.choices_cuda = [list(map(int, c)) for c in choices_cuda] if choices_cuda else None
        self.accuracies = accuracies
        self.base_model = Path(model.path).name if getattr(model, "path", None) else None
        self.keep = None                # restricted heads (head_vocab.py): the token id of each logit [M], host
        self.table_budget = TABLE_BUDGET                # `tables`: the most bytes the first-block tables may take
        self._shared = {}               # what restricted copies share with these heads: their tables

    @property
    def K(self):
        return len(self.heads)

    @property
    def L(self):
        return 1 + self.heads[0]["ws"].shape[0]

    @property
    def D(self):
        return self.model_config.dim

    @property
    def V(self):
        return self.model_config.vocab_size if self.keep is None else len(self.keep)

    @property
    def kind(self):
        return "hydra" if self.arch == "mlp" else "hydra++"

    @classmethod
    def create(cls, model, num_heads=4, num_layers=1, arch="mlp", seed=0, shared_output=False):
        """Untrained heads (init_head for each head; a random prefix layer for "prefix-mlp"); shared_output: heads
        whose projection is the model's output layer."""
        if num_heads < 1 or num_layers < 1:
            raise UserError(f"Hydra: need num_heads >= 1 and num_layers >= 1, got {num_heads}, {num_layers}")
        rng = np.random.default_rng(seed)
        heads = [init_head(model, i, num_layers, shared_output=shared_output) for i in range(num_heads)]
        prefix = init_prefix(model, rng) if arch == "prefix-mlp" else None
        return cls(heads, prefix, model, arch, shared_output=shared_output)

    def restricted(self, keep):
        """These heads drafting only among the tokens keep [M] (host int64, sorted; head_vocab.py): every head's
        projection [D, M] and bias [M] sliced to those columns; the blocks and the prefix layer are shared (a
        shared output layer is sliced once, and the heads share the slice)."""
        out = object.__new__(HydraHeads)
        out.__dict__.update(self.__dict__)
        if self.shared_output:
            w = slice_columns(self.xp, self.heads[0]["proj_w"], keep)                  # [D, M]
            out.heads = [dict(p, proj_w=w) for p in self.heads]
        else:
            out.heads = [dict(p, proj_w=slice_columns(self.xp, p["proj_w"], keep),
                              proj_b=slice_columns(self.xp, p["proj_b"], keep)) for p in self.heads]
        out.keep = keep
        return out

    def logits(self, i, a):
        """Head i on a batch a [B, (i+2)·D] -> [B, V]."""
        return head_forward(self.heads[i], a)

    def tables(self):
        """The heads' BlockOneTables (shared with their restricted copies), or None: on a GPU, or where all of
        them would take more than `table_budget` bytes (TABLE_BUDGET; 0 turns them off)."""
        if self.xp is not np or BlockOneTables.nbytes(self) > self.table_budget:
            return None
        if "tables" not in self._shared:
            self._shared["tables"] = BlockOneTables(self.embed, self.D)
        return self._shared["tables"]

    def path_logits(self, i, h, paths):
        """Head i on the rows whose paths are paths [B, i+1] (host int64 token ids: the root, then the i tokens
        drafted before it on the row's path), all reading h [D] (h_t, or Hydra++'s prefix output) -> [B, V].
        Block 1 through the `tables` where there are any, else through the rows a = concat(h, E(path))."""
        tables = self.tables()
        if tables is not None:
            return head_tail(self.heads[i], tables.block1(i, self.heads[i], h, paths))       # [B, V]
        xp, B = self.xp, paths.shape[0]
        E = self.embed[xp.asarray(paths)].reshape(B, -1)                                     # [B, (i+1)·D]
        return head_forward(self.heads[i], xp.concatenate([xp.broadcast_to(h, (B, self.D)), E], axis=1))
