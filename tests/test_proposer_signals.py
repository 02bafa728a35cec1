"""Bugs that keep the tokens right but lower τ, for Medusa and Hydra: the hidden states the verifier hands back
(Verified.hidden, Verified.path_hidden), the hidden state a proposer receives, the full-accept step (bonus token
present, cache advanced by the whole path), and the heads' batched path against per-head references.

The expected values come from the model's own forward pass over the committed sequence (no cache, no
speculation) and from head references written out here.
"""
import numpy as np
import pytest

from conftest import rel_err
from minispec import generate
from minispec.speculative.loop import Context, Stats
from minispec.decoders.draft_verify import DraftVerifyProposer, SkipSet
from minispec.decoders.hydra import HydraProposer
from minispec.decoders.medusa import MedusaProposer
from minispec.speculative.sampling import SamplingParams
from minispec.speculative.acceptance import greedy_accept
from minispec.speculative.tree import Tree
from minispec.speculative.verify import Draft, verify
from test_hydra import random_heads as random_hydra_heads
from test_hydra import ref_proposal
from test_medusa import random_heads as random_medusa_heads
from test_medusa import ref_head_logits, tiny_model

BRANCHING = [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 1, 0], [0, 0, 0, 0]]
DECODERS = ["medusa", "hydra", "hydra++"]


def proposer(model, name, seed=0, tree=BRANCHING):
    if name == "medusa":
        return MedusaProposer(model, random_medusa_heads(model, num_heads=4, seed=seed), Tree.from_choices(tree))
    arch = "mlp" if name == "hydra" else "prefix-mlp"
    return HydraProposer(model, heads=random_hydra_heads(model, arch, seed=seed), tree=tree)


class Recorder:
    """Wraps a proposer; records, for every step, the committed length and ctx.hidden at propose, the draft, and
    the Verified step with the committed length after it."""

    def __init__(self, inner):
        self.inner, self.calls, self.steps = inner, [], []

    def start(self, ctx, prompt_hidden):
        self.cache = ctx.cache
        self.inner.start(ctx, prompt_hidden)

    def propose(self, ctx):
        draft = self.inner.propose(ctx)
        self.calls.append((ctx.cache.pos, None if ctx.hidden is None else np.array(ctx.hidden), ctx.root, draft))
        return draft

    def observe(self, step):
        self.steps.append((self.cache.pos, step))
        self.inner.observe(step)


def run(model, name, ids=(1, 5, 3), n=30, seed=0):
    rec = Recorder(proposer(model, name, seed))
    out = generate(model, list(ids), decoder=rec, max_new_tokens=n, eos_id=None)
    seq = list(ids) + out.tokens[:-1]                                     # the committed sequence at the end
    _, H = model.forward(seq, return_hidden=True)                          # [T, D] reference hidden states
    return rec, out, seq, np.asarray(H)


# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", DECODERS)
def test_verified_hidden_and_path_hidden_are_the_forward_hidden_states_at_the_committed_positions(name):
    model = tiny_model(W=5, seed=1)
    rec, out, seq, H = run(model, name, seed=1)
    before = len(seq) - sum(len(s.path) for _, s in rec.steps)           # committed by the prefill
    assert before == 2
    for after, step in rec.steps:
        n = len(step.path)
        assert after - before == n
        assert rel_err(step.hidden, H[after - 1]) < 1e-10                 # the last emitted prefix's state
        assert step.path_hidden.shape == (n, model.config.dim)
        assert rel_err(step.path_hidden, H[before:after]) < 1e-10         # root first, every committed node
        before = after
    assert max(len(s.path) for _, s in rec.steps) > 1, "no draft token was accepted: path_hidden barely tested"


@pytest.mark.parametrize("name", DECODERS)
def test_the_proposer_receives_the_hidden_state_of_the_last_committed_node_and_drafts_from_it(name):
    model = tiny_model(W=5, seed=2)
    rec, out, seq, H = run(model, name, seed=2)
    assert rec.calls[0][1] is None                                        # nothing verified yet
    for pos, hidden, root, draft in rec.calls[1:]:
        assert rel_err(hidden, H[pos - 1]) < 1e-10                        # h_t: the state that predicted the root
        if name == "medusa":                     # the draft itself comes from that state, per head, by hand
            heads, tree = rec.inner.heads, rec.inner.tree
            ref = [root] + [int(np.argsort(-medusa_ref_logits(heads, H[pos - 1], d), kind="stable")[r])
                            for d, r in zip(tree.head[1:], tree.rank[1:])]
            assert list(draft.tokens) == ref
        elif name == "hydra":
            inner = rec.inner
            assert list(draft.tokens) == ref_proposal(inner.heads, model.tok_embeddings, inner.tree, H[pos - 1], root)


@pytest.mark.parametrize("name", DECODERS)
def test_a_fully_accepted_path_emits_the_bonus_token_and_advances_the_cache_by_the_whole_path(name):
    """A stub rule accepts the deepest path of the proposer's own draft and returns the argmax bonus."""
    model = tiny_model(W=5, seed=3)
    prop = proposer(model, name, seed=3)
    ids = [1, 5, 3, 8]
    cache = model.new_cache()
    _, prompt_hidden = model.forward(ids[:-1], cache, return_hidden=True)
    ctx = Context(ids[-1], prompt_hidden[-1], model, cache, SamplingParams(), np.random.default_rng(0), Stats())
    prop.start(ctx, prompt_hidden[:-1])
    if name == "hydra++":
        prop.h = np.asarray(prompt_hidden[-1])       # any state: this test is about the verifier's side
    draft = prop.propose(ctx)
    deepest = max(([int(i) for i in row if i >= 0] for row in draft.tree.retrieve), key=len)

    def accept_all(d, logits):
        return deepest, int(np.argmax(logits[deepest[-1]]))

    step = verify(model, cache, draft, accept_all)
    drafted = [int(draft.tokens[i]) for i in deepest]
    seq = ids[:-1] + drafted                                              # root first, then the drafted path
    logits, H = model.forward(seq, return_hidden=True)
    assert len(step.tokens) == len(deepest) == draft.tree.max_depth + 1
    assert step.tokens == drafted[1:] + [int(np.argmax(logits[-1]))]     # the bonus is there, and right
    assert step.bonus == step.tokens[-1]
    assert cache.pos == len(seq)                                          # advanced by the whole path
    ref_cache = model.new_cache()
    model.forward(seq, ref_cache)
    assert rel_err(cache.keys, ref_cache.keys) < 1e-10 and rel_err(cache.values, ref_cache.values) < 1e-10
    assert rel_err(step.hidden, H[-1]) < 1e-10


def test_greedy_acceptance_of_the_models_own_continuation_accepts_it_all_and_adds_the_next_token():
    model = tiny_model(W=5, seed=4)
    ids = [1, 5, 3]
    ar = generate(model, ids, max_new_tokens=5, eos_id=None).tokens
    cache = model.new_cache()
    model.forward(ids[:-1], cache)
    tree = Tree.chain(4)
    draft = Draft(tree, [ids[-1]] + ar[:4])
    step = verify(model, cache, draft, lambda d, logits: greedy_accept(d.tree, d.tokens, logits))
    assert step.path == [0, 1, 2, 3, 4] and step.tokens == ar[:5] and cache.pos == len(ids) + 4


# ---------------------------------------------------------------------------------------------------------
def medusa_ref_logits(heads, h, k):
    """Medusa head k written out, one head at a time: x + silu(x W + b) per block, then the projection."""
    proj = None if heads.proj is None else np.asarray(heads.proj)
    return ref_head_logits(np.asarray(heads.W), np.asarray(heads.b), proj, np.asarray(heads.base_output),
                           np.asarray(h, np.float64), k)


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("T", [1, 5, 20])
def test_medusas_batched_heads_equal_a_per_head_reference_with_every_bias(version, T):
    model = tiny_model(W=5, seed=5)
    heads = random_medusa_heads(model, num_heads=3, num_layers=2, version=version, seed=5)
    heads.b[...] = np.random.default_rng(5).standard_normal(heads.b.shape)      # biases that matter
    h = np.random.default_rng(6).standard_normal((T, model.config.dim))
    out = heads.logits(h)                                                       # [K, T, V]
    for k in range(3):
        assert rel_err(out[k], medusa_ref_logits(heads, h, k)) < 1e-12
    top = heads.topk(h[0], 4)
    for k in range(3):
        assert top[k].tolist() == np.argsort(-medusa_ref_logits(heads, h[0], k), kind="stable")[:4].tolist()


# ---------------------------------------------------------------------------------------------------------
# Every decoder, Draft & Verify included, with steps forced to a full accept and to a rejection at the root
# ---------------------------------------------------------------------------------------------------------
ALL = DECODERS + ["draft_verify"]
DV_SKIP = ([1], [0])            # Draft & Verify's skip set on the 2-layer tiny model: attention 1, MLP 0


def any_proposer(model, name, seed=0, tree=BRANCHING, **dv):
    if name != "draft_verify":
        return proposer(model, name, seed, tree)
    return DraftVerifyProposer(model, skip=SkipSet.from_lists(2, attn=DV_SKIP[0], mlp=DV_SKIP[1]), **dv)


class Steered(Recorder):
    """A Recorder that rewrites some drafts with the AR continuation `seq` (known in advance: greedy decoding is
    lossless): "full" puts the continuation on the tree's deepest path and wrong tokens everywhere else, so the
    whole path is accepted; "reject" puts wrong tokens on every node after the root, so only the root is;
    "natural" leaves the draft alone. Modes cycle over the steps that draft something."""

    MODES = ("natural", "full", "reject", "full", "reject", "natural")

    def __init__(self, inner, seq, V, modes=None):
        super().__init__(inner)
        self.seq, self.V, self.modes = seq, V, []
        self.MODES = modes or self.MODES

    def propose(self, ctx):
        draft = self.inner.propose(ctx)
        tree, pos = draft.tree, ctx.cache.pos
        drafted = len([m for m in self.modes if m != "root only"])
        mode = "root only" if tree.N == 1 else self.MODES[drafted % len(self.MODES)]
        if mode in ("full", "reject"):
            deepest = max(([int(i) for i in row if i >= 0] for row in tree.retrieve), key=len) if mode == "full" else []
            right = lambda n: self.seq[pos + int(tree.depths[n])]                               # noqa: E731
            draft = Draft(tree, [ctx.root] + [right(n) if n in deepest else (right(n) + 1) % self.V
                                              for n in range(1, tree.N)], draft.q)
        self.modes.append(mode)
        self.calls.append((pos, None if ctx.hidden is None else np.array(ctx.hidden), ctx.root, draft))
        return draft


def steered_run(model, name, ids=(1, 5, 3), n=30, seed=0, modes=None, **dv):
    ar = generate(model, list(ids), max_new_tokens=n + 8, eos_id=None).tokens      # 8 more for the last drafts
    seq = list(ids) + ar
    rec = Steered(any_proposer(model, name, seed, **dv), seq, model.config.vocab_size, modes)
    out = generate(model, list(ids), decoder=rec, max_new_tokens=n, eos_id=None)
    assert out.tokens == ar[:n]                                          # greedy: lossless whatever the drafts
    _, H = model.forward(seq[:len(ids) + n - 1], return_hidden=True)     # [T, D] over the committed sequence
    return rec, out, seq, np.asarray(H)


@pytest.mark.parametrize("name", ALL)
def test_every_decoder_hands_its_proposer_the_forward_states_after_full_accepts_and_root_rejections(name):
    """After every step, the Verified step the proposer observes (path, path_hidden, hidden) and the root and
    hidden state of the next proposal equal the plain forward over the committed sequence; forced full accepts
    commit the whole deepest path, forced rejections commit the root alone."""
    model = tiny_model(W=5, seed=6)
    rec, out, seq, H = steered_run(model, name, seed=6, max_draft=3, gamma0=0.0)
    assert {"full", "reject"} <= set(rec.modes)
    for (pos, hidden, root, draft), mode, (after, step) in zip(rec.calls, rec.modes, rec.steps):
        assert root == seq[pos]                                          # the newest token, not yet committed
        if hidden is not None:
            assert rel_err(hidden, H[pos - 1]) < 1e-10                   # the state that chose the root
        n = len(step.path)
        if mode == "full" and after < len(H):                     # (the last step may be cut by the limit)
            assert n == draft.tree.max_depth + 1, (mode, step.path)
        if mode in ("reject", "root only"):
            assert step.path == [0] and step.tokens == [seq[pos + 1]]
        assert after - pos == n
        assert rel_err(step.path_hidden, H[pos:after]) < 1e-10
        assert rel_err(step.hidden, H[after - 1]) < 1e-10
        assert step.bonus == seq[after] == step.tokens[-1]
    full = [len(s.path) for m, (_, s) in zip(rec.modes, rec.steps) if m == "full"]
    assert max(full) > 1


def test_hydra_pp_prefix_cache_holds_the_prefix_layer_over_the_committed_states_row_by_row_after_every_step():
    """After every step (forced full accepts and root rejections among them), each slot of Hydra++'s own cache
    holds the key and value that a from-scratch prefix layer (test_hydra.ref_prefix) computes at that slot's
    position over the committed hidden states, and its input state h is the prefix output at the last
    committed position. A rejected node's state never enters it."""
    from test_hydra import ref_prefix
    model = tiny_model(W=5, seed=7)
    snaps = []

    class Snap(Steered):
        def observe(self, step):
            super().observe(step)
            c = self.inner.cache
            snaps.append((c.pos, c.slot_positions().copy(), np.array(c.keys[0]), np.array(c.values[0]),
                          np.array(self.inner.h)))
    ids = [1, 5, 3]
    ar = generate(model, ids, max_new_tokens=32, eos_id=None).tokens
    seq = ids + ar
    rec = Snap(proposer(model, "hydra++", seed=7), seq, model.config.vocab_size)
    assert generate(model, ids, decoder=rec, max_new_tokens=24, eos_id=None).tokens == ar[:24]
    _, H = model.forward(seq[:len(ids) + 23], return_hidden=True)
    out, K, Vv = ref_prefix(rec.inner.heads.prefix, model.config, np.asarray(H))    # [T, D], [Hkv, T, Dh] x 2
    assert {"full", "reject"} <= set(rec.modes)
    for (pos, slots, k, v, h), (after, _) in zip(snaps, rec.steps):
        assert pos == after                                          # the committed tokens, no more, no fewer
        for s, p in enumerate(slots):
            if p >= 0:
                assert rel_err(k[:, s], K[:, p]) < 1e-10 and rel_err(v[:, s], Vv[:, p]) < 1e-10, (pos, s, p)
        assert sorted(p for p in slots if p >= 0) == list(range(max(0, pos - model.config.sliding_window), pos))
        assert rel_err(h, out[pos - 1]) < 1e-10


# ---------------------------------------------------------------------------------------------------------
# Draft & Verify: the sublayers its draft runs, its threshold's trajectory
# ---------------------------------------------------------------------------------------------------------
def test_draft_and_verifys_draft_runs_only_its_kept_sublayers_and_each_verify_runs_them_all():
    model = tiny_model(W=5, seed=8)
    calls, phase = [], ["prefill"]
    for kind in ("attention", "mlp"):
        f = getattr(model, f"{kind}_sublayer")
        setattr(model, f"{kind}_sublayer",
                lambda i, *a, f=f, kind=kind: calls.append((phase[0], kind, i)) or f(i, *a))

    class Phases(Recorder):
        def propose(self, ctx):
            phase[0] = "draft"
            d = super().propose(ctx)
            phase[0] = "verify"
            return d
    rec = Phases(any_proposer(model, "draft_verify", max_draft=3, gamma0=0.0))
    out = generate(model, [1, 5, 3], decoder=rec, max_new_tokens=20, eos_id=None)
    forwards = out.stats.counters["draft_verify.forwards"]
    assert forwards == sum(out.stats.drafted) == sum(len(d.tokens) - 1 for *_, d in rec.calls)
    for kind, skipped in (("attention", DV_SKIP[0]), ("mlp", DV_SKIP[1])):
        for i in range(2):
            n_draft = calls.count(("draft", kind, i))
            assert n_draft == (0 if i in skipped else forwards), (kind, i, n_draft)
            assert calls.count(("verify", kind, i)) == out.stats.steps         # one verification forward a step


def test_the_thresholds_whole_trajectory_follows_the_authors_update_recomputed_by_hand():
    """gamma in force at each step (the counter) against the rule of the authors' decoding.py written out here
    with their constants: m <- 0.5 m + 0.5 accepted / drafted; target gamma + 0.01 if m < 0.9, gamma if the
    draft hit max_draft, else gamma - 0.01; gamma <- 0.9 gamma + 0.1 target. Steered steps give both
    branches; the final gamma is the update after the last step."""
    model = tiny_model(W=5, seed=9)
    modes = ("full",) * 5 + ("reject",) + ("full",) * 4 + ("natural",) * 3
    rec, out, seq, H = steered_run(model, "draft_verify", n=60, seed=9, modes=modes, max_draft=3, gamma0=0.3)
    gammas = out.stats.counters["draft_verify.gamma"]
    assert len(gammas) == len(rec.steps) == out.stats.steps
    g, m, branches = 0.3, 0.0, set()
    for gamma, (_, step), (*_, draft) in zip(gammas, rec.steps, rec.calls):
        assert abs(gamma - g) < 1e-15
        K = len(draft.tokens) - 1
        assert step.drafted == K
        if K == 0:
            continue
        m = 0.5 * m + 0.5 * (len(step.path) - 1) / K
        branch = "up" if m < 0.9 else "hold" if K == 3 else "down"
        branches.add(branch)
        g = 0.9 * g + 0.1 * (g + 0.01 if branch == "up" else g if branch == "hold" else g - 0.01)
    assert abs(rec.inner.gamma - g) < 1e-15 and abs(rec.inner.m - m) < 1e-15
    assert branches == {"up", "hold", "down"}, branches


# ---------------------------------------------------------------------------------------------------------
# Counters against the work done
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_each_proposers_counters_equal_the_work_it_did(name, monkeypatch):
    """Medusa: head_calls = heads run (counted in MedusaHeads.logits) = the tree's depth per drafting step.
    Hydra / Hydra++: head_calls = calls of a head on its rows' paths (HydraHeads.path_logits, the way every head
    call goes) = the tree's non-leaf depths per drafting step, head_rows = the rows those calls ran on = the
    tree's nodes with children. Draft & Verify: forwards = its skipped one-token forward_block calls = the tokens
    it drafted."""
    model = tiny_model(W=5, seed=10)
    inner = any_proposer(model, name, seed=10, tree=BRANCHING[:5], max_draft=4, gamma0=0.2)   # 2 deep, 4 heads
    work = {"heads": 0, "rows": 0, "calls": 0}
    if name == "medusa":
        f = inner.heads.logits
        inner.heads.logits = lambda h, num_heads=None: work.update(
            heads=work["heads"] + (num_heads or inner.heads.K)) or f(h, num_heads)
    elif name.startswith("hydra"):
        f = inner.heads.path_logits
        monkeypatch.setattr(inner.heads, "path_logits", lambda i, h, paths: work.update(
            calls=work["calls"] + 1, rows=work["rows"] + paths.shape[0]) or f(i, h, paths))
    else:
        f = model.forward_block
        model.forward_block = lambda ids, cache, **kw: work.update(calls=work["calls"] + (kw.get("skip") is not None)) \
            or f(ids, cache, **kw)
    rec = Recorder(inner)
    out = generate(model, [1, 5, 3], decoder=rec, max_new_tokens=25, eos_id=None)
    c = out.stats.counters
    drafting = [d for *_, d in rec.calls if d.tree.N > 1]
    if name == "medusa":
        assert c["head_calls"] == work["heads"] == sum(d.tree.max_depth for d in drafting) > 0
    elif name.startswith("hydra"):
        tree = inner.tree
        depths_with_children = len({int(tree.depths[n]) for n in range(tree.N) if tree.children[n]})
        with_children = sum(1 for n in range(tree.N) if tree.children[n])
        assert c["head_calls"] == work["calls"] == depths_with_children * len(drafting) > 0
        assert c["head_rows"] == work["rows"] == with_children * len(drafting)
    else:
        assert c["draft_verify.forwards"] == work["calls"] == sum(len(d.tokens) - 1 for *_, d in rec.calls) > 0
