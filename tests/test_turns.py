"""The fair-admission planner (``supervisor/turns.py``): pure data in, data out."""

from __future__ import annotations

import math

from mlx_supervisor.gateway.supervisor.turns import Candidate, Holder, plan_turn, turn_order

MB = 2**20


def test_a_busy_holder_yields_only_after_its_turn() -> None:
    hs = [Holder("a", 400 * MB, served=3.0, total=3.0, busy=True),
          Holder("b", 400 * MB, served=12.0, total=12.0, busy=True)]
    t = plan_turn(400 * MB, hs, 900 * MB, min_turn=10.0, drain=2.0)
    assert t.fits_ever and t.victims == ["b"] and t.wait == 2.0  # the most-served goes
    t = plan_turn(800 * MB, hs, 900 * MB, min_turn=10.0, drain=2.0)
    assert t.victims == [] and t.wait == 7.0 + 2.0  # both needed: wait for a's turn to end


def test_pinned_holders_never_yield_and_a_need_past_them_never_fits() -> None:
    hs = [Holder("pin", 500 * MB, served=100.0, pinned=True, busy=True),
          Holder("a", 400 * MB, served=100.0, busy=True)]
    assert plan_turn(400 * MB, hs, 1000 * MB, min_turn=1.0).victims == ["a"]
    never = plan_turn(600 * MB, hs, 1000 * MB, min_turn=1.0)
    assert not never.fits_ever and never.victims == [] and never.wait == math.inf
    assert not plan_turn(100 * MB, hs, 1000 * MB, max_models=1, min_turn=1.0).fits_ever


def test_loads_reservations_and_leavers_are_never_victims() -> None:
    hs = [Holder("loading", 400 * MB, served=None, busy=True),
          Holder("x#reserved", 300 * MB, served=None, busy=True),
          Holder("leaving", 300 * MB, served=50.0, stopping=True)]
    t = plan_turn(300 * MB, hs, 1000 * MB, min_turn=1.0)  # the leaver's bytes count as free
    assert t.fits_ever and t.victims == []
    t = plan_turn(600 * MB, hs, 1000 * MB, min_turn=1.0, drain=2.0)
    assert t.fits_ever and t.victims == [] and t.wait == 1.0 + 2.0  # until the load is a holder


def test_max_models_counts_like_bytes() -> None:
    hs = [Holder("a", 10 * MB, served=20.0, total=20.0, busy=True),
          Holder("b", 10 * MB, served=30.0, total=30.0, busy=True)]
    assert plan_turn(10 * MB, hs, 10_000 * MB, max_models=2, min_turn=5.0).victims == ["b"]


def test_the_most_served_holder_yields_first_once_its_turn_is_over() -> None:
    hs = [Holder("long_ago", 400 * MB, served=11.0, total=90.0, busy=True),
          Holder("recent", 400 * MB, served=30.0, total=30.0, busy=True),
          Holder("fresh", 400 * MB, served=2.0, total=500.0, busy=True)]
    t = plan_turn(400 * MB, hs, 1300 * MB, min_turn=10.0)
    assert t.victims == ["long_ago"]  # "fresh" has served most but its turn has just begun


def test_turn_order_serves_the_least_served_first() -> None:
    order = turn_order([Candidate("a", total=50.0, oldest_waiter=1.0),
                        Candidate("never", total=0.0, oldest_waiter=40.0),
                        Candidate("b", total=20.0, oldest_waiter=30.0),
                        Candidate("b2", total=20.0, oldest_waiter=10.0)])
    assert order == ["never", "b2", "b", "a"]
