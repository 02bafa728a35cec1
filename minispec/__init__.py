"""minispec: Mistral inference and speculative decoding, array by array in NumPy (CuPy on a GPU)."""
from .decoders.registry import generate
from .mistral.config import MistralConfig
from .mistral.model import Model, load
from .mistral.tokenizer import Tokenizer

__all__ = ["MistralConfig", "Model", "Tokenizer", "generate", "load"]
__version__ = "0.1.0"
