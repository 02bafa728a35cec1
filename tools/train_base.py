"""Train the small Mistral that minispec ships (weights/<name>/), in PyTorch, on the CPU or on CUDA.

This is offline tooling: torch==2.13.0 is an optional extra (`pip install -e .[reference]`), never a runtime
dependency of minispec. The model below is Mistral's architecture written out in ~60 lines of torch with
Hugging Face's parameter names and rotate-half RoPE, so the exported model.safetensors loads unchanged in
transformers' MistralForCausalLM and in minispec (tests/test_shipped_model.py checks both).

Data: the corpus of tools/collect_corpus.py, tokenized with the tokenizer of tools/train_tokenizer.py, each
file wrapped as <s> file </s>, all files concatenated; a training sample is a random window of --ctx tokens
(the seed and the step fix it, so a resumed run sees the same batches). Held-out loss is measured on
non-overlapping --ctx windows of the held-out files.

Optimiser: AdamW (beta 0.9/0.95, weight decay on matrices only), linear warm-up then cosine decay to 10% of
the peak rate, gradient clipping at 1.0. A checkpoint (safetensors: weights, Adam moments, step) is written
every --ckpt-every steps; --resume continues from it.

    python tools/train_base.py --steps 1800 --out weights/stdlib-mistral
"""
import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from collect_corpus import SEPARATOR


# ---------------------------------------------------------------------------------------------------------
# The model (Mistral; HF names; rotate-half RoPE)
# ---------------------------------------------------------------------------------------------------------
class RMSNorm(torch.nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(T, Dh, theta, device):
    inv = 1.0 / theta ** (torch.arange(0, Dh, 2, dtype=torch.float64) / Dh)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]           # [T, Dh/2]
    ang = torch.cat([ang, ang], dim=-1)                                           # [T, Dh]
    return ang.cos().float().to(device), ang.sin().float().to(device)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class Layer(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        D, H, Hkv, Dh, Fh = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"], c["intermediate_size"]
        self.H, self.Hkv, self.Dh = H, Hkv, Dh
        self.input_layernorm = RMSNorm(D, c["rms_norm_eps"])
        self.post_attention_layernorm = RMSNorm(D, c["rms_norm_eps"])
        self.self_attn = torch.nn.Module()
        for name, (i, o) in {"q_proj": (D, H * Dh), "k_proj": (D, Hkv * Dh), "v_proj": (D, Hkv * Dh), "o_proj": (H * Dh, D)}.items():
            setattr(self.self_attn, name, torch.nn.Linear(i, o, bias=False))
        self.mlp = torch.nn.Module()
        for name, (i, o) in {"gate_proj": (D, Fh), "up_proj": (D, Fh), "down_proj": (Fh, D)}.items():
            setattr(self.mlp, name, torch.nn.Linear(i, o, bias=False))

    def forward(self, x, cos, sin, mask):
        B, T, _ = x.shape
        h = self.input_layernorm(x)
        a = self.self_attn
        q = a.q_proj(h).view(B, T, self.H, self.Dh).transpose(1, 2)                # [B, H, T, Dh]
        k = a.k_proj(h).view(B, T, self.Hkv, self.Dh).transpose(1, 2)              # [B, Hkv, T, Dh]
        v = a.v_proj(h).view(B, T, self.Hkv, self.Dh).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # [B, H, T, Dh]
        x = x + a.o_proj(o.transpose(1, 2).reshape(B, T, self.H * self.Dh))
        h = self.post_attention_layernorm(x)
        m = self.mlp
        return x + m.down_proj(F.silu(m.gate_proj(h)) * m.up_proj(h))


class Mistral(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.model = torch.nn.Module()
        self.model.embed_tokens = torch.nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.model.layers = torch.nn.ModuleList(Layer(c) for _ in range(c["num_hidden_layers"]))
        self.model.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.lm_head = torch.nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * c["num_hidden_layers"]) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
                torch.nn.init.normal_(p, std=std)

    def forward(self, ids):
        T = ids.shape[1]
        cos, sin = rope_tables(T, self.c["head_dim"], self.c["rope_theta"], ids.device)
        i = torch.arange(T, device=ids.device)
        # query i sees keys j with i - W < j <= i: W keys including itself
        mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - self.c["sliding_window"])
        x = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask)
        return self.lm_head(self.model.norm(x))


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------
def tokens(corpus, split, sp, cache_dir):
    """The split as one uint16 array: <s> file </s> <s> file </s> ... (cached beside the corpus)."""
    cache = Path(cache_dir) / f"{split}.{sp.vocab_size()}.npy"
    if cache.exists():
        return np.load(cache)
    docs = (Path(corpus) / f"{split}.txt").read_text(encoding="utf-8").split(SEPARATOR)
    ids = []
    for doc in docs:
        ids += [sp.bos_id()] + sp.encode(doc) + [sp.eos_id()]
    arr = np.asarray(ids, dtype=np.uint16)
    np.save(cache, arr)
    return arr


def batch(arr, step, B, T, seed):
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(arr) - T - 1, size=B)
    x = np.stack([arr[s:s + T] for s in starts]).astype(np.int64)
    y = np.stack([arr[s + 1:s + T + 1] for s in starts]).astype(np.int64)
    return torch.from_numpy(x), torch.from_numpy(y)


@torch.no_grad()
def heldout_nll(model, arr, T, max_windows=None, device="cpu"):
    """Sum of NLL (nats) and token count over non-overlapping T-token windows of arr."""
    n = (len(arr) - 1) // T
    if max_windows:
        n = min(n, max_windows)
    total, count = 0.0, 0
    for w0 in range(0, n, 8):
        ws = range(w0, min(n, w0 + 8))
        x = torch.from_numpy(np.stack([arr[w * T:(w + 1) * T] for w in ws]).astype(np.int64)).to(device)
        y = torch.from_numpy(np.stack([arr[w * T + 1:(w + 1) * T + 1] for w in ws]).astype(np.int64)).to(device)
        logits = model(x).float()
        total += F.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1), reduction="sum").item()
        count += y.numel()
    return total, count


# ---------------------------------------------------------------------------------------------------------
# Checkpoints and export
# ---------------------------------------------------------------------------------------------------------
def save_checkpoint(path, model, opt, step):
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    for i, p in enumerate(model.parameters()):
        st = opt.state.get(p, {})
        if st:
            tensors[f"adam.{i}.exp_avg"] = st["exp_avg"].contiguous()
            tensors[f"adam.{i}.exp_avg_sq"] = st["exp_avg_sq"].contiguous()
            tensors[f"adam.{i}.step"] = st["step"].reshape(1).float()
    tmp = Path(str(path) + ".tmp")
    save_file(tensors, str(tmp), metadata={"step": str(step)})
    tmp.replace(path)


def load_checkpoint(path, model, opt):
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        step = int(f.metadata()["step"])
    t = load_file(str(path))
    model.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
    for i, p in enumerate(model.parameters()):
        if f"adam.{i}.exp_avg" in t:
            opt.state[p] = {"exp_avg": t[f"adam.{i}.exp_avg"], "exp_avg_sq": t[f"adam.{i}.exp_avg_sq"],
                            "step": t[f"adam.{i}.step"].reshape(())}
    return step


def hf_config(c):
    """config.json in the layout of the released Mistral-7B-v0.1 (top-level rope_theta)."""
    return {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "torch_dtype": "bfloat16",
            "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "initializer_range": 0.02,
            "max_position_embeddings": c["max_position_embeddings"], "tie_word_embeddings": False,
            "attention_dropout": 0.0, "use_cache": True, **{k: c[k] for k in (
                "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "sliding_window")}}


def export(model, out):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(model.c), indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="data/corpus")
    ap.add_argument("--out", default="weights/stdlib-mistral")
    ap.add_argument("--work", default="data/train", help="checkpoints, token caches and the log")
    ap.add_argument("--dim", type=int, default=192)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=1800)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--bench", type=int, default=0, help="time this many steps and exit")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sp = spm.SentencePieceProcessor(model_file=str(Path(args.out) / "tokenizer.model"))
    train, held = tokens(args.corpus, "train", sp, work), tokens(args.corpus, "heldout", sp, work)
    c = dict(vocab_size=sp.vocab_size(), hidden_size=args.dim, intermediate_size=args.hidden,
             num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
             head_dim=args.dim // args.heads, rms_norm_eps=1e-5, rope_theta=10000.0,
             sliding_window=args.window, max_position_embeddings=args.ctx * 8)
    model = Mistral(c).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    ckpt, log_path = work / "ckpt.safetensors", work / "log.jsonl"
    step = load_checkpoint(ckpt, model, opt) if args.resume and ckpt.exists() else 0
    if log_path.exists():   # keep the log consistent with the checkpoint: drop records written after it
        recs = [ln for ln in log_path.read_text().splitlines() if json.loads(ln)["step"] <= step]
        log_path.write_text("".join(r + "\n" for r in recs))
    print(f"params {n_params:,}  train tokens {len(train):,}  heldout tokens {len(held):,}  "
          f"tokens/step {args.batch * args.ctx:,}  device {device}  start step {step}")

    def lr_at(s):
        if s < args.warmup:
            return args.lr * (s + 1) / args.warmup
        prog = (s - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * prog)))

    total = args.bench or args.steps
    bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True)
    t0, tok0 = time.time(), step * args.batch * args.ctx
    while step < total:
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x, y = batch(train, step, args.batch, args.ctx, args.seed)
        logits = model(x.to(device))
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.to(device).view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr_at(step - 1):.2e}")
        rec = {"step": step, "train_loss": loss.item(), "lr": lr_at(step - 1), "time": time.time() - t0,
               "tokens": step * args.batch * args.ctx}
        if args.bench:
            continue
        if step % args.eval_every == 0 or step == total:
            model.eval()
            s, n = heldout_nll(model, held, args.ctx, max_windows=48, device=device)
            model.train()
            rec["heldout_loss"] = s / n
            bar.write(f"step {step}  train {loss.item():.4f}  heldout {s / n:.4f}  "
                      f"{(rec['tokens'] - tok0) / (time.time() - t0):.0f} tok/s")
        with open(log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if step % args.ckpt_every == 0 or step == total:
            save_checkpoint(ckpt, model, opt, step)
    bar.close()
    dt = time.time() - t0
    print(f"{(step * args.batch * args.ctx - tok0) / dt:.0f} tokens/s over {dt:.0f} s")
    if not args.bench:
        export(model, args.out)
        print(f"exported {args.out}")


if __name__ == "__main__":
    main()
