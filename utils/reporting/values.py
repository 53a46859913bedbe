"""Typed reads of the values in a run's files, for the report page and the comparison of runs.

A run folder is anyone's input: a file that parses as JSON can still hold a string where a number
belongs, a list where a mapping belongs, or an integer of thousands of digits. Every value the
report and the comparison use is read through these accessors, which treat a value of the wrong
type as missing; the Fields reader also notes each such value (file and key), so the page says so.
"""

from __future__ import annotations

import math

from ..errors import is_finite_number, shown


def num(value) -> float | None:
    """*value* as a finite float when it is a JSON number (not a bool), else None (an integer too
    large for a float, NaN and infinities included)."""
    return float(value) if is_finite_number(value) else None


def num_text(value) -> float | str | None:
    """A CSV cell: None when empty, its number when it reads as a finite one, else the text itself
    (which the page's formatters then mark as not a number)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return value
    return number if math.isfinite(number) else value


def mapping(value) -> dict:
    """*value* when it is a mapping, else an empty one."""
    return value if isinstance(value, dict) else {}


def entries(value) -> list:
    """*value* when it is a list, else an empty one."""
    return value if isinstance(value, list) else []


def text(value, default: str = "n/a") -> str:
    """A string, number or bool as text; *default* for None or anything else (mappings, lists)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, float)):
        return str(value)
    if isinstance(value, int):
        return str(value) if num(value) is not None else shown(value)
    return default


def hashable(value):
    """*value* itself when it can key a set, else its bounded repr."""
    try:
        hash(value)
    except TypeError:
        return shown(value)
    return value


class Fields:
    """Reads a run file's values by type; a value of the wrong type reads as missing and is noted in
    *notes* ("evaluation.json: compliance.true: [1, 2] is not a mapping; left out")."""

    def __init__(self, notes: list[str] | None = None):
        self.notes = notes if notes is not None else []

    def _odd(self, where: str, value, expected: str) -> None:
        line = f"{where}: {shown(value, 60)} is not {expected}; left out"
        if line not in self.notes:
            self.notes.append(line)

    def dict(self, parent, key, where: str) -> dict:
        value = mapping(parent).get(key)
        if value is not None and not isinstance(value, dict):
            self._odd(where, value, "a mapping")
        return mapping(value)

    def list(self, parent, key, where: str) -> list:
        value = mapping(parent).get(key)
        if value is not None and not isinstance(value, list):
            self._odd(where, value, "a list")
        return entries(value)

    def dicts(self, parent, key, where: str) -> list[dict]:
        """The mappings of a list of mappings; other items are noted and left out."""
        items = self.list(parent, key, where)
        for item in items:
            if not isinstance(item, dict):
                self._odd(f"{where}[]", item, "a mapping")
        return [item for item in items if isinstance(item, dict)]

    def num(self, parent, key, where: str) -> float | None:
        value = mapping(parent).get(key)
        if value is not None and num(value) is None:
            self._odd(where, value, "a number")
        return num(value)
