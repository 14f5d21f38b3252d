"""Where a PyTorch training step of the peer's ResNet-50 (224 px, batch 64, FP32,
cudnn.benchmark) spends its GPU time, by kernel family: to set beside dpm's own
`--profile` of the same step (examples/resnet.rs). Usage:
python3 benches/torch_gpu_profile.py [STEPS]"""
import collections, os, sys
import torch, torch.nn.functional as F
from torch.profiler import profile, ProfilerActivity

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_resnet_gpu as peer  # the peer's own model, unchanged


def family(kernel):
    k = kernel.lower()
    for name, keys in [("convolution", ["conv", "cudnn", "sm90_xmma", "implicit", "winograd", "fft", "gemm"]),
                       ("batch norm", ["batch_norm", "bn_", "batchnorm", "welford"]),
                       ("optimizer", ["foreach", "multi_tensor", "sgd"]),
                       ("relu / add", ["relu", "threshold", "add", "clamp"])]:
        if any(x in k for x in keys):
            return name
    return "other"


def main():
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    m = peer.resnet50(10).cuda()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(64, 3, 224, 224, device="cuda"); y = torch.randint(0, 10, (64,), device="cuda")

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(m(x), y).backward(); opt.step()
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    by = collections.Counter()
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if t and e.key and not e.key.startswith("ProfilerStep"):
            by[family(e.key)] += t
    total = sum(by.values())
    print(f"PyTorch ResNet-50 GPU time per step: {total / 1e3 / steps:.2f} ms")
    for k, v in by.most_common():
        print(f"  {k:<14} {v / 1e3 / steps:8.2f} ms  {100 * v / total:5.1f}%")
    for key in ["self_device_time_total", "self_cuda_time_total"]:
        try:
            print(prof.key_averages().table(sort_by=key, row_limit=12, max_name_column_width=70))
            break
        except Exception:  # the name changed across PyTorch versions
            continue


if __name__ == "__main__":
    main()
