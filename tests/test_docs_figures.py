"""The benchmark figures README.md and docs/tuning.md quote are the last run's
(``benchmarks/results/latest.json``), at the precision they are quoted.

Each quoted figure names its value in the JSON in an HTML comment right after it (hidden when
the Markdown is rendered), a dotted path into ``latest.json``::

    0.54 µs<!-- latest.json: stores.server-4-workers.ours.hook_median_us -->
    p99 2.95 µs<!-- latest.json: stores.server-4-workers.ours.hook_p99_us -->

A path step into a list of rows (``ratios``: ``[label, value, target, met]``) picks the row by
its label and takes its value: ``ratios.server-4-workers.our hook median / deque floor`` for
a ratio. The figure must equal the value rounded to the digits quoted: ``0.54`` is the value
to two decimals (half up), ``26`` to the unit, and an integer's trailing zeros are not
significant (``1,000`` is the value to the thousand).

Every number in these files with a unit of time (µs, ms, s), of a ratio (the multiplication
sign, or x), MB or metrics/s is taken for a benchmark figure and must name its value: one
that names none is reported, so that no figure is added, or left behind by a new run,
unchecked. What ``latest.json`` does not hold is not quoted there: they link
docs/benchmarks.md for it. (tests/test_docs.py checks the configuration page's settings;
this file checks only benchmark figures.)
"""

from __future__ import annotations

import json
import re
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "latest.json"
DOCS = (ROOT / "README.md", ROOT / "docs" / "tuning.md")

NUMBER = r"(?<![\w.,])(?P<number>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)"
UNIT = r"\s?(?P<unit>µs|us|ms|s|" + "\N{MULTIPLICATION SIGN}" + r"|x|MB|metrics/s)(?![\w/])"
SOURCE = r"<!--\s*latest\.json:\s*(?P<path>[^>]*?)\s*-->"
#: A benchmark figure: a number with its unit, and the value it names, if it names one.
FIGURE = re.compile(NUMBER + UNIT + r"(?:[ \t]*" + SOURCE + r")?")
#: Any naming of a value, to find one that follows no figure.
ANY_SOURCE = re.compile(SOURCE)
#: Any HTML comment: what is inside one is no figure.
COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)


def value_at(results: Any, path: str) -> Any:
    """The value at a dotted path; a step into a list of rows picks the row by its label."""
    node = results
    for step in path.split("."):
        if isinstance(node, dict):
            if step not in node:
                raise KeyError(f"no {step!r} in latest.json at {path!r}")
            node = node[step]
        elif isinstance(node, list):
            rows = [row for row in node if isinstance(row, list) and row and row[0] == step]
            if len(rows) != 1:
                raise KeyError(f"{len(rows)} rows labelled {step!r} in latest.json at {path!r}")
            node = rows[0][1]
        else:
            raise KeyError(f"{path!r} goes past a value in latest.json")
    return node


def rounded_as_quoted(value: float, quoted: str) -> str:
    """``value`` written with the digits of ``quoted`` (commas dropped)."""
    digits = quoted.replace(",", "")
    exact = Decimal(repr(float(value)))
    if "." in digits:
        places = len(digits.split(".")[1])
        return str(exact.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP))
    zeros = len(digits) - len(digits.rstrip("0")) if digits.strip("0") else 0
    unit = Decimal(1).scaleb(zeros)
    return str(int((exact / unit).quantize(Decimal(1), rounding=ROUND_HALF_UP) * unit))


def line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def problems(text: str, name: str, results: Any) -> tuple[int, list[str]]:
    """How many figures ``text`` quotes with their source, and what is wrong with any."""
    found: list[str] = []
    checked = 0
    named: set[int] = set()
    hidden = [m.span() for m in COMMENT.finditer(text)]
    for match in FIGURE.finditer(text):
        if any(start <= match.start() < end for start, end in hidden):
            continue
        where = f"{name}:{line_of(text, match.start())}"
        quoted, path = match["number"], match["path"]
        shown = text[match.start("number") : match.end("unit")]  # the figure as written
        if path is None:
            found.append(f"{where}: {shown} names no value in latest.json")
            continue
        named.add(match.start("path"))
        try:
            value = value_at(results, path)
        except KeyError as exc:
            found.append(f"{where}: {shown}: {exc.args[0]}")
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            found.append(f"{where}: {shown}: {path} is {value!r}, not a number")
            continue
        checked += 1
        expected = rounded_as_quoted(value, quoted)
        if expected != quoted.replace(",", ""):
            found.append(f"{where}: {shown} quoted, latest.json {path} = {value!r}")
    for match in ANY_SOURCE.finditer(text):
        if match.start("path") not in named:
            where = f"{name}:{line_of(text, match.start())}"
            found.append(f"{where}: {match['path']} follows no figure")
    return checked, found


@pytest.fixture(scope="module")
def results() -> Any:
    return json.loads(RESULTS.read_text(encoding="utf-8"))


@pytest.mark.parametrize("doc", DOCS, ids=lambda doc: doc.name)
def test_every_quoted_figure_is_the_last_runs(doc: Path, results: Any) -> None:
    checked, found = problems(doc.read_text(encoding="utf-8"), doc.name, results)
    assert not found, "\n".join(found)
    assert checked, f"{doc.name} quotes no benchmark figure: is the pattern still right?"


def test_a_changed_or_unsourced_figure_is_found(results: Any) -> None:
    """The check fails on a copy of tuning.md with one figure changed, or its source dropped."""
    text = DOCS[1].read_text(encoding="utf-8")
    first = next(m for m in FIGURE.finditer(text) if m["path"] is not None)
    number = first["number"]
    changed = number[:-1] + str((int(number[-1]) + 1) % 10)
    altered = text[: first.start("number")] + changed + text[first.end("number") :]
    _, found = problems(altered, "copy", results)
    assert len(found) == 1 and "quoted, latest.json" in found[0], found

    unsourced = text[: first.end("unit")] + text[first.end() :]
    _, found = problems(unsourced, "copy", results)
    assert len(found) == 1 and "names no value" in found[0], found

    moved = text[: first.end("unit")] + " and" + text[first.end("unit") :]
    _, found = problems(moved, "copy", results)
    assert len(found) == 2 and "follows no figure" in found[1], found


@pytest.mark.parametrize(
    ("value", "quoted", "expected"),
    [
        (1.234, "1.23", "1.23"),
        (2.345, "2.35", "2.35"),  # half up on the JSON's digits (the float is 2.34499...)
        (7.25, "7.3", "7.3"),
        (1234.5, "1,000", "1000"),  # an integer's trailing zeros are not significant
        (41.6, "42", "42"),
        (12345.5, "12,346", "12346"),
    ],
)
def test_rounding_follows_the_digits_quoted(value: float, quoted: str, expected: str) -> None:
    assert rounded_as_quoted(value, quoted) == expected
