"""Assemble the outputs of ``benchmarks/gpu_check.sh`` into one ``report.json`` and one markdown
table (``report.md``): stage outcomes, kernel correctness, kernel speed against its targets, the
d16 training step and d16 sampling, VAR vs MVAR, and ``mvar-dist plan``'s predicted memory
against CUDA's (benchmarks/plan_check.py). Stages that failed or timed out are reported as
such; whatever they finished is still shown.

    python benchmarks/gpu_report.py gpu_report/
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

# the kernel's targets at B=64 heads=16 16x16 head_dim 64 bf16 (issue 12)
TARGET_FWD_US, TARGET_FWD_BWD_US, TARGET_SPEEDUP = 50.0, 150.0, 1.3


def _load(path: Path) -> object | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def stages(out: Path) -> list[dict]:
    rows = []
    lines = (out / "stages.txt").read_text().splitlines() if (out / "stages.txt").is_file() else []
    for line in lines:
        name, code, seconds = line.split()
        status = "ok" if code == "0" else ("timed out" if code in ("124", "137") else f"failed ({code})")
        rows.append({"stage": name, "status": status, "seconds": int(seconds)})
    return rows


def kernel(out: Path) -> dict:
    report: dict = {}
    log = out / "kernel_tests.log"
    if log.is_file():
        summary = [line for line in log.read_text().splitlines() if re.search(r"\d+ (passed|failed)", line)]
        report["tests"] = summary[-1].strip("= ") if summary else "no summary (see kernel_tests.log)"
    speed = _load(out / "kernel.json")
    if isinstance(speed, dict) and "16x16" in speed.get("speed", {}):
        rows = {r["method"]: r for r in speed["speed"]["16x16"]}
        triton, sdpa = rows.get("triton (fused)", {}), rows.get("masked SDPA", {})
        report["device"] = speed.get("device")
        report["rows_16x16"] = rows
        if triton.get("fwd_ms") is not None:
            fwd_us, fwd_bwd_us = 1000 * triton["fwd_ms"], 1000 * (triton.get("fwd_bwd_ms") or float("nan"))
            report["targets"] = {
                "fwd_us": fwd_us, "fwd_ok": fwd_us <= TARGET_FWD_US,
                "fwd_bwd_us": fwd_bwd_us, "fwd_bwd_ok": fwd_bwd_us <= TARGET_FWD_BWD_US,
            }
            if sdpa.get("fwd_bwd_ms"):
                speedup = sdpa["fwd_bwd_ms"] / triton["fwd_bwd_ms"]
                report["targets"].update(speedup_vs_masked_sdpa=speedup, speedup_ok=speedup >= TARGET_SPEEDUP)
    return report


def markdown(report: dict) -> str:
    lines = ["# GPU report", "", "| stage | status | seconds |", "|---|---|---:|"]
    lines += [f"| {s['stage']} | {s['status']} | {s['seconds']} |" for s in report["stages"]]
    k = report["kernel"]
    lines += ["", f"Kernel tests: {k.get('tests', 'not run')}. Device: {k.get('device', '?')}.", ""]
    if "targets" in k:
        t = k["targets"]
        lines += ["| kernel, B64 h16 16x16 d64 bf16 | measured | target | met |", "|---|---:|---:|---|",
                  f"| Triton fwd | {t['fwd_us']:.1f} us | <= {TARGET_FWD_US:.0f} us | {'yes' if t['fwd_ok'] else 'no'} |",
                  f"| Triton fwd+bwd | {t['fwd_bwd_us']:.1f} us | <= {TARGET_FWD_BWD_US:.0f} us | "
                  f"{'yes' if t['fwd_bwd_ok'] else 'no'} |"]
        if "speedup_vs_masked_sdpa" in t:
            lines.append(f"| fwd+bwd speed-up over masked SDPA | {t['speedup_vs_masked_sdpa']:.2f}x | "
                         f">= {TARGET_SPEEDUP}x | {'yes' if t['speedup_ok'] else 'no'} |")
        natten = k["rows_16x16"].get("natten na2d", {})
        if natten.get("fwd_ms"):
            lines.append(f"| NATTEN fwd / fwd+bwd | {1000 * natten['fwd_ms']:.1f} / "
                         f"{1000 * (natten.get('fwd_bwd_ms') or float('nan')):.1f} us | | |")
    train = report.get("train_step") or []
    if train:
        base = train[0]
        lines += ["", "| train step, d16 batch 32 bf16 | ms/img (all scales) | x VAR | mean step s | peak MB | x VAR |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in train:
            lines.append(f"| {r['variant']} | {r['time_per_image_all_scales_ms']:.2f} | "
                         f"{r['time_per_image_all_scales_ms'] / base['time_per_image_all_scales_ms']:.2f} | "
                         f"{r['mean_step_s']:.3f} | {r['peak_memory_mb']:.0f} | "
                         f"{r['peak_memory_mb'] / base['peak_memory_mb']:.2f} |")
    sampling = report.get("sampling") or []
    if len(sampling) == 2:
        var, mvar = sampling
        lines += ["", "| sampling, d16 batch 32 | peak MB | images/s |", "|---|---:|---:|"]
        lines += [f"| {r['variant']} | {r['peak_memory_mb']:.0f} | {r['images_per_s']:.1f} |" for r in sampling]
        lines.append(f"| VAR/MVAR memory; MVAR/VAR speed | {var['peak_memory_mb'] / mvar['peak_memory_mb']:.2f}x | "
                     f"{mvar['images_per_s'] / var['images_per_s']:.2f}x |")
    plan = report.get("plan_check")
    if isinstance(plan, dict) and plan.get("predicted_peak"):
        lines += ["", f"| mvar-dist plan, d{plan.get('depth', 16)} batch {plan['batch']} {plan['precision']} {plan['template']} | predicted MiB | "
                  "CUDA max allocated MiB | measured / predicted |", "|---|---:|---:|---:|"]
        for name, predicted, measured in (("after engine init", "predicted_after_init", "after_init"),
                                          ("between steps", "predicted_between_steps", "between_steps"),
                                          ("peak of a step", "predicted_peak", "measured_peak")):
            lines.append(f"| {name} | {plan[predicted] / 2**20:.0f} | {plan[measured] / 2**20:.0f} | "
                         f"{plan[measured] / plan[predicted]:.3f} |")
        lines.append(f"| peak reserved by the allocator | | {plan['reserved_peak'] / 2**20:.0f} | |")
    evaluate = report.get("evaluate") or []
    if evaluate:
        lines += ["", "| mvar-dist evaluate, 1,000 images of 256 px | sample images/s | seconds |", "|---|---:|---:|"]
        lines += [f"| {r['variant']} | {r['images_per_s']:.1f} | {r['seconds']:.1f} |" for r in evaluate]
    return "\n".join(lines) + "\n"


def main(out: Path) -> int:
    report = {
        "stages": stages(out), "kernel": kernel(out),
        "train_step": _load(out / "train_step.json"), "sampling": _load(out / "sampling.json"),
        "plan_check": _load(out / "plan_check.json"), "evaluate": _load(out / "evaluate.json"),
    }
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "gpu_report")))
