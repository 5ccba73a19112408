"""Draw the docs' charts from the numbers in benchmarks/RESULTS.md (no copy of them here): `python docs/charts.py`
rewrites docs/assets/*.svg (tests/test_docs.py fails when a committed chart differs from what RESULTS.md draws).
Read: the headline table (seconds from prompt to file on a CPU) and the clip timings quoted next to it; the GPU
memory estimates of generation and of LoRA training (their bold peak column)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def headline_seconds(text: str) -> list[tuple[str, float]]:
    """(label, seconds) of the whole-clip routes in the 'Issue 23 headline' table, plus the plain 25-step clip its
    target column quotes ('716 s without')."""
    rows = []
    for line in section(text, "Issue 23 headline").splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 3 and "to mp4" in cells[0]:
            rows.append((cells[0], float(cells[1].strip("*"))))
            plain = re.search(r"\((\d+(?:\.\d+)?) s without\)", cells[2])
            if plain:
                rows.append(("25-step dpmpp-2m with CFG, no caching, VAE decode, to mp4", float(plain.group(1))))
    return rows


def section(text: str, heading: str) -> str:
    """The text of the RESULTS.md section whose '## ' heading starts with `heading` (up to the next one)."""
    start = text.index("## " + heading)
    end = text.find("\n## ", start + 3)
    return text[start:end if end > 0 else None]


def table_column(text: str, column: str) -> list[tuple[str, float]]:
    """(first cell, number) of every row of the first markdown table in `text` that has `column` in its header."""
    rows, index = [], None
    for line in text.splitlines():
        if not line.startswith("|"):
            if index is not None and rows:
                break
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if index is None:
            index = cells.index(column) if column in cells else None
            continue
        number = re.search(r"(\d+(?:\.\d+)?)", cells[index]) if not set(cells[0]) <= {"-"} else None
        if number:
            rows.append((cells[0], float(number.group(1))))
    return rows


def memory_rows(text: str) -> list[tuple[str, float]]:
    """GPU peaks (GiB, estimated): generation cases from the GPU section, LoRA training from issue 15's table."""
    generation = [(f"generate {label}", value)
                  for label, value in table_column(section(text, "GPU"), "estimated peak")]
    training = [(f"train-lora {label}", value)
                for label, value in table_column(section(text, "LoRA training memory"), "peak")]
    return generation + training


def bar_chart(rows: list[tuple[str, float]], title: str, unit: str) -> str:
    """A horizontal bar chart as SVG (no plotting library needed): each row's label above its bar, the value after
    it, shortest first."""
    from html import escape

    width, bar_h, row_h, left, top = 760, 18, 44, 16, 44
    height = top + len(rows) * row_h + 6
    longest = max(v for _, v in rows)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="13">', f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{left}" y="24" font-size="15" font-weight="bold">{escape(title)}</text>']
    for i, (label, value) in enumerate(sorted(rows, key=lambda r: r[1])):
        y = top + i * row_h
        w = (width - 2 * left - 90) * value / longest
        parts += [f'<text x="{left}" y="{y + 12}" fill="#333">{escape(label[:100])}</text>',
                  f'<rect x="{left}" y="{y + 18}" width="{w:.1f}" height="{bar_h}" fill="#5c6bc0" rx="3"/>',
                  f'<text x="{left + w + 6:.1f}" y="{y + 32}">{value:g} {unit}</text>']
    return "\n".join(parts + ["</svg>"]) + "\n"


def charts(text: str) -> dict[str, str]:
    """File name under docs/assets -> SVG, all drawn from the RESULTS.md text."""
    return {"speed.svg": bar_chart(headline_seconds(text),
                                   "A 16-frame 256x256 clip on a 2-core CPU (bfloat16), prompt to mp4", "s"),
            "memory.svg": bar_chart(memory_rows(text), "GPU memory peak, fp16 weights (estimated on the meta device)",
                                    "GiB")}


def main() -> None:
    for name, svg in charts(RESULTS.read_text()).items():
        out = ROOT / "docs" / "assets" / name
        out.write_text(svg)
        print(out)


if __name__ == "__main__":
    main()
