#!/usr/bin/env python3
"""dpm across 2 MPI ranks against PyTorch DDP (gloo) across 2 processes, on CPU,
side by side: ResNet-20, 1 device × 32 images per process, 1 thread per process.

Alternates runs of both in one sitting and prints medians: throughput, weak
scaling from 1 to 2 processes, and how much of dpm's cross-rank communication
is hidden behind computation:
  hidden = 1 − (step time on 2 ranks − step time of 2 lone processes) / MPI time per step,
where "2 lone processes" are two single-rank runs at once: the same sharing of
cores and memory as the 2-rank job, without its communication.

Usage: python3 benches/resnet_mpi_vs_ddp.py [ROUNDS] [ITERS]
Needs `pip install torch`, Open MPI, and
`cargo build --release --features mpi --example resnet`.
"""
import json, os, re, statistics, subprocess, sys, tempfile

here = os.path.dirname(os.path.abspath(__file__))
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
iters = int(sys.argv[2]) if len(sys.argv) > 2 else 40
peer = os.path.join(here, "torch_resnet_ddp.py")
example = os.path.join(here, "..", "target", "release", "examples", "resnet")

def dpm(ranks):
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [example, "--quiet", "--devices", "cpu:0", "--batch-per-device", "32", "--iters", str(iters),
               "--train-images", "2048", "--heldout-images", "100", "--kernel-threads", "1",
               "--summary-json", f.name]
        if ranks > 1:
            cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(ranks)] + cmd
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        s = json.load(open(f.name))
        return s["images_per_sec"], s["comm_seconds"] / iters

def dpm_pair():
    """Two single-rank runs at the same time: their mean step time."""
    files = [tempfile.NamedTemporaryFile(suffix=".json") for _ in range(2)]
    procs = [subprocess.Popen([example, "--quiet", "--devices", "cpu:0", "--batch-per-device", "32",
                               "--iters", str(iters), "--train-images", "2048", "--heldout-images", "100",
                               "--kernel-threads", "1", "--summary-json", f.name], stdout=subprocess.DEVNULL)
             for f in files]
    for p in procs:
        assert p.wait() == 0
    steps = [32 / json.load(open(f.name))["images_per_sec"] for f in files]
    return sum(steps) / 2

def torch(world):
    out = subprocess.run([sys.executable, peer, str(world), "32", str(iters), "1"], check=True,
                         capture_output=True, text=True).stdout
    return float(re.search(r"images_per_s=([\d.]+)", out).group(1))

runs = {k: [] for k in ("dpm2", "torch2", "dpm1", "torch1", "comm", "lone_step")}
for r in range(rounds):
    ips, comm = dpm(2)
    runs["dpm2"].append(ips); runs["comm"].append(comm)
    runs["torch2"].append(torch(2))
    runs["dpm1"].append(dpm(1)[0])
    runs["torch1"].append(torch(1))
    runs["lone_step"].append(dpm_pair())
    print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.4g}" for k, v in runs.items()), flush=True)
med = {k: statistics.median(v) for k, v in runs.items()}
step2 = 64 / med["dpm2"]
exposed = max(step2 - med["lone_step"], 0)
hidden = 1 - exposed / med["comm"] if med["comm"] > 0 else float("nan")
print(f"\nmedian over {rounds} rounds of {iters} iterations, ResNet-20, 32 images per process")
print(f"  2 processes: dpm (MPI) {med['dpm2']:.1f} images/s, PyTorch DDP {med['torch2']:.1f}, ratio {med['dpm2'] / med['torch2']:.2f}")
print(f"  1 process:   dpm {med['dpm1']:.1f}, PyTorch {med['torch1']:.1f}, ratio {med['dpm1'] / med['torch1']:.2f}")
print(f"  weak scaling 1 -> 2: dpm {med['dpm2'] / (2 * med['dpm1']):.0%}, PyTorch DDP {med['torch2'] / (2 * med['torch1']):.0%}")
print(f"  dpm: {1000 * med['comm']:.1f} ms per step in MPI collectives; step {1000 * step2:.1f} ms on 2 ranks, "
      f"{1000 * med['lone_step']:.1f} ms for 2 lone processes: {1000 * exposed:.1f} ms exposed, {hidden:.0%} hidden")
