"""Multiple-choice scoring speed: eval.py against lm-evaluation-harness's HF backend, same items, same checkpoint.

    python bench/mc.py MODEL --bench-dir DIR [--langs sw] [--num-items 40] [--device cpu] [--batch-size 8]

DIR holds the benchmark files as eval.py --bench-dir reads them (tests/test_benchmarks.py write_bench_dir makes a
small one with XCOPA's real files). Both score the same (context, " " + choice) requests, the ones the harness's task
templates build (tests/test_benchmarks.py proves the contexts equal), in float32; only the scoring is timed, the
second of two rounds. Prints a markdown table of seconds and the largest per-choice log-prob difference.
"""
import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)
import eval as E  # noqa: E402
import model as M  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--bench-dir", required=True)
    p.add_argument("--langs", default="sw")
    p.add_argument("--num-items", type=int, default=40)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=8, help="the harness's")
    a = p.parse_args()
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    path = M.resolve_checkpoint(a.model)
    lm = HFLM(pretrained=path, dtype="float32", device=a.device, batch_size=a.batch_size)
    model, tok = M.load_model(path, torch.float32, a.device)
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)
    print("| task | items | harness s | eval.py s | speed-up | max abs log-prob diff |\n|---|---|---|---|---|---|")
    for bench, lang in [(b, l) for b in E.BENCHMARKS for l in a.langs.split(",")]:
        rows = E.subset(E.read_multiple_choice(E.bench_file(bench, lang, a.bench_dir, lang), lang), a.num_items)
        requests = [Instance("loglikelihood", {}, (r["context"], f" {c}"), j) for r in rows for j, c in
                    enumerate(r["choices"])]  # the harness's requests (tests/test_benchmarks.py: same contexts)
        for _ in range(2):  # the second round is timed: warm caches and kernels for both
            sync(), (t0 := time.perf_counter())
            theirs = [ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)]
            sync(), (t_h := time.perf_counter() - t0)
            ours = [x for o in E.choice_logprobs(model, tok, rows, progress=False) for x in o]
            sync(), (t_o := time.perf_counter() - t0 - t_h)
        diff = max(abs(x - y) for x, y in zip(ours, theirs))
        print(f"| {bench} {lang} | {len(rows)} | {t_h:.2f} | {t_o:.2f} | {t_h / t_o:.1f}x | {diff:.1e} |")

if __name__ == "__main__":
    main()
