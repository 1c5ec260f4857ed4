"""What the memory benchmarks share: every variant measured in fresh processes, round after
round (the variants take turns, so that a change in the machine's load hits all of them), each
figure reported as the median with its [min-max]. A variant's process is the benchmark script
itself with a hidden ``--variant`` flag; it prints one ``RESULT <json>`` line."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
from collections.abc import Callable, Sequence


def current_rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure_rounds(commands: Callable[[str], list[str]], variants: Sequence[str], runs: int,
                   summarise: Callable[[list[dict]], dict], json_path: str | None = None) -> list[dict]:
    """``runs`` rounds of one fresh process per variant (``commands(variant)`` is its command
    line); the variants' summarised rows, in order. With ``json_path`` the rows are written after
    every round, so that a benchmark stopped by a time limit keeps its finished rounds."""
    results: dict[str, list[dict]] = {variant: [] for variant in variants}
    for _ in range(runs):
        for variant in variants:
            out = subprocess.run(commands(variant), capture_output=True, text=True, check=True).stdout
            results[variant].append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
        if json_path:
            with open(json_path, "w") as f:
                json.dump([summarise(results[variant]) for variant in variants], f, indent=1)
    return [summarise(results[variant]) for variant in variants]


def median_row(runs: list[dict], figures: Sequence[str]) -> dict:
    """One variant's runs -> its row: every figure the median, ``spread`` its [min, max], ``runs`` them all."""
    row = dict(runs[0])
    for key in figures:
        values = [run[key] for run in runs]
        row[key] = statistics.median(values)
        row.setdefault("spread", {})[key] = [min(values), max(values)]
    row["runs"] = runs
    return row


def spread(row: dict, key: str, fmt: str) -> str:
    """``median [min-max]`` of one figure of a row."""
    low, high = row["spread"][key]
    return f"{row[key]:{fmt}} [{low:{fmt}}-{high:{fmt}}]"
