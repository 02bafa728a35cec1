"""Medusa heads and the Medusa proposer (Cai et al. 2024, arXiv 2401.10774, §2.1.1 "Medusa heads", §2.1.2).

K extra decoding heads read the base model's last hidden state h_t (the final-RMSNorm output, [D]). The base
LM head predicts the token at t+1; head k (0-based) predicts the token at t+k+2. Each head is a small residual
MLP followed by a vocabulary projection (paper §2.1.1, FasterDecoding's `ResBlock` + `nn.Linear`):

    x_0 = h_t,    x_l = x_{l-1} + silu(x_{l-1} W_l + b_l)   (l = 1 .. Lh),    logits_k = x_Lh P_k

W_l and b_l start at zero, so an untrained head is the identity followed by P_k. Two versions:
    "v1"  P_k [D, V] is the head's own projection, initialised from the base output layer (Medusa's choice):
          an untrained v1 head predicts exactly what the base LM head predicts.
    "v2"  P_k = the base model's output layer, shared and frozen (the head owns only its residual blocks).
          "v2" is minispec's name; FasterDecoding has no such flag: a v2 file is one WITHOUT projection keys.

The proposer takes each head's top-k tokens at the last verified position and places them on a static tree
(minispec.speculative.tree, Medusa's "choices"); the shared verifier (minispec.speculative.verify) checks the
whole tree in one forward.

Files (minispec.decoders.medusa_files): minispec's own format and FasterDecoding's. Both use FasterDecoding's
tensor names in Hugging Face (out, in) orientation:
    {head}.{layer}.linear.weight  [D, D]     {head}.{layer}.linear.bias  [D]     {head}.{num_layers}.weight  [V, D] (v1)
Shapes: K heads, Lh = num_layers (residual blocks per head; L is the base model's layers), T tokens, D dim,
V vocab.
"""
import time
import weakref
from pathlib import Path

import numpy as np

from ..backend import array_module, to_host
from ..errors import UserError, check_int
from ..mistral.layers import linear, silu
from ..speculative.costs import step_curve
from ..speculative.dynamic_tree import top_probs
from ..speculative.dynamic_tree_sizing import DynamicTrees, choose_calibration, refuse_dynamic_options
from ..speculative.draft_length import verify_costs
from ..speculative.gate import make_gate
from ..speculative.loop import Context, Stats
from ..speculative.sampling import SamplingParams
from ..speculative.tree import Tree, proposer_tree
from ..speculative.verify import Draft, count
from .head_vocab import slice_columns, token_ids, vocab_heads
from .lookup import ContextChain

VERSIONS = ("v1", "v2")


# ---------------------------------------------------------------------------------------------------------
# One head: residual blocks, then the vocabulary projection
# ---------------------------------------------------------------------------------------------------------
def res_block(x, W, b):
    """Medusa's ResBlock (§2.1.1): x + silu(x W + b).   x [T, D], W [D, D] (in, out), b [D] -> [T, D]"""
    return x + silu(x @ W + b)


def head_forward(h, Ws, bs, P, keep=False):
    """One Medusa head: num_layers residual blocks, then the projection.

    h [T, D], Ws [Lh, D, D] (in, out), bs [Lh, D], P [D, V] -> logits [T, V].
    keep=True also returns what the backward pass needs (minispec.training.backprop.head_backward):
    xs = [x_0 .. x_Lh] (each [T, D]) and zs = [z_1 .. z_Lh], z_l = x_{l-1} W_l + b_l, the pre-activations.
    """
    xs, zs, x = [h], [], h
    for W, b in zip(Ws, bs):
        z = x @ W + b                                                        # [T, D]
        x = x + silu(z)                                                      # [T, D]
        if keep:
            xs.append(x)
            zs.append(z)
    logits = x @ P                                                           # [T, V]
    return (logits, (xs, zs)) if keep else logits


def topk_ids(logits, k):
    """Indices of the k largest logits along the last axis, by decreasing logit.  [..., V] -> [..., k] (device).

    A partial selection (argpartition) then a sort of the k survivors: O(V) instead of a full O(V log V) sort.
    Exact ties come out in an unspecified order."""
    xp = array_module(logits)
    V = logits.shape[-1]
    if k == 1:                                                               # the greedy tree's case: one pass
        return logits.argmax(axis=-1)[..., None]                             # [..., 1]
    if k >= V:
        return xp.argsort(-logits, axis=-1)
    part = xp.argpartition(-logits, k - 1, axis=-1)[..., :k]                 # [..., k] the k largest, unordered
    vals = xp.take_along_axis(logits, part, axis=-1)                         # [..., k]
    return xp.take_along_axis(part, xp.argsort(-vals, axis=-1), axis=-1)     # [..., k] by decreasing logit


# ---------------------------------------------------------------------------------------------------------
# K heads
# ---------------------------------------------------------------------------------------------------------
class MedusaHeads:
    """K Medusa heads on a model's device, in its dtype.

    W [K, Lh, D, D] (in, out), b [K, Lh, D], proj [K, D, V] for v1 or None for v2 (then `base_output`, the
    model's own [D, V] output layer, is every head's projection). `choices` is the tree stored with the heads
    (Medusa's choices: one list of ranks per node), `accuracies` the measured top-k accuracies [K][k] it was
    built from.
    """

    def __init__(self, W, b, proj, base_output, version, choices=(), accuracies=None, base_model=None):
        if version not in VERSIONS:
            raise UserError(f"Medusa version must be one of {VERSIONS}, not {version!r}")
        if (proj is None) != (version == "v2"):
            raise UserError(f"Medusa {version}: " + ("v1 heads need their own projection [K, D, V]" if proj is None
                                                      else "v2 heads share the base output layer; proj must be None"))
        self.W, self.b, self.proj, self.base_output, self.version = W, b, proj, base_output, version
        self.choices = [list(map(int, c)) for c in choices]
        self.choices_cuda = None        # a larger tree for GPUs, where verifying N tokens costs ~1 step
        self.accuracies = accuracies
        self.base_model = base_model
        self.keep = None                # restricted heads (head_vocab.py): the token id of each logit [M], host

    @property
    def K(self):
        return self.W.shape[0]

    @property
    def L(self):
        return self.W.shape[1]

    @property
    def D(self):
        return self.W.shape[2]

    @property
    def V(self):
        return self.base_output.shape[1]

    def restricted(self, keep):
        """These heads drafting only among the tokens keep [M] (host int64, sorted; head_vocab.py): every
        projection sliced to those columns, [D, M]; a v2 file's shared base output layer is sliced once."""
        xp = array_module(self.W)
        proj = None if self.proj is None else slice_columns(xp, self.proj, keep)         # [K, D, M]
        out = MedusaHeads(self.W, self.b, proj, slice_columns(xp, self.base_output, keep), self.version,
                          self.choices, self.accuracies, self.base_model)
        out.choices_cuda, out.keep = self.choices_cuda, keep
        return out

    def projection(self, k):
        """Head k's vocabulary projection [D, V]."""
        return self.base_output if self.proj is None else self.proj[k]

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def create(cls, model, num_heads=4, num_layers=1, version="v1"):
        """Untrained heads: W = b = 0 (FasterDecoding's ResBlock zero-inits its linear layer), so every block is
        the identity; v1 projections are copies of the base output layer."""
        if num_heads < 1 or num_layers < 0:
            raise UserError(f"Medusa: need num_heads >= 1 and num_layers >= 0, got {num_heads}, {num_layers}")
        xp, dt, D = model.xp, model.dtype, model.config.dim
        W = xp.zeros((num_heads, num_layers, D, D), dtype=dt)                    # [K, Lh, D, D]
        b = xp.zeros((num_heads, num_layers, D), dtype=dt)                       # [K, Lh, D]
        proj = None
        if version == "v1":
            proj = xp.empty((num_heads,) + tuple(model.output.shape), dtype=dt)  # [K, D, V]
            proj[...] = model.output[None]
        return cls(W, b, proj, model.output, version, base_model=model_name(model))

    # ---- inference ----------------------------------------------------------------------------------------
    def logits(self, hidden, num_heads=None):
        """Every head's logits: hidden [T, D] -> [K, T, V], or [D] -> [K, V]. num_heads: only the first ones.

        All heads run at once as batched matmuls over the head axis (the same arithmetic as `head_forward` per
        head, in fewer array calls: at decode time this runs once per step, so its overhead is on the clock)."""
        single = hidden.ndim == 1
        h = hidden[None] if single else hidden                                  # [T, D]
        K = self.K if num_heads is None else num_heads
        x = h[None].repeat(K, axis=0) if K > 1 else h[None]                     # [K, T, D]
        for layer in range(self.L):
            x = x + silu(x @ self.W[:K, layer] + self.b[:K, layer, None, :])    # [K, T, D] @ [K, D, D]
        if self.proj is None:                                                   # v2: the base output layer
            out = linear(x.reshape(K * h.shape[0], self.D), self.base_output).reshape(K, h.shape[0], self.V)
        else:
            out = x @ self.proj[:K]                                             # [K, T, D] @ [K, D, V]
        return out[:, 0] if single else out

    def topk(self, hidden, k, num_heads=None):
        """Top-k token ids of each head for one hidden state [D] -> host int64 [K, k], by decreasing logit."""
        return token_ids(self, to_host(topk_ids(self.logits(hidden, num_heads), k)).astype(np.int64))


def model_name(model):
    return Path(model.path).name if getattr(model, "path", None) else None


# ---------------------------------------------------------------------------------------------------------
# The proposer: decoder "medusa" of minispec.generate
# ---------------------------------------------------------------------------------------------------------
class MedusaProposer:
    """Draft = a tree whose node at depth d takes a top-k token of head d-1 (Medusa §2.1.2): a static tree, or
    with tree="dynamic" one grown afresh at every step (minispec.speculative.dynamic_tree).

    heads: MedusaHeads (the registry's factory finds them: minispec.decoders.heads.heads_for); tree: a
    minispec.speculative.tree.Tree or a choices list, default the tree stored with the heads for this backend
    ("tree_cuda" on a GPU when stored, where a verify of N tokens costs about one step; else "tree", sized from
    the CPU's cost curve c(T)), the chain of K tokens when none is stored; top_k: candidates read per head,
    default what the tree needs (its largest rank + 1).
    head_vocab=M: the heads draft only among the M most frequent tokens (FR-Spec; minispec.decoders.head_vocab),
    counted in token_counts (default the model folder's token_counts.json); "auto" (the registry's default): 1024
    for a static tree on a CPU, else the full vocabulary (head_vocab.auto_head_vocab).
    tree="dynamic": max_nodes (an int, or "auto": sized per step from costs {T: c(T)} and depth_costs, measured
    once when not given, at most `cap` nodes), max_depth (default K), top_k (children per node), width (nodes
    expanded per depth), calibrate (None: the heads' calibration.json when they have one; False: off; True: it
    must be there; minispec.speculative.calibration). A node's value is the product of its heads' softmax
    probabilities of its tokens (each mapped through the calibration when there is one): the heads are
    independent of the path, so head d-1 runs once when depth d is grown and every node at depth d reads its top-k.
    gate: False (the class's default: draft at every step), True (the registry's default, minispec.generate's
    decoder "medusa") or a DraftGate (minispec.speculative.gate): when the acceptance so far says no
    draft pays on this backend's cost model, the step is a plain one and the heads do not run; True measures the
    cost model once per heads and tree (`step_curve` with this proposal).
    lookup=L (tree="dynamic" only): prompt lookup drafts beside the heads (minispec.decoders.lookup.ContextChain,
    `plain_or_lookup`): the context's own continuation, up to L tokens, joins every grown tree before the best
    nodes are kept, and a step whose heads do not run verifies that continuation alone, sized by lookup's cost
    rule.
    """
    name = "medusa"

    def __init__(self, model, heads, tree=None, top_k=None, max_nodes=None, max_depth=None, width=None, costs=None,
                 depth_costs=None, cap=None, head_vocab=None, token_counts=None, gate=False, calibrate=None,
                 lookup=None):
        heads = vocab_heads(model, heads, head_vocab, token_counts, "medusa", tree)
        self.heads, self.root_only = heads, Tree.from_choices([])
        self.dynamic, self.gate, self.drafting, self.context = None, None, False, None
        if isinstance(tree, str) and tree == "dynamic":
            self.context = context_chain("medusa", lookup)
            self.dynamic = DynamicTrees("medusa", heads.K, max_nodes, max_depth, top_k, width, costs, depth_costs, cap,
                                        choose_calibration("medusa", heads, calibrate))
            self.gate = self.dynamic.size_with(model, heads, self.expand_at, first_hidden(model), gate=gate)
            price_chain(self, model, costs)
            self.tree = None
            return
        refuse_dynamic_options("medusa", max_nodes=max_nodes, max_depth=max_depth, width=width, costs=costs,
                               depth_costs=depth_costs, cap=cap, calibrate=calibrate, lookup=lookup)
        device = getattr(model, "device", None)
        tree = proposer_tree(tree, heads, device, "medusa")
        need = int(tree.rank.max()) + 1 if tree.N > 1 else 1
        top_k = need if top_k is None else check_int("medusa: top_k", top_k, low=1)
        if top_k < need:
            raise UserError(f"medusa: the tree uses rank {need - 1}, so top_k must be >= {need}, got {top_k}")
        self.tree, self.top_k = tree, top_k
        if tree.N > 1 and gate is True:
            hidden, stats = first_hidden(model), Stats()
            ctx = Context(1, hidden, model, None, SamplingParams(), None, stats)
            curve = step_curve(model, (heads, tuple(tree.choices), top_k), lambda: self.draft(ctx),
                               sizes=(1, tree.N), tree_of=lambda k: tree)
            gate = make_gate(gate, "medusa", curve.costs, curve.proposal)
        self.gate = make_gate(gate, "medusa") if tree.N > 1 else None

    def start(self, ctx, prompt_hidden):
        if self.gate is not None:
            self.gate.reset()
        if self.context is not None:
            self.context.start(ctx.prompt)

    def expand_at(self, hidden, stats=None):
        """expand(d, rows, ...) for dynamic_tree.grow: head d runs once, on hidden [D] (Medusa's heads do not read
        the path, so growing depth d needs head d alone: a sized tree that stops early skips the deeper heads),
        and every row at depth d gets its top-k ids and probabilities."""
        heads, dyn = self.heads, self.dynamic

        def expand(d, rows, tokens, parents):
            logits = head_forward(hidden[None], heads.W[d], heads.b[d], heads.projection(d))[0]      # [V]
            ids, probs = top_probs(logits, dyn.top_k)                                                 # [k] x 2
            ids = token_ids(heads, ids)
            if stats is not None:
                count(stats, "head_calls", 1)
            return np.repeat(ids[None], len(rows), 0), np.repeat(probs[None], len(rows), 0)
        return expand

    def propose(self, ctx):
        """Draft(tree, tokens [N]) for the next step; tokens[0] = ctx.root. ctx.hidden: [D] at the last verified
        position, None before anything is verified (then only the root is proposed)."""
        plain, chain = plain_or_lookup(self, ctx)
        return plain if plain is not None else self.draft(ctx, chain)

    def draft(self, ctx, chain=None):
        """The proposal itself (no gate): the dynamic tree grown (with prompt lookup's chain joined, when given),
        or the static tree filled from the heads."""
        if self.dynamic is not None:
            return Draft(*self.dynamic.grow(ctx.root, self.expand_at(ctx.hidden, ctx.stats), chain))
        ids = self.heads.topk(ctx.hidden, self.top_k, num_heads=self.tree.max_depth)   # [depth, top_k] host
        count(ctx.stats, "head_calls", self.tree.max_depth)
        return Draft(self.tree, self.tree.candidates(ctx.root, ids))

    def drafting_cost(self, drafted):
        """The modelled cost of the drafting step just proposed, verifying `drafted` draft tokens (gate on)."""
        return head_step_cost(self, drafted)

    def observe(self, step):
        if self.context is not None:
            chain_work(self.stats, self.context.observe, step.tokens)
        observe_gate(self, step)


def root_alone(proposer, ctx):
    """A head proposer's plain step, or None when it drafts this step: the root alone before the first
    verification (ctx.hidden None), with a root-only tree, or when its gate says no draft pays (no head runs; counted
    in stats.counters["gate.plain_steps"]). Sets proposer.drafting and proposer.stats for `observe_gate`."""
    proposer.drafting, proposer.stats = False, ctx.stats
    if ctx.hidden is None or (proposer.tree is not None and proposer.tree.N == 1):
        return Draft(proposer.root_only, [ctx.root])
    if proposer.gate is not None and not proposer.gate.should_draft(ctx.stats):
        return Draft(proposer.root_only, [ctx.root])
    proposer.drafting = True
    return None


def chain_work(stats, work, *args):
    """work(*args), one of prompt lookup's ContextChain calls (propose, alone, observe) in a head proposer with
    option lookup, its CPU time added to stats.counters["lookup.chain_cpu_s"]: Python work that every step pays,
    drafting or not, so the gate's choices leave it out of their prices; bench decode's prediction adds it."""
    t0 = time.process_time()
    out = work(*args)
    count(stats, "lookup.chain_cpu_s", time.process_time() - t0)
    return out


def context_chain(name, lookup):
    """The ContextChain of a dynamic tree's `lookup` option (an int >= 1: the most lookup tokens a tree takes),
    or None when it is None."""
    return None if lookup is None else ContextChain(check_int(f"{name}: lookup", lookup, low=1))


def price_chain(proposer, model, costs):
    """Give a proposer's ContextChain (option lookup) the curve that sizes and prices its chain alone: `costs`
    when given (a sized tree's), else, with a gate, this model's plain whole-step curve (the lookup decoder's,
    draft_length.verify_costs: no head runs before such a verify); none without a gate (only a step with no
    hidden state yet drafts the chain alone then, all of it up to max_nodes)."""
    if proposer.context is not None:
        L = proposer.context.max_draft
        proposer.context.price(costs if costs is not None else
                               verify_costs(model, L + 1) if proposer.gate is not None else None)


def plain_or_lookup(proposer, ctx):
    """(draft, chain) of a head proposer's step before any head runs: (a plain step or prompt lookup's chain
    alone, None) when the heads do not run this step, else (None, the chain to join to their tree, or None).

    Without option lookup: `root_alone`. With it, prompt lookup's chain (tokens, values) for the context, and
    the heads do not run when `root_alone` says so, or when the chain alone is expected to earn at least what
    an enabled gate estimates a drafting step earns (its best rate by the cost rule, ContextChain.alone, against
    the gate's rate; the gate counts the step plain, DraftGate.forgo). The chain alone then drafts its best K
    tokens (at most max_nodes; counted in stats.counters["lookup.alone_steps"] when K > 0)."""
    plain = root_alone(proposer, ctx)
    context, gate = proposer.context, proposer.gate
    chain = chain_work(ctx.stats, context.propose) if context is not None else None
    if chain is None:
        return plain, None
    if plain is None and (gate is None or not gate.enabled):       # the heads draft: no chain alone to weigh
        return None, chain
    K, rate, alone = chain_work(ctx.stats, context.alone, ctx.root, chain[0], proposer.dynamic.max_nodes)
    if plain is None:
        if rate is None or rate < gate.rate:
            return None, chain
        gate.forgo(ctx.stats)
        proposer.drafting = False
    if K:
        count(ctx.stats, "lookup.alone_steps")
    return alone, None


def observe_gate(proposer, step):
    """Tell a head proposer's gate what the step emitted and, when it drafted, what the cost model says it cost
    (`head_step_cost` through the proposer's own `drafting_cost`); the modelled cost of every step (1 for a plain
    one) is summed in stats.counters["model.step_cost"] for bench decode's prediction. A dynamic tree is told
    the step too (its top-1 run picks the next step's calibrated maps; DynamicTrees.observe)."""
    if proposer.dynamic is not None:
        proposer.dynamic.observe(step, proposer.drafting)
    gate = proposer.gate
    if gate is None:
        return
    if proposer.drafting:
        gate.settle(proposer.stats, len(step.tokens), proposer.drafting_cost(step.drafted))
    else:            # a plain step, or prompt lookup's chain alone (its curve's price); the heads' estimate fades
        gate.settle(proposer.stats, len(step.tokens),
                    plain_cost=proposer.context.step_cost[step.drafted] if step.drafted else 1.0)


def head_step_cost(proposer, drafted, extra=0.0):
    """The modelled cost of a head proposer's drafting step that verified `drafted` draft tokens, as its gate
    prices it: s(drafted + 1) + proposal, plus a dynamic tree's depth costs paid for its last growth, plus
    `extra` (the proposer's other modelled work of the step, e.g. Hydra++'s prefix catch-up)."""
    paid = proposer.dynamic.paid() if proposer.dynamic is not None else 0.0
    return proposer.gate.step_cost(drafted + 1, paid + extra)


_FIRST_HIDDEN = weakref.WeakKeyDictionary()      # model -> first_hidden(model)


def first_hidden(model):
    """A final hidden state [D] to time a proposal on: the model's, after a short fixed prompt (computed once per
    model: every generate() call builds its proposer afresh)."""
    if model not in _FIRST_HIDDEN:
        _FIRST_HIDDEN[model] = model.forward([1, 2, 3], model.new_cache(), return_hidden=True)[1][-1]
    return _FIRST_HIDDEN[model]
