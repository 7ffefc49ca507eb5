"""Why --dtype auto picks what it picks on this machine: bf16 against fp32 for the two operations that dominate clo.

    python bench/dtype.py [--device cpu|cuda] [--threads N] [--seconds 1.5]

- matmul: a 2048 x 2048 x 2048 product (training's forward and backward are made of these), GFLOP/s.
- matvec: one row of activations times a 4096 x 4096 weight matrix (what batch-1 decoding does for every weight),
  GB/s of weight bytes read: memory-bound, so bf16 should read twice as fast in bytes per token... if the hardware
  converts bf16 natively; otherwise each bf16 weight is widened to fp32 in software first.
Then the CPU's flags (avx512_bf16, amx_bf16, AArch64 bf16), torch's own mkldnn bf16 check, and model.default_dtype's
choice. The best of repeated runs over --seconds each; keep it short on a shared machine.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as M  # noqa: E402


def best_seconds(fn, seconds, sync):
    fn()
    sync()
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seconds", type=float, default=1.5, help="per measurement")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    n, d = 2048, 4096
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        x, y = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
        mm = 2 * n ** 3 / best_seconds(lambda: x @ y, a.seconds, sync) / 1e9
        w, v = torch.randn(d, d, device=dev, dtype=dtype), torch.randn(1, d, device=dev, dtype=dtype)
        mv = w.numel() * w.element_size() / best_seconds(lambda: v @ w.t(), a.seconds, sync) / 1e9
        rows.append((str(dtype).removeprefix("torch."), mm, mv))
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else next(
        (l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?") \
        if os.path.exists("/proc/cpuinfo") else "?"
    print(f"{where}; torch {torch.__version__}, {torch.get_num_threads()} threads, device {dev.type}")
    print("| dtype | 2048^3 matmul GFLOP/s | batch-1 matvec (4096 x 4096) GB/s of weights |")
    print("|---|---|---|")
    for name, mm, mv in rows:
        print(f"| {name} | {mm:.1f} | {mv:.1f} |")
    (_, mm32, mv32), (_, mm16, mv16) = rows
    print(f"bf16 / fp32: matmul {mm16 / mm32:.2f}x, matvec bytes/s {mv16 / mv32:.2f}x "
          f"(tokens/s at batch 1 scale with bytes/s x 2 for bf16: {2 * mv16 / mv32:.2f}x)")
    if dev.type == "cpu":
        flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []
        print("cpuinfo: " + ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in
                                      ("avx512f", "avx512_bf16", "amx_bf16", "bf16")))
        try:
            mk = torch.ops.mkldnn._is_mkldnn_bf16_supported()
        except Exception as e:  # noqa: BLE001
            mk = f"unavailable ({type(e).__name__})"
        print(f"torch.ops.mkldnn._is_mkldnn_bf16_supported(): {mk} (true on any AVX512-F CPU; not used)")
    name, why = M.default_dtype(a.device)
    print(f"--dtype auto picks: {name} ({why})")


if __name__ == "__main__":
    main()
