"""minispec: Mistral inference and speculative decoding, array by array in NumPy (CuPy on a GPU)."""
from .config import MistralConfig
from .model import Model, load

__all__ = ["MistralConfig", "Model", "load"]
__version__ = "0.1.0"
