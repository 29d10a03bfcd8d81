"""A content-addressed cache of judge answers.

GRPO scores the same context many times (every member of a group, every epoch on a small dataset,
re-scored baselines), so the judge remembers answers by a hash of exactly what it sent: the model
name, the scoring settings and the messages, image bytes included (they are in the data URLs). A
changed frame, prompt or model is a different key; nothing is keyed on object identity.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from typing import Any

from rewards.judge.scoring import ScoredAnswer


def request_key(request: dict[str, Any]) -> str:
    """SHA-256 of the request body (canonical JSON): model + prompt + image bytes + scoring settings."""
    return hashlib.sha256(json.dumps(request, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class ScoreCache:
    """A bounded, thread-safe LRU map from request hash to a scored answer (failures are never stored)."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, ScoredAnswer] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> ScoredAnswer | None:
        with self._lock:
            answer = self._entries.get(key)
            if answer is not None:
                self._entries.move_to_end(key)
            return answer

    def put(self, key: str, answer: ScoredAnswer) -> None:
        if self.max_entries <= 0 or answer.score is None:
            return
        with self._lock:
            self._entries[key] = answer
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
