"""Hydra and Hydra++ decoding (Ankner et al. 2024, arXiv 2402.05109): the grounded tree proposal that makes the
heads sequential, and the proposer of decoders "hydra" and "hydra++". The heads themselves (the head equation,
the prefix layer, HydraHeads, the parameter layout) are in hydra_heads.py; the file formats in hydra_files.py.

Head i (0-based) reads h_t (Hydra) or the prefix layer's output at the last committed position (Hydra++) and the
embeddings of the root and of the i tokens drafted on the path before it; a tree is filled depth by depth, one
batched head call per depth (`grounded_proposal`).
"""
import statistics
import time
import weakref
from dataclasses import dataclass

import numpy as np

from ..backend import to_host
from ..speculative.costs import STEP, backend_clock, step_curve
from ..speculative.dynamic_tree import top_probs
from ..speculative.dynamic_tree_sizing import DynamicTrees, choose_calibration, refuse_dynamic_options
from ..speculative.gate import make_gate
from ..speculative.loop import Context, Stats
from ..speculative.sampling import SamplingParams
from ..speculative.tree import Tree, proposer_tree
from ..speculative.verify import Draft, count
from .head_vocab import token_ids, vocab_heads
from .hydra_heads import new_prefix_cache, prefix_advance, prefix_forward
from .medusa import (chain_work, context_chain, first_hidden, head_step_cost, observe_gate, plain_or_lookup,
                     price_chain, topk_ids)


PREFIX_ROWS = 2                 # rows a proposer's timed proposal runs through Hydra++'s prefix layer


# ---------------------------------------------------------------------------------------------------------
# What Hydra++'s prefix catch-up costs: fixed + per row, in plain steps
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PrefixCost:
    """The prefix layer's catch-up of n committed rows (`HydraProposer.catch_up`) costs fixed + per_row · n plain
    steps (0 for n = 0): after w plain steps a probe catches up about w + 1 rows, not the 1..4 of a step that
    follows a drafting step."""
    fixed: float
    per_row: float
    rows: tuple          # the two row counts it was timed at

    def __call__(self, n):
        return self.fixed + self.per_row * n if n else 0.0


_PREFIX_COSTS = weakref.WeakKeyDictionary()      # heads -> PrefixCost


def prefix_cost(model, heads, forward, rows=(1, 33), reps=STEP["reps"], context=STEP["context"], clock=None,
                plain_before=4):
    """The `PrefixCost` of Hydra++ heads on this model (None for plain Hydra), measured once per heads: medians
    over reps interleaved rounds (after one warm-up round), on `clock` (default `backend_clock`), of a bare
    one-token forward of the model against `context` cached tokens and of the prefix layer's catch-up
    (`prefix_advance`: forward and commit) of each row count in `rows` against a prefix cache holding `context`
    positions (set back after each). A catch-up of n rows costs median(n) / median(forward) · `forward` plain
    steps (`forward`: the bare one-token forward in plain steps, StepCurve.forward); fixed and per_row are the
    line through the two row counts."""
    if heads.prefix is None:
        return None
    if heads not in _PREFIX_COSTS:
        clock = clock or backend_clock(model)[0]
        lo, hi = rows
        base, cache = model.new_cache(), new_prefix_cache(model)
        if not cache.ring:                                   # a cache without a window: context and rows must fit
            context = min(context, cache.W // 2)
            hi = max(lo + 1, min(hi, cache.W - context))
        x = model.xp.asarray(np.random.default_rng(0).standard_normal((context + hi, heads.D)).astype(model.dtype))
        model.forward(np.arange(context) % model.config.vocab_size, base, warn_positions=False)
        prefix_advance(heads.prefix, heads.model_config, x[:context], cache)
        times = {"forward": [], lo: [], hi: []}
        for rep in range(reps + 1):
            a = clock()
            to_host(model.forward_block([1], base).logits[-1, :1])
            base.discard()
            if rep:
                times["forward"].append(clock() - a)
            for n in (lo, hi):
                for _ in range(plain_before):          # as in decoding: the catch-up follows plain steps
                    to_host(model.forward_block([1], base).logits[-1, :1])
                    base.discard()
                pos, a = cache.pos, clock()
                to_host(prefix_advance(heads.prefix, heads.model_config, x[context:context + n], cache)[:1])
                if rep:
                    times[n].append(clock() - a)
                cache.pos = pos
        unit = statistics.median(times["forward"]) / forward                     # seconds of one plain step
        c = {n: statistics.median(times[n]) / unit for n in (lo, hi)}
        per_row = max(0.0, (c[hi] - c[lo]) / (hi - lo))
        _PREFIX_COSTS[heads] = PrefixCost(c[lo] - per_row * lo, per_row, (lo, hi))
    return _PREFIX_COSTS[heads]


# ---------------------------------------------------------------------------------------------------------
# The grounded tree proposal (zankner/Hydra's `_grounded_proposal`, batched per depth)
# ---------------------------------------------------------------------------------------------------------
class TreePlan:
    """What the depth-by-depth walk needs of a Tree, computed once.

    For depth d = 0 .. max_depth - 1: parents[d] = node ids at depth d that have children (head d runs once on
    all of them), k[d] = the largest rank any of their children takes + 1, and for every node at depth d + 1
    its parent's row in that batch (row[d]) and its rank (rank[d]), with the node ids (nodes[d]). All host
    arrays: the walk indexes the paths on the host."""

    def __init__(self, tree):
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


def grounded_proposal(heads, plan, h, root, stats=None):
    """Tokens [N] (host int64) of the tree, tokens[0] = root: walk the tree depth by depth; at depth d, head d
    runs ONCE on every parent at depth d that has children (a batch of rows, each the path root .. parent:
    `HydraHeads.path_logits`), and a parent's rank-r child takes that parent's rank-r token. h [D]: h_t (Hydra)
    or the prefix layer's output at the last committed position (Hydra++). Counts head calls, rows and seconds
    in stats.counters."""
    tree = plan.tree
    tokens = np.empty(tree.N, dtype=np.int64)                                    # [N]
    tokens[0] = int(root)
    depth = len(plan.parents)
    paths = np.empty((tree.N, depth + 1), dtype=np.int64)                        # [N, max_depth + 1] host ids
    paths[0, 0] = int(root)
    for d in range(depth):
        t0 = time.perf_counter()
        par, kids = plan.parents[d], plan.nodes[d]
        logits = heads.path_logits(d, h, paths[par, :d + 1])                     # [B, V]
        top = to_host(topk_ids(logits, plan.k[d]))                               # [B, k]
        tokens[kids] = token_ids(heads, top[plan.rows[d], plan.ranks[d]])
        if d + 1 < depth:                    # a child's path: its parent's, then its own token
            paths[kids, :d + 1] = paths[par[plan.rows[d]], :d + 1]
            paths[kids, d + 1] = tokens[kids]
        if stats is not None:
            count(stats, "head_calls", 1)
            count(stats, "head_rows", len(par))
            count(stats, "head_time_s", time.perf_counter() - t0)
    return tokens


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
    counted in token_counts (default the model folder's token_counts.json); "auto" (the registry's default): 1024
    for a static tree on a CPU, else the full vocabulary (head_vocab.auto_head_vocab).
    Hydra++: start() fills the prefix layer's cache with the prompt's hidden states; every committed path's
    hidden states are run through it and committed before the next draft (so it never sees a rejected token, and
    after plain steps it catches up on all of them in one batch), and the prefix output at the last committed
    position replaces h_t.
    gate: False (default here), True (the registry's default) or a DraftGate, as for medusa.MedusaProposer.
    lookup=L (tree="dynamic" only): prompt lookup's continuation joins the trees, as for medusa.MedusaProposer
    (a step that verifies it alone runs no head, and Hydra++'s prefix layer waits as on a plain step)."""

    def __init__(self, model, heads, tree=None, max_nodes=None, max_depth=None, top_k=None, width=None, costs=None,
                 depth_costs=None, cap=None, head_vocab=None, token_counts=None, gate=False, calibrate=None,
                 lookup=None):
        self.name = heads.kind
        heads = vocab_heads(model, heads, head_vocab, token_counts, self.name, tree)
        self.model, self.heads, self.root_only = model, heads, Tree.from_choices([])
        self.cache, self.h, self.dynamic, self.gate, self.drafting, self.pending = None, None, None, None, False, []
        self.prefix_cost, self.caught = None, 0        # the catch-up's cost model (gated Hydra++); rows caught up
        self.context = None                            # prompt lookup beside the heads (option lookup)
        if isinstance(tree, str) and tree == "dynamic":
            self.context = context_chain(self.name, lookup)
            self.dynamic = DynamicTrees(self.name, heads.K, max_nodes, max_depth, top_k, width, costs, depth_costs,
                                        cap, choose_calibration(self.name, heads, calibrate))
            self.gate = self.dynamic.size_with(model, heads, self.expand_at, first_hidden(model),
                                               self.prefix_step(model), gate=gate)
            if self.gate is not None:           # its proposal prices PREFIX_ROWS rows; the rest is charged per row
                self.prefix_cost = prefix_cost(model, heads, step_curve(model).forward)
            price_chain(self, model, costs)
            self.tree = self.plan = None
            return
        refuse_dynamic_options(self.name, max_nodes=max_nodes, max_depth=max_depth, width=width, costs=costs,
                               depth_costs=depth_costs, cap=cap, top_k=top_k, calibrate=calibrate, lookup=lookup)
        device = getattr(model, "device", None)
        self.tree = proposer_tree(tree, heads, device, self.name)
        self.plan = TreePlan(self.tree)
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
            self.prefix_cost = prefix_cost(model, heads, curve.forward)
        self.gate = make_gate(gate, self.name) if self.tree.N > 1 else None

    def prefix_step(self, model):
        """Hydra++'s prefix layer on PREFIX_ROWS (2) committed positions against a cache of 32 (the proposal of a
        proposer's curve is timed with it, so its verify steps pay what the layer evicts; nothing is committed),
        or None for plain Hydra. The cache is filled at the first call (a warm-up round, untimed): a proposer
        whose curve is already known never calls it."""
        if self.heads.prefix is None:
            return None
        heads, ready = self.heads, {}

        def step():
            if not ready:
                cache = new_prefix_cache(model)
                n = 32 if cache.ring else min(32, cache.W - PREFIX_ROWS)                # a cache without a window
                x = model.xp.zeros((n + PREFIX_ROWS, heads.D), dtype=model.dtype)      # [n + rows, D]
                prefix_advance(heads.prefix, heads.model_config, x[:n], cache)
                ready.update(cache=cache, x=x[n:])
            return prefix_forward(heads.prefix, heads.model_config, ready["x"], ready["cache"], last=True)
        return step

    def prefix_paid(self):
        """The modelled cost of this step's prefix catch-up beyond what the proposal already prices: the proposal
        was timed with the layer on PREFIX_ROWS rows, so the rows past them at `PrefixCost.per_row` each. 0 for
        plain Hydra or without a gate."""
        if self.prefix_cost is None:
            return 0.0
        return self.prefix_cost.per_row * max(0, self.caught - PREFIX_ROWS)

    def start(self, ctx, prompt_hidden):
        self.h, self.pending = None, []
        if self.gate is not None:
            self.gate.reset()
        if self.context is not None:
            self.context.start(ctx.prompt)
        if self.heads.prefix is not None:
            self.cache = new_prefix_cache(ctx.model)
            if prompt_hidden.shape[0]:
                prefix_advance(self.heads.prefix, self.heads.model_config, prompt_hidden, self.cache)

    def expand_at(self, h, stats=None):
        """expand(d, rows, tokens, parents) for dynamic_tree.grow: head d runs once on the nodes `rows` at depth
        d, each row the node's path root .. node (its parent's path, from the previous depth's batch, then its
        own token; `HydraHeads.path_logits`) -> their top-k ids and probabilities. h [D]: h_t or the prefix
        output."""
        dyn, batch = self.dynamic, {}                        # the previous depth's rows: node number -> row, paths

        def expand(d, rows, tokens, parents):
            t0 = time.perf_counter()
            if d == 0:
                paths = np.array([[int(tokens[0])]], np.int64)                            # [1, 1]
            else:
                where, prev = batch["where"], batch["paths"]
                up = np.array([where[int(parents[n])] for n in rows], np.int64)
                paths = np.concatenate([prev[up], np.asarray(tokens)[rows, None]], axis=1)  # [B, d + 1]
            batch["where"], batch["paths"] = {int(n): i for i, n in enumerate(rows)}, paths
            ids, probs = top_probs(self.heads.path_logits(d, h, paths), dyn.top_k)         # [B, k] x 2
            out = token_ids(self.heads, ids), probs
            if stats is not None:
                count(stats, "head_calls", 1)
                count(stats, "head_rows", len(rows))
                count(stats, "head_time_s", time.perf_counter() - t0)
            return out
        return expand

    def propose(self, ctx):
        """Draft(tree, tokens [N]); tokens[0] = ctx.root. Before the first verification (ctx.hidden None), or when
        the gate says no draft pays (then no head runs and Hydra++'s prefix layer waits), the root alone, or with
        option lookup prompt lookup's chain alone (`plain_or_lookup`)."""
        plain, chain = plain_or_lookup(self, ctx)
        if plain is not None:
            return plain
        self.catch_up()
        h = ctx.hidden if self.heads.prefix is None else self.h
        if self.dynamic is not None:
            return Draft(*self.dynamic.grow(ctx.root, self.expand_at(h, ctx.stats), chain))
        return Draft(self.tree, grounded_proposal(self.heads, self.plan, h, ctx.root, ctx.stats))

    def catch_up(self):
        """Hydra++: run the committed paths not yet through the prefix layer in one batch (h: its last output)."""
        self.caught = 0
        if self.heads.prefix is None or not self.pending:
            return
        xp = self.heads.xp
        x = self.pending[0] if len(self.pending) == 1 else xp.concatenate(self.pending, axis=0)   # [n, D]
        self.pending, self.caught = [], x.shape[0]
        self.h = prefix_advance(self.heads.prefix, self.heads.model_config, x, self.cache)

    def observe(self, step):
        if self.context is not None:
            chain_work(self.stats, self.context.observe, step.tokens)
        if self.heads.prefix is not None:
            self.pending.append(step.path_hidden)                                           # [len(path), D]
            if self.gate is None:
                self.catch_up()
        observe_gate(self, step)

    def drafting_cost(self, drafted):
        """The modelled cost of the drafting step just proposed, verifying `drafted` draft tokens (gate on): with
        Hydra++'s catch-up of this step charged per row beyond what the proposal prices (`prefix_paid`)."""
        return head_step_cost(self, drafted, self.prefix_paid())
