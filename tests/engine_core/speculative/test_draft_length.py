"""Adaptive draft lengths: the learnt step-cost table, the rate-maximizing k of a step's
requests in turn, and the tracker's alpha, backoff and probes."""

from __future__ import annotations

import math

import pytest

from services.engine_core.speculative.acceptance import AcceptanceTracker
from services.engine_core.speculative.draft_length import StepCost, StepPlan

CPU_DEFAULT = {1: 1.0, 2: 1.005, 3: 1.10, 4: 1.57, 5: 2.26, 6: 2.15, 7: 2.44, 8: 2.42}
"""A step verifying k drafts in decode steps: one stream in the CPU default mode (verify_step_cost.json)."""


def learnt(table: dict[int, float], num_decodes: int = 1, rounds: int = 3, base: float = 0.011) -> StepCost:
    """A StepCost that saw steps with each draft count of table (k: step time / plain step) after plain ones."""
    cost = StepCost()
    for _ in range(rounds):
        for d, x in table.items():
            cost.record(num_decodes, 0, base)
            cost.record(num_decodes, d, base * x)
    return cost


def linear(slope: float, max_d: int = 8) -> StepCost:
    return learnt({d: 1.0 + slope * d for d in range(1, max_d + 1)})


def test_the_prior_before_any_step() -> None:
    cost = StepCost()
    assert cost.relative(1, 0) == 0.0
    assert cost.relative(1, 3) == pytest.approx(3 * 0.1 / 1.1)
    assert cost.relative(8, 4) == pytest.approx(4 * 0.1 / 1.8)


def test_learns_a_curve_that_is_not_a_line() -> None:
    """Free up to 2 drafts, then a jump: each count's own cost, not a straight line through them."""
    cost = learnt(CPU_DEFAULT)
    assert cost.relative(1, 1) == pytest.approx(0.01)  # the floor: never free
    assert cost.relative(1, 2) == pytest.approx(0.02)
    assert cost.relative(1, 3) == pytest.approx(0.10)
    assert cost.relative(1, 4) == pytest.approx(0.57)
    assert cost.relative(1, 6) == pytest.approx(1.26)  # monotone: 6 drafts cost at least what 5 do
    assert cost.relative(1, 8) == pytest.approx(1.44)
    # So one stream drafts 2 at a middling acceptance and 3 at a high one, where a line
    # through the points (~0.18 a draft) would draft 7 at the high one.
    assert StepPlan(cost, 1).best(0.5, 8) == 2
    assert StepPlan(cost, 1).best(0.9, 8) == 3
    assert StepPlan(linear(0.18), 1).best(0.9, 8) == 7


def test_between_and_past_the_measured_counts() -> None:
    cost = learnt({2: 1.1, 4: 1.5})
    assert cost.relative(1, 1) == pytest.approx(0.05)  # from 0 to the first measured count
    prior = 0.1 / 1.1
    # Not measured: the count below it plus the prior slope (optimism: one step measures it),
    # at most the line between the counts around it.
    assert cost.relative(1, 3) == pytest.approx(0.1 + prior)
    assert learnt({2: 1.1, 4: 1.2}).relative(1, 3) == pytest.approx(0.15)
    assert cost.relative(1, 6) == pytest.approx(0.5 + 2 * prior)  # past the last: the prior slope
    noisy = learnt({4: 1.5, 8: 1.3})
    assert noisy.relative(1, 8) == pytest.approx(0.5)  # never less than fewer drafts cost


def test_ignores_drift_between_slow_and_fast_periods() -> None:
    """A shared machine: a slow period that happens to verify more drafts is not a costly draft."""
    cost = StepCost()
    for i in range(60):
        slow = 3.0 if (i // 10) % 2 else 1.0  # 10 steps fast, 10 slow, ...
        drafts = 4 if slow > 1 and i % 2 else 0  # drafts verified mostly in the slow periods
        cost.record(1, drafts, slow * 0.05 * (1.2 if drafts else 1.0))
    assert cost.relative(1, 4) == pytest.approx(0.2, abs=0.05)


def test_each_batch_size_has_its_own_table() -> None:
    """A step of more requests costs more for reasons a draft does not: only steps of the
    same batch size are compared."""
    cost = StepCost()
    for i in range(90):
        batch = 1 + (i // 10) % 8
        drafts = batch * (i % 3)
        cost.record(batch, drafts, (0.02 + 0.005 * batch) * (1.0 + 0.02 * drafts))
    assert cost.relative(8, 8) == pytest.approx(0.16, rel=1e-3)
    assert cost.relative(8, 16) == pytest.approx(0.32, rel=1e-3)
    assert cost.relative(1, 2) == pytest.approx(0.04, rel=1e-3)
    assert cost.relative(20, 4) == pytest.approx(4 * 0.1 / 3.0)  # an unseen size: the prior


def test_one_slow_step_moves_a_cost_a_bounded_amount() -> None:
    cost = learnt({2: 1.0})
    cost.record(1, 0, 0.01)
    cost.record(1, 2, 0.05)  # 5x: another process took the CPU
    assert cost.relative(1, 2) <= math.expm1(0.4) * 1.0001


def test_runs_without_drafts_keep_what_was_learnt() -> None:
    cost = learnt(CPU_DEFAULT)
    for _ in range(300):
        cost.record(1, 0, 0.011)
    assert cost.relative(1, 4) == pytest.approx(0.57)


def test_drafts_that_fail_do_not_pay_even_when_nearly_free() -> None:
    cost = learnt({d: 1.0 for d in range(1, 9)})
    assert StepPlan(cost, 4).best(0.005, 8) == 0
    assert StepPlan(cost, 1).best(0.0, 8) == 0
    assert StepPlan(cost, 1).best(0.3, 8) >= 2


def test_requests_of_a_step_choose_in_turn() -> None:
    """Two decode rows, drafts free up to 2 in the step, then a whole step more: the first
    request takes the free ones, the second (alone it would draft 2 too) then drafts none."""
    cost = learnt({1: 1.0, 2: 1.0, 3: 2.0, 4: 2.0}, num_decodes=2)
    plan = StepPlan(cost, 2)
    assert plan.best(0.9, 4) == 2
    plan.add(2, 0.9)
    assert plan.drafts == 2 and plan.tokens == pytest.approx(2 + 0.9 + 0.81)
    assert plan.best(0.9, 4) == 0
    assert StepPlan(cost, 2).best(0.9, 4) == 2


def test_the_costly_first_draft_of_an_eager_verification_step() -> None:
    """Decode-only steps one fused call, a step with drafts an eager one: the first draft
    costs 70 % of a step and each after it 1 %. Eight decode rows: no request's drafts make
    up for it; one stream: accepted drafts still pay for it."""
    cost = learnt({d: 1.7 + 0.01 * d for d in (1, 2, 4, 8)}, num_decodes=8)
    assert StepPlan(cost, 8).best(0.9, 8) == 0
    cost = learnt({d: 1.7 + 0.01 * d for d in (1, 2, 4, 8)})
    assert StepPlan(cost, 1).best(0.9, 8) == 8


def test_alpha_follows_recent_verifications() -> None:
    t = AcceptanceTracker(adaptive=True)
    assert t.alpha == 0.5
    for _ in range(6):
        t.record(4, 4)
    assert t.alpha > 0.9
    for _ in range(12):
        t.record(4, 0)  # each rejection at the first draft is one position tried
    assert t.alpha < 0.06  # no floor: the prior fades too


def test_adaptive_backoff_then_probe() -> None:
    cost = linear(0.17)
    t = AcceptanceTracker(adaptive=True)
    for _ in range(8):
        t.record(4, 0)
    # Not worth a draft: 4 steps without, then a probe of the drafts the prior alpha pays
    # for (2 at 17 % a draft), shorter runs while alpha still pays, then 8 steps without ...
    assert [t.draft_length(8, StepPlan(cost, 1)) for _ in range(5)] == [0, 0, 0, 0, 2]
    t.record(2, 0)
    singles = 0
    while (k := t.draft_length(8, StepPlan(cost, 1))) > 0 and singles < 5:
        t.record(k, 0)
        singles += 1
    assert k == 0 and singles <= 2
    assert [t.draft_length(8, StepPlan(cost, 1)) for _ in range(8)] == [0] * 7 + [2]
    # ... until a probe is accepted and alpha pays for drafts again.
    t.record(2, 2)
    assert t.alpha > 0.5 and t.draft_length(8, StepPlan(cost, 1)) >= 2
    # The window rule of fixed draft lengths does not apply.
    assert t.should_propose()


def test_a_failed_probe_backs_off_at_once() -> None:
    """Cheap drafts: a probe that fails does not start a run of drafts while alpha fades from
    the prior; the next backoff is twice as long."""
    cost = learnt(CPU_DEFAULT)
    t = AcceptanceTracker(adaptive=True)
    for _ in range(10):
        t.record(4, 0)
    assert [t.draft_length(8, StepPlan(cost, 1)) for _ in range(5)] == [0, 0, 0, 0, 2]
    t.record(2, 0)
    assert [t.draft_length(8, StepPlan(cost, 1)) for _ in range(9)] == [0] * 8 + [2]
    t.record(2, 0)
    assert [t.draft_length(8, StepPlan(cost, 1)) for _ in range(17)] == [0] * 16 + [2]


def test_always_wrong_drafts_cost_few_verifications() -> None:
    """From a fresh request (the prior alpha) with cheap drafts: failures until alpha no longer
    pays, then only probes."""
    cost = linear(0.01)
    t = AcceptanceTracker(adaptive=True)
    drafted = []
    for _ in range(128):
        k = t.draft_length(4, StepPlan(cost, 8))
        if k:
            t.record(k, 0)
        drafted.append(k)
    assert sum(drafted) <= 24
    assert sum(1 for k in drafted if k) <= 12
