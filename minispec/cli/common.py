"""What every subcommand shares: the one-line error, the flag names the API's messages are rewritten to, and the
checks of the model, device and prompt arguments (run before anything loads)."""
import argparse
import sys
from pathlib import Path

from ..backend import resolve_device
from ..errors import UserError, utf8_problem
from ..mistral.model import DTYPES
from ..mistral.tokenizer import Tokenizer
from ..mistral.weights import load_config


# The shipped model lives in the source tree (weights/ is not package data: a wheel does not carry it).
SOURCE_MODEL = Path(__file__).resolve().parents[2] / "weights" / "stdlib-mistral"
# API parameter name -> the flag that sets it, so a validator's message names what the user typed
FLAGS = {"temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p", "seed": "--seed",
         "max_new_tokens": "-n", "n_tokens": "-n", "runs": "--runs", "n_prompts": "--prompts",
         "decoders": "--decoders", "num_heads": "--heads", "num_layers": "--layers", "seq_len": "--seq-len",
         "epochs": "--epochs", "lr": "--lr", "batch": "--batch", "budget": "--budget"}


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (`minispec: error: ...`, status 2) instead of usage + error."""

    def error(self, message):
        fail(message)


class Help(argparse.ArgumentDefaultsHelpFormatter):
    """Show "(default: X)" where there is a default to show (not for None or a flag's False)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def fail(message):
    sys.stderr.write(f"minispec: error: {message}\n")
    sys.exit(2)


def as_flags(err, **flags):
    """A validator's message with the API parameter it names spelled as the command-line flag."""
    msg, flags = str(err), {**FLAGS, **flags}
    name = msg.split(" ", 1)[0].rstrip(":")
    if name in flags and " " in msg:
        return f"argument {flags[name]}: {msg.split(' ', 1)[1]}"
    return msg


# ---------------------------------------------------------------------------------------------------------
# Shared argument checks (before anything loads)
# ---------------------------------------------------------------------------------------------------------
def _model_arg(p):
    p.add_argument("--model", default=None,
                   help="model folder (HF or Mistral layout); default: the shipped weights/stdlib-mistral of a "
                        "source checkout")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: CuPy when a GPU is usable, else NumPy")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="working dtype of the weights")
    p.add_argument("--weights", default="auto", choices=["auto", "widened", "mapped"],
                   help="mapped: keep a 16-bit checkpoint in its file, widened block by block (CPU); "
                        "auto: mapped when float32 weights would not fit in available memory")


def check_model_args(args, tokenizer=True):
    """The model folder (config readable, tokenizer present) and the device, checked without loading weights.
    Returns the model's Tokenizer (None with tokenizer=False)."""
    if args.model is None:
        if not SOURCE_MODEL.is_dir():
            raise UserError("no --model given, and the shipped model is not installed: weights/ comes with the "
                            "source tree, not with `pip install .`; pass --model DIR (a model folder, e.g. "
                            "weights/stdlib-mistral of a minispec checkout)")
        args.model = str(SOURCE_MODEL)
    cfg, _ = load_config(args.model)
    tok = None
    if tokenizer:
        tok = Tokenizer.from_dir(args.model)
        if tok.vocab_size > cfg.vocab_size:     # its ids past the model's vocabulary would fail mid-generation
            raise UserError(f"{args.model}: the tokenizer has {tok.vocab_size} pieces, more than the model's "
                            f"vocab_size ({cfg.vocab_size}): they do not belong together")
    if args.device == "cuda":
        try:
            resolve_device("cuda")
        except UserError as e:
            raise UserError(f"argument --device: {e}") from None
    return tok


def check_prompt(prompt):
    """sys.argv carries bytes that are not UTF-8 as lone surrogates (PEP 383); name the first one."""
    problem = utf8_problem(prompt)
    if problem:
        raise UserError(f"argument --prompt: not valid UTF-8 text ({problem}); pass text in your terminal's "
                        f"UTF-8 encoding")


