"""Bar charts of steps/s per system and store; runs in the plotting venv (matplotlib).

Reads ``{"data": {case: {system: steps/s}}, "order": [...], "labels": {...}, "runs": n}``
on stdin (``case`` is ``linear/<store>`` for wall-clock medians and ``linear/<store>/cpu``
for the per-CPU-second medians) and writes the PNG named on the command line.  Two panels,
because the machine is shared: wall clock is what a user sees, per CPU-second is what the
code costs when it has a core.  Log scale, because the systems span two orders of
magnitude and a linear axis would flatten the slow ones; every bar carries its value.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on a server
import matplotlib.pyplot as plt

STORES = (("linear/memory", "memory"), ("linear/sqlite", "SQLite"), ("linear/jsonl", "JSONL"))


def panel(ax: Any, data: dict[str, dict[str, float]], suffix: str, systems: list[str],
          labels: dict[str, str], title: str) -> None:
    width = 0.8 / len(STORES)
    for k, (case, name) in enumerate(STORES):
        values = data.get(case + suffix, {})
        xs = [i + (k - (len(STORES) - 1) / 2) * width
              for i, s in enumerate(systems) if s in values]
        ys = [values[s] for s in systems if s in values]
        bars = ax.bar(xs, ys, width, label=name, color=f"C{k}")
        for bar, y in zip(bars, ys, strict=True):
            ax.annotate(f"{y:,.0f}", (bar.get_x() + bar.get_width() / 2, y),
                        ha="center", va="bottom", fontsize=7)
    ax.set_yscale("log")
    # "LangGraph (sync)" on two lines: six labels side by side must not run into each other.
    ax.set_xticks(range(len(systems)), [labels[s].replace(" (", "\n(") for s in systems],
                  fontsize=8)
    ax.set_title(title, fontsize=10)


def main() -> None:
    spec = json.load(sys.stdin)
    data, order, labels = spec["data"], spec["order"], spec["labels"]
    systems = [s for s in order if any(s in data.get(case, {}) for case, _ in STORES)]
    fig, (wall, cpu) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=110, sharey=True)
    panel(wall, data, "", systems, labels, "wall clock (median)")
    panel(cpu, data, "/cpu", systems, labels, "per CPU-second of the process (median)")
    top = max(v for values in data.values() for v in values.values())
    wall.set_ylim(50, top * 2)  # shared axis: room above the tallest bar for its label
    wall.set_ylabel("steps/s (log scale)")
    cpu.legend(title="store")
    fig.suptitle(f"10-step linear workflow, {spec['runs']:,} runs: steps per second")
    fig.tight_layout()
    fig.savefig(sys.argv[1])


if __name__ == "__main__":
    main()
