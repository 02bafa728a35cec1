"""Benchmarks that print the limit next to the result (docs/design.md, "Benchmarks").

Reading order: forward (`minispec bench forward`: plain decoding against the memory-bandwidth limit and, where
installed, HF transformers) -> prompts (the prompt sets) -> decode (`minispec bench decode`: every decoder on the
same prompts, with the cost model's prediction beside each measurement) -> gate_trace (what drafting would give at
every position of a greedy decode, to replay a draft gate against an oracle: tools/measure_gate.py).
"""
from .decode import (bench_decode, depth_acceptance, draft_summary, prediction, print_draft_verify, print_lookup,
                     speculation_line, tree_of)
from .forward import bench_forward, check_bench, environment, memory_bandwidth, private_memory
from .prompts import PROMPT_SETS, copy_prompts, heldout_prompts

__all__ = ["PROMPT_SETS", "bench_decode", "bench_forward", "check_bench", "copy_prompts", "depth_acceptance",
           "draft_summary", "environment", "heldout_prompts", "memory_bandwidth", "prediction", "print_draft_verify",
           "print_lookup", "private_memory", "speculation_line", "tree_of"]
