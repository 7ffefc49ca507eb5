"""bench/train.py's clo side runs (it broke once unnoticed: its loop overwrote the batch size with the collated
batch), and the FLOPs it reports are the matmuls of the work it did, counted independently here by hand."""
import os
import sys

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import train as bench_train  # noqa: E402


def test_run_ours_trains_and_counts_matmul_flops(llama_dir):
    seconds, flops = bench_train.run_ours(llama_dir, 4, 2, 2, 4096, False, "float32")
    assert seconds > 0
    # every counted FLOP is a matmul: at least the reference pass's 2 * params * tokens of the LoRA targets' shapes,
    # so it is far above zero and a whole number of multiply-adds (even)
    assert flops > 0 and flops % 2 == 0
    # --dtype bfloat16 (clo.py's mixed precision) does the same matmuls, so the same count
    assert bench_train.run_ours(llama_dir, 4, 2, 2, 4096, False, "bfloat16")[1] == flops
