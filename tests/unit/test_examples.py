"""The docs show the examples as they are: the quickstart's FedAvg-to-WASH diff in
docs/own-app.md is the difference between its two files."""

from __future__ import annotations

import difflib

from deploy.flwr_cli import PROJECT

QUICKSTART = PROJECT / "examples" / "quickstart" / "quickstart"
PAGE = PROJECT / "docs" / "own-app.md"
START, END = "<!-- quickstart diff -->\n```diff\n", "```\n<!-- end quickstart diff -->"


def quickstart_diff() -> str:
    """The unified diff (one line of context) from quickstart/fedavg.py to wash.py."""
    lines = difflib.unified_diff(
        (QUICKSTART / "fedavg.py").read_text().splitlines(keepends=True),
        (QUICKSTART / "wash.py").read_text().splitlines(keepends=True),
        "quickstart/fedavg.py",
        "quickstart/wash.py",
        n=1,
    )
    return "".join(lines)


def test_the_docs_show_the_real_quickstart_diff() -> None:
    page = PAGE.read_text()
    shown = page[page.index(START) + len(START) : page.index(END)]
    assert shown == quickstart_diff(), f"put this between the markers:\n{quickstart_diff()}"
