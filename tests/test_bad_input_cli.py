"""Bad input on the command line (issue 18, "Training and search arguments"): train-heads and search-skip check
every option, for every --kind, before the model loads; a foreign or broken search trace is refused then too.
Each case is one `minispec: error:` line naming the flag, exit status 2, nothing on stdout."""
import json

import pytest

from conftest import SHIPPED, random_tensors, tiny_config
from test_bad_input import DROP
from test_cli_errors import no_loading, user_error                      # noqa: F401 (a fixture)
from test_weights import write_hf


# ---------------------------------------------------------------------------------------------------------
# The command line: training and search arguments, all checked before the model loads
# ---------------------------------------------------------------------------------------------------------
KINDS = ["medusa", "hydra", "hydra++"]


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("def f():\n    return 1\n")
    return str(path)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("where", ["the folder itself", "a folder above it"])
def test_train_heads_out_naming_an_existing_file_fails_before_training(capsys, tmp_path, no_loading, text, kind,
                                                                       where):
    (tmp_path / "heads").write_text("not a folder")
    out = tmp_path / "heads" if where == "the folder itself" else tmp_path / "heads" / "sub"
    user_error(["train-heads", "--kind", kind, "--text", text, "--out", str(out)], capsys, "argument --out",
               str(tmp_path / "heads"), "is a file")


@pytest.mark.parametrize("flag,value", [("--heads", "0"), ("--tokens", "0"), ("--seq-len", "1"), ("--seq-len", "5"),
                                        ("--epochs", "0"), ("--lr", "-0.001"), ("--lr", "nan"), ("--batch", "0"),
                                        ("--budget", "-1"), ("--top-k", "0"), ("--seed", "-1"),
                                        ("--hydra-layers", "0"), ("--lm-weight", "-1"), ("--teacher-weight", "nan"),
                                        ("--layers", "2")])
@pytest.mark.parametrize("kind", ["hydra", "hydra++"])
def test_hydra_training_gets_every_check_medusa_training_gets(capsys, no_loading, text, kind, flag, value):
    user_error(["train-heads", "--kind", kind, "--text", text, flag, value], capsys, flag)


@pytest.mark.parametrize("version,shared", [("v1", False), ("v2", True)])
@pytest.mark.parametrize("kind", ["hydra", "hydra++"])
def test_train_heads_version_v2_trains_hydra_heads_that_share_the_output_layer(monkeypatch, no_loading, text,
                                                                                tmp_path, kind, version, shared):
    import minispec.cli as cli
    got = {}
    monkeypatch.setattr(cli, "train_hydra", lambda *a, **k: got.update(k))
    cli.main(["train-heads", "--kind", kind, "--text", text, "--version", version, "--out", str(tmp_path / "h")])
    assert got["kind"] == kind and got["shared_output"] is shared


@pytest.mark.parametrize("flag,value", [("--hydra-layers", "2"), ("--lm-weight", "0.5"), ("--teacher-weight", "1"),
                                        ("--data-cache", "x.npz"), ("--checkpoint", "ck")])
def test_a_hydra_option_given_to_medusa_training_is_refused_not_ignored(capsys, no_loading, text, flag, value):
    user_error(["train-heads", "--kind", "medusa", "--text", text, flag, value], capsys, flag, "hydra")


def test_hydra_training_with_both_loss_weights_zero_and_bad_cache_paths_is_refused(capsys, no_loading, text,
                                                                                   tmp_path):
    user_error(["train-heads", "--kind", "hydra", "--text", text, "--lm-weight", "0"], capsys,
               "both loss weights are 0", "--lm-weight")
    (tmp_path / "cache.npz").mkdir()
    user_error(["train-heads", "--kind", "hydra", "--text", text, "--data-cache", str(tmp_path / "cache.npz")],
               capsys, "argument --data-cache", "is a folder")
    (tmp_path / "ck.json").mkdir()
    user_error(["train-heads", "--kind", "hydra++", "--text", text, "--checkpoint", str(tmp_path / "ck")],
               capsys, "argument --checkpoint", "is a folder")


def trace_file(tmp_path, **change):
    """The shipped search trace with some header fields changed ("calibration__starts": a key inside one)."""
    d = json.loads((SHIPPED / "draft_verify" / "search_trace.json").read_text())
    for k, v in change.items():
        where, k = (d[k.split("__")[0]], k.split("__")[1]) if "__" in k else (d, k)
        if v is DROP:
            where.pop(k)
        else:
            where[k] = v
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(d))
    return str(path)


@pytest.mark.parametrize("argv,names", [
    (["--budget", "0"], ["--budget"]), (["--prompts", "0"], ["--prompts"]), (["--prompt-len", "0"], ["--prompt-len"]),
    (["--new", "0"], ["--new"]), (["--seed", "-1"], ["--seed"]), (["--method", "grid"], ["--method", "grid"]),
    (["--method", "random,random"], ["--method"]), (["--method", ""], ["--method"]),
    (["--write", "--min-match", "1.5"], ["--min-match", "1.5"]), (["--min-match", "0.5"], ["--min-match", "--write"]),
    (["--write", "--objective", "measured", "--min-match", "0.5"], ["--min-match", "predicted"])])
def test_search_skip_checks_every_option_before_the_model_loads(capsys, no_loading, tmp_path, text, argv, names):
    user_error(["search-skip", "--method", "random", "--text", text, "--trace", str(tmp_path / "t.json"), *argv],
               capsys, *names)


@pytest.mark.parametrize("change,words", [({"n_layers": 4, "cost_model__n_layers": 4}, ["4-layer", "6 layers"]),
                                          ({"format": "other/1"}, ["not a skip-search trace"]),
                                          ({"cost_model__n_layers": 4}, ["cost_model", "4 layers"]),
                                          ({"calibration__starts": DROP}, ["'starts'"]),
                                          ({"calibration__sequences": [[1, 2, 99999]], "calibration__starts": [1]},
                                           ["99999", "vocabulary"]),
                                          ({"cost_model": {"n_layers": 6}}, ["'base'"]),
                                          ({"runs": []}, ["'runs'"])])
def test_a_foreign_or_broken_search_trace_is_refused_before_the_model_loads(capsys, no_loading, tmp_path, change,
                                                                           words):
    user_error(["search-skip", "--method", "random", "--trace", trace_file(tmp_path, **change)], capsys,
               "trace.json", *words)


def test_a_search_trace_that_is_a_folder_or_not_json_is_one_line(capsys, no_loading, tmp_path):
    (tmp_path / "dir.json").mkdir()
    user_error(["search-skip", "--method", "random", "--trace", str(tmp_path / "dir.json")], capsys, "--trace",
               "is a folder")
    (tmp_path / "bad.json").write_text("{")
    user_error(["search-skip", "--method", "random", "--trace", str(tmp_path / "bad.json")], capsys, "bad.json",
               "invalid JSON")


def test_a_tokenizer_larger_than_the_models_vocabulary_and_top_k_past_it_are_refused(tmp_path, capsys, no_loading,
                                                                                      text):
    """The shipped tokenizer has 4096 pieces; a model of V = 61 cannot take its ids."""
    import shutil
    cfg = tiny_config()
    folder = write_hf(tmp_path / "m", cfg, random_tensors(cfg))
    shutil.copy(SHIPPED / "tokenizer.model", folder / "tokenizer.model")
    user_error(["generate", "--model", str(folder), "--device", "cpu"], capsys, "4096 pieces", "vocab_size (61)")
    small = write_hf(tmp_path / "s", tiny_config(vocab_size=4096), random_tensors(tiny_config(vocab_size=4096)))
    shutil.copy(SHIPPED / "tokenizer.model", small / "tokenizer.model")
    user_error(["train-heads", "--model", str(small), "--text", text, "--top-k", "5000"], capsys, "--top-k", "4096")


@pytest.mark.parametrize("argv", [["--prompts", "4"], ["--new", "20"], ["--prompt-len", "16"], ["--flat-cost"]])
def test_resuming_a_trace_with_calibration_settings_it_was_not_made_with_is_refused(capsys, no_loading, tmp_path,
                                                                                    argv):
    """The shipped trace was made with 8 prompts of 32 tokens, 48 new tokens each, a measured cost curve: a resumed
    search keeps those, so an option asking for others is refused, not silently ignored."""
    user_error(["search-skip", "--method", "random", "--trace", trace_file(tmp_path), *argv], capsys, argv[0],
               "trace.json")


def test_the_shipped_trace_resumed_with_its_own_settings_passes_the_checks(tmp_path):
    from minispec.cli import build_parser
    from minispec.cli.search_skip import check_search_skip
    path = trace_file(tmp_path)
    args = build_parser().parse_args(["search-skip", "--method", "random", "--trace", path])
    assert check_search_skip(args) == (tmp_path / "trace.json", None)
