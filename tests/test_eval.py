"""eval.py: every metric on tiny models, the multiple-choice scorer on a hand-built model, the judge client against a
local stub server, and the language ID on real FLORES sentences."""
import csv
import http.server
import json
import os
import subprocess
import sys
import threading

import pytest
import torch

import eval as E
import model as M
import tiny
from conftest import ROOT

SIB = os.path.join(ROOT, "..", "shared", "data", "sib200")


class PrefersTokens(torch.nn.Module):
    """A hand-built 'language model' whose next-token logits are +8 on a fixed set of token ids, 0 elsewhere."""

    def __init__(self, vocab, preferred):
        super().__init__()
        self.lm_head = torch.nn.Linear(1, vocab)
        self.bias = torch.zeros(vocab)
        self.bias[list(preferred)] = 8.0

    def forward(self, ids, score_mask=None):
        logits = self.bias.expand(ids.shape[0], ids.shape[1], -1)
        return logits if score_mask is None else logits[score_mask]


def test_multiple_choice_picks_what_the_model_prefers(llama_dir):
    _, tok = M.load_model(llama_dir)
    rows = [{"context": "The sky is", "choices": ["green grass", "blue sea", "red fox"], "answer": 1, "lang": "en"},
            {"context": "The sky is", "choices": ["green grass", "blue sea", "red fox"], "answer": 2, "lang": "de"}]
    liked = set(tok.encode(" blue sea")) - set(tok.encode(" green grass")) - set(tok.encode(" red fox"))
    fake = PrefersTokens(tok.vocab_size, liked)
    got = E.multiple_choice_accuracy(fake, tok, rows, progress=False)
    assert {lang: m["acc"] for lang, m in got.items()} == {"en": 1.0, "de": 0.0}


def test_xcopa_and_generic_multiple_choice_files(tmp_path):
    x = tmp_path / "val.sw.jsonl"
    x.write_text(json.dumps({"premise": "Mtu alianguka.", "choice1": "A", "choice2": "B", "question": "cause",
                             "label": 1, "idx": 0}) + "\n")
    # the harness's xcopa format: the premise's last character dropped, each choice's first letter lowercased
    assert E.read_multiple_choice(str(x)) == [{"context": "Mtu alianguka kwa sababu", "choices": ["a", "b"],
                                               "answer": 1, "lang": "sw"}]
    g = tmp_path / "mc.jsonl"
    g.write_text(json.dumps({"question": "2+2?", "choices": ["3", "4"], "answer": 5}) + "\n")
    with pytest.raises(ValueError, match=r"mc.jsonl: line 1: 'answer' must be the index"):
        E.read_multiple_choice(str(g))


class StubJudge(http.server.BaseHTTPRequestHandler):
    mode = "content"

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        StubJudge.auth = self.headers.get("Authorization")
        a = prompt.split("[Answer A]\n")[1].split("\n\n[Answer B]")[0]
        b = prompt.split("[Answer B]\n")[1].split("\n\nReply with")[0]
        if StubJudge.mode == "longer":  # the longer answer wins; equal lengths tie
            verdict = "A" if len(a) > len(b) else "B" if len(b) > len(a) else "tie"
        if StubJudge.mode == "content":
            verdict = "A" if "GOOD" in a else "B"
        elif StubJudge.mode == "always-a":
            verdict = "A"
        elif StubJudge.mode == "tie":
            verdict = "Tie."
        if StubJudge.mode == "garbage":
            payload = b"<html>oops</html>"
        elif StubJudge.mode == "chatty":
            payload = json.dumps({"choices": [{"message": {"content": "I think both are fine but"}}]}).encode()
        else:
            payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": verdict}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture()
def judge_url(monkeypatch):
    server = http.server.HTTPServer(("127.0.0.1", 0), StubJudge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-test")
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()


def test_judge_win_rate_both_orders(judge_url):
    ask = E.http_judge(judge_url, "stub", key_env="TEST_JUDGE_KEY")
    qs, langs = ["q1", "q2"], ["ko", "ko"]
    StubJudge.mode = "content"
    w = E.win_rate(ask, qs, langs, ["GOOD one", "GOOD two"], ["meh", "meh"])
    assert (w["wins"], w["ties"], w["losses"], w["win_rate"], w["win_rate_ties_apart"]) == (4, 0, 0, 1.0, 1.0)
    assert StubJudge.auth == "Bearer sk-test"
    StubJudge.mode = "always-a"  # pure position bias cancels out: one win and one loss per question
    w = E.win_rate(ask, qs, langs, ["x", "y"], ["z", "w"])
    assert (w["wins"], w["losses"], w["win_rate"], w["verdicts"]) == (2, 2, 0.5, [("win", "loss")] * 2)
    StubJudge.mode = "tie"
    w = E.win_rate(ask, qs, langs, ["x", "y"], ["z", "w"])
    assert (w["ties"], w["win_rate"], w["win_rate_ties_apart"], w["tie_rate"]) == (4, 0.5, 0.0, 1.0)
    StubJudge.mode = "garbage"
    with pytest.raises(E.JudgeError, match="not an OpenAI chat completion"):
        E.win_rate(ask, qs, langs, ["x", "y"], ["z", "w"])
    StubJudge.mode = "chatty"  # an unreadable reply is its own outcome, out of the rates, not an abort
    w = E.win_rate(ask, qs, langs, ["x", "y"], ["z", "w"])
    assert (w["invalid"], w["wins"], w["ties"], w["losses"], w["win_rate"]) == (4, 0, 0, 0, 0.0)
    with pytest.raises(E.JudgeError, match="cannot connect"):
        E.http_judge("http://127.0.0.1:9", "stub")("hi")


def test_judge_prompt_names_no_language_unless_asked():
    sent = []
    ask = lambda prompt: sent.append(prompt) or "tie"  # noqa: E731
    E.win_rate(ask, ["Habari yako?"], ["sw"], ["Nzuri sana."], ["I am fine."])
    assert len(sent) == 2 and "[Instruction]\nHabari yako?" in sent[0] and "helpful" in sent[0]
    for prompt in sent:  # nothing about languages, by name, code or rule
        assert "language" not in prompt.lower() and "swahili" not in prompt.lower() and " sw" not in prompt
    sent.clear()
    E.win_rate(ask, ["Habari yako?"], ["sw"], ["Nzuri sana."], ["I am fine."], language_rule=True)
    assert all("The user wrote in Swahili; an answer in another language is a poor answer." in p for p in sent)


def test_win_rate_counts_by_hand():
    """A stub judge that prefers the longer answer, ties equal lengths, and on a question marked 'biased' always says
    A. Per question, (A/B order, B/A order): q1 A longer (win, win); q2 equal (tie, tie); q3 A shorter (loss, loss);
    q4 biased (win, loss). Over 8 verdicts: 3 wins, 2 ties, 3 losses; ties apart 3/8 and 2/8; ties as half 4/8."""
    def ask(prompt):
        a = prompt.split("[Answer A]\n")[1].split("\n\n[Answer B]")[0]
        b = prompt.split("[Answer B]\n")[1].split("\n\nReply with")[0]
        return "A" if "biased" in prompt or len(a) > len(b) else "B" if len(b) > len(a) else "tie"
    w = E.win_rate(ask, ["q1", "q2", "q3", "q4 biased"], ["de"] * 4, ["longer", "same", "s", "x"],
                   ["short", "same", "longer", "y"])
    assert w["verdicts"] == [("win", "win"), ("tie", "tie"), ("loss", "loss"), ("win", "loss")]
    assert (w["wins"], w["ties"], w["losses"]) == (3, 2, 3)
    assert (w["win_rate_ties_apart"], w["tie_rate"], w["win_rate"]) == (3 / 8, 2 / 8, 4 / 8)


def test_unreadable_verdict_is_counted_apart_not_fatal():
    """One reply 'ParogWh' (of 8) aborted the whole evaluation with JudgeError. Now it is an "invalid" verdict: kept
    in the counts and verdicts, out of the rates. By hand: q1 (win, invalid), q2 (tie, tie), q3 (loss, loss),
    q4 (win, win): 7 readable verdicts, 3 wins, 2 ties, 2 losses; ties apart 3/7, ties as half 4/7."""
    def ask(prompt):
        a = prompt.split("[Answer A]\n")[1].split("\n\n[Answer B]")[0]
        b = prompt.split("[Answer B]\n")[1].split("\n\nReply with")[0]
        if "q1" in prompt and a == "short":
            return "ParogWh"
        return "A" if len(a) > len(b) else "B" if len(b) > len(a) else "tie"
    assert E.parse_verdict("ParogWh") == "invalid" and E.parse_verdict(" b.") == "B"
    w = E.win_rate(ask, ["q1", "q2", "q3", "q4"], ["de"] * 4, ["longer", "same", "s", "longest"],
                   ["short", "same", "longer", "x"])
    assert w["verdicts"] == [("win", "invalid"), ("tie", "tie"), ("loss", "loss"), ("win", "win")]
    assert (w["wins"], w["ties"], w["losses"], w["invalid"]) == (3, 2, 2, 1)
    assert (w["win_rate_ties_apart"], w["tie_rate"], w["win_rate"]) == (3 / 7, 2 / 7, 4 / 7)


def test_checkpoint_decoding_refuses_what_it_does_not_implement(tmp_path):
    """--decoding checkpoint decoded num_beams 4 greedily (transformers beam-searches). Now a setting transformers
    acts on and model.generate lacks is refused in one line naming the file and the keys; sampling-only keys are
    refused only with do_sample (transformers ignores them without); the no-op values pass."""
    llama = tiny.make_llama(str(tmp_path / "llama"))
    gen_path = os.path.join(llama, "generation_config.json")
    gen = json.load(open(gen_path))
    model, _ = M.load_model(llama)
    json.dump({**gen, "num_beams": 4, "no_repeat_ngram_size": 3, "length_penalty": 2.0}, open(gen_path, "w"))
    with pytest.raises(ValueError, match=r"generation_config.json: num_beams 4, no_repeat_ngram_size 3: transformers"):
        E.decoding_settings(model, "checkpoint")
    assert E.decoding_settings(model, "greedy")["temperature"] == 0.0  # greedy reads no file
    json.dump({**gen, "typical_p": 0.9}, open(gen_path, "w"))
    assert E.decoding_settings(model, "checkpoint") == {"temperature": 0.0, "repetition_penalty": 1.0}
    json.dump({**gen, "do_sample": True, "typical_p": 0.9}, open(gen_path, "w"))
    with pytest.raises(ValueError, match=r"generation_config.json: typical_p 0.9: "):
        E.decoding_settings(model, "checkpoint")
    json.dump({**gen, "num_beams": 1, "no_repeat_ngram_size": 0, "min_length": 0, "typical_p": 1.0}, open(gen_path, "w"))
    assert E.decoding_settings(model, "checkpoint") == {"temperature": 0.0, "repetition_penalty": 1.0}


def test_eval_cli_keeps_head_to_head_counts(tmp_path, llama_dir, judge_url):
    """eval.py's results.json: per language, the second model's wins, ties and losses against the first, as the stub
    judge's rule (the longer answer wins) gives them on the answers saved beside them."""
    other = tiny.make_llama(str(tmp_path / "other"), seed=3)
    StubJudge.mode = "longer"
    out = str(tmp_path / "eval")
    E.main(["--no-progress", "--models", f"base={llama_dir}", f"other={other}", "--langs", "de", "--num-prompts", "3",
            "--max-new-tokens", "6", "--heldout", "", "--judge", judge_url, "--judge-model", "stub", "--out", out])
    saved = json.load(open(os.path.join(out, "results.json")))
    for lang in ("en", "de"):
        mine = [i for i, p in enumerate(saved["prompts"]) if p["lang"] == lang]
        pairs = [(len(saved["answers"]["other"][i]), len(saved["answers"]["base"][i])) for i in mine]
        w = saved["judge"]["other vs base"][lang]
        want = (2 * sum(x > y for x, y in pairs), 2 * sum(x == y for x, y in pairs), 2 * sum(x < y for x, y in pairs))
        assert (w["wins"], w["ties"], w["losses"]) == want
        assert saved["results"]["other"][f"win_vs_base_{lang}"] == want[0] / 6
        assert saved["results"]["other"][f"tie_vs_base_{lang}"] == want[1] / 6
        assert saved["results"]["other"][f"winhalf_vs_base_{lang}"] == (want[0] + want[1] / 2) / 6


@pytest.mark.skipif(not os.path.isdir(SIB), reason="../shared/data/sib200 not present")
def test_language_id_on_flores_sentences():
    for lang, code in (("en", "eng_Latn"), ("ko", "kor_Hang"), ("zh", "zho_Hans"), ("de", "deu_Latn"),
                       ("id", "ind_Latn")):
        rows = list(csv.DictReader(open(os.path.join(SIB, code, "dev.tsv")), delimiter="\t"))[:20]
        right = sum(E.detect_language(r["text"]) == lang for r in rows)
        assert right >= 18, (lang, right)
    ko = list(csv.DictReader(open(os.path.join(SIB, "kor_Hang", "dev.tsv")), delimiter="\t"))[0]["text"]
    en = list(csv.DictReader(open(os.path.join(SIB, "eng_Latn", "dev.tsv")), delimiter="\t"))[0]["text"]
    assert E.switches_language(f"{ko}\n{en}") and not E.switches_language(f"{ko}\n{ko}")


def test_eval_cli_on_base_and_clo_run(tmp_path):
    llama = tiny.make_llama(str(tmp_path / "llama"))
    par = tmp_path / "par.jsonl"
    par.write_text("".join(json.dumps({"en_instruction": f"Say {w}.", "en_response": f"{w}!",
                                       "ko_instruction": f"{w} 말해.", "ko_response": f"{w}요!"}) + "\n"
                           for w in ("hello", "yes", "blue")))
    run = str(tmp_path / "run")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "clo.py"), "--no-progress", "--model", llama, "--lang",
                        "ko", "--translations", str(par), "--out", run, "--max-steps", "3", "--lr", "5e-3"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    base, _ = M.load_model(llama)
    tuned, tok = E.load_for_eval(run)
    ids = torch.tensor([tok.encode("Say hello.")])
    with torch.no_grad():
        assert (tuned(ids) - base(ids)).abs().max() > 1e-4  # the trained weights (merged/) were loaded
    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"question": "The sky is", "choices": ["blue", "green"], "answer": 0, "lang": "ko"}) + "\n")
    out = str(tmp_path / "eval")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--no-progress", "--models", f"base={llama}",
                        f"clo={run}", "--langs", "ko", "--num-prompts", "2", "--max-new-tokens", "8", "--heldout",
                        str(par), "--mc", str(mc), "--out", out], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    res = json.load(open(os.path.join(out, "results.json")))["results"]
    for name in ("base", "clo"):
        assert set(res[name]) == {"in_lang_en", "in_lang_ko", "confused_en", "confused_ko", "nll_en", "nll_ko",
                                  "mc_acc_ko"}
        assert all(0 <= res[name][k] <= 1 for k in res[name] if not k.startswith("nll"))
    assert res["clo"]["nll_ko"] < res["base"]["nll_ko"]  # it trained on exactly these Korean answers
    assert "| clo |" in r.stdout and os.path.exists(os.path.join(out, "results.md"))


def test_charts_of_results_and_training_curves(tmp_path):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s, "reward_acc": s / 3,
                                                            "nll": 2.0 / s}) + "\n" for s in (1, 2, 3)))
    written = E.plot({"base": {"in_lang_ko": 0.2, "nll_ko": 2.0}, "clo": {"in_lang_ko": 0.9, "nll_ko": 1.5}},
                     {"base": "somewhere/else", "clo": str(run)}, str(tmp_path))
    assert written == [str(tmp_path / "results.png"), str(tmp_path / "training.png")]
    for path in written:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_eval_fixes_and_records_the_date_its_templates_write(tmp_path, monkeypatch):
    """Issue 19.3: a template that writes today's date (strftime_now) gave each model the prompts of the moment it
    rendered them, and results.json did not say which day. Now one date for the run, every model (--date, default
    today), recorded in results.json."""
    from test_resume import DATED, set_clock
    llama = tiny.make_llama(str(tmp_path / "llama"), template=DATED)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"lang": "en", "prompt": "Hi"}) + "\n" + json.dumps({"lang": "ko", "prompt": "안녕"}))
    seen = []

    def answers(model, tok, prompts, *a, **k):  # the prompt as generation sees it; no generation
        seen.append(tok.render_chat([{"role": "user", "content": prompts[0]}]))
        return ["x"] * len(prompts)
    monkeypatch.setattr(E, "answer_prompts", answers)
    set_clock(monkeypatch, "2025-02-01")
    for date, day, argv in (("2025-02-01", "01 Feb 2025", []), ("2024-07-26", "26 Jul 2024", ["--date", "2024-07-26"])):
        out = tmp_path / date
        E.main(["--models", f"a={llama}", f"b={llama}", "--langs", "ko", "--prompts", str(prompts), "--heldout", "",
                "--num-prompts", "1", "--out", str(out), "--no-progress", *argv])
        assert json.load(open(out / "results.json"))["date"] == date
        assert len(seen) % 2 == 0 and all(f"Today Date: {day}<|im_end|>" in s for s in seen[-2:]), seen


def test_decoding_greedy_by_default_or_the_checkpoints_own(tmp_path):
    """--decoding checkpoint reads generation_config.json as transformers does (its defaults for what is unset), and
    the answers equal transformers' generate, which applies the file's repetition_penalty without sampling; the
    default stays plain greedy; results.json records what was used; a temperature 0 with do_sample is refused."""
    transformers = pytest.importorskip("transformers")
    llama = tiny.make_llama(str(tmp_path / "llama"))
    gen_path = os.path.join(llama, "generation_config.json")
    gen = json.load(open(gen_path))
    json.dump({**gen, "do_sample": True, "temperature": 0.7, "top_p": 0.9}, open(gen_path, "w"))
    model, tok = M.load_model(llama)
    ref_cfg, defaults = transformers.GenerationConfig.from_pretrained(llama), E.GENERATION_DEFAULTS
    want = {k: getattr(ref_cfg, k) if getattr(ref_cfg, k) is not None else
            transformers.GenerationConfig._get_default_generation_params()[k] for k in defaults if k != "do_sample"}
    assert E.decoding_settings(model, "checkpoint") == {**want, "seed": 0} and want["top_k"] == 50
    json.dump({**gen, "do_sample": True, "temperature": 0}, open(gen_path, "w"))
    with pytest.raises(ValueError, match=r"generation_config.json: .*temperature 0 must be above 0"):
        E.decoding_settings(model, "checkpoint")
    json.dump({**gen, "repetition_penalty": 1.5, "temperature": 0.3}, open(gen_path, "w"))  # greedy + penalty
    ref = transformers.AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32).eval()
    prompts = [json.loads(line)["prompt"] for line in open(E.DEFAULT_PROMPTS) if '"en"' in line][:2]
    recorded, answers = {}, {}
    for mode in ("greedy", "checkpoint"):
        out = str(tmp_path / mode)
        E.main(["--no-progress", "--models", f"m={llama}", "--langs", "en", "--num-prompts", "2", "--heldout", "",
                "--max-new-tokens", "12", "--dtype", "float32", "--decoding", mode, "--out", out])
        saved = json.load(open(os.path.join(out, "results.json")))
        recorded[mode], answers[mode] = saved["decoding"]["m"], saved["answers"]["m"]
        for prompt, answer in zip(prompts, saved["answers"]["m"]):
            ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": prompt}])])
            kw = {} if mode == "checkpoint" else {"repetition_penalty": 1.0}  # transformers reads the file itself
            new = ref.generate(ids, max_new_tokens=12, **kw)[0, ids.shape[1]:].tolist()
            assert answer == tok.decode(new[:next((i for i, t in enumerate(new) if t in tok.eos_ids), len(new))])
    assert recorded == {"greedy": {"temperature": 0.0, "repetition_penalty": 1.0},
                        "checkpoint": {"temperature": 0.0, "repetition_penalty": 1.5}}
    assert answers["greedy"] != answers["checkpoint"]
