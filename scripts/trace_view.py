#!/usr/bin/env python3
"""Draws a Chrome trace written by dpm (Trainer::trace, the example's --trace)
as a self-contained HTML page: one row per lane of each process (a device's
compute, the collectives), slices coloured by kind, a time axis in ms. For a
quick look where Perfetto is not at hand, and for the README's screenshot:

    python3 scripts/trace_view.py trace.json trace.html [--step K]
    chromium --headless --screenshot=trace.png --window-size=1600,560 trace.html

--step K draws only the K-th run (counted from 1) of the net that ran longest
(the train net: one run per step), so one step fills the width.
"""
import argparse
import html
import json

COLOURS = {"compute": "#4c78a8", "backward": "#f58518", "communication": "#54a24b", "net": "#bab0ac"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("out")
    ap.add_argument("--step", type=int, default=0)
    a = ap.parse_args()
    with open(a.trace) as f:
        doc = json.load(f)
    events = doc["traceEvents"]
    slices = [e for e in events if e.get("ph") == "X"]
    names = {}
    for e in events:
        if e.get("ph") == "M" and e["name"] == "thread_name":
            names[(e["pid"], e["tid"])] = e["args"]["name"]
    other = doc.get("otherData", {})
    steps = int(other.get("steps", 1))
    nets = [e for e in slices if e.get("cat") == "net"]
    if a.step and nets:
        # The K-th run of the net that ran longest in all: the train net.
        total = {}
        for n in nets:
            total[n["name"]] = total.get(n["name"], 0) + n["dur"]
        main_net = max(total, key=total.get)
        runs = [n for n in nets if n["name"] == main_net]
        run = runs[min(a.step, len(runs)) - 1]
        lo, hi = run["ts"], run["ts"] + run["dur"]
        slices = [e for e in slices if lo <= e["ts"] < hi]
    t0 = min(e["ts"] for e in slices)
    t1 = max(e["ts"] + e["dur"] for e in slices)
    rows = sorted({(e["pid"], e["tid"]) for e in slices})
    width, label_w, row_h, top = 1500, 190, 34, 70
    scale = (width - label_w - 20) / max(t1 - t0, 1e-9)
    height = top + row_h * len(rows) + 50
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">']
    ops = sum(1 for e in slices if e.get("cat") != "net")
    title = f"{html.escape(a.trace)}: {ops} ops"
    if "allreduce_ms_per_step" in other:
        title += (
            f" · all-reduce {other['allreduce_ms_per_step']:.2f} ms per step,"
            f" {100 * other['allreduce_hidden_fraction']:.0f}% hidden behind backward (all {steps} traced steps)"
        )
    svg.append(f'<text x="10" y="22" font-size="15">{title}</text>')
    x = 10
    for kind, colour in COLOURS.items():
        svg.append(f'<rect x="{x}" y="34" width="14" height="14" fill="{colour}"/>')
        svg.append(f'<text x="{x + 20}" y="46">{kind}</text>')
        x += 150
    for i, key in enumerate(rows):
        y = top + i * row_h
        svg.append(f'<text x="10" y="{y + row_h / 2 + 4}">{html.escape(names.get(key, str(key)))}</text>')
        svg.append(f'<line x1="{label_w}" x2="{width - 10}" y1="{y + row_h}" y2="{y + row_h}" stroke="#ddd"/>')
    for e in slices:
        i = rows.index((e["pid"], e["tid"]))
        x = label_w + (e["ts"] - t0) * scale
        w = max(e["dur"] * scale, 0.5)
        colour = COLOURS.get(e.get("cat"), "#999")
        tip = html.escape(f"{e['name']} {e['dur'] / 1e3:.3f} ms")
        svg.append(
            f'<rect x="{x:.2f}" y="{top + i * row_h + 4}" width="{w:.2f}" height="{row_h - 8}"'
            f' fill="{colour}" stroke="white" stroke-width="0.3"><title>{tip}</title></rect>'
        )
    # Time axis: about ten ticks at round milliseconds.
    span_ms = (t1 - t0) / 1e3
    step = next(s for s in (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1e9) if span_ms / s <= 12)
    y = top + row_h * len(rows) + 18
    k = 0
    while k * step <= span_ms + 1e-9:
        x = label_w + k * step * 1e3 * scale
        svg.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{y - 12}" stroke="#eee"/>')
        svg.append(f'<text x="{x:.1f}" y="{y}" text-anchor="middle">{k * step:g} ms</text>')
        k += 1
    svg.append("</svg>")
    with open(a.out, "w") as f:
        f.write("<!doctype html><meta charset=utf-8><title>dpm trace</title>"
                "<body style='margin:0;background:white'>" + "\n".join(svg) + "</body>\n")


if __name__ == "__main__":
    main()
