"""The tokenizer: a thin wrapper over a SentencePiece model, the format Mistral 7B ships (tokenizer.model[.v1|.v3]).

Mistral's v1 tokenizer is SentencePiece BPE with a 32000-piece vocabulary, <unk>=0, <s>=1, </s>=2, no pad, a dummy
prefix space, digits split one by one and byte fallback (a character outside the vocabulary becomes its UTF-8 bytes,
one <0xNN> piece each). The project's own tokenizer in weights/ is trained with the same settings. Encoding and
decoding are SentencePiece's own, so ids match mistral-common's encoder exactly (tests/test_tokenizer.py).
What this module adds is streaming decode for generation: `StreamDecoder` turns one id at a time into text without
ever emitting half a character.
"""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm

from ..errors import MissingFileError, UserError, is_int, utf8_problem

# Mistral's reference code names the file by tokenizer version; HF repos call it tokenizer.model.
TOKENIZER_NAMES = ("tokenizer.model", "tokenizer.model.v3", "tokenizer.model.v1")
REPLACEMENT_CHAR = "\ufffd"  # what SentencePiece decodes each byte of an incomplete UTF-8 sequence to


class Tokenizer:
    """Text <-> token ids with a SentencePiece model file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise MissingFileError(f"tokenizer file not found: {self.path}")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as err:  # the C++ parser's "could not parse ModelProto" surfaces as these
            raise UserError(f"{self.path} is not a SentencePiece model: {err}") from err

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        """Load the tokenizer of a model folder (HF or Mistral layout)."""
        model_dir = Path(model_dir)
        for name in TOKENIZER_NAMES:
            if (model_dir / name).is_file():
                return cls(model_dir / name)
        raise MissingFileError(f"no tokenizer in {model_dir}: looked for {', '.join(TOKENIZER_NAMES)}")

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise UserError(f"encode: text must be a str, got {type(text).__name__} (decode bytes first)")
        problem = utf8_problem(text)      # lone surrogates: undecodable bytes smuggled in (sys.argv does this)
        if problem:
            raise UserError(f"encode: text is not valid UTF-8 ({problem})")
        return [self.bos_id] * bos + self.sp.encode(text) + [self.eos_id] * eos

    def decode(self, ids) -> str:
        """Control ids (<s>, </s>) decode to nothing; the first piece loses its dummy-prefix space."""
        ids = list(ids)
        bad = next((i for i in ids if not is_int(i) or not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise UserError(f"decode: {bad!r} is not a token id of this tokenizer (ids in [0, {self.vocab_size}))")
        return self.sp.decode([int(i) for i in ids])  # int(): NumPy integers are not accepted by the binding

    def id_to_piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(int(token_id))

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def unk_id(self) -> int:
        return self.sp.unk_id()

    @property
    def pad_id(self) -> int | None:
        return None if self.sp.pad_id() < 0 else self.sp.pad_id()  # SentencePiece says -1 for "no pad"

    def stream(self) -> StreamDecoder:
        return StreamDecoder(self)


class StreamDecoder:
    """Incremental detokenizer: `push(id)` returns only the newly completed text; `flush()` returns the rest.

    Concatenating every push and the final flush equals `tokenizer.decode(all_ids)`. Decoding ids one by one would
    be wrong twice: a byte-fallback character spans several ids (<0xF0><0x9F><0xA6><0x9C> is one emoji), and
    SentencePiece drops the dummy-prefix space of the first piece only, so a lone "▁word" decodes differently from
    the same piece mid-text. So we re-decode a window of recent ids and emit the new suffix:

        new  = decode(ids[start:])          prev = decode(ids[start:read])   (text already emitted from the window)
        emit new[len(prev):] unless new ends in U+FFFD (bytes of a character still incomplete: hold them back).

    The window starts at an *anchor*: a plain piece (not control, unknown or byte) whose text is non-empty even
    after losing a leading space. Bytes before a non-byte piece are decoded on their own and only the anchor itself
    can lose its space, so everything after the anchor decodes the same in the window as in the full text. The
    window restarts at the last anchor already emitted, so each push decodes a handful of ids, not the whole text.
    A genuine trailing U+FFFD in the text is held back too, until the next push or `flush()`.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.start = 0  # window start: 0 (exactly the full decode) or an anchor index
        self.read = 0  # ids[:read] have been emitted as text

    def _is_anchor(self, token_id: int) -> bool:
        sp = self.tok.sp
        if sp.is_control(token_id) or sp.is_unknown(token_id) or sp.is_byte(token_id) or sp.is_unused(token_id):
            return False
        return sp.id_to_piece(token_id).removeprefix("\u2581") != ""

    def _emit(self, final: bool) -> str:
        prev = self.tok.decode(self.ids[self.start:self.read])
        new = self.tok.decode(self.ids[self.start:])
        if not final and new.endswith(REPLACEMENT_CHAR):
            return ""
        # The next window starts at the last anchor among the ids now emitted (start stays put if there is none).
        for i in range(len(self.ids) - 1, self.start, -1):
            if self._is_anchor(self.ids[i]):
                self.start = i
                break
        self.read = len(self.ids)
        return new[len(prev):]

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        return self._emit(final=False)

    def flush(self) -> str:
        return self._emit(final=True)
