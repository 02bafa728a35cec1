"""A proposer's dynamic trees (DynamicTrees): its options, the cost model that sizes its trees, its calibration.

dynamic_tree.py grows a tree (`grow`, `add_chain`) and chooses its size (`best_size`, the rate rule) from a
cost model. This module holds what a proposer with tree="dynamic" keeps between steps and measures once: the
options it was given (checked here), the whole-step curve s(N) and each depth's expansion cost
(`measure_depth_costs`) on this backend, the calibration of the heads' values (`choose_calibration`), the
cache of trees built so far, and the gate a sized tree prices its steps with. The decoders (medusa.py,
hydra.py) build one DynamicTrees each and call its `grow` at every step.
"""
import numbers
import statistics
import weakref

import numpy as np

from ..errors import UserError
from .calibration import Calibration, top1_run
from .costs import backend_clock, fit_context, replay_step, step_curve
from .dynamic_tree import TreeCache, depth_cost, grow, to_tree
from .gate import make_gate
from .tree import Tree
from .verify import Draft


def check_dynamic(max_nodes, max_depth, top_k, width, n_heads, name):
    """The options of a dynamic tree, checked once: max_nodes an int >= 0 or "auto", max_depth 1..n_heads,
    top_k and width ints >= 1 or None."""
    if not (max_nodes == "auto" or (isinstance(max_nodes, numbers.Integral) and not isinstance(max_nodes, bool)
                                    and max_nodes >= 0)):
        raise UserError(f"{name}: max_nodes must be an int >= 0 or 'auto', got {max_nodes!r}")
    for key, v in (("max_depth", max_depth), ("top_k", top_k), ("width", width)):
        if v is not None and (not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1):
            raise UserError(f"{name}: {key} must be an int >= 1 or None, got {v!r}")
    if max_depth is not None and max_depth > n_heads:
        raise UserError(f"{name}: max_depth = {max_depth}, but there are only {n_heads} heads")


# ---------------------------------------------------------------------------------------------------------
# What a proposer holds: the options, the cost model, the tree cache
# ---------------------------------------------------------------------------------------------------------
_DEPTH_COSTS = weakref.WeakKeyDictionary()          # heads -> {(max_nodes, max_depth, top_k, width): depth costs}


class DynamicTrees:
    """A proposer's dynamic trees: grow(root, expand) -> (tree, tokens [N], values [N]) for one step.

    max_nodes: an int (keep the best max_nodes) or "auto" (size by the rate rule, at most `cap` nodes, with
    costs {T: c(T)} and depth_costs [max_depth] in units of one decoding step; `measure` fills what is None);
    max_depth: depths grown (<= the draft's heads); top_k: children per expanded node (default max_nodes, or
    the cap: a child of rank >= max_nodes can never be kept, since its max_nodes elder siblings rank before it);
    width: at most this many nodes expanded per depth (EAGLE-2's top-k expansion; None: every node that can
    still be kept); calibration: a Calibration (minispec.speculative.calibration) whose factors replace the
    draft's probabilities in the values, or None (`choose_calibration` picks it). After each step `last` holds
    the Grown and `values` the kept nodes' values in tree order; `observe` after each verification records the
    step's top-1 run (`run`, None after a step that drafted nothing), which picks the next step's maps."""

    def __init__(self, name, n_heads, max_nodes=None, max_depth=None, top_k=None, width=None, costs=None,
                 depth_costs=None, cap=None, calibration=None):
        max_nodes = 10 if max_nodes is None else max_nodes
        cap = 32 if cap is None else cap
        check_dynamic(max_nodes, max_depth, top_k, width, n_heads, name)
        check_dynamic(cap, None, None, None, n_heads, name)
        if max_nodes != "auto" and (costs is not None or depth_costs is not None):
            raise UserError(f"{name}: costs and depth_costs size a tree with max_nodes='auto', not {max_nodes!r}")
        self.sized = max_nodes == "auto"
        self.max_nodes = cap if self.sized else max_nodes
        self.max_depth = max_depth or n_heads
        self.top_k = top_k or max(1, self.max_nodes)
        self.width, self.costs = width, costs
        self.depth_costs = None if depth_costs is None else list(depth_costs)
        if self.depth_costs is not None and len(self.depth_costs) < self.max_depth:
            raise UserError(f"{name}: depth_costs needs one cost per depth, {self.max_depth}, got {len(self.depth_costs)}")
        self.trees, self.last, self.values, self.name = TreeCache(), None, None, name
        self.calibration, self.tree, self.run = calibration, None, None

    def size_with(self, model, heads, expand_at, hidden, step_extra=None, gate=True):
        """Fill what the cost model needs and is not given, and return the proposer's gate (DraftGate or None).

        costs: the proposer's whole-step curve (`step_curve` keyed by heads and options: verify steps of N nodes
        timed right after a growth from `hidden`, expand_at(hidden) -> expand, one row per depth when sized,
        every row when not, plus step_extra(), the proposer's other work per step such as Hydra++'s prefix
        layer); depth_costs (sized trees): each depth's expansion timed right after verify steps
        (`measure_depth_costs`), once per heads and options. gate: the proposer's `gate` option
        (minispec.speculative.gate.make_gate); a sized tree's gate charges s(N) + the depth costs paid, an
        unsized one's s(N) + the measured growth."""
        key = (self.max_nodes, self.max_depth, self.top_k, self.width)
        curve = None
        if (self.sized and self.costs is None) or (gate is True and not (self.sized and self.costs is not None)):
            def propose():
                to_tree(grow(1, expand_at(hidden), self.max_nodes, self.max_depth, self.top_k,
                             1 if self.sized else self.width), self.trees)
                if step_extra is not None:
                    step_extra()
            curve = step_curve(model, (heads, key, self.sized), propose)
        if self.sized and self.costs is None:
            self.costs = curve.costs
        if self.sized and self.depth_costs is None:
            known = _DEPTH_COSTS.setdefault(heads, {})
            if key not in known:
                known[key] = measure_depth_costs(model, self, expand_at, hidden, step_extra)
            self.depth_costs = known[key]
        if self.sized:
            return make_gate(gate, self.name, self.costs)
        return make_gate(gate, self.name, None if curve is None else curve.costs,
                         0.0 if curve is None else curve.proposal)

    def paid(self):
        """The modelled proposal cost of the last growth: its depth costs for the rows it expanded (sized), else 0."""
        if not self.sized or self.last is None:
            return 0.0
        return sum(depth_cost(c, b) for c, b in zip(self.depth_costs, self.last.depth_rows))

    def grow(self, root, expand, chain=None):
        """(tree, tokens [N]) of this step's tree: grown from the root with expand (`grow`), and with `chain`
        (tokens, values) of another drafter joined to it before the best nodes are kept (`add_chain`)."""
        costs = self.costs if self.sized else None
        cal, run = self.calibration, self.run
        calibrate = None if cal is None else (lambda d, probs, parents: cal(d, probs, parents, run=run))
        self.last = grow(root, expand, self.max_nodes, self.max_depth, self.top_k, self.width, costs,
                         self.depth_costs, calibrate, chain)
        self.tree, tokens, self.values = to_tree(self.last, self.trees)
        return self.tree, tokens

    def observe(self, step, drafted):
        """After a verification: `run` becomes the step's top-1 run (calibration.top1_run of its accepted path
        in the tree grown for it) when `drafted` (this step's draft was that tree), None otherwise."""
        self.run = top1_run(self.tree.choices[step.path[-1]]) if drafted and self.tree is not None else None


def choose_calibration(name, heads, calibrate):
    """The Calibration a dynamic tree uses: calibrate None -> the heads' own (heads.calibration, read from their
    folder's calibration.json), or none when they have none; False -> none (the raw draft probabilities);
    True -> the heads' own, an error when they have none; a Calibration -> that one."""
    own = getattr(heads, "calibration", None)
    if calibrate is None or calibrate is False:
        return own if calibrate is None else None
    if calibrate is True:
        if own is None:
            raise UserError(f"{name}: calibrate=True, but these heads have no calibration.json (fit one with "
                            f"tools/fit_calibration.py)")
        return own
    if isinstance(calibrate, Calibration):
        return calibrate
    raise UserError(f"{name}: calibrate must be None, True, False or a Calibration, got {calibrate!r}")


def refuse_dynamic_options(name, **options):
    """A static tree takes none of the dynamic tree's options: one error naming the first one given."""
    given = [k for k, v in options.items() if v is not None]
    if given:
        raise UserError(f"{name}: {given[0]} is an option of tree='dynamic', not of a static tree")


def measure_depth_costs(model, trees, expand_at, hidden, step_extra=None, reps=9):
    """[max_depth] (fixed, per row) cost of each depth's expansion in units of one whole plain step: the capped
    tree (no sizing) is grown from `hidden` twice per round, once with every row (B_d rows at depth d) and once
    one row per depth (width 1), each right after a verify step of a 4-node chain (as in decoding, where the
    model's weights have just pushed the heads' out of the CPU's caches), with a plain step (a root-only verify)
    timed in every round as the unit, one warm-up round first, on the clock of `model_costs`; with the medians
    m_B and m_1, per row = (m_B - m_1) / (B_d - 1) (0 when B_d = 1) and fixed = m_1 - per row, both >= 0. Depth
    0's fixed cost also carries what every step pays besides the expansions: the one-row growth's own
    bookkeeping and tree building, and step_extra() when given."""
    clock = backend_clock(model)[0]
    cache = model.new_cache()
    n = fit_context(cache, 32)[0]
    model.forward(np.arange(1, n + 1) % model.config.vocab_size, cache, warn_positions=False)
    plain, chain = Draft(Tree.from_choices([]), [1]), Draft(Tree.chain(3), [1, 2, 3, 4])

    def step(draft):
        replay_step(model, cache, draft)
    D = trees.max_depth
    t1s, wide, narrow, rows, other = [], [[] for _ in range(D)], [[] for _ in range(D)], [1] * D, []
    for rep in range(reps + 1):
        step(plain)
        t0 = clock()
        step(plain)
        t1 = clock() - t0
        for width, times in ((trees.width, wide), (1, narrow)):
            expand, seen = expand_at(hidden), {}

            def timed(d, rows_d, *args):
                s = clock()
                out = expand(d, rows_d, *args)
                seen[d] = (clock() - s, len(rows_d))
                return out
            step(chain)
            s0 = clock()
            to_tree(grow(1, timed, trees.max_nodes, D, trees.top_k, width), trees.trees)
            if step_extra is not None and width == 1:
                step_extra()
            total = clock() - s0
            if rep and width == 1:
                other.append(total - sum(t for t, _ in seen.values()))
            if rep:
                for d in range(D):
                    times[d].append(seen.get(d, (0.0, 1))[0])
                    if width != 1:
                        rows[d] = seen.get(d, (0.0, 1))[1]
        if rep:
            t1s.append(t1)
    cache.discard()
    t1 = statistics.median(t1s)
    out = []
    for d in range(D):
        m_b, m_1 = statistics.median(wide[d]) / t1, statistics.median(narrow[d]) / t1
        per_row = max(0.0, (m_b - m_1) / (rows[d] - 1)) if rows[d] > 1 else 0.0
        out.append((max(0.0, m_1 - per_row), per_row))
    out[0] = (out[0][0] + max(0.0, statistics.median(other) / t1), out[0][1])
    return out
