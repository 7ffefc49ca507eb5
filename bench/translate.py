"""Translation speed of our M2M100/NLLB translator against transformers' generate, same checkpoint and inputs.

    python bench/translate.py MODEL            # a real checkpoint folder or hub id
    python bench/translate.py --random-nllb600m  # builds an NLLB-200-distilled-600M-shaped checkpoint, random weights

Greedy and beam 4, outputs capped at --max-new-tokens so both do equal work; checks the outputs are identical.
"""
import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data as D  # noqa: E402
import model as M  # noqa: E402

SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Machine learning models learn patterns from data.",
             "Please write a short poem about the sea and the wind.", "What is the capital of France?",
             "Vaccines train the immune system to recognise a virus.", "He said that he would come back tomorrow.",
             "Water boils at one hundred degrees Celsius at sea level.", "Reading every day improves your vocabulary.",
             "The museum opens at nine in the morning and closes at five.", "Can you explain how a rainbow forms?",
             "Our team finished the project two weeks ahead of schedule.", "The children played in the park until dark.",
             "Exercise is good for both the body and the mind.", "She bought fresh vegetables at the market.",
             "The train to Berlin leaves from platform three.", "Turn off the lights when you leave the room."]


def random_nllb600m(folder):
    """facebook/nllb-200-distilled-600M's shape (its config), random weights, and a tokenizer with NLLB codes."""
    import transformers
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    import tiny
    tok = tiny.make_tokenizer(folder, ["<s>", "<pad>", "</s>", "<unk>"], tiny.NLLB_CODES + ["<mask>"])
    cfg = transformers.M2M100Config(vocab_size=256206, d_model=1024, encoder_layers=12, decoder_layers=12,
                                    encoder_attention_heads=16, decoder_attention_heads=16, encoder_ffn_dim=4096,
                                    decoder_ffn_dim=4096, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2,
                                    scale_embedding=True, dropout=0.0)
    del tok
    transformers.M2M100ForConditionalGeneration(cfg).save_pretrained(folder)
    return folder


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model", nargs="?")
    p.add_argument("--random-nllb600m", action="store_true")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=16)
    a = p.parse_args()
    from transformers import M2M100ForConditionalGeneration
    folder = random_nllb600m(tempfile.mkdtemp()) if a.random_nllb600m else M.resolve_checkpoint(a.model)
    ours = D.load_translator(folder)
    ref = M2M100ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    ids, mask = ours.pad_batch([ours.encode_source(s, "en") for s in SENTENCES[:a.batch_size]])
    n = ids.shape[0]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, {n} sentences, "
          f"max {a.max_new_tokens} new tokens")
    print("| decoding | clo sent/s | transformers sent/s | speed-up | identical |")
    print("|---|---|---|---|---|")
    for beams in (1, 4):
        t = time.perf_counter()
        got = ours.generate(ids, mask, "ko", num_beams=beams, max_new_tokens=a.max_new_tokens)
        t_ours = time.perf_counter() - t
        t = time.perf_counter()
        with torch.inference_mode():
            out = ref.generate(input_ids=ids, attention_mask=mask, forced_bos_token_id=ours.lang_id("ko"),
                               num_beams=beams, max_new_tokens=a.max_new_tokens + 1, do_sample=False,
                               early_stopping=False, length_penalty=1.0)
        t_ref = time.perf_counter() - t
        theirs = [[x for x in (r[:r.index(2)] if 2 in r else r) if x != 1] for r in out[:, 2:].tolist()]
        same = sum(g == r for g, r in zip(got, theirs))
        name = "greedy" if beams == 1 else f"beam {beams}"
        print(f"| {name} | {n / t_ours:.2f} | {n / t_ref:.2f} | {t_ref / t_ours:.2f}x | {same}/{n} |")


if __name__ == "__main__":
    main()
