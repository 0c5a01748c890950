"""Reasoning-tag removal: score only the answer that follows the model's reasoning.

Reasoning models (DeepSeek-R1, its distills, and what our GRPO / distillation recipes train) answer as
``<think> ... </think> answer``. A boxed guess, an ``Answer: X`` or a code block inside the reasoning must not be
taken as the answer, so (like lighteval) only the text after the *last* closing tag is scored, and a completion that
opens a reasoning block without closing it has **no answer** (empty string). A completion with neither tag is
scored unchanged.

On by default for chat runs (``eval run --strip-reasoning auto``; ``on`` / ``off`` force it); ``eval score`` in
``auto`` strips when any prediction contains a closing tag. ``--reasoning-tags '<think>,</think>'`` sets the pair.
The setting and how many completions it changed are recorded in results.json.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_TAGS = ("<think>", "</think>")


@dataclass(frozen=True)
class ReasoningPolicy:
    """Whether and with which tags reasoning is removed before scoring."""

    enabled: bool = False
    open_tag: str = DEFAULT_TAGS[0]
    close_tag: str = DEFAULT_TAGS[1]

    def answer(self, completion: str) -> str:
        """The part of ``completion`` that is scored."""
        if not self.enabled:
            return completion
        if self.close_tag in completion:
            return completion.rsplit(self.close_tag, 1)[1].lstrip()
        if self.open_tag in completion:
            return ""  # reasoning never finished: no answer
        return completion

    def describe(self) -> dict:
        return {"strip_reasoning": self.enabled, "tags": [self.open_tag, self.close_tag]}


def parse_tags(text: str | None) -> tuple[str, str]:
    """``'<think>,</think>'`` -> the (open, close) pair."""
    if text is None:
        return DEFAULT_TAGS
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"--reasoning-tags expects 'OPEN,CLOSE' like '<think>,</think>', got {text!r}")
    return parts[0], parts[1]


def resolve_policy(mode: str, tags: tuple[str, str] = DEFAULT_TAGS, *, chat: bool = False,
                   completions: list[str] | None = None) -> ReasoningPolicy:
    """``mode``: ``on``, ``off`` or ``auto`` (on for chat runs; for scoring files: on when a closing tag occurs)."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"--strip-reasoning must be auto, on or off, got {mode!r}")
    if mode == "auto":
        enabled = chat or any(tags[1] in c for c in (completions or []))
    else:
        enabled = mode == "on"
    return ReasoningPolicy(enabled, *tags)
