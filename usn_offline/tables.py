"""Plain-text tables for the CLI's summaries (torch-free)."""

from __future__ import annotations


def format_table(rows: list[tuple[str, str]], title: str = "") -> str:
    """A two-column plain-text table."""
    width = max(len(k) for k, _ in rows)
    vwidth = max(len(v) for _, v in rows)
    line = "+" + "-" * (width + 2) + "+" + "-" * (vwidth + 2) + "+"
    out = [title] if title else []
    out.append(line)
    out += [f"| {k.ljust(width)} | {v.rjust(vwidth)} |" for k, v in rows]
    out.append(line)
    return "\n".join(out)
