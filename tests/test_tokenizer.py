"""Tokenizer tests: ids equal mistral-common's encoder on Mistral's real v1 tokenizer (the file the mistral-common
wheel ships as mistral_common/data/tokenizer.model.v1), decode inverts encode, and streaming decode equals full decode.
The project's own tokenizer in weights/ is checked for the same Mistral conventions."""

from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from minispec.mistral.tokenizer import Tokenizer

OWN_TOKENIZER = Path(__file__).resolve().parents[1] / "weights" / "stdlib-mistral" / "tokenizer.model"
PARROT = "\U0001f99c"  # 🦜: not a piece of Mistral's v1 vocabulary, so it is encoded as 4 byte-fallback pieces

SAMPLES = {
    "prose": "The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst of times.",
    "python": 'def add(a, b):\n    """Sum."""\n    return a + b\n\nprint(add(1, 2))  # 3\n',
    "spaces_tabs": "a  b   c    d\t\te \t f\n\n\n    indented\t",
    "digits": "In 2024 we counted 1234567890 tokens, or 3.14159 per line.",
    "emoji": f"hi {PARROT} there \U0001fae0\U0001f600!",
    "mixed": "Prix : 3,50 € — naïve café, 日本語, Ελληνικά, $x^2$ \U0001d518 <s>[INST] ok [/INST]",
}


@pytest.fixture(scope="module")
def mistral():
    """(minispec Tokenizer, mistral-common SentencePieceTokenizer) on the v1 file inside the mistral-common wheel."""
    pytest.importorskip("mistral_common", reason="mistral-common (dev extra) is needed for the reference tokenizer")
    from mistral_common.tokens.tokenizers.sentencepiece import SentencePieceTokenizer

    path = resources.files("mistral_common") / "data" / "tokenizer.model.v1"
    if not path.is_file():
        pytest.skip(f"this mistral-common version does not ship {path}")
    return Tokenizer(Path(str(path))), SentencePieceTokenizer(str(path))


@pytest.fixture(scope="module")
def own():
    return Tokenizer(OWN_TOKENIZER)


def stream_all(tok: Tokenizer, ids) -> list[str]:
    stream = tok.stream()
    return [stream.push(i) for i in ids] + [stream.flush()]


# ---------------------------------------------------------------- against mistral-common


@pytest.mark.parametrize("bos, eos", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("name", SAMPLES)
def test_encode_matches_mistral_common_encoder(mistral, name, bos, eos):
    ours, theirs = mistral
    assert ours.encode(SAMPLES[name], bos=bos, eos=eos) == theirs.encode(SAMPLES[name], bos=bos, eos=eos)


@pytest.mark.parametrize("name", SAMPLES)
def test_decode_inverts_encode_and_matches_mistral_common(mistral, name):
    ours, theirs = mistral
    ids = ours.encode(SAMPLES[name], bos=True, eos=True)
    assert ours.decode(ids) == SAMPLES[name] == theirs.decode(ids)


def test_digits_are_split_one_per_token(mistral):
    ours, _ = mistral
    pieces = [ours.id_to_piece(i) for i in ours.encode("x 1234567890", bos=False)]
    assert pieces[-10:] == list("1234567890")


def test_encode_matches_mistral_common_on_emoji_via_byte_fallback(mistral):
    ours, theirs = mistral
    ids = ours.encode(PARROT, bos=False)
    assert ids == theirs.encode(PARROT, bos=False, eos=False)
    assert [ours.id_to_piece(i) for i in ids] == ["\u2581", "<0xF0>", "<0x9F>", "<0xA6>", "<0x9C>"]


def test_special_ids_match_mistral_common(mistral):
    ours, theirs = mistral
    assert (ours.bos_id, ours.eos_id, ours.unk_id) == (theirs.bos_id, theirs.eos_id, theirs.unk_id) == (1, 2, 0)
    assert ours.pad_id is None and theirs.pad_id == -1
    assert ours.vocab_size == theirs.n_words == 32000
    assert [ours.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]


def test_decode_accepts_numpy_ids(mistral):
    ours, _ = mistral
    ids = ours.encode(SAMPLES["prose"])
    assert ours.decode(np.array(ids, dtype=np.int64)) == SAMPLES["prose"]


# ---------------------------------------------------------------- streaming decode


def test_stream_decode_never_emits_half_a_character(mistral):
    ours, _ = mistral
    ids = ours.encode(SAMPLES["emoji"] + " " + SAMPLES["mixed"], eos=True)
    pieces = stream_all(ours, ids)
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == ours.decode(ids)
    # The parrot's 4 byte pieces emit nothing, nothing, nothing, then the whole character.
    at = ids.index(ours.sp.piece_to_id("<0xF0>"))
    assert pieces[at:at + 4] == ["", "", "", PARROT]


def test_stream_decode_drops_the_dummy_prefix_space_like_decode(mistral):
    ours, _ = mistral
    ids = ours.encode("  two leading spaces", bos=True)
    assert "".join(stream_all(ours, ids)) == ours.decode(ids) == "  two leading spaces"
    assert stream_all(ours, ours.encode("Hello"))[:2] == ["", "Hello"]


@settings(max_examples=50, deadline=None)
@given(text=st.text(max_size=60))
def test_stream_decode_equals_full_decode_for_random_text(mistral, text):
    ours, _ = mistral
    ids = ours.encode(text, bos=True)
    assert "".join(stream_all(ours, ids)) == ours.decode(ids)


# Arbitrary id sequences also hit what encode never produces: stray continuation bytes, control ids inside a
# character, lone spaces first, <unk>.
INTERESTING_IDS = [0, 1, 2, 3 + 0x20, 3 + 0x41, 3 + 0x80, 3 + 0x9F, 3 + 0xC3, 3 + 0xA9, 3 + 0xE2, 3 + 0xF0, 3 + 0xFF,
                   28705, 259, 1318, 28723, 28740, 30575]


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.sampled_from(INTERESTING_IDS), max_size=40))
@example(ids=[1318, 1, 1318])  # "x<s>x" -> "x x": a window starting at <s> would drop the second "▁"
@example(ids=[3 + 0xC3, 3 + 0xA9, 1318])  # "é x": a character from bytes, then a plain piece
@example(ids=[28705, 28705, 1318, 28705, 3 + 0xF0, 3 + 0x9F, 1, 3 + 0x98, 3 + 0x80, 1318])  # <s> splits the bytes
def test_stream_decode_equals_full_decode_for_random_id_sequences(mistral, ids):
    ours, _ = mistral
    assert "".join(stream_all(ours, ids)) == ours.decode(ids)


# ---------------------------------------------------------------- the project's own tokenizer


def test_own_tokenizer_round_trips_python_code(own):
    code = SAMPLES["python"] + "class Foo(Bar):\n\tdef __init__(self, x=0x1F):\n\t\tself.x = [x] * 3\n"
    assert own.decode(own.encode(code, bos=True, eos=True)) == code


def test_own_tokenizer_uses_mistral_special_ids(own):
    assert (own.bos_id, own.eos_id, own.unk_id, own.pad_id) == (1, 2, 0, None)
    assert own.encode("x", bos=True, eos=True)[0] == 1 and own.encode("x", bos=True, eos=True)[-1] == 2


def test_own_tokenizer_falls_back_to_bytes_on_emoji(own):
    ids = own.encode(PARROT, bos=False)
    assert [own.id_to_piece(i) for i in ids][-4:] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x9C>"]
    assert own.decode(ids) == PARROT == "".join(stream_all(own, ids))


# ---------------------------------------------------------------- loading and errors


def test_from_dir_finds_tokenizer_model_and_mistral_versioned_names(tmp_path):
    assert Tokenizer.from_dir(OWN_TOKENIZER.parent).path == OWN_TOKENIZER
    (tmp_path / "tokenizer.model.v3").symlink_to(OWN_TOKENIZER)
    assert Tokenizer.from_dir(tmp_path).vocab_size == Tokenizer(OWN_TOKENIZER).vocab_size


def test_from_dir_error_lists_the_names_it_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.model, tokenizer\.model\.v3, tokenizer\.model\.v1"):
        Tokenizer.from_dir(tmp_path)


def test_loading_a_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer(tmp_path / "nope.model")


def test_loading_a_file_that_is_not_sentencepiece_names_the_path(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text('{"dim": 4096}')
    with pytest.raises(ValueError, match="config.json"):
        Tokenizer(bad)
