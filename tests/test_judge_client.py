"""The judge client against small local fake servers: timeouts, bad answers, retries, policies, cache, CLI."""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import math
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

from policies.errors import InputError
from policies.video_io import write_video
from rewards import CompositeReward
from rewards.judge import CausalConsistencyJudge, JudgeUnavailableError, ServeConfig, build_command
from rewards.judge import cli as judge_cli
from rewards.judge.scoring import first_token_candidates, match_label, score_choice, score_rating

pytestmark = pytest.mark.timeout(120)


def completion(top: list[tuple[str, float]] | None) -> dict:
    """An OpenAI chat completion whose sampled first token is ``top[0]``, with ``top`` as top_logprobs."""
    content, logprobs = (top[0][0] if top else "yes"), None
    if top is not None:
        entries = [{"token": t, "logprob": lp} for t, lp in top]
        first = {"token": content, "logprob": top[0][1] if top else 0.0, "top_logprobs": entries}
        logprobs = {"content": [first]}
    message = {"role": "assistant", "content": content}
    return {"choices": [{"index": 0, "message": message, "logprobs": logprobs}]}


class FakeServer:
    """A threaded HTTP server on 127.0.0.1 answering like vLLM: ``behave(body) -> (status, body, delay)``."""

    def __init__(self, behave: Callable[[dict], tuple[int, object, float]], model: str = "fake-judge"):
        self.behave, self.model, self.bodies = behave, model, []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, payload: object) -> None:
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/health":
                    self._send(200, "")
                elif self.path == "/v1/models":
                    self._send(200, {"data": [{"id": fake.model}]})
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.bodies.append(body)
                status, payload, delay = fake.behave(body)
                time.sleep(delay)
                try:
                    self._send(status, payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FakeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


YES_NO = [("yes", math.log(0.6)), ("no", math.log(0.3)), ("y", math.log(0.1))]


def ok(body: dict) -> tuple[int, object, float]:
    return 200, completion(YES_NO), 0.0


def text_batch(n: int, offset: int = 0) -> dict[str, list[str]]:
    return {
        "context_caption": [f"ball {i} rolls" for i in range(offset, offset + n)],
        "prediction_caption": [f"ball {i} stops" for i in range(offset, offset + n)],
    }


def make_judge(*urls: str, **overrides) -> CausalConsistencyJudge:
    settings = dict(urls=list(urls), mode="text", backoff_s=0.01, timeout_s=5.0, health_timeout_s=2.0)
    return CausalConsistencyJudge(**{**settings, **overrides})


# ------------------------------------------------------------------------------------------- scoring
def test_label_matching_handles_tokenisation_variants():
    labels = ["yes", "no"]
    tokens = ["yes", " yes", "Yes", "ĠYes", "▁yes", "y", "YE", "No", " n"]
    assert [match_label(t, labels) for t in tokens] == ["yes"] * 7 + ["no"] * 2
    assert [match_label(t, labels) for t in ["", " ", "yess", "maybe", "<|im_end|>"]] == [None] * 5
    assert match_label("1", ["1", "10"]) == "1"  # exact match wins over the prefix ambiguity


def test_choice_score_sums_variants_and_renormalises():
    candidates = [
        (" yes", math.log(0.3)),
        ("Yes", math.log(0.1)),
        ("no", math.log(0.2)),
        ("maybe", math.log(0.4)),
    ]
    answer = score_choice(candidates, "yes", "no")
    assert answer.score == pytest.approx(0.4 / 0.6) and answer.reason is None
    only_yes = score_choice([("yes", -0.1), ("", -9999.0)], "yes", "no")
    assert only_yes.score == pytest.approx(1.0)
    neither = score_choice([("maybe", -0.1)], "yes", "no")
    assert neither.score is None and "neither 'yes' nor 'no'" in neither.reason


def test_rating_score_is_the_expectation_in_unit_range():
    labels = [str(r) for r in range(1, 6)]
    answer = score_rating([("2", math.log(0.5)), ("4", math.log(0.25)), (" 5", math.log(0.25))], labels)
    expected_rating = 2 * 0.5 + 4 * 0.25 + 5 * 0.25
    assert answer.score == pytest.approx((expected_rating - 1) / 4)
    assert score_rating([("x", -1.0)], labels).score is None


@pytest.mark.parametrize(
    ("response", "reason"),
    [
        ({}, "no choices"),
        (completion(None), "no logprobs"),
        (completion([]), "no top_logprobs"),
        (completion([("yes", float("nan"))]), "invalid logprob"),
        (completion([("yes", "abc")]), "invalid logprob"),
        (completion([("yes", 3.0)]), "invalid logprob"),
        ({"choices": [{"logprobs": {"content": [{"top_logprobs": [{"logprob": -1.0}]}]}}]}, "malformed"),
    ],
)
def test_garbage_logprobs_give_a_reason_not_a_crash(response, reason):
    candidates, why = first_token_candidates(response)
    assert candidates is None and reason in why


# P(yes) / (P(yes) + P(no)) of the answers to captions "ball 0 stops" ... "ball 4 stops"; the 0.5
# comes from equal log-probs, so it is exactly 0.5: the threshold's edge
P_YES = [0.2, 0.5, 0.7, 0.49, None]


def known_probabilities(body: dict) -> tuple[int, object, float]:
    """Answer sample i (found by its caption) with P(yes) = P_YES[i]; None: an answer with no yes/no."""
    i = next(i for i in range(len(P_YES)) if f"ball {i} stops" in json.dumps(body))
    p = P_YES[i]
    if p is None:
        return 200, completion([("maybe", -0.1)]), 0.0
    return 200, completion([("yes", math.log(p)), ("no", math.log(1 - p) if p != 0.5 else math.log(p))]), 0.0


@pytest.mark.parametrize(
    ("threshold", "expected"), [(0.5, [0.0, 1.0, 1.0, 0.0]), (0.7, [0.0, 0.0, 1.0, 0.0])]
)
def test_binary_scoring_is_the_verdict_at_a_threshold(threshold, expected):
    """'binary' (the NSP paper's reward): 1.0 when P(yes) >= binary_threshold else 0.0; P(yes) stays in
    the p_yes column, and an answer with neither label is still None (not a 0)."""
    with FakeServer(known_probabilities) as server:
        binary = make_judge(server.url, scoring="binary", binary_threshold=threshold)(
            [None] * 5, None, None, **text_batch(5)
        )
        choice = make_judge(server.url)([None] * 5, None, None, **text_batch(5))
    assert binary.scores == [*expected, None]
    assert choice.scores[:4] == pytest.approx(P_YES[:4]) and choice.scores[1] == 0.5
    assert binary.metadata["p_yes"] == choice.scores
    assert "neither 'yes' nor 'no'" in binary.metadata["reason"][4]


def test_binary_scoring_from_recipe_kwargs_and_bad_settings():
    with FakeServer(known_probabilities) as server:
        kwargs = {"urls": [server.url], "mode": "text", "scoring": "binary", "binary_threshold": 0.45}
        composite = CompositeReward.from_specs([{"name": "causal_consistency", "kwargs": kwargs}])
        out = composite([None] * 4, None, None, **text_batch(4))
    assert out.columns["causal_consistency"] == [0.0, 1.0, 1.0, 1.0]
    with pytest.raises(InputError, match="scoring='binery' is not one of choice, binary, rating"):
        make_judge("http://127.0.0.1:1", scoring="binery")
    for threshold in (0.0, 1.5):
        with pytest.raises(InputError, match=f"binary_threshold={threshold} must be in \\(0, 1\\]"):
            make_judge("http://127.0.0.1:1", scoring="binary", binary_threshold=threshold)


# ------------------------------------------------------------------------------------ client faults
@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (completion(None), "no logprobs"),
        (completion([("yes", "abc"), ("no", -1.0)]), "invalid logprob"),
        (completion([("maybe", -0.1), ("perhaps", -2.0)]), "neither 'yes' nor 'no'"),
        ("<html>oops</html>", "not JSON"),
    ],
)
def test_bad_answers_score_none_with_a_reason(payload, reason):
    with FakeServer(lambda body: (200, payload, 0.0)) as server:
        judge = make_judge(server.url, failure_policy="raise")
        out = judge([None] * 3, None, None, **text_batch(3))
    assert out.scores == [None] * 3
    assert all(reason in r for r in out.metadata["reason"])
    assert judge.last_stats["unscorable"] == 3 and judge.last_stats["failed"] == 0


def test_slow_server_times_out_then_policy_applies():
    with FakeServer(lambda body: (200, completion(YES_NO), 3.0)) as server:
        judge = make_judge(server.url, timeout_s=0.3, max_retries=1, abort_threshold=1.0)
        start = time.monotonic()
        out = judge([None] * 2, None, None, **text_batch(2))
        elapsed = time.monotonic() - start
        assert out.scores == [None, None] and elapsed < 2.5
        assert all("Timeout" in r for r in out.metadata["reason"]) and out.metadata["attempts"] == [2, 2]
        with pytest.raises(JudgeUnavailableError, match="failure_policy='raise'.*Timeout"):
            make_judge(server.url, timeout_s=0.3, max_retries=0, failure_policy="raise")(
                [None], None, None, **text_batch(1, offset=5)
            )


def test_retryable_errors_are_retried_and_client_errors_are_not():
    calls: dict[str, int] = {}

    def flaky(body):
        key = body["messages"][-1]["content"]
        calls[key] = calls.get(key, 0) + 1
        if "ball 0 " in key:
            return 400, {"error": "max_logprobs exceeded"}, 0.0
        return (503, {"error": "busy"}, 0.0) if calls[key] == 1 else (200, completion(YES_NO), 0.0)

    with FakeServer(flaky) as server:
        judge = make_judge(server.url, max_retries=2, abort_threshold=1.0)
        out = judge([None] * 3, None, None, **text_batch(3))
    assert (
        out.scores[0] is None
        and "HTTP 400" in out.metadata["reason"][0]
        and "max_logprobs" in out.metadata["reason"][0]
    )
    assert out.metadata["attempts"] == [1, 2, 2]
    assert out.scores[1] == pytest.approx(0.7 / 1.0)  # yes 0.6 + y 0.1 over yes + y + no
    assert judge.last_stats == {**judge.last_stats, "failed": 1, "retries": 2}


def test_abort_threshold_raises_and_stops_early():
    def mostly_down(body):
        return (
            (200, completion(YES_NO), 0.0)
            if "ball 0 " in body["messages"][-1]["content"]
            else (503, "down", 0.0)
        )

    with FakeServer(mostly_down) as server:
        judge = make_judge(server.url, max_retries=1, abort_threshold=0.25, max_concurrency=2)
        with pytest.raises(
            JudgeUnavailableError, match=r"judge failed on 6 of 20 samples \(abort_threshold=0.25\)"
        ):
            judge([None] * 20, None, None, **text_batch(20))
        assert len(server.bodies) < 25  # 39 if every sample had been tried: the rest were cancelled


def test_round_robin_over_servers_and_cache_by_content():
    with FakeServer(ok) as a, FakeServer(ok) as b:
        judge = make_judge(a.url, b.url, max_concurrency=1)
        out = judge([None] * 6, None, None, **text_batch(6))
        assert len(a.bodies) == 3 and len(b.bodies) == 3
        assert set(out.metadata["server"]) == {a.url, b.url}
        again = judge([None] * 6, None, None, **text_batch(6))
        assert (
            again.scores == out.scores
            and all(again.metadata["cached"])
            and len(a.bodies) + len(b.bodies) == 6
        )
        changed = text_batch(6)
        changed["prediction_caption"][2] += " slowly"
        third = judge([None] * 6, None, None, **changed)
        assert third.metadata["cached"] == [True, True, False, True, True, True]


def test_a_server_dying_mid_run_fails_over_and_is_skipped():
    with FakeServer(ok) as a, FakeServer(ok) as b:
        judge = make_judge(a.url, b.url, max_concurrency=1, max_retries=1)
        judge.check_health()
        a.__exit__()  # gone after the health check: connection refused from now on
        out = judge([None] * 6, None, None, **text_batch(6))
    assert out.scores == [pytest.approx(0.7)] * 6 and set(out.metadata["server"]) == {b.url}
    assert sum(out.metadata["attempts"]) <= 7  # at most one wasted attempt, then a is in cooldown


def test_health_check_names_the_model_problem():
    with FakeServer(ok, model="served-name") as server:
        with pytest.raises(InputError, match="'other' is not served.*served-name"):
            make_judge(server.url, model="other").check_health()
        judge = make_judge(server.url)
        judge([None], None, None, **text_batch(1))
        assert judge.model == "served-name" and server.bodies[0]["model"] == "served-name"


def test_sync_call_works_inside_a_running_event_loop():
    with FakeServer(ok) as server:
        judge = make_judge(server.url)

        async def inside_loop():
            return judge([None] * 2, None, None, **text_batch(2))

        assert asyncio.run(inside_loop()).scores == [pytest.approx(0.7)] * 2


# --------------------------------------------------------------------------------- request payloads
def frames(seed: int, count: int = 6, size: int = 24) -> torch.Tensor:
    return torch.rand(count, size, size, 3, generator=torch.Generator().manual_seed(seed))


def test_images_request_carries_sampled_frames_losslessly():
    with FakeServer(ok) as server:
        judge = make_judge(server.url, mode="images", num_frames=3, aspects=("physics",))
        context, prediction = frames(0), frames(1)
        out = judge([prediction], ["the ball falls"], [context])
    assert out.scores == [pytest.approx(0.7)]
    body = server.bodies[0]
    assert body["structured_outputs"] == {"choice": ["yes", "no"]} and body["max_completion_tokens"] == 1
    assert body["logprobs"] is True and body["top_logprobs"] == 20 and "guided_choice" not in body
    parts = body["messages"][-1]["content"]
    urls = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
    assert len(urls) == 6 and "physically plausible" in parts[-1]["text"]
    decoded = [np.asarray(Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1])))) for u in urls]
    index = [0, 2, 5]  # evenly spaced, first and last included
    expected = [(f * 255).round().to(torch.uint8).numpy() for f in [*context[index], *prediction[index]]]
    assert all(np.array_equal(d, e) for d, e in zip(decoded, expected))


def test_video_request_is_a_jpeg_frame_list():
    with FakeServer(ok) as server:
        make_judge(server.url, mode="video", num_frames=4)([frames(1)], None, [frames(0)])
    videos = [
        p["video_url"]["url"] for p in server.bodies[0]["messages"][-1]["content"] if p["type"] == "video_url"
    ]
    assert len(videos) == 2 and all(v.startswith("data:video/jpeg;base64,") for v in videos)
    jpegs = videos[0].split(",", 1)[1].split(",")
    assert len(jpegs) == 4 and Image.open(io.BytesIO(base64.b64decode(jpegs[0]))).size == (24, 24)


def test_bad_inputs_fail_before_any_request():
    with FakeServer(ok) as server:
        judge = make_judge(server.url, mode="images")
        with pytest.raises(InputError, match=r"videos\[1\] must be a tensor \[F, H, W, 3\]"):
            judge([frames(0), torch.zeros(4, 8, 8)], None, [frames(1), frames(2)])
        with pytest.raises(InputError, match="needs videos and contexts of equal length"):
            judge([frames(0)], None, None)
        with pytest.raises(InputError, match="'prediction_caption' metadata column"):
            make_judge(server.url)([None], None, None, context_caption=["a ball"])
        assert server.bodies == []
    with pytest.raises(InputError, match="mode='film' is not one of"):
        make_judge("http://127.0.0.1:1", mode="film")
    with pytest.raises(InputError, match="unknown judge aspect"):
        make_judge("http://127.0.0.1:1", aspects=("style",))


# ------------------------------------------------------------------------------------------ commands
def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    judge_cli.register(parser.add_subparsers())
    return parser.parse_args(argv)


def test_score_command_decodes_videos_and_writes_scores(tmp_path, capsys):
    for name, seed in (("ctx.mp4", 0), ("next.mp4", 1)):
        write_video(tmp_path / name, frames(seed, count=5, size=32), fps=8)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "a", "context": "ctx.mp4", "next": "next.mp4"}) + "\n")
    with FakeServer(ok) as server:
        args = parse(["judge", "score", str(manifest), "--url", server.url, "--num-frames", "2"])
        assert args.func(args) == 0
    images = [p for p in server.bodies[0]["messages"][-1]["content"] if p["type"] == "image_url"]
    assert len(images) == 4
    row = json.loads((tmp_path / "m.scores.jsonl").read_text())
    assert row["id"] == "a" and row["score"] == pytest.approx(0.7) and row["attempts"] == 1
    assert "scored 1/1 rows" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "ctx.mp4"}\n')
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"context": "ctx.mp4", "next": "gone.mp4"}) + "\n")
    with FakeServer(ok) as server:
        missing_args = parse(["judge", "score", str(missing), "--url", server.url])
        with pytest.raises(InputError, match="video file not found: .*gone.mp4"):
            missing_args.func(missing_args)
    bad_args = parse(["judge", "score", str(bad), "--url", "http://127.0.0.1:1"])
    with pytest.raises(
        InputError, match=r"bad.jsonl:1: mode 'images' needs string fields \['context', 'next'\]"
    ):
        bad_args.func(bad_args)


def test_serve_dry_run_builds_the_vllm_command(tmp_path, capsys, monkeypatch):
    vlm, llm = tmp_path / "vlm", tmp_path / "llm"
    for path, config in ((vlm, {"vision_config": {}}), (llm, {"model_type": "qwen2"})):
        path.mkdir()
        (path / "config.json").write_text(json.dumps(config))
    monkeypatch.setenv("NEXTSCENE_JUDGE_API_KEY", "secret-key")
    args = parse(
        ["judge", "serve", "--model", str(vlm), "--tensor-parallel-size", "4", "--max-model-len", "8192",
         "--port", "8011", "--python", "/venv/bin/python", "--vllm-args=--enforce-eager", "--dry-run"]
    )  # fmt: skip
    assert args.func(args) == 0
    command = capsys.readouterr().out.split()
    assert command[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    flags = dict(zip(command[3::2], command[4::2]))
    assert (
        flags["--host"] == "127.0.0.1"
        and flags["--port"] == "8011"
        and flags["--tensor-parallel-size"] == "4"
    )
    assert flags["--max-model-len"] == "8192" and flags["--max-logprobs"] == "20"
    assert json.loads(flags["--limit-mm-per-prompt"].strip("'")) == {"image": 16, "video": 2}
    assert command[-1] == "--enforce-eager" and "secret-key" not in " ".join(command)
    text_only = build_command(ServeConfig(model=str(llm)))
    assert "--limit-mm-per-prompt" not in text_only
    monkeypatch.delenv("NEXTSCENE_JUDGE_API_KEY")
    with pytest.raises(InputError, match="set NEXTSCENE_JUDGE_API_KEY"):
        ServeConfig(model=str(llm)).api_key()
    with pytest.raises(InputError, match="refusing to serve on 0.0.0.0 without an API key"):
        ServeConfig(model=str(llm), host="0.0.0.0", no_api_key=True).api_key()


def test_judge_in_a_composite_from_recipe_specs():
    with FakeServer(ok) as server:
        specs = [
            {"name": "causal_consistency", "weight": 2.0, "kwargs": {"urls": [server.url], "mode": "text"}},
            {"name": "temporal_smoothness", "weight": 0.5},
        ]
        composite = CompositeReward.from_specs(specs)
        still = [torch.full((4, 8, 8, 3), 0.5)] * 2
        out = composite(still, ["", ""], None, **text_batch(2))
    assert out.columns == {"causal_consistency": [pytest.approx(0.7)] * 2, "temporal_smoothness": [1.0, 1.0]}
    assert out.weighted_sum() == [pytest.approx(2 * 0.7 + 0.5)] * 2
    assert out.metadata["causal_consistency/attempts"] == [1, 1] and "causal_consistency" in out.timings
