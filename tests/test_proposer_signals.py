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
