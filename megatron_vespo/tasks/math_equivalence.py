"""Are two normalised answers the same value? Exact string, then numbers, then sympy.

Numbers: integers, decimals, scientific notation, \\frac{a}{b}, a/b, and percentages (p% equals
both p and p/100, since references write either), compared exactly as fractions and then within a
relative tolerance. Symbolic: simple LaTeX (\\frac, \\sqrt, ^, \\cdot, \\times, \\pi, a few
functions, single-letter variables) is translated to sympy syntax here, vetted against a whitelist
(sympy's parser evaluates Python), and judged in a separate worker process that is killed when it
exceeds its time budget; anything unsupported or failing is "not equal".
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Optional

from .worker_pool import WorkerPool

_NUMBER = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$")
_FRAC = re.compile(r"^([+-]?)\\frac\{([^{}]+)\}\{([^{}]+)\}$")
_SLASH = re.compile(r"^([^/]+)/([^/]+)$")
# Commands with a sympy spelling; any other LaTeX command makes an answer non-symbolic.
_COMMANDS = {"pi": "pi", "cdot": "*", "times": "*", "ln": "log", "log": "log", "sin": "sin",
             "cos": "cos", "tan": "tan", "exp": "exp", "infty": "oo"}
_FUNCTIONS = {"sqrt", "pi", "log", "sin", "cos", "tan", "exp", "oo"}
_SAFE_TEXT = re.compile(r"^[0-9a-zA-Z+\-*/().^ ]+$")


def _plain_number(s: str) -> Optional[Fraction]:
    if _NUMBER.match(s):
        return Fraction(s)
    match = _FRAC.match(s)
    if match and _NUMBER.match(match.group(2)) and _NUMBER.match(match.group(3)):
        den = Fraction(match.group(3))
        return None if den == 0 else (-1 if match.group(1) == "-" else 1) * Fraction(match.group(2)) / den
    match = _SLASH.match(s)
    if match and _NUMBER.match(match.group(1)) and _NUMBER.match(match.group(2)):
        den = Fraction(match.group(2))
        return None if den == 0 else Fraction(match.group(1)) / den
    return None


def number_values(s: str) -> list[Fraction]:
    """The values a normalised answer can mean: [] if it is not a number; p% gives [p, p/100]."""
    if s.endswith("%"):
        value = _plain_number(s[:-1])
        return [] if value is None else [value, value / 100]
    value = _plain_number(s)
    return [] if value is None else [value]


def numbers_equal(a: str, b: str, rel_tol: float) -> bool:
    """True if some value of `a` equals some value of `b`, exactly or within rel_tol."""
    return any(x == y or math.isclose(float(x), float(y), rel_tol=rel_tol)
               for x in number_values(a) for y in number_values(b))


def _group(s: str, i: int) -> tuple[str, int]:
    """The argument starting at s[i]: a {...} group (without braces) or one character."""
    if i >= len(s):
        raise ValueError("missing argument")
    if s[i] != "{":
        return s[i], i + 1
    depth = 0
    for j in range(i, len(s)):
        depth += {"{": 1, "}": -1}.get(s[j], 0)
        if depth == 0:
            return s[i + 1:j], j + 1
    raise ValueError("unbalanced braces")


def _translate(s: str) -> str:
    out, i = [], 0
    while i < len(s):
        if s.startswith("\\frac", i):
            num, i = _group(s, i + 5)
            den, i = _group(s, i)
            out.append(f"(({_translate(num)})/({_translate(den)}))")
        elif s.startswith("\\sqrt", i):
            i += 5
            root = None
            if i < len(s) and s[i] == "[":
                end = s.index("]", i)
                root, i = s[i + 1:end], end + 1
            arg, i = _group(s, i)
            out.append(f"sqrt({_translate(arg)})" if root is None
                       else f"(({_translate(arg)})**(1/({_translate(root)})))")
        elif s[i] == "\\":
            name = re.match(r"[a-zA-Z]+", s[i + 1:])
            if not name or name.group(0) not in _COMMANDS:
                raise ValueError(f"unsupported command at {s[i:i + 12]!r}")
            out.append(f" {_COMMANDS[name.group(0)]} ")
            i += 1 + len(name.group(0))
        elif s[i] == "{":
            arg, i = _group(s, i)
            out.append(f"({_translate(arg)})")
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def latex_to_sympy(s: str, max_chars: int) -> Optional[str]:
    """sympy-syntax text of a simple LaTeX expression, or None if it is too long, uses anything
    outside the supported subset, or names something that is not a known function or one letter
    (the whitelist is what makes handing the text to sympy's eval-based parser safe)."""
    if not s or len(s) > max_chars:
        return None
    try:
        text = _translate(s)
    except ValueError:
        return None
    if not _SAFE_TEXT.match(text):
        return None
    if any(len(word) > 1 and word not in _FUNCTIONS for word in re.findall(r"[a-zA-Z]+", text)):
        return None
    return text


class SympyJudge:
    """Symbolic equality in a killable worker process (`WorkerPool`, started on first use and
    restarted after a timeout or crash). Thread-safe; results are cached, because the same answer
    recurs."""

    def __init__(self, timeout_s: float = 2.0, max_chars: int = 128, startup_timeout_s: float = 60.0):
        self.max_chars = max_chars
        self.pool = WorkerPool(Path(__file__).with_name("sympy_worker.py"), 1, timeout_s,
                               startup_timeout_s)
        self.equal = lru_cache(maxsize=4096)(self._equal)

    def _equal(self, a: str, b: str) -> bool:
        """True only if sympy shows a - b simplifies to 0 within the time budget."""
        sa, sb = latex_to_sympy(a, self.max_chars), latex_to_sympy(b, self.max_chars)
        if sa is None or sb is None:
            return False
        answer = self.pool.ask({"a": sa, "b": sb})
        return answer is not None and bool(answer["equal"])

    def close(self) -> None:
        """Stop the worker (a later call starts a new one)."""
        self.pool.close()


def _split_top_level(s: str) -> list[str]:
    """"(1,\\frac{1}{2})" -> ["1", "\\frac{1}{2}"]; one item if there is no top-level comma."""
    if len(s) >= 2 and (s[0], s[-1]) in {("(", ")"), ("[", "]")}:
        s = s[1:-1]
    parts, depth, start = [], 0, 0
    for k, char in enumerate(s):
        depth += 1 if char in "({[" else -1 if char in ")}]" else 0
        if char == "," and depth == 0:
            parts.append(s[start:k])
            start = k + 1
    return parts + [s[start:]]


def _brackets(s: str) -> str:
    """The enclosing bracket pair of a tuple ("()" or "[]"), "" for a bare list."""
    pair = s[0] + s[-1]
    return pair if pair in ("()", "[]") else ""


def equivalent(a: str, b: str, rel_tol: float, judge: Optional[SympyJudge]) -> bool:
    """Are normalised answers a and b equal: as strings, as numbers, symbolically (when a judge is
    given), or element-wise as tuples of the same length and brackets?"""
    if not a or not b:
        return False
    if a == b or numbers_equal(a, b, rel_tol):
        return True
    if number_values(a) and number_values(b):  # two different numbers: nothing for sympy to add
        return False
    parts_a, parts_b = _split_top_level(a), _split_top_level(b)
    if len(parts_a) > 1 and len(parts_a) == len(parts_b) and _brackets(a) == _brackets(b):
        return all(equivalent(x, y, rel_tol, judge) for x, y in zip(parts_a, parts_b))
    return judge is not None and len(parts_a) == 1 and len(parts_b) == 1 and judge.equal(a, b)
