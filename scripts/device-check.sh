#!/usr/bin/env bash
# The CUDA checks of issue 11, in one prepared run on a GPU machine.
#
# Here (no GPU needed):   scripts/device-check.sh
#   builds the CUDA test binary and the example (--release --features cuda),
#   strips them into .device/ (ignored, carried to the GPU machine) and prints
#   the one command to run there.
# There:                  scripts/device-check.sh run
#   1. every CUDA kernel against its CPU twin, ResNet-20 cuda:0 vs cpu:0 for 5
#      steps, ResNet-20 through NCCL = plain, checkpoints, bad input
#      (tests/cuda.rs);
#   2. the example end to end on cuda:0 (held-out accuracy must be >= 90%),
#      profiles, and the NCCL checks: 64 MiB all-reduce bandwidth, ResNet-50
#      through the NCCL path (a world of one GPU) against the plain run;
#   3. benches/gpu_vs_torch.py: dpm vs PyTorch eager FP32 images/s.
# Everything it prints also goes to $OUT (when set) as device-check.log.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-build}" == build ]]; then
    mkdir -p .device
    test_bin=$(cargo test --release --features cuda --test cuda --no-run --message-format=json 2>/dev/null |
        python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "cuda" and m.get("executable"):
        print(m["executable"])')
    cargo build --release --features cuda --example resnet --example nccl_bandwidth
    strip -o .device/cuda-tests "$test_bin"
    strip -o .device/resnet target/release/examples/resnet
    strip -o .device/nccl-bandwidth target/release/examples/nccl_bandwidth
    du -sh .device
    echo "run there (device tool, carry [\".device\"], timeout 600):"
    echo "  bash scripts/device-check.sh run"
    exit 0
fi

out=${OUT:-/tmp}
exec > >(tee "$out/device-check.log") 2>&1

# cuBLAS, cuDNN and NVRTC as the machine's PyTorch ships them, plus the toolkit.
site=$(python3 -c 'import site; print(site.getsitepackages()[0])')
libs=$(find "$site/nvidia" /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
    -maxdepth 3 -name 'lib*.so*' -not -path '*stubs*' -printf '%h\n' 2>/dev/null | sort -u | paste -sd:)
# cudarc loads NCCL as libnccl.so; the wheel ships libnccl.so.2.
nccl=$(find "$site/nvidia" -name 'libnccl.so*' 2>/dev/null | head -1)
mkdir -p /tmp/dpm-lib && [[ -n "$nccl" ]] && ln -sf "$nccl" /tmp/dpm-lib/libnccl.so
export LD_LIBRARY_PATH="/tmp/dpm-lib:$libs:${LD_LIBRARY_PATH:-}"
export RUST_BACKTRACE=1

echo "== machine"
uname -r
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())'
status=0

echo "== 1. tests/cuda.rs"
DPM_REQUIRE_NVRTC=1 timeout 150 .device/cuda-tests --test-threads 1 2>&1 || status=1

echo "== 2. the example on cuda:0"
timeout 80 .device/resnet --devices cuda:0 --batch-per-device 64 --iters 1000 --quiet \
    --summary-json "$out/example.json" || status=1
python3 - "$out/example.json" <<'PY' || status=1
import json, sys
s = json.load(open(sys.argv[1]))
print(f"held-out accuracy {100 * s['heldout_accuracy']:.1f}%, {s['images_per_sec']:.0f} images/s")
assert s["heldout_accuracy"] >= 0.90, "held-out accuracy below 90%"
PY

echo "== 2b. where a ResNet-50 step goes (--profile)"
timeout 60 .device/resnet --devices cuda:0 --depth 50 --image-size 224 --batch-per-device 64 --classes 10 \
    --iters 23 --train-images 128 --heldout-images 0 --quiet --profile || status=1

echo "== 2c. ResNet-20 (batch 128) profiled, and ResNet-50 with --deterministic"
timeout 30 .device/resnet --devices cuda:0 --depth 20 --batch-per-device 128 --iters 33 --train-images 256 \
    --heldout-images 0 --quiet --profile >"$out/profile20.txt" 2>&1 || status=1
head -14 "$out/profile20.txt"
timeout 60 .device/resnet --devices cuda:0 --depth 50 --image-size 224 --batch-per-device 64 --classes 10 \
    --iters 33 --train-images 128 --heldout-images 0 --quiet --deterministic || status=1

echo "== 2d. NCCL (issue 13): 64 MiB all-reduce; ResNet-50 through the NCCL path vs plain"
timeout 30 .device/nccl-bandwidth 64 20 || status=1
for flag in "" --collectives-on-one-device "" --collectives-on-one-device; do
    timeout 60 .device/resnet --devices cuda:0 --depth 50 --image-size 224 --batch-per-device 64 --classes 10 \
        --iters 33 --train-images 128 --heldout-images 0 --quiet $flag | sed "s/^/[${flag:-plain}] /" || status=1
done

echo "== 3. dpm vs PyTorch (FP32, cudnn.benchmark)"
timeout 150 python3 benches/gpu_vs_torch.py .device/resnet 30 2 || status=1

echo "== 4. where PyTorch's ResNet-50 step goes"
timeout 90 python3 benches/torch_gpu_profile.py 5 || status=1

echo "== device-check: $([[ $status == 0 ]] && echo PASSED || echo FAILED)"
exit $status
