"""clo.py and data.py: the CLO loss worked by hand, LoRA against peft and transformers, the pipeline end to end,
resuming, the translation cache, and the error messages of bad input."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import clo
import data as D
import model as M
import tiny
from conftest import ROOT

transformers = pytest.importorskip("transformers")


def test_clo_loss_worked_by_hand():
    """Two pairs, beta = 0.5, lam = 0.25; sequence log-probs (summed over response tokens):

                 policy chosen  policy rejected  ref chosen  ref rejected  chosen tokens  in NLL term
        pair 1       -3.0           -4.0           -3.5         -3.5            3          no (English chosen)
        pair 2       -5.0           -4.0           -5.0         -4.5            4          yes (target language)

    pair 1: (log pi - log ref) chosen = 0.5, rejected = -0.5; margin = 0.5 * 1.0 = 0.5;
            -log sigmoid(0.5) = log(1 + e^-0.5) = 0.474077
    pair 2: chosen = 0, rejected = 0.5; margin = 0.5 * -0.5 = -0.25; -log sigmoid(-0.25) = log(1 + e^0.25) = 0.825939
    L_CL = (0.474077 + 0.825939) / 2 = 0.650008; reward accuracy 1/2; mean margin (0.5 - 0.25) / 2 = 0.125.
    NLL: pair 2's chosen response only: -(-5.0) / 4 tokens = 1.25.
    L = 0.25 * 1.25 + 0.75 * 0.650008 = 0.800006.
    SFT (lam 1) on both languages' chosen answers: (3 + 5) / (3 + 4) = 1.142857; on the target language's: 1.25.
    DPO (lam 0): 0.650008.
    """
    logps = (torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.0]), torch.tensor([-3.5, -5.0]),
             torch.tensor([-3.5, -4.5]))
    lengths, target_only, both = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0])
    parts = clo.clo_loss(*logps, lengths, target_only, beta=0.5, lam=0.25)
    assert parts.loss.item() == pytest.approx(0.800006, abs=1e-6)
    assert parts.pair_loss.item() == pytest.approx(0.650008, abs=1e-6)
    assert parts.nll.item() == pytest.approx(1.25)
    assert parts.reward_acc.item() == 0.5 and parts.margin.item() == pytest.approx(0.125)
    assert clo.clo_loss(*logps, lengths, both, beta=0.5, lam=1.0).loss.item() == pytest.approx(1.142857, abs=1e-6)
    assert clo.clo_loss(*logps, lengths, target_only, beta=0.5, lam=1.0).loss.item() == pytest.approx(1.25)
    assert clo.clo_loss(*logps, lengths, target_only, beta=0.5, lam=0.0).loss.item() == pytest.approx(0.650008,
                                                                                                     abs=1e-6)
    # with the step's denominators, each pair's loss is its share: the shares sum to the loss of both at once
    shares = [clo.clo_loss(*(x[i:i + 1] for x in logps), lengths[i:i + 1], target_only[i:i + 1], beta=0.5,
                           lam=0.25, n_pairs=2, n_nll_tokens=4.0) for i in range(2)]
    for field in ("loss", "nll", "pair_loss", "reward_acc", "margin"):
        assert sum(getattr(s, field).item() for s in shares) == pytest.approx(getattr(parts, field).item(), abs=1e-6)


def test_each_method_trains_what_its_table_row_says():
    """The batch of test_clo_loss_worked_by_hand through clo.METHODS: which chosen answers enter the NLL term and
    lam, per --method (clo and clo-en-nll with --lam 0.25), against the numbers worked there by hand:
        clo         lam 0.25, NLL on the target answer (1.25):  0.25 * 1.25 + 0.75 * 0.650008     = 0.800006
        clo-en-nll  lam 0.25, NLL on both (8 / 7 = 1.142857):   0.25 * 1.142857 + 0.75 * 0.650008 = 0.773220
        sft         lam 1, both: 1.142857;  sft-en: the English answer, 3 / 3 = 1.0;  sft-target: 1.25
        dpo         lam 0: L_CL = 0.650008 (the NLL logged is the target answer's, 1.25)"""
    english, target = (D.TokenizedPair([1], [2, 3, 4], [5], t, i) for i, t in enumerate((False, True)))
    logps = (torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.0]), torch.tensor([-3.5, -5.0]),
             torch.tensor([-3.5, -4.5]))
    expected = {"clo": (0.800006, 1.25), "clo-en-nll": (0.773220, 1.142857), "sft": (1.142857, 1.142857),
                "sft-en": (1.0, 1.0), "sft-target": (1.25, 1.25), "dpo": (0.650008, 1.25)}
    assert set(expected) == set(clo.METHODS)
    for method, (loss, nll) in expected.items():
        args = clo.parse_args(["--model", "m", "--lang", "ko", "--method", method]
                              + (["--lam", "0.25"] if method.startswith("clo") else []))
        mask = torch.tensor([float(clo.in_nll_term(p, method)) for p in (english, target)])
        parts = clo.clo_loss(*logps, torch.tensor([3.0, 4.0]), mask, beta=0.5, lam=args.lam)
        assert parts.loss.item() == pytest.approx(loss, abs=1e-6), method
        assert parts.nll.item() == pytest.approx(nll, abs=1e-6), method
    assert clo.parse_args(["--model", "m", "--lang", "ko"]).lam == 0.5  # clo's default lam
    assert clo.parse_args(["--model", "m", "--lang", "ko", "--method", "sft"]).beta == 0.1  # logged, unused


@pytest.mark.parametrize("argv,said", [
    (["--method", "sft", "--lam", "0.3"], "--lam 0.3: --method sft fixes lam at 1; drop --lam, or use --method clo."),
    (["--method", "dpo", "--lam", "0.5"], "--lam 0.5: --method dpo fixes lam at 0; drop --lam, or use --method clo."),
    (["--method", "sft-en", "--beta", "0.2"], "--beta 0.2: --method sft-en has no pair term (lam 1); drop --beta."),
    (["--lora-r", "8"], "--lora-r 8: --tune attn trains full weights, without LoRA; add --tune lora, or drop "
                        "--lora-r."),
    (["--tune", "full", "--lora-targets", "q_proj"], "--lora-targets q_proj: --tune full trains full weights, "
                                                     "without LoRA; add --tune lora, or drop --lora-targets."),
])
def test_a_flag_that_would_be_ignored_is_refused(argv, said):
    with pytest.raises(ValueError) as e:
        clo.parse_args(["--model", "m", "--lang", "ko", *argv])
    assert str(e.value) == said


PARALLEL = [
    {"en_instruction": "Say hello.", "en_response": "Hello!", "ko_instruction": "안녕이라고 말해.",
     "ko_response": "안녕하세요!", "sw_instruction": "Sema habari.", "sw_response": "Habari!"},
    {"en_instruction": "Name a color.", "en_response": "Blue.", "ko_instruction": "색깔 하나.",
     "ko_response": "파란색.", "sw_instruction": "Taja rangi.", "sw_response": "Bluu."},
    {"en_instruction": "Count to three.", "en_response": "1, 2, 3.", "ko_instruction": "셋까지 세어.",
     "ko_response": "하나, 둘, 셋.", "sw_instruction": "Hesabu hadi tatu.", "sw_response": "Moja, mbili, tatu."},
]


@pytest.fixture()
def parallel_file(tmp_path):
    path = tmp_path / "parallel.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in PARALLEL))
    return str(path)


def run_clo(*argv, check=True):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "clo.py"), "--no-progress", *argv],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    if check:
        assert out.returncode == 0, out.stdout + out.stderr
    return out


def test_pair_loss_is_log2_at_step_0(llama_dir):
    model, tok = M.load_model(llama_dir)
    pairs, _ = D.tokenize_pairs(D.build_pairs(PARALLEL, ["ko"]), tok, 256)
    ref = clo.reference_logps(model, pairs, 8, tok.pad_id, "cpu", progress=False)
    M.apply_lora(model, r=4, alpha=8)
    B = len(pairs)
    logp, n = clo.sequence_logps(model, D.collate(pairs, tok.pad_id, pack_to=64), 2 * B)
    (chosen, rejected), (chosen_lengths, _) = logp.chunk(2), n.chunk(2)  # collate: chosen first
    parts = clo.clo_loss(chosen, rejected, ref[:, clo.CHOSEN], ref[:, clo.REJECTED], chosen_lengths.float(),
                         torch.tensor([float(p.in_target_lang) for p in pairs]), beta=0.1, lam=0.0)
    assert abs(parts.loss.item() - math.log(2)) < 1e-6


@pytest.mark.parametrize("model_type", ["llama", "mistral"])
def test_sequence_logps_packed_and_unpacked_equal_full_log_softmax(tmp_path, model_type):
    """Each sequence alone through the full model: log_softmax over all positions, response tokens summed. Packed
    rows (several sequences a row, attention kept within each; Mistral: sliding window of 8) must give the same."""
    folder = tiny.make_llama(str(tmp_path), model_type=model_type, **({"sliding_window": 8}
                                                                     if model_type == "mistral" else {}))
    model, tok = M.load_model(folder)
    pairs, _ = D.tokenize_pairs(D.build_pairs(PARALLEL, ["ko"]), tok, 256)
    seqs = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
    responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    expected = []
    with torch.no_grad():
        for s, r in zip(seqs, responses):
            logp = torch.log_softmax(model(torch.tensor([s]))[0], -1)
            pos = torch.arange(len(s) - len(r) - 1, len(s) - 1)
            expected.append(logp[pos, torch.tensor(r)].sum())
        expected = torch.stack(expected)
        for pack_to in (None, 64, 70, 256):
            batch = D.collate(pairs, tok.pad_id, pack_to)
            if pack_to == 70:
                assert batch[0].shape[0] < len(seqs)  # several sequences share a row
            sums, n = clo.sequence_logps(model, batch, len(seqs))
            assert torch.allclose(sums, expected, atol=1e-4), pack_to
            assert n.tolist() == [len(r) for r in responses]


def test_tokenized_response_ends_with_end_of_turn_and_prompt_is_masked(llama_dir):
    _, tok = M.load_model(llama_dir)
    pairs, report = D.tokenize_pairs(D.build_pairs(PARALLEL, ["ko"]), tok, 256)
    p = pairs[0]
    assert p.chosen[-1] in tok.eos_ids and tok.decode(p.chosen) == "Hello!"
    assert tok.decode(p.prompt, skip_special_tokens=False).endswith("<|im_start|>assistant\n")
    assert report == {"pairs": 6, "dropped_empty": 0, "dropped_long_prompt": 0, "truncated": 0, "boundary_moved": 0, "kept": 6}
    long_pair = {"prompt": "Say hello.", "chosen": "hello " * 50, "rejected": "Hi.", "in_target_lang": True}
    limit = 2 * len(p.prompt) + 2
    short, report = D.tokenize_pairs([long_pair, {**long_pair, "prompt": "x " * limit}, {**long_pair, "chosen": " "}],
                                     tok, limit)
    assert report == {"pairs": 3, "dropped_empty": 1, "dropped_long_prompt": 1, "truncated": 1, "boundary_moved": 0, "kept": 1}
    assert len(short[0].prompt) + len(short[0].chosen) == limit and short[0].chosen[-1] not in tok.eos_ids


def test_lora_merge_and_peft_and_transformers_agree(llama_dir, tmp_path):
    peft = pytest.importorskip("peft")
    model, tok = M.load_model(llama_dir)
    M.apply_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for m in M.lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.05)  # a trained-looking adapter: B != 0
    ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": "Explain gravity."}])])
    with torch.no_grad():
        ours = model(ids)
        base = M.load_model(llama_dir)[0](ids)
    assert (ours - base).abs().max() > 1e-3  # the adapter matters, so the comparisons below mean something
    args = clo.parse_args(["--model", llama_dir, "--lang", "ko", "--tune", "lora", "--lora-r", "4", "--lora-alpha",
                           "8"])
    out = str(tmp_path / "run")
    os.makedirs(out)
    clo.save_adapter(out, model, args)
    ref = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        peft_logits = peft.PeftModel.from_pretrained(ref, out).eval()(ids).logits
    assert (peft_logits - ours).abs().max() < 1e-4
    clo.save_merged(os.path.join(out, "merged"), model, llama_dir)
    with torch.no_grad():
        assert (model(ids) - ours).abs().max() < 1e-4  # merge() in place: same function
        merged = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(out, "merged")).eval()
        assert (merged(ids).logits - ours).abs().max() < 1e-4
    assert not M.lora_modules(model)


def test_end_to_end_with_translator_writes_every_output(tmp_path):
    llama = tiny.make_llama(str(tmp_path / "llama"))
    m2m = tiny.make_m2m100(str(tmp_path / "m2m"), seed=0)  # no eos bias: outputs are never empty
    out = str(tmp_path / "run")
    r = run_clo("--model", llama, "--translator", m2m, "--lang", "ko,sw", "--num-samples", "3", "--out", out,
                "--max-steps", "2", "--batch-size", "2", "--grad-accum", "1", "--tune", "lora", "--merge",
                "--num-beams", "2",
                "--max-len", "8192", "--keep-flagged")  # a random translator's output is flagged degenerate
    for name in ("args.json", "translations.jsonl", "pairs.jsonl", "metrics.jsonl", "adapter_model.safetensors",
                 "adapter_config.json", "summary.json", "merged/model.safetensors", "merged/config.json",
                 "merged/tokenizer.json", "merged/tokenizer_config.json"):
        assert os.path.exists(os.path.join(out, name)), name
    assert "pairs: 12 kept of 12" in r.stdout and "done:" in r.stdout
    pairs = [json.loads(l) for l in open(os.path.join(out, "pairs.jsonl"))]
    cache = [json.loads(l) for l in open(os.path.join(out, "translations.jsonl"))]
    assert len(cache) == 6 and {c["key"] for c in cache} == {D.item_key({"instruction": c["en_instruction"],
                                                                        "response": c["en_response"]}, l)
                                                             for c in cache for l in ("ko", "sw") if f"{l}_response" in c}
    en = D.load_sft(None, 3)
    assert pairs[0] == {"lang": "ko", "item": 0, "in_target_lang": False, "prompt": en[0]["instruction"], "chosen": en[0]["response"],
                        "rejected": cache[0]["ko_response"]}
    assert pairs[1]["prompt"] == cache[0]["ko_instruction"] and pairs[1]["chosen"] == cache[0]["ko_response"]
    merged = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(out, "merged"))
    assert merged.config.vocab_size > 0


def test_reward_accuracy_reaches_one(tmp_path, parallel_file):
    llama = tiny.make_llama(str(tmp_path / "llama"))
    out = str(tmp_path / "run")
    run_clo("--model", llama, "--translations", parallel_file, "--lang", "ko", "--out", out, "--max-steps", "25",
            "--batch-size", "3", "--grad-accum", "1", "--lr", "3e-3", "--warmup", "0", "--tune", "lora")
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert rows[0]["pair_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert rows[-1]["reward_acc"] == 1.0 and rows[-1]["pair_loss"] < rows[0]["pair_loss"] / 2
    assert rows[-1]["nll"] < rows[0]["nll"]


@pytest.mark.parametrize("tune", ["lora", "attn"])
def test_killed_and_resumed_run_gives_the_same_weights(tmp_path, parallel_file, tune):
    from safetensors.torch import load_file
    llama = tiny.make_llama(str(tmp_path / "llama"))
    common = ["--model", llama, "--translations", parallel_file, "--lang", "ko,sw", "--max-steps", "6",
              "--batch-size", "2", "--grad-accum", "2", "--lr", "1e-3", "--tune", tune, "--save-every", "2"]
    run_clo(*common, "--out", str(tmp_path / "straight"))
    killed = run_clo(*common, "--out", str(tmp_path / "resumed"), "--stop-after", "3", check=False)
    assert killed.returncode == 0 and os.path.exists(tmp_path / "resumed" / "checkpoint" / "progress.json")
    assert "stopped after step 3 of 6 (--stop-after 3)" in killed.stdout
    assert f"continue with: python clo.py ... --out {tmp_path / 'resumed'} --resume (the same options)" in killed.stdout
    assert not os.path.exists(tmp_path / "resumed" / "adapter_model.safetensors")
    r = run_clo(*common, "--out", str(tmp_path / "resumed"), "--resume")
    assert "resumed from" in r.stdout and "at step 3" in r.stdout
    name = "adapter_model.safetensors" if tune == "lora" else "merged/model.safetensors"
    a, b = load_file(str(tmp_path / "straight" / name)), load_file(str(tmp_path / "resumed" / name))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    steps = [json.loads(l)["step"] for l in open(tmp_path / "resumed" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]


class FlakyTranslator:
    """Translates by tagging; dies after `fail_after` calls, as a killed process would."""

    def __init__(self, fail_after=None):
        self.calls, self.fail_after = 0, fail_after

    def translate_flagged(self, texts, src, tgt, progress=False, **kw):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt
        return [f"[{tgt}] {t}" for t in texts], [[] for _ in texts]


def test_translation_cache_resumes_with_every_item_once(tmp_path):
    items = D.load_sft(None, 20)
    cache = str(tmp_path / "translations.jsonl")
    with pytest.raises(KeyboardInterrupt):
        D.translate_items(items, ["ko"], cache, FlakyTranslator(fail_after=2), chunk=4, log=lambda *_: None)
    assert len(open(cache).readlines()) == 8
    with open(cache, "a") as f:
        f.write('{"key": "half a line')  # a crash in the middle of a write
    counting = FlakyTranslator()
    rows = D.translate_items(items, ["ko", "sw"], cache, counting, chunk=4, log=lambda *_: None)
    assert counting.calls == 3 + 5  # 12 ko items left in chunks of 4, then 20 sw items
    lines = [json.loads(l) for l in open(cache)]
    keys = [l["key"] for l in lines]
    assert len(keys) == len(set(keys)) == 40
    assert [r["ko_response"] for r in rows] == [f"[ko] {it['response']}" for it in items]
    again = FlakyTranslator(fail_after=0)  # nothing left to translate: never called
    assert D.translate_items(items, ["ko", "sw"], cache, again, log=lambda *_: None) == rows


def test_oasst1_selection_english_single_turn_best_ranked_first(tmp_path, monkeypatch):
    """The paper's "top highly-ranked single-turn entries" as data.oasst1_pairs reads them, on trees in the release's
    layout; which items are picked, worked by hand: every rank-0 reply (by quality, then votes) before any rank-1
    reply, whatever its quality; first turns only; non-English, unranked, deleted and review-failed messages never."""
    def msg(role, text, rank=None, quality=None, votes=None, replies=(), lang="en", **extra):
        m = {"message_id": text, "role": role, "lang": lang, "text": text, "rank": rank, "deleted": False,
             "review_result": True, "replies": list(replies), **extra}
        m["labels"] = {"quality": {"value": quality, "count": 3}} if quality is not None else None
        m["emojis"] = {"+1": votes} if votes is not None else None
        return m
    follow_up = msg("prompter", "Q1 again", replies=[msg("assistant", "A1 again", rank=0, quality=1.0)])
    trees = [
        msg("prompter", "Q1", replies=[msg("assistant", "worse", rank=1, quality=0.99),  # ranked below A1
                                       msg("assistant", "A1", rank=0, quality=0.5, replies=[follow_up])]),
        msg("prompter", "Frage", lang="de", replies=[msg("assistant", "Antwort", rank=0, quality=1.0)]),
        msg("prompter", "Q2", replies=[msg("assistant", "A2", rank=0, quality=0.9)]),
        msg("prompter", "lone", replies=[msg("assistant", "unranked", quality=1.0)]),     # no rank 0: not ranked
        msg("prompter", "Q3", replies=[msg("assistant", "A3", rank=0, quality=0.5, votes=3)]),
        msg("prompter", "Q4", replies=[msg("assistant", "A4", rank=0)]),                    # no quality label: last
        msg("prompter", "gone", replies=[msg("assistant", "deleted", rank=0, quality=1.0, deleted=True)]),
        msg("prompter", "spam", review_result=False, replies=[msg("assistant", "A", rank=0, quality=1.0)]),
    ]
    path = tmp_path / "trees.jsonl.gz"
    import gzip
    with gzip.open(path, "wt") as f:
        f.write("".join(json.dumps({"message_tree_id": t["text"], "tree_state": "ready_for_export", "prompt": t})
                        + "\n" for t in trees))
    picked = D.oasst1_pairs(str(path))
    assert [(i["instruction"], i["response"]) for i in picked] == [("Q2", "A2"), ("Q3", "A3"), ("Q1", "A1"),
                                                                    ("Q4", "A4"), ("Q1", "worse")]
    monkeypatch.setattr(D, "load_oasst1", lambda: picked)
    assert D.load_sft("oasst1", 4) == picked[:4] and D.load_sft("oasst1", 5) == picked
    with pytest.raises(ValueError, match=r"^--num-samples 6: oasst1 \(ranked replies to English root prompts\) has "
                                         r"only 5 items; ask for at most 5"):
        D.load_sft("oasst1", 6)


def test_chat_format_and_alpaca_input(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                                             {"role": "assistant", "content": "a"}, {"role": "user",
                                                                                     "content": "u2"}]}) + "\n"
                    + json.dumps({"instruction": "Sum", "input": "1 2", "output": "3"}) + "\n")
    assert D.load_sft(str(path)) == [{"instruction": "u", "response": "a"}, {"instruction": "Sum\n\n1 2",
                                                                              "response": "3"}]


def test_bad_input_messages(tmp_path, llama_dir, parallel_file):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", oops}\n')
    r = run_clo("--model", llama_dir, "--lang", "ko", "--data", str(bad), "--out", str(tmp_path / "r1"), check=False)
    assert r.returncode == 2 and f"error: {bad}: line 2: not valid JSON" in r.stderr
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"instruction": "a"}\n')
    r = run_clo("--model", llama_dir, "--lang", "ko", "--data", str(missing), "--out", str(tmp_path / "r2"),
                check=False)
    assert r.returncode == 2 and f"{missing}: line 1: missing field(s) ['output']" in r.stderr
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    r = run_clo("--model", llama_dir, "--lang", "ko", "--data", str(empty), "--out", str(tmp_path / "r3"), check=False)
    assert r.returncode == 2 and f"{empty}: no SFT items found; the file is empty." in r.stderr
    r = run_clo("--model", llama_dir, "--lang", "xx", "--out", str(tmp_path / "r4"), check=False)
    assert r.returncode == 2 and "--lang xx: unknown language code" in r.stderr
    r = run_clo("--model", str(tmp_path / "no-model"), "--lang", "ko", "--out", str(tmp_path / "r5"), check=False)
    assert r.returncode == 2 and "no-model: no such folder" in r.stderr and not (tmp_path / "r5").exists()
    r = run_clo("--model", llama_dir, "--lang", "ko", "--num-samples", "2", "--translator", str(tmp_path / "no-mt"),
                "--out", str(tmp_path / "r6"), check=False)
    assert r.returncode == 2 and "--translator" in r.stderr and "could not load it" in r.stderr \
        and "--translations FILE" in r.stderr
    r = run_clo("--model", llama_dir, "--lang", "de", "--translations", parallel_file, "--out", str(tmp_path / "r7"),
                check=False)
    assert r.returncode == 2 and "has no de_instruction/de_response columns; its languages: ko, sw." in r.stderr


def test_default_trains_the_attention_projections_and_merged_loads_in_transformers(tmp_path, parallel_file,
                                                                                   monkeypatch):
    """The paper's setting by default: exactly the Q/K/V/O weights train, as full weights, and the run's output is
    merged/, which transformers loads with the trained model's logits (no adapter is written)."""
    llama = tiny.make_llama(str(tmp_path / "llama"))
    args = clo.parse_args(["--model", llama, "--lang", "ko"])
    model, tok = M.load_model(llama)
    names = clo.set_trainable(model, args.tune, args.lora_targets, args.lora_r, args.lora_alpha, args.lora_dropout)
    assert args.tune == "attn" and sorted(names) == sorted(
        f"model.layers.{i}.self_attn.{p}.weight" for i in range(2) for p in clo.ATTENTION_PROJECTIONS)
    assert names == [n for n, p in model.named_parameters() if p.requires_grad]
    ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": "Explain gravity."}])])
    trained = {}
    save_outputs = clo.save_outputs

    def keep_logits(args, model, last, run):  # the trained model, as training left it
        with torch.no_grad():
            trained["logits"] = model.eval()(ids)
        return save_outputs(args, model, last, run)
    monkeypatch.setattr(clo, "save_outputs", keep_logits)
    out = tmp_path / "run"
    clo.main(["--model", llama, "--translations", parallel_file, "--lang", "ko", "--max-steps", "2", "--lr", "1e-3",
              "--out", str(out), "--no-progress", "--dtype", "float32"])  # auto is bf16 on a CPU with native bf16
    assert not (out / "adapter_model.safetensors").exists() and (out / "merged" / "config.json").exists()
    with torch.no_grad():
        theirs = transformers.AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()(ids)
        base = transformers.AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32).eval()(ids)
    assert (theirs.logits - trained["logits"]).abs().max() < 1e-4
    assert (base.logits - trained["logits"]).abs().max() > 1e-3  # training moved it: the comparison means something


def test_every_micro_batch_holds_both_pairs_of_each_of_its_items(tmp_path, parallel_file, monkeypatch):
    """--pairing items (the default), two target languages: every micro-batch trained on holds, for each item in
    it, all 4 of its pairs (x_en: y_en > y_l and x_l: y_l > y_en for ko and for sw); so does each rank's share of a
    global batch under 2 ranks. metrics.jsonl counts the step's English and target-language pairs. --pairing pairs
    keeps the old order (pairs length-grouped one by one)."""
    llama = tiny.make_llama(str(tmp_path / "llama"))
    seen = []
    collate = D.collate

    def record(pairs, *a, **k):
        if torch.is_grad_enabled():  # training, not the reference table (no_grad)
            seen.append([(p.item, p.in_target_lang) for p in pairs])
        return collate(pairs, *a, **k)
    monkeypatch.setattr(D, "collate", record)
    rows = [{k: f"{v} ({i})" for k, v in r.items()} for i in range(2) for r in PARALLEL]  # 6 items
    par = tmp_path / "six.jsonl"
    par.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    common = ["--model", llama, "--translations", str(par), "--lang", "ko,sw", "--batch-size", "2", "--grad-accum",
              "2", "--epochs", "2", "--lr", "1e-3", "--no-progress"]
    clo.main([*common, "--out", str(tmp_path / "items")])
    assert len(seen) == 6  # 3 micro-batches of 2 items an epoch
    for batch in seen:
        assert len(batch) == 8 and len({item for item, _ in batch}) == 2
        for item in {item for item, _ in batch}:
            assert sorted(t for i, t in batch if i == item) == [False, False, True, True]
    metrics = [json.loads(l) for l in open(tmp_path / "items" / "metrics.jsonl")]
    assert [(m["en_pairs"], m["target_pairs"]) for m in metrics] == [(8, 8), (4, 4)] * 2
    # under 2 ranks, each rank's micro-batch is whole items too
    _, tok = M.load_model(llama)
    pairs, _ = D.tokenize_pairs(D.build_pairs(rows, ["ko", "sw"]), tok, 1024)
    args = clo.parse_args(common)
    for epoch in range(2):
        for global_batch in clo.global_batches(pairs, args, clo.Dist(0, 2), epoch):
            shares = [clo.rank_share(global_batch, clo.Dist(rank, 2)) for rank in range(2)]
            assert sorted(shares[0] + shares[1]) == sorted(i for g in global_batch for i in g)
            for share in shares:
                assert len(share) == 2 * len(global_batch)
                assert all(sum(pairs[j].item == pairs[i].item for j in share) == 4 for i in share)
    seen.clear()
    clo.main([*common, "--out", str(tmp_path / "pairs"), "--pairing", "pairs", "--batch-size", "4"])
    assert len(seen) == 12 and all(len(b) == 4 for b in seen)  # 24 pairs, 4 a micro-batch, each on its own
    assert any(len({i for i, _ in b}) == 4 for b in seen)
