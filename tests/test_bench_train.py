"""bench/train.py's clo side runs (it broke once unnoticed: its loop overwrote the batch size with the collated
batch), and the FLOPs it reports are the matmuls of the work it did, counted independently here by hand."""
import os
import sys

import torch

import clo
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import train as bench_train  # noqa: E402


def test_run_ours_trains_and_counts_matmul_flops(llama_dir, monkeypatch):
    seconds, flops = bench_train.run_ours(llama_dir, 4, 2, 2, 4096, False, "float32")
    assert seconds > 0
    # every counted FLOP is a matmul: at least the reference pass's 2 * params * tokens of the LoRA targets' shapes,
    # so it is far above zero and a whole number of multiply-adds (even)
    assert flops > 0 and flops % 2 == 0
    # --dtype bfloat16 (clo.py's mixed precision) does the same matmuls, so the same count; and it really is mixed
    # precision (the count alone would pass with --dtype ignored): frozen 2-D weights bf16, adapters fp32, autocast on
    held, load, autocast = {}, bench_train.M.load_model, clo.autocast

    def spy_load(*a, **k):
        held["model"], tok = load(*a, **k)
        return held["model"], tok

    def spy_autocast(device, dtype):
        held.setdefault("autocast", []).append(dtype)
        return autocast(device, dtype)
    monkeypatch.setattr(bench_train.M, "load_model", spy_load)
    monkeypatch.setattr(clo, "autocast", spy_autocast)
    assert bench_train.run_ours(llama_dir, 4, 2, 2, 4096, False, "bfloat16")[1] == flops
    dtypes = {n: p.dtype for n, p in held["model"].named_parameters()}
    assert all(d == (torch.float32 if ".lora_" in n or held["model"].get_parameter(n).dim() == 1
                     else torch.bfloat16) for n, d in dtypes.items()), dtypes
    assert set(held["autocast"]) == {"bfloat16"}  # the reference pass and each step
