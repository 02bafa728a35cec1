"""bench decode's decoder-agnostic columns, on hand-worked numbers."""
from minispec.bench import depth_acceptance, speculation_line
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


def test_the_cost_model_divides_tau_by_the_interpolated_verify_cost_plus_the_proposal():
    costs = {1: 1.0, 2: 1.5, 4: 2.5}                     # c(3) interpolates to 2.0
    assert abs(tree_speedup(2.0, 3, 0.5, costs) - 2.0 / 2.5) < 1e-12


def test_the_decoder_line_reports_head_calls_proposal_cost_and_both_speedups():
    s = Stats(steps=4, accepted=[1, 3, 1, 3], drafted=[0, 2, 2, 2], propose_time=0.4,
              counters={"head_calls": 6, "head_time_s": 0.2})
    s.verify_time = 0.7
    line = speculation_line("hydra", [s], {1: 1.0, 2: 1.5, 4: 2.5}, 0.1, 1.23, base_step=0.1)
    assert "2.5 nodes verified/step, c(N) = 1.75 (in this run 1.75)" in line            # 0.7 s / 4 steps / 0.1 s
    # tau 2, nodes 1 + 6/4 = 2.5 -> c = 1.75; proposal 0.4 / 4 / 0.1 = 1.0 AR steps; 2 / 2.75 = 0.73
    assert "per-depth acceptance [0.67, 1.00]" in line and "1.5 head calls/step" in line
    assert "proposal 1.00 AR steps/step, heads 0.50 of them" in line
    assert "predicted tau / (c(N) + proposal) = 0.73x, measured 1.23x" in line


def test_the_decoder_line_ignores_a_proposer_counter_that_is_a_series_not_a_count():
    """Draft & Verify records its threshold gamma at every step (a list): the line sums counts only."""
    s = Stats(steps=2, accepted=[2, 3], drafted=[2, 3], propose_time=0.2,
              counters={"draft_verify.forwards": 5, "draft_verify.gamma": [0.6, 0.59]})
    s.verify_time = 0.3
    line = speculation_line("draft_verify", [s], {1: 1.0, 2: 1.5, 4: 2.5}, 0.1, 0.9, base_step=0.1)
    assert "3.5 nodes verified/step" in line and "proposal 1.00 AR steps/step" in line     # 1 + 5/2; 0.2/2/0.1
