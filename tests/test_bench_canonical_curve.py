"""One canonical verify cost curve c(T) per model and backend (issue 17): measured once, with its statistic stated,
and the one every decoder's cost rule reads."""
import time
from types import SimpleNamespace

import numpy as np
from conftest import random_tensors, tiny_config

from minispec.decoders.draft_verify import SkipSet, measured_draft_costs
from minispec.mistral.model import Model
from minispec.speculative import costs
from minispec.speculative.draft_length import verify_costs
from minispec.speculative.dynamic_tree import model_costs


class Scripted:
    """A fake model on a fake clock: a T-token block forward takes 1 + (T - 1) / 2 units, so c(T) = (T + 1) / 2,
    except in two rounds whose multi-token forwards run 10x slower (round 3) and 10x faster (round 7): noise a
    median ignores and a minimum or a mean would not. And, as the shipped model did on a CPU, a one-token forward
    in a round after one that ran a block of 16 tokens or more takes 1.5 units: the curve must not divide by it."""
    xp = np
    config = SimpleNamespace(vocab_size=50)

    def __init__(self):
        self.now, self.round, self.seen = 0.0, -1, 0          # seen: the largest block since the last T = 1

    def clock(self):
        return self.now

    def new_cache(self):
        return SimpleNamespace(discard=lambda: None)

    def forward(self, ids, cache):
        pass

    def forward_block(self, ids, cache):
        T = len(ids)
        if T == 1:                                           # every round starts with the one-token forward
            self.round, slow, self.seen = self.round + 1, self.seen >= 16, 0
            self.now += 1.5 if slow else 1.0
        else:
            self.seen = max(self.seen, T)
            self.now += (1 + (T - 1) / 2) * {3: 10.0, 7: 0.1}.get(self.round, 1.0)
        return SimpleNamespace(logits=np.zeros((T, 50)))


def count_measurements(monkeypatch):
    """Wrap costs.measure_costs so that each call is recorded: [(sizes, reps, context)]."""
    calls, real = [], costs.measure_costs

    def spy(model, sizes, reps, context, clocks, **kw):
        calls.append((tuple(sizes), reps, context))
        return real(model, sizes, reps, context, clocks, **kw)
    monkeypatch.setattr(costs, "measure_costs", spy)
    return calls


def test_the_canonical_curve_is_the_median_over_interleaved_rounds_of_its_sizes_on_the_backend_clock(monkeypatch):
    model = Scripted()
    monkeypatch.setattr(costs, "backend_clock", lambda m: (m.clock, "CPU time"))
    calls = count_measurements(monkeypatch)
    curve = costs.backend_curve(model)
    assert curve.costs == {T: (T + 1) / 2 for T in costs.CANONICAL["sizes"]}     # the noise ignored
    # the small sizes in rounds of their own; the large ones in rounds with the anchor T = 8, chained through c(8)
    assert calls == [((1, 2, 3, 4, 6, 8), 15, 200), ((8, 12, 16, 24, 32, 48, 64), 15, 200)]
    assert curve.t1 == 1.0 and curve.clock == "CPU time" and (curve.reps, curve.context) == (15, 200)
    text = curve.describe()
    assert "median CPU time" in text and "15 interleaved rounds against 200 cached tokens" in text
    assert "T > 8 chained through c(8)" in text
    assert "(t1 = 1000.00 ms)" in text and "c(2)=1.50" in text and "c(64)=32.50" in text


def test_a_second_call_returns_the_same_curve_without_measuring_and_each_model_has_its_own(monkeypatch):
    monkeypatch.setattr(costs, "backend_clock", lambda m: (m.clock, "CPU time"))
    calls = count_measurements(monkeypatch)
    a, b = Scripted(), Scripted()
    first = costs.backend_curve(a)
    assert costs.backend_curve(a) is first and costs.backend_curve(a, max_tokens=64) is first
    assert len(calls) == 2                                   # one curve: its small and its large sizes
    costs.backend_curve(b)                                   # another model: measured for itself
    assert len(calls) == 4
    longer = costs.backend_curve(a, max_tokens=100)          # blocks beyond 64: extended by doublings, once
    assert calls[-1][0] == (8, 12, 16, 24, 32, 48, 64, 100) and longer.costs[100] == 50.5
    assert costs.backend_curve(a, max_tokens=80) is longer and len(calls) == 6


def test_the_real_clock_is_cpu_time_on_numpy():
    cfg = tiny_config()
    model = Model(cfg, random_tensors(cfg), dtype="float32", device="cpu")
    assert costs.backend_clock(model) == (time.process_time, "CPU time")


def test_every_decoders_cost_rule_reads_the_one_whole_step_curve(monkeypatch):
    """Lookup (verify_costs), dynamic trees (model_costs) and Draft & Verify (measured_draft_costs) once had a
    curve each; now all three read the same whole-step curve (costs.step_curve), measured once per model."""
    calls, real = [], costs.measure_steps
    monkeypatch.setattr(costs, "measure_steps", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = tiny_config(n_layers=2, sliding_window=16)
    model = Model(cfg, random_tensors(cfg), dtype="float32", device="cpu")
    curve = costs.step_curve(model)
    assert verify_costs(model, 9) is curve.costs
    assert model_costs(model) == (curve.costs, curve.unit)
    r, c = measured_draft_costs(model, SkipSet.from_lists(2, attn=[0], mlp=[1]), 8)
    assert c is curve.costs and r > 0
    assert costs.step_curve(model) is curve and len(calls) == 1              # measured once
