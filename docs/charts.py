"""Draw the docs' charts from the numbers in benchmarks/RESULTS.md (no copy of them here): `python docs/charts.py`
rewrites docs/assets/*.svg. Read: the headline table (seconds from prompt to file on a CPU) and the clip timings
quoted next to it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def headline_seconds(text: str) -> list[tuple[str, float]]:
    """(label, seconds) of the whole-clip routes in the 'Issue 23 headline' table, plus the plain 25-step clip its
    target column quotes ('716 s without')."""
    section = text[text.index("## Issue 23 headline"):]
    section = section[:section.index("\n## ", 5)]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 3 and "to mp4" in cells[0]:
            rows.append((cells[0], float(cells[1].strip("*"))))
            plain = re.search(r"\((\d+(?:\.\d+)?) s without\)", cells[2])
            if plain:
                rows.append(("25-step dpmpp-2m with CFG, no caching, VAE decode, to mp4", float(plain.group(1))))
    return rows


def bar_chart(rows: list[tuple[str, float]], title: str, unit: str) -> str:
    """A horizontal bar chart as SVG (no plotting library needed)."""
    width, bar_h, gap, left = 760, 26, 14, 16
    top = 44
    height = top + len(rows) * (bar_h + gap) + 10
    longest = max(v for _, v in rows)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="13">', f'<text x="{left}" y="24" font-size="15" font-weight="bold">{title}</text>']
    for i, (label, value) in enumerate(sorted(rows, key=lambda r: r[1])):
        y = top + i * (bar_h + gap)
        w = (width - 2 * left - 80) * value / longest
        parts += [f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="#5c6bc0" rx="3"/>',
                  f'<text x="{left + w + 6:.1f}" y="{y + 17}">{value:g} {unit}</text>',
                  f'<text x="{left + 6}" y="{y + 17}" fill="white">{label[:70]}</text>']
    return "\n".join(parts + ["</svg>"]) + "\n"


def main() -> None:
    rows = headline_seconds(RESULTS.read_text())
    out = ROOT / "docs" / "assets" / "speed.svg"
    out.write_text(bar_chart(rows, "A 16-frame 256x256 clip on a 2-core CPU (bfloat16), prompt to mp4", "s"))
    print(out)


if __name__ == "__main__":
    main()
