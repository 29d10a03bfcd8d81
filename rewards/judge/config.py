"""`JudgeConfig`: how to reach the judge, what to ask it, and what to do when it fails.

Shared by the vLLM client and the in-process backend (which ignores the network fields), so both
ask the same question and compute the same score.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from policies.errors import InputError
from rewards.judge.prompts import DEFAULT_SYSTEM_PROMPT, MODES, render_question
from rewards.judge.scoring import ScoredAnswer, score_choice, score_rating

FAILURE_POLICIES = ("raise", "none")
SCORINGS = ("choice", "binary", "rating")


@dataclass
class JudgeConfig:
    """How to reach the judge, what to ask it, and what to do when it fails."""

    urls: list[str] = field(
        default_factory=lambda: ["http://127.0.0.1:8000"],
        metadata={"help": "Base URLs of vLLM OpenAI servers (round robin, failover to the next on error)."},
    )
    model: str | None = field(
        default=None, metadata={"help": "Served model name; None = the first model the server lists."}
    )
    mode: str = field(
        default="images",
        metadata={
            "help": "What the judge sees: 'images' (sampled frames), 'video' (one video per scene), 'clip' "
            "(the end of the context and the start of the next scene as one video) or 'text' (captions)."
        },
    )
    scoring: str = field(
        default="choice",
        metadata={
            "help": "'choice': P(yes)/(P(yes)+P(no)); 'binary': 1 if that >= binary_threshold else 0; "
            "'rating': expected rating 1..rating_scale in [0, 1]."
        },
    )
    binary_threshold: float = field(
        default=0.5,
        metadata={
            "help": "'binary' scoring: the verdict is yes (reward 1) when P(yes)/(P(yes)+P(no)) >= this."
        },
    )
    choices: tuple[str, str] = field(
        default=("yes", "no"), metadata={"help": "Positive and negative answer of 'choice' scoring."}
    )
    rating_scale: int = field(
        default=5,
        metadata={"help": "Highest rating of 'rating' scoring (ratings 1..N, N <= 9: one token each)."},
    )
    aspects: tuple[str, ...] = field(
        default=(), metadata={"help": "Extra criteria named in the question: physics, continuity, semantics."}
    )
    template: str | None = field(
        default=None,
        metadata={"help": "Question template ({aspects} {choices} {low} {high} {prompt}); None = default."},
    )
    system_prompt: str | None = field(
        default=DEFAULT_SYSTEM_PROMPT, metadata={"help": "System message; None sends none."}
    )
    num_frames: int = field(
        default=4,
        metadata={
            "help": "Frames sampled evenly from each scene (images/video); in 'clip' mode, frames of the "
            "next scene shown from its start."
        },
    )
    context_frames: int = field(
        default=5,
        metadata={
            "help": "'clip' mode: context frames shown, ending at its last (odd: the cut is mid-patch)."
        },
    )
    frame_stride: int = field(
        default=2, metadata={"help": "'clip' mode: frames between two shown ones, one grid across the cut."}
    )
    image_format: str = field(
        default="png", metadata={"help": "Frame encoding in 'images' mode: png or jpeg."}
    )
    top_logprobs: int = field(
        default=20,
        metadata={"help": "Top first-token logprobs requested (server --max-logprobs must allow it)."},
    )
    max_concurrency: int = field(default=8, metadata={"help": "Requests in flight at once from this judge."})
    timeout_s: float = field(default=60.0, metadata={"help": "Timeout of one HTTP request, seconds."})
    max_retries: int = field(
        default=3, metadata={"help": "Retries of a failed request (connection, 5xx, 429)."}
    )
    backoff_s: float = field(
        default=0.5, metadata={"help": "First retry delay; doubles each retry, with jitter."}
    )
    max_backoff_s: float = field(default=8.0, metadata={"help": "Largest retry delay, seconds."})
    url_cooldown_s: float = field(
        default=30.0,
        metadata={"help": "After a connection error or timeout, skip that URL this long if others are up."},
    )
    health_timeout_s: float = field(
        default=30.0, metadata={"help": "Time allowed for the start-up health check of all URLs, seconds."}
    )
    api_key_env: str = field(
        default="NEXTSCENE_JUDGE_API_KEY",
        metadata={"help": "Environment variable holding the server's API key (unset = no key sent)."},
    )
    failure_policy: str = field(
        default="none",
        metadata={
            "help": "On a sample that failed after retries: 'raise', or 'none' (score None, keep going)."
        },
    )
    abort_threshold: float = field(
        default=0.5,
        metadata={
            "help": "With failure_policy='none', raise once more than this fraction of a batch failed."
        },
    )
    cache_size: int = field(
        default=100_000, metadata={"help": "Answers kept in the content-hash cache (0 = off)."}
    )

    def __post_init__(self) -> None:
        if isinstance(self.urls, str):
            self.urls = [u.strip() for u in self.urls.split(",") if u.strip()]
        self.urls = [u.rstrip("/") for u in self.urls]
        if not self.urls or any(not u.startswith(("http://", "https://")) for u in self.urls):
            raise InputError(
                f"judge urls {self.urls!r} must be http(s):// base URLs, e.g. http://127.0.0.1:8000"
            )
        self.choices = tuple(self.choices)
        self.aspects = tuple(self.aspects)
        checks = [
            (self.mode in MODES, f"mode={self.mode!r} is not one of {', '.join(MODES)}"),
            (self.scoring in SCORINGS, f"scoring={self.scoring!r} is not one of {', '.join(SCORINGS)}"),
            (
                self.failure_policy in FAILURE_POLICIES,
                f"failure_policy={self.failure_policy!r} is not raise/none",
            ),
            (
                len(self.choices) == 2 and all(self.choices),
                f"choices={self.choices!r} must be two non-empty words",
            ),
            (2 <= self.rating_scale <= 9, f"rating_scale={self.rating_scale} must be in 2..9 (one digit)"),
            (
                0.0 < self.binary_threshold <= 1.0,
                f"binary_threshold={self.binary_threshold} must be in (0, 1] (0.5: the likelier answer)",
            ),
            (self.image_format in ("png", "jpeg"), f"image_format={self.image_format!r} must be png or jpeg"),
            (self.num_frames >= 1, f"num_frames={self.num_frames} must be >= 1"),
            (self.context_frames >= 1, f"context_frames={self.context_frames} must be >= 1"),
            (self.frame_stride >= 1, f"frame_stride={self.frame_stride} must be >= 1"),
            (self.top_logprobs >= 2, f"top_logprobs={self.top_logprobs} must be >= 2"),
            (self.max_concurrency >= 1, f"max_concurrency={self.max_concurrency} must be >= 1"),
            (self.max_retries >= 0, f"max_retries={self.max_retries} must be >= 0"),
            (self.timeout_s > 0 and self.health_timeout_s > 0, "timeout_s and health_timeout_s must be > 0"),
            (0.0 <= self.abort_threshold <= 1.0, f"abort_threshold={self.abort_threshold} must be in [0, 1]"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(f"judge config: {message}")
        render_question(
            self.template, aspects=self.aspects, choices=self.labels, prompt="", rating=self.rating
        )

    @property
    def rating(self) -> bool:
        return self.scoring == "rating"

    @property
    def labels(self) -> tuple[str, ...]:
        """Allowed answers sent as the structured choice."""
        return tuple(str(r) for r in range(1, self.rating_scale + 1)) if self.rating else self.choices

    @property
    def label_column(self) -> str:
        """Metadata column with the answer in the judge's own units: ``p_<positive>`` or ``rating``."""
        return "rating" if self.rating else f"p_{self.choices[0]}"

    def score_candidates(self, candidates: list[tuple[str, float]]) -> ScoredAnswer:
        """The answer's [0, 1] score from its first-token ``(token, logprob)`` candidates: the expected
        rating, or P(positive) (also for 'binary', whose verdict `reward_value` takes from it)."""
        if self.rating:
            return score_rating(candidates, self.labels)
        return score_choice(candidates, *self.choices)

    def reward_value(self, score: float | None) -> float | None:
        """The reward of an answer's score: the score itself, or with 'binary' scoring the verdict,
        1.0 when P(positive) >= ``binary_threshold`` and 0.0 otherwise (None stays None)."""
        if score is None or self.scoring != "binary":
            return score
        return 1.0 if score >= self.binary_threshold else 0.0

    def label_value(self, score: float | None) -> float | None:
        """A [0, 1] score in the judge's own units (probability of the positive answer, or 1..N rating)."""
        if score is None or not self.rating:
            return score
        return 1 + score * (self.rating_scale - 1)
