"""The optimiser side of training, shared by the Medusa and the Hydra trainers: the learning-rate schedule, Adam
(with decoupled weight decay, AdamW), checkpoints that resume bit-identically, and `fit`, the training loop.

Reading order: lr_at -> Adam -> save_checkpoint / load_checkpoint -> fit. A trainer gives `fit` its parameters by
name, a function that draws one epoch's batches and a function that returns a batch's loss and gradients; `fit`
owns the steps, the schedule, the progress bar and the checkpoints.
"""
import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from ..backend import array_module, to_device, to_host
from ..errors import Fields, UserError, read_json
from ..mistral.safetensors import read_safetensors
from .progress import Progress


def lr_at(step, total, lr, warmup_steps):
    """Linear warm-up to lr over warmup_steps, then cosine decay to 0 at `total` steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class Adam:
    """Adam (Kingma & Ba 2015, Algorithm 1) updating arrays in place; weight_decay > 0 adds AdamW's decoupled
    decay p -= lr · weight_decay · p (Loshchilov & Hutter 2019, Algorithm 2), applied before the Adam step."""

    def __init__(self, params, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
        xp = array_module(next(iter(params.values())))
        self.params, self.beta1, self.beta2, self.eps, self.t = params, beta1, beta2, eps, 0
        self.weight_decay = weight_decay
        self.m = {k: xp.zeros_like(p) for k, p in params.items()}
        self.v = {k: xp.zeros_like(p) for k, p in params.items()}

    def step(self, grads, lr):
        self.t += 1
        b1, b2 = self.beta1, self.beta2
        c1, c2 = 1 - b1 ** self.t, 1 - b2 ** self.t                            # bias corrections
        for name, p in self.params.items():
            g, m, v = grads[name], self.m[name], self.v[name]
            dt = p.dtype.type
            if self.weight_decay:
                p *= dt(1 - lr * self.weight_decay)
            m *= dt(b1)
            m += dt(1 - b1) * g
            v *= dt(b2)
            v += dt(1 - b2) * g * g
            p -= dt(lr / c1) * m / (array_module(p).sqrt(v / dt(c2)) + dt(self.eps))


# ---------------------------------------------------------------------------------------------------------
# Checkpoints: parameters, Adam's moments and where the run stands; no pickle anywhere
# ---------------------------------------------------------------------------------------------------------
def save_checkpoint(path, params, adam, state):
    """path.safetensors (parameters and Adam moments) + path.json (step, epoch, the epoch's RNG state as ints,
    the config)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, a in params.items():
        tensors[name] = np.ascontiguousarray(to_host(a))
        tensors["adam_m." + name] = np.ascontiguousarray(to_host(adam.m[name]))
        tensors["adam_v." + name] = np.ascontiguousarray(to_host(adam.v[name]))
    save_file(tensors, str(path.with_suffix(".safetensors")))
    path.with_suffix(".json").write_text(json.dumps({**state, "adam_t": adam.t}, indent=1) + "\n")


def load_checkpoint(path, params, adam):
    """Restore parameters and Adam moments in place from save_checkpoint's files; returns the json state."""
    path = Path(path)
    tensors = read_safetensors(path.with_suffix(".safetensors"))
    for name, a in params.items():
        for key, dst in ((name, a), ("adam_m." + name, adam.m[name]), ("adam_v." + name, adam.v[name])):
            if key not in tensors or tuple(tensors[key].shape) != tuple(dst.shape):
                raise UserError(f"{path.with_suffix('.safetensors')}: tensor {key!r} missing or of the wrong shape "
                                 f"(expected {list(dst.shape)}): not a checkpoint of these heads")
            dst[...] = to_device(array_module(dst), np.asarray(tensors[key], dtype=dst.dtype))
    f = Fields(read_json(path.with_suffix(".json")), path.with_suffix(".json"))
    adam.t = f.int("adam_t", low=0)
    return {"step": f.int("step", low=0), "epoch": f.int("epoch", low=0), "epoch_rng": f.table("epoch_rng"),
            "config": f.table("config", default=None)}


# ---------------------------------------------------------------------------------------------------------
# The training loop, resumable
# ---------------------------------------------------------------------------------------------------------
def fit(params, batch_loss, epoch_batches, cfg, checkpoint=None, checkpoint_every=100, stop_after=None,
        progress=True, desc="train heads"):
    """Train `params` ({name: array}, updated in place) with Adam and lr_at's schedule.

    batch_loss(batch, step) -> (loss float, per-head losses (host floats, for the progress bar), {name: gradient})
    (step: the 0-based step number, for draws such as dropout that must repeat on a resume);
    epoch_batches(rng) -> one epoch's batches, the same number every epoch. cfg: epochs, lr, warmup (fraction of
    the steps), beta1, beta2, eps, weight_decay, seed (a trainer's config dataclass).
    checkpoint: a path stem; if its files exist training resumes from them (bit-identical to an uninterrupted
    run: the epoch's batches are redrawn from the saved RNG state), and they are rewritten every
    checkpoint_every steps and at the end. stop_after: stop after this many steps in all (tests, time limits).
    Returns the loss of every step run in this call (host floats)."""
    adam = Adam(params, cfg.beta1, cfg.beta2, cfg.eps, getattr(cfg, "weight_decay", 0.0))
    rng = np.random.default_rng(cfg.seed)
    n_batches = len(epoch_batches(np.random.default_rng(0)))
    total = cfg.epochs * n_batches
    warmup = max(1, int(cfg.warmup * total))
    step, epoch = 0, 0
    if checkpoint is not None and Path(checkpoint).with_suffix(".json").exists():
        state = load_checkpoint(checkpoint, params, adam)
        if state["config"] is not None and state["config"] != json.loads(json.dumps(asdict(cfg))):
            raise UserError(f"{Path(checkpoint).with_suffix('.json')}: made with the training settings "
                            f"{state['config']}, not {asdict(cfg)}: resume with the same settings or start afresh "
                            f"with another checkpoint path")
        step, epoch = state["step"], state["epoch"]
        try:
            rng.bit_generator.state = state["epoch_rng"]
        except (ValueError, TypeError, KeyError) as e:
            raise UserError(f"{Path(checkpoint).with_suffix('.json')}: key 'epoch_rng' is not a random generator "
                            f"state ({e})") from None
    history = []
    bar = Progress(total=total, initial=step, desc=desc, unit="step", disable=not progress)
    epoch_rng = rng.bit_generator.state                         # what a resume needs to redraw this epoch
    while epoch < cfg.epochs and (stop_after is None or step < stop_after):
        batches = epoch_batches(rng)
        for b in range(step - epoch * n_batches, n_batches):
            if stop_after is not None and step >= stop_after:
                break
            loss, per_head, grads = batch_loss(batches[b], step)
            adam.step(grads, lr_at(step, total, cfg.lr, warmup))
            step += 1
            history.append(loss)
            if step % 10 == 1 or step == total:
                bar.set_postfix(loss=f"{loss:.3f}", heads=" ".join(f"{c:.2f}" for c in per_head))
            bar.update(1)
            if checkpoint is not None and step % checkpoint_every == 0:
                save_checkpoint(checkpoint, params, adam, {"step": step, "epoch": epoch, "epoch_rng": epoch_rng,
                                                           "config": asdict(cfg)})
        if step < (epoch + 1) * n_batches:                     # stopped inside the epoch
            break
        epoch += 1
        epoch_rng = rng.bit_generator.state
    bar.close()
    if checkpoint is not None:
        save_checkpoint(checkpoint, params, adam, {"step": step, "epoch": epoch, "epoch_rng": epoch_rng,
                                                   "config": asdict(cfg)})
    return history
