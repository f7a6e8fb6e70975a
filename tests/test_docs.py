"""The README and docs/ link only to files that exist (pages were split and moved)."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_relative_link_resolves():
    broken = []
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for match in re.finditer(r"\]\(([^)#\s]+)(#[^)]*)?\)", page.read_text()):
            target = match.group(1)
            if not target.startswith(("http://", "https://")) and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert not broken, broken


def test_the_readme_stays_short():
    assert len((REPO / "README.md").read_text().splitlines()) <= 200
