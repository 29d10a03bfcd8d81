"""`CausalConsistencyJudge`: the causal-consistency reward, asked of a vLLM (OpenAI-compatible) server.

One chat completion per sample, ``max_completion_tokens=1`` with ``structured_outputs: {"choice": [...]}`` and
``logprobs``/``top_logprobs``; the score is computed from the first token's log-probabilities
(`rewards.judge.scoring`). Built for many training ranks hitting a shared server: bounded
concurrency, a timeout per request, retries with exponential backoff and jitter, a health check
before the first batch, several server URLs (round robin, failover to the next on error), a
content-hash cache, the API key from an environment variable, and an explicit failure policy.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import httpx

from policies.errors import InputError
from rewards.composite import run_sync
from rewards.judge.cache import ScoreCache, request_key
from rewards.judge.config import JudgeConfig
from rewards.judge.prompts import build_requests
from rewards.judge.scoring import ScoredAnswer, first_token_candidates
from rewards.registry import register
from rewards.types import RewardOutput, RewardUnavailableError

logger = logging.getLogger(__name__)

RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}


class JudgeUnavailableError(RewardUnavailableError):
    """No judge server could be reached, or too many samples of a batch failed."""


@dataclass
class _Sample:
    """One request of a batch and what became of it."""

    index: int
    request: dict[str, Any]
    key: str
    answer: ScoredAnswer | None = None
    failed: bool = False
    attempts: int = 0
    latency_s: float | None = None
    server: str | None = None
    cached: bool = False


@register("causal_consistency")
class CausalConsistencyJudge:
    """Reward: does the predicted next scene causally follow from the context? Scored by a vLLM judge.

    Call it like any reward, ``judge(videos, prompts, contexts, **metadata)`` (sync) or
    ``await judge.acall(...)`` (async). ``videos`` are the predicted next scenes and ``contexts`` the
    scenes before them, tensors ``[F, H, W, 3]`` in [0, 1]. In ``text`` mode the judge reads the
    metadata columns ``context_caption`` and ``prediction_caption`` (a caption of each predicted
    scene; a dataset's ground-truth ``next_caption`` is deliberately not used) and videos/contexts
    may be ``None``. Returns a `RewardOutput` whose metadata columns are ``p_<positive>`` (or
    ``rating``), ``latency_s``, ``attempts``, ``server``, ``cached`` and ``reason`` (why a score is
    ``None``); batch totals are in ``last_stats``.
    """

    def __init__(self, config: JudgeConfig | None = None, **overrides: Any) -> None:
        if config is not None and overrides:
            config = JudgeConfig(**{**asdict(config), **overrides})
        self.config = config or JudgeConfig(**overrides)
        self.cache = ScoreCache(self.config.cache_size)
        self.model: str | None = self.config.model
        self.last_stats: dict[str, Any] = {}
        self._live_urls: list[str] | None = None
        self._next_url = 0
        self._down_until: dict[str, float] = {}
        self._in_flight = self._max_in_flight = 0

    # ------------------------------------------------------------------------------------- health
    def _headers(self) -> dict[str, str]:
        key = os.environ.get(self.config.api_key_env)
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _backoff(self, attempt: int) -> float:
        delay = min(self.config.max_backoff_s, self.config.backoff_s * 2**attempt)
        return delay * random.uniform(0.5, 1.0)

    async def _probe(
        self, client: httpx.AsyncClient, url: str, deadline: float
    ) -> tuple[list[str] | None, str]:
        """Model ids served at ``url`` (``None`` if no answer before ``deadline``) and the last error."""
        error, attempt = "no attempt", 0
        while True:
            attempt += 1
            timeout = max(0.05, min(self.config.timeout_s, deadline - time.monotonic()))
            try:
                health = await client.get(f"{url}/health", timeout=timeout)
                models = None
                if health.status_code == 200:
                    models = await client.get(f"{url}/v1/models", headers=self._headers(), timeout=timeout)
            except httpx.HTTPError as err:
                error = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
            else:
                if models is None:
                    error = f"GET /health: HTTP {health.status_code}"
                elif models.status_code == 401:
                    raise InputError(
                        f"judge server {url} rejected the API key (HTTP 401); set "
                        f"{self.config.api_key_env} to the key the server was started with"
                    )
                elif models.status_code != 200:
                    error = f"GET /v1/models: HTTP {models.status_code}"
                else:
                    try:
                        return [m["id"] for m in models.json()["data"]], ""
                    except (ValueError, KeyError, TypeError) as err:
                        error = f"GET /v1/models: unreadable answer ({err!r})"
            delay = self._backoff(attempt - 1)
            if time.monotonic() + delay >= deadline:
                return None, f"{error} ({attempt} attempts)"
            await asyncio.sleep(delay)

    async def acheck_health(self) -> list[str]:
        """Check every URL (``/health``, then ``/v1/models``) within ``health_timeout_s``; keep the live ones.

        Raises `JudgeUnavailableError` if none answers, `InputError` on a wrong API key or model name.
        """
        cfg = self.config
        start = time.monotonic()
        deadline = start + cfg.health_timeout_s
        async with httpx.AsyncClient() as client:
            results = await asyncio.gather(*(self._probe(client, url, deadline) for url in cfg.urls))
        live = []
        for url, (models, _) in zip(cfg.urls, results):
            if models is None:
                continue
            if self.model is None:
                self.model = models[0] if models else None
            if self.model not in models:
                raise InputError(
                    f"judge model {self.model!r} is not served at {url} (it serves {models}); fix `model`"
                )
            live.append(url)
        if not live:
            errors = "; ".join(f"{url}: {error}" for url, (_, error) in zip(cfg.urls, results))
            raise JudgeUnavailableError(
                f"no judge server answered within {time.monotonic() - start:.1f} s ({errors}); "
                "start one with `nextscene judge serve --model PATH` or fix `urls`"
            )
        for url, (models, error) in zip(cfg.urls, results):  # with some live, name the ones left out
            if models is None:
                logger.warning("judge server %s is not answering (%s); leaving it out", url, error)
        self._live_urls = live
        return live

    def check_health(self) -> list[str]:
        """Sync `acheck_health`."""
        return run_sync(self.acheck_health())

    # ------------------------------------------------------------------------------------ scoring
    def _score_response(self, body: Any) -> ScoredAnswer:
        candidates, reason = first_token_candidates(body)
        if candidates is None:
            return ScoredAnswer(None, reason)
        return self.config.score_candidates(candidates)

    def _first_url(self) -> int:
        """Round robin over the live URLs, skipping those that failed in the last ``url_cooldown_s``."""
        urls = self._live_urls or self.config.urls
        now = time.monotonic()
        for _ in range(len(urls)):
            index = self._next_url % len(urls)
            self._next_url += 1
            if self._down_until.get(urls[index], 0.0) <= now:
                return index
        return self._next_url % len(urls)

    async def _send(self, client: httpx.AsyncClient, sample: _Sample, limit: asyncio.Semaphore) -> _Sample:
        """Send one request with retries (each retry goes to the next URL); fill in ``sample``."""
        cfg = self.config
        async with limit:
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
            urls = self._live_urls or cfg.urls
            first = self._first_url()
            try:
                for attempt in range(cfg.max_retries + 1):
                    if attempt:
                        await asyncio.sleep(self._backoff(attempt - 1))
                    sample.attempts += 1
                    sample.server = urls[(first + attempt) % len(urls)]  # a retry fails over to the next URL
                    started = time.perf_counter()
                    try:
                        response = await client.post(
                            f"{sample.server}/v1/chat/completions",
                            json=sample.request,
                            headers=self._headers(),
                            timeout=cfg.timeout_s,
                        )
                    except httpx.HTTPError as err:
                        error = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
                        sample.answer = ScoredAnswer(None, f"{error} (attempt {sample.attempts})")
                        self._down_until[sample.server] = time.monotonic() + cfg.url_cooldown_s
                        continue
                    finally:
                        sample.latency_s = time.perf_counter() - started
                    if response.status_code == 200:
                        try:
                            body = response.json()
                        except ValueError:
                            sample.answer = ScoredAnswer(
                                None, f"response is not JSON: {response.text[:80]!r}"
                            )
                        else:
                            sample.answer = self._score_response(body)
                        sample.failed = False
                        return sample
                    reason = f"HTTP {response.status_code} from {sample.server}: {response.text[:200]}"
                    sample.answer = ScoredAnswer(None, reason)
                    if response.status_code not in RETRYABLE_STATUS:
                        break
                sample.failed = True
                return sample
            finally:
                self._in_flight -= 1

    async def acall(
        self,
        videos: Any,
        prompts: Sequence[str] | None = None,
        contexts: Any = None,
        **metadata: Any,
    ) -> RewardOutput:
        """Score a batch; see the class docstring."""
        cfg = self.config
        start = time.perf_counter()
        requests = await asyncio.to_thread(build_requests, cfg, videos, prompts, contexts, metadata)
        if self._live_urls is None:
            await self.acheck_health()
        samples = []
        for index, request in enumerate(requests):
            request["model"] = self.model
            sample = _Sample(index, request, request_key(request))
            sample.answer = self.cache.get(sample.key)
            sample.cached = sample.answer is not None
            samples.append(sample)
        todo = [s for s in samples if not s.cached]
        self._in_flight = self._max_in_flight = 0
        limit = asyncio.Semaphore(cfg.max_concurrency)
        limits = httpx.Limits(max_connections=cfg.max_concurrency * max(1, len(cfg.urls)))
        failed: list[_Sample] = []
        async with httpx.AsyncClient(limits=limits) as client:
            tasks = [asyncio.create_task(self._send(client, s, limit)) for s in todo]
            try:
                for next_done in asyncio.as_completed(tasks):
                    sample = await next_done
                    if not sample.failed:
                        self.cache.put(sample.key, sample.answer)
                        continue
                    failed.append(sample)
                    if cfg.failure_policy == "raise" or len(failed) > cfg.abort_threshold * len(samples):
                        raise JudgeUnavailableError(self._abort_message(failed, len(samples)))
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        for sample in failed:
            logger.warning("judge sample %d failed: %s", sample.index, sample.answer.reason)
        return self._output(samples, failed, time.perf_counter() - start)

    def _abort_message(self, failed: list[_Sample], n: int) -> str:
        policy = self.config.failure_policy
        why = (
            "failure_policy='raise'"
            if policy == "raise"
            else f"abort_threshold={self.config.abort_threshold}"
        )
        return (
            f"judge failed on {len(failed)} of {n} samples ({why}); first error: {failed[0].answer.reason}; "
            "check the server (nextscene judge serve) or raise the threshold"
        )

    def _output(self, samples: list[_Sample], failed: list[_Sample], wall_s: float) -> RewardOutput:
        cfg = self.config
        latencies = [s.latency_s for s in samples if s.latency_s is not None]
        self.last_stats = {
            "samples": len(samples),
            "scored": sum(s.answer.score is not None for s in samples),
            "failed": len(failed),
            "unscorable": sum(s.answer.score is None and not s.failed for s in samples),
            "cache_hits": sum(s.cached for s in samples),
            "retries": sum(max(0, s.attempts - 1) for s in samples),
            "max_in_flight": self._max_in_flight,
            "mean_latency_s": sum(latencies) / len(latencies) if latencies else None,
            "max_latency_s": max(latencies) if latencies else None,
            "wall_s": wall_s,
        }
        return RewardOutput(
            scores=[cfg.reward_value(s.answer.score) for s in samples],
            metadata={
                cfg.label_column: [cfg.label_value(s.answer.score) for s in samples],
                "latency_s": [s.latency_s for s in samples],
                "attempts": [s.attempts for s in samples],
                "server": [s.server for s in samples],
                "cached": [s.cached for s in samples],
                "reason": [s.answer.reason for s in samples],
            },
        )

    def __call__(
        self, videos: Any, prompts: Sequence[str] | None = None, contexts: Any = None, **metadata: Any
    ) -> RewardOutput:
        """Sync `acall`, usable from a trainer's plain Python loop (or from inside a running event loop)."""
        return run_sync(self.acall(videos, prompts, contexts, **metadata))
