"""clo.py under torchrun: 2 CPU processes with gloo give the same adapter as one process with the same global batch;
rank 0 alone translates; a rank that dies ends the job, bounded in time."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import tiny
from conftest import ROOT
from test_clo import PARALLEL

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")


def torchrun(*argv, nproc=2, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           os.path.join(ROOT, "clo.py"), "--no-progress", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600, **kw)


def single(*argv):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "clo.py"), "--no-progress", *argv], capture_output=True,
                       text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    par = tmp / "parallel.jsonl"
    rows = [{k: f"{v} ({i})" for k, v in r.items()} for i in range(4) for r in PARALLEL]  # 12 items, 24 pairs
    par.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return tmp, tiny.make_llama(str(tmp / "llama")), str(par)


@pytest.mark.parametrize("tune,engine", [("lora", "DDP"), ("attn", "DDP"), ("lora", "FSDP")])
def test_two_ranks_equal_one_process_with_the_same_global_batch(setup, tune, engine):
    tmp, llama, par = setup
    common = ["--model", llama, "--translations", par, "--lang", "ko", "--max-steps", "4", "--grad-accum", "2",
              "--lr", "1e-3", "--tune", tune, "--warmup", "1", "--dtype", "float32"]  # fp32: exact comparisons
    single(*common, "--batch-size", "4", "--out", str(tmp / f"one-{tune}"))
    r = torchrun(*common, "--batch-size", "2", "--out", str(tmp / f"two-{tune}"),
                 *(["--fsdp"] if engine == "FSDP" else []))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"2 ranks ({engine})" in r.stdout
    name = "adapter_model.safetensors" if tune == "lora" else "merged/model.safetensors"
    a, b = load_file(str(tmp / f"one-{tune}" / name)), load_file(str(tmp / f"two-{tune}" / name))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-5), (k, (a[k] - b[k]).abs().max())
    one = [json.loads(l) for l in open(tmp / f"one-{tune}" / "metrics.jsonl")]
    two = [json.loads(l) for l in open(tmp / f"two-{tune}" / "metrics.jsonl")]
    for x, y in zip(one, two):
        for key in ("loss", "nll", "pair_loss", "margin"):
            assert x[key] == pytest.approx(y[key], abs=1e-4), key
        if x["step"] > 1:  # at step 1 every margin is 0 up to float noise, and its sign is noise too
            assert x["reward_acc"] == pytest.approx(y["reward_acc"]), x["step"]


def test_bf16_mixed_precision_under_fsdp(setup):
    """--dtype bfloat16 --fsdp --tune attn: each sharded layer holds fp32 Q/K/V/O beside bf16 frozen weights (FSDP2
    asks one dtype of the trained parameters only). The same run as one process, up to bf16 rounding of differently
    shaped batches (see test_dtype.py: 0.3% of a loss); each rank says its share of the memory."""
    tmp, llama, par = setup
    common = ["--model", llama, "--translations", par, "--lang", "ko", "--max-steps", "4", "--grad-accum", "2",
              "--lr", "1e-3", "--tune", "attn", "--warmup", "1", "--dtype", "bfloat16"]
    single(*common, "--batch-size", "4", "--out", str(tmp / "one-bf16"))
    r = torchrun(*common, "--batch-size", "2", "--out", str(tmp / "two-bf16"), "--fsdp")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 ranks (FSDP)" in r.stdout and "memory per rank: weights" in r.stdout
    source = load_file(os.path.join(llama, "model.safetensors"))
    a = load_file(str(tmp / "one-bf16" / "merged/model.safetensors"))
    b = load_file(str(tmp / "two-bf16" / "merged/model.safetensors"))
    for k in a:  # Adam's first steps are ~lr * sign(gradient): bf16 noise flips the sign of the smallest entries, so
        # the updates agree as wholes (measured 2-3.4% apart), not entry by entry; frozen tensors not at all moved
        one, two = a[k] - source[k], b[k] - source[k]
        assert (one - two).norm() <= 0.1 * one.norm(), (k, (one - two).norm() / one.norm())
        assert one.abs().max() > 0 if ".self_attn." in k else two.abs().max() == 0, k
    one = [json.loads(l) for l in open(tmp / "one-bf16" / "metrics.jsonl")]
    two = [json.loads(l) for l in open(tmp / "two-bf16" / "metrics.jsonl")]
    for x, y in zip(one, two):
        assert x["loss"] == pytest.approx(y["loss"], rel=3e-3)


@pytest.mark.parametrize("engine", ["DDP", "FSDP"])
def test_resume_under_torchrun_is_bitwise_with_dropout(setup, engine):
    """Each rank's own random state is checkpointed (issue 19.1: rank 0's alone, reloaded by every rank, left the
    dropout masks of rank 1 different after resume: 1.66e-3 away)."""
    tmp, llama, par = setup
    common = ["--model", llama, "--translations", par, "--lang", "ko", "--max-steps", "3", "--batch-size", "2",
              "--grad-accum", "2", "--lr", "1e-3", "--lora-dropout", "0.1", "--tune", "lora"] + (["--fsdp"] if engine == "FSDP" else [])
    straight, resumed = tmp / f"straight-{engine}", tmp / f"resumed-{engine}"
    assert torchrun(*common, "--out", str(straight)).returncode == 0
    killed = torchrun(*common, "--out", str(resumed), "--stop-after", "1")
    assert killed.returncode == 0 and "stopped after step 1 of 3" in killed.stdout, killed.stderr
    if engine == "DDP":  # a checkpoint of 2 ranks is refused by 1, in one line naming the number of ranks
        one = subprocess.run([sys.executable, os.path.join(ROOT, "clo.py"), "--no-progress", *common, "--out",
                              str(resumed), "--resume"], capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert one.returncode != 0 and "2 ranks, now 1" in one.stderr and len(one.stderr.strip().splitlines()) == 1
    r = torchrun(*common, "--out", str(resumed), "--resume")
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr
    a = load_file(str(straight / "adapter_model.safetensors"))
    b = load_file(str(resumed / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), (k, (a[k] - b[k]).abs().max())


def test_rank0_translates_once_for_all(setup):
    tmp, llama, _ = setup
    m2m = tiny.make_m2m100(str(tmp / "m2m"), seed=0)
    out = tmp / "translated"
    r = torchrun("--model", llama, "--translator", m2m, "--lang", "ko,sw", "--num-samples", "4", "--out", str(out),
                 "--max-steps", "1", "--batch-size", "1", "--grad-accum", "1", "--num-beams", "1", "--max-len", "8192",
                 "--keep-flagged")  # a random translator's output is flagged degenerate
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("translating 4 items to ko") == 1  # rank 0 only
    keys = [json.loads(l)["key"] for l in open(out / "translations.jsonl")]
    assert len(keys) == 8 == len(set(keys))


def test_a_dead_rank_ends_the_job(setup):
    tmp, llama, par = setup
    out = tmp / "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "clo.py"), "--no-progress", "--model", llama, "--translations", par, "--lang", "ko",
           "--max-steps", "100000", "--batch-size", "1", "--grad-accum", "1", "--out", str(out)]
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.5)
    assert (out / "metrics.jsonl").exists(), "training never started"
    ranks = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True).stdout.split()
    assert len(ranks) == 2
    os.kill(int(ranks[1]), signal.SIGKILL)
    killed_at = time.time()
    try:
        _, err = job.communicate(timeout=90)
    finally:
        job.kill()
    assert job.returncode != 0 and time.time() - killed_at < 90
    assert "Signal 9" in err or "SIGKILL" in err or "exitcode" in err


def test_eval_generation_split_across_ranks(setup):
    tmp, llama, par = setup
    args = [os.path.join(ROOT, "eval.py"), "--no-progress", "--models", f"base={llama}", "--langs", "ko",
            "--num-prompts", "3", "--max-new-tokens", "6", "--heldout", par, "--dtype", "float32"]
    # fp32: exact comparisons (auto picks bf16 on a CPU with AMX, where 2 threads and 1 round near-ties differently)
    one = subprocess.run([sys.executable, *args, "--out", str(tmp / "eval1")], capture_output=True, text=True,
                         cwd=ROOT)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          *args, "--out", str(tmp / "eval2")], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr
    a = json.load(open(tmp / "eval1" / "results.json"))
    b = json.load(open(tmp / "eval2" / "results.json"))
    assert a["answers"] == b["answers"] and len(a["answers"]["base"]) == 6
    assert a["results"] == b["results"]
    assert two.stdout.count("| base |") == 1  # one table, from rank 0
