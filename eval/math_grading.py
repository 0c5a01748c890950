"""Answer checking with math-verify (Hugging Face), shared by MATH-500 and AIME.

The gold answer is parsed as LaTeX (``$<answer>$``); the completion with math-verify's default extraction
(``\\boxed{}`` content first, then other LaTeX / plain expressions, last match wins). ``verify`` compares the two
symbolically / numerically. math-verify uses ``signal.alarm`` for its timeouts, so call these from the main thread.
"""

from __future__ import annotations

import functools

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

GOLD_EXTRACTION = (LatexExtractionConfig(), ExprExtractionConfig())


@functools.lru_cache(maxsize=4096)
def parse_gold(answer: str):
    return parse(f"${answer}$", extraction_config=GOLD_EXTRACTION)


def parse_completion(completion: str):
    return parse(completion)


def grade(gold_answer: str, completion: str) -> tuple[str | None, bool]:
    """Return ``(extracted answer as a string or None, correct)``."""
    gold = parse_gold(gold_answer)
    pred = parse_completion(completion)
    extracted = str(pred[-1]) if pred else None
    if not gold or not pred:
        return extracted, False
    return extracted, bool(verify(gold, pred))
