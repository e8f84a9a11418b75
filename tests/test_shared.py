"""Protocol round-trips, config errors that name the key, size parsing."""

from pathlib import Path

import msgspec
import pytest

from mlx_supervisor.shared import protocol as p
from mlx_supervisor.shared.config import ConfigError, load, loads, semantic_problems
from mlx_supervisor.shared.sizes import estimate_footprint, format_size, parse_size, weight_bytes


@pytest.mark.parametrize("msg", [
    p.Generate(id="r1", messages=[{"role": "user", "content": "hi"}], stop=["\n"], seed=3,
               logit_bias={5: -1.0}, images=[b"\x89PNG"]),
    p.Embed(id="r2", texts=["a", "b"], dimensions=8),
    p.Load(model_id="m", path="/x", kind="lm"),
    p.Cancel(id="r1"), p.Shutdown(reason="bye"), p.Ping(),
])
def test_to_worker_round_trip(msg: p.Base) -> None:
    assert p.decode_to_worker(p.encode(msg)) == msg


@pytest.mark.parametrize("msg", [
    p.Hello(pid=1), p.Ready(pid=1, kind="lm", load_seconds=0.5, memory=p.Memory(1, 2, 3, 4)),
    p.LoadFailed(reason="no such dir"), p.Started(id="r", prompt_tokens=3),
    p.Chunk(id="r", text="hé", logprobs=[p.TokenLogprob("a", -0.5, [("a", -0.5), ("b", -2.0)])]),
    p.Done(id="r", finish_reason="stop", prompt_tokens=3, completion_tokens=4),
    p.Embeddings(id="r", vectors=[b"\0\0\0\0"], dims=1, prompt_tokens=1),
    p.Error(id="r", message="bad", status=400, code="x", param="y"),
    p.Heartbeat(memory=p.Memory(rss=5), inflight=1),
])
def test_from_worker_round_trip(msg: p.Base) -> None:
    assert p.decode_from_worker(p.encode(msg)) == msg


def test_garbage_frames_raise_decode_errors() -> None:
    for junk in (b"", b"\xff\xfe", msgspec.msgpack.encode({"t": "nope"}), msgspec.msgpack.encode([1, 2])):
        with pytest.raises((msgspec.DecodeError, msgspec.ValidationError)):
            p.decode_from_worker(junk)


def test_memory_footprint_is_the_larger_measure() -> None:
    assert p.Memory(active=10, cache=5, rss=12).footprint == 15
    assert p.Memory(active=1, cache=1, rss=12).footprint == 12


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError) as e:
        loads('[models.llama]\npath = "/x"\nttl = "soon"\n')
    assert e.value.problems[0][0] == "$.models.llama.ttl"
    with pytest.raises(ConfigError) as e:
        loads('memory_budgte = "50%"\n')
    assert "memory_budgte" in str(e.value)
    with pytest.raises(ConfigError) as e:
        loads("port = [1\n")
    assert "invalid TOML" in str(e.value)
    with pytest.raises(ConfigError) as e:
        loads('[models.llama]\npath = "/x"\ntool_choice = "always"\n')
    assert e.value.problems[0][0] == "$.models.llama.tool_choice"
    assert loads('[models.llama]\npath = "/x"\ntool_choice = "required"\n'
                 ).models["llama"].tool_choice == "required"
    assert loads('[models.llama]\npath = "/x"\n').models["llama"].tool_choice == "auto"


def test_semantic_problems(tmp_path: Path) -> None:
    cfg = loads(f'memory_budget = "lots"\n[models.a]\npath = "{tmp_path}"\naliases = ["x"]\n'
                f'[models.b]\npath = "{tmp_path}/missing"\naliases = ["x"]\n[models.c]\n')
    keys = {k for k, _ in semantic_problems(cfg, 16 * 2**30)}
    assert {"$.memory_budget", "$.models.b.path", "$.models.b.aliases", "$.models.c"} <= keys


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    f = tmp_path / "c.toml"
    f.write_text('[models.a]\npath = "m"\n')
    assert load(f).models["a"].path == str(tmp_path / "m")


@pytest.mark.parametrize("text,total,want", [
    ("48GB", None, 48 * 10**9), ("512MiB", None, 512 * 2**20), ("75%", 1000, 750),
    ("1.5 GiB", None, int(1.5 * 2**30)), (1024, None, 1024), ("100", None, 100),
])
def test_parse_size(text: str, total: int | None, want: int) -> None:
    assert parse_size(text, total) == want


@pytest.mark.parametrize("bad", ["", "12XB", "-1GB", "150%", "abc", "0%"])
def test_parse_size_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_size(bad, 100)


def test_footprint_from_weight_files(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 1000)
    (tmp_path / "tokenizer.json").write_bytes(b"\0" * 500)
    assert weight_bytes(tmp_path) == 1000
    assert estimate_footprint(tmp_path, headroom=0.5) > 1500
    assert format_size(1536) == "1.5 KiB"
