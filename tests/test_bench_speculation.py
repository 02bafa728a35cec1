"""bench decode's decoder-agnostic columns, on hand-worked numbers, and its predicted-vs-measured line end to end."""
import re

import pytest

from conftest import random_tensors, tiny_config
from minispec import bench, generate
from minispec.bench import decode, depth_acceptance, prediction, speculation_line
from minispec.bench.decode import balanced_orders, speedup_interval, tree_tau_line, whole_tree_tau
from minispec.errors import UserError
from minispec.decoders.registry import make_proposer
from minispec.mistral.model import Model
from minispec.speculative import costs
from minispec.speculative.costs import tree_speedup
from minispec.speculative.loop import Stats


def test_per_depth_acceptance_is_the_conditional_rate_along_the_accepted_path():
    # steps: the root-only first step, then 2, 0, 1 and 3 of 3 drafted tokens kept (+ the bonus each time)
    s = Stats(steps=5, accepted=[1, 3, 1, 2, 4], drafted=[0, 3, 3, 3, 3])
    # depth 1: 3 of 4 drafting steps keep it; depth 2: 2 of those 3; depth 3: 1 of those 2
    assert depth_acceptance([s]) == [0.75, 2 / 3, 0.5]
    assert depth_acceptance([s], max_depth=3) == [0.75, 2 / 3, 0.5]     # a static tree 3 deep: the same


def test_a_wide_shallow_tree_reports_only_its_own_depths():
    # a tree of 2 root children: 2 nodes drafted per step, but only depth 1 exists
    s = Stats(steps=4, accepted=[1, 2, 1, 2], drafted=[0, 2, 2, 2])
    assert depth_acceptance([s], max_depth=1) == [2 / 3]


def test_a_static_trees_tau_is_counted_over_the_steps_that_verified_the_whole_tree():
    # two generations of a 3-node tree under a gate: plain steps (0), a probe (1), a step cut short at the end (2)
    a = Stats(steps=5, accepted=[1, 4, 1, 2, 1], drafted=[0, 3, 0, 1, 2])
    b = Stats(steps=3, accepted=[1, 2, 3], drafted=[0, 3, 3])
    # the whole tree was verified at 3 steps, which emitted 4, 2 and 3 tokens: tau 3.0; the decoder's own tau
    # over all 8 steps would be 15 / 8
    assert whole_tree_tau([a, b], 3) == (3.0, 3)
    assert whole_tree_tau([a, b], 4) == (None, 0)
    line = tree_tau_line("hydra", 3, 2.5, "the heads' stored top-k accuracies", [a, b])
    assert line == ("hydra tree of 3 draft nodes: expected tau 2.50 per step that verifies it (from the heads' "
                    "stored top-k accuracies, assumed independent) vs measured 3.00 over the 3 of 8 steps that did")
    assert tree_tau_line("hydra", 4, 2.5, "x", [a, b]).endswith("vs no step verified it")


def test_the_cost_model_divides_tau_by_the_interpolated_verify_cost_plus_the_proposal():
    costs = {1: 1.0, 2: 1.5, 4: 2.5}                     # c(3) interpolates to 2.0
    assert abs(tree_speedup(2.0, 3, 0.5, costs) - 2.0 / 2.5) < 1e-12


def test_the_decoder_line_reports_head_calls_proposal_cost_and_both_speedups():
    s = Stats(steps=4, accepted=[1, 3, 1, 3], drafted=[0, 2, 2, 2], propose_time=0.4, propose_cpu_time=0.2,
              counters={"head_calls": 6, "head_time_s": 0.2})
    s.verify_time = 0.7
    line, pred = speculation_line("hydra", [s], {1: 1.0, 2: 1.5, 4: 2.5}, 0.1, 1.23, 1.5, base_step=0.1)
    # tau 2; N_s = 1, 3, 3, 3 -> mean c(N_s) = (1 + 2 + 2 + 2) / 4 = 1.75; proposal 0.2 CPU s / 4 steps / 0.1 s
    # = 0.5 AR steps, half of it the heads (0.2 of 0.4 wall s); predicted 2 / (1.75 + 0.5) = 0.89
    assert "2.5 nodes verified/step, s(N) = 1.75 (in this run 1.75, wall)" in line     # 0.7 s / 4 steps / 0.1 s
    assert "per-depth acceptance [0.67, 1.00]" in line and "1.5 head calls/step" in line
    assert "proposal 0.50 plain steps/step (measured in this run), heads 0.25 of them" in line
    assert "predicted tau / (s(N) + proposal) = 0.89x, measured 1.23x in CPU time (measured / predicted 1.38), " \
        "1.50x in wall time" in line
    assert pred["predicted"] == 2 / 2.25 and pred["c"] == 1.75 and pred["proposal"] == 0.5


def test_the_prediction_averages_c_over_the_steps_not_c_of_the_mean_size():
    """Sized drafts vary per step: c is convex on a CPU, so c(mean N) would flatter them."""
    s = Stats(steps=2, accepted=[1, 5], drafted=[0, 6], propose_cpu_time=0.0)
    pred = prediction([s], {1: 1.0, 4: 1.5, 7: 4.0}, 0.1)
    assert pred["nodes"] == 4.0 and pred["c"] == (1.0 + 4.0) / 2 and pred["predicted"] == 3 / 2.5


def test_the_prediction_prices_each_step_at_the_proposers_modelled_cost_when_it_keeps_one():
    """A gated proposer sums its cost model's price of every step (a plain step at 1) in model.step_cost; the
    prediction divides tau by their mean and ignores the run's proposal time. Two steps: plain (1 token, 1.0)
    and a 3-node draft (3 tokens, modelled 2.5): tau 2, mean cost 1.75, predicted 2 / 1.75; s(N) = (1 + 2) / 2
    on {1: 1, 2: 1.5, 4: 2.5}, so the proposal shown is 1.75 - 1.5 = 0.25."""
    s = Stats(steps=2, accepted=[1, 3], drafted=[0, 2], propose_cpu_time=9.0, counters={"model.step_cost": 3.5})
    pred = prediction([s], {1: 1.0, 2: 1.5, 4: 2.5}, 0.1)
    assert pred["modelled"] and pred["predicted"] == 2 / 1.75 and pred["c"] == 1.5 and pred["proposal"] == 0.25
    line, _ = speculation_line("medusa", [s], {1: 1.0, 2: 1.5, 4: 2.5}, 0.1, 1.0)
    assert "proposal 0.25 plain steps/step (modelled)" in line


def test_the_prediction_adds_the_chains_cpu_time_per_step_to_a_modelled_proposal():
    """With prompt lookup's chain in the trees, the chain's CPU time (lookup.chain_cpu_s) is work no modelled
    price holds. The two steps of the test above, with 0.02 s of chain work: proposal 0.25 + 0.02 / 2 / 0.1 =
    0.35, predicted 2 / (1.5 + 0.35)."""
    s = Stats(steps=2, accepted=[1, 3], drafted=[0, 2], propose_cpu_time=9.0,
              counters={"model.step_cost": 3.5, "lookup.chain_cpu_s": 0.02})
    pred = prediction([s], {1: 1.0, 2: 1.5, 4: 2.5}, 0.1)
    assert pred["modelled"] and abs(pred["proposal"] - 0.35) < 1e-12
    assert abs(pred["predicted"] - 2 / 1.85) < 1e-12


def test_the_decoder_line_ignores_a_proposer_counter_that_is_a_series_not_a_count():
    """Draft & Verify records its threshold gamma at every step (a list): the line sums counts only."""
    s = Stats(steps=2, accepted=[2, 3], drafted=[2, 3], propose_time=0.2, propose_cpu_time=0.2,
              counters={"draft_verify.forwards": 5, "draft_verify.gamma": [0.6, 0.59]})
    s.verify_time = 0.3
    line, _ = speculation_line("draft_verify", [s], {1: 1.0, 2: 1.5, 4: 2.5}, 0.1, 0.9, base_step=0.1)
    assert "3.5 nodes verified/step" in line and "proposal 1.00 plain steps/step" in line     # 1 + 5/2; 0.2/2/0.1


def test_bench_decode_prints_the_canonical_curve_and_each_decoders_prediction_beside_its_measurement(
        cli_model, capsys, monkeypatch):
    """End to end on a tiny model: the curve is measured once (lookup's cost rule and the bench share it), printed
    with its statistic, and the lookup line's prediction is tau / (c(N) + proposal) of its own printed numbers.
    The decoders take turns going first, prompt after prompt."""
    calls, real = [], costs.measure_steps
    timed, real_generate = [], decode.generate

    def spy(*args, **kw):
        calls.append(args[1])
        return real(*args, **kw)

    def spy_generate(model, ids, decoder, max_new_tokens, **kw):
        if "eos_id" in kw:                                               # a timed decode (not the warm-up)
            timed.append(decoder)
        return real_generate(model, ids, decoder=decoder, max_new_tokens=max_new_tokens, **kw)
    monkeypatch.setattr(costs, "measure_steps", spy)
    monkeypatch.setattr(decode, "generate", spy_generate)
    folder, _, _ = cli_model
    results, curve = bench.bench_decode(str(folder), decoders=("ar", "lookup"), n_tokens=12, n_prompts=2, runs=2,
                                        device="cpu", prompt_set="copy")
    text = capsys.readouterr().out
    assert timed == ["ar", "lookup", "lookup", "ar"] * 2                 # 2 runs of 2 prompts, the orders alternating
    assert len(calls) == 1 and sorted(curve) == list(costs.STEP["sizes"])           # one curve, measured once
    assert re.search(r"whole-step cost curve on cpu .*: s\(N\) = median CPU time of a whole verify step of N "
                     r"nodes / that of a plain step, over 11 interleaved rounds against 112 cached tokens, N > 8 "
                     r"chained through s\(8\) \(plain "
                     r"step = [\d.]+ ms, bare one-token forward [\d.]+\): s\(1\)=1\.00, s\(2\)=", text)
    assert re.search(r"ar: one step costs [\d.]+ plain steps of the curve in CPU time", text)
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("lookup: per-depth"))
    c, p, pred, meas, lo, hi, ratio, wall = map(float, re.search(
        r"s\(N\) = ([\d.]+) .*proposal ([\d.]+) plain steps/step \(measured in this run\); speedup predicted "
        r"tau / \(s\(N\) \+ proposal\) = ([\d.]+)x, measured ([\d.]+)x in CPU time \[95% over the decodes: "
        r"([\d.]+)-([\d.]+)\] \(measured / predicted ([\d.]+)\), ([\d.]+)x in wall time",
        line).groups())
    assert lo <= hi
    tau = float(re.search(r"lookup: +[\d.]+ tokens/s  tau = ([\d.]+)", text).group(1))
    assert abs(pred - tau / (c + p)) < 0.02 and abs(ratio - meas / pred) < 0.02
    assert abs(wall - results["lookup"] / results["ar"]) < 0.006


def test_the_control_is_the_baseline_run_again_in_the_turns_and_its_speedup_is_printed_with_its_interval(
        cli_model, capsys, monkeypatch):
    """bench decode's A/A comparison: with control=True the baseline decodes twice in every prompt's turn (the
    balanced orders, as for any decoder), and the control line's speed-up is the baseline's CPU seconds per token
    over the control's, summed over the decodes."""
    timed, real_generate = [], decode.generate
    # 2 runs x 2 prompts, the two orders alternating: (ar, control), (control, ar), (ar, control), (control, ar)
    control = [1, 2, 5, 6]

    def spy_generate(model, ids, decoder, max_new_tokens, **kw):
        out = real_generate(model, ids, decoder=decoder, max_new_tokens=max_new_tokens, **kw)
        if "eos_id" in kw:                                               # a timed decode (not the warm-up)
            if len(timed) in control:                                    # the control's decodes made 1.5x dearer
                out.stats.decode_cpu_time *= 1.5
            timed.append((decoder, out.stats.decode_cpu_time, out.stats.new_tokens))
        return out
    monkeypatch.setattr(decode, "generate", spy_generate)
    folder, _, _ = cli_model
    results, _ = bench.bench_decode(str(folder), decoders=("ar",), n_tokens=8, n_prompts=2, runs=2, device="cpu",
                                    control=True)
    text = capsys.readouterr().out
    assert [d for d, _, _ in timed] == ["ar"] * 8 and sorted(results) == ["ar", "ar (control)"]
    ctl = [timed[i] for i in control]
    base = [t for i, t in enumerate(timed) if i not in control]
    per_token = lambda xs: sum(x[1] for x in xs) / sum(x[2] for x in xs)        # noqa: E731
    same, lo, hi = map(float, re.search(
        r"ar \(control\): the baseline once more, in the same turns: measured ([\d.]+)x in CPU time \[95% over the "
        r"decodes: ([\d.]+)-([\d.]+)\]", text).groups())
    assert abs(same - per_token(base) / per_token(ctl)) < 0.006 and lo <= hi
    rows = [ln.split(":  ")[0].strip() for ln in text.splitlines() if "tokens/s  tau =" in ln]
    assert rows == ["ar", "ar (control)"] and text.count("identical output: yes") == 2
    assert "ar (control): per-depth" not in text                        # no decoder line of its own


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7])
def test_each_decoder_goes_first_and_follows_each_other_equally_often_in_the_benchs_orders(n):
    orders = balanced_orders(list(range(n)))
    assert all(sorted(o) == list(range(n)) for o in orders)                 # each order runs every decoder once
    assert len(orders) == (2 * n if n % 2 else n)
    firsts = [o[0] for o in orders]
    assert all(firsts.count(i) == len(orders) // n for i in range(n))
    pairs = [(a, b) for o in orders for a, b in zip(o, o[1:])]              # (before, right after), within orders
    assert all(pairs.count((a, b)) == len(orders) // n for a in range(n) for b in range(n) if a != b)


def test_the_benchs_orders_for_two_and_four_decoders_are_worked_by_hand():
    assert balanced_orders(["a", "b"]) == [["a", "b"], ["b", "a"]]
    # first 0, 1, 3, 2; then + 1, + 2, + 3 (mod 4)
    assert balanced_orders("abcd") == [list("abdc"), list("bcad"), list("cdba"), list("dacb")]


def test_the_speedup_interval_is_a_paired_bootstrap_over_the_decodes():
    # every decode twice as fast: every resample says 2, however uneven the decodes' lengths
    assert speedup_interval([(2, 1), (4, 2)], [(1, 1), (2, 2)]) == (2.0, 2.0)
    # paired: a slow decode is slow for both (10 s against 5 s), so the ratio stays 2 in every resample; drawn
    # independently, the two sums would not move together and the interval would be wide
    assert speedup_interval([(1, 1), (10, 1)], [(0.5, 1), (5, 1)]) == (2.0, 2.0)
    # by hand: two decodes, the second 3x faster and the first equal; a resample of both decodes holds the first
    # twice (ratio 1, p = 1/4), the second twice (3, p = 1/4) or one of each (4 / 2 = 2, p = 1/2)
    assert speedup_interval([(1, 1), (3, 1)], [(1, 1), (1, 1)]) == (1.0, 3.0)
    assert speedup_interval([(1, 1), (3, 1)], [(1, 1), (1, 1)], level=0.6) == (1.0, 3.0)    # 20% in each tail
    assert speedup_interval([(1, 1), (3, 1)], [(1, 1), (1, 1)], level=0.4) == (2.0, 2.0)    # 30%: inside the 1/2


def test_a_speedup_interval_of_mismatched_decodes_is_refused():
    with pytest.raises(UserError, match=r"speedup_interval: .* got \[2, 2\] and \[1, 2\]"):
        speedup_interval([(1, 1), (2, 1)], [(1, 1)])


def test_the_loop_times_the_proposal_in_cpu_time_too():
    """bench decode's prediction reads Stats.propose_cpu_time: a proposer that spins 3 ms of CPU per step (plain
    decoding otherwise) must show at least that much, and no more than the whole decode's CPU time."""
    import time

    import numpy as np
    cfg = tiny_config(sliding_window=8, vocab_size=40)
    m = Model(cfg, random_tensors(cfg, seed=3), dtype="float64", device="cpu")
    plain = make_proposer("ar", m)

    class Spinning:
        name = "spinning"

        def start(self, ctx, prompt_hidden):
            plain.start(ctx, prompt_hidden)

        def propose(self, ctx):
            t0 = time.process_time()
            while time.process_time() - t0 < 0.003:
                np.sqrt(np.arange(100.0))
            return plain.propose(ctx)

        def observe(self, step):
            plain.observe(step)
    s = generate(m, [1, 2, 3], decoder=Spinning(), max_new_tokens=6, eos_id=None).stats
    assert 6 * 0.003 <= s.propose_cpu_time <= s.decode_cpu_time + 1e-9
