#!/usr/bin/env python3
"""Prints conv / raw-GEMM throughput ratios from `cargo bench --bench conv` results
(criterion medians in target/criterion/cpu_conv)."""
import json, os, sys

root = sys.argv[1] if len(sys.argv) > 1 else "target/criterion/cpu_conv"
def median(kind, shape):
    with open(os.path.join(root, kind, shape, "new", "estimates.json")) as f:
        return json.load(f)["median"]["point_estimate"]

shapes = sorted(os.listdir(os.path.join(root, "forward")))
print(f"{'shape':28} {'fwd GFLOP/s':>11} {'gemm':>6} {'ratio':>6} {'bwd GFLOP/s':>11} {'gemm':>6} {'ratio':>6}")
for s in shapes:
    with open(os.path.join(root, "forward", s, "new", "benchmark.json")) as f:
        flops = json.load(f)["throughput"]["Elements"]
    row = [s]
    for d, fl in (("forward", flops), ("backward", 2 * flops)):
        t, g = median(d, s), median("gemm_" + d, s)
        row += [fl / t, fl / g, g / t]
    print(f"{row[0]:28} {row[1]:11.1f} {row[2]:6.1f} {row[3]:6.0%} {row[4]:11.1f} {row[5]:6.1f} {row[6]:6.0%}")
