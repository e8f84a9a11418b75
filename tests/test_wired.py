"""Every engine path decodes inside MLX's recommended wired limit (Metal), seen on Linux.

On Metal, ``mx.device_info()`` reports ``max_recommended_working_set_size`` and mlx-lm's
``wired_limit`` passes it to ``mx.set_wired_limit``. Linux reports no such size, so here the
device's report gets that one key added, and ``set_wired_limit`` (a no-op on the CPU backend,
still called through) is watched: the limit in force is recorded at every decode step of the
real engines on real tiny models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from mlx_lm.generate import BatchGenerator

from mlx_supervisor.shared.protocol import Done, Embed, Embeddings, Generate
from mlx_supervisor.worker.engines.embeddings import EmbeddingsEngine
from mlx_supervisor.worker.engines.lm import LMEngine
from mlx_supervisor.worker.engines.lm_solo import Solo

RECOMMENDED = 3 * 2**30


@pytest.fixture
def metal_report(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The wired limit in force (``limit``) and the limit seen at each decode step, by path."""
    state: dict[str, Any] = {"limit": 0, "seen": {"solo": [], "batch": [], "embed": []}}
    real_info, real_set = mx.device_info, mx.set_wired_limit

    def set_wired_limit(n: int) -> int:
        real_set(n)
        old, state["limit"] = state["limit"], n
        return old

    def watch(cls: Any, name: str, path: str) -> None:
        orig = getattr(cls, name)

        def wrapped(self: Any, *a: Any, **kw: Any) -> Any:
            state["seen"][path].append(state["limit"])
            return orig(self, *a, **kw)

        monkeypatch.setattr(cls, name, wrapped)

    monkeypatch.setattr(mx, "device_info",
                        lambda: {**real_info(), "max_recommended_working_set_size": RECOMMENDED})
    monkeypatch.setattr(mx, "set_wired_limit", set_wired_limit)
    watch(Solo, "next", "solo")
    watch(BatchGenerator, "next", "batch")
    watch(EmbeddingsEngine, "step", "embed")
    return state


def _run(engine: Any, *reqs: Generate | Embed) -> list[Any]:
    out: list[Any] = []
    for r in reqs:
        engine.submit(r, out.append)
    while engine.has_work():
        engine.step(out.append)
    return out


def test_lm_solo_and_batch_paths_run_inside_the_limit(metal_report: dict[str, Any],
                                                      demo_model_dir: Path) -> None:
    engine = LMEngine()
    engine.load(str(demo_model_dir))
    try:
        assert metal_report["limit"] == RECOMMENDED
        alone = _run(engine, Generate(id="a", prompt="one", max_tokens=8, temperature=0.0))
        assert isinstance(alone[-1], Done)
        both = _run(engine, Generate(id="b", prompt="two", max_tokens=8, temperature=0.0),
                    Generate(id="c", prompt="three", max_tokens=8, temperature=0.0))
        assert sum(isinstance(m, Done) for m in both) == 2
    finally:
        engine.close()
    seen = metal_report["seen"]
    assert seen["solo"] and seen["batch"], seen  # both paths ran
    assert set(seen["solo"]) == {RECOMMENDED} and set(seen["batch"]) == {RECOMMENDED}
    assert metal_report["limit"] == 0  # close gives the old limit back


def test_embeddings_run_inside_the_limit(metal_report: dict[str, Any],
                                         embeddings_model_dir: Path) -> None:
    engine = EmbeddingsEngine(max_length=16, tokens_per_pass=64)
    engine.load(str(embeddings_model_dir))
    try:
        out = _run(engine, Embed(id="e", texts=["hello world"]))
        assert isinstance(out[-1], Embeddings)
    finally:
        engine.close()
    assert set(metal_report["seen"]["embed"]) == {RECOMMENDED}
    assert metal_report["limit"] == 0


def test_default_budget_is_clamped_to_metals_recommended_working_set(
        caplog: pytest.LogCaptureFixture) -> None:
    from mlx_supervisor.gateway import budget

    total = 64 * 2**30
    with caplog.at_level("WARNING", logger="mlx_supervisor.serve"):
        assert budget.resolve("75%", total, recommended=40 * 2**30) == 40 * 2**30
    assert "clamped to Metal's max_recommended_working_set_size" in caplog.text
    assert budget.resolve("75%", total, recommended=60 * 2**30) == 48 * 2**30  # under it: as is
    assert budget.resolve("50GB", total, recommended=40 * 2**30) == 50 * 10**9  # explicit bytes
    # The probe is the real child process: Linux reports no recommended size.
    assert budget.recommended_working_set() is None
