"""Medusa: heads, their hand-derived training gradients, file formats, and greedy losslessness of the decoder."""
import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import FIXTURES, assert_lossless, numgrad, random_tensors, rel_err, tiny_config
from hostguard import GUARD
from minispec import generate
from minispec.speculative.loop import Context, Stats
from minispec.speculative.sampling import SamplingParams
from minispec.decoders.medusa import MedusaHeads, MedusaProposer
from minispec.decoders.medusa_files import read_fasterdecoding, write_fasterdecoding
from minispec.decoders.medusa_files import load as load_medusa, save as save_medusa, state_dict
from minispec.mistral.model import Model, load
from minispec.training.data import hidden_states, make_labels, self_distilled_sequences
from minispec.training.train_medusa import TrainConfig, medusa_loss, heldout_loss, topk_accuracies, train
from minispec.speculative.tree import Tree
from minispec.mistral.weights import CheckpointError
from minispec.errors import UserError

BRANCHING = [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 1, 0], [0, 0, 0, 0]]


def random_heads(model, num_heads=4, num_layers=1, version="v1", seed=0, scale=0.3):
    """Heads with random non-zero weights: v1 projections near the base output layer, so their drafts are
    right sometimes and wrong sometimes."""
    heads = MedusaHeads.create(model, num_heads, num_layers, version)
    rng = np.random.default_rng(seed)
    put = lambda a: model.xp.asarray(a, dtype=model.dtype)              # noqa: E731  (explicit upload)
    heads.W[...] = put(scale * rng.standard_normal(heads.W.shape))
    heads.b[...] = put(0.1 * rng.standard_normal(heads.b.shape))
    if heads.proj is not None:
        heads.proj[...] += put(scale * rng.standard_normal(heads.proj.shape))
    return heads


def tiny_model(W=6, V=24, seed=0, dtype="float64", device="cpu"):
    cfg = tiny_config(sliding_window=W, vocab_size=V)
    return Model(cfg, random_tensors(cfg, seed=seed), dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------------------
# Gradients: hand-derived == central finite differences of an independent reference loss
# ---------------------------------------------------------------------------------------------------------
def ref_head_logits(W, b, proj, base, h, k):
    """Medusa head k written out: x + silu(x W + b) per block, then its projection (v1) or the base's (v2)."""
    x = h
    for layer in range(W.shape[1]):
        z = x @ W[k, layer] + b[k, layer]
        x = x + z / (1 + np.exp(-z))
    return x @ (base if proj is None else proj[k])


def reference_loss(W, b, proj, base, h, labels, decay=0.8):
    """sum_k decay^k · mean over labelled rows of -log softmax(head_k(h))[label], written out independently."""
    total = 0.0
    for k in range(W.shape[0]):
        logits = ref_head_logits(W, b, proj, base, h, k)
        rows = [t for t in range(h.shape[0]) if labels[k, t] >= 0]
        lse = np.log(np.exp(logits[rows]).sum(axis=1))
        total += decay ** k * np.mean(lse - logits[rows, labels[k, rows]])
    return total


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_hand_derived_gradients_equal_central_finite_differences(version, num_layers):
    rng = np.random.default_rng(num_layers)
    K, D, V, B = 3, 4, 6, 5
    base = rng.standard_normal((D, V))
    proj = rng.standard_normal((K, D, V)) if version == "v1" else None
    heads = MedusaHeads(0.5 * rng.standard_normal((K, num_layers, D, D)), 0.5 * rng.standard_normal((K, num_layers, D)),
                        proj, base, version)
    h = rng.standard_normal((B, D))
    labels = rng.integers(0, V, (K, B))
    labels[0, 1], labels[2, :3] = -1, -1                                   # positions without a label
    loss, _, grads = medusa_loss(heads, h, labels, [0.8 ** k for k in range(K)])
    ref = lambda: reference_loss(heads.W, heads.b, heads.proj, base, h, labels)    # noqa: E731
    assert abs(float(loss) - ref()) < 1e-12
    assert set(grads) == ({"W", "b", "proj"} if version == "v1" else {"W", "b"})
    for name, g in grads.items():
        num = numgrad(ref, getattr(heads, name))                             # central differences, eps 1e-6
        assert rel_err(g, num) < 1e-6, name


# ---------------------------------------------------------------------------------------------------------
# Heads: what the initialisation promises, the offset they learn, top-k order
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fixture_model():
    return load(FIXTURES / "gqa4_hd", dtype="float64", device="cpu")


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_untrained_heads_give_exactly_the_base_lm_head_logits(fixture_model, version):
    ids = np.arange(1, 30) * 7 % 256
    logits, hidden = fixture_model.forward(ids, return_hidden=True)             # [T, V], [T, D]
    heads = MedusaHeads.create(fixture_model, num_heads=3, num_layers=2, version=version)
    out = heads.logits(hidden)
    assert out.shape == (3, len(ids), 256) and out.dtype == np.float64
    for k in range(3):
        assert rel_err(out[k], logits) < 1e-12
    assert heads.logits(hidden[5]).shape == (3, 256)


def test_topk_lists_each_heads_token_ids_by_decreasing_logit(fixture_model):
    heads = random_heads(fixture_model, num_heads=3, num_layers=2)
    _, hidden = fixture_model.forward([1, 2, 3], return_hidden=True)
    top = heads.topk(hidden[-1], 5)
    logits = heads.logits(hidden[-1])
    assert top.shape == (3, 5) and top.dtype == np.int64
    assert top.tolist() == np.argsort(-logits, axis=-1)[:, :5].tolist()


def test_head_k_is_trained_on_the_token_k_plus_2_positions_ahead():
    ids = [10, 11, 12, 13, 14, 15]
    assert make_labels(ids, 3).tolist() == [[12, 13, 14, 15, -1, -1],
                                            [13, 14, 15, -1, -1, -1],
                                            [14, 15, -1, -1, -1, -1]]
    # self-distillation: a prompt of 3 tokens; only the generated tokens 13, 14, 15 are labels
    assert make_labels(ids, 2, first_label=3).tolist() == [[-1, 13, 14, 15, -1, -1],
                                                           [13, 14, 15, -1, -1, -1]]


def test_trained_heads_learn_that_offset_on_a_counting_sequence():
    """Token x is always followed by x + 1 (mod V) and the hidden state is a fixed vector per current token, so
    after training head k's top-1 at token x must be x + k + 2."""
    rng = np.random.default_rng(0)
    D, V, K = 16, 8, 3
    ids = np.arange(400) % V
    emb = rng.standard_normal((V, D))
    base = rng.standard_normal((D, V))
    heads = MedusaHeads(np.zeros((K, 1, D, D)), np.zeros((K, 1, D)), np.repeat(base[None], K, 0), base, "v1")
    train(heads, emb[ids], make_labels(ids, K), TrainConfig(epochs=20, lr=0.05, batch=64), progress=False)
    for x in range(V):
        assert heads.topk(emb[x], 1)[:, 0].tolist() == [(x + k + 2) % V for k in range(K)]


def test_hidden_states_are_the_models_and_labels_stay_inside_their_sequence(fixture_model):
    seqs = [(list(range(3, 40)), 0), ([5, 6, 7, 8, 9], 3)]              # 37 tokens > 3 windows of 12
    H, labels = hidden_states(fixture_model, seqs, num_heads=2)
    assert H.shape == (42, 48) and labels.shape == (2, 42)
    assert rel_err(H[:37], fixture_model.forward(seqs[0][0], return_hidden=True)[1]) < 1e-12
    assert labels[:, 37:].tolist() == [[-1, 8, 9, -1, -1], [8, 9, -1, -1, -1]]
    assert labels[0, 34:37].tolist() == [39, -1, -1]


def test_training_on_a_tiny_fixture_model_lowers_the_loss(fixture_model):
    prompts = [[1] + list(np.random.default_rng(i).integers(3, 256, 4)) for i in range(5)]
    seqs = self_distilled_sequences(fixture_model, prompts, gen_len=24, eos_id=None)
    assert [(len(s), first) for s, first in seqs] == [(29, 5)] * 5
    H, labels = hidden_states(fixture_model, seqs[:4], num_heads=3)
    Hh, labels_h = hidden_states(fixture_model, seqs[4:], num_heads=3)
    for version in ("v1", "v2"):
        heads = MedusaHeads.create(fixture_model, num_heads=3, version=version)
        before = heldout_loss(heads, H, labels)
        history = train(heads, H, labels, TrainConfig(epochs=8, lr=1e-2, batch=24), progress=False)
        after = heldout_loss(heads, H, labels)
        assert np.mean(history[-3:]) < 0.8 * np.mean(history[:3]), version
        assert np.all(after < 0.9 * before), version
        acc = topk_accuracies(heads, Hh, labels_h, k=4)
        assert acc.shape == (3, 4) and np.all((acc >= 0) & (acc <= 1))


# ---------------------------------------------------------------------------------------------------------
# Files: minispec's format and FasterDecoding's
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_fasterdecoding_format_round_trips_with_its_names_and_orientation(tmp_path, fixture_model, version):
    heads = random_heads(fixture_model, num_heads=3, num_layers=2, version=version)
    write_fasterdecoding(heads, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["medusa_num_heads"] == 3 and cfg["medusa_num_layers"] == 2 and cfg["base_model_name_or_path"] == "gqa4_hd"
    raw = load_file(str(tmp_path / "medusa_lm_head.safetensors"))          # safetensors' own reader
    expected = {f"{k}.{layer}.linear.{p}" for k in range(3) for layer in range(2) for p in ("weight", "bias")}
    if version == "v1":
        expected |= {f"{k}.2.weight" for k in range(3)}
        assert np.allclose(raw["1.2.weight"], heads.proj[1].T)             # [V, D]: HF (out, in)
    assert set(raw) == expected
    assert np.allclose(raw["2.1.linear.weight"], heads.W[2, 1].T)          # nn.Linear computes x W^T + b
    back = read_fasterdecoding(tmp_path, fixture_model)
    assert back.version == version and (back.K, back.L) == (3, 2)
    _, hidden = fixture_model.forward([4, 5, 6], return_hidden=True)
    assert rel_err(back.logits(hidden), heads.logits(hidden)) < 1e-6       # float32 on disk


def test_minispec_format_keeps_the_tree_and_the_accuracies(tmp_path, fixture_model):
    heads = random_heads(fixture_model, num_heads=2, version="v2")
    heads.choices, heads.accuracies = [[0], [1], [0, 0]], [[0.5, 0.2], [0.3, 0.1]]
    heads.choices_cuda = [[0], [1], [0, 0], [0, 1]]
    save_medusa(heads, tmp_path)
    cfg = json.loads((tmp_path / "medusa_config.json").read_text())
    assert cfg == {"kind": "medusa", "version": "v2", "num_heads": 2, "num_layers": 1, "hidden_size": 48,
                   "vocab_size": 256, "tree": [[0], [1], [0, 0]], "tree_cuda": [[0], [1], [0, 0], [0, 1]],
                   "accuracies": [[0.5, 0.2], [0.3, 0.1]], "base_model": "gqa4_hd"}
    back = load_medusa(tmp_path, fixture_model)
    assert back.choices == heads.choices and rel_err(back.W, heads.W) < 1e-6
    assert back.choices_cuda == heads.choices_cuda
    assert MedusaProposer(fixture_model, back).tree.choices == ((), (0,), (1,), (0, 0))    # CPU model: "tree"


def test_a_pickle_file_is_refused_with_the_torch_conversion_line(tmp_path, fixture_model):
    write_fasterdecoding(random_heads(fixture_model, 2), tmp_path)
    (tmp_path / "medusa_lm_head.safetensors").rename(tmp_path / "medusa_lm_head.pt")
    for where in (tmp_path, tmp_path / "medusa_lm_head.pt"):
        with pytest.raises(CheckpointError, match=r"st\.save_file\(torch\.load\(.*weights_only=True"):
            read_fasterdecoding(where, fixture_model)


def test_a_misshaped_or_missing_key_is_named_with_both_shapes(tmp_path, fixture_model):
    heads = random_heads(fixture_model, 2)
    write_fasterdecoding(heads, tmp_path)
    sd = state_dict(heads)
    sd["1.0.linear.weight"] = np.zeros((48, 47), np.float32)
    save_file(sd, str(tmp_path / "medusa_lm_head.safetensors"))
    with pytest.raises(CheckpointError, match=r"'1\.0\.linear\.weight' has shape \[48, 47\], expected \[48, 48\]"):
        read_fasterdecoding(tmp_path, fixture_model)
    del sd["1.0.linear.weight"]
    save_file(sd, str(tmp_path / "medusa_lm_head.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensor '1\.0\.linear\.weight' \(expected shape \[48, 48\]"):
        read_fasterdecoding(tmp_path, fixture_model)


# ---------------------------------------------------------------------------------------------------------
# The proposer and greedy losslessness
# ---------------------------------------------------------------------------------------------------------
def context(model, root, hidden):
    """A generate.Context for calling a proposer by hand."""
    return Context(root, hidden, model, model.new_cache(), SamplingParams(), np.random.default_rng(0), Stats())


def test_the_proposer_drafts_the_root_first_and_head_d_at_depth_d_plus_1(fixture_model):
    heads = random_heads(fixture_model, num_heads=3)
    prop = MedusaProposer(fixture_model, heads, Tree.from_choices(BRANCHING[:7]))
    d = prop.propose(context(fixture_model, 17, None))                    # nothing verified yet: root only
    assert d.tree.N == 1 and list(d.tokens) == [17]
    _, hidden = fixture_model.forward([1, 2, 3], return_hidden=True)
    d = prop.propose(context(fixture_model, 17, hidden[-1]))
    tree, tokens = d.tree, d.tokens
    top = np.argsort(-heads.logits(hidden[-1]), axis=-1)                   # [K, V]
    assert tokens[0] == 17 and len(tokens) == 8
    for node, choice in enumerate(tree.choices[1:], start=1):
        assert tokens[node] == top[len(choice) - 1, choice[-1]]


def test_missing_heads_say_how_to_train_them(tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(FIXTURES / "gqa4_hd", folder)
    model = load(folder, dtype="float64", device="cpu")
    with pytest.raises(FileNotFoundError, match=r"no Medusa heads next to .*minispec train-heads --kind medusa --model"):
        generate(model, [1, 2], decoder="medusa")
    save_medusa(random_heads(model, 2), folder / "medusa")                         # then the decoder name finds them
    assert generate(model, [1, 2], decoder="medusa", max_new_tokens=9).tokens == \
        generate(model, [1, 2], max_new_tokens=9).tokens


def test_medusa_refuses_bad_heads_and_options_with_a_user_error_as_hydra_does(fixture_model):
    heads = random_heads(fixture_model, 2)
    W, b, out = heads.W, heads.b, heads.base_output
    mistakes = [(lambda: MedusaHeads(W, b, None, out, "v3"), r"version must be one of \('v1', 'v2'\), not 'v3'"),
                (lambda: MedusaHeads(W, b, None, out, "v1"), r"v1 heads need their own projection"),
                (lambda: MedusaHeads.create(fixture_model, num_heads=0), r"num_heads >= 1 .* got 0, 1"),
                (lambda: MedusaProposer(fixture_model, heads, tree=[[0], [2]], top_k=2),
                 r"uses rank 2, so top_k must be >= 3, got 2")]
    for make, message in mistakes:
        with pytest.raises(UserError, match=message):
            make()


def assert_medusa_lossless(model, heads, tree, **kw):
    """Medusa's greedy tokens == AR's, and its committed cache == AR's at the same length (conftest)."""
    return assert_lossless(model, MedusaProposer(model, heads, tree), **kw)


@pytest.mark.parametrize("W", [4, 6, 8])
@pytest.mark.parametrize("shape", ["chain", "tree"])
def test_greedy_medusa_emits_exactly_the_ar_tokens_and_leaves_the_same_cache(W, shape):
    model = tiny_model(W=W, V=24, seed=W)
    heads = random_heads(model, num_heads=4, seed=W)
    tree = Tree.chain(4) if shape == "chain" else Tree.from_choices(BRANCHING)
    stats = assert_medusa_lossless(model, heads, tree)
    steps = stats.accepted[1:-1]                                          # not the root-only first step, nor the last
    assert max(steps) > 1, "no draft token was ever accepted"
    assert min(steps) < tree.max_depth + 1, "no draft token was ever rejected"
    assert stats.new_tokens == 40 and stats.steps < 40


def test_greedy_medusa_is_lossless_in_float32_and_with_two_layer_v2_heads():
    model = tiny_model(W=5, V=24, seed=3, dtype="float32")
    assert_medusa_lossless(model, random_heads(model, 3, num_layers=2, version="v2", seed=1),
                           Tree.from_choices(BRANCHING[:7]), tol=1e-6)


def test_medusa_never_exceeds_max_new_tokens_and_stops_right_after_eos():
    model = tiny_model(W=5, V=24, seed=5)
    prop = MedusaProposer(model, random_heads(model, seed=5), Tree.from_choices(BRANCHING))
    free = generate(model, [1, 2], max_new_tokens=30, eos_id=None).tokens
    for n in (0, 1, 2, 3, 7, 12):
        assert generate(model, [1, 2], decoder=prop, max_new_tokens=n, eos_id=None).tokens == free[:n]
    for eos in dict.fromkeys(free[3:20]):                                 # ids the model does emit
        first = free.index(eos)
        assert generate(model, [1, 2], decoder=prop, max_new_tokens=30, eos_id=eos).tokens == free[:first + 1]


def test_medusa_runs_without_implicit_host_conversions_and_matches_numpy():
    cfg = tiny_config(sliding_window=5, vocab_size=24)
    t = random_tensors(cfg, seed=2)
    guarded, plain = Model(cfg, t, device=GUARD), Model(cfg, t, device="cpu")
    outs = []
    for model in (guarded, plain):
        heads = random_heads(model, 3, seed=2)
        outs.append(generate(model, [1, 2], decoder=MedusaProposer(model, heads, BRANCHING[:7]), max_new_tokens=12,
                             eos_id=None).tokens)
        H, labels = hidden_states(model, [([1, 4, 6, 8, 9, 3, 2], 0)], 3)
        train(heads, H, labels, TrainConfig(batch=4), progress=False)
        topk_accuracies(heads, H, labels, k=2)
    assert outs[0] == outs[1]


# ---------------------------------------------------------------------------------------------------------
# The CLI, end to end on a tiny random model with the shipped tokenizer
# ---------------------------------------------------------------------------------------------------------
def test_cli_train_heads_writes_heads_and_a_tree_that_generate_uses(tmp_path, cli_model):
    from conftest import code_corpus
    from minispec.cli import main
    folder, cfg, _ = cli_model
    text = code_corpus(tmp_path / "corpus.txt")
    main(["train-heads", "--kind", "medusa", "--model", str(folder), "--device", "cpu", "--text", str(text),
          "--tokens", "600", "--heads", "2", "--budget", "4", "--top-k", "3", "--batch", "32", "--seq-len", "64"])
    cfg = json.loads((folder / "medusa" / "medusa_config.json").read_text())
    assert len(cfg["tree"]) == 4 and np.asarray(cfg["accuracies"]).shape == (2, 3)
    assert cfg["training"]["data"] == "corpus" and cfg["training"]["train_tokens"] > 0
    model = load(folder, device="cpu")
    assert len(generate(model, [1, 5], decoder="medusa", max_new_tokens=6, eos_id=None).tokens) == 6
