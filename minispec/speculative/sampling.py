"""Sampling: the target distribution (temperature, top-k, top-p) and drawing one token from it.

The acceptance rules (minispec.speculative.acceptance) compare drafts against `target_probs` of the verifier's
logits, computed on the logits' device. They, and a drafter that samples (Draft & Verify), draw ALL their
randomness through a Randomness, two methods:

    bernoulli(p, total=1.0) -> bool    True with probability p / total (clipped to [0, 1])
    categorical(weights)    -> int     index i with probability weights[i] / sum(weights)

For real runs that is GeneratorRandomness, a host `numpy.random.Generator` spending one uniform number per
decision, so a NumPy and a CuPy run with the same seed draw the same tokens (up to the rare uniform that lands
within float rounding of a CDF boundary). minispec.speculative.exact_law implements the same two methods by
following every outcome with its probability, which turns "this rule is lossless" into an exact computation.
Shapes: V vocab.
"""
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..backend import array_module
from ..errors import UserError, check_int, check_real
from ..mistral.layers import softmax


MIN_TEMPERATURE = 1e-6      # smaller: logits / T can overflow float32 (|logits| > 3e32); greedy is spelled 0


@dataclass(frozen=True)
class SamplingParams:
    """How the target distribution is shaped from logits. temperature 0 means greedy (argmax).

    top_k 0 means no top-k cut; top_p 1 means no nucleus cut. Applied in the order temperature, top-k, top-p,
    as Hugging Face's logits warpers and vLLM do (top-p measures mass after the top-k cut). At temperature 0
    the argmax is taken and top_k / top_p change nothing (they are still checked, with the same rules).
    Invalid values raise minispec.errors.UserError naming the parameter (`check_generation` adds seed and
    max_new_tokens: it is the one validator generate() and the command line share).
    """
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        check_real("temperature", self.temperature, low=0, what=" (0: greedy)")
        if 0 < self.temperature < MIN_TEMPERATURE:
            raise UserError(f"temperature must be 0 (greedy) or >= {MIN_TEMPERATURE:g}: a smaller one overflows "
                            f"logits / temperature in float32 (and samples the argmax anyway), "
                            f"got {self.temperature!r}")
        check_int("top_k", self.top_k, low=0, what=" (0: no top-k cut)")
        check_real("top_p", self.top_p, low=0, high=1, low_open=True, what=" (1: no nucleus cut)")

    @property
    def greedy(self):
        return self.temperature == 0


def check_generation(temperature=0.0, top_k=0, top_p=1.0, seed=0, max_new_tokens=64):
    """The one check of generate()'s sampling arguments (the command line calls it before loading anything):
    SamplingParams' rules, plus seed (None or an int >= 0, what numpy.random.default_rng accepts; None draws
    fresh entropy) and max_new_tokens (an int >= 0; a float or a bool is refused, not truncated).
    Returns the SamplingParams."""
    if seed is not None:
        check_int("seed", seed, low=0)
    check_int("max_new_tokens", max_new_tokens, low=0)
    return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)


# ---------------------------------------------------------------------------------------------------------
# The target distribution and one draw from it

def target_probs(logits, params):
    """logits [..., V] -> the distribution sampling draws from, [..., V], same namespace and dtype.

    temperature 0: the one-hot of the argmax (first index on ties), so that acceptance rules treat greedy
    decoding as sampling from a point mass. Otherwise softmax(logits / temperature), then
      top-k: keep the k largest logits (all tokens tied with the k-th are kept, as in Hugging Face's TopK warper);
      top-p: keep the smallest set of most probable tokens whose mass reaches top_p (nucleus sampling,
             Holtzman et al. 2020), i.e. token x stays iff the mass of the tokens ranked above it is < top_p;
             the top token always stays;
    and renormalise.
    """
    xp = array_module(logits)
    V = logits.shape[-1]
    dt = logits.dtype.type
    if params.temperature == 0:
        best = logits.argmax(axis=-1)[..., None]                                 # [..., 1]
        return (xp.arange(V) == best).astype(logits.dtype)                       # [..., V]
    z = logits / dt(params.temperature)                                          # [..., V]
    if 0 < params.top_k < V:
        kth = xp.sort(z, axis=-1)[..., V - params.top_k:V - params.top_k + 1]    # [..., 1] k-th largest
        z = xp.where(z >= kth, z, dt(-np.inf))
    p = softmax(z)                                                               # [..., V]
    if params.top_p < 1:
        ranked = xp.sort(p, axis=-1)[..., ::-1]                                  # [..., V] descending
        above = xp.cumsum(ranked, axis=-1) - ranked                              # mass ranked strictly above
        n_keep = (above < dt(params.top_p)).sum(axis=-1, keepdims=True)          # [..., 1], >= 1
        cutoff = xp.take_along_axis(ranked, n_keep - 1, axis=-1)                 # [..., 1] smallest kept prob
        p = xp.where(p >= cutoff, p, dt(0))
        p = p / p.sum(axis=-1, keepdims=True)
    return p


def sample(probs, rng):
    """One token id (python int) from probs [V] (any non-negative weights; normalised here).

    Inverse CDF on the device: u = 1 - rng.random() in (0, 1] from the host generator, token = the number of
    CDF entries below u · total. u > 0 means a zero-probability token is never returned. Exactly one uniform is
    drawn per call, so the same seed gives the same tokens on NumPy and CuPy.
    """
    cdf = array_module(probs).cumsum(probs)                                      # [V]
    total = float(cdf[-1])
    if not 0 < total < np.inf:
        raise ValueError(f"sample: probabilities must have a positive finite sum, got {total}")
    u = 1.0 - rng.random()
    # u · total <= total, and a python float compares in the array's dtype on NumPy 2 and CuPy alike
    return min(int((cdf < u * total).sum()), probs.shape[-1] - 1)


# ---------------------------------------------------------------------------------------------------------
# Where randomness comes from

class Randomness(Protocol):
    """Every random decision of the acceptance rules and of a sampling drafter (module docstring)."""

    def bernoulli(self, p, total=1.0) -> bool: ...

    def categorical(self, weights) -> int: ...


class GeneratorRandomness:
    """Randomness from a numpy Generator, one uniform per decision: bernoulli is u · total < p with u in [0, 1)
    (written without a division, as the rules always compared), categorical is `sample`."""

    def __init__(self, rng):
        self.rng = rng

    def bernoulli(self, p, total=1.0):
        return bool(self.rng.random() * total < p)

    def categorical(self, weights):
        return sample(weights, self.rng)


def randomness(rng):
    """A Randomness from a numpy Generator (wrapped in GeneratorRandomness) or a Randomness (returned as is)."""
    if isinstance(rng, np.random.Generator):
        return GeneratorRandomness(rng)
    if callable(getattr(rng, "bernoulli", None)) and callable(getattr(rng, "categorical", None)):
        return rng
    raise TypeError(f"expected a numpy Generator or a Randomness (bernoulli, categorical), got {type(rng).__name__}")
