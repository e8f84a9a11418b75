"""The LM engine in-process, on the real tiny demo llama (no mocks)."""

from __future__ import annotations

from pathlib import Path

import mlx_lm
import pytest

from mlx_supervisor.shared.protocol import Chunk, Done, Error, Generate, Started
from mlx_supervisor.worker.engines.lm import LMEngine

CHAT = [{"role": "user", "content": "Hello there, how are you today?"}]


@pytest.fixture(scope="module")
def engine(demo_model_dir: Path):
    e = LMEngine()
    info = e.load(str(demo_model_dir))
    assert info.kind == "lm" and info.context_length == 2048
    yield e
    e.close()


def run(engine: LMEngine, *reqs: Generate, cancel_after: dict[str, int] | None = None,
        ) -> dict[str, list]:
    """Submit all, step until idle; ``cancel_after[id] = n`` cancels after n chunks of id."""
    out: dict[str, list] = {r.id: [] for r in reqs}

    def emit(m) -> None:
        out[m.id].append(m)

    for r in reqs:
        engine.submit(r, emit)
    steps = 0
    while engine.has_work():
        engine.step(emit)
        steps += 1
        assert steps < 5000
        for rid, n in (cancel_after or {}).items():
            if sum(isinstance(m, Chunk) for m in out[rid]) >= n and not isinstance(
                    out[rid][-1], Done):
                engine.cancel(rid)
    assert not engine.running and not engine.by_id
    return out


def text(msgs: list) -> str:
    return "".join(m.text for m in msgs if isinstance(m, Chunk))


def done(msgs: list) -> Done:
    assert isinstance(msgs[-1], Done), msgs[-1]
    return msgs[-1]


def greedy(rid: str = "g", **kw) -> Generate:
    return Generate(id=rid, **{"messages": CHAT, "max_tokens": 24, "temperature": 0.0, **kw})


def test_streams_the_same_text_as_mlx_lm(engine: LMEngine, demo_model_dir: Path):
    msgs = run(engine, Generate(id="s", prompt="The quick brown fox", max_tokens=20,
                                temperature=0.0))["s"]
    assert isinstance(msgs[0], Started) and msgs[0].prompt_tokens > 0
    chunks = [m for m in msgs if isinstance(m, Chunk)]
    assert len(chunks) >= 10  # streamed, not one blob
    d = done(msgs)
    assert d.finish_reason == "length" and d.completion_tokens == 20
    assert sum(c.tokens for c in chunks) == 20
    model, tok = mlx_lm.load(str(demo_model_dir))
    assert text(msgs) == mlx_lm.generate(model, tok, "The quick brown fox", max_tokens=20)


def test_stop_string_ends_stream_and_is_never_sent(engine: LMEngine):
    full = text(run(engine, greedy(max_tokens=30))["g"])
    assert len(full) > 20
    for stop in (full[8:12], full[9:11] + full[11:14]):  # token-aligned or not
        msgs = run(engine, greedy(stop=[stop, "never-seen"], max_tokens=30))["g"]
        head = full[: full.index(stop)]
        assert text(msgs) == head, (stop, full)
        assert done(msgs).finish_reason == "stop"
        assert done(msgs).completion_tokens < 30


def test_eos_stops_and_is_not_text(engine: LMEngine):
    eos = next(iter(engine.tokenizer.eos_token_ids))
    msgs = run(engine, greedy(logit_bias={eos: 1000.0}))["g"]
    d = done(msgs)
    assert d.finish_reason == "stop" and d.completion_tokens == 1
    assert text(msgs) == ""


def test_max_tokens_gives_length(engine: LMEngine):
    d = done(run(engine, greedy(max_tokens=5))["g"])
    assert (d.finish_reason, d.completion_tokens) == ("length", 5)


def test_batched_requests_match_their_solo_runs(engine: LMEngine):
    a = Generate(id="a", prompt="Once upon a time", max_tokens=24, temperature=0.0)
    b = greedy("b", max_tokens=16)
    solo_a, solo_b = text(run(engine, a)["a"]), text(run(engine, b)["b"])
    both = run(engine, a, b)
    assert text(both["a"]) == solo_a and text(both["b"]) == solo_b


def test_seed_reproduces_even_inside_a_batch(engine: LMEngine):
    def seeded(rid: str, seed: int) -> Generate:
        return Generate(id=rid, prompt="Hello world", max_tokens=24, temperature=1.0,
                        top_p=0.95, seed=seed)

    alone = text(run(engine, seeded("s", 7))["s"])
    noise = Generate(id="n", messages=CHAT, max_tokens=30, temperature=1.0)
    batched = run(engine, noise, seeded("s", 7))
    assert text(batched["s"]) == alone
    assert text(run(engine, seeded("s", 8))["s"]) != alone


def test_logprobs_and_top_logprobs(engine: LMEngine):
    msgs = run(engine, greedy(max_tokens=6, logprobs=True, top_logprobs=3))["g"]
    lps = [lp for m in msgs if isinstance(m, Chunk) for lp in m.logprobs or []]
    assert len(lps) == 6
    for lp in lps:
        assert lp.logprob <= 0 and len(lp.top) == 3
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
        assert lp.top[0] == (lp.token, pytest.approx(lp.logprob))  # greedy takes the top one
    # mlx-lm's BPE detokenizer drops the leading space of the first token
    assert "".join(lp.token for lp in lps).lstrip() == text(msgs)


def test_cancel_removes_only_that_request(engine: LMEngine):
    out = run(engine, greedy("x", max_tokens=200), greedy("y", max_tokens=40),
              cancel_after={"x": 3})
    assert sum(isinstance(m, Chunk) for m in out["x"]) == 3
    assert not any(isinstance(m, Done | Error) for m in out["x"])
    assert done(out["y"]).completion_tokens == 40


@pytest.mark.parametrize("req, code, words", [
    (Generate(id="e", prompt_ids=[3 + i % 700 for i in range(2048)]), "context_length_exceeded",
     ["2048", "2048 tokens"]),
    (Generate(id="e", prompt="hi", max_tokens=0), "invalid_request_error", ["max_tokens"]),
    (Generate(id="e", prompt=""), "invalid_request_error", ["empty"]),
    (Generate(id="e"), "invalid_request_error", ["exactly one"]),
])
def test_bad_requests_are_400(engine: LMEngine, req: Generate, code: str, words: list[str]):
    (err,) = run(engine, req)["e"]
    assert isinstance(err, Error) and err.status == 400 and err.code == code
    assert all(w in err.message for w in words), err.message


def test_max_tokens_clamped_to_the_context(engine: LMEngine):
    msgs = run(engine, Generate(id="c", prompt_ids=[3 + i % 700 for i in range(2040)], max_tokens=100,
                                temperature=0.0))["c"]
    d = done(msgs)
    assert (d.prompt_tokens, d.completion_tokens, d.finish_reason) == (2040, 8, "length")


def test_second_turn_reuses_the_prompt_cache(engine: LMEngine):
    first = [{"role": "system", "content": "You are a tiny test model."},
             {"role": "user", "content": "Tell me about the river and the old mill."}]
    t1 = run(engine, Generate(id="t1", messages=first, max_tokens=12, temperature=0.0))["t1"]
    reply = text(t1)
    second = first + [{"role": "assistant", "content": reply},
                      {"role": "user", "content": "And the sea?"}]
    d = done(run(engine, Generate(id="t2", messages=second, max_tokens=4,
                                  temperature=0.0))["t2"])
    assert d.cached_tokens >= done(t1).prompt_tokens, (d, done(t1))
    assert d.cached_tokens < d.prompt_tokens


def test_every_sampling_option_in_one_batch(engine: LMEngine):
    fancy = Generate(id="f", prompt="Lists: apples, oranges", max_tokens=12, temperature=0.7,
                     top_p=0.9, top_k=5, min_p=0.05, repetition_penalty=1.2,
                     presence_penalty=0.5, frequency_penalty=0.3, logit_bias={5: -5.0})
    plain = Generate(id="p", prompt="Numbers:", max_tokens=12, temperature=0.0)
    out = run(engine, fancy, plain)
    assert done(out["f"]).completion_tokens == 12 and done(out["p"]).completion_tokens == 12
    (err,) = run(engine, Generate(id="i", prompt="x", images=[b"png"]))["i"]
    assert isinstance(err, Error) and err.status == 400


def run_joined(engine: LMEngine, first: Generate, later: Generate, after: int) -> dict[str, list]:
    """``first`` alone; ``later`` is submitted once ``first`` has made ``after`` steps."""
    out: dict[str, list] = {first.id: [], later.id: []}

    def emit(m) -> None:
        out[m.id].append(m)

    engine.submit(first, emit)
    assert engine.solo is not None  # an idle engine decodes a lone request outside the batch
    for _ in range(after):
        engine.step(emit)
    assert engine.solo is not None, "first ended before the second arrived"
    engine.submit(later, emit)
    assert engine.solo is None
    while engine.has_work():
        engine.step(emit)
    assert not engine.running and not engine.by_id
    return out


@pytest.mark.parametrize("after", [1, 2, 7])
def test_a_lone_request_joins_the_batch_exactly(engine: LMEngine, after: int):
    a = Generate(id="a", prompt="Once upon a time", max_tokens=24, temperature=0.0)
    b = greedy("b", max_tokens=16)
    alone = run(engine, a)["a"]
    out = run_joined(engine, a, b, after)
    assert text(out["a"]) == text(alone) and text(out["b"]) == text(run(engine, b)["b"])
    assert done(out["a"]).completion_tokens == 24 == sum(
        m.tokens for m in out["a"] if isinstance(m, Chunk))


def test_a_seeded_request_reproduces_across_the_handover(engine: LMEngine):
    s = Generate(id="s", prompt="Hello world", max_tokens=24, temperature=1.0, top_p=0.95,
                 seed=11)
    alone = text(run(engine, s)["s"])
    noise = Generate(id="n", messages=CHAT, max_tokens=30, temperature=1.0)
    assert text(run_joined(engine, s, noise, 5)["s"]) == alone


def test_a_long_prompt_prefills_in_slices_and_joins_mid_prefill(engine: LMEngine):
    ids = [3 + (i * 7) % 500 for i in range(1300)]  # > 2 slices of prefill_step_size (512)
    a = Generate(id="a", prompt_ids=ids, max_tokens=10, temperature=0.0)
    b = greedy("b", max_tokens=8)
    engine.prompt_cache = type(engine.prompt_cache)(max_size=10)  # no help from earlier tests
    alone = run(engine, a)["a"]
    engine.prompt_cache = type(engine.prompt_cache)(max_size=10)
    out = run_joined(engine, a, b, 1)  # one slice fed, then b arrives
    assert text(out["a"]) == text(alone) and done(out["a"]).completion_tokens == 10
    assert text(out["b"]) == text(run(engine, b)["b"])


def test_penalties_see_the_cached_prefix_alone_as_in_the_batch(engine: LMEngine):
    tok = engine.tokenizer
    prefix = tok.encode("Hello there") + tok.encode("hohoho")  # greedy goes on with "ho"
    run(engine, Generate(id="t", prompt_ids=prefix, max_tokens=2, temperature=0.0))
    follow = Generate(id="f", prompt_ids=prefix + [42], max_tokens=6, temperature=0.0,
                      frequency_penalty=50.0)  # bans what the context holds, "ho" included
    alone = run(engine, follow)["f"]
    batched = run(engine, follow, greedy("x", max_tokens=3))["f"]
    assert done(alone).cached_tokens == done(batched).cached_tokens == len(prefix)
    assert text(alone) == text(batched) and "ho" not in text(alone)


def test_cancelling_the_lone_request_leaves_the_engine_clean(engine: LMEngine):
    out = run(engine, greedy("x", max_tokens=200), cancel_after={"x": 3})
    assert sum(isinstance(m, Chunk) for m in out["x"]) == 3 and engine.solo is None
    assert done(run(engine, greedy(max_tokens=5))["g"]).completion_tokens == 5


def test_an_untrimmable_cache_is_handed_over_for_a_fresh_prefill(engine: LMEngine):
    from mlx_lm.generate import make_stop_sequences
    from mlx_lm.models.cache import RotatingKVCache
    from mlx_lm.sample_utils import make_sampler

    from mlx_supervisor.worker.engines.lm_solo import Solo

    ids = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog")
    cache = [RotatingKVCache(max_size=4) for _ in engine.model.layers]  # wraps at once
    solo = Solo(engine.model, engine.stream, -1, ids, cache, [], 8, make_sampler(0.0), [],
                make_stop_sequences(engine.tokenizer, []), 512)
    got = [r.token for _ in range(3) for r in solo.next()]
    rest, handed, cached, left = solo.handover()
    assert (rest, handed, cached, left) == (ids + got, None, [], 5)


def run_script(engine: LMEngine, script: dict[int, list], until_idle: bool = True,
               ) -> tuple[dict[str, list], list[bool]]:
    """Step the engine; before step n, do ``script[n]``: Generate -> submit, str -> cancel.
    Returns every request's messages and, per step, whether a request was decoding alone."""
    out: dict[str, list] = {}
    alone: list[bool] = []

    def emit(m) -> None:
        out.setdefault(m.id, []).append(m)

    n = 0
    while n <= max(script) or engine.has_work():
        for action in script.get(n, []):
            if isinstance(action, Generate):
                out.setdefault(action.id, [])
                engine.submit(action, emit)
            else:
                engine.cancel(action)
        if engine.has_work():
            engine.step(emit)
        alone.append(engine.solo is not None)
        n += 1
        assert n < 5000
    assert not engine.running and not engine.by_id and engine.solo is None
    return out, alone


def test_the_last_request_in_the_batch_goes_on_alone_exactly(engine: LMEngine):
    a = Generate(id="a", prompt="Once upon a time", max_tokens=40, temperature=0.0)
    b = greedy("b", max_tokens=6)
    alone = text(run(engine, a)["a"])
    out, solo_steps = run_script(engine, {0: [a], 3: [b]})
    assert text(out["a"]) == alone and done(out["a"]).completion_tokens == 40
    assert text(out["b"]) == text(run(engine, b)["b"])
    # alone, then batched while b runs, then alone again once b is done
    assert solo_steps[:3] == [True] * 3 and not any(solo_steps[3:8]) and solo_steps[-2]


def test_a_seeded_request_reproduces_leaving_the_batch(engine: LMEngine):
    s = Generate(id="s", prompt="Hello world", max_tokens=30, temperature=1.0, top_p=0.95,
                 seed=5)
    alone = text(run(engine, s)["s"])
    noise = Generate(id="n", messages=CHAT, max_tokens=5, temperature=1.0)
    out, solo_steps = run_script(engine, {0: [s, noise]})  # batched from the start
    assert text(out["s"]) == alone and solo_steps[-2]


def test_cancelling_the_other_request_lets_the_last_go_on_alone(engine: LMEngine):
    a = Generate(id="a", prompt="Once upon a time", max_tokens=30, temperature=0.0)
    alone = text(run(engine, a)["a"])
    # b is cancelled at once (a handed over but not yet stepped in the batch), after one batch
    # step (a's handed-over token fed, nothing generated there yet), and mid-run
    for script in ({0: [a], 3: [greedy("b", max_tokens=50), "b"]},
                   {0: [a], 3: [greedy("b", max_tokens=50)], 4: ["b"]},
                   {0: [a], 3: [greedy("b", max_tokens=50)], 8: ["b"]}):
        out, solo_steps = run_script(engine, script)
        assert text(out["a"]) == alone, script
        assert solo_steps[-2] and not any(isinstance(m, Done) for m in out["b"])
