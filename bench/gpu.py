"""The GPU check: bf16 training, decoding and translation on one accelerator, in one run of a few minutes, no
downloads (random weights in the real shapes).

    python bench/gpu.py                  # on a CUDA machine; prints markdown tables, and JSON to --json
    python bench/gpu.py --smoke          # tiny shapes on CPU in seconds: checks that the script runs

1. The device: bf16 matmul rate (8192^3, TFLOP/s) and memory bandwidth (a 1 GiB copy, bytes read + written).
2. Training: a randomly initialised ~0.5B Llama-shaped model (Qwen2.5-0.5B's shape without its biases: 24 layers,
   d 896, 14 heads / 2 KV heads, MLP 4864, vocabulary 151,936, tied), LoRA r=16 on q,k,v,o, CLO's loss on packed
   pairs, AdamW; clo in bf16 mixed precision (--dtype bfloat16: frozen weights bf16, trained ones and AdamW fp32) and in
   fp32 (TF32 off), and transformers + PEFT in bf16 autocast on padded rows (TRL's DPOTrainer runs the same padded
   chosen/rejected forward; TRL itself is not driven here: it needs a dataset and tokenizer pipeline). --tune picks
   the trained weights on both sides: lora (PEFT's LoRA; its base held in bf16, adapters fp32, as TRL + PEFT load it)
   or attn (the full q,k,v,o weights in fp32, everything else frozen). Tokens/s, MFU (6 N per trained token against
   the measured bf16 matmul rate), peak CUDA memory (torch.cuda.max_memory_allocated over weights, reference pass and
   steps; NaN on CPU), and the loss after the steps in bf16 and fp32 (their agreement is the mixed-precision
   tolerance on this hardware).
3. Decoding: greedy, 128 new tokens, batch 1 and 8, bf16 weights and KV cache; clo's generate against transformers'
   generate (same weights, bf16), and batch 1 against the memory-bandwidth limit (weight bytes per token / bandwidth).
4. Translation: an NLLB-200-distilled-600M-shaped M2M100 (random), 16 sentences, beam 4, 24 new tokens; clo bf16
   against transformers bf16, identical outputs counted against transformers bf16 and against clo fp32.
Every comparison with transformers/PEFT is skipped, with a line saying so, where they are not installed.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
import clo  # noqa: E402
import data as D  # noqa: E402
import model as M  # noqa: E402

SHAPES = {  # real: Qwen2.5-0.5B-like decoder, NLLB-600M translator; smoke: tiny, for a CPU check of the script
    "real": dict(llama=dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                            num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                            rope_theta=1000000.0, rms_norm_eps=1e-6),
                 m2m=dict(vocab_size=256206, d_model=1024, encoder_layers=12, decoder_layers=12,
                          encoder_attention_heads=16, decoder_attention_heads=16, encoder_ffn_dim=4096,
                          decoder_ffn_dim=4096),
                 pairs=16, seq=512, steps=5, mm=8192, copy_gib=1.0, new_tokens=128),
    "smoke": dict(llama=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
                  m2m=dict(vocab_size=512, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                           decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64),
                  pairs=4, seq=32, steps=2, mm=256, copy_gib=0.01, new_tokens=8),
}


def timed(fn, device, repeats=3):
    """The best wall time of `repeats` calls after one warm-up call, and the last result."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out = fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best, out


def device_rates(device, s):
    n = s["mm"]
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    sec, _ = timed(lambda: a @ b, device, 5)
    x = torch.empty(int(s["copy_gib"] * 2 ** 30) // 4, device=device)
    y = torch.empty_like(x)
    copy_sec, _ = timed(lambda: y.copy_(x), device, 5)
    return {"bf16_matmul_tflops": 2 * n ** 3 / sec / 1e12, "bandwidth_gbs": 2 * x.numel() * 4 / copy_sec / 1e9}


def random_llama(cfg, device, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    with torch.device(device):
        model = M.LlamaForCausalLM(M.LlamaConfig(**cfg))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.0 * p if "norm" in name else 0.02 * torch.randn_like(p))
    model.reset_rope()
    return model.to(dtype).eval()


def matmul_params(model):
    """Parameters that take part in matmuls (a tied embedding counted once, as the output projection)."""
    n = sum(p.numel() for name, p in model.named_parameters() if "lora_" not in name)
    return n if model.config.tie_word_embeddings else n - model.model.embed_tokens.weight.numel()


def random_pairs(n, seq, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda k: torch.randint(5, vocab, (k,), generator=g).tolist()  # noqa: E731
    P = seq // 4
    return [D.TokenizedPair(rand(P), rand(seq - P), rand(seq - P - 8), i % 2 == 1, i) for i in range(n)]


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device):
    return torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")


def train_clo(cfg, device, pairs, steps, dtype, tune="lora"):
    """clo's training step as clo.train runs it: reference pass, then steps; (tokens/s, peak GiB, last loss)."""
    model = random_llama(cfg, "cpu", M.DTYPES[dtype])  # built on CPU: no passing fp32 copy in the device's peak
    with torch.no_grad():  # held as clo.load_policy holds it: frozen weights in --dtype, trained and 1-D ones in fp32
        for name, p in model.named_parameters():
            if clo.float32_weights(tune, dtype)(name, p):
                p.data = p.data.float()
    reset_peak(device)  # the peak includes the weights
    model.to(device)
    tokens = sum(len(p.prompt) * 2 + len(p.chosen) + len(p.rejected) for p in pairs)
    pack_to = 2 * max(len(p.prompt) + len(p.chosen) for p in pairs)
    ref = clo.reference_logps(model, pairs, len(pairs), 0, device, progress=False, pack_to=pack_to, dtype=dtype)
    clo.set_trainable(model, tune, clo.ATTENTION_PROJECTIONS, 16, 32.0, 0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    batch = [t.to(device) for t in D.collate(pairs, 0, pack_to)]
    B = len(pairs)
    lengths = torch.tensor([float(len(p.chosen)) for p in pairs], device=device)
    in_nll = torch.tensor([float(p.in_target_lang) for p in pairs], device=device)
    r = ref.to(device)

    def step():
        with clo.autocast(device, dtype):
            chosen, rejected = clo.sequence_logps(model, batch, 2 * B)[0].chunk(2)  # collate: chosen first
            parts = clo.clo_loss(chosen, rejected, r[:, clo.CHOSEN], r[:, clo.REJECTED], lengths, in_nll, 0.1, 0.5)
        opt.zero_grad(set_to_none=True)
        parts.loss.backward()
        opt.step()
        return parts.loss.item()

    first = step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    losses = [step() for _ in range(steps)]
    sync()
    sec = (time.perf_counter() - t) / steps
    return {"tokens_per_s": tokens / sec, "peak_gib": peak_gib(device), "loss_first": first, "loss_last": losses[-1],
            "params": matmul_params(model)}


def train_peft(cfg, device, pairs, steps, tune="lora"):
    """transformers (+ PEFT LoRA), bf16 autocast, chosen and rejected as padded rows (TRL's concatenated forward)."""
    import transformers
    from peft import LoraConfig, get_peft_model
    ours = random_llama(cfg, "cpu")
    reset_peak(device)
    # lora: the base in bf16 as TRL + PEFT users load it (adapters stay fp32); attn: fp32, only q,k,v,o trained
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
    hf.load_state_dict(ours.state_dict(), strict=False)
    hf = hf.to(device, torch.bfloat16 if tune == "lora" else torch.float32)
    del ours
    if tune == "lora":
        hf = get_peft_model(hf, LoraConfig(r=16, lora_alpha=32, target_modules=list(clo.ATTENTION_PROJECTIONS)))
    else:
        for name, p in hf.named_parameters():
            p.requires_grad_(any(f".{t}." in name for t in clo.ATTENTION_PROJECTIONS))
    seqs = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
    T = max(map(len, seqs))
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, (s, p) in enumerate(zip(seqs, pairs + pairs)):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
        labels[i, len(p.prompt):len(s)] = torch.tensor(s[len(p.prompt):])
    ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
    B = len(pairs)

    def logps():
        logits = hf(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        lab = labels[:, 1:]
        lp = -torch.nn.functional.cross_entropy(logits.transpose(1, 2), lab.clamp(min=0), reduction="none")
        return (lp * (lab != -100)).sum(-1)

    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        ref = logps()
    opt = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=1e-4)
    hf.train()
    tokens = sum(map(len, seqs))

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            lp = logps()
            margin = 0.1 * ((lp[:B] - ref[:B]) - (lp[B:] - ref[B:]))
            loss = 0.5 * -torch.nn.functional.logsigmoid(margin).mean() + 0.5 * -lp[:B].sum() / (labels[:B] != -100).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    sec, _ = timed(step, device, steps)
    return {"tokens_per_s": tokens / sec, "peak_gib": peak_gib(device)}


def decoding(cfg, device, new_tokens, bandwidth_gbs):
    model = random_llama(cfg, device, torch.bfloat16)
    never = type("NoEos", (), {"eos_ids": [], "pad_id": 0})()
    rows = []
    try:
        import transformers
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).to(device, torch.bfloat16).eval()
        hf.load_state_dict(model.state_dict(), strict=False)
    except ImportError:
        hf = None
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    for B in (1, 8):
        g = torch.Generator().manual_seed(B)
        prompts = [torch.randint(5, cfg["vocab_size"], (32,), generator=g).tolist() for _ in range(B)]
        sec, ours = timed(lambda: M.generate(model, never, prompts, new_tokens), device, 2)
        row = {"batch": B, "clo_tok_s": B * new_tokens / sec}
        if B == 1:
            row["bandwidth_limit_tok_s"] = bandwidth_gbs * 1e9 / weight_bytes
        if hf is not None:
            ids = torch.tensor(prompts, device=device)
            with torch.inference_mode():
                sec_hf, out = timed(lambda: hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                                        max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                                        pad_token_id=0), device, 2)
            row["transformers_tok_s"] = B * new_tokens / sec_hf
            row["same_tokens"] = f"{sum(a == b for a, b in zip(ours, out[:, 32:].tolist()))}/{B}"
        rows.append(row)
    return rows


def translation(cfg, device, new_tokens, tmp):
    import tiny
    from bench.translate import SENTENCES
    tok = tiny.make_tokenizer(tmp, ["<s>", "<pad>", "</s>", "<unk>"], tiny.NLLB_CODES + ["<mask>"])
    full = dict(pad_token_id=1, eos_token_id=2, decoder_start_token_id=2, scale_embedding=True, **cfg)
    torch.manual_seed(0)
    with torch.device(device):
        m32 = M.M2M100ForConditionalGeneration(M.M2M100Config(**{k: v for k, v in full.items()
                                                                 if k in M.M2M100Config.__dataclass_fields__}))
    with torch.no_grad():
        m32.model.shared.weight.mul_(0.05)  # as tests/tiny.py: small tied embeddings, varied random outputs
    t32 = D.Translator(m32.eval(), tok)
    ids, mask = t32.pad_batch([t32.encode_source(s, "en") for s in SENTENCES])
    out32 = t32.generate(ids, mask, "ko", num_beams=4, max_new_tokens=new_tokens)
    import copy
    t16 = D.Translator(copy.deepcopy(m32).to(torch.bfloat16), tok)
    t16.model.positions = torch.zeros(0, device=device)
    sec, out16 = timed(lambda: t16.generate(ids, mask, "ko", num_beams=4, max_new_tokens=new_tokens), device, 2)
    row = {"clo_sent_s": len(SENTENCES) / sec, "same_as_clo_fp32": f"{sum(a == b for a, b in zip(out16, out32))}/"
           f"{len(SENTENCES)}"}
    try:
        import transformers
    except ImportError:
        return row
    hf = transformers.M2M100ForConditionalGeneration(transformers.M2M100Config(**full, dropout=0.0))
    hf.load_state_dict(m32.state_dict(), strict=False)
    hf = hf.to(device, torch.bfloat16).eval()
    with torch.inference_mode():
        sec_hf, out = timed(lambda: hf.generate(input_ids=ids, attention_mask=mask, num_beams=4, do_sample=False,
                                                forced_bos_token_id=t16.lang_id("ko"), max_new_tokens=new_tokens + 1,
                                                early_stopping=False, length_penalty=1.0), device, 2)
    theirs = [[x for x in (r[:r.index(2)] if 2 in r else r) if x != 1] for r in out[:, 2:].tolist()]
    row.update(transformers_sent_s=len(SENTENCES) / sec_hf,
               same_as_transformers_bf16=f"{sum(a == b for a, b in zip(out16, theirs))}/{len(SENTENCES)}")
    return row


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--smoke", action="store_true", help="tiny shapes (on CPU unless --device): checks the script")
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--tune", choices=("lora", "attn"), default="lora", help="trained weights, the same on both sides")
    a = p.parse_args()
    s = SHAPES["smoke" if a.smoke else "real"]
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() and not a.smoke else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 run is exact fp32
        name = torch.cuda.get_device_name(device)
    else:
        name = "CPU"
    t0 = time.perf_counter()
    out = {"device": name, "torch": torch.__version__, "dtype_auto": M.default_dtype(device)}
    print(f"# {name}, torch {torch.__version__}; --dtype auto here: {out['dtype_auto'][0]} ({out['dtype_auto'][1]})")
    out["rates"] = rates = device_rates(device, s)
    print(f"bf16 matmul {rates['bf16_matmul_tflops']:.1f} TFLOP/s; memory bandwidth {rates['bandwidth_gbs']:.0f} GB/s")

    pairs = random_pairs(s["pairs"], s["seq"], s["llama"]["vocab_size"])
    train = {"clo bf16 (mixed)": train_clo(s["llama"], device, pairs, s["steps"], "bfloat16", a.tune),
             "clo fp32": train_clo(s["llama"], device, pairs, s["steps"], "float32", a.tune)}
    try:
        train[f"transformers{'+PEFT' if a.tune == 'lora' else ''} bf16"] = train_peft(s["llama"], device, pairs,
                                                                                     s["steps"], a.tune)
    except ImportError as e:
        print(f"transformers/peft not installed ({e}): training comparison skipped")
    out["train"] = train
    mode = "LoRA r=16 on q,k,v,o" if a.tune == "lora" else "full q,k,v,o weights (attn)"
    print(f"\n## Training: {s['pairs']} pairs/step, {s['seq']}-token sequences, {mode}, {s['steps']} steps")
    print("| run | tokens/s | MFU (6N, vs bf16 matmul) | peak CUDA GiB (max_memory_allocated) | loss step 1 -> last |")
    print("|---|---|---|---|---|")
    peak_flops = rates["bf16_matmul_tflops"] * 1e12
    n_params = train["clo fp32"]["params"]
    for k, r in train.items():
        losses = f"{r['loss_first']:.5f} -> {r['loss_last']:.5f}" if "loss_first" in r else ""
        mfu = f"{100 * 6 * n_params * r['tokens_per_s'] / peak_flops:.0f}%"
        r["mfu"] = 6 * n_params * r["tokens_per_s"] / peak_flops
        print(f"| {k} | {r['tokens_per_s']:,.0f} | {mfu} | {r['peak_gib']:.2f} | {losses} |")
    b16, f32 = train["clo bf16 (mixed)"], train["clo fp32"]
    print(f"bf16 vs fp32 loss after {s['steps'] + 1} steps: {abs(b16['loss_last'] - f32['loss_last']):.2e} "
          f"({abs(b16['loss_last'] - f32['loss_last']) / abs(f32['loss_last']):.1e} relative)")

    out["decode"] = rows = decoding(s["llama"], device, s["new_tokens"], rates["bandwidth_gbs"])
    print(f"\n## Decoding: greedy, {s['new_tokens']} new tokens, bf16 weights and KV cache")
    print("| batch | clo tok/s | transformers tok/s | speed-up | same tokens | % of bandwidth limit |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        hf = r.get("transformers_tok_s")
        lim = r.get("bandwidth_limit_tok_s")
        share = f"{100 * r['clo_tok_s'] / lim:.0f}% of {lim:.0f} tok/s" if lim else ""
        print(f"| {r['batch']} | {r['clo_tok_s']:.0f} | {hf or float('nan'):.0f} | "
              f"{(r['clo_tok_s'] / hf) if hf else float('nan'):.2f}x | {r.get('same_tokens', '')} | {share} |")

    with tempfile.TemporaryDirectory() as tmp:
        out["translate"] = r = translation(s["m2m"], device, s["new_tokens"] // 5 if a.smoke else 24, tmp)
    print(f"\n## Translation: NLLB-600M shape (random), 16 sentences, beam 4, {24 if not a.smoke else 1} new "
          "tokens, bf16")
    hf = r.get("transformers_sent_s")
    print(f"clo {r['clo_sent_s']:.2f} sent/s; transformers {hf or float('nan'):.2f} sent/s "
          f"({(r['clo_sent_s'] / hf) if hf else float('nan'):.2f}x); identical to clo fp32 {r['same_as_clo_fp32']}, "
          f"to transformers bf16 {r.get('same_as_transformers_bf16', 'n/a')}")
    out["seconds"] = time.perf_counter() - t0
    print(f"\n(total {out['seconds']:.0f} s)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2, default=str)


if __name__ == "__main__":
    main()
