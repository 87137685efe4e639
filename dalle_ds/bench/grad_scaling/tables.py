"""The benchmark's results as Markdown tables and summary lines (what the script prints)."""

from __future__ import annotations

import math
import statistics

from .fidelity import GOAL_COS, blocks_only
from .runs import FP16_METHODS, METHODS, RunResult, worst_over_steps

__all__ = [
    "block_table",
    "bound",
    "loss_curve_table",
    "pct",
    "ranges",
    "scan_lines",
    "scan_table",
    "summary_table",
    "sweep_table",
]


def ranges(powers: list[int]) -> str:
    if not powers:
        return "none"
    out, start, prev = [], powers[0], powers[0]
    step = min((b - a for a, b in zip(powers, powers[1:], strict=False)), default=1)
    for p in powers[1:] + [None]:
        if p is None or p - prev != step:
            out.append(f"2^{start}" if start == prev else f"2^{start}..2^{prev}")
            if p is not None:
                start = p
        if p is not None:
            prev = p
    return ", ".join(out)


def scan_table(scan: dict[str, dict[int, dict]]) -> list[str]:
    lines = [
        "| scale | all-fp16: min block cos | blocks < 0.999 | overflow (share, all params) | max flush mass | "
        "amp: min block cos | blocks < 0.999 | blocks overflowed | max flush mass |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for k in sorted(scan["amp"]):
        cells = [f"2^{k}"]
        for scheme in ("all-fp16", "amp"):
            st = scan[scheme][k]
            b = blocks_only(st)
            cos = [s.cos for s in b.values()]
            cells += [f"{min(cos):.6f}", f"{sum(c < GOAL_COS for c in cos)}/{len(cos)}"]
            if scheme == "all-fp16":
                cells.append(pct(statistics.fmean(s.overflow for s in st.values())))
            else:
                cells.append(f"{sum(s.overflow > 0 for s in b.values())}")
            cells.append(f"{max(s.flush_mass for s in b.values()):.1e}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def pct(x: float) -> str:
    if x == 0:
        return "0"
    return f"{100 * x:.3g}%" if x >= 1e-4 else f"{100 * x:.1e}%"


def block_table(results: dict[str, RunResult], order: list[str], all_blocks: bool) -> list[str]:
    worst = {m: worst_over_steps(results[m]) for m in FP16_METHODS}
    if not all(worst.values()):
        return ["(no measurements)"]
    blocks = [s for s in order if s != "rest"]
    worst_cos = {m: min(blocks, key=lambda s, m=m: worst[m][s].cos) for m in FP16_METHODS}
    worst_mass = {m: max(blocks, key=lambda s, m=m: worst[m][s].flush_mass) for m in FP16_METHODS}
    worst_flush = {m: max(blocks, key=lambda s, m=m: worst[m][s].flush) for m in FP16_METHODS}
    if all_blocks:
        chosen = order
    else:
        n = len(blocks)
        picks = {0, 1, n // 2 - 1, n // 2, n - 2, n - 1}
        picks |= {blocks.index(s) for s in (*worst_cos.values(), *worst_mass.values(), *worst_flush.values())}
        chosen = [blocks[i] for i in sorted(p for p in picks if 0 <= p < n)] + ["rest"]
    scales = results["resblock"].final_scales
    lines = [
        "| res block | ds-fp16 cos | flush | mass | overflow | resblock cos | flush | mass | overflow | "
        "resblock scale |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for seg in chosen:
        tags = [f"worst {m} cos" for m in FP16_METHODS if worst_cos[m] == seg]
        tags += [f"worst {m} mass" for m in FP16_METHODS if worst_mass[m] == seg and worst[m][seg].flush_mass > 0]
        tags += [f"worst {m} flush" for m in FP16_METHODS if worst_flush[m] == seg and worst[m][seg].flush > 0]
        label = seg + (f" ({', '.join(tags)})" if tags else "")
        cells = []
        for m in FP16_METHODS:
            s = worst[m][seg]
            cells += [f"{s.cos:.6f}", pct(s.flush), f"{s.flush_mass:.1e}", pct(s.overflow)]
        scale = f"2^{math.log2(scales[seg]):.2f}" if seg in scales else "fp32, unscaled"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {scale} |")
    return lines


def loss_curve_table(results: dict[str, RunResult], every: int) -> list[str]:
    lines = ["| steps | " + " | ".join(f"{m} loss" for m in METHODS) + " |", "|---" * (len(METHODS) + 1) + "|"]
    n = max(len(r.losses) for r in results.values())
    for start in range(0, n, every):
        cells = []
        for m in METHODS:
            chunk = results[m].losses[start : start + every]
            cells.append(f"{statistics.fmean(chunk):.4f}" if chunk else "-")
        lines.append(f"| {start}-{min(start + every, n) - 1} | " + " | ".join(cells) + " |")
    return lines


def summary_table(rows: dict[str, dict]) -> list[str]:
    lines = [
        "| method | loss first → last window | vs fp32 | min block cos | blocks cos < 0.999 | max block flush "
        "(mass) | max block overflow | skipped steps | loss scale (ds: start → end; resblock: min / median / max) "
        "| s/step | time vs fp32 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, r in rows.items():
        if "min_block_cos" in r:
            grad = (
                f"{r['min_block_cos']:.6f} | {r['blocks_below_goal']}/{r['blocks']} | {pct(r['max_block_flush'])} "
                f"({r['max_block_flush_mass']:.1e}) | {pct(r['max_block_overflow'])}"
            )
        else:
            grad = "(reference) | - | - | -"
        lines.append(
            f"| {m} | {r['first_loss']:.3f} → {r['final_loss']:.3f} | {r['loss_vs_fp32']:.3f} | {grad} | "
            f"{r['skipped']}/{r['steps']} | {r.get('scale', '-')} | {r['s_per_step']:.2f} | {r['time_vs_fp32']:.1f}x |"
        )
    return lines


def some(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def bound(ss: dict, k: int) -> str:
    """2^k, marked when it is the edge of the scanned range (the true bound may lie beyond)."""
    return f"<=2^{k}" if k == ss["powers"][0] else f">=2^{k}" if k == ss["powers"][-1] else f"2^{k}"


def scan_lines(ss: dict) -> list[str]:
    floor, ceil = ss["amp_highest_floor"], ss["amp_lowest_ceiling"]
    inter = ss["amp_windows_intersection"]
    return [
        f"usable single scales (every block cos >= {GOAL_COS}, no overflow): all-fp16 (DeepSpeed's scheme): "
        f"{ranges(ss['all_fp16_usable'])}; amp with one scale for every branch: {ranges(ss['amp_uniform_usable'])}",
        f"amp per-block usable ranges: highest floor {bound(ss, floor[0])} ({some(ss['floor_blocks'])}), lowest "
        f"ceiling {bound(ss, ceil[1])} ({some(ss['ceiling_blocks'])}); "
        f"intersection {f'2^{inter[0]}..2^{inter[1]}' if inter else 'EMPTY: no single scale serves every block'}; "
        f"blocks with no usable scale at all: {ss['blocks_without_window'] or 'none'}"
        if floor
        else "amp: no block has a usable scale",
        f"amp per-block floors seen: {', '.join(bound(ss, k) for k in ss['floors'])}; "
        f"ceilings seen: {', '.join(bound(ss, k) for k in ss['ceilings'])}",
    ]


def sweep_table(table: list[tuple[str, dict]]) -> list[str]:
    """One row per setting and fp16 method of :func:`~.runs.sweep`'s results."""
    lines = [
        "| setting | method | min block cos | blocks < 0.999 | max flush (mass) | max overflow | skipped | "
        "scale(s) at the end | loss vs fp32 | scan: usable single scales | scan: amp per-block floor..ceiling |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, res in table:
        rows, ss = res["rows"], res["scan"]
        for m in FP16_METHODS:
            r = rows[m]
            if ss is None:
                scan_cells = "- | -"
            elif m == "ds-fp16":
                scan_cells = f"all-fp16: {ranges(ss['all_fp16_usable'])} | -"
            else:
                inter = ss["amp_windows_intersection"]
                floor, ceil = ss["amp_highest_floor"], ss["amp_lowest_ceiling"]
                scan_cells = (
                    f"amp: {ranges(ss['amp_uniform_usable'])} | "
                    + (f"{bound(ss, floor[0])} .. {bound(ss, ceil[1])}" if floor else "none")
                    + ("" if inter else " (empty)")
                )
            lines.append(
                f"| {label} | {m} | {r['min_block_cos']:.6f} | {r['blocks_below_goal']}/{r['blocks']} | "
                f"{pct(r['max_block_flush'])} ({r['max_block_flush_mass']:.1e}) | {pct(r['max_block_overflow'])} | "
                f"{r['skipped']}/{r['steps']} | {r.get('scale', '-')} | {r['loss_vs_fp32']:.3f} | {scan_cells} |"
            )
    return lines
