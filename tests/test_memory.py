"""Memory (issue 21): mixed precision holds frozen weights in bf16; clo.training_bytes, which clo prints before any
weight loads, is the storage a training step really allocates (parameters, gradients, AdamW state); merged/ is
written in the checkpoint's own dtype; the README's memory table is the function's."""
import copy
import ctypes
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import clo
import data as D
import model as M
import tiny
from conftest import ROOT
from test_clo import PARALLEL

sys.path.insert(0, os.path.join(ROOT, "bench"))
import memory  # noqa: E402

transformers = pytest.importorskip("transformers")
MIB = 2 ** 20


def stored(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (a tied weight, or grads in one flat buffer, counted once)."""
    sizes = {}
    for t in tensors:
        t = getattr(t, "_local_tensor", t)  # an FSDP shard: this rank's part
        sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(sizes.values())


def allocated(model, optimizer) -> dict[str, int]:
    params = list(model.parameters())
    state = [v for p in params for v in optimizer.state.get(p, {}).values()]
    return {"weights": stored(params), "gradients": stored(p.grad for p in params if p.grad is not None),
            "optimizer": stored(state)}


def one_step(model, tok, dtype):
    """One forward, backward and AdamW step on two pairs, as clo.train takes it."""
    pairs, _ = D.tokenize_pairs(D.build_pairs(PARALLEL[:2], ["ko"]), tok, 256)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    model.train()
    with clo.autocast("cpu", dtype):
        logp, _ = clo.sequence_logps(model, D.collate(pairs, tok.pad_id, 256), 2 * len(pairs))
    logp.sum().backward()
    optimizer.step()
    return optimizer


def load_as_clo(folder, tune, dtype, out):
    """clo.load_policy and set_trainable, as clo.main calls them; returns (model, tokenizer, the lines logged)."""
    args = clo.parse_args(["--model", folder, "--lang", "ko", "--tune", tune, "--dtype", dtype, "--out", out])
    lines = []
    run = clo.Run(out, clo.Dist(), lines.append, {}, model_folder=folder)
    model, tok = clo.load_policy(args, run)
    clo.set_trainable(model, tune, args.lora_targets, args.lora_r, args.lora_alpha, 0.0)
    return model, tok, lines


def printed(lines) -> dict[str, float]:
    """The memory line's figures, in bytes, to their printed precision: {name: (bytes, unit)}."""
    line = next(l for l in lines if l.startswith("memory"))
    found = re.findall(r"(weights|gradients|AdamW state) ([\d.]+) (GiB|MiB)", line)
    return {name: (float(v) * (2 ** 30 if unit == "GiB" else MIB), 2 ** 30 if unit == "GiB" else MIB)
            for name, v, unit in found}


@pytest.fixture(scope="module")
def qwen_tied(tmp_path_factory):  # biases on q/k/v (1-D, held in fp32) and a tied embedding (counted once)
    return tiny.make_llama(str(tmp_path_factory.mktemp("qwen")), model_type="qwen2", tie=True, seed=1)


@pytest.mark.parametrize("tune", ["lora", "attn", "full"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_training_bytes_are_what_a_step_allocates(qwen_tied, tmp_path, tune, dtype):
    model, tok, lines = load_as_clo(qwen_tied, tune, dtype, str(tmp_path))
    for name, p in model.named_parameters():  # mixed precision: fp32 only where it trains (and 1-D)
        fp32 = dtype == "float32" or p.requires_grad or p.dim() == 1
        assert p.dtype == (torch.float32 if fp32 else torch.bfloat16), name
    expected = clo.training_bytes(M.LlamaConfig.from_hf(json.load(open(f"{qwen_tied}/config.json"))), tune, dtype)
    assert allocated(model, one_step(model, tok, dtype)) == expected
    for (figure, unit), exact in zip(printed(lines).values(), expected.values()):
        assert abs(figure - exact) <= 0.05 * unit + 1e-9 * exact, (lines, expected)  # printed to 0.1 MiB


def test_bf16_lora_holds_at_most_055x_of_fp32_tiny_and_mid_size(tmp_path):
    """The issue's proof: parameter + optimizer bytes of a LoRA run under bf16 are <= 0.55x those under fp32 (the old
    code: 1.0x, every weight in fp32), on a 5M-parameter model (21 MB in fp32) and a 50M-parameter one (201 MB), and
    are the figures clo prints. (Each adapter parameter costs 12 bytes in both precisions, fp32 weight and two
    moments, so the ratio nears 0.5 as adapters shrink next to the base: 2.4% of it here, 0.25% in Llama-2-7B; the
    64-wide test model's r=16 adapters are 10% of it, and its ratio 0.63.)"""
    shapes = {"tiny": dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
                           num_key_value_heads=4),
              "mid": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
                          num_key_value_heads=4)}
    for size, shape in shapes.items():
        folder = tiny.make_llama(str(tmp_path / size), **shape)
        held = {}
        for dtype in ("bfloat16", "float32"):
            model, tok, lines = load_as_clo(folder, "lora", dtype, str(tmp_path / dtype))
            b = allocated(model, one_step(model, tok, dtype))
            held[dtype] = b["weights"] + b["optimizer"]
            shown = printed(lines)
            assert abs(shown["weights"][0] + shown["AdamW state"][0] - held[dtype]) <= 0.1 * MIB + 0.01 * held[dtype]
            del model
        assert held["bfloat16"] <= 0.55 * held["float32"], (size, held)
    assert held["float32"] > 200e6  # the mid-size model really is a few hundred MB


def test_fsdp_shards_are_what_training_bytes_says_per_rank(qwen_tied, tmp_path):
    """Two gloo ranks, FSDP2 as clo.wrap_for_training shards it, bf16 mixed precision (fp32 trained tensors beside
    bf16 frozen ones in one unit: FSDP2 asks only the trained ones to share a dtype), attn and LoRA: each rank's
    storage after a step is training_bytes(shards=2)."""
    script = tmp_path / "fsdp.py"
    script.write_text(f"""import json, os, sys
sys.path[:0] = [{ROOT!r}, {os.path.join(ROOT, "tests")!r}]
import torch, clo, model as M, test_memory as T
torch.distributed.init_process_group("gloo")
out = {{}}
for tune in ("attn", "lora"):
    model, tok, lines = T.load_as_clo({qwen_tied!r}, tune, "bfloat16", {str(tmp_path)!r})
    args = clo.parse_args(["--model", "m", "--lang", "ko", "--fsdp", "--device", "cpu"])
    clo.wrap_for_training(model, args, clo.Dist(torch.distributed.get_rank(), 2))
    out[tune] = T.allocated(model, T.one_step(model, tok, "bfloat16"))
if torch.distributed.get_rank() == 0:
    print("RESULT", json.dumps(out))
torch.distributed.destroy_process_group()
""")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script)], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    got = json.loads(r.stdout.split("RESULT ", 1)[1].splitlines()[0])
    cfg = M.LlamaConfig.from_hf(json.load(open(f"{qwen_tied}/config.json")))
    for tune in ("attn", "lora"):
        assert got[tune] == clo.training_bytes(cfg, tune, "bfloat16", shards=2), tune
        assert got[tune]["weights"] < clo.training_bytes(cfg, tune, "bfloat16")["weights"] * 0.55


def test_readme_memory_table_is_the_functions_and_the_shapes_are_the_releases():
    for name, (fields, count) in memory.PAPER_MODELS.items():
        with torch.device("meta"):
            shape = M.LlamaForCausalLM(M.LlamaConfig.from_hf(fields))
        assert sum(p.numel() for p in shape.parameters()) == count, name  # a typo in a field would change it
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert memory.table() in readme
    assert "python bench/memory.py" in readme


def with_dtype(src, dst, dtype):
    """A copy of checkpoint `src` stored in `dtype`, its config saying so: how bf16 and fp16 releases ship."""
    shutil.copytree(src, dst)
    state = load_file(os.path.join(dst, "model.safetensors"))
    save_file({k: v.to(dtype) for k, v in state.items()}, os.path.join(dst, "model.safetensors"), {"format": "pt"})
    config = json.load(open(os.path.join(dst, "config.json")))
    config["dtype"] = str(dtype).removeprefix("torch.")
    json.dump(config, open(os.path.join(dst, "config.json"), "w"))
    return str(dst)


@pytest.mark.parametrize("tune, source_dtype, tolerance", [("attn", torch.bfloat16, 0.2), ("lora", torch.float16, 0.1)])
def test_merged_is_in_the_checkpoints_dtype_and_gives_the_trained_logits(llama_dir, tmp_path, monkeypatch, tune,
                                                                         source_dtype, tolerance):
    """merged/ of a bf16 mixed-precision run (the old code wrote fp32, twice the release's size, under a config that
    named the release's dtype): every tensor in the source's dtype, frozen ones bit-identical to the source's (an
    fp16 release is not rounded through the bf16 copy training held), config dtype saying it; transformers loads it
    and computes the trained model's fp32 logits to the dtype's rounding (bf16: test_dtype.py's 0.2)."""
    source = with_dtype(llama_dir, tmp_path / "source", source_dtype)
    par = tmp_path / "par.jsonl"
    par.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in PARALLEL))
    ids = torch.tensor([[1, 5, 9, 30, 70, 120, 200, 4]])
    trained = {}
    real = clo.save_merged

    def spy(folder, model, src, *rest):  # the trained model as it is in memory, computed in exact fp32
        with torch.no_grad():
            trained["logits"] = copy.deepcopy(model).float()(ids)
        real(folder, model, src, *rest)
    monkeypatch.setattr(clo, "save_merged", spy)
    out = tmp_path / "run"
    clo.main(["--model", source, "--translations", str(par), "--lang", "ko", "--tune", tune, "--merge",
              "--dtype", "bfloat16", "--max-steps", "3", "--lr", "1e-2", "--batch-size", "2", "--grad-accum", "1",
              "--no-progress", "--out", str(out)])
    merged, original = load_file(str(out / "merged" / "model.safetensors")), load_file(f"{source}/model.safetensors")
    assert merged.keys() == original.keys()
    changed = {k for k in merged if not torch.equal(merged[k], original[k])}
    assert changed == {k for k in merged if any(f".{t}_proj." in k for t in "qkvo")}  # the trained ones, only
    assert {t.dtype for t in merged.values()} == {source_dtype}
    name = str(source_dtype).removeprefix("torch.")
    assert json.load(open(out / "merged" / "config.json"))["dtype"] == name
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(out / "merged")).eval()
    assert theirs.dtype == source_dtype
    with torch.no_grad():
        logits = theirs(ids).logits.float()[0]
        base = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()(ids).logits[0]
    assert (trained["logits"] - base).abs().max() > 5 * tolerance  # training changed the logits beyond the tolerance
    assert (logits - trained["logits"]).abs().max() < tolerance


def test_a_float32_run_on_a_bf16_release_keeps_its_fp32_update_in_merged(llama_dir, tmp_path, monkeypatch):
    """--dtype float32 names merged/'s dtype (issue 21: "the checkpoint's own dtype (or the one --dtype names)"): an
    attn run at the default lr on a bf16 release trains fp32 Q/K/V/O whose update is mostly below bf16's resolution;
    the old code rounded merged/ to bf16 (8 default steps on the tiny model: 96% of each trained tensor's entries
    unchanged, 98% of the update lost) and then deleted the checkpoint, so the fp32 result existed nowhere. merged/ is fp32 throughout
    (the frozen tensors are the release's, widened exactly), config.json saying so."""
    source = with_dtype(llama_dir, tmp_path / "source", torch.bfloat16)
    par = tmp_path / "par.jsonl"
    par.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in PARALLEL))
    trained, real = {}, clo.save_merged

    def spy(folder, model, *rest):
        trained.update({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        real(folder, model, *rest)
    monkeypatch.setattr(clo, "save_merged", spy)
    out = tmp_path / "run"
    clo.main(["--model", source, "--translations", str(par), "--lang", "ko", "--dtype", "float32", "--max-steps", "4",
              "--batch-size", "2", "--grad-accum", "1", "--no-progress", "--out", str(out)])
    merged, original = load_file(str(out / "merged" / "model.safetensors")), load_file(f"{source}/model.safetensors")
    assert {t.dtype for t in merged.values()} == {torch.float32}
    assert json.load(open(out / "merged" / "config.json"))["dtype"] == "float32"
    assert trained and all(torch.equal(merged[k], t) for k, t in trained.items())
    assert all(torch.equal(merged[k], original[k].float()) for k in merged if k not in trained)


@pytest.mark.parametrize("tune", ["lora", "attn"])
def test_bf16_reference_is_the_policys_step0_forward_bitwise(qwen_tied, tmp_path, tune):
    """clo.reference_logps on the bf16-held model and the policy's first training forward (adapters or fp32 Q/K/V/O
    in place, train mode, autocast) give the same log-probs bit for bit on the same batch: pair loss log 2 exactly.
    (Across differently shaped batches bf16 rounding moves it by < 1e-3: tests/test_dtype.py.)"""
    args = clo.parse_args(["--model", qwen_tied, "--lang", "ko", "--tune", tune, "--dtype", "bfloat16",
                           "--out", str(tmp_path)])
    run = clo.Run(str(tmp_path), clo.Dist(), lambda *a: None, {}, model_folder=qwen_tied)
    model, tok = clo.load_policy(args, run)
    pairs, _ = D.tokenize_pairs(D.build_pairs(PARALLEL, ["ko"]), tok, 256)
    ref = clo.reference_logps(model, pairs, len(pairs), tok.pad_id, "cpu", False, pack_to=256, dtype="bfloat16")
    clo.set_trainable(model, tune, args.lora_targets, args.lora_r, args.lora_alpha, 0.0)
    model.train()
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i].prompt) + len(pairs[i].chosen))  # the pass's order
    with clo.autocast("cpu", "bfloat16"):
        logp, _ = clo.sequence_logps(model, D.collate([pairs[i] for i in order], tok.pad_id, 256), 2 * len(pairs))
    assert logp.requires_grad
    assert torch.equal(logp[:len(pairs)], ref[order, 0]) and torch.equal(logp[len(pairs):], ref[order, 1])


HEAP_PROBE = """
import ctypes, sys
import torch
sys.path.insert(0, {root!r})
import clo
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "set":
    clo.return_freed_memory_to_os()
big = torch.empty(16 << 20, dtype=torch.uint8)
del big                     # a large free: glibc's own threshold rises past 16 MiB
mapped = libc.mallinfo2().hblkhd
kept = torch.empty(int(sys.argv[2]) << 20, dtype=torch.uint8)
print(libc.mallinfo2().hblkhd - mapped)  # bytes of the argv[2] MiB tensor that got their own mapping
"""


def heap_probe(mode, env=None, mib=4):
    if not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("not glibc >= 2.33 (no mallinfo2 to read the heap with)")
    out = subprocess.run([sys.executable, "-c", HEAP_PROBE.format(root=ROOT), mode, str(mib)], capture_output=True,
                         text=True, env={**os.environ, **(env or {})}, timeout=120)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


def test_cpu_training_returns_freed_tensors_to_the_os():
    """glibc's default: after a 16 MiB free, a 4 MiB tensor comes from the heap (0 bytes mapped), where its memory stays
    when it is freed: the fragmentation that doubled clo's peak RSS. return_freed_memory_to_os maps it on its own
    (>= 4 MiB mapped), so freeing it returns it. A 2 MiB one stays in the heap: the threshold is 3 MiB, not 1 MiB,
    because each mapping costs page faults (README, Measured: 1 MiB ran 1.85-2.44x TRL, 3 MiB 2.38-2.56x, at
    0.35x and 0.41x of its peak RSS). MALLOC_MMAP_THRESHOLD_ set by the user is left as the user set it."""
    assert heap_probe("default") == 0
    assert heap_probe("set") >= 4 << 20
    assert heap_probe("set", mib=2) == 0
    assert heap_probe("set", {"MALLOC_MMAP_THRESHOLD_": str(64 << 20)}) == 0


def test_the_heap_rule_keeps_a_glibc_tunables_mmap_threshold():
    """GLIBC_TUNABLES=glibc.malloc.mmap_threshold=N is glibc's documented form of MALLOC_MMAP_THRESHOLD_ (the older
    alias): the user's own choice as well, so clo leaves it as set (the old code overrode it with 1 MiB)."""
    assert heap_probe("set", {"GLIBC_TUNABLES": f"glibc.malloc.mmap_threshold={64 << 20}"}) == 0


def test_a_cpu_training_run_sets_the_heap_rule(llama_dir, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(clo, "return_freed_memory_to_os", lambda: calls.append(True))
    par = tmp_path / "par.jsonl"
    par.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in PARALLEL))
    clo.main(["--model", llama_dir, "--translations", str(par), "--lang", "ko", "--max-steps", "1", "--device", "cpu",
              "--no-progress", "--out", str(tmp_path / "run")])
    assert calls == [True]


def test_merged_of_a_tied_checkpoint_that_stores_only_lm_head(qwen_tied, tmp_path):
    """A tied checkpoint may store its one matrix as lm_head.weight (load_weights fills the tied parameter from it);
    save_merged looked up model.embed_tokens.weight in the source and raised KeyError after training. merged/ now
    stores it under the embedding's name, and transformers loads it and computes the trained model's logits."""
    source = tmp_path / "source"
    shutil.copytree(qwen_tied, source)
    state = load_file(source / "model.safetensors")
    state["lm_head.weight"] = state.pop("model.embed_tokens.weight")
    save_file(state, source / "model.safetensors", {"format": "pt"})
    model, _ = M.load_model(str(source))
    clo.set_trainable(model, "full", clo.ATTENTION_PROJECTIONS, 16, 32.0, 0.0)
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(0.01)  # a trained change to the tied matrix
        ids = torch.tensor([[1, 5, 9, 30, 70, 120, 200, 4]])
        ours = model(ids)
    clo.save_merged(str(tmp_path / "merged"), model, model.source, "float32")
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    assert "lm_head.weight" not in merged and torch.equal(merged["model.embed_tokens.weight"],
                                                           model.model.embed_tokens.weight)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    with torch.no_grad():
        assert (theirs(ids).logits - ours).abs().max() < 1e-4
