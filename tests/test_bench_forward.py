"""`minispec bench forward`'s own measurements: the memory bandwidth it compares a decode step with, and what it prints."""
import re
import threading
from types import SimpleNamespace

import numpy as np
from conftest import FIXTURES

from minispec import bench
from minispec.bench import forward
from minispec.mistral.model import proc_bytes


def test_memory_bandwidth_reads_every_element_once_spread_over_the_threads_it_is_given(monkeypatch):
    calls = []
    together = threading.Barrier(3, timeout=10)                       # each read's three parts must run at once

    def reduce(a):
        calls.append(a.size)
        together.wait()                                                # breaks (and fails) unless 3 threads meet
        return np.add.reduce(a)

    fake = SimpleNamespace(ones=np.ones, uint64=np.uint64, array_split=np.array_split, add=SimpleNamespace(reduce=reduce))
    monkeypatch.setattr(forward, "np", fake)
    assert bench.memory_bandwidth(mb=8, reps=2, threads=3) > 0
    assert sum(calls) == 2 * (8 << 17)                                 # 8 MB of uint64, read twice (reps)
    assert len(calls) == 6                                             # three parts per read, on three threads


def test_bench_forward_reports_both_bandwidth_limits_and_the_verify_cost_curve(capsys):
    bench.bench_forward(FIXTURES / "gqa4_hd_bf16", n_tokens=3, runs=1, compare_hf=False, weights="mapped")
    out = capsys.readouterr().out
    assert "weights (mapped)" in out and "GB/s on one core" in out
    one, both = map(float, re.search(r"= ([\d.]+)x the one-core .* ([\d.]+)x the all-core", out).groups())
    assert one > 0 and both > 0
    assert re.search(r"c\(2\)=[\d.]+, c\(4\)=[\d.]+, c\(8\)=[\d.]+", out)


def test_proc_bytes_reads_the_named_field_in_kilobytes_and_is_none_without_the_file(tmp_path):
    status = tmp_path / "status"
    status.write_text("VmRSS:\t  9999 kB\nRssAnonX:\t 7 kB\nRssAnon:\t    1234 kB\n")   # a hand-written /proc file
    assert proc_bytes(status, "RssAnon") == 1234 * 1024
    assert proc_bytes(status, "VmSwap") is None
    assert proc_bytes(tmp_path / "missing", "RssAnon") is None
