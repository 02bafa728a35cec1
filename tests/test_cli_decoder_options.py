"""Decoder options on the command line: `minispec generate --tree/--max-nodes/--acceptance/--option KEY=VALUE` and
`minispec bench decode --decoders ar,hydra:tree=dynamic:max_nodes=4` reach the decoder as the Python API's
keyword options would; a mistake in them is one `minispec: error:` line naming the flag, the decoder and the
option, exit status 2, nothing on stdout."""
import functools

import pytest

from test_cli_errors import no_loading, run_cli, user_error                  # noqa: F401 (a fixture)

import minispec.bench
import minispec.cli
from minispec.decoders import registry
from minispec.decoders.registry import option_value, parse_setup, parse_setups, setup_label, split_outside
from minispec.errors import UserError


# ---------------------------------------------------------------------------------------------------------
# The text syntax, on hand-worked examples
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,value", [("3", 3), ("0.5", 0.5), ("true", True), ("False", False), ("null", None),
                                        ("None", None), ("auto", "auto"), ("dynamic", "dynamic"),
                                        ("[[0],[0, 0]]", [[0], [0, 0]]), ('"3"', "3"), ("a/b.json", "a/b.json"),
                                        ('{"1": 1.0, "2": 1.5}', {1: 1.0, 2: 1.5}),
                                        ('{"a": 1, "2": 3}', {"a": 1, "2": 3}), (" 4 ", 4)])
def test_an_option_value_is_json_where_it_parses_python_words_and_otherwise_the_text(text, value):
    got = option_value(text)
    assert got == value and type(got) is type(value)


def test_the_decoder_list_is_split_at_commas_and_colons_outside_brackets_and_quotes():
    assert split_outside("ar,medusa:tree=[[0],[1]],hydra", ",") == ["ar", "medusa:tree=[[0],[1]]", "hydra"]
    assert split_outside('draft_verify:skip="a:b":max_draft=2', ":") == ["draft_verify", 'skip="a:b"', "max_draft=2"]
    assert split_outside("ar", ",") == ["ar"]


def test_a_setup_is_the_decoder_name_and_its_typed_options_and_its_label_reads_back_as_the_same_setup():
    setup = ("hydra", {"tree": "dynamic", "max_nodes": "auto", "top_k": 2})
    assert parse_setup("hydra:tree=dynamic:max_nodes=auto:top_k=2") == setup
    assert setup_label(*setup) == "hydra:tree=dynamic:max_nodes=auto:top_k=2"
    for name, options in [("medusa", {"tree": [[0], [0, 0]]}), ("draft_verify", {"skip": "a:b,c"}),
                          ("lookup", {"costs": {1: 1.0, 4: 2.0}}),
                          ("lookup", {"sizing": "3"}), ("ar", {})]:
        assert parse_setup(setup_label(name, options)) == (name, options)
    assert setup_label("medusa", {"tree": [[0], [0, 0]]}) == "medusa:tree=[[0],[0,0]]"
    assert list(parse_setups(["ar", "hydra", "hydra:max_depth=2"])) == ["ar", "hydra", "hydra:max_depth=2"]


@pytest.mark.parametrize("spec,words", [("ar:tree=dynamic", ["'ar'", "'tree'", "no options"]),
                                        ("hydra:foo=1", ["'hydra'", "'foo'", "tree, max_nodes"]),
                                        ("hydra:max_nodes", ["'max_nodes'", "KEY=VALUE"]),
                                        ("hydra:=4", ["'=4'", "KEY=VALUE"]),
                                        ("lookup:max_draft=2:max_draft=3", ["'max_draft'", "twice"]),
                                        ("nonsense:x=1", ["'nonsense'", "'medusa'"])])
def test_a_bad_setup_is_one_error_naming_the_decoder_and_the_option(spec, words):
    with pytest.raises(UserError) as e:
        parse_setup(spec)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_the_same_setup_twice_is_refused_even_when_spelled_differently():
    with pytest.raises(UserError, match="listed twice"):
        parse_setups(["ar", "medusa:tree=[[0],[0,0]]", "medusa:tree=[[0], [0, 0]]"])


# ---------------------------------------------------------------------------------------------------------
# generate: mistakes, all refused in one line (before the model loads where the value is not needed)
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,names", [
    (["--decoder", "ar", "--tree", "dynamic"], ["argument --tree", "'ar'", "no options"]),
    (["--decoder", "ar", "--max-nodes", "4"], ["argument --max-nodes", "'ar'", "'max_nodes'"]),
    (["--decoder", "hydra", "--option", "foo=1"], ["argument --option", "'hydra'", "'foo'", "max_nodes, max_depth"]),
    (["--decoder", "lookup", "--option", "max_nodes=4"], ["argument --option", "'lookup'", "max_draft"]),
    (["--decoder", "medusa", "--option", "temperature=0.5"], ["argument --option", "'temperature'"]),
    (["--decoder", "hydra", "--option", "max_nodes"], ["argument --option", "KEY=VALUE"]),
    (["--decoder", "hydra", "--tree", "dynamic", "--option", "tree=dynamic"], ["--tree", "--option", "twice"]),
    (["--decoder", "hydra", "--option", "top_k=2", "--option", "top_k=3"], ["--option", "top_k", "twice"]),
    (["--acceptance", "greedy", "--temperature", "0.5"], ["argument --acceptance", "temperature"]),
    (["--acceptance", "sloppy"], ["--acceptance", "'sloppy'", "typical"])])
def test_a_decoder_option_mistake_is_one_line_before_the_model_loads(capsys, no_loading, argv, names):
    user_error(["generate", *argv], capsys, *names)


@pytest.mark.parametrize("argv,names", [
    (["--decoder", "hydra", "--tree", "dynamic", "--max-nodes", "-3"], ["max_nodes", "-3"]),
    (["--decoder", "hydra", "--max-nodes", "4"], ["max_nodes", "tree='dynamic'"]),
    (["--decoder", "lookup", "--option", "max_draft=0"], ["max_draft", "0"]),
    (["--decoder", "hydra", "--tree", "dynamic", "--acceptance", "block", "--temperature", "0.7"],
     ["argument --acceptance", "chains", "'hydra'"]),
    (["--decoder", "medusa", "--tree", "[[0],[1]]", "--acceptance", "block", "--temperature", "0.7"],
     ["argument --acceptance", "chains", "'medusa'"])])
def test_a_bad_option_value_is_one_line_before_any_output(capsys, argv, names):
    """Values are checked by the decoder itself, once the model is loaded: still one line, nothing printed."""
    user_error(["generate", "--device", "cpu", "-n", "4", *argv], capsys, *names)


# ---------------------------------------------------------------------------------------------------------
# generate: the options reach the decoder, and greedy output stays plain decoding's
# ---------------------------------------------------------------------------------------------------------
def spy_on(monkeypatch, name):
    """Record the options every proposer of decoder `name` is made with, and the proposer."""
    made, real = [], registry.DECODERS[name]

    @functools.wraps(real)                      # the same signature: check_decoder still reads its options
    def factory(model, **options):
        proposer = real(model, **options)
        made.append((options, proposer))
        return proposer
    monkeypatch.setitem(registry.DECODERS, name, factory)
    return made


def generate_text(argv, capsys):
    """(stdout, stderr) of a `minispec generate` that succeeds, in-process, on the shipped model."""
    minispec.cli.main(["generate", "--device", "cpu", "--prompt", "def f(x):", "-n", "24", *argv])
    return capsys.readouterr()


def test_generate_passes_tree_and_max_nodes_to_hydra_and_its_greedy_text_is_plain_decodings(capsys, monkeypatch):
    plain, _ = generate_text(["--decoder", "ar"], capsys)
    made = spy_on(monkeypatch, "hydra")
    text, err = generate_text(["--decoder", "hydra", "--tree", "dynamic", "--max-nodes", "4"], capsys)
    options, proposer = made[0]
    assert options == {"tree": "dynamic", "max_nodes": 4}
    assert proposer.dynamic is not None and proposer.dynamic.max_nodes == 4
    assert text == plain and text.startswith("def f(x):")
    assert "[hydra:tree=dynamic:max_nodes=4] 24 tokens" in err


def test_generate_passes_a_json_tree_and_any_option_through_option(capsys, monkeypatch):
    plain, _ = generate_text(["--decoder", "ar"], capsys)
    made = spy_on(monkeypatch, "medusa")
    text, err = generate_text(["--decoder", "medusa", "--option", "tree=[[0],[0,0],[1]]", "--option", "top_k=3"],
                              capsys)
    options, proposer = made[0]
    assert options == {"tree": [[0], [0, 0], [1]], "top_k": 3}
    assert proposer.tree.N == 4 and proposer.tree.max_depth == 2 and proposer.top_k == 3
    assert text == plain and "[medusa:tree=[[0],[0,0],[1]]:top_k=3]" in err


def test_generate_passes_the_acceptance_rule_to_generate(capsys, monkeypatch):
    calls, real = [], minispec.cli.generate

    def spy(*args, **kw):
        calls.append(kw["acceptance"])
        return real(*args, **kw)
    monkeypatch.setattr(minispec.cli, "generate", spy)
    generate_text(["--decoder", "hydra", "--tree", "[[0],[0,0]]", "--acceptance", "block", "--temperature", "0.7"],
                  capsys)
    generate_text(["--decoder", "medusa", "--acceptance", "typical", "--temperature", "0.7"], capsys)
    generate_text(["--decoder", "medusa"], capsys)
    assert calls == ["block", "typical", None]


# ---------------------------------------------------------------------------------------------------------
# bench decode: setups with options, labelled, each its own row
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("decoders,names", [("ar,hydra:foo=1", ["argument --decoders", "'hydra'", "'foo'"]),
                                            ("ar,hydra:max_nodes", ["argument --decoders", "KEY=VALUE"]),
                                            ("ar,ar", ["argument --decoders", "twice"]),
                                            ("ar,lookup:max_draft=2:max_draft=3", ["--decoders", "twice"])])
def test_a_bad_bench_setup_is_one_line_before_the_model_loads(capsys, no_loading, decoders, names):
    user_error(["bench", "decode", "--decoders", decoders], capsys, *names)


def test_bench_decode_runs_each_setup_with_its_options_under_its_label(cli_model, capsys, monkeypatch):
    """On a tiny model: lookup twice, once with max_draft=2: every proposer the bench makes for that row gets
    the option, the default row none, and each row is printed under its label, its output plain decoding's."""
    import minispec.bench.decode
    made, calls, real = spy_on(monkeypatch, "lookup"), [], minispec.bench.decode.generate

    def spy(model, ids, decoder, max_new_tokens, eos_id=2, **options):
        calls.append((decoder, options))
        return real(model, ids, decoder=decoder, max_new_tokens=max_new_tokens, eos_id=eos_id, **options)
    monkeypatch.setattr(minispec.bench.decode, "generate", spy)
    folder, _, _ = cli_model
    minispec.cli.main(["bench", "decode", "--model", str(folder), "--device", "cpu", "-n", "8", "--prompts", "1",
                       "--runs", "1", "--prompt-set", "copy", "--decoders", "ar,lookup,lookup:max_draft=2"])
    out = capsys.readouterr().out
    # the warm-up, then the one timed run on the one prompt, interleaved: each setup with its own options
    assert calls == [("ar", {}), ("lookup", {}), ("lookup", {"max_draft": 2})] * 2
    assert {str(o) for o, _ in made} == {"{}", "{'max_draft': 2}"}
    assert all(p.max_draft == (2 if o else 8) for o, p in made)         # 8: lookup's documented default
    rows = [ln.split(":  ")[0].strip() for ln in out.splitlines() if "tokens/s  tau =" in ln]
    assert rows == ["ar", "lookup", "lookup:max_draft=2"]
    assert out.count("identical output: yes") == 3
    assert "lookup:max_draft=2: per-depth acceptance" in out


@pytest.mark.parametrize("flag,control", [([], False), (["--control"], True)])
def test_bench_decodes_control_flag_reaches_the_bench(cli_model, monkeypatch, flag, control):
    seen = {}
    monkeypatch.setattr(minispec.bench, "bench_decode", lambda *a, **kw: seen.update(kw))
    folder, _, _ = cli_model
    minispec.cli.main(["bench", "decode", "--model", str(folder), "--device", "cpu", "--decoders", "ar"] + flag)
    assert seen["control"] is control
