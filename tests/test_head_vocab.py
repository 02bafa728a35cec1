"""A reduced draft vocabulary (head_vocab=M, minispec.decoders.head_vocab): the heads draft only among the M most
frequent tokens, their probabilities a softmax over those M, and the decoders stay exact (greedy == AR) and
lossless (sampling)."""
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import SHIPPED, assert_lossless
from test_dynamic_tree import context, softmax
from test_hydra import (ARCHS, assert_two_token_joint, bigram_heads, random_heads as hydra_random_heads, ref_head,
                        tiny_model)
from test_medusa import random_heads as medusa_random_heads, ref_head_logits
from minispec import generate
from minispec.bench import heldout_prompts
from minispec.decoders import head_vocab
from minispec.decoders.head_vocab import CPU_HEAD_VOCAB, auto_head_vocab, kept_ids, read_token_counts, token_counts
from minispec.decoders.hydra import HydraProposer
from minispec.decoders.medusa import MedusaProposer, topk_ids
from minispec.decoders.registry import make_proposer
from minispec.errors import MissingFileError, UserError
from minispec.mistral.model import load
from minispec.mistral.tokenizer import Tokenizer
from minispec.speculative.acceptance import make_rule
from minispec.speculative.loop import Context, Stats
from minispec.speculative.sampling import SamplingParams

V = 24


def counts_favouring(kept, seed=0):
    """V counts whose most frequent tokens are exactly `kept` (every kept count above every other)."""
    rng = np.random.default_rng(seed)
    c = rng.integers(0, 50, V)
    c[list(kept)] = rng.integers(100, 200, len(kept))
    return c


KEPT = [0, 2, 3, 5, 7, 8, 11, 13, 14, 17, 19, 23]           # 12 of the 24 tokens


# ---------------------------------------------------------------------------------------------------------
# Which tokens are kept
# ---------------------------------------------------------------------------------------------------------
def test_the_kept_tokens_are_the_m_most_frequent_ties_going_to_the_smaller_id_listed_by_id():
    counts = [5, 9, 9, 0, 7, 9]                              # worked by hand: 9 at ids 1, 2, 5; then 7 at id 4
    assert kept_ids(counts, 2).tolist() == [1, 2]
    assert kept_ids(counts, 3).tolist() == [1, 2, 5]
    assert kept_ids(counts, 4).tolist() == [1, 2, 4, 5]
    assert kept_ids(counts, 6).tolist() == [0, 1, 2, 3, 4, 5]


def test_top_1_is_each_rows_largest_logit():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 5, 40))
    want = [[max(range(40), key=lambda j: row[j]) for row in block] for block in logits]
    assert topk_ids(logits, 1)[..., 0].tolist() == want


# ---------------------------------------------------------------------------------------------------------
# The drafts: tokens among the kept ones, values a softmax over them (naive references from test_medusa/hydra)
# ---------------------------------------------------------------------------------------------------------
def restricted_softmax(full_logits):
    """(token ids by decreasing probability, probabilities) of softmax over the KEPT tokens' logits alone."""
    p = softmax(np.asarray(full_logits)[KEPT])
    order = np.argsort(-p, kind="stable")
    return np.asarray(KEPT)[order], p[order]


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_restricted_medusa_draft_takes_the_kept_tokens_ranked_and_valued_by_their_own_softmax(version):
    model = tiny_model(W=6, seed=3)
    heads = medusa_random_heads(model, num_heads=3, version=version, seed=3)
    prop = MedusaProposer(model, heads, tree="dynamic", max_nodes=9, head_vocab=len(KEPT),
                          token_counts=counts_favouring(KEPT))
    _, hidden = model.forward([1, 2, 3], return_hidden=True)
    d = prop.propose(context(model, 5, hidden[-1]))
    W, b = np.asarray(heads.W), np.asarray(heads.b)
    proj = None if heads.proj is None else np.asarray(heads.proj)
    tops = [restricted_softmax(ref_head_logits(W, b, proj, np.asarray(model.output), hidden[-1], k))
            for k in range(3)]
    assert d.tree.N == 10
    for n in range(1, d.tree.N):
        path = d.tree.choices[n]
        assert int(d.tokens[n]) == tops[len(path) - 1][0][path[-1]]
        want = np.prod([tops[k][1][r] for k, r in enumerate(path)])
        assert prop.dynamic.values[n] == pytest.approx(want, rel=1e-9)
    static = MedusaProposer(model, heads, tree=[[0], [1], [0, 0]], head_vocab=len(KEPT),
                            token_counts=counts_favouring(KEPT)).propose(context(model, 5, hidden[-1]))
    assert static.tokens[1:].tolist() == [tops[0][0][0], tops[0][0][1], tops[1][0][0]]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dynamic", [True, False])
def test_a_restricted_hydra_draft_takes_the_kept_tokens_on_its_own_path_valued_by_their_own_softmax(arch, dynamic):
    model = tiny_model(W=6, seed=2)
    heads = hydra_random_heads(model, arch, seed=2)
    tree = "dynamic" if dynamic else [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]
    opts = dict(max_nodes=12, top_k=3) if dynamic else {}
    prop = HydraProposer(model, heads, tree=tree, head_vocab=len(KEPT), token_counts=counts_favouring(KEPT), **opts)
    _, hidden = model.forward([1, 2, 3], return_hidden=True)
    prop.h = hidden[-1]                                  # Hydra++: stands in for the prefix output
    d = prop.propose(context(model, 7, hidden[-1]))
    E, tree = np.asarray(model.tok_embeddings), d.tree
    assert tree.N >= 7
    for n in range(1, tree.N):
        chain, m = [], n
        while m > 0:
            chain.append(m)
            m = int(tree.parents[m])
        value, path_tokens = 1.0, []
        for m in reversed(chain):                        # root's child ... n
            a = np.concatenate([hidden[-1], E[7]] + [E[t] for t in path_tokens])
            ids, p = restricted_softmax(ref_head(heads.heads[len(path_tokens)], a[None])[0])
            assert int(d.tokens[m]) == ids[tree.rank[m]]
            value *= p[tree.rank[m]]
            path_tokens.append(int(ids[tree.rank[m]]))
        if dynamic:
            assert prop.dynamic.values[n] == pytest.approx(value, rel=1e-9)


# ---------------------------------------------------------------------------------------------------------
# Exact and lossless
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("decoder", ["medusa", "hydra", "hydra++"])
@pytest.mark.parametrize("tree", ["static", "dynamic"])
def test_greedy_with_a_reduced_draft_vocabulary_emits_exactly_the_ar_tokens(decoder, tree):
    model = tiny_model(W=5, seed=9, dim=64)
    if decoder == "medusa":
        heads = medusa_random_heads(model, num_heads=3, seed=9)
    else:
        heads = hydra_random_heads(model, "mlp" if decoder == "hydra" else "prefix-mlp", seed=9)
    opts = dict(tree="dynamic", max_nodes=6) if tree == "dynamic" else dict(tree=[[0], [1], [0, 0], [0, 0, 0]])
    for m in (2, 6, V):          # (M = 1 is refused with a tree using rank 1: a head has M candidates)
        assert_lossless(model, make_proposer(decoder, model, heads=heads, head_vocab=m,
                                             token_counts=counts_favouring(KEPT), **opts))


def test_rejection_sampling_of_a_reduced_vocabulary_draft_reproduces_the_models_own_two_token_joint():
    """As test_hydra's static test (10000 draws, V = 5, T = 1), the heads drafting among 3 of the 5 tokens."""
    model = tiny_model(W=6, V=5, seed=11)
    ids = [1, 3, 2]
    ar = generate(model, ids, max_new_tokens=20, eos_id=None).tokens
    prop = HydraProposer(model, heads=bigram_heads(model, "mlp", [2] + ar, num_heads=2, corrupt=0.3, seed=1),
                         tree=[[0], [1], [0, 0], [1, 0]], head_vocab=3, token_counts=[0, 9, 1, 8, 7])
    cache = model.new_cache()
    _, hidden = model.forward(ids[:-1], cache, return_hidden=True)
    rng, params = np.random.default_rng(0), SamplingParams(1.0)
    draft = prop.propose(Context(ids[-1], hidden[-1], model, cache, params, rng, Stats()))
    assert set(draft.tokens[1:].tolist()) <= {1, 3, 4}
    assert_two_token_joint(model, ids, cache, draft, make_rule(params, None, rng), "reduced-vocabulary rejection")


# ---------------------------------------------------------------------------------------------------------
# Bad input and the shipped table
# ---------------------------------------------------------------------------------------------------------
def test_bad_head_vocab_options_get_one_error_naming_them(tmp_path):
    model = tiny_model(W=5, seed=1)
    heads = hydra_random_heads(model, "mlp", seed=1)
    good = counts_favouring(KEPT)
    bad_file = tmp_path / "token_counts.json"
    bad_file.write_text(json.dumps({"vocab_size": 25, "counts": [1] * 25}))
    for opts, err, msg in [
            (dict(head_vocab=0, token_counts=good), UserError, "head_vocab must be an int >= 1"),
            (dict(head_vocab=V + 1, token_counts=good), UserError, "head_vocab must be at most"),
            (dict(head_vocab="12", token_counts=good), UserError, "head_vocab must be an int"),
            (dict(token_counts=good), UserError, "token_counts is used only with head_vocab"),
            (dict(head_vocab=4, token_counts=good[:-1]), UserError, "token_counts must be 24 integer counts"),
            (dict(head_vocab=4, token_counts=-good), UserError, "token_counts must be 24 integer counts"),
            (dict(head_vocab=4, token_counts=bad_file), UserError, "key 'vocab_size' is 25"),
            (dict(head_vocab=4, token_counts=tmp_path / "none.json"), MissingFileError, "none.json: no such file"),
            (dict(head_vocab=4), MissingFileError, "no token_counts.json next to the model")]:
        with pytest.raises(err, match=msg):
            make_proposer("hydra", model, heads=heads, **opts)


def test_a_frequency_file_is_read_once_while_it_stays_the_same_and_read_again_when_it_changes(tmp_path,
                                                                                               monkeypatch):
    path, reads = tmp_path / "token_counts.json", []
    real = head_vocab.read_json

    def spy(p, *args):
        reads.append(p)
        return real(p, *args)
    monkeypatch.setattr(head_vocab, "read_json", spy)
    path.write_text(json.dumps({"vocab_size": V, "counts": list(range(V))}))
    first = read_token_counts(path, V)
    assert read_token_counts(path, V) is first and len(reads) == 1              # the same file: not read again
    assert first.tolist() == list(range(V)) and not first.flags.writeable      # nobody can change what is kept
    path.write_text(json.dumps({"vocab_size": V, "counts": list(range(V, 0, -1))}))
    os.utime(path, ns=(1, 1))                                                   # a new modification time for sure
    assert read_token_counts(path, V).tolist() == list(range(V, 0, -1)) and len(reads) == 2


def test_the_shipped_frequency_table_loads_and_a_restricted_shipped_decoder_is_ar():
    model = load(SHIPPED, device="cpu")
    counts = token_counts(model)
    assert counts.shape == (model.config.vocab_size,)
    assert counts.sum() == json.loads((SHIPPED / "token_counts.json").read_text())["tokens"]
    prompt = heldout_prompts(SHIPPED, Tokenizer.from_dir(SHIPPED), n_prompts=1)[0]
    ar = generate(model, prompt, max_new_tokens=24, eos_id=None).tokens
    for name in ("medusa", "hydra", "hydra++"):
        assert generate(model, prompt, decoder=make_proposer(name, model, head_vocab=512), max_new_tokens=24,
                        eos_id=None).tokens == ar


# ---------------------------------------------------------------------------------------------------------
# head_vocab="auto", the registry decoders' default
# ---------------------------------------------------------------------------------------------------------
def test_auto_is_1024_only_for_a_static_tree_on_numpy_with_a_frequency_table_and_a_larger_vocabulary(tmp_path):
    """A fake model (its array module, folder and vocabulary are all auto_head_vocab reads): each condition
    taken away in turn gives the full vocabulary (None); values other than "auto" pass through unchanged."""
    (tmp_path / "token_counts.json").write_text("{}")
    FULL = SimpleNamespace(keep=None)                                             # heads not yet restricted

    def fake(xp=np, path=tmp_path, V=4096):
        return SimpleNamespace(xp=xp, path=path, config=SimpleNamespace(vocab_size=V))
    assert CPU_HEAD_VOCAB == 1024
    assert auto_head_vocab(fake(), FULL, "auto", None, None) == 1024              # the stored static tree
    assert auto_head_vocab(fake(), FULL, "auto", None, [[0], [0, 0]]) == 1024     # a static tree given
    assert auto_head_vocab(fake(path=None), FULL, "auto", np.ones(4096), None) == 1024  # a table given, no folder
    assert auto_head_vocab(fake(), FULL, "auto", None, "dynamic") is None         # calibrated on the full one
    assert auto_head_vocab(fake(xp=object()), FULL, "auto", None, None) is None   # CuPy: a GPU
    assert auto_head_vocab(fake(path=None), FULL, "auto", None, None) is None     # no frequency table
    assert auto_head_vocab(fake(path=tmp_path / "elsewhere"), FULL, "auto", None, None) is None
    assert auto_head_vocab(fake(V=1024), FULL, "auto", None, None) is None        # nothing to cut
    assert auto_head_vocab(fake(), SimpleNamespace(keep=np.arange(8)), "auto", None, None) is None   # cut already
    for given in (None, 512, 4096, "12"):
        assert auto_head_vocab(fake(), FULL, given, None, None) == given


def test_the_registry_decoders_draft_among_the_1024_most_frequent_tokens_by_default_on_the_cpu():
    """The shipped model on NumPy: medusa, hydra and hydra++ made by name restrict their heads to exactly the
    1024 most frequent tokens of token_counts.json; tree="dynamic", head_vocab=None and the proposer classes
    (whose head_vocab defaults to None) keep the full vocabulary, and heads already restricted are not cut again."""
    model = load(SHIPPED, device="cpu")
    want = kept_ids(token_counts(model), 1024)
    for name in ("medusa", "hydra", "hydra++"):
        heads = make_proposer(name, model).heads
        assert heads.keep is not None and np.array_equal(heads.keep, want), name
        assert make_proposer(name, model, head_vocab=None).heads.keep is None, name
        assert getattr(make_proposer(name, model, tree="dynamic", gate=False).heads, "keep", None) is None, name
    full = make_proposer("hydra", model, head_vocab=None).heads
    assert HydraProposer(model, full).heads.keep is None
    cut = make_proposer("hydra", model).heads
    assert make_proposer("hydra", model, heads=cut).heads is cut
