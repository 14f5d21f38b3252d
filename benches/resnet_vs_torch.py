#!/usr/bin/env python3
"""dpm's ResNet-20 example against PyTorch DDP (gloo) on CPU, side by side.

Alternates runs of both in one sitting and prints medians:
  - throughput at 2 devices x batch 32 (PyTorch: 2 processes x 1 thread);
  - weak scaling: 2 x 32 against 1 x 32 (dpm with 1 kernel thread per device).
Both sides' images/s come from the median time of their steady-state steps.

With CONTROL=1, each round also runs two 1-device dpm trainings at once, as
separate processes that never communicate: their summed images/s over twice
one alone is what this machine's two cores give two trainings, the ceiling
for weak scaling that no data-parallel layer can beat.

Usage: python3 benches/resnet_vs_torch.py [ROUNDS] [ITERS] [PEER]
PEER defaults to benches/torch_resnet_ddp.py, the PyTorch DDP baseline beside
this script. Needs `pip install torch` and `cargo build --release --example resnet`.
"""
import json, os, re, statistics, subprocess, sys, tempfile

here = os.path.dirname(os.path.abspath(__file__))
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
iters = int(sys.argv[2]) if len(sys.argv) > 2 else 40
peer = sys.argv[3] if len(sys.argv) > 3 else os.path.join(here, "torch_resnet_ddp.py")
example = os.path.join(here, "..", "target", "release", "examples", "resnet")

def dpm_cmd(devices, threads, summary, seed=0):
    return [example, "--quiet", "--devices", devices, "--batch-per-device", "32", "--iters", str(iters),
            "--train-images", "2048", "--heldout-images", "100", "--kernel-threads", str(threads),
            "--seed", str(seed), "--summary-json", summary]

def summary_ips(path):
    # The median step, as the PyTorch side quotes it (its steady steps' median).
    # (dpm's own figure, images_per_sec, is the mean over the steady steps.)
    s = json.load(open(path))
    return len(s["devices"]) * s["batch_per_device"] / s["median_step_seconds"], s["images_per_sec"]

def dpm(devices, threads):
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        subprocess.run(dpm_cmd(devices, threads, f.name), check=True, stdout=subprocess.DEVNULL)
        return summary_ips(f.name)

def dpm_two_alone():
    """Two 1-device trainings at once, separate processes: their summed images/s."""
    with tempfile.NamedTemporaryFile(suffix=".json") as a, tempfile.NamedTemporaryFile(suffix=".json") as b:
        procs = [subprocess.Popen(dpm_cmd("cpu:0", 1, f.name, seed), stdout=subprocess.DEVNULL)
                 for seed, f in ((0, a), (1, b))]
        if any(p.wait() != 0 for p in procs):
            sys.exit("a dpm run failed")
        return summary_ips(a.name)[0] + summary_ips(b.name)[0]

control = os.environ.get("CONTROL") == "1"

def torch(world):
    out = subprocess.run([sys.executable, peer, str(world), "32", str(iters), "1"], check=True,
                         capture_output=True, text=True).stdout
    return float(re.search(r"images_per_s=([\d.]+)", out).group(1))

runs = {k: [] for k in ("dpm2", "torch2", "dpm1", "torch1") + (("two_alone",) if control else ())}
means = {"dpm2": [], "dpm1": []}
for r in range(rounds):
    for k, devices in (("dpm2", "cpu:0,cpu:1"), ("torch2", 2), ("dpm1", "cpu:0"), ("torch1", 1)):
        if k.startswith("dpm"):
            med_ips, mean_ips = dpm(devices, 1)
            runs[k].append(med_ips)
            means[k].append(mean_ips)
        else:
            runs[k].append(torch(devices))
    if control:
        runs["two_alone"].append(dpm_two_alone())
    print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in runs.items()), flush=True)
med = {k: statistics.median(v) for k, v in runs.items()}
print(f"\nmedian images/s over {rounds} rounds of {iters} iterations")
print(f"  2 devices x 32: dpm {med['dpm2']:.1f}, PyTorch DDP {med['torch2']:.1f}, ratio {med['dpm2'] / med['torch2']:.2f}")
print(f"  1 device  x 32: dpm {med['dpm1']:.1f}, PyTorch {med['torch1']:.1f}, ratio {med['dpm1'] / med['torch1']:.2f}")
print(f"  weak scaling (2x32 / (2 x 1x32)): dpm {med['dpm2'] / (2 * med['dpm1']):.0%}, "
      f"PyTorch DDP {med['torch2'] / (2 * med['torch1']):.0%}")
print(f"  (dpm over all steady steps, the example's own figure: 2 devices {statistics.median(means['dpm2']):.1f}, "
      f"1 device {statistics.median(means['dpm1']):.1f})")
if control:
    print(f"  two 1-device dpm trainings at once, separate processes: {med['two_alone']:.1f} in all, "
          f"{med['two_alone'] / (2 * med['dpm1']):.0%} of twice one alone (this machine's ceiling for weak "
          f"scaling); dpm's 2 devices reach {med['dpm2'] / med['two_alone']:.0%} of it")
