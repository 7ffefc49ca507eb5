"""Builders of tiny random checkpoints in the Hugging Face layout, so tests never download anything.

Each writes config.json + model.safetensors (via transformers, the reference implementation) and a tokenizer.json made
with `tokenizers` (byte-level BPE trained on a few sentences, so any text encodes).
"""
import json
import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "What is the capital of France? Paris is.",
    "Write a short poem about the sea.", "Translate this sentence into Korean.", "Hello, how are you today?",
    "Machine learning models learn from data.", "Explain gravity in simple words.", "1. First item\n2. Second item",
    "def add(a, b):\n    return a + b", "Der Hund schläft. 안녕하세요. 你好。 Habari yako?",
]
CHATML = ("{{ bos_token }}{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
          "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
          "<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_tokenizer(folder, specials, extra_specials=(), vocab_size=400):
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 3, trainer)
    if extra_specials:
        tok.add_special_tokens(list(extra_specials))
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    return tok


def _randomize(model, std, seed):
    """transformers initialises with std 0.02, which makes every logit nearly equal; a wider spread gives confident,
    tie-free argmaxes so that greedy comparisons test the model, not float noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))


def make_llama(folder, model_type="llama", tie=False, seed=0, template_file=False, shard=False, template=CHATML,
               **overrides):
    """A 2-layer Llama-family checkpoint with a chat template (ChatML unless given). Returns the folder."""
    import transformers
    tok = make_tokenizer(folder, ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"])
    cfg = dict(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
               tie_word_embeddings=tie, bos_token_id=1, eos_token_id=4, pad_token_id=0, rope_theta=10000.0)
    cfg.update(overrides)
    config_cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                  "qwen2": transformers.Qwen2Config}[model_type]
    model_cls = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
                 "qwen2": transformers.Qwen2ForCausalLM}[model_type]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**cfg))
    _randomize(model, 0.15, seed)
    model.save_pretrained(folder, max_shard_size="40KB" if shard else "2GB")
    tcfg = {"bos_token": "<s>", "eos_token": "<|im_end|>", "pad_token": "<unk>", "unk_token": "<unk>",
            "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 256}
    if template_file:
        with open(os.path.join(folder, "chat_template.jinja"), "w") as f:
            f.write(template)
    else:
        tcfg["chat_template"] = template
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(tcfg, f)
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": [4, 2], "pad_token_id": 0}, f)
    return folder


NLLB_CODES = ["eng_Latn", "kor_Hang", "deu_Latn", "zho_Hans", "swh_Latn", "yor_Latn", "ind_Latn"]


def make_sentencepiece_release(folder, drop=("ow",)):
    """M2M100's released tokenizer files (facebook/m2m100_418M, _1.2B): a sentencepiece BPE model trained on CORPUS,
    vocab.json in fairseq's order (<s> <pad> </s> <unk>, then the pieces; `drop`: pieces the dictionary lacks, as the
    real one lacks some, transformers#11336), tokenizer_config.json and special_tokens_map.json, no tokenizer.json.
    Returns the model's vocab_size: the pieces, 100 language tokens __xx__ and 8 madeup words."""
    import io
    import sentencepiece as spm
    from transformers.models.m2m_100.tokenization_m2m_100 import FAIRSEQ_LANGUAGE_CODES
    codes = FAIRSEQ_LANGUAGE_CODES["m2m100"]
    os.makedirs(folder, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 3), model_writer=buf, vocab_size=150,
                                   model_type="bpe", character_coverage=1.0, minloglevel=2)
    with open(os.path.join(folder, "sentencepiece.bpe.model"), "wb") as f:
        f.write(buf.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    pieces = ["<s>", "<pad>", "</s>", "<unk>"] + [sp.id_to_piece(i) for i in range(3, sp.get_piece_size())
                                                  if sp.id_to_piece(i) not in drop]
    specials = dict(bos_token="<s>", eos_token="</s>", sep_token="</s>", pad_token="<pad>", unk_token="<unk>")
    for name, content in (("vocab.json", {p: i for i, p in enumerate(pieces)}),
                          ("special_tokens_map.json", {**specials, "additional_special_tokens": [
                              f"__{c}__" for c in codes]}),
                          ("tokenizer_config.json", {**specials, "language_codes": "m2m100", "num_madeup_words": 8,
                                                     "tokenizer_class": "M2M100Tokenizer", "model_max_length": 1024})):
        with open(os.path.join(folder, name), "w") as f:
            json.dump(content, f)
    return len(pieces) + len(codes) + 8


def make_m2m100(folder, seed=0, eos_bias=0.0, release=False):
    """A 2+2-layer M2M100 checkpoint with NLLB-style language-code tokens in a tokenizer.json, or (release) laid out as
    facebook/m2m100_418M is released (see make_sentencepiece_release). Returns the folder."""
    import transformers
    if release:
        vocab_size = make_sentencepiece_release(folder)
    else:
        vocab_size = make_tokenizer(folder, ["<s>", "<pad>", "</s>", "<unk>"], NLLB_CODES + ["<mask>"]).get_vocab_size()
    cfg = transformers.M2M100Config(
        vocab_size=vocab_size, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=256,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, scale_embedding=True,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    torch.manual_seed(seed)
    model = transformers.M2M100ForConditionalGeneration(cfg)
    _randomize(model, 0.15, seed)
    with torch.no_grad():
        # small tied embeddings: otherwise each token's own embedding dominates the residual stream and a random model
        # just repeats its last token
        model.model.shared.weight.mul_(0.2)
        model.model.shared.weight[1] = 0  # the padding row, as trained checkpoints have it
        # a final-norm bias along the eos embedding raises eos's logit by about eos_bias at every step, so that
        # random weights stop at varied lengths and the tests exercise finished-hypothesis bookkeeping
        eos = model.model.shared.weight[2]
        model.model.decoder.layer_norm.bias += eos_bias * eos / eos.dot(eos)
    model.save_pretrained(folder)
    if release:
        return folder
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
                   "tokenizer_class": "PreTrainedTokenizerFast"}, f)
    return folder
