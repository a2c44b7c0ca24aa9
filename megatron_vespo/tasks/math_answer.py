"""Final answers of math responses: find the last \\boxed{...} and bring it to a canonical string.

The canonical form removes what does not change the value (LaTeX spacing and sizing, degree signs,
dollar signs, trailing periods, unit text, thousands separators, "x =" prefixes) and spells the same
construct one way (\\dfrac and \\tfrac -> \\frac, \\frac12 -> \\frac{1}{2}), so that two answers
equal as strings after `normalize_answer` are the same answer. Deciding equal values of different
strings (0.5 vs \\frac{1}{2}) is math_equivalence's job.
"""

from __future__ import annotations

import re
from typing import Optional

BOX_COMMANDS = ("\\boxed", "\\fbox")

# Spacing and sizing commands that never change a value. A command name followed by a letter is a
# different command (\right vs \rightarrow), hence the look-ahead.
_NOISE = re.compile(r"\\(?:left|right|displaystyle|big|Big|bigl|bigr|Bigl|Bigr)(?![a-zA-Z])"
                    r"|\\[!,;: ]|\\q?quad(?![a-zA-Z])|~")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\degree(?![a-zA-Z])|°")
_TEXT = r"\\(?:text|textrm|textbf|mathrm|mbox)\s*\{([^{}]*)\}"
# A unit: text after some value, optionally squared/cubed ("5\text{ cm}^2").
_TRAILING_UNIT = re.compile(r"^(.*\S)\s*" + _TEXT + r"(?:\^\{?\d\}?)?\s*$")
_ASSIGNMENT = re.compile(r"^[a-zA-Z](?:_\{?\w+\}?)?=(?!=)")
_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?%?$")


def last_boxed(text: str) -> Optional[str]:
    """Content of the last \\boxed{...} (or \\fbox{...}) in `text`, nested braces kept; the
    brace-less form "\\boxed 5" gives "5". None when there is no box or the last one is unclosed."""
    start, command = max((text.rfind(command), command) for command in BOX_COMMANDS)
    if start < 0:
        return None
    i = start + len(command)
    while i < len(text) and text[i] == " ":
        i += 1
    if i == len(text):
        return None
    if text[i] != "{":
        match = re.match(r"[^\s$]+", text[i:])
        return match.group(0) if match and text[i - 1] == " " else None
    depth, j = 0, i
    while j < len(text):
        char = text[j]
        if char == "\\":
            j += 2  # \{ and \} are literal braces, not grouping
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
        j += 1
    return None


def _strip_outer_braces(s: str) -> str:
    """"{5}" -> "5", only when the first brace closes at the very end."""
    while s.startswith("{") and s.endswith("}"):
        depth = 0
        for k, char in enumerate(s):
            depth += {"{": 1, "}": -1}.get(char, 0)
            if depth == 0 and k < len(s) - 1:
                return s
        s = s[1:-1]
    return s


def normalize_answer(answer: str) -> str:
    """Canonical string of one final answer (a box in it is unwrapped first)."""
    boxed = last_boxed(answer)
    s = (boxed if boxed is not None else answer).strip()
    s = re.sub(r"^\$+|\$+$", "", s).strip()  # $...$ math delimiters
    s = re.sub(r"^\\[(\[]|\\[)\]]$", "", s).strip()  # \( ... \) and \[ ... \]
    s = _NOISE.sub("", s)
    s = _DEGREES.sub("", s)
    s = s.replace("\\$", "").replace("\\%", "%").replace("{,}", ",")
    s = re.sub(r"\\[dt]frac(?![a-zA-Z])", r"\\frac", s)
    # Units are dropped, other text keeps its words: "5\text{ cm}" -> "5", "\text{(B)}" -> "(B)".
    unit = _TRAILING_UNIT.match(s)
    if unit and re.search(r"[\d}]", unit.group(1)):
        s = unit.group(1)
    s = re.sub(_TEXT, r"\1", s)
    s = re.sub(r"\s+", "", s)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)  # \frac12
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)  # \frac1{2}
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)  # \frac{1}2
    s = re.sub(r"\\sqrt(\d+)", r"\\sqrt{\1}", s)  # \sqrt2
    s = s.rstrip(".").rstrip("\\")
    if _ASSIGNMENT.match(s) and s.count("=") == 1:  # "x=5" -> "5"
        s = s.split("=", 1)[1]
    if _THOUSANDS.match(s):  # "1,234,567" -> "1234567"; "(1,234)" is a pair and is kept
        s = s.replace(",", "")
    return _strip_outer_braces(s)
