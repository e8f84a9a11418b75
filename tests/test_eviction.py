"""The eviction planner is a pure function: tested on data alone."""

from mlx_supervisor.gateway.eviction import Holder, plan_admission

GB = 10**9


def h(mid: str, gb: float, used: float, **kw: bool) -> Holder:
    return Holder(mid, int(gb * GB), used, **kw)


def test_fits_without_eviction() -> None:
    plan = plan_admission(2 * GB, [h("a", 2, 1)], budget=5 * GB)
    assert plan.fits and not plan.victims and not plan.wait


def test_evicts_least_recently_used_first() -> None:
    holders = [h("a", 2, 1.0), h("b", 2, 3.0), h("c", 2, 2.0)]
    plan = plan_admission(2 * GB, holders, budget=6 * GB)
    assert plan.victims == ["a"] and plan.fits and plan.wait


def test_never_evicts_pinned_or_busy() -> None:
    holders = [h("a", 2, 1.0, pinned=True), h("b", 2, 2.0, busy=True), h("c", 2, 3.0)]
    plan = plan_admission(2 * GB, holders, budget=6 * GB)
    assert plan.victims == ["c"]
    plan = plan_admission(4 * GB, holders, budget=6 * GB)
    assert not plan.fits and plan.victims == []


def test_stopping_workers_count_as_freed_but_must_be_waited_for() -> None:
    plan = plan_admission(2 * GB, [h("a", 2, 1.0, stopping=True), h("b", 2, 2.0)], budget=4 * GB)
    assert plan.fits and plan.victims == [] and plan.wait


def test_max_models_caps_hot_workers() -> None:
    plan = plan_admission(1, [h("a", 1, 1.0), h("b", 1, 2.0)], budget=100 * GB, max_models=2)
    assert plan.victims == ["a"] and plan.wait


def test_more_than_budget_never_fits() -> None:
    assert not plan_admission(7 * GB, [], budget=6 * GB).fits
