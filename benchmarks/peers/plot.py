"""Bar chart of steps/s per system and store; runs in the plotting venv (matplotlib).

Reads ``{"data": {case: {system: steps/s}}, "order": [...], "labels": {...}, "runs": n}``
on stdin
and writes the PNG named on the command line.  A log scale, because the systems span two
orders of magnitude and a linear axis would flatten the slow ones to nothing; every bar
carries its value so nobody has to read a log axis.
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")  # no display on a server
import matplotlib.pyplot as plt


def main() -> None:
    spec = json.load(sys.stdin)
    data, order, labels = spec["data"], spec["order"], spec["labels"]
    stores = [("linear/memory", "memory"), ("linear/sqlite", "SQLite"),
              ("linear/jsonl", "JSONL")]
    systems = [s for s in order if any(s in data.get(case, {}) for case, _ in stores)]
    width = 0.8 / len(stores)
    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=120)
    for k, (case, name) in enumerate(stores):
        xs, ys = [], []
        for i, system in enumerate(systems):
            if system in data.get(case, {}):
                xs.append(i + (k - (len(stores) - 1) / 2) * width)
                ys.append(data[case][system])
        if not xs:
            continue
        bars = ax.bar(xs, ys, width, label=name)
        for bar, y in zip(bars, ys, strict=True):
            ax.annotate(f"{y:,.0f}", (bar.get_x() + bar.get_width() / 2, y),
                        ha="center", va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(systems)), [labels[s] for s in systems])
    ax.set_ylabel("steps/s (median, log scale)")
    ax.set_title(f"10-step linear workflow, {spec['runs']:,} runs: steps per second")
    ax.legend(title="store")
    fig.tight_layout()
    fig.savefig(sys.argv[1])


if __name__ == "__main__":
    main()
