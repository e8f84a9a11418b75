"""The eviction planner is a pure function: tested on data alone."""

from mlx_supervisor.gateway.supervisor.eviction import Holder, Usage, plan_admission, relieve

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


def u(wid: str, mb: int, used: float, *, est: int | None = None, **kw: bool) -> Usage:
    return Usage(wid, mb, mb if est is None else est, used, **{"idle": True, **kw})


def test_relieve_evicts_idle_lru_first_never_pinned() -> None:
    usages = [u("a", 50, 1.0), u("b", 50, 2.0, pinned=True), u("c", 50, 3.0)]
    assert relieve(usages, budget=120) == (["a"], None)
    assert relieve(usages, budget=150) == ([], None)


def test_relieve_recycles_the_biggest_grower_when_evicting_is_not_enough() -> None:
    usages = [u("busy", 90, 1.0, est=40, idle=False), u("idle", 20, 2.0),
              u("small", 30, 3.0, est=25, idle=False)]
    evict, recycle = relieve(usages, budget=60)
    assert evict == ["idle"] and recycle == "busy"


def test_relieve_counts_stopping_workers_as_freed() -> None:
    usages = [u("going", 100, 1.0, stopping=True, idle=False), u("b", 50, 2.0)]
    assert relieve(usages, budget=60) == ([], None)
