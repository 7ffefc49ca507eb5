"""Training speed and peak memory of clo's CLO step against TRL's DPOTrainer + PEFT LoRA on the same pairs.

    pip install -r requirements-bench.txt
    python bench/train.py MODEL [--pairs 12] [--batch 4] [--steps 3] [--max-len 512]

Both sides: the same preference pairs (real German/Korean data from samples/mtbench_parallel_en_de_ko.jsonl, built into
CLO pairs), LoRA r=16 alpha=32 on q,k,v,o, --batch pairs per step, on CPU, loss = (1 - lam) * sigmoid DPO
+ lam * NLL (TRL: loss_type ["sigmoid", "sft"], whose NLL covers every chosen response; clo's covers target-language
ones: the same amount of compute). Both in fp32, or both in bf16 (--dtype bfloat16: clo.py's mixed precision; TRL's
bf16=True on the model loaded in bf16, PEFT's adapters in fp32); activation checkpointing is the same on both sides
(--grad-checkpoint; TRL's own default is on). Each side runs in its own process so that peak RSS is its own. Reference
log-probs are part of the timed work on both sides. Also measures this machine's matmul rate (in --dtype) in the same
run, and clo's achieved rate: the matmul FLOPs it performed (counted by torch's FlopCounterMode, so LoRA's frozen
weights get no weight-gradient FLOPs and the output projection counts only the scored positions; attention kernels are
not counted) over its wall time.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data as D  # noqa: E402
import model as M  # noqa: E402

BETA, LAM = 0.1, 0.5


def make_pairs(n):
    rows = D.read_jsonl(os.path.join(ROOT, "samples", "mtbench_parallel_en_de_ko.jsonl"))
    return D.build_pairs(rows, ["de", "ko"])[:n]


def matmul_gflops(dtype=torch.float32, seconds=3.0):
    """The machine's matmul rate in dtype: the best of repeated 2048 x 2048 products over a few seconds."""
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * 2048 ** 3 / (time.perf_counter() - t) / 1e9)
    return best


def run_ours(model_path, n, batch, steps, max_len, grad_checkpoint, dtype):
    import clo
    from torch.utils.flop_counter import FlopCounterMode
    model, tok = M.load_model(model_path, dtype, "cpu", clo.float32_weights("lora", dtype))  # clo.py's --dtype
    pairs, _ = D.tokenize_pairs(make_pairs(n), tok, max_len)
    n = len(pairs)  # pairs whose prompt does not fit max_len are dropped
    if not n:
        sys.exit(f"no pair fits --max-len {max_len}: raise it")
    t0 = time.perf_counter()
    with FlopCounterMode(display=False) as flops:  # counts each matmul's FLOPs from its shapes; negligible overhead
        ref = clo.reference_logps(model, pairs, batch, tok.pad_id, "cpu", progress=False, pack_to=max_len, dtype=dtype)
        clo.return_freed_memory_to_os()  # where clo.train sets it on CPU: after the reference pass
        M.apply_lora(model, clo.ATTENTION_PROJECTIONS, 16, 32.0, dtype=torch.float32)
        model.gradient_checkpointing = grad_checkpoint
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        model.train()
        for step in range(steps):
            idx = [(step * batch + i) % n for i in range(batch)]
            B = len(idx)
            rows = D.collate([pairs[i] for i in idx], tok.pad_id, max_len)
            with clo.autocast("cpu", dtype):
                chosen, rejected = clo.sequence_logps(model, rows, 2 * B)[0].float().chunk(2)  # chosen first
            parts = clo.clo_loss(chosen, rejected, ref[idx, clo.CHOSEN], ref[idx, clo.REJECTED],
                                 torch.tensor([float(len(pairs[i].chosen)) for i in idx]),
                                 torch.tensor([float(pairs[i].in_target_lang) for i in idx]), BETA, LAM)
            opt.zero_grad()
            parts.loss.backward()
            opt.step()
    return time.perf_counter() - t0, flops.get_total_flops()


def run_trl(model_path, n, batch, steps, max_len, grad_checkpoint, dtype, trl_defaults=False):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=M.DTYPES[dtype])  # PEFT: adapters in fp32
    rows = [{"prompt": [{"role": "user", "content": p["prompt"]}],
             "chosen": [{"role": "assistant", "content": p["chosen"]}],
             "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in make_pairs(n)]
    out = tempfile.mkdtemp()
    cfg = DPOConfig(output_dir=out, per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-4, beta=BETA,
                    loss_type=["sigmoid", "sft"], loss_weights=[1 - LAM, LAM], max_length=max_len,
                    logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
                    precompute_ref_log_probs=False,
                    **({} if trl_defaults else {"bf16": dtype == "bfloat16",
                                                "gradient_checkpointing": grad_checkpoint}))
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                      "o_proj"],
                                                task_type="CAUSAL_LM"))
    t0 = time.perf_counter()
    trainer.train()
    return time.perf_counter() - t0, None


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--pairs", type=int, default=12, help="distinct pairs (the reference pass scores them all)")
    p.add_argument("--batch", type=int, default=4, help="pairs per optimizer step")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--grad-checkpoint", action="store_true", help="activation checkpointing on both sides (TRL's "
                   "default; without it both keep every activation)")
    p.add_argument("--trl-defaults", action="store_true", help="leave TRL's own defaults (bf16 autocast, "
                   "activation checkpointing) instead of matching clo's settings")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="both sides: bfloat16 is "
                   "clo.py's --dtype bfloat16 (frozen weights bf16, bf16 autocast) and TRL's bf16=True on a bf16 model")
    p.add_argument("--which", choices=("ours", "trl"), default=None, help="run one side alone in this process and "
                   "print its JSON (for timing each side as a whole process)")
    a = p.parse_args()
    if a.which:
        run = run_ours if a.which == "ours" else run_trl
        seconds, flops = run(a.model, a.pairs, a.batch, a.steps, a.max_len, a.grad_checkpoint, a.dtype,
                             *([a.trl_defaults] if a.which == "trl" else []))
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"seconds": seconds, "flops": flops, "peak_mb": peak_mb}))
        return
    results = {}
    for which in ("ours", "trl"):
        r = subprocess.run([sys.executable, __file__, a.model, "--pairs", str(a.pairs), "--batch", str(a.batch),
                            "--steps", str(a.steps), "--max-len", str(a.max_len), "--which", which, "--dtype", a.dtype]
                           + (["--grad-checkpoint"] if a.grad_checkpoint else [])
                           + (["--trl-defaults"] if a.trl_defaults else []), capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"{which} failed:\n{r.stderr[-3000:]}")
        results[which] = json.loads(r.stdout.strip().splitlines()[-1])
    rate = matmul_gflops(M.DTYPES[a.dtype])
    ours, trl = results["ours"], results["trl"]
    pairs = a.batch * a.steps
    achieved = ours["flops"] / ours["seconds"] / 1e9
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {a.dtype}; {a.pairs} pairs, {a.batch} "
          f"pairs/step x {a.steps} steps, max length {a.max_len}, activation checkpointing "
          f"{'on' if a.grad_checkpoint else 'off'} for clo; TRL "
          f"{'with its defaults (bf16 autocast, checkpointing on)' if a.trl_defaults else f'matched ({a.dtype})'}")
    print("| | clo | TRL DPOTrainer + PEFT | ratio |")
    print("|---|---|---|---|")
    print(f"| pairs/s | {pairs / ours['seconds']:.3f} | {pairs / trl['seconds']:.3f} | "
          f"{trl['seconds'] / ours['seconds']:.2f}x |")
    print(f"| wall time (s) | {ours['seconds']:.1f} | {trl['seconds']:.1f} | |")
    print(f"| peak RSS (MB) | {ours['peak_mb']:.0f} | {trl['peak_mb']:.0f} | {ours['peak_mb'] / trl['peak_mb']:.2f} |")
    print(f"\nmachine {a.dtype} matmul: {rate:.1f} GFLOP/s; clo performed {ours['flops'] / 1e12:.2f} TFLOP of matmuls "
          f"(reference pass + {a.steps} steps) at {achieved:.1f} GFLOP/s = {100 * achieved / rate:.0f}% of it")


if __name__ == "__main__":
    main()
