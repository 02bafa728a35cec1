"""Bad input to the public API: one clear error naming the thing (parameter, file, key, tensor) and what would be
right, never a NumPy message and never a silently wrong answer. docs/errors.md lists the messages."""
import ast
import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import minispec
from minispec.mistral.config import MistralConfig
from minispec.decoders.registry import generate
from minispec.mistral.model import Model

from conftest import FIXTURES, random_tensors, tiny_config


@pytest.fixture(scope="module")
def model():
    cfg = tiny_config()
    return Model(cfg, random_tensors(cfg), device="cpu")


# ---- sampling parameters: one set of rules for generate() and the CLI ----------------------------------------------
@pytest.mark.parametrize("kw,names", [(dict(top_p=1.5), ["top_p", "1.5"]), (dict(top_p=0.0), ["top_p"]),
                                      (dict(top_p=float("nan")), ["top_p", "nan"]),
                                      (dict(temperature=-0.5), ["temperature", "-0.5"]),
                                      (dict(temperature=float("inf")), ["temperature", "inf"]),
                                      (dict(temperature="0.7"), ["temperature", "'0.7'"]),
                                      (dict(temperature=1e-40), ["temperature", "1e-40", "0 (greedy)"]),
                                      (dict(top_k=2.5), ["top_k", "2.5"]), (dict(top_k=-1), ["top_k"]),
                                      (dict(seed=-1), ["seed", "-1"]), (dict(seed=1.5), ["seed", "1.5"]),
                                      (dict(seed=True), ["seed", "True"]),
                                      (dict(max_new_tokens=2.5), ["max_new_tokens", "2.5"]),
                                      (dict(max_new_tokens=True), ["max_new_tokens", "True"]),
                                      (dict(max_new_tokens=-1), ["max_new_tokens", "-1"])])
def test_generate_refuses_a_bad_sampling_parameter_naming_it(model, kw, names):
    with pytest.raises(ValueError) as e:
        generate(model, [1, 5, 7], **kw)
    for name in names:
        assert name in str(e.value), (name, str(e.value))


def test_the_api_and_the_cli_apply_the_same_sampling_rules():
    """One validator: the CLI's message for --top-p 1.5 is the API's message for top_p=1.5, flag spelled as a flag."""
    from minispec.speculative.sampling import check_generation
    with pytest.raises(ValueError) as e:
        check_generation(top_p=1.5)
    assert str(e.value).startswith("top_p must be")


def test_an_unknown_decoder_is_refused_naming_the_registered_ones(model):
    with pytest.raises(ValueError) as e:
        generate(model, [1, 5, 7], decoder="nonsense")
    assert all(name in str(e.value) for name in ("'nonsense'", "'ar'", "'medusa'")), str(e.value)


def test_an_option_the_decoder_does_not_take_is_refused_naming_it(model):
    with pytest.raises(ValueError, match=r"'ar'.*tree_size"):
        generate(model, [1, 5, 7], decoder="ar", tree_size=3)


def test_docs_errors_md_quotes_the_messages_generate_gives(model):
    """Every row of docs/errors.md's Python API table that calls generate(m, ids, ...) with literal arguments and a
    decoder that needs no files (no heads, no skip set), run on the tiny model: the doc quotes the real message, so
    a list in it (the decoders, a decoder's options) cannot go stale unnoticed."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "errors.md").read_text().split("## Python API")[1]
    rows = re.findall(r"^\| `generate\(m, ids, ([^`]*)\)` \| `(\w+): (.*)` \|$", doc, re.M)
    checked = 0
    for args, kind, message in rows:
        call = ast.parse(f"f({args})", mode="eval").body
        try:
            kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
        except ValueError:                                  # a name (a skip set built in the row): not literal
            continue
        if kwargs.get("decoder") in ("medusa", "hydra", "hydra++", "draft_verify"):
            continue                                        # needs heads or a skip set next to the model
        kwargs.setdefault("max_new_tokens", 4)
        with pytest.raises(Exception) as e:
            generate(model, [1, 5, 7], **kwargs)
        assert f"{type(e.value).__name__}: {e.value}" == f"{kind}: {message}", args
        checked += 1
    assert checked >= 9, checked


# ---- token ids --------------------------------------------------------------------------------------------------------
BAD_IDS = [([1, -1, 3], ["-1", "[0, 61)"]), ([1, 61], ["61", "[0, 61)"]), ([[1, 2], [3, 4]], ["1-D", "(2, 2)"]),
           ([1.0, 2.0], ["integer", "float"]), ([], ["empty"]), ([True, False], ["integer", "bool"]),
           (["a"], ["integer"])]


@pytest.mark.parametrize("ids,names", BAD_IDS)
def test_forward_refuses_token_ids_that_are_not_a_1d_sequence_of_ids_in_the_vocabulary(model, ids, names):
    for call in (lambda: model.forward(ids), lambda: model.forward(ids, cache=model.new_cache())):
        with pytest.raises(ValueError) as e:
            call()
        for name in names:
            assert name in str(e.value), (name, str(e.value))


@pytest.mark.parametrize("ids,names", BAD_IDS)
def test_forward_block_refuses_the_same_token_ids(model, ids, names):
    with pytest.raises(ValueError) as e:
        model.forward_block(ids, model.new_cache())
    for name in names:
        assert name in str(e.value)


@pytest.mark.parametrize("ids,names", BAD_IDS)
def test_generate_refuses_the_same_prompts(model, ids, names):
    with pytest.raises(ValueError) as e:
        generate(model, ids, max_new_tokens=2)
    for name in names:
        assert name in str(e.value)


def test_a_numpy_integer_array_of_ids_is_accepted_unchanged(model):
    a = model.forward(np.array([1, 5, 7], dtype=np.int32))
    b = model.forward([1, 5, 7])
    assert np.array_equal(a, b) and a.shape == (3, 61)


def test_a_prompt_longer_than_max_position_embeddings_warns_once_naming_both_numbers():
    cfg = tiny_config(max_seq_len=12)
    m = Model(cfg, random_tensors(cfg), device="cpu")
    with pytest.warns(UserWarning, match=r"prompt \(13 tokens\) \+ max_new_tokens \(3\) reach 15 .*\(12\)") as caught:
        generate(m, list(range(1, 14)), max_new_tokens=3)
    assert len([w for w in caught if "max_position_embeddings" in str(w.message)]) == 1
    with pytest.warns(UserWarning, match=r"prompt \(14 tokens\)") as caught:     # its prefill alone (13) crosses too
        generate(m, list(range(1, 15)), max_new_tokens=2)
    assert len([w for w in caught if "max_position_embeddings" in str(w.message)]) == 1
    with pytest.warns(UserWarning, match=r"reach 13 positions"):            # the prompt fits, the request does not
        generate(m, list(range(1, 11)), max_new_tokens=4, eos_id=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate(m, list(range(1, 12)), max_new_tokens=1)


# ---- config files -------------------------------------------------------------------------------------------------
HF = json.loads((FIXTURES / "gqa4_hd" / "config.json").read_text())


def hf_error(tmp_path, cfg=None, text=None):
    path = tmp_path / "config.json"
    path.write_text(text if text is not None else json.dumps(cfg))
    with pytest.raises(ValueError) as e:
        MistralConfig.from_hf_config(path)
    assert "config.json" in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("key,value", [("hidden_size", "abc"), ("hidden_size", 0), ("num_hidden_layers", 2.5),
                                       ("intermediate_size", True), ("vocab_size", -5), ("num_attention_heads", None),
                                       ("sliding_window", -3), ("rms_norm_eps", "x"), ("rope_theta", 0),
                                       ("max_position_embeddings", 0), ("head_dim", 7)])
def test_a_bad_config_value_is_named_by_the_key_the_file_spells(tmp_path, key, value):
    msg = hf_error(tmp_path, dict(HF, **{key: value}))
    assert repr(key) in msg or key in msg
    for internal in ("dim", "n_layers", "hidden_dim", "norm_eps", "max_seq_len"):   # minispec's own field names
        assert not re.search(rf"(?<![\w']){internal}\b", msg), msg


def test_a_bad_params_json_value_is_named_by_its_own_key(tmp_path):
    params = {"dim": 0, "n_layers": 2, "hidden_dim": 48, "n_heads": 4, "vocab_size": 61, "head_dim": 8}
    (tmp_path / "params.json").write_text(json.dumps(params))
    with pytest.raises(ValueError, match=r"params.json.*'dim'"):
        MistralConfig.from_params_json(tmp_path / "params.json")


def test_invalid_json_names_the_file_and_the_line(tmp_path):
    msg = hf_error(tmp_path, text='{\n  "hidden_size": 32,\n  "vocab_size": 61,,\n}\n')
    assert "line 3" in msg


def test_a_config_that_is_not_an_object_is_refused(tmp_path):
    assert "object" in hf_error(tmp_path, text="[1, 2]")


def test_an_activation_other_than_silu_is_refused(tmp_path):
    msg = hf_error(tmp_path, dict(HF, hidden_act="gelu"))
    assert "hidden_act" in msg and "gelu" in msg and "silu" in msg


def test_head_counts_that_do_not_divide_are_refused_naming_both_keys(tmp_path):
    msg = hf_error(tmp_path, dict(HF, num_attention_heads=4, num_key_value_heads=3))
    assert "num_attention_heads" in msg and "num_key_value_heads" in msg


def test_a_hidden_size_not_divisible_by_the_heads_is_refused_when_head_dim_is_absent(tmp_path):
    cfg = {k: v for k, v in HF.items() if k != "head_dim"}
    msg = hf_error(tmp_path, dict(cfg, hidden_size=30, num_attention_heads=4, num_key_value_heads=2))
    assert "hidden_size" in msg and "num_attention_heads" in msg


def test_missing_optional_keys_take_the_documented_defaults(tmp_path):
    need = {k: HF[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                               "vocab_size")}
    c = MistralConfig.from_hf_config(need)
    assert (c.rms_norm_eps if hasattr(c, "rms_norm_eps") else c.norm_eps) == 1e-6
    assert (c.rope_theta, c.sliding_window, c.n_kv_heads, c.tie_embeddings) == (10000.0, None, c.n_heads, False)
    assert c.head_dim == need["hidden_size"] // need["num_attention_heads"] and c.max_seq_len == 32768


def test_a_missing_required_key_is_named(tmp_path):
    cfg = {k: v for k, v in HF.items() if k != "intermediate_size"}
    assert "intermediate_size" in hf_error(tmp_path, cfg)


def test_an_invalid_shard_index_names_the_file_and_line(tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(FIXTURES / "gqa4_hd_sharded", folder)
    (folder / "model.safetensors.index.json").write_text('{"weight_map": \n  {"a": }\n}')
    with pytest.raises(ValueError, match=r"model.safetensors.index.json.*line 2"):
        minispec.load(folder, device="cpu")


# ---- weights ----------------------------------------------------------------------------------------------------------
def test_a_nan_in_a_model_tensor_is_refused_at_load_naming_the_tensor(tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(FIXTURES / "gqa4_hd", folder)
    t = load_file(str(folder / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"
    t[name] = t[name].copy()
    t[name][3, 4] = np.nan
    save_file(t, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=name.replace(".", r"\.")) as e:
        minispec.load(folder, device="cpu")
    assert "NaN" in str(e.value) or "non-finite" in str(e.value)


def with_a_bf16_nan(tmp_path, name):
    """A copy of the bf16 fixture whose tensor `name` holds a quiet NaN at [3, 4] (the file edited by hand)."""
    import json
    import struct
    folder = tmp_path / "m"
    shutil.copytree(FIXTURES / "gqa4_hd_bf16", folder)
    path = folder / "model.safetensors"
    blob = bytearray(path.read_bytes())
    n = struct.unpack("<Q", blob[:8])[0]
    info = json.loads(blob[8:8 + n])[name]
    assert info["dtype"] == "BF16"
    cols = info["shape"][1]
    at = 8 + n + info["data_offsets"][0] + 2 * (3 * cols + 4)               # element [3, 4]
    blob[at:at + 2] = struct.pack("<H", 0x7FC0)                             # a bf16 quiet NaN
    path.write_bytes(bytes(blob))
    return folder


@pytest.mark.parametrize("name", ["model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight"])
def test_a_nan_in_a_mapped_bf16_tensor_is_refused_at_its_first_use_naming_the_tensor(tmp_path, name):
    """Mapped weights are not read at load (that is the point of mapping), so the check runs as rows are first
    widened: the first forward that reads the tensor names it (the embedding: when the bad row is looked up)."""
    model = minispec.load(with_a_bf16_nan(tmp_path, name), device="cpu", weights="mapped")   # nothing read yet
    with pytest.raises(ValueError, match=name.replace(".", r"\.") + ".*NaN or inf"):
        model.forward([1, 3, 2])


@pytest.mark.parametrize("name", ["model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight"])
def test_a_nan_in_a_bf16_tensor_is_refused_at_a_widened_load_naming_the_tensor(tmp_path, name):
    with pytest.raises(ValueError, match=name.replace(".", r"\.") + ".*NaN or inf"):
        minispec.load(with_a_bf16_nan(tmp_path, name), device="cpu", weights="widened")


def test_an_inf_in_a_head_file_is_refused_at_load_naming_the_tensor(tmp_path, model):
    from minispec.decoders.medusa import MedusaHeads
    from minispec.decoders.medusa_files import load_heads, save
    heads = MedusaHeads.create(model, num_heads=2, num_layers=1, version="v2")
    save(heads, tmp_path)
    t = load_file(str(tmp_path / "medusa_heads.safetensors"))
    t["1.0.linear.bias"] = t["1.0.linear.bias"].copy()
    t["1.0.linear.bias"][0] = np.inf
    save_file(t, str(tmp_path / "medusa_heads.safetensors"))
    with pytest.raises(ValueError, match=r"1\.0\.linear\.bias"):
        load_heads(tmp_path, model)


def test_an_invalid_head_config_names_the_file_and_line(tmp_path, model):
    from minispec.decoders.medusa import MedusaHeads
    from minispec.decoders.medusa_files import load_heads, save
    save(MedusaHeads.create(model, num_heads=2, num_layers=1, version="v2"), tmp_path)
    (tmp_path / "medusa_config.json").write_text('{"kind": "medusa",\n "num_heads": 2\n "x": 1}')
    with pytest.raises(ValueError, match=r"medusa_config.json.*line 3"):
        load_heads(tmp_path, model)


# ---- tokenizer ------------------------------------------------------------------------------------------------------
def test_the_tokenizer_is_at_the_top_level():
    assert minispec.Tokenizer is minispec.mistral.tokenizer.Tokenizer


def test_text_that_is_not_valid_utf8_is_refused_by_the_tokenizer():
    from conftest import SHIPPED
    tok = minispec.Tokenizer.from_dir(SHIPPED)
    with pytest.raises(ValueError, match=r"UTF-8 \(byte 0xff at character 4\)"):
        tok.encode("def \udcff(x):")
    with pytest.raises(ValueError, match="str"):
        tok.encode(b"def f(x):")


def test_a_model_without_a_window_refuses_a_generation_longer_than_its_cache_before_starting():
    cfg = tiny_config(sliding_window=None, max_seq_len=16)
    m = Model(cfg, random_tensors(cfg), device="cpu")
    with pytest.raises(ValueError, match=r"prompt \(10 tokens\) \+ max_new_tokens \(8\).*16"):
        generate(m, list(range(1, 11)), max_new_tokens=8, eos_id=None)
    assert len(generate(m, list(range(1, 11)), max_new_tokens=7, eos_id=None).tokens) == 7


def test_a_bad_eos_id_and_a_bad_acceptance_rule_are_named(model):
    with pytest.raises(ValueError, match="eos_id"):
        generate(model, [1, 2], eos_id=-3)
    with pytest.raises(ValueError, match="acceptance.*'lossy'"):
        generate(model, [1, 2], acceptance="lossy")


def test_forward_block_refuses_depths_or_a_mask_that_do_not_match_the_block(model):
    with pytest.raises(ValueError, match=r"depths \[3\].*parents_mask \[3, 3\].*\[2\]"):
        model.forward_block([1, 2, 3], model.new_cache(), depths=[0, 1])
    with pytest.raises(ValueError, match=r"\[2, 2\]"):
        model.forward_block([1, 2, 3], model.new_cache(), parents_mask=np.ones((2, 2), bool))


def test_decoding_an_id_outside_the_vocabulary_is_refused_naming_it():
    from conftest import SHIPPED
    tok = minispec.Tokenizer.from_dir(SHIPPED)
    for bad in (tok.vocab_size, -1, 1.5):
        with pytest.raises(ValueError, match=rf"{bad}.*\[0, {tok.vocab_size}\)"):
            tok.decode([1, 5, bad])
    assert tok.decode(np.array([5, 6])) == tok.decode([5, 6])


def test_the_finite_check_refuses_nan_and_inf_but_accepts_huge_finite_values_whose_sum_overflows():
    """The cheap path is a float32 sum: a sum that overflows on finite values must not be mistaken for a NaN."""
    from minispec.errors import check_finite
    huge = np.full((4, 4), 3e38, np.float32)                   # the float32 sum is inf; every value is finite
    with np.errstate(over="ignore"):
        assert not np.isfinite(np.add.reduce(huge.reshape(-1), dtype=np.float32))
    check_finite(huge, "huge", "f.safetensors")
    for dtype in (np.float16, np.float32, np.float64):
        for bad in (np.nan, np.inf, -np.inf):
            a = np.zeros((3, 5), dtype)
            a[2, 1] = bad
            with pytest.raises(ValueError, match=r"f\.safetensors: tensor 'w' holds .*index \[2, 1\]"):
                check_finite(a, "w", "f.safetensors")
    check_finite(np.arange(6, dtype=np.int64), "ids", "f.safetensors")     # integer tensors hold no NaN


@pytest.mark.parametrize("read,value,message", [
    (lambda f: f.str("name"), 3, "c.json: key 'name' must be a string, got 3"),
    (lambda f: f.choice("name", ("mlp", "prefix-mlp")), "gru", "c.json: key 'name' must be one of 'mlp', 'prefix-mlp', "
                                                                "got 'gru'"),
    (lambda f: f.choice("name", ("mlp",)), 1, "c.json: key 'name' must be one of 'mlp', got 1"),
    (lambda f: f.table("name"), [1, 2], "c.json: key 'name' must be a JSON object, got [1, 2]")])
def test_the_config_readers_str_choice_and_table_name_the_file_the_key_and_the_value(read, value, message):
    """Each message written out by hand: the file, the key, what it must be, the value given."""
    from minispec.errors import Fields, UserError
    with pytest.raises(UserError) as e:
        read(Fields({"name": value}, "c.json"))
    assert str(e.value) == message


def test_the_config_readers_str_choice_and_table_return_the_value_or_the_default_where_the_key_is_absent_or_null():
    from minispec.errors import REQUIRED, Fields, UserError
    f = Fields({"s": "x", "c": "mlp", "t": {"a": 1}, "null": None}, "c.json", what=" (a hydra config)")
    assert f.str("s") == "x" and f.choice("c", ("mlp",)) == "mlp" and f.table("t") == {"a": 1}
    for read in (lambda k, d: f.str(k, d), lambda k, d: f.choice(k, ("mlp",), d), lambda k, d: f.table(k, d)):
        assert read("gone", None) is None and read("null", "dflt") == "dflt"
        with pytest.raises(UserError, match=r"^c\.json: missing key 'gone' \(a hydra config\)$"):
            read("gone", REQUIRED)
