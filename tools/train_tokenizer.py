"""Train the shipped model's SentencePiece BPE tokenizer with Mistral's settings.

Settings follow the Mistral 7B v0.1 / Llama tokenizer's trainer spec (readable in its tokenizer.model):
BPE, byte fallback (no <unk> in practice: unseen characters become <0xNN> byte pieces), digits split one
by one, identity normalisation (text is not altered), a dummy-prefix space, extra whitespace kept,
whitespace-only pieces allowed (indentation becomes a few pieces), <unk>/<s>/</s> at ids 0/1/2, no pad.

    python tools/train_tokenizer.py --corpus data/corpus --vocab 4096 --out weights/stdlib-mistral
"""
import argparse
import tempfile
from pathlib import Path

import sentencepiece as spm

from collect_corpus import SEPARATOR


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="data/corpus")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--out", default="weights/stdlib-mistral")
    args = ap.parse_args()

    text = (Path(args.corpus) / "train.txt").read_text(encoding="utf-8")
    # SentencePiece trains on lines; documents are separated by a NUL line, which must not be learnt.
    lines = [ln for ln in text.replace(SEPARATOR, "\n").split("\n") if ln.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "lines.txt"
        src.write_text("\n".join(lines), encoding="utf-8")
        spm.SentencePieceTrainer.train(
            input=str(src), model_prefix=str(Path(tmp) / "tok"), model_type="bpe", vocab_size=args.vocab,
            byte_fallback=True, split_digits=True, normalization_rule_name="identity",
            add_dummy_prefix=True, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
            split_by_whitespace=True, split_by_unicode_script=True, split_by_number=True,
            character_coverage=0.99995, max_sentencepiece_length=16, max_sentence_length=16384,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=2, input_sentence_size=0,
            shuffle_input_sentence=False, minloglevel=1)
        (out / "tokenizer.model").write_bytes((Path(tmp) / "tok.model").read_bytes())
    print(f"wrote {out / 'tokenizer.model'} ({args.vocab} pieces from {len(lines)} lines)")


if __name__ == "__main__":
    main()
