"""Forward+backward of softmax_ce.cross_entropy (mean) in its three gradient paths, timed in
isolation (not interleaved with other implementations as in the benchmark): the gradient formed
in the forward pass (default), formed in the backward (gradient_in_forward(False)), and written
into the logits (inplace_backward=True). Median of 5 steps after one warm-up step.

    python scripts/compare_grad_paths.py 4096x32000 float32 [cpu|cuda]
"""

import statistics
import sys
import time

import torch

import softmax_ce


def main():
    shape = tuple(int(v) for v in sys.argv[1].split("x"))
    dtype = getattr(torch, sys.argv[2])
    device = sys.argv[3] if len(sys.argv) > 3 else "cpu"
    x = (torch.randn(shape) * 2).to(dtype).to(device).requires_grad_()
    t = torch.randint(0, shape[1], (shape[0],) + shape[2:]).to(device)
    x_inplace = x.detach().clone().requires_grad_()

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def step(path):
        xx = x_inplace if path == "inplace" else x
        sync()
        t0 = time.perf_counter()
        with softmax_ce.gradient_in_forward(path == "default"):
            loss = softmax_ce.cross_entropy(xx, t, inplace_backward=path == "inplace")
        sync()
        t1 = time.perf_counter()
        loss.backward()
        xx.grad = None
        sync()
        t2 = time.perf_counter()
        return (t1 - t0) * 1e3, (t2 - t1) * 1e3

    times = {path: [] for path in ("default", "bwd-grad", "inplace")}
    for round_ in range(6):
        for path in times:
            result = step(path)
            if round_:
                times[path].append(result)
    print(f"{shape} {dtype} on {device}: forward / backward / total ms (median of 5)")
    for path, v in times.items():
        fwd = statistics.median(a for a, _ in v)
        bwd = statistics.median(b for _, b in v)
        total = statistics.median(a + b for a, b in v)
        print(f"  {path:9s} {fwd:8.2f} {bwd:8.2f} {total:8.2f}")


if __name__ == "__main__":
    main()
