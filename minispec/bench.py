"""Benchmarks that print the limit next to the result (STYLE.md #11).

`bench_forward`: plain greedy decoding, tokens/s on generated tokens only — the prompt is prefilled, the timer
starts after the first new token, the median of `runs` runs after a warm-up run is reported — and, where torch
and transformers are installed, HF transformers' MistralForCausalLM decoding the same weights the same way in the
same process, with the ratio. The environment (CPU, BLAS, threads, versions) is printed first.
"""
import os
import platform
import statistics
import time

import numpy as np

from .backend import to_host
from .model import load


def environment():
    cpu = platform.processor() or "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ}
    blas = "?"
    try:
        cfg = np.show_config(mode="dicts")
        blas = cfg["Build Dependencies"]["blas"]["name"]
    except Exception:
        pass
    return (f"python {platform.python_version()}, numpy {np.__version__} ({blas}), {os.cpu_count()} cpus: {cpu}, "
            f"threads env {threads or 'unset'}")


def _decode_rate(step, first, n_tokens, runs):
    """Median tokens/s of `runs` timed runs after one warm-up; step(token) -> next token; timer after token 1."""
    rates = []
    for r in range(runs + 1):
        tok = first(r)
        t0 = time.perf_counter()
        for _ in range(n_tokens - 1):
            tok = step(tok)
        dt = time.perf_counter() - t0
        if r > 0:
            rates.append((n_tokens - 1) / dt)
    return statistics.median(rates), rates


def bench_forward(model_dir, n_tokens=64, runs=5, device="auto", dtype="float32", compare_hf=True, prompt_len=16):
    print("environment:", environment())
    model = load(model_dir, dtype=dtype, device=device)
    c = model.config
    prompt = (np.arange(prompt_len) * 7 + 1) % c.vocab_size
    state = {}

    def first(_):
        state["cache"] = model.new_cache()
        return int(to_host(model.forward(prompt, state["cache"])[-1].argmax()))

    def step(tok):
        return int(to_host(model.forward([tok], state["cache"])[-1].argmax()))

    med, rates = _decode_rate(step, first, n_tokens, runs)
    n_params = sum(a.size for a in [model.tok_embeddings, model.output]) + sum(
        a.size for lw in model.layers for a in lw.values())
    print(f"model: {model_dir} ({n_params / 1e6:.2f} M parameters, L={c.n_layers} D={c.dim} H={c.n_heads} "
          f"Hkv={c.n_kv_heads} W={c.sliding_window} V={c.vocab_size}), {dtype} on {model.device}")
    print(f"minispec decode: {med:.1f} tokens/s (median of {runs} runs of {n_tokens - 1} timed tokens; "
          f"runs {', '.join(f'{r:.0f}' for r in rates)})")
    # the weight-streaming limit: each token reads every weight once (embedding row aside)
    bytes_per_token = (n_params - model.tok_embeddings.size) * np.dtype(model.dtype).itemsize
    print(f"  weights read per token: {bytes_per_token / 1e6:.1f} MB -> {med * bytes_per_token / 1e9:.2f} GB/s achieved")
    if not compare_hf:
        return {"minispec": med}
    try:
        import torch
        from transformers import MistralForCausalLM
    except ImportError:
        print("HF transformers: not installed (pip install 'minispec[reference]' to compare)")
        return {"minispec": med}
    try:
        hf = MistralForCausalLM.from_pretrained(model_dir, torch_dtype=getattr(torch, dtype),
                                                attn_implementation="eager").eval()
    except Exception as e:
        print(f"HF transformers: cannot load {model_dir} ({type(e).__name__}: {str(e)[:120]})")
        return {"minispec": med}
    hstate = {}

    @torch.no_grad()
    def hf_first(_):
        out = hf(torch.as_tensor(prompt)[None], use_cache=True)
        hstate["past"] = out.past_key_values
        return int(out.logits[0, -1].argmax())

    @torch.no_grad()
    def hf_step(tok):
        out = hf(torch.tensor([[tok]]), past_key_values=hstate["past"], use_cache=True)
        hstate["past"] = out.past_key_values
        return int(out.logits[0, -1].argmax())

    hmed, hrates = _decode_rate(hf_step, hf_first, n_tokens, runs)
    print(f"HF transformers {__import__('transformers').__version__} (torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, eager) decode: {hmed:.1f} tokens/s "
          f"(runs {', '.join(f'{r:.0f}' for r in hrates)})")
    print(f"ratio minispec / HF: {med / hmed:.2f}x")
    return {"minispec": med, "hf": hmed}
