"""minispec: Mistral inference and speculative decoding, array by array in NumPy (CuPy on a GPU)."""
from .config import MistralConfig
from .generate import generate
from .model import Model, load
from .tokenizer import Tokenizer

__all__ = ["MistralConfig", "Model", "Tokenizer", "generate", "load"]
__version__ = "0.1.0"
