"""The README's links lead somewhere: every relative link names a file of the tree (the
docs site's own links and anchors are checked by `make docs`, MkDocs in strict mode)."""

from __future__ import annotations

import re

from deploy.flwr_cli import PROJECT

ROOT = PROJECT
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)\s]*)?\)")


def test_every_relative_link_of_the_readme_names_a_file() -> None:
    targets = LINK.findall((ROOT / "README.md").read_text())
    relative = [path for path, _ in targets if "://" not in path]
    assert relative, "the README links to no page of the docs"
    missing = [path for path in relative if not (ROOT / path).exists()]
    assert missing == [], f"README links to missing files: {missing}"
