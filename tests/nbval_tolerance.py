"""nbval with numbers compared within a tolerance: the same chapter passes on every CPU.

Why: nbval compares a cell's text output with the stored one character by character. Floats
differ in their last digits between CPUs, kernel sets (``ATEN_CPU_CAPABILITY``) and thread
counts, and rounding a print does not help: a value near a rounding boundary flips anyway.
So a reader on another laptop would see a red suite although nothing broke.

The rule, applied to every text output nbval compares (streams, ``text/plain``,
``text/html``, ``text/markdown``):

- The words, spacing and layout must match exactly, and so must the count of numbers.
- **Integers are compared exactly**: token ids, shapes, parameter counts, step counts,
  percentages printed as integers. A number is an integer when it is printed without a
  decimal point or exponent, in both outputs.
- **Every other number** (printed with a decimal point or an exponent) may move by
  ``max(REL_TOL * max(|a|, |b|), one unit of the last printed digit)``. With ``REL_TOL``
  1e-3, ``31.52`` may become ``31.53`` (one unit), ``1562.3`` may become ``1563.8``
  (0.1% of it) and ``0.107`` may become ``0.108`` but not ``0.110``.
- Only a free-standing number counts: the digits in ``sd15``, ``fp16``, ``0x7f`` or a
  version such as ``2.13.0`` are text, so they are compared exactly too.

A failing cell still shows both outputs (nbval's own report) and then names each number
that moved beyond its tolerance, or says that the text around the numbers changed.

Loaded with ``-p nbval_tolerance`` from ``pyproject.toml``; it wraps nbval 0.11's
``IPyNbCell.sanitize`` (so compared texts carry this rule) and ``format_output_compare``
(so the report names the number).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from nbval.plugin import IPyNbCell

REL_TOL = 1e-3

# A free-standing decimal number: not glued to a word or another number on the left, and not
# the first part of a dotted version (2.13.0) on the right.
NUMBER = re.compile(
    r"(?<![\w.])-?(?:\d+\.\d+|\.\d+|\d+)(?:[eE][-+]?\d+)?(?!\.?\d)"
)


@dataclass(frozen=True)
class Moved:
    """A number whose two printed values differ beyond the tolerance."""

    reference: str
    test: str
    allowed: float

    def __str__(self) -> str:
        if self.allowed == 0:
            return f"integer {self.reference} became {self.test} (integers compare exactly)"
        return f"{self.reference} became {self.test} (allowed difference {self.allowed:.3g})"


def is_integer(token: str) -> bool:
    return not any(c in token for c in ".eE")


def last_digit_unit(token: str) -> float:
    """The value of one unit in the last printed digit: 0.01 for '31.52', 1e-5 for '1.5e-4'."""
    mantissa, _, exponent = token.lower().partition("e")
    decimals = len(mantissa.partition(".")[2])
    return 10.0 ** (int(exponent or 0) - decimals)


def allowed_difference(reference: str, test: str) -> float:
    if is_integer(reference) and is_integer(test):
        return 0.0
    a, b = float(reference), float(test)
    unit = max(last_digit_unit(reference), last_digit_unit(test))
    return max(REL_TOL * max(abs(a), abs(b)), unit)


def compare_texts(reference: str, test: str) -> tuple[bool, list[Moved]]:
    """Whether ``test`` matches ``reference`` under the rule, and which numbers moved.

    Returns ``(text_matches, moved)``: ``text_matches`` is False when the words or the count
    of numbers differ; ``moved`` lists the numbers outside their tolerance.
    """
    if reference == test:
        return True, []
    ref_words, test_words = NUMBER.split(reference), NUMBER.split(test)
    if ref_words != test_words:
        return False, []
    moved = []
    for r, t in zip(NUMBER.findall(reference), NUMBER.findall(test)):
        allowed = allowed_difference(r, t)
        # A tiny slack above the bound, so that the float arithmetic of the bound itself
        # (31.52 - 31.51 = 0.010000000000001563) does not fail a move of exactly one unit.
        if abs(float(r) - float(t)) > allowed * (1 + 1e-9):
            moved.append(Moved(r, t, allowed))
    return True, moved


def texts_match(reference: str, test: str) -> bool:
    text_matches, moved = compare_texts(reference, test)
    return text_matches and not moved


class NumericText(str):
    """A text output whose equality is :func:`texts_match`, so nbval's ``!=`` uses the rule."""

    __hash__ = str.__hash__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and texts_match(str(self), str(other))

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)


def explain(reference: str, test: str) -> list[str]:
    """Report lines naming what failed: the changed text, or each number that moved."""
    text_matches, moved = compare_texts(reference, test)
    if not text_matches:
        return ["  the text around the numbers changed (words, layout or count of numbers)"]
    return [f"  number moved: {m}" for m in moved]


_nbval_sanitize = IPyNbCell.sanitize
_nbval_format_output_compare = IPyNbCell.format_output_compare


def _sanitize(self, s):
    s = _nbval_sanitize(self, s)
    return NumericText(s) if isinstance(s, str) else s


def _format_output_compare(self, key, left, right):
    _nbval_format_output_compare(self, key, left, right)
    if isinstance(left, str) and isinstance(right, str):
        self.comparison_traceback.extend(explain(str(left), str(right)))


def pytest_configure(config):
    IPyNbCell.sanitize = _sanitize
    IPyNbCell.format_output_compare = _format_output_compare
