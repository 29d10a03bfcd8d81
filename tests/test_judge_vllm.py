"""The judge against a real vLLM server (CPU build, own venv) serving tiny random judges: a Qwen2 text
model and a Qwen2.5-VL (image and video requests).

One server per model for the module, both started at once when the first test needs either (eager,
~50 s each to start on 2 cores; together about as long as one). The last tests kill the text one, so
their order matters.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import socket
import time

import httpx
import pytest
import torch

from policies.errors import InputError
from rewards.judge import (
    CausalConsistencyJudge,
    InProcessJudge,
    JudgeUnavailableError,
    ServeConfig,
    start_server,
)
from rewards.judge import cli as judge_cli
from rewards.judge.prompts import build_requests

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

KEY_ENV = "NEXTSCENE_TEST_JUDGE_KEY"
MODEL = "tiny-judge"
VL_MODEL = "tiny-vl-judge"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(model, name, vllm_python, log_path, **overrides):
    """Start vLLM on ``model`` (float32, key in $KEY_ENV) without waiting for it."""
    settings = dict(
        model=str(model), port=free_port(), served_model_name=name, max_model_len=1024, dtype="float32",
        max_logprobs=20, api_key_env=KEY_ENV, python=vllm_python,
        extra_args=["--enforce-eager"],  # no torch.compile warm-up: starts in ~30 s instead of ~50 s
    )  # fmt: skip
    config = ServeConfig(**{**settings, **overrides})
    with log_path.open("wb") as log:  # the child keeps its own handle
        return start_server(config, log=log, env={"VLLM_CPU_KVCACHE_SPACE": "1"})


@pytest.fixture(scope="module")
def launched(tiny_text_judge, tiny_vl_judge, vllm_python, tmp_path_factory):
    """Both servers (text, VL) and their logs, started together: their start-ups overlap."""
    os.environ[KEY_ENV] = "test-key-123"
    logs = {key: tmp_path_factory.mktemp("vllm") / "server.log" for key in ("text", "vl")}
    servers = {"text": launch(tiny_text_judge, MODEL, vllm_python, logs["text"])}
    try:
        servers["vl"] = launch(tiny_vl_judge, VL_MODEL, vllm_python, logs["vl"], max_model_len=2048)
        yield {key: (srv, logs[key]) for key, srv in servers.items()}
    finally:
        for srv in servers.values():
            srv.stop()
        os.environ.pop(KEY_ENV, None)


def healthy(launched, key: str):
    """The launched server ``key`` once it answers (its log's tail printed if it never does)."""
    srv, log_path = launched[key]
    try:
        waited = srv.wait_healthy(timeout_s=400)
    except RuntimeError:
        print(log_path.read_text()[-3000:])
        raise
    print(f"\nvLLM server {key} healthy after {waited:.1f} s")
    return srv


@pytest.fixture(scope="module")
def server(launched):
    return healthy(launched, "text")


def judge(server, **overrides) -> CausalConsistencyJudge:
    settings = dict(urls=[server.url], mode="text", api_key_env=KEY_ENV, max_concurrency=4, timeout_s=30)
    return CausalConsistencyJudge(**{**settings, **overrides})


def captions(n: int, offset: int = 0) -> dict[str, list[str]]:
    return {
        "context_caption": [f"a red ball rolls left {i} times" for i in range(offset, offset + n)],
        "prediction_caption": [f"the ball bounces off the wall {i % 3}" for i in range(offset, offset + n)],
    }


def direct(server, body: dict) -> dict:
    headers = {"Authorization": f"Bearer {os.environ[KEY_ENV]}"}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def allowed_mass(top: list[dict], answer: str) -> float:
    """Probability of first tokens the choice grammar lets start ``answer`` (independent of the scorer)."""
    return sum(math.exp(e["logprob"]) for e in top if e["token"] and answer.startswith(e["token"]))


def test_text_mode_scores_are_probabilities_from_the_servers_logprobs(server):
    j = judge(server)
    meta = captions(8)
    out = j([None] * 8, None, None, **meta)
    assert j.last_stats["failed"] == 0 and j.last_stats["scored"] == 8
    assert j.last_stats["max_in_flight"] > 1  # requests really were concurrent
    assert all(0.0 < s < 1.0 for s in out.scores)
    assert len({round(s, 6) for s in out.scores}) > 1  # depends on the input, not a constant
    assert all(lat is not None and lat > 0 for lat in out.metadata["latency_s"])
    requests = build_requests(j.config, None, None, None, meta, model=MODEL)
    diffs = []
    for score, body in zip(out.scores, requests):
        top = direct(server, body)["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        p_yes, p_no = allowed_mass(top, "yes"), allowed_mass(top, "no")
        diffs.append(abs(score - p_yes / (p_yes + p_no)))
    latency_ms = j.last_stats["mean_latency_s"] * 1e3
    print(f"\nmax |judge - direct| = {max(diffs):.2e}; mean latency {latency_ms:.1f} ms")
    assert max(diffs) < 1e-6


def test_structured_choice_is_honoured(server):
    body = build_requests(judge(server).config, None, None, None, captions(1), model=MODEL)[0]
    constrained = direct(server, body)["choices"][0]
    answer = constrained["message"]["content"]  # one token: a prefix of an allowed answer
    assert answer and ("yes".startswith(answer) or "no".startswith(answer))
    live = [e for e in constrained["logprobs"]["content"][0]["top_logprobs"] if e["logprob"] > -100]
    assert live and all(
        e["token"] and ("yes".startswith(e["token"]) or "no".startswith(e["token"])) for e in live
    )
    assert math.isclose(sum(math.exp(e["logprob"]) for e in live), 1.0, abs_tol=1e-4)
    # without the constraint the same prompt's top tokens are not all answer prefixes: it was not ignored
    body.pop("structured_outputs")
    free = direct(server, body)["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    assert any(not ("yes".startswith(e["token"]) or "no".startswith(e["token"])) for e in free)


def test_rating_mode_is_the_expected_rating(server):
    j = judge(server, scoring="rating", rating_scale=5)
    meta = captions(3, offset=20)
    out = j([None] * 3, None, None, **meta)
    for score, rating, body in zip(
        out.scores, out.metadata["rating"], build_requests(j.config, None, None, None, meta, model=MODEL)
    ):
        top = direct(server, body)["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        probs = {r: sum(math.exp(e["logprob"]) for e in top if e["token"] == str(r)) for r in range(1, 6)}
        expected = sum(r * p for r, p in probs.items()) / sum(probs.values())
        assert rating == pytest.approx(expected, abs=1e-6)
        assert score == pytest.approx((expected - 1) / 4, abs=1e-6)


def test_in_process_backend_gives_the_servers_score(server, tiny_text_judge):
    """Same checkpoint and captions: transformers in this process and vLLM agree on P(yes)/(P(yes)+P(no))."""
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    meta = captions(4, offset=80)
    served = judge(server)([None] * 4, None, None, **meta).scores
    model = Qwen2ForCausalLM.from_pretrained(tiny_text_judge, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_text_judge)  # as vLLM loads it
    local = InProcessJudge(model, tokenizer, mode="text")([None] * 4, None, None, **meta).scores
    print(f"\nmax |in-process - vLLM| = {max(abs(a - b) for a, b in zip(local, served)):.2e}")
    assert local == pytest.approx(served, abs=1e-5)


@pytest.fixture(scope="module")
def vl_server(launched):
    return healthy(launched, "vl")


def frames(seed: int, height: int, width: int) -> torch.Tensor:
    return torch.rand(5, height, width, 3, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", ["images", "video"])
def test_qwen_vl_server_scores_image_and_video_requests(vl_server, tiny_vl_judge, mode):
    """A tiny Qwen2.5-VL served by vLLM on CPU scores frames end to end, and the in-process backend
    agrees: same prompt token ids (chat template, vision placeholders per grid) and the same score to
    float32 round-off, frames resized or not (measured: 4e-6 images, 1e-6 video). Before the
    in-process backend passed M-RoPE token types, transformers fell back to 1-D positions and the
    scores differed by 2.5e-4.
    """
    served = judge(vl_server, mode=mode, num_frames=2, timeout_s=120)
    local = InProcessJudge(str(tiny_vl_judge), dtype="float32", mode=mode, num_frames=2)
    diffs = []
    for height, width in ((32, 32), (32, 40)):  # kept as is / resized by both backends
        videos = [frames(10 + i, height, width) for i in range(2)]
        contexts = [frames(20 + i, height, width) for i in range(2)]
        out = served(videos, None, contexts)
        assert served.last_stats["failed"] == 0 and served.last_stats["scored"] == 2
        assert all(0.0 < s < 1.0 for s in out.scores) and abs(out.scores[0] - out.scores[1]) > 1e-3
        expected = local(videos, None, contexts).scores
        diffs += [abs(a - b) for a, b in zip(out.scores, expected)]
        assert out.scores == pytest.approx(expected, abs=2e-5)

        body = build_requests(served.config, videos[:1], None, contexts[:1], {}, model=VL_MODEL)[0]
        answer = direct(vl_server, {**body, "return_token_ids": True})
        assert answer["prompt_token_ids"] == local.encode(body)["input_ids"][0].tolist()
        live = [
            e for e in answer["choices"][0]["logprobs"]["content"][0]["top_logprobs"] if e["logprob"] > -100
        ]
        assert len(live) >= 2 and all(
            "yes".startswith(e["token"]) or "no".startswith(e["token"]) for e in live
        )
        assert math.isclose(sum(math.exp(e["logprob"]) for e in live), 1.0, abs_tol=1e-4)
        p_yes, p_no = allowed_mass(live, "yes"), allowed_mass(live, "no")
        assert out.scores[0] == pytest.approx(p_yes / (p_yes + p_no), abs=1e-6)
    print(f"\n{mode}: max |vLLM - in-process| = {max(diffs):.2e}")


def test_wrong_or_missing_api_key_is_a_clear_error(server, monkeypatch):
    monkeypatch.setenv("NEXTSCENE_TEST_WRONG_KEY", "not-the-key")
    for env in ("NEXTSCENE_TEST_WRONG_KEY", "NEXTSCENE_TEST_UNSET_KEY"):
        with pytest.raises(InputError, match=f"rejected the API key.*{env}"):
            judge(server, api_key_env=env).check_health()


def test_failover_skips_a_dead_url(server):
    dead = f"http://127.0.0.1:{free_port()}"
    j = judge(server, urls=[dead, server.url], health_timeout_s=2.0, backoff_s=0.05)
    out = j([None] * 4, None, None, **captions(4, offset=40))
    assert all(s is not None for s in out.scores)
    assert set(out.metadata["server"]) == {server.url}


def test_score_command_writes_scores(server, tmp_path, capsys):
    manifest = tmp_path / "pairs.jsonl"
    rows = [{"id": f"p{i}", "context_caption": c, "next_caption": n} for i, (c, n) in
            enumerate(zip(*captions(3, offset=60).values()))]  # fmt: skip
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    parser = argparse.ArgumentParser()
    judge_cli.register(parser.add_subparsers())
    args = parser.parse_args(
        ["judge", "score", str(manifest), "--url", server.url, "--mode", "text", "--api-key-env", KEY_ENV]
    )
    assert args.func(args) == 0
    written = [json.loads(line) for line in (tmp_path / "pairs.scores.jsonl").read_text().splitlines()]
    assert [r["id"] for r in written] == ["p0", "p1", "p2"]
    assert all(0 < r["score"] < 1 and r["p_yes"] == r["score"] for r in written)
    assert "scored 3/3 rows" in capsys.readouterr().out


def test_server_killed_mid_batch_then_not_running(server):
    """Kill -9 the server mid-batch: retries, then None for the rest (policy none), abort above threshold."""
    tolerant = judge(
        server, max_concurrency=2, max_retries=2, backoff_s=0.05, abort_threshold=1.0, timeout_s=5
    )
    strict = judge(server, max_retries=1, backoff_s=0.05, abort_threshold=0.5, timeout_s=5)
    tolerant.check_health()
    strict.check_health()
    n = 48

    async def run_and_kill():
        task = asyncio.create_task(tolerant.acall([None] * n, None, None, **captions(n, offset=100)))
        deadline = time.monotonic() + 60
        while len(tolerant.cache) < 4 and not task.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.002)
        server.kill()
        return await task

    out = asyncio.run(run_and_kill())
    scored = [i for i, s in enumerate(out.scores) if s is not None]
    lost = [i for i, s in enumerate(out.scores) if s is None]
    assert len(scored) >= 4 and lost, (len(scored), len(lost))
    assert tolerant.last_stats["failed"] == len(lost) and tolerant.last_stats["retries"] >= 2 * len(lost)
    for i in lost:
        assert out.metadata["attempts"][i] == 3 and out.metadata["reason"][i]

    start = time.monotonic()
    with pytest.raises(
        JudgeUnavailableError, match=r"judge failed on \d+ of 8 samples \(abort_threshold=0.5\)"
    ):
        strict([None] * 8, None, None, **captions(8, offset=200))
    assert time.monotonic() - start < 10

    start = time.monotonic()
    with pytest.raises(
        JudgeUnavailableError, match=f"no judge server answered.*{server.url}.*nextscene judge serve"
    ):
        judge(server, health_timeout_s=3.0, backoff_s=0.1).check_health()
    assert time.monotonic() - start < 5
