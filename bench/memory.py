"""The memory table of the README: weights, gradients and AdamW state of the paper's five models, from
clo.training_bytes (the function clo prints from at the start of a run), per tune mode and precision. Computed from
the models' config.json values (below, as their hub releases publish them), on weightless copies: nothing is
downloaded or allocated, and the figures are not measured (tests/test_memory.py checks the function against the
bytes a step really allocates). Activations, FSDP's gathered layer and the allocator's slack come on top.

    python bench/memory.py            # the Markdown table
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import clo  # noqa: E402
import model as M  # noqa: E402

# config.json fields of the paper's models (Sec. 4): Llama-2-7b-chat-hf, Llama-2-13b-chat-hf, Meta-Llama-3-8B-Instruct,
# Mistral-7B-Instruct-v0.2, Qwen2.5-3B-Instruct; and each release's parameter count, which the shapes must give
PAPER_MODELS = {
    "Llama-2-7B": (dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=32, intermediate_size=11008, vocab_size=32000, tie_word_embeddings=False),
                   6_738_415_616),
    "Llama-2-13B": (dict(model_type="llama", hidden_size=5120, num_hidden_layers=40, num_attention_heads=40,
                         num_key_value_heads=40, intermediate_size=13824, vocab_size=32000, tie_word_embeddings=False),
                    13_015_864_320),
    "Llama-3-8B": (dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=8, intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False),
                   8_030_261_248),
    "Mistral-7B": (dict(model_type="mistral", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=8, intermediate_size=14336, vocab_size=32000, tie_word_embeddings=False),
                   7_241_732_096),
    "Qwen2.5-3B": (dict(model_type="qwen2", hidden_size=2048, num_hidden_layers=36, num_attention_heads=16,
                        num_key_value_heads=2, intermediate_size=11008, vocab_size=151936, tie_word_embeddings=True),
                   3_085_938_688),
}
MODES = (("lora", "LoRA r=16 on q,k,v,o"), ("attn", "attention (Q/K/V/O)"), ("full", "full"))


def table() -> str:
    gib = lambda b: f"{b / 2 ** 30:.1f}"  # noqa: E731
    lines = ["| model | trains | dtype | weights | gradients | AdamW state | total |", "|---" * 7 + "|"]
    for name, (fields, _) in PAPER_MODELS.items():
        cfg = M.LlamaConfig.from_hf(fields)
        for mode, said in MODES:
            for dtype in ("bfloat16", "float32"):
                b = clo.training_bytes(cfg, mode, dtype)
                lines.append(f"| {name} | {said} | {dtype} | {gib(b['weights'])} | {gib(b['gradients'])} | "
                             f"{gib(b['optimizer'])} | {gib(sum(b.values()))} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print("GiB per process (one GPU, or DDP); under FSDP each rank holds about 1/N of every column.\n")
    print(table())
