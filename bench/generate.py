"""Decoding speed of model.generate against transformers' generate on the same checkpoint, in the same run.

    python bench/generate.py MODEL [--new-tokens 128] [--batches 1 8] [--dtype float32]

Greedy, eos ignored (both generate exactly --new-tokens tokens), same prompts; prints a markdown table.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as M  # noqa: E402

PROMPTS = ["Explain how rainbows form.", "Write a haiku about autumn.", "What is the capital of Australia?",
           "Give three tips for learning a language.", "Describe a cat to someone who has never seen one.",
           "Why is the sky blue?", "Summarise the plot of Hamlet.", "How do vaccines work?"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    from transformers import AutoModelForCausalLM
    dtype = M.DTYPES[a.dtype]
    ours, tok = M.load_model(a.model, dtype, layout="decode")
    ref = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype).eval()
    never = type("NoEos", (), {"eos_ids": [], "pad_id": tok.pad_id})()  # same work for both: no early stop
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {a.dtype}, {a.new_tokens} new tokens")
    print("| batch | clo tok/s | transformers tok/s | speed-up | same tokens |")
    print("|---|---|---|---|---|")
    for B in a.batches:
        prompts = [tok.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}])
                   for i in range(B)]
        P = max(map(len, prompts))
        ids = torch.tensor([[tok.pad_id] * (P - len(x)) + x for x in prompts])
        mask = torch.tensor([[0] * (P - len(x)) + [1] * len(x) for x in prompts])
        best_ours = best_ref = float("inf")
        for _ in range(a.repeats):
            t = time.perf_counter()
            got = M.generate(ours, never, prompts, a.new_tokens)
            best_ours = min(best_ours, time.perf_counter() - t)
            t = time.perf_counter()
            with torch.inference_mode():
                out = ref.generate(ids, attention_mask=mask, max_new_tokens=a.new_tokens,
                                   min_new_tokens=a.new_tokens, do_sample=False, pad_token_id=tok.pad_id)
            best_ref = min(best_ref, time.perf_counter() - t)
        same = sum(g == r for g, r in zip(got, out[:, P:].tolist()))
        n = B * a.new_tokens
        print(f"| {B} | {n / best_ours:.1f} | {n / best_ref:.1f} | {best_ref / best_ours:.2f}x | {same}/{B} |")


if __name__ == "__main__":
    main()
