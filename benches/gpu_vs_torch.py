"""dpm vs PyTorch eager on one GPU, FP32 (TF32 off) with cudnn.benchmark = True:
training images/s of ResNet-50 (224 px, batch 64) and ResNet-20 (32 px, batch
128), both with 10 classes (the last layer is under 0.1% of ResNet-50's work), SGD with momentum and weight decay, side by side
in one run, rounds interleaved; prints medians and the ratio dpm / PyTorch.

Usage: python3 benches/gpu_vs_torch.py RESNET_EXAMPLE_BINARY [ITERS] [ROUNDS]
(the binary: cargo build --release --features cuda --example resnet)."""
import contextlib, io, json, os, statistics, subprocess, sys, tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_resnet_gpu as peer  # the peer's own script, unchanged

CASES = [  # name, depth, image size, batch, classes, peer model
    ("resnet50", 50, 224, 64, 10, peer.resnet50),
    ("resnet20", 20, 32, 128, 10, peer.resnet20),
]


def dpm(binary, depth, size, batch, classes, iters):
    with tempfile.TemporaryDirectory() as d:
        summary = os.path.join(d, "s.json")
        subprocess.run([binary, "--devices", "cuda:0", "--depth", str(depth), "--image-size", str(size),
                        "--batch-per-device", str(batch), "--classes", str(classes), "--iters", str(iters + 3),
                        "--train-images", str(2 * batch), "--heldout-images", "0", "--quiet",
                        "--summary-json", summary], check=True)
        return json.load(open(summary))["images_per_sec"]


def torch(make, size, batch, classes, iters):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        peer.bench("x", make, batch, size, classes, "fp32", iters)
    return float(buf.getvalue().split("images_per_s=")[1])


def main():
    binary = sys.argv[1]
    iters = int(sys.argv[2]) if len(sys.argv) > 2 else 30
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    print(f"# {peer.torch.__version__} on {peer.torch.cuda.get_device_name(0)}; {iters} iterations, {rounds} rounds",
          flush=True)
    results = {c[0]: ([], []) for c in CASES}
    for r in range(rounds):
        for name, depth, size, batch, classes, make in CASES:
            order = [0, 1] if r % 2 == 0 else [1, 0]
            for who in order:
                if who == 0:
                    v = dpm(binary, depth, size, batch, classes, iters)
                else:
                    v = torch(make, size, batch, classes, iters)
                results[name][who].append(v)
                print(f"round {r} {name} {'dpm' if who == 0 else 'torch'} {v:.1f} images/s", flush=True)
    print("| model | batch | dpm images/s | PyTorch images/s | dpm / PyTorch |")
    print("| --- | --- | --- | --- | --- |")
    for name, depth, size, batch, classes, _ in CASES:
        d, t = (statistics.median(v) for v in results[name])
        print(f"| {name} ({size} px) | {batch} | {d:.0f} | {t:.0f} | {d / t:.2f}x |")


if __name__ == "__main__":
    main()
