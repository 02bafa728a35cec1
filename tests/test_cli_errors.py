"""The command line's contract for user mistakes: one line `minispec: error: ...` on stderr naming the argument
and what would be right, exit status 2, no traceback, nothing on stdout, and the model never loaded first.
(docs/errors.md lists every message.)"""
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, SHIPPED

import minispec.mistral.model


def run_cli(argv, capsys):
    """(exit status, stdout, stderr) of `minispec ARGV` run in-process."""
    from minispec.cli import main
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    return e.value.code, out, err


@pytest.fixture
def no_loading(monkeypatch):
    """Arguments must be checked before the weights are read: reading them fails the test."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")
    monkeypatch.setattr(minispec.mistral.model, "load_tensors", refuse)


def user_error(argv, capsys, *names):
    """Run the CLI expecting one user error; assert the contract and that the message names each of `names`."""
    code, out, err = run_cli(argv, capsys)
    assert code == 2, err
    assert out == "", "nothing may be printed before the arguments are checked"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("minispec: error: "), err
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


# ---- generate ---------------------------------------------------------------------------------------------------
def test_an_unknown_decoder_is_refused_naming_it_and_the_registered_ones(capsys, no_loading):
    user_error(["generate", "--decoder", "nonsense"], capsys, "nonsense", "ar", "medusa")


@pytest.mark.parametrize("flag,value", [("--top-p", "1.5"), ("--top-p", "0"), ("--top-p", "nan"),
                                        ("--temperature", "-1"), ("--temperature", "nan"),
                                        ("--temperature", "inf"), ("--top-k", "-1"), ("--seed", "-1"),
                                        ("-n", "-1")])
def test_a_sampling_parameter_out_of_range_is_refused_naming_the_flag_and_the_value(capsys, no_loading, flag, value):
    user_error(["generate", flag, value], capsys, flag, value)


@pytest.mark.parametrize("flag,value", [("-n", "1.5"), ("--top-k", "two"), ("--seed", "0.5"),
                                        ("--temperature", "warm")])
def test_a_parameter_of_the_wrong_type_is_refused_in_one_line(capsys, no_loading, flag, value):
    user_error(["generate", flag, value], capsys, flag, value)


def test_a_missing_model_folder_is_refused_saying_to_pass_model(capsys, tmp_path):
    user_error(["generate", "--model", str(tmp_path / "no_such_dir")], capsys, "no_such_dir", "--model")


def test_a_model_path_that_is_a_file_is_refused(capsys, tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    user_error(["generate", "--model", str(f)], capsys, "model.safetensors", "--model")


def test_a_folder_without_a_config_is_refused_naming_the_files_looked_for(capsys, tmp_path):
    user_error(["generate", "--model", str(tmp_path)], capsys, "config.json", "params.json")


def test_a_model_folder_without_a_tokenizer_is_refused_before_the_model_loads(capsys, tmp_path, no_loading):
    shutil.copy(SHIPPED / "config.json", tmp_path / "config.json")
    user_error(["generate", "--model", str(tmp_path)], capsys, "tokenizer.model")


def test_cuda_without_a_gpu_is_refused_in_one_line(capsys, no_loading):
    from minispec.backend import _try_cupy
    if _try_cupy() is not None:
        pytest.skip("this machine has a GPU")
    user_error(["generate", "--device", "cuda"], capsys, "cuda", "--device")


@pytest.mark.parametrize("flag,value", [("--device", "tpu"), ("--dtype", "float8")])
def test_a_choice_outside_the_choices_is_refused_listing_them(capsys, flag, value):
    user_error(["generate", flag, value], capsys, flag, value, "choose from")


def test_a_prompt_that_is_not_valid_utf8_is_refused_in_one_line(tmp_path):
    """sys.argv carries undecodable bytes as lone surrogates (surrogateescape); they must not reach the tokenizer."""
    r = subprocess.run([sys.executable.encode(), b"-m", b"minispec", b"generate", b"--device", b"cpu",
                        b"--prompt", b"def \xff\xfe(x):"], capture_output=True, cwd=REPO, timeout=120)
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 2, err
    assert r.stdout == b"" and len(err.strip().splitlines()) == 1 and err.startswith("minispec: error: ")
    assert "--prompt" in err and "UTF-8" in err


def test_heads_from_a_missing_folder_are_refused_naming_it(capsys, tmp_path, no_loading):
    user_error(["generate", "--decoder", "medusa", "--heads", str(tmp_path / "gone")], capsys, "gone", "--heads")


def test_heads_for_a_decoder_without_heads_are_refused(capsys, no_loading):
    user_error(["generate", "--decoder", "ar", "--heads", str(SHIPPED / "medusa")], capsys, "--heads", "ar")


def test_generate_takes_medusa_heads_from_another_folder(tmp_path):
    heads = tmp_path / "my_heads"
    shutil.copytree(SHIPPED / "medusa", heads)
    r = subprocess.run([sys.executable, "-m", "minispec", "generate", "--decoder", "medusa", "--device", "cpu",
                        "--heads", str(heads), "--prompt", "def f(x):", "-n", "8"],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "[medusa] 8 tokens" in r.stderr


def test_no_command_is_one_line_naming_the_commands(capsys):
    user_error([], capsys, "generate", "bench", "train-heads")


def test_an_unknown_option_is_one_line_naming_it(capsys):
    user_error(["generate", "--temprature", "0.7"], capsys, "--temprature")


# ---- bench --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,names", [(["bench", "decode", "--runs", "0"], ["--runs", "0"]),
                                        (["bench", "forward", "--runs", "0"], ["--runs", "0"]),
                                        (["bench", "decode", "--prompts", "0"], ["--prompts", "0"]),
                                        (["bench", "forward", "-n", "1"], ["-n", "1"]),
                                        (["bench", "decode", "-n", "1"], ["-n", "1"]),
                                        (["bench", "decode", "--decoders", "ar,nonsense"], ["nonsense", "medusa"]),
                                        (["bench", "decode", "--decoders", ""], ["--decoders"])])
def test_a_bench_option_that_would_measure_nothing_is_refused(capsys, no_loading, argv, names):
    user_error(argv, capsys, *names)


# ---- train-heads --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["medusa", "hydra", "hydra++"])
def test_train_heads_without_a_corpus_says_how_to_build_one(capsys, tmp_path, no_loading, kind):
    user_error(["train-heads", "--kind", kind, "--text", str(tmp_path / "train.txt")], capsys,
               f"argument --text: {tmp_path / 'train.txt'}: no such corpus file", "tools/collect_corpus.py")


def test_search_skip_without_its_calibration_text_is_one_line_before_the_model_loads(capsys, tmp_path, no_loading):
    user_error(["search-skip", "--text", str(tmp_path / "none.txt"), "--trace", str(tmp_path / "trace.json")],
               capsys, f"argument --text: {tmp_path / 'none.txt'}: no such corpus file", "tools/collect_corpus.py")


@pytest.mark.parametrize("flag,value", [("--heads", "0"), ("--layers", "-1"), ("--tokens", "0"),
                                        ("--seq-len", "1"), ("--epochs", "0"), ("--lr", "-0.001"),
                                        ("--lr", "nan"), ("--batch", "0"), ("--budget", "-1"),
                                        ("--top-k", "0"), ("--seed", "-1")])
def test_a_training_option_out_of_range_is_refused(capsys, no_loading, tmp_path, flag, value):
    text = tmp_path / "train.txt"
    text.write_text("def f():\n    return 1\n")
    user_error(["train-heads", "--text", str(text), flag, value], capsys, flag, value)


def test_an_unknown_head_kind_is_refused_listing_the_kinds(capsys):
    user_error(["train-heads", "--kind", "nonsense"], capsys, "nonsense", "medusa")


# ---- help and version ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cmd", [["generate"], ["bench"], ["train-heads"]])
def test_the_help_of_every_command_shows_defaults_and_choices(capsys, cmd):
    code, out, _ = run_cli(cmd + ["--help"], capsys)
    assert code == 0
    out = " ".join(out.split())         # argparse wraps lines to the terminal's width
    assert "default" in out and "{auto,cpu,cuda}" in out and "default: auto" in out
    if cmd == ["generate"]:
        from minispec.decoders.registry import DECODERS
        assert "{" + ",".join(sorted(DECODERS)) + "}" in out and "medusa" in DECODERS    # choices = the registry
        assert "default: 64" in out and "temperature 0" in out
    if cmd == ["bench"]:
        assert "default: 5" in out and "{forward,decode}" in out


def test_version_prints_the_package_version(capsys):
    import minispec
    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0 and out.strip() == f"minispec {minispec.__version__}"


# ---- the main command outside the source folder -----------------------------------------------------------------------
def test_the_main_command_works_from_another_directory(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "minispec", "generate", "--device", "cpu", "--prompt", "def f(x):",
                        "-n", "4"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("def f(x):") and "[ar] 4 tokens" in r.stderr


def test_after_a_non_editable_install_the_default_model_says_to_pass_model(tmp_path):
    """A wheel holds the package, not weights/: without --model, one line saying what to pass; with it, text."""
    target, src = tmp_path / "site", tmp_path / "src"
    for name in ("pyproject.toml", "README.md", "LICENSE"):      # a copy: the build writes build/ and *.egg-info
        src.mkdir(exist_ok=True)
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "minispec", src / "minispec", ignore=shutil.ignore_patterns("__pycache__"))
    # build isolation: pip fetches setuptools >= 77 (the SPDX license string) from the configured index
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                        str(src)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    if r.returncode != 0:
        pytest.skip(f"pip cannot build the package here (no index with setuptools >= 77?): {r.stderr[-300:]}")
    assert not (target / "weights").exists()
    meta = next(target.glob("minispec-*.dist-info"))            # pip's license metadata comes from pyproject
    assert "License-Expression: Apache-2.0" in (meta / "METADATA").read_text()
    assert (meta / "licenses" / "LICENSE").read_text() == (REPO / "LICENSE").read_text()
    env = dict(os.environ, PYTHONPATH=str(target))
    code = "import minispec, sys; print(minispec.__file__)"
    where = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert where.stdout.startswith(str(target)), where.stdout + where.stderr
    r = subprocess.run([sys.executable, "-m", "minispec", "generate", "-n", "4"], capture_output=True, text=True,
                       cwd=tmp_path, env=env, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("minispec: error: ") and "--model" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "minispec", "generate", "--model", str(SHIPPED), "--device", "cpu",
                        "--prompt", "def f(x):", "-n", "4"], capture_output=True, text=True, cwd=tmp_path, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("def f(x):")


def test_docs_errors_md_shows_the_messages_the_command_line_gives(capsys, monkeypatch):
    """Every plain row of the command-line table in docs/errors.md, run: the doc quotes the real message."""
    import re
    import shlex
    from minispec.backend import _try_cupy
    monkeypatch.chdir(REPO)                     # the rows use paths relative to the repository
    table = (REPO / "docs" / "errors.md").read_text().split("## Command line")[1].split("## Python API")[0]
    rows = re.findall(r"^\| `minispec ([^`$]*)` \| `` ?(.*?) ?`` \|$|^\| `minispec ([^`$]*)` \| `([^`]*)` \|$",
                      table, re.M)
    from minispec.decoders.registry import DECODERS, decoder_options, decoders_with_heads
    from minispec.mistral.model import DTYPES
    # lists that grow with the registries (new decoders, dtypes, a decoder's options) are compared as they are now
    now = {"'ar', 'medusa'": ", ".join(repr(d) for d in sorted(DECODERS)),
           "'float32', 'float64'": ", ".join(repr(d) for d in DTYPES),
           "with heads: medusa": "with heads: " + ", ".join(decoders_with_heads()),
           "its options: heads, tree, max_nodes, max_depth, top_k, width, costs, depth_costs, cap":
               "its options: " + ", ".join(decoder_options("hydra")[0])}
    checked = 0
    for a, b, c, d in rows:
        command, message = (a, b) if a or b else (c, d)
        for then, current in now.items():
            message = message.replace(then, current)
        if "--device cuda" in command and _try_cupy() is not None:
            continue
        code, out, err = run_cli(shlex.split(command), capsys)
        assert code == 2 and err.strip() == message, (command, err)
        checked += 1
    assert checked >= 20


def shipped_copy(tmp_path, without=("medusa", "hydra*", "draft_verify")):
    """tmp_path/model: the shipped model without the decoders' files named in `without`."""
    folder = tmp_path / "model"
    shutil.copytree(SHIPPED, folder, ignore=shutil.ignore_patterns(*without))
    return folder


def test_a_decoder_whose_heads_are_missing_fails_before_the_prompt_is_printed(capsys, tmp_path):
    """The model loads, but the decoder's heads are not next to it: one line, and no half-printed output."""
    folder = shipped_copy(tmp_path)
    user_error(["generate", "--model", str(folder), "--decoder", "medusa", "--device", "cpu"], capsys,
               "Medusa heads", "train-heads")


@pytest.mark.parametrize("decoder, words", [("hydra", ["hydra heads", "train-heads --kind hydra"]),
                                            ("hydra++", ["hydra++ heads", "train-heads --kind hydra++"]),
                                            ("draft_verify", ["skip set", "search-skip"])])
def test_the_new_decoders_without_their_files_fail_in_one_line_saying_how_to_make_them(capsys, tmp_path, decoder,
                                                                                       words):
    folder = shipped_copy(tmp_path)
    user_error(["generate", "--model", str(folder), "--decoder", decoder, "--device", "cpu"], capsys, *words)


def test_a_broken_skip_set_file_is_refused_in_one_line_naming_the_file_and_key(capsys, tmp_path):
    folder = shipped_copy(tmp_path, without=("medusa", "hydra*"))
    (folder / "draft_verify" / "skip_set.json").write_text('{"attention": [1], "mlp": "three", "n_layers": 6}')
    user_error(["generate", "--model", str(folder), "--decoder", "draft_verify", "--device", "cpu"], capsys,
               "skip_set.json", "'mlp'")


def test_heads_that_do_not_fit_the_model_are_refused_in_one_line(capsys, tmp_path):
    heads = tmp_path / "heads"
    shutil.copytree(SHIPPED / "medusa", heads)
    import json
    cfg = json.loads((heads / "medusa_config.json").read_text())
    (heads / "medusa_config.json").write_text(json.dumps(dict(cfg, hidden_size=cfg["hidden_size"] + 1)))
    user_error(["generate", "--decoder", "medusa", "--heads", str(heads), "--device", "cpu"], capsys,
               "medusa_config.json", "hidden_size")
