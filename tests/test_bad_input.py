"""Bad input in the newer surfaces gets one clear error (issue 18, "Bad input"): each CAUSE is tested, not one
example of it. Configs of heads, skip sets and traces: every field typed, ranged and named; files accepted that
should be refused; readers given a folder for a file; the end of a cache without a sliding window.
(Checkpoint files and shard indexes: tests/test_bad_safetensors.py; the command line's training and search
arguments: tests/test_bad_input_cli.py.)"""
import json
import math

import numpy as np
import pytest

from conftest import SHIPPED, random_tensors, rel_err, tiny_config
from test_cli_errors import user_error
from test_weights import write_hf
import minispec
from minispec import generate
from minispec.decoders.registry import Autoregressive, make_proposer
from minispec.decoders import hydra_files, medusa_files
from minispec.decoders.draft_verify import SkipSet
from minispec.decoders.hydra_heads import HydraHeads
from minispec.decoders.medusa import MedusaHeads
from minispec.errors import UserError
from minispec.mistral.model import Model
from minispec.mistral.weights import CheckpointError, load_config
from minispec.speculative.tree import Tree
from minispec.speculative.verify import Draft, cut_draft

DROP = object()         # a mutation that deletes the key


def tiny_model(dtype="float32", **kw):
    cfg = tiny_config(**kw)
    return Model(cfg, random_tensors(cfg), dtype=dtype, device="cpu")


def mutate(path, key, value):
    d = json.loads(path.read_text())
    if value is DROP:
        d.pop(key)
    else:
        d[key] = value
    path.write_text(json.dumps(d))


def saved(kind, folder, model):
    """(folder, config file name, loader) of heads of `kind` saved for `model` in one of the four formats."""
    if kind == "medusa":
        medusa_files.save(MedusaHeads.create(model, 3, 1, "v1"), folder)
        return "medusa_config.json", medusa_files.load_heads
    if kind == "fasterdecoding":
        medusa_files.write_fasterdecoding(MedusaHeads.create(model, 3, 1, "v1"), folder)
        return "config.json", medusa_files.load_heads
    heads = HydraHeads.create(model, 3, 1, "prefix-mlp" if kind == "hydra++" else "mlp")
    if kind == "zankner":
        hydra_files.write_hydra(heads, folder)
        return "config.json", hydra_files.load_heads
    hydra_files.save(heads, folder)
    return "hydra_config.json", hydra_files.load_heads


V = 61      # tiny_config's vocabulary: a rank >= V names no candidate
HEAD_TREES = [("tree", "abc"), ("tree", [[0], [0, 0], [0, 0, 0], [0, 0, 0, 0]]), ("tree", [[-1]]),
              ("tree", [[0, 0]]), ("tree", [[V]]), ("tree", [[0], [0]]), ("tree", [[0.0]]), ("tree_cuda", 5),
              ("tree_cuda", [[True]]), ("accuracies", [[1.5]] * 3), ("accuracies", "high"),
              ("accuracies", [[0.5], [0.5]]), ("accuracies", [[0.5, 0.1], [0.5]] + [[0.5, 0.1]]),
              ("base_model", 5)]
SIZES = [("hidden_size", DROP), ("hidden_size", "32"), ("hidden_size", 33), ("vocab_size", 0), ("vocab_size", 60.0)]
CASES = {
    "medusa": [("kind", DROP), ("kind", "hydra"), ("version", DROP), ("version", "v3"), ("version", 1),
               ("num_heads", DROP), ("num_heads", 0), ("num_heads", "3"), ("num_heads", 3.0), ("num_heads", True),
               ("num_layers", -1), ("num_layers", 1.5)] + SIZES + HEAD_TREES,
    "hydra": [("kind", DROP), ("kind", "medusa"), ("arch", DROP), ("arch", "cnn"), ("arch", "prefix-mlp"),
              ("num_heads", 0), ("num_heads", "3"), ("num_layers", 0), ("num_layers", DROP)] + SIZES + HEAD_TREES,
    "hydra++": [("arch", "mlp"), ("kind", "hydra")],
    "fasterdecoding": [("medusa_num_heads", DROP), ("medusa_num_heads", "3"), ("medusa_num_heads", 0),
                       ("medusa_num_heads", 2.5), ("medusa_num_layers", -1), ("medusa_num_layers", DROP),
                       ("base_model_name_or_path", 5)],
    "zankner": [("hydra_num_heads", 0), ("hydra_num_heads", DROP), ("hydra_num_layers", "1"),
                ("hydra_num_layers", 0), ("hydra_head_arch", "cnn"), ("hydra_head_arch", DROP),
                ("grounded_heads", "yes"), ("grounded_heads", False), ("hidden_state_offset", 1),
                ("hidden_state_offset", "0"), ("base_model_name_or_path", [])],
}


@pytest.mark.parametrize("kind,key,value", [(k, key, v) for k, cases in CASES.items() for key, v in cases],
                         ids=lambda x: "drop" if x is DROP else str(x)[:24])
def test_every_field_of_a_heads_config_is_typed_ranged_and_named(tmp_path, kind, key, value):
    """A heads config with one field missing, mistyped or out of range: one error naming the file and the key
    (never a KeyError or TypeError traceback, never heads loaded with a silently wrong setting)."""
    model = tiny_model()
    folder = tmp_path / kind
    name, load = saved(kind, folder, model)
    load(folder, model)                                  # the unchanged file loads (the mutation is the cause)
    mutate(folder / name, key, value)
    with pytest.raises(CheckpointError) as e:
        load(folder, model)
    msg = str(e.value)
    assert name in msg and key.split("_size")[0] in msg and "\n" not in msg, msg


@pytest.mark.parametrize("key,value,words", [
    ("n_layers", "3", "'n_layers'"), ("n_layers", 0, "'n_layers'"), ("n_layers", True, "'n_layers'"),
    ("n_layers", 2, "n_layers=2"), ("attention", [1, 1], "twice"), ("attention", [3], "outside"),
    ("attention", [-1], "outside"), ("mlp", [1.0], "'mlp'"), ("mlp", "1", "'mlp'"), ("mlp", DROP, "'mlp'"),
    ("max_draft", 0, "'max_draft'"), ("max_draft", 2.5, "'max_draft'"), ("max_draft", "8", "'max_draft'"),
    ("gamma0", 1.5, "'gamma0'"), ("gamma0", "x", "'gamma0'"), ("gamma0", math.nan, "'gamma0'")])
def test_every_field_of_a_skip_set_file_is_typed_ranged_and_named(tmp_path, key, value, words):
    path = tmp_path / "skip_set.json"
    SkipSet.from_lists(3, attn=[1], mlp=[2], meta={"max_draft": 4, "gamma0": 0.5}).save(path)
    assert SkipSet.load(path, n_layers=3).meta["max_draft"] == 4
    mutate(path, key, value)
    with pytest.raises(UserError) as e:
        SkipSet.load(path, n_layers=3)
    assert str(path) in str(e.value) and words in str(e.value), str(e.value)


def test_a_skip_set_with_null_options_takes_the_defaults(tmp_path):
    path = tmp_path / "skip_set.json"
    path.write_text('{"attention": [1], "mlp": [], "n_layers": 3, "max_draft": null, "gamma0": null}')
    m = tiny_model(n_layers=3, sliding_window=8)
    out = generate(m, [1, 2, 3], decoder="draft_verify", skip=str(path), max_new_tokens=6, eos_id=None)
    assert out.tokens == generate(m, [1, 2, 3], max_new_tokens=6, eos_id=None).tokens


@pytest.mark.parametrize("option,value", [("max_draft", 2.5), ("max_draft", True), ("max_draft", 0),
                                          ("gamma0", "0.5"), ("gamma0", 2.0), ("adaptive", "no")])
def test_draft_verify_options_are_typed_not_truncated(option, value):
    m = tiny_model(n_layers=3, sliding_window=8)
    with pytest.raises(UserError, match=option):
        generate(m, [1, 2], decoder="draft_verify", skip={"attention": [1], "mlp": [], "n_layers": 3},
                 max_new_tokens=3, **{option: value})


@pytest.mark.parametrize("tree", [[[V]], [[0], [0, 0], [0, 0, 0], [0, 0, 0, 0]], "0,1", [[0, 0]]])
@pytest.mark.parametrize("decoder", ["medusa", "hydra"])
def test_a_tree_passed_to_a_heads_decoder_is_checked_up_front_naming_the_decoder(decoder, tree):
    model = tiny_model()
    heads = (MedusaHeads.create(model, 3, 1, "v1") if decoder == "medusa" else HydraHeads.create(model, 3, 1))
    with pytest.raises(UserError, match=f"^{decoder}: "):
        generate(model, [1, 2], decoder=decoder, heads=heads, tree=tree, max_new_tokens=3)


# ---------------------------------------------------------------------------------------------------------
# Accepted when it should be refused
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["medusa", "hydra", "fasterdecoding", "zankner"])
def test_head_weights_that_overflow_float16_are_refused_as_the_base_models_are(tmp_path, kind):
    """A float16 model: a head value over 65504 would become inf silently; refused naming the tensor."""
    model = tiny_model()
    folder = tmp_path / kind
    saved(kind, folder, model)
    weights = next(folder.glob("*.safetensors"))
    from safetensors.numpy import load_file, save_file
    t = load_file(str(weights))
    name = sorted(t)[0]
    t[name] = t[name].copy()
    t[name].flat[0] = 1e5
    save_file(t, str(weights))
    half = tiny_model("float16")
    load = medusa_files.load_heads if kind in ("medusa", "fasterdecoding") else hydra_files.load_heads
    load(folder, model)                                  # float32 holds it
    with pytest.raises(CheckpointError, match=f"{name!r}.*does not fit float16"):
        load(folder, half)


def test_hydra_pp_with_plain_hydra_heads_is_refused_on_the_command_line(capsys):
    user_error(["generate", "--decoder", "hydra++", "--heads", str(SHIPPED / "hydra"), "--device", "cpu"], capsys,
               "'hydra++'", "hydra heads")


def test_a_search_trace_of_another_model_of_the_same_shape_is_refused():
    """Same layers and vocabulary (check_trace passes), but the calibration text is another model's greedy text:
    the skip sets would be scored against that model."""
    from minispec.training.skip_objective import Calibration, calibrate
    from minispec.training.skip_search import check_calibration
    model, other = tiny_model(sliding_window=8), Model(tiny_config(sliding_window=8),
                                                         random_tensors(tiny_config(), seed=5), device="cpu")
    prompts = [[1, 5, 7], [2, 9, 4]]
    check_calibration(model, calibrate(model, prompts, 12), "trace.json")
    theirs = calibrate(other, prompts, 12)
    with pytest.raises(UserError, match="trace.json: its calibration continuations are not this model's"):
        check_calibration(model, Calibration(theirs.sequences, theirs.starts), "trace.json")


@pytest.mark.parametrize("option,value,words", [("lm_weight", 0.0, "both loss weights are 0"),
                                                ("lm_weight", -1.0, "lm_weight"),
                                                ("teacher_weight", math.inf, "teacher_weight"),
                                                ("heldout", 1.0, "heldout"), ("heldout", 0.0, "heldout"),
                                                ("num_layers", 0, "num_layers"), ("seq_len", 4, "seq_len"),
                                                ("gpu_budget", -1, "gpu_budget"), ("kind", "medusa", "--kind")])
def test_a_nonsensical_hydra_training_setting_is_refused_before_anything_runs(option, value, words):
    from minispec.training.checks import check_hydra_training
    kw = {"teacher_weight": 0.0} if option == "lm_weight" else {}
    with pytest.raises(UserError, match=words):
        check_hydra_training(**{**kw, option: value}, text=str(SHIPPED / "README.md"))


# ---------------------------------------------------------------------------------------------------------
# Readers: a folder where a file should be
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["config.json", "params.json"])
def test_a_folder_where_the_model_config_should_be_is_one_clear_error(tmp_path, name):
    (tmp_path / name).mkdir()
    with pytest.raises(UserError, match=f"{name}: is a folder, not a JSON file"):
        load_config(tmp_path)


@pytest.mark.parametrize("kind", ["medusa", "hydra", "fasterdecoding", "zankner"])
def test_a_folder_where_a_heads_config_should_be_is_one_clear_error(tmp_path, kind):
    model = tiny_model()
    folder = tmp_path / kind
    name, load = saved(kind, folder, model)
    (folder / name).unlink()
    (folder / name).mkdir()
    with pytest.raises(UserError, match="is a folder"):
        load(folder, model)


def test_a_folder_where_the_skip_set_or_the_tokenizer_should_be_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "skip_set.json").mkdir()
    with pytest.raises(UserError, match="is a folder"):
        SkipSet.load(tmp_path / "skip_set.json", n_layers=3)
    cfg = tiny_config()
    folder = write_hf(tmp_path / "m", cfg, random_tensors(cfg))
    (folder / "tokenizer.model").mkdir()
    user_error(["generate", "--model", str(folder), "--device", "cpu"], capsys, "no tokenizer", str(folder))


# ---------------------------------------------------------------------------------------------------------
# The end of a cache without a sliding window
# ---------------------------------------------------------------------------------------------------------
def test_cut_draft_keeps_the_first_nodes_in_node_order_by_hand():
    """Tree [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]] (nodes 0..6 in (depth, path) order) cut to 4 nodes keeps
    the root, [0], [1], [0, 0] and their tokens; a chain keeps its first room - 1 q rows; a draft that fits is
    returned as it is."""
    tree = Tree.from_choices([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]])
    d = cut_draft(Draft(tree, [10, 11, 12, 13, 14, 15, 16]), 4)
    assert [list(p) for p in d.tree.choices] == [[], [0], [1], [0, 0]] and d.tokens == [10, 11, 12, 13]
    q = np.arange(12.0).reshape(3, 4)
    c = cut_draft(Draft(Tree.chain(3), [1, 2, 3, 4], q=q), 2)
    assert c.tree.N == 2 and c.tokens == [1, 2] and np.array_equal(c.q, q[:1])
    whole = Draft(tree, list(range(7)))
    assert cut_draft(whole, 7) is whole and cut_draft(Draft(tree, list(range(7))), 1).tree.N == 1


def test_the_loop_tells_the_proposer_how_many_tokens_the_request_has_left():
    """Context.left before each step = max_new_tokens minus the tokens emitted so far (counted here from the
    steps the proposer observed, not read back from the loop)."""
    class Recorder:
        name = "recorder"

        def __init__(self):
            self.seen, self.emitted = [], 0

        def start(self, ctx, prompt_hidden):
            pass

        def propose(self, ctx):
            self.seen.append((ctx.left, 9 - self.emitted))
            return Draft(Tree.chain(0), [ctx.root])

        def observe(self, step):
            self.emitted += len(step.tokens)
    r = Recorder()
    generate(tiny_model(), [1, 2], decoder=r, max_new_tokens=9, eos_id=None)
    assert [a for a, _ in r.seen] == [b for _, b in r.seen] == list(range(9, 0, -1))


class Oracle:
    """A proposer that drafts the reference continuation itself on a tree whose rank-0 spine is right: every
    step accepts its deepest rank-0 node, so the last steps reach the end of the cache in full."""
    name = "oracle"

    def __init__(self, ref, prompt_len, chain):
        self.ref, self.n = ref, prompt_len
        self.tree = Tree.chain(6) if chain else Tree.from_choices([[0], [1], [0, 0], [0, 1], [0, 0, 0], [0, 0, 0, 0]])
        self.chain = chain

    def start(self, ctx, prompt_hidden):
        self.done = 0

    def propose(self, ctx):
        nxt = self.ref[self.done:] + [0] * 8
        tokens = [ctx.root] + [nxt[len(p) - 1] if p[-1] == 0 else (nxt[len(p) - 1] + 1) % V
                               for p in self.tree.choices[1:]]
        q = None
        if self.chain and not ctx.params.greedy:
            q = np.full((self.tree.N - 1, V), 1.0 / V)
        return Draft(self.tree, tokens, q=q)

    def observe(self, step):
        self.done += len(step.tokens)


@pytest.mark.parametrize("decoder", ["ar", "medusa", "hydra", "hydra++", "draft_verify", "oracle tree",
                                     "oracle chain"])
def test_every_decoder_fills_a_cache_without_a_window_exactly_to_its_end(decoder):
    """max_seq_len 20, no sliding window, a 3-token prompt and 18 new tokens: the cache ends holding 3 + 18 - 1 =
    20 tokens (the newest is never cached), all of its positions. Plain decoding fills it; every speculative
    decoder must too, with AR's tokens and AR's cache, its drafts cut to the positions left
    (speculative.verify.cut_draft)."""
    model = tiny_model("float64", sliding_window=None, max_seq_len=20, n_layers=3)
    ids, n = [1, 5, 3], 18
    ar_cache = model.new_cache()
    ar = generate(model, ids, max_new_tokens=n, eos_id=None, cache=ar_cache)
    options = {"medusa": {"heads": MedusaHeads.create(model, 4, 1, "v1")},
               "hydra": {"heads": HydraHeads.create(model, 4, 1, "mlp")},
               "hydra++": {"heads": HydraHeads.create(model, 4, 1, "prefix-mlp")},
               "draft_verify": {"skip": SkipSet.none(3), "max_draft": 6, "gamma0": 0.0, "gate": False}}.get(decoder, {})
    name = Oracle(ar.tokens, len(ids), decoder == "oracle chain") if decoder.startswith("oracle") else decoder
    cache = model.new_cache()
    out = generate(model, ids, decoder=name, max_new_tokens=n, eos_id=None, cache=cache, **options)
    assert out.tokens == ar.tokens
    assert cache.pos == ar_cache.pos == model.config.max_seq_len == len(ids) + n - 1
    assert rel_err(cache.keys, ar_cache.keys) < 1e-12
    if decoder.startswith("oracle") or decoder == "draft_verify":      # drafts that are right reach the end
        assert out.stats.steps < n


# ---------------------------------------------------------------------------------------------------------
# More of the same causes: data of the wrong kind
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("what", ["model", "medusa", "hydra"])
def test_integer_weights_of_the_right_shape_are_refused_not_converted(tmp_path, what):
    from safetensors.numpy import load_file, save_file
    model = tiny_model()
    if what == "model":
        cfg = tiny_config()
        folder = write_hf(tmp_path / "m", cfg, random_tensors(cfg))
        weights = folder / "model.safetensors"
    else:
        folder = tmp_path / what
        saved(what, folder, model)
        weights = next(folder.glob("*.safetensors"))
    t = load_file(str(weights))
    name = sorted(t)[-1]
    t[name] = t[name].astype(np.int32)
    save_file(t, str(weights))
    with pytest.raises(CheckpointError, match=f"{name!r} holds int32 values"):
        if what == "model":
            from minispec.mistral.model import load
            load(folder, device="cpu")
        else:
            (medusa_files if what == "medusa" else hydra_files).load_heads(folder, model)


def test_use_sliding_window_is_typed(tmp_path):
    cfg = tiny_config()
    folder = write_hf(tmp_path / "m", cfg, random_tensors(cfg))
    mutate(folder / "config.json", "use_sliding_window", "no")
    with pytest.raises(UserError, match="'use_sliding_window' must be true or false"):
        load_config(folder)


@pytest.mark.parametrize("case", ["not an npz", "no lens", "lengths that do not add up", "a foreign vocabulary"])
def test_a_broken_or_foreign_hydra_data_cache_is_refused(tmp_path, case):
    from minispec.training.checks import check_hydra_training
    from minispec.training.data import load_sequences, save_sequences
    path = tmp_path / "cache.npz"
    save_sequences(path, [([1, 2, 3, 70], 0), ([4, 5, 6], 1)])
    if case == "not an npz":
        path.write_text("ids")
    elif case == "no lens":
        np.savez(path, ids=np.arange(5), first=np.zeros(1, np.int64))
    elif case == "lengths that do not add up":
        np.savez(path, ids=np.arange(5), lens=np.array([2, 2]), first=np.zeros(2, np.int64))
    with pytest.raises(UserError, match="cache.npz"):
        if case == "a foreign vocabulary":
            load_sequences(path, vocab_size=V)
        else:
            check_hydra_training(data_cache=str(path))


@pytest.mark.parametrize("case", ["other settings", "a broken json"])
def test_a_hydra_checkpoint_of_other_settings_or_broken_is_not_resumed(tmp_path, case):
    from test_train_hydra import tiny_setup
    from minispec.training.train_hydra import HydraTrainConfig, train
    cfg = HydraTrainConfig(epochs=1, batch=4, lr=1e-2, seed=3)
    _, heads, data, _ = tiny_setup("hydra")
    ck = tmp_path / "ck"
    train(heads, data, cfg, checkpoint=ck, stop_after=1, progress=False)
    if case == "other settings":
        cfg = HydraTrainConfig(epochs=1, batch=4, lr=5e-2, seed=3)
    else:
        mutate(tmp_path / "ck.json", "step", "one")
    _, heads, data, _ = tiny_setup("hydra")
    with pytest.raises(UserError, match="ck.json"):
        train(heads, data, cfg, checkpoint=ck, progress=False)


@pytest.mark.parametrize("kind", ["medusa", "hydra"])
def test_heads_that_overflow_float16_are_not_saved_as_float16(tmp_path, kind):
    """Hydra's trainer saves float16 files: a weight over 65504 would be written as inf and refused only at the
    next load, the trained heads lost. Refused before anything is written; float32 keeps it."""
    model = tiny_model()
    if kind == "medusa":
        heads, save = MedusaHeads.create(model, 2, 1, "v1"), medusa_files.save
        heads.W[0, 0, 0, 0] = 1e5
    else:
        heads, save = HydraHeads.create(model, 2, 1), hydra_files.save
        heads.heads[0]["b1"][0] = 1e5
    with pytest.raises(UserError, match="overflows float16"), np.errstate(over="ignore"):    # (the cast's warning)
        save(heads, tmp_path / "h16", dtype=np.float16)
    assert not (tmp_path / "h16").exists()
    save(heads, tmp_path / "h32", dtype=np.float32)


@pytest.mark.parametrize("decoder", ["medusa", "hydra++", "draft_verify", "oracle chain"])
def test_sampling_decoders_also_fill_a_cache_without_a_window_to_its_end(decoder):
    """The same end of the cache at temperature 0.8: the cut keeps a sampled chain's q rows with its tokens
    (chain rejection sampling reads them), and the request finishes with all 20 positions committed."""
    model = tiny_model("float64", sliding_window=None, max_seq_len=20, n_layers=3)
    ids, n = [1, 5, 3], 18
    ar = generate(model, ids, max_new_tokens=n, eos_id=None)
    options = {"medusa": {"heads": MedusaHeads.create(model, 4, 1, "v1")},
               "hydra++": {"heads": HydraHeads.create(model, 4, 1, "prefix-mlp")},
               "draft_verify": {"skip": SkipSet.none(3), "max_draft": 6, "gamma0": 0.0, "gate": False}}.get(decoder, {})
    name = Oracle(ar.tokens, len(ids), True) if decoder.startswith("oracle") else decoder
    cache = model.new_cache()
    out = generate(model, ids, decoder=name, max_new_tokens=n, eos_id=None, cache=cache, temperature=0.8, seed=1,
                   **options)
    assert len(out.tokens) == n and cache.pos == model.config.max_seq_len


# ---- decoders given as objects, and their options ------------------------------------------------------------
@pytest.mark.parametrize("decoder", [object(), 3, None, "ar".encode()])
def test_a_decoder_that_is_neither_a_name_nor_a_proposer_is_one_clear_error(decoder):
    model = minispec.load(SHIPPED, device="cpu")
    with pytest.raises(UserError, match=r"decoder must be a registered name .* or a Proposer .*start, propose and observe"):
        minispec.generate(model, [1, 2, 3], decoder=decoder, max_new_tokens=2)


def test_options_beside_a_built_proposer_are_refused_not_ignored():
    model = minispec.load(SHIPPED, device="cpu")
    with pytest.raises(UserError, match=r"decoder options \['tree'\] go with a decoder name"):
        minispec.generate(model, [1, 2, 3], decoder=Autoregressive(model), max_new_tokens=2, tree=[[0]])


@pytest.mark.parametrize("top_k", [2.5, "3", True, 0])
def test_medusas_top_k_is_an_int_of_at_least_one(top_k):
    model = minispec.load(SHIPPED, device="cpu")
    with pytest.raises(UserError, match=r"medusa: top_k must be an int >= 1"):
        make_proposer("medusa", model, top_k=top_k)
