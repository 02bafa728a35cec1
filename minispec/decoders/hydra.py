"""Hydra and Hydra++ draft heads (Ankner et al. 2024, arXiv 2402.05109, "Hydra: Sequentially-Dependent Draft
Heads for Medusa Decoding") and the grounded tree proposal that makes them sequential.

Medusa's head k guesses the token at t+k+2 from h_t alone. Hydra's head i (0-based) also reads the tokens
already on the path (the paper's Hydra heads; section numbers are not cited here, see docs/hydra.md):

    a_i = concat(h_t, E(x_{t+1}), ..., E(x_{t+i+1}))                        [(i+2)·D]
    y_1 = res_i(a_i) + silu(a_i W_1 + b_1)                                  [D]   block 1: width (i+2)D -> D
    y_l = y_{l-1} + silu(y_{l-1} W_l + b_l)      (l = 2 .. num_layers)      [D]
    logits_i = y_L P_i + c_i                                                [V]

h_t is the base model's final-norm hidden state, E the base model's own embedding table, x_{t+1} the root
(the base model's own next token, already chosen) and x_{t+2} ... the tokens drafted along the path. W_1 starts
at zero, res_i is a learned Linear((i+2)D -> D), P_i starts as a copy of the base output layer.

Hydra++ (the paper's tuned recipe with a prefix attention layer, zankner/Hydra's head arch "prefix-mlp")
replaces h_t by the output of one extra decoder layer run over the base model's final-norm hidden states: here one Mistral
decoder layer (GQA, RoPE, the model's sliding window) followed by an RMSNorm, with its own rolling cache that
only ever holds committed (accepted) positions.

Parameters, minispec layout: host or device arrays in the model's dtype, (in, out) orientation, so x @ w.
Head i (HydraHeads.heads[i], a dict), L = num_layers, I = (i+2)·D:
    "res_w" [I, D]   "res_b" [D]            res_i, block 1's residual projection
    "w1"    [I, D]   "b1"    [D]            block 1's linear (zero at init)
    "ws"    [L-1, D, D]  "bs" [L-1, D]      blocks 2..L, each its own weights (see "shared blocks" below)
    "proj_w" [D, V]  "proj_b" [V]           the vocabulary projection with its bias
Prefix layer (HydraHeads.prefix, a dict, None for plain Hydra), the layout of minispec.mistral.model's layers:
    "attention_norm" [D]   "wqkv" [D, (H + 2Hkv)·Dh] (q | k | v columns)   "wo" [H·Dh, D]
    "ffn_norm" [D]         "w13" [D, 2F] (w1 | w3 columns)                  "w2" [F, D]
    "norm" [D]             the final RMSNorm
The file formats (minispec's and zankner/Hydra's, both with zankner/Hydra's tensor names) are in hydra_files.py.

Shared blocks. zankner/Hydra builds blocks 2..L of a head as `[ResBlock(D)] * (L - 1)`: one module object
repeated, so those blocks share a single weight matrix. minispec gives every block its own weights, the
ordinary reading of an L-layer MLP (and what 4 layers buy in capacity); a shared-weight file from zankner/Hydra
loads as independent blocks holding equal copies (the same function), and writing Hydra's format refuses a
head whose blocks 2..L differ, since Hydra would silently keep only one of them.
"""
import time
from pathlib import Path

import numpy as np

from ..backend import array_module, to_host
from ..errors import UserError
from ..mistral.layers import linear, rms_norm, rope_tables, silu
from ..mistral.model import attention_sublayer, block_mask, mlp_sublayer, new_cache, prefill_chunks
from ..speculative.costs import step_curve
from ..speculative.dynamic_tree import DynamicTrees, choose_calibration, refuse_dynamic_options, top_probs
from ..speculative.gate import make_gate
from ..speculative.loop import Context, Stats
from ..speculative.sampling import SamplingParams
from ..speculative.tree import Tree, proposer_tree
from ..speculative.verify import Draft, count
from .head_vocab import slice_columns, token_ids, vocab_heads
from .medusa import first_hidden, observe_gate, topk_ids

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
    for W, b in zip(p["ws"], p["bs"]):
        z = linear(y, W) + b                                                 # [B, D]
        y = y + silu(z)                                                      # [B, D] blocks 2..L
        zs.append(z)
        ys.append(y)
    logits = linear(y, p["proj_w"]) + p["proj_b"]                            # [B, V]
    return (logits, {"a": a, "r": r, "z": zs, "y": ys}) if keep else logits


def init_head(model, i, num_layers, rng=None, scale=0.0):
    """Head i before training: W_1 = 0 and blocks 2..L zero (silu(0) = 0: blocks 2..L are the identity), c_i = 0,
    P_i = the base output layer, res_i = [I_D; 0] (it passes h_t through; zankner/Hydra leaves res_i at torch's
    random default init instead) plus `scale` times standard normal noise drawn from rng."""
    xp, dt, D, V = model.xp, model.dtype, model.config.dim, model.config.vocab_size
    I = head_input_width(i, D)
    res_w = np.zeros((I, D))
    res_w[:D] = np.eye(D)
    if scale:
        res_w += scale * (rng or np.random.default_rng(i)).standard_normal((I, D))
    put = lambda a: xp.asarray(np.asarray(a, dtype=dt))                      # noqa: E731
    return {"res_w": put(res_w), "res_b": xp.zeros(D, dt),                   # [I, D], [D]
            "w1": xp.zeros((I, D), dt), "b1": xp.zeros(D, dt),               # [I, D], [D]
            "ws": xp.zeros((num_layers - 1, D, D), dt), "bs": xp.zeros((num_layers - 1, D), dt),
            "proj_w": model.output.copy(), "proj_b": xp.zeros(V, dt)}        # [D, V], [V]


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


def prefix_forward(p, config, x, cache=None, keep=False):
    """The prefix layer over base final-norm hidden states x [T, D] -> [T, D] (Hydra++'s prefix attention): the
    base model's own decoder-layer functions (minispec.mistral.model attention_sublayer, mlp_sublayer,
    block_mask) on the prefix layer's weights, then its final RMSNorm.

    Without a cache: the whole sequence at positions 0 .. T-1 under the causal sliding-window mask.
    With a cache: positions cache.pos .. cache.pos + T - 1 against the committed slots; the block's keys and
    values wait in scratch, as in Model.forward_block: call cache.commit() to keep them (`prefix_advance` does).
    keep=True also returns the intermediates a backward needs: attention_sublayer's and mlp_sublayer's, and
    "x1" (after attention), "x2" (after the FFN, before the final norm).
    """
    c, xp = config, array_module(x)
    pos = (cache.pos if cache is not None else 0) + np.arange(x.shape[0])       # [T]
    mask = xp.asarray(block_mask(pos, cache, c.sliding_window))                  # [T, C + T] or [T, T]
    cos, sin = rope_tables(pos, c.head_dim, c.rope_theta, xp, x.dtype)           # [T, Dh/2]
    if cache is not None:
        cache.begin_block(x.shape[0])
    x1, att = attention_sublayer(p, c, x, cos, sin, mask, cache, 0, keep=True)   # [T, D]
    x2, ffn = mlp_sublayer(p, c, x1, keep=True)                                  # [T, D]
    out = rms_norm(x2, p["norm"], c.norm_eps)                                    # [T, D]
    return (out, dict(att, **ffn, x1=x1, x2=x2)) if keep else out


def prefix_advance(p, config, x, cache):
    """Run committed positions x [T, D] through the prefix layer and commit them all, chunk by chunk as the
    model's prefill does (minispec.mistral.model.prefill_chunks). Returns the outputs [T, D]."""
    out = cache.xp.empty_like(x)                                                 # [T, D]
    for s, e in prefill_chunks(x.shape[0], cache):
        out[s:e] = prefix_forward(p, config, x[s:e], cache)
        cache.commit()
    return out


# ---------------------------------------------------------------------------------------------------------
# The grounded tree proposal (zankner/Hydra's `_grounded_proposal`, batched per depth)
# ---------------------------------------------------------------------------------------------------------
class TreePlan:
    """What the depth-by-depth walk needs of a Tree, computed once.

    For depth d = 0 .. max_depth - 1: parents[d] = node ids at depth d that have children (head d runs once on
    all of them), k[d] = the largest rank any of their children takes + 1, and for every node at depth d + 1
    its parent's row in that batch (row[d]) and its rank (rank[d]), with the node ids (nodes[d]). xp: the heads'
    array module; the index arrays the walk uses on the device are copied there once (`on_device`), not at
    every step."""

    def __init__(self, tree, xp=np):
        self.tree = tree
        self.parents, self.k, self.rows, self.ranks, self.nodes = [], [], [], [], []
        for d in range(tree.max_depth):
            par = np.array([n for n in range(tree.N) if tree.depths[n] == d and tree.children[n]], np.int64)
            kids = np.array([n for n in range(tree.N) if tree.depths[n] == d + 1], np.int64)
            where = {int(n): r for r, n in enumerate(par)}
            self.parents.append(par)
            self.nodes.append(kids)
            self.rows.append(np.array([where[int(tree.parents[n])] for n in kids], np.int64))
            self.ranks.append(tree.rank[kids].astype(np.int64))
            self.k.append(int(tree.rank[kids].max()) + 1)
        # per depth: the parents' node ids, the children's node ids, and each child's parent's node id
        self.on_device = [(xp.asarray(p), xp.asarray(n), xp.asarray(p[r]))
                          for p, n, r in zip(self.parents, self.nodes, self.rows)]


def grounded_proposal(heads, plan, h, root, stats=None):
    """Tokens [N] (host int64) of the tree, tokens[0] = root: walk the tree depth by depth; at depth d, head d
    runs ONCE on every parent at depth d that has children (a batch of rows concat(h, E(root), E(path))), and
    a parent's rank-r child takes that parent's rank-r token. h [D]: h_t (Hydra) or the prefix layer's output
    at the last committed position (Hydra++). Counts head calls, rows and seconds in stats.counters."""
    tree, E, xp = plan.tree, heads.embed, heads.xp
    D, N = heads.D, tree.N
    tokens = np.empty(N, dtype=np.int64)                                         # [N]
    tokens[0] = int(root)
    depth = len(plan.parents)
    feats = xp.empty((N, (depth + 1) * D), dtype=h.dtype)                        # [N, (max_depth+1)·D] a_i rows
    feats[0, :D] = h
    feats[0, D:2 * D] = E[int(root)]
    for d in range(depth):
        t0 = time.perf_counter()
        par, kids = plan.parents[d], plan.nodes[d]
        par_d, kids_d, kid_par_d = plan.on_device[d]
        logits = head_forward(heads.heads[d], feats[par_d, :(d + 2) * D])       # [B, V]
        top = to_host(topk_ids(logits, plan.k[d]))                               # [B, k]
        tokens[kids] = token_ids(heads, top[plan.rows[d], plan.ranks[d]])
        if d + 1 < depth:                    # a child's row: its parent's row, then E(child token)
            feats[kids_d, :(d + 2) * D] = feats[kid_par_d, :(d + 2) * D]
            feats[kids_d, (d + 2) * D:(d + 3) * D] = E[xp.asarray(tokens[kids])]
        if stats is not None:
            count(stats, "head_calls", 1)
            count(stats, "head_rows", len(par))
            count(stats, "head_time_s", time.perf_counter() - t0)
    return tokens


# ---------------------------------------------------------------------------------------------------------
# The heads of one model
# ---------------------------------------------------------------------------------------------------------
class HydraHeads:
    """K Hydra heads (arch "mlp") or Hydra++ heads (arch "prefix-mlp": + the prefix layer) on a model's device.

    heads: list of K parameter dicts (module docstring); prefix: the prefix layer's dict or None; embed: the base
    model's embedding table [V, D] (shared, not owned); model_config: the base model's MistralConfig (its D, V, and
    the prefix layer's shapes); choices / choices_cuda: stored trees (Medusa's choices)
    for the CPU and for GPUs; accuracies [K][k]: the measured top-k accuracies they were built from."""

    def __init__(self, heads, prefix, model, arch=None, choices=(), choices_cuda=None, accuracies=None):
        arch = arch or ("mlp" if prefix is None else "prefix-mlp")
        if arch not in ARCHS:
            raise UserError(f"Hydra head arch must be one of {ARCHS}, not {arch!r}")
        if (prefix is None) != (arch == "mlp"):
            raise UserError(f"Hydra arch {arch!r}: " + ("needs a prefix layer" if prefix is None
                                                         else "has no prefix layer"))
        self.heads, self.prefix, self.arch = list(heads), prefix, arch
        self.model_config, self.embed, self.xp = model.config, model.tok_embeddings, model.xp
        self.choices = [list(map(int, c)) for c in choices]
        self.choices_cuda = [list(map(int, c)) for c in choices_cuda] if choices_cuda else None
        self.accuracies = accuracies
        self.base_model = Path(model.path).name if getattr(model, "path", None) else None
        self.keep = None                # restricted heads (head_vocab.py): the token id of each logit [M], host

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
    def create(cls, model, num_heads=4, num_layers=1, arch="mlp", seed=0):
        """Untrained heads (init_head for each head; a random prefix layer for "prefix-mlp")."""
        if num_heads < 1 or num_layers < 1:
            raise UserError(f"Hydra: need num_heads >= 1 and num_layers >= 1, got {num_heads}, {num_layers}")
        rng = np.random.default_rng(seed)
        heads = [init_head(model, i, num_layers) for i in range(num_heads)]
        prefix = init_prefix(model, rng) if arch == "prefix-mlp" else None
        return cls(heads, prefix, model, arch)

    def restricted(self, keep):
        """These heads drafting only among the tokens keep [M] (host int64, sorted; head_vocab.py): every head's
        projection [D, M] and bias [M] sliced to those columns; the blocks and the prefix layer are shared."""
        out = object.__new__(HydraHeads)
        out.__dict__.update(self.__dict__)
        out.heads = [dict(p, proj_w=slice_columns(self.xp, p["proj_w"], keep),
                          proj_b=slice_columns(self.xp, p["proj_b"], keep)) for p in self.heads]
        out.keep = keep
        return out

    def logits(self, i, a):
        """Head i on a batch a [B, (i+2)·D] -> [B, V]."""
        return head_forward(self.heads[i], a)


# ---------------------------------------------------------------------------------------------------------
# The proposer: decoders "hydra" and "hydra++" of minispec.generate
# ---------------------------------------------------------------------------------------------------------
class HydraProposer:
    """Draft = the stored tree, filled depth by depth by the grounded proposal; or with tree="dynamic" a tree
    grown afresh at every step (minispec.speculative.dynamic_tree), one batched head call per depth.

    heads: a HydraHeads, plain Hydra's or Hydra++'s (the registry's factory finds them:
    minispec.decoders.heads.heads_for); tree: a Tree or choices, default the tree stored with the heads for this backend ("tree_cuda"
    on a GPU when stored, else "tree"), the chain of K tokens when none is stored.
    tree="dynamic": max_nodes (an int, or "auto": sized per step from costs {T: c(T)} and depth_costs, measured
    once when not given, at most `cap` nodes), max_depth (default K), top_k (children per node), width (nodes
    expanded per depth), calibrate (as Medusa's: the heads' calibration.json by default). A node's value is the
    product along its path of head d's softmax probability of the node's token given the path (Hydra's heads are
    conditioned on it), each mapped through the calibration when there is one.
    head_vocab=M: the heads draft only among the M most frequent tokens (FR-Spec; minispec.decoders.head_vocab),
    counted in token_counts (default the model folder's token_counts.json).
    Hydra++: start() fills the prefix layer's cache with the prompt's hidden states; every committed path's
    hidden states are run through it and committed before the next draft (so it never sees a rejected token, and
    after plain steps it catches up on all of them in one batch), and the prefix output at the last committed
    position replaces h_t.
    gate: False (default here), True (the registry's default) or a DraftGate, as for medusa.MedusaProposer."""

    def __init__(self, model, heads, tree=None, max_nodes=None, max_depth=None, top_k=None, width=None, costs=None,
                 depth_costs=None, cap=None, head_vocab=None, token_counts=None, gate=False, calibrate=None):
        self.name = heads.kind
        heads = vocab_heads(model, heads, head_vocab, token_counts, self.name)
        self.model, self.heads, self.root_only = model, heads, Tree.from_choices([])
        self.cache, self.h, self.dynamic, self.gate, self.drafting, self.pending = None, None, None, None, False, []
        if isinstance(tree, str) and tree == "dynamic":
            self.dynamic = DynamicTrees(self.name, heads.K, max_nodes, max_depth, top_k, width, costs, depth_costs,
                                        cap, choose_calibration(self.name, heads, calibrate))
            self.gate = self.dynamic.size_with(model, heads, self.expand_at, first_hidden(model),
                                               self.prefix_step(model), gate=gate)
            self.tree = self.plan = None
            return
        refuse_dynamic_options(self.name, max_nodes=max_nodes, max_depth=max_depth, width=width, costs=costs,
                               depth_costs=depth_costs, cap=cap, top_k=top_k, calibrate=calibrate)
        device = getattr(model, "device", None)
        self.tree = proposer_tree(tree, heads, device, self.name)
        self.plan = TreePlan(self.tree, heads.xp)
        if self.tree.N > 1 and gate is True:
            hidden, extra = first_hidden(model), self.prefix_step(model)
            ctx = Context(1, hidden, model, None, SamplingParams(), None, Stats())

            def propose():
                grounded_proposal(heads, self.plan, hidden, 1, ctx.stats)
                if extra is not None:
                    extra()
            curve = step_curve(model, (heads, tuple(self.tree.choices)), propose, sizes=(1, self.tree.N),
                               tree_of=lambda k: self.tree)
            gate = make_gate(gate, self.name, curve.costs, curve.proposal)
        self.gate = make_gate(gate, self.name) if self.tree.N > 1 else None

    def prefix_step(self, model):
        """Hydra++'s prefix layer on 2 committed positions against a cache of 32 (what a drafting step runs, for
        the cost of a step; nothing is committed), or None for plain Hydra."""
        if self.heads.prefix is None:
            return None
        cache = new_prefix_cache(model)
        n = 32 if cache.ring else min(32, cache.W - 2)                                    # a cache without a window
        x = model.xp.zeros((n + 2, self.heads.D), dtype=model.dtype)                     # [n + 2, D]
        prefix_advance(self.heads.prefix, self.heads.model_config, x[:n], cache)
        return lambda: prefix_forward(self.heads.prefix, self.heads.model_config, x[n:], cache)

    def start(self, ctx, prompt_hidden):
        self.h, self.pending = None, []
        if self.gate is not None:
            self.gate.reset()
        if self.heads.prefix is not None:
            self.cache = new_prefix_cache(ctx.model)
            if prompt_hidden.shape[0]:
                prefix_advance(self.heads.prefix, self.heads.model_config, prompt_hidden, self.cache)

    def expand_at(self, h, stats=None):
        """expand(d, rows, tokens, parents) for dynamic_tree.grow: head d runs once on the rows
        concat(h, E(root), E(path)) of the nodes `rows` at depth d (a row: its parent's row, from the previous
        depth's batch, then E(its token)) -> their top-k ids and probabilities. h [D]: h_t or the prefix output."""
        E, xp, dyn = self.heads.embed, self.heads.xp, self.dynamic
        batch = {}                                           # the previous depth's rows: node number -> row, feats

        def expand(d, rows, tokens, parents):
            t0 = time.perf_counter()
            if d == 0:
                feats = xp.concatenate([h, E[int(tokens[0])]])[None]                      # [1, 2D]
            else:
                where, prev = batch["where"], batch["feats"]
                up = xp.asarray(np.array([where[int(parents[n])] for n in rows], np.int64))
                feats = xp.concatenate([prev[up], E[xp.asarray(tokens[rows])]], axis=1)   # [B, (d+2)·D]
            batch["where"], batch["feats"] = {int(n): i for i, n in enumerate(rows)}, feats
            ids, probs = top_probs(head_forward(self.heads.heads[d], feats), dyn.top_k)   # [B, k] x 2
            out = token_ids(self.heads, ids), probs
            if stats is not None:
                count(stats, "head_calls", 1)
                count(stats, "head_rows", len(rows))
                count(stats, "head_time_s", time.perf_counter() - t0)
            return out
        return expand

    def propose(self, ctx):
        """Draft(tree, tokens [N]); tokens[0] = ctx.root. Before the first verification (ctx.hidden None), or when
        the gate says no draft pays (then no head runs and Hydra++'s prefix layer waits), the root alone."""
        self.drafting, self.stats = False, ctx.stats
        if ctx.hidden is None or (self.tree is not None and self.tree.N == 1):
            return Draft(self.root_only, [ctx.root])
        if self.gate is not None and not self.gate.should_draft():
            count(ctx.stats, "gate.plain_steps", 1)
            return Draft(self.root_only, [ctx.root])
        self.drafting = True
        self.catch_up()
        h = ctx.hidden if self.heads.prefix is None else self.h
        if self.dynamic is not None:
            return Draft(*self.dynamic.grow(ctx.root, self.expand_at(h, ctx.stats)))
        return Draft(self.tree, grounded_proposal(self.heads, self.plan, h, ctx.root, ctx.stats))

    def catch_up(self):
        """Hydra++: run the committed paths not yet through the prefix layer in one batch (h: its last output)."""
        if self.heads.prefix is None or not self.pending:
            return
        xp = self.heads.xp
        x = self.pending[0] if len(self.pending) == 1 else xp.concatenate(self.pending, axis=0)   # [n, D]
        self.pending = []
        self.h = prefix_advance(self.heads.prefix, self.heads.model_config, x, self.cache)[-1]

    def observe(self, step):
        if self.heads.prefix is not None:
            self.pending.append(step.path_hidden)                                           # [len(path), D]
            if self.gate is None:
                self.catch_up()
        observe_gate(self, step)
