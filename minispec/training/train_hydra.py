"""Training Hydra and Hydra++ heads on a frozen base model, in NumPy with hand-derived gradients (Ankner et al.
2024, arXiv 2402.05109; zankner/Hydra hydra/train/train.py for the loss). The backward passes are in
minispec.backprop, the forwards and the file format in minispec.hydra / hydra_files.

Reading order: teacher-forced head inputs -> the loss of a batch and its gradients -> batches (positions for
Hydra, whole sequences for Hydra++) -> the training loop with checkpoints -> held-out accuracies, the
teacher-forced τ of a tree -> `train_hydra`, the driver behind `minispec train-heads --kind hydra|hydra++`.

Teacher forcing. The base model is frozen, so its final-norm hidden states h_t are computed once. Head i at
position t reads a_i = concat(u_t, E(x_{t+1}), ..., E(x_{t+i+1})) with the sequence's own tokens x (E the base
embedding table) and is trained to predict x_{t+i+2}; u_t = h_t for Hydra, u_t = prefix(h)_t for Hydra++, the
prefix layer run causally over the whole training sequence (so Hydra++ trains on sequences, not shuffled
positions). At decode time the tokens on a tree path are drafts; whenever they are right they equal the
teacher-forced ones, and only right paths can be accepted, so this is the distribution that matters.

The loss, as zankner/Hydra's trainer combines it: every head counts alike (no Medusa-style decay), each head

    loss_i = lm_weight · CE(q_i, x_{t+i+2}) + teacher_weight · CE(q_i, p_{t+i+1}),   p = softmax(h W_out)

where the second term, the teacher loss, is the cross-entropy to the base model's own next-token distribution
at position t+i+1 (the position whose next token head i guesses). p is recomputed per batch from the stored
hidden states with the base output layer instead of storing V-wide distributions. Hydra's trainer defaults to
lm 1 / teacher 0; its Hydra++ recipe (zankner/Hydra README) to lm 0 / teacher 1. Shapes: B rows, K heads,
D dim, V vocab, N tokens of data.
"""
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from ..backend import array_module, to_device, to_host
from ..decoders.hydra import head_forward, HydraHeads, KIND_ARCH, prefix_forward
from ..decoders.hydra_files import save
from ..decoders.medusa import topk_ids
from ..errors import Fields, UserError, read_json
from ..mistral.model import load
from ..mistral.tokenizer import Tokenizer
from ..mistral.weights import read_safetensors
from ..speculative.tree import build_tree
from . import backprop as bp
from .progress import Progress
from .checks import REPO, check_hydra_training, load_sequences, save_sequences
from .train_medusa import Adam, hidden_states, lr_at, split_heldout, training_sequences


# ---------------------------------------------------------------------------------------------------------
# Teacher-forced inputs
# ---------------------------------------------------------------------------------------------------------
def head_inputs(u_rows, E, ids, rows, i):
    """a_i for the given rows: concat(u_rows, E[ids[rows + 1]], ..., E[ids[rows + i + 1]]).

    u_rows [B, D] (h or prefix(h) at the rows), E [V, D], ids int [N] (device), rows int [B] (device)
    -> [B, (i+2)D]. Indices past the end are clipped: those rows have no label for head i, so they never
    reach the loss."""
    xp = array_module(u_rows)
    B, D = u_rows.shape
    a = xp.empty((B, (i + 2) * D), dtype=u_rows.dtype)                          # [B, (i+2)D]
    a[:, :D] = u_rows
    last = ids.shape[0] - 1
    for j in range(1, i + 2):
        a[:, j * D:(j + 1) * D] = E[ids[xp.minimum(rows + j, last)]]
    return a


# ---------------------------------------------------------------------------------------------------------
# The loss of one batch and its gradients
# ---------------------------------------------------------------------------------------------------------
def heads_loss(heads, u_rows, H, E, W_out, ids, labels, rows, lm_weight=1.0, teacher_weight=0.0):
    """Σ_i loss_i over the K heads at positions `rows`, and the gradients.

    u_rows [B, D]: the heads' first input at the rows (h or prefix(h)); H [N, D] base hidden states (the
    teacher: H[t+i+1] W_out); ids int [N], labels int [K, N] (-1 = none), rows int [B], all on the device ->
    (loss float, per-head loss [K] (host), {"heads": [grad dict per head], "u_rows": du [B, D]})."""
    xp = array_module(u_rows)
    u = u_rows
    D, last = u.shape[1], H.shape[0] - 1
    du = xp.zeros((rows.shape[0], D), dtype=u.dtype)                            # [B, D]
    grads, per_head, total = [], np.zeros(heads.K), 0.0
    for i, p in enumerate(heads.heads):
        lab = labels[i, rows]                                                   # [B]
        logits, saved = head_forward(p, head_inputs(u, E, ids, rows, i), keep=True)      # [B, V]
        teacher = H[xp.minimum(rows + i + 1, last)] @ W_out if teacher_weight else None   # [B, V] base at t+i+1
        lm, tl, dlogits = bp.head_ce(logits, lab, teacher, lm_weight, teacher_weight)
        loss = lm_weight * lm + teacher_weight * tl
        da, g = bp.head_backward(dlogits, p, saved)
        du += da[:, :D]                        # the embedding columns belong to the frozen base model
        grads.append(g)
        per_head[i] = loss
        total += loss
    return total, per_head, {"heads": grads, "u_rows": du}


def batch_loss(heads, data, rows_h, seqs, cfg):
    """The loss of one batch and the gradients of every trained array, by name (see `param_dict`).

    Hydra: rows_h int [B] host positions. Hydra++: seqs = [(start, length)] whole sequences, run through the
    prefix layer (causal, sliding window), every position of them a row."""
    xp, c = heads.xp, heads.model_config
    H = data["H"]
    if heads.prefix is None:
        rows = to_device(xp, rows_h)
        loss, per_head, g = heads_loss(heads, H[rows], H, heads.embed, data["W_out"], data["ids"], data["labels"],
                                       rows, cfg.lm_weight, cfg.teacher_weight)
        return loss, per_head, named(g["heads"], None)
    # Hydra++: u = prefix(h) over each sequence; rows index the batch's own packed u
    n = sum(L for _, L in seqs)
    u = xp.empty((n, c.dim), dtype=H.dtype)                                    # [n, D]
    idx = np.concatenate([np.arange(s, s + L) for s, L in seqs])                # [n] host positions
    kept, at = [], 0
    for s, L in seqs:
        u[at:at + L], saved = prefix_forward(heads.prefix, c, H[s:s + L], keep=True)
        kept.append(saved)
        at += L
    pos_d = to_device(xp, idx)
    loss, per_head, g = heads_loss(heads, u, H, heads.embed, data["W_out"], data["ids"],
                                   data["labels"], pos_d, cfg.lm_weight, cfg.teacher_weight)
    gp = {k: xp.zeros_like(v) for k, v in heads.prefix.items()}
    at = 0
    for (s, L), saved in zip(seqs, kept):
        _, gl = bp.prefix_backward(g["u_rows"][at:at + L], heads.prefix, saved, c.n_heads, c.n_kv_heads, c.norm_eps)
        for k in gp:
            gp[k] += gl[k]
        at += L
    return loss, per_head, named(g["heads"], gp)


# ---------------------------------------------------------------------------------------------------------
# Parameters by name (for Adam and the checkpoint)
# ---------------------------------------------------------------------------------------------------------
def param_dict(heads):
    """{"head.{i}.{name}": array, "prefix.{name}": array}: views of the heads' own arrays (updated in place);
    arrays with no entries (ws/bs of 1-block heads) are left out."""
    return named(heads.heads, heads.prefix)


def named(head_dicts, prefix_dict):
    """The per-head dicts and the prefix dict (or None) of parameters or of their gradients, by param_dict's names."""
    out = {f"head.{i}.{k}": v for i, p in enumerate(head_dicts) for k, v in p.items() if v.size}
    if prefix_dict is not None:
        out.update({f"prefix.{k}": v for k, v in prefix_dict.items()})
    return out


# ---------------------------------------------------------------------------------------------------------
# The training loop, resumable
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HydraTrainConfig:
    """Runtime knobs of a training run (the architecture lives in HydraHeads)."""
    epochs: int = 1
    lr: float = 1e-3
    batch: int = 256             # positions per step (Hydra++: whole sequences up to about this many tokens)
    warmup: float = 0.05         # fraction of the steps spent warming up linearly, then cosine to 0
    lm_weight: float = 1.0
    teacher_weight: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    seed: int = 0


def make_batches(labels, seq_bounds, cfg, rng, by_sequence):
    """One epoch's batches, the same number every epoch: arrays of positions (Hydra: rows with a label,
    shuffled) or lists of (start, length) whole sequences, as many per batch as make about cfg.batch tokens on
    average (Hydra++)."""
    if not by_sequence:
        rows = rng.permutation(np.flatnonzero((labels >= 0).any(axis=0)))
        return [rows[s:s + cfg.batch] for s in range(0, len(rows), cfg.batch)]
    per = max(1, int(round(cfg.batch / np.mean([L for _, L in seq_bounds]))))
    order = [tuple(map(int, seq_bounds[j])) for j in rng.permutation(len(seq_bounds))]
    return [order[s:s + per] for s in range(0, len(order), per)]


def save_checkpoint(path, params, adam, state):
    """path.safetensors (parameters and Adam moments) + path.json (step, epoch, the epoch's RNG state as ints,
    the config): no pickle anywhere."""
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
    state = {"step": f.int("step", low=0), "epoch": f.int("epoch", low=0), "epoch_rng": f.table("epoch_rng"),
             "config": f.table("config", default=None)}
    return state


def train(heads, data, cfg=HydraTrainConfig(), checkpoint=None, checkpoint_every=100, stop_after=None,
          progress=True):
    """Train `heads` in place. data: {"H" [N, D], "ids" [N], "labels" [K, N] (device), "labels_h" (host),
    "W_out" [D, V], "seqs" [(start, length)] (host)}. Hydra++ (heads.prefix set) trains on whole sequences.

    checkpoint: a path stem; if its files exist training resumes from them (bit-identical to an uninterrupted
    run: the epoch's batches are redrawn from the saved RNG state), and they are rewritten every
    checkpoint_every steps and at the end. stop_after: stop after this many steps in all (tests, time limits).
    Returns the loss of every step run in this call (host floats)."""
    by_seq = heads.prefix is not None
    params = param_dict(heads)
    adam = Adam(params, cfg.beta1, cfg.beta2, cfg.eps)
    rng = np.random.default_rng(cfg.seed)
    n_batches = len(make_batches(data["labels_h"], data["seqs"], cfg, np.random.default_rng(0), by_seq))
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
    bar = Progress(total=total, initial=step, desc=f"train {heads.kind}", unit="step", disable=not progress)
    epoch_rng = rng.bit_generator.state                         # what a resume needs to redraw this epoch
    while epoch < cfg.epochs and (stop_after is None or step < stop_after):
        batches = make_batches(data["labels_h"], data["seqs"], cfg, rng, by_seq)
        for b in range(step - epoch * n_batches, n_batches):
            if stop_after is not None and step >= stop_after:
                break
            rows, seqs = (None, batches[b]) if by_seq else (batches[b], None)
            loss, per_head, grads = batch_loss(heads, data, rows, seqs, cfg)
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


# ---------------------------------------------------------------------------------------------------------
# Held-out: top-k accuracies per head and the teacher-forced τ of a tree
# ---------------------------------------------------------------------------------------------------------
def heldout_ranks(heads, data, k=10, batch=512):
    """rank[i, t] = the rank of x_{t+i+2} among head i's top-k at t (teacher-forced), k if it is not among
    them, -1 where head i has no label. Also the mean loss per head. -> (int64 [K, N] host, float [K])."""
    xp, c = heads.xp, heads.model_config
    H, N = data["H"], data["H"].shape[0]
    u = H
    if heads.prefix is not None:            # Hydra++: the prefix layer over each held-out sequence
        u = xp.empty_like(H)
        for s, L in data["seqs"]:
            u[s:s + L] = prefix_forward(heads.prefix, c, H[s:s + L])
    ranks = np.full((heads.K, N), -1, dtype=np.int64)
    tot, cnt = np.zeros(heads.K), np.zeros(heads.K)
    for s in range(0, N, batch):
        rows = xp.arange(s, min(N, s + batch))
        for i, p in enumerate(heads.heads):
            lab_h = data["labels_h"][i, s:s + batch]
            logits = head_forward(p, head_inputs(u[rows], heads.embed, data["ids"], rows, i))   # [B, V]
            top = to_host(topk_ids(logits, k))                                      # [B, k]
            hit = top == lab_h[:, None]
            r = np.where(hit.any(axis=1), hit.argmax(axis=1), k)
            ranks[i, s:s + batch] = np.where(lab_h >= 0, r, -1)
            n = int((lab_h >= 0).sum())
            if n:
                tot[i] += float(bp.label_ce(logits, data["labels"][i, rows])[0]) * n
                cnt[i] += n
    return ranks, tot / np.maximum(cnt, 1)


def topk_accuracies(ranks, k=10):
    """acc[i][r] = P(head i's rank-r candidate is the label), over positions with a label for head i.
    -> float64 [K, k]: what minispec.tree.build_tree takes."""
    K = ranks.shape[0]
    acc = np.zeros((K, k))
    for i in range(K):
        r = ranks[i][ranks[i] >= 0]
        acc[i] = np.bincount(r, minlength=k + 1)[:k] / max(1, len(r))
    return acc


def teacher_forced_tau(tree, ranks):
    """Mean over held-out positions of 1 + the number of tree nodes whose whole path is right, with head d's
    ranking taken teacher-forced at t: for greedy decoding this is the accepted length (bonus included) of a
    step taken at t. Positions where some head the tree uses has no label are left out.  -> float"""
    depth = tree.max_depth
    if depth == 0:
        return 1.0
    ok = (ranks[:depth] >= 0).all(axis=0)
    r = ranks[:depth, ok]                                                       # [depth, n]
    right = np.ones((tree.N, r.shape[1]), dtype=bool)                           # [N, n]
    for n in range(1, tree.N):                  # node order puts parents before children
        d = tree.depths[n] - 1
        right[n] = right[tree.parents[n]] & (r[d] == tree.rank[n])
    return float(right.sum(axis=0).mean())


# ---------------------------------------------------------------------------------------------------------
# The driver: `minispec train-heads --kind hydra|hydra++`
# ---------------------------------------------------------------------------------------------------------
def prepare(model, seqs, num_heads):
    """The frozen base model's hidden states over the sequences, once, and what training reads."""
    xp = model.xp
    H, labels = hidden_states(model, seqs, num_heads)                         # [N, D] device, [K, N] host
    lens = np.array([len(s) for s, _ in seqs])
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    ids = np.concatenate([np.asarray(s, np.int64) for s, _ in seqs])
    return {"H": H, "ids": to_device(xp, ids), "labels": to_device(xp, labels), "labels_h": labels,
            "W_out": model.output, "seqs": list(zip(starts.tolist(), lens.tolist()))}


def train_hydra(model_dir, kind="hydra", out=None, num_heads=4, num_layers=None, data="self", text=None,
                data_cache=None, n_tokens=150_000, seq_len=512, epochs=2, lr=1e-3, batch=256, lm_weight=None,
                teacher_weight=None, budget=10, gpu_budget=32, top_k=10, heldout=0.1, seed=0, device="auto",
                dtype="float32", prompt_len=16, gen_len=112, checkpoint=None, progress=True):
    """Train Hydra (kind "hydra") or Hydra++ ("hydra++") heads for the model in model_dir and save them
    (default <model_dir>/<kind>/, float16), with trees built from their held-out accuracies (`budget` nodes
    for "tree", `gpu_budget` for "tree_cuda"). Defaults per kind: hydra 1 block, lm 1 / teacher 0; hydra++
    4 blocks, lm 0 / teacher 1 (zankner/Hydra's Hydra++ recipe). Returns (heads, report dict)."""

    num_layers, lm_weight, teacher_weight, text = check_hydra_training(
        kind, num_heads, num_layers, data, text, data_cache, n_tokens, seq_len, epochs, lr, batch, lm_weight,
        teacher_weight, budget, gpu_budget, top_k, heldout, seed, Path(model_dir) / kind if out is None else out,
        checkpoint)
    say = print if progress else (lambda *a, **k: None)
    cached = data_cache is not None and Path(data_cache).exists()
    t_start = time.time()
    model = load(model_dir, dtype=dtype, device=device)
    tok = Tokenizer.from_dir(model_dir)
    seq_len = min(seq_len, model.config.sliding_window or seq_len, model.config.cache_slots)
    if cached:
        seqs = load_sequences(data_cache, model.config.vocab_size)
        say(f"data: {len(seqs)} sequences from {data_cache}")
    else:
        seqs = training_sequences(model, tok, data, text, n_tokens, seq_len, seed, prompt_len, gen_len, progress)
        if data_cache is not None:
            save_sequences(data_cache, seqs)
    train_seqs, held_seqs = split_heldout(seqs, heldout)
    say(f"computing the base model's hidden states once over {sum(len(s) for s, _ in seqs):,} tokens ...")
    train_d, held_d = prepare(model, train_seqs, num_heads), prepare(model, held_seqs, num_heads)
    t_data = time.time()

    heads = HydraHeads.create(model, num_heads, num_layers, KIND_ARCH[kind], seed=seed)
    heads.base_model = Path(model_dir).resolve().name
    _, before = heldout_ranks(heads, held_d, top_k)
    cfg = HydraTrainConfig(epochs=epochs, lr=lr, batch=batch, lm_weight=lm_weight, teacher_weight=teacher_weight,
                           seed=seed)
    history = train(heads, train_d, cfg, checkpoint=checkpoint, progress=progress)
    t_train = time.time()
    ranks, after = heldout_ranks(heads, held_d, top_k)
    acc = topk_accuracies(ranks, top_k)
    tree, tau = build_tree(acc, budget)
    gpu_tree, gpu_tau = build_tree(acc, gpu_budget)
    heads.choices = [list(p) for p in tree.choices[1:]]
    heads.choices_cuda = [list(p) for p in gpu_tree.choices[1:]]
    heads.accuracies = np.round(acc, 4).tolist()
    tf_tau, tf_gpu = teacher_forced_tau(tree, ranks), teacher_forced_tau(gpu_tree, ranks)
    say("held-out CE per head, before -> after: " + ", ".join(f"{b:.3f} -> {a:.3f}" for b, a in zip(before, after)))
    say("held-out top-1 / top-5 accuracy per head: " + ", ".join(f"{a[0]:.3f} / {a[:5].sum():.3f}" for a in acc))
    say(f"tree of {budget} nodes: tau {tau:.3f} (independence estimate), {tf_tau:.3f} (teacher-forced held-out); "
        f"{gpu_budget} nodes: {gpu_tau:.3f} / {tf_gpu:.3f}")
    text_s = None
    if text is not None:
        text_p = Path(text).resolve()
        text_s = str(text_p.relative_to(REPO) if text_p.is_relative_to(REPO) else text_p.name)
    report = {"data": data, "text": text_s, "sequences": len(seqs),
              "train_tokens": int(train_d["H"].shape[0]), "heldout_tokens": int(held_d["H"].shape[0]),
              "epochs": epochs, "lr": lr, "batch": batch, "lm_weight": lm_weight, "teacher_weight": teacher_weight,
              "seed": seed, "steps": len(history), "final_train_loss": round(history[-1], 4) if history else None,
              "heldout_ce_before": np.round(before, 4).tolist(), "heldout_ce_after": np.round(after, 4).tolist(),
              "budget": budget, "expected_tau": round(tau, 4), "teacher_forced_tau": round(tf_tau, 4),
              "gpu_budget": gpu_budget, "gpu_expected_tau": round(gpu_tau, 4),
              "gpu_teacher_forced_tau": round(tf_gpu, 4), "data_seconds": round(t_data - t_start, 1),
              "train_seconds": round(t_train - t_data, 1)}
    if data == "self":
        report.update(prompt_len=prompt_len, gen_len=gen_len)
    out = Path(model_dir) / kind if out is None else Path(out)
    save(heads, out, extra={"training": report}, dtype=np.float16)
    say(f"saved {out} ({report['train_seconds']:.0f} s of training)")
    return heads, report
