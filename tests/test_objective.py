"""What clo optimises is the paper's equation, whatever the batch split and the tokenizer.

- Gradient accumulation: one optimizer step minimises L over all of the step's pairs (the pair term averaged over the
  step's pairs, the NLL term over the step's tokens of the chosen answers it takes) for every micro-batch size x
  --grad-accum split, with whole items (--pairing items) or single pairs in a micro-batch, for every --method. The
  reference is computed here one sequence at a time, with the whole step's loss at once.
- Tokenization: a response's tokens are those of the whole conversation after the prompt, for sentencepiece-style
  tokenizers (Llama 2, Mistral) as for byte-level BPE; transformers' apply_chat_template is the reference.
"""
import json
import math

import pytest
import torch

import clo
import data as D
import model as M
import tiny

transformers = pytest.importorskip("transformers")

# target-language answers of very different lengths: length-grouped micro-batches then differ in token counts, which
# is what made per-micro-batch normalisation weight short answers far more than long ones
LENGTHS = (2, 45, 3, 50)
ITEMS = [{"en_instruction": f"Question {i}: say something.", "en_response": "Hello! " * (1 + n // 8),
          "ko_instruction": f"질문 {i}: 말해.", "ko_response": "안녕하세요! " * n} for i, n in enumerate(LENGTHS)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("objective")
    par = tmp / "parallel.jsonl"
    par.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ITEMS))
    return tmp, tiny.make_llama(str(tmp / "llama")), str(par)


def reference_step(llama, par, lam, nll_on):
    """Step 1's loss parts and gradient norm, computed independently: each sequence through the model alone (full
    log_softmax, response tokens summed), the step's 8 pairs taken at once, autograd on the attention weights."""
    model, tok = M.load_model(llama)
    pairs, _ = D.tokenize_pairs(D.build_pairs(D.read_jsonl(par), ["ko"]), tok, 1024)
    for name, p in model.named_parameters():
        p.requires_grad_(any(f".{t}." in name for t in clo.ATTENTION_PROJECTIONS))

    def logp(prompt, response):
        s = prompt + response
        out = torch.log_softmax(model(torch.tensor([s]))[0].float(), -1)
        return out[torch.arange(len(prompt) - 1, len(s) - 1), torch.tensor(response)].sum()

    chosen = torch.stack([logp(p.prompt, p.chosen) for p in pairs])
    rejected = torch.stack([logp(p.prompt, p.rejected) for p in pairs])
    in_nll = [nll_on == "both" or p.in_target_lang == (nll_on == "target") for p in pairs]  # written out here
    nll = -sum(c for c, m in zip(chosen, in_nll) if m) / sum(len(p.chosen) for p, m in zip(pairs, in_nll) if m)
    # at step 1 the policy is the reference: every margin is 0 and L_CL = log 2, but its gradient is not 0
    margin = 0.1 * ((chosen - chosen.detach()) - (rejected - rejected.detach()))
    pair_loss = -torch.nn.functional.logsigmoid(margin).mean()
    loss = lam * nll + (1 - lam) * pair_loss
    loss.backward()
    grad_norm = math.sqrt(sum(float((p.grad ** 2).sum()) for p in model.parameters() if p.grad is not None))
    lengths = sorted(len(p.chosen) for p in pairs if p.in_target_lang)
    return {"loss": loss.item(), "nll": nll.item(), "pair_loss": pair_loss.item(), "grad_norm": grad_norm}, lengths


# the paper's variants (clo.METHODS), as this test reads them: lam, and whose chosen answers enter the NLL term
VARIANTS = {"clo": (0.5, "target"), "clo-en-nll": (0.5, "both"), "sft": (1.0, "both"), "sft-en": (1.0, "en"),
            "sft-target": (1.0, "target"), "dpo": (0.0, "target")}
SPLITS = {"items": ((4, 1), (2, 2), (1, 4)), "pairs": ((8, 1), (4, 2), (2, 4), (1, 8))}  # 4 items, 8 pairs


@pytest.mark.parametrize("method", list(VARIANTS))
def test_every_split_of_a_step_optimises_the_same_objective(setup, method):
    tmp, llama, par = setup
    assert set(VARIANTS) == set(clo.METHODS)
    expected, lengths = reference_step(llama, par, *VARIANTS[method])
    assert lengths[-1] > 10 * lengths[0]  # the test's point: answers of very different lengths
    assert expected["pair_loss"] == pytest.approx(math.log(2), abs=1e-6)
    for pairing, batch_size, grad_accum in ((p, b, g) for p, splits in SPLITS.items() for b, g in splits
                                            if method in ("clo", "sft", "dpo") or (b, g) == (1, 4)):
        out = tmp / f"{method}-{pairing}-{batch_size}x{grad_accum}"
        clo.main(["--model", llama, "--translations", par, "--lang", "ko", "--method", method, "--pairing", pairing,
                  "--max-grad-norm", "1e9", "--max-steps", "1", "--batch-size", str(batch_size), "--grad-accum",
                  str(grad_accum), "--dtype", "float32", "--out", str(out), "--no-progress"])  # fp32: the reference's
        step = json.loads(open(out / "metrics.jsonl").readline())
        split = f"{method} {pairing} {batch_size}x{grad_accum}"
        assert (step["en_pairs"], step["target_pairs"]) == (4, 4), split
        for key in ("loss", "nll", "pair_loss"):
            assert step[key] == pytest.approx(expected[key], abs=2e-5), (split, key)
        assert step["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-3, abs=1e-4), split
        assert step["margin"] == pytest.approx(0.0, abs=1e-5)


SENTENCEPIECE_CORPUS = tiny.CORPUS + ["The answer is Paris.", "What is the capital of France?"]
LLAMA2_TEMPLATE = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% else %}"
                   "{% set loop_messages = messages %}{% endif %}{% for message in loop_messages %}"
                   "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + message['content'].strip() + "
                   "' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'].strip() + ' ' "
                   "+ eos_token }}{% endif %}{% endfor %}")
MISTRAL_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
                    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
                    "{{ message['content'] + eos_token }}{% endif %}{% endfor %}")


def make_sentencepiece_style(folder, layout, template):
    """A tokenizer.json laid out as Llama 2's (normalizer Prepend("▁") + Replace(" ", "▁"), no pre-tokenizer) or
    newer Mistral/Llama checkpoints' (Metaspace pre-tokenizer, prepend_scheme "first"), BPE with byte fallback, and
    a tiny Llama with it."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    if layout == "normalizer":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=480, special_tokens=["<unk>", "<s>", "</s>"] + bytes_,
                                  show_progress=False)
    tok.train_from_iterator(SENTENCEPIECE_CORPUS * 3, trainer)
    folder = tiny.make_llama(folder)  # weights and ChatML files, then replaced by the sentencepiece-style ones
    tok.save(f"{folder}/tokenizer.json")
    cfg = json.load(open(f"{folder}/config.json"))
    cfg.update(vocab_size=tok.get_vocab_size(), bos_token_id=1, eos_token_id=2)
    json.dump(cfg, open(f"{folder}/config.json", "w"))
    json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": template,
               "tokenizer_class": "PreTrainedTokenizerFast"}, open(f"{folder}/tokenizer_config.json", "w"))
    json.dump({"bos_token_id": 1, "eos_token_id": 2}, open(f"{folder}/generation_config.json", "w"))
    return folder


@pytest.mark.parametrize("layout", ["normalizer", "metaspace"])
@pytest.mark.parametrize("template", ["llama2", "mistral"])
def test_response_tokens_are_the_whole_conversations(tmp_path, layout, template):
    folder = make_sentencepiece_style(str(tmp_path), layout,
                                      {"llama2": LLAMA2_TEMPLATE, "mistral": MISTRAL_TEMPLATE}[template])
    reference = transformers.PreTrainedTokenizerFast.from_pretrained(folder)
    tok = M.Tokenizer(folder)
    pair = {"prompt": "What is the capital of France?", "chosen": "The answer is Paris.",
            "rejected": "Paris is the capital.", "in_target_lang": True}
    [tokenized], report = D.tokenize_pairs([pair], tok, 256)
    for response, ids in ((pair["chosen"], tokenized.chosen), (pair["rejected"], tokenized.rejected)):
        whole = reference.apply_chat_template([{"role": "user", "content": pair["prompt"]},
                                               {"role": "assistant", "content": response}], tokenize=True)
        whole = list(whole["input_ids"] if hasattr(whole, "keys") else whole)
        assert tokenized.prompt + ids == whole  # the sequence trained on is the conversation's own tokens
        assert ids[-1] == 2  # up to and including the end-of-turn token
    assert reference.convert_ids_to_tokens(tokenized.chosen)[0] != "▁"  # no spurious lone "▁" opens the answer
    # the prompt alone (what generation sees) is the conversation's prefix here: the boundary did not move
    assert report["boundary_moved"] == 0
    prompt = reference.apply_chat_template([{"role": "user", "content": pair["prompt"]}], tokenize=True,
                                           add_generation_prompt=True)
    assert tokenized.prompt == list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)


def test_byte_level_bpe_tokens_unchanged(llama_dir):
    """SmolLM2 / Llama 3 / Qwen2-style byte-level BPE: the prompt then the response encoded apart give the same tokens
    as the whole conversation (ChatML closes the turn with <|im_end|> then a newline, which is not trained on)."""
    _, tok = M.load_model(llama_dir)
    [p], _ = D.tokenize_pairs([{"prompt": "Say hello.", "chosen": "Hello!", "rejected": "Hi.",
                                "in_target_lang": False}], tok, 256)
    prompt_text = tok.render_chat([{"role": "user", "content": "Say hello."}], add_generation_prompt=True)
    assert p.prompt == tok.encode(prompt_text)
    assert p.chosen == tok.encode("Hello!<|im_end|>") and p.rejected == tok.encode("Hi.<|im_end|>")


def test_a_token_across_the_boundary_is_scored_as_response(tmp_path):
    """A template whose generation prompt ends mid-word: "po" alone is the tokens p, o, but in the conversation
    "poem" is one token (the tiny BPE learnt it). The sequence must stay the conversation's tokens, with the
    straddling token scored as response (TRL would cut at len(prompt tokens) and split "poem" into nothing)."""
    folder = tiny.make_llama(str(tmp_path))
    cfg = json.load(open(f"{folder}/tokenizer_config.json"))
    cfg["chat_template"] = ("{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}\n"
                            "{% else %}{{ m['content'] }}<|im_end|>{% endif %}{% endfor %}"
                            "{% if add_generation_prompt %}po{% endif %}")
    json.dump(cfg, open(f"{folder}/tokenizer_config.json", "w"))
    tok = M.Tokenizer(folder)
    assert len(tok.encode("poem")) == 1 and len(tok.encode("po")) == 2
    [p], report = D.tokenize_pairs([{"prompt": "Hi", "chosen": "poem about the sea.", "rejected": "pots",
                                     "in_target_lang": True}], tok, 256)
    assert report["boundary_moved"] == 1
    for response, ids in (("poem about the sea.", p.chosen), ("pots", p.rejected)):
        full = tok.encode(tok.render_chat([{"role": "user", "content": "Hi"},
                                           {"role": "assistant", "content": response}], False))
        assert p.prompt + ids == full
    assert tok.decode(p.chosen[:1]) == "poem" and tok.decode(p.prompt) == "Q: Hi\n"


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_two_ranks_with_accumulation_equal_one_process_with_the_whole_step(setup):
    """2 ranks x 2 micro-batches of 1 item, 2 pairs (torchrun, gloo) against one process with all 4 items (8 pairs)
    in one batch."""
    from test_distributed import torchrun
    tmp, llama, par = setup
    common = ["--model", llama, "--translations", par, "--lang", "ko", "--max-grad-norm", "1e9", "--max-steps", "2",
              "--lr", "1e-3", "--warmup", "1", "--dtype", "float32"]
    clo.main([*common, "--batch-size", "4", "--grad-accum", "1", "--out", str(tmp / "one"), "--no-progress"])
    r = torchrun(*common, "--batch-size", "1", "--grad-accum", "2", "--out", str(tmp / "two"))
    assert r.returncode == 0, r.stdout + r.stderr
    one = [json.loads(l) for l in open(tmp / "one" / "metrics.jsonl")]
    two = [json.loads(l) for l in open(tmp / "two" / "metrics.jsonl")]
    assert len(one) == len(two) == 2
    for x, y in zip(one, two):
        for key in ("loss", "nll", "pair_loss", "margin"):
            assert x[key] == pytest.approx(y[key], abs=1e-4), (x["step"], key)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-3), x["step"]
