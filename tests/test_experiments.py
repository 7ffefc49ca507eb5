"""bench/experiments.py: the echo rule on hand-made cases, the held-out preference accuracy against a by-hand
computation, and the whole command end to end on a tiny checkpoint (two sizes, two methods, one seed), including a
rerun after a 'kill' that must not redo finished runs."""
import json
import os
import sys

import pytest

import tiny
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import experiments as X  # noqa: E402


def test_echo_rule():
    q = "Janets Enten legen 16 Eier pro Tag. Wie viel Dollar nimmt sie täglich ein?"
    assert X.is_echo(q, q)                                                  # verbatim repeat
    assert X.is_echo(q, "  janets enten legen 16 Eier\npro Tag. Und dann kauft sie noch Brot.")  # repeat + continue
    assert X.is_echo(q, "Sie sagt: Wie viel Dollar nimmt sie täglich ein?")  # mostly copied (LCS >= half)
    assert X.is_echo(q, "")                                                 # nothing
    assert not X.is_echo(q, "Sie verdient 18 Dollar am Tag, denn 16 - 3 - 4 = 9 Eier zu je 2 Dollar.")
    assert not X.is_echo(q, "Die Enten legen viele Eier; sie verkauft den Rest für 2 Dollar und verdient 18 Dollar.")
    # restating the premise, then answering, is an answer (XCOPA-style prompt); the whole prompt said again is not
    p = "The girl was exhausted. What was the cause?"
    assert not X.is_echo(p, "The girl was exhausted. The cause of her exhaustion was a long night of work.")
    assert X.is_echo(p, "The girl was exhausted. What was the cause? She was tired and sad.")
    # a near-copy with changed letters (SmolLM2's answer to MGSM de #3): the copied stretches add up
    mike = ("Mike spielt 40 Minuten lang Pingpong. In den ersten 20 Minuten macht er 4 Punkte. In den zweiten 20 "
            "Minuten macht er 25 % mehr Punkte. Wie viele Punkte hat er insgesamt gemacht?")
    near = "Mike spielt 40 Minen lang Pingpong. In den ersten 20 Minen macht er 4 Punkte. In den darauf 20 Minen macht er"
    assert X.copied_share(mike, near) > 0.75 and X.is_echo(mike, near)
    # the boundary, by hand: the answer "abcdefghijkl" + "wxyzwxyzwxyz" (24 characters) copies one 12-character
    # stretch of the prompt: share 12/24 = 0.5, an echo; with the copied stretch 11 characters long it is below the
    # 12-character block size and counts nothing
    prompt = "abcdefghijkl and more"
    assert X.copied_share(prompt, "abcdefghijkl" + "wxyzwxyzwxyz") == 0.5 and X.is_echo(prompt, "abcdefghijklwxyzwxyzwxyz")
    assert X.copied_share(prompt, "abcdefghijk" + "wxyzwxyzwxyzw") == 0.0


def test_fidelity_counts_echoes_as_failures():
    q = ["Schreibe einen Satz über Reisen und über die schönsten Orte in Deutschland."] * 3
    answers = [q[0],                                                        # German, but an echo
               "Die Alpen sind im Sommer ein wunderbares Reiseziel für Wanderer aus aller Welt.",  # German answer
               "The Alps are a wonderful destination for hikers from all over the world."]      # English
    f = X.fidelity(q, answers, "de")
    assert f == {"fidelity": pytest.approx(1 / 3), "in_lang": pytest.approx(2 / 3), "echo": pytest.approx(1 / 3),
                 "loop": 0}
    # a German answer that degenerates into a loop is in the language, and still a failure
    answers[1] = "Die Alpen sind im Sommer schön schön schön schön schön und die Berge sind hoch."
    f = X.fidelity(q, answers, "de")
    assert f["in_lang"] == pytest.approx(2 / 3) and f["loop"] == pytest.approx(1 / 3) and f["fidelity"] == 0


def test_loop_rule():
    # rule 1: a unit of 2-4 words three times back to back, one word four times; punctuation and case ignored
    assert X.is_loop("Alikamilisha kazi yake ya ziada kuza kuza kuza kuza")  # the pilot's CLO answer, cut short
    assert X.is_loop("Aufwilich, wenn der 43 Brownies verkauft, wie vielen können, wie vielen können, Wie vielen können")
    assert X.is_loop("ya kwa ya kwa ya kwa")
    assert not X.is_loop("ya kwa ya kwa")                                  # twice is not a loop
    assert not X.is_loop("Sie hat 5 + 5 + 5 = 15 Eier.")                    # a unit needs a letter: "5 5 5" is math
    assert not X.is_loop("Die, die die Regeln kennen, gewinnen.")           # one word three times is German
    # rule 2, seq-rep-4: a five-word sentence said three times has 7 repeated 4-grams of 12 (>= 0.5); said twice,
    # 2 of 7 (a real answer may restate a sentence once)
    assert X.is_loop("Tommy anafanya mchango wa hisa. Tommy anafanya mchango wa hisa. Tommy anafanya mchango wa hisa.")
    assert not X.is_loop("Tommy anafanya mchango wa hisa. Tommy anafanya mchango wa hisa.")
    # rule 3: letters inside a word, or one character ten times
    assert X.is_loop("Das ist eine schwelz, er wird die Schlösschlösschlösschlös")  # a 6-letter unit, 4 times
    assert X.is_loop("Kila shule imetuma timu ya kakakaka")
    assert not X.is_loop("Mississippi ist ein Fluss.")
    assert X.is_loop("Das ist eine neue Auswahl, die die 10.100000000000000001")
    assert not X.is_loop("Sie zahlte 1000000000 Dollar.")
    # real prose and math are not loops
    assert not X.is_loop("Sie verdient 18 Dollar am Tag, denn 16 - 3 - 4 = 9 Eier zu je 2 Dollar.")
    assert not X.is_loop("Kimo has three 1-hour classes each day, so he spends 3 * 1 = 3 hours per day.\nIn one "
                         "semester, there are 16 weeks of school, so he spends 16 * 3 = 48 hours.")
    # mostly Chinese/Japanese/Korean text: read character by character, letters only
    assert X.is_loop("我我我我我") and X.is_loop("答案是答案是答案是") and X.is_loop("谢谢。\n好的好的好的好的")
    assert not X.is_loop("她每天卖鸭蛋赚十八美元。") and not X.is_loop("10000")
    assert not X.is_loop("") and not X.is_loop("a")


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def parallel_rows(n, offset=0):
    return [{"en_instruction": f"Write about the dog number {i}.", "en_response": f"The dog {i} sleeps today.",
             "de_instruction": f"Schreibe über den Hund Nummer {i}.", "de_response": f"Der Hund {i} schläft heute."}
            for i in range(offset, offset + n)]


def test_preference_accuracy_by_hand(tmp_path, llama_dir):
    """pref_acc from evaluate() equals the margins computed by hand from clo.sequence_logps on each pair."""
    import clo
    import data as D
    import model as M
    held = parallel_rows(3, 100)
    base, tok = M.load_model(llama_dir)
    other = tiny.make_llama(str(tmp_path / "other"), seed=5)
    pol, _ = M.load_model(other)

    def logp(model, prompt, response):
        p, (r,), _ = D.conversation_tokens(tok, prompt, [response])
        return clo.sequence_logps(model, D.collate_sequences([(p, r)], tok.pad_id), 1)[0].item()
    want = {}
    for lang, o in (("de", "en"), ("en", "de")):
        hits = 0
        for r in held:
            x = r[f"{lang}_instruction"]
            m = ((logp(pol, x, r[f"{lang}_response"]) - logp(base, x, r[f"{lang}_response"]))
                 - (logp(pol, x, r[f"{o}_response"]) - logp(base, x, r[f"{o}_response"])))
            hits += m > 0
        want[lang] = hits / len(held)
    a = X.parse_args(["--model", llama_dir, "--lang", "de", "--out", str(tmp_path / "o"), "--mc"])
    material = {"prompts": {"de": ["Hallo"], "en": ["Hello"]}, "heldout": held, "mc": [], "bench": {}, "alpaca": None}
    _, _, ref = X.evaluate(llama_dir, material, a, "base")
    metrics, _, _ = X.evaluate(other, material, a, "other", ref={k: tuple(v) for k, v in ref.items()})
    assert metrics["pref_acc_de"] == pytest.approx(want["de"])
    assert metrics["pref_acc_en"] == pytest.approx(want["en"])


def test_end_to_end_and_rerun_after_kill(tmp_path, llama_dir):
    data, held, mc = tmp_path / "train.jsonl", tmp_path / "held.jsonl", tmp_path / "mc.jsonl"
    write_jsonl(data, parallel_rows(4))
    write_jsonl(held, parallel_rows(3, 100))
    write_jsonl(mc, [{"question": "The dog", "choices": ["sleeps", "flies"], "answer": 0, "lang": "en"},
                     {"question": "Der Hund", "choices": ["schläft", "fliegt"], "answer": 0, "lang": "de"}])
    out = tmp_path / "exp"
    argv = ["--model", llama_dir, "--lang", "de", "--data", str(data), "--sizes", "2,4", "--seeds", "0",
            "--methods", "sft,clo", "--heldout", str(held), "--num-prompts", "2", "--mc", str(mc),
            "--max-new-tokens", "8", "--out", str(out),
            "--", "--epochs", "1", "--batch-size", "2", "--grad-accum", "1", "--max-len", "128"]
    X.main(argv)
    names = ["sft-n2-s0", "clo-n2-s0", "sft-n4-s0", "clo-n4-s0"]
    for n in names:
        assert os.path.exists(out / "runs" / n / "summary.json"), n
        assert os.path.exists(out / "eval" / f"{n}.json"), n
        args = json.load(open(out / "runs" / n / "args.json"))
        assert args["num_samples"] == int(n.split("-n")[1].split("-")[0]) and args["seed"] == 0
        assert args["method"] == n.split("-")[0] and args["epochs"] == 1
    res = json.load(open(out / "results.json"))
    assert res["primary_metric"] == "fidelity_de"
    assert set(res["table"]) == {"base", "sft", "clo"} and set(res["table"]["clo"]) == {"2", "4"}
    cell = res["table"]["clo"]["4"]
    for k in ("fidelity_de", "fidelity_en", "echo_de", "in_lang_de", "pref_acc_de", "pref_acc_en", "nll_de",
              "nll_en", "mc_de", "mc_en"):
        assert k in cell, k
    assert "pref_acc_de" not in res["table"]["base"]["0"]  # base against itself has no margin
    table = open(out / "table.md").read()
    assert "| clo | 4 | 1 |" in table and "| sft | 2 | 1 |" in table and "±" not in table  # one seed: no spread
    assert open(out / "figure.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # every fidelity answer is there with its verdicts, and the metric is their count
    answers = json.load(open(out / "answers.json"))["runs"]["clo-n4-s0"]["de"]
    assert [v["answer"] for v in answers] == json.load(open(out / "eval" / "clo-n4-s0.json"))["answers"]["de"]
    ok = sum(v["detected"] == "de" and not v["echo"] and not v["loop"] for v in answers)
    assert cell["fidelity_de"]["mean"] == ok / len(answers)
    # the figure's numbers are the evaluations' numbers
    assert cell["nll_de"]["mean"] == json.load(open(out / "eval" / "clo-n4-s0.json"))["metrics"]["nll_de"]

    # a 'kill': one run lost its folder mid-training (no summary.json), one evaluation never got written
    stamps = {n: os.path.getmtime(out / "runs" / n / "summary.json") for n in names}
    import shutil
    shutil.rmtree(out / "runs" / "clo-n4-s0")
    os.remove(out / "eval" / "clo-n4-s0.json")
    os.remove(out / "eval" / "sft-n2-s0.json")
    X.main(argv)
    for n in ("sft-n2-s0", "clo-n2-s0", "sft-n4-s0"):
        assert os.path.getmtime(out / "runs" / n / "summary.json") == stamps[n], f"{n} was trained again"
    assert os.path.exists(out / "runs" / "clo-n4-s0" / "summary.json")
    assert os.path.exists(out / "eval" / "sft-n2-s0.json") and os.path.exists(out / "eval" / "clo-n4-s0.json")
    log = open(out / "runs" / "sft-n2-s0" / "train.log").read()
    assert log.count("clo.py") == 1  # the finished run's log holds one command: it was not started again
    # a partial report from what is evaluated, and no mixing of evaluations made on other material
    assert set(X.main(argv[:argv.index("--")] + ["--report-only"])) == {"base", "sft", "clo"}
    changed = list(argv)
    changed[changed.index("--num-prompts") + 1] = "1"
    with pytest.raises(ValueError, match="other settings"):
        X.main(changed)
    with pytest.raises(ValueError, match="other settings"):  # nor in a report of saved evaluations
        X.main(changed[:changed.index("--")] + ["--report-only"])
    # finished runs are not silently reused with other training options, and the JSON keeps what each run was
    # trained with, whatever the report was written with
    with pytest.raises(ValueError, match="trained with another command"):
        X.main(argv[:-1] + ["64"])
    assert json.load(open(out / "results.json"))["run_args"]["clo-n4-s0"]["max_len"] == 128
    # an evaluation of a run that was since retrained with other options is not reused
    evaluation = json.load(open(out / "eval" / "clo-n4-s0.json"))
    evaluation["source"] = evaluation["source"].replace("--max-len 128", "--max-len 64")
    X.D.save_json(str(out / "eval" / "clo-n4-s0.json"), evaluation)
    with pytest.raises(ValueError, match="delete the evaluation"):
        X.main(argv)


def test_sft_dpo_plan_trains_sft_once(tmp_path):
    a = X.parse_args(["--model", "M", "--lang", "sw", "--data", "oasst1", "--sizes", "8", "--seeds", "0,1",
                      "--methods", "sft,sft+dpo,clo", "--out", str(tmp_path), "--mc", "--translator", "T",
                      "--", "--lr", "1e-4"])
    runs = X.plan(a)
    names = [r[0] for r in runs]
    assert names == ["sft-n8-s0", "sftdpo-n8-s0", "clo-n8-s0", "sft-n8-s1", "sftdpo-n8-s1", "clo-n8-s1"]
    sft, dpo = runs[0][4], runs[1][4]
    assert "--merge" in sft and sft[sft.index("--data") + 1] == "oasst1" and sft[-2:] == ["--lr", "1e-4"]
    assert dpo[dpo.index("--model") + 1] == os.path.join(str(tmp_path), "runs", "sft-n8-s0", "merged")
    assert dpo[dpo.index("--method") + 1] == "dpo"
    for run in runs:  # English data: every run translates it with the grid's one translator
        assert run[4][run[4].index("--translator") + 1] == "T"


def test_lam_reaches_only_the_methods_that_leave_it_free(tmp_path):
    """clo.py refuses --lam with sft and dpo (METHODS fixes their lambda): `-- --lam 0.3` goes to the CLO runs only,
    and each run's command is one clo.py accepts."""
    a = X.parse_args(["--model", "M", "--lang", "sw", "--data", "oasst1", "--sizes", "8", "--seeds", "0",
                      "--methods", "sft,sft+dpo,clo", "--out", str(tmp_path), "--mc", "--translator", "T",
                      "--", "--lam", "0.3", "--beta=0.2", "--lr=1e-4"])
    argv = {name: cmd for name, _, _, _, cmd in X.plan(a)}
    assert argv["clo-n8-s0"][-4:] == ["--lam", "0.3", "--beta=0.2", "--lr=1e-4"]
    for name in ("sft-n8-s0", "sftdpo-n8-s0"):
        assert "--lam" not in argv[name] and argv[name][-1] == "--lr=1e-4"
    for name, cmd in argv.items():  # what clo.py's own rule says of each command, before any file is read
        lam = X.clo.METHODS[cmd[cmd.index("--method") + 1]][0]
        assert ("--lam" in cmd) == (lam is None) and ("--beta=0.2" in cmd) == (lam != 1.0), name


def test_translations_shared_across_the_grid(tmp_path):
    a = X.parse_args(["--model", "M", "--lang", "sw", "--data", "oasst1", "--out", str(tmp_path), "--mc"])
    runs = tmp_path / "runs"
    for name, lines in (("sft-n2-s0", 2), ("sft-n4-s0", 4)):
        os.makedirs(runs / name)
        (runs / name / "translations.jsonl").write_text("{}\n" * lines)
    os.makedirs(runs / "clo-n4-s0")
    X.share_translations(str(runs / "clo-n4-s0"), a)
    assert (runs / "clo-n4-s0" / "translations.jsonl").read_text() == "{}\n" * 4   # the largest cache
    (runs / "sft-n2-s0" / "translations.jsonl").write_text("mine\n")
    X.share_translations(str(runs / "sft-n2-s0"), a)
    assert (runs / "sft-n2-s0" / "translations.jsonl").read_text() == "mine\n"     # never overwrites a run's own


def test_sign_test_by_hand():
    # 5 prompts better, 1 worse: P(split at least this uneven | fair coin) = 2 * (C(6,0) + C(6,1)) / 2^6 = 14/64
    assert X.sign_test(5, 1) == pytest.approx(14 / 64)
    assert X.sign_test(1, 5) == X.sign_test(5, 1)
    assert X.sign_test(8, 0) == pytest.approx(2 / 256)
    assert X.sign_test(3, 3) == 1.0 and X.sign_test(0, 0) == 1.0   # capped at 1; nothing to compare


def test_paired_comparison_counts_prompts_not_seeds():
    """Three prompts, two seeds. CLO passes prompt 0 on both seeds and prompt 1 on one; SFT passes prompt 1 on both
    and prompt 2 on both. Prompt scores (share of seeds passing): CLO (1, 0.5, 0), SFT (0, 1, 1): CLO higher on 1
    prompt, lower on 2."""
    def answers(passes):
        return [{"detected": "de" if p else "en", "echo": False, "loop": False} for p in passes]
    audit = {"runs": {"base": {"de": answers([0, 0, 0])},
                      "clo-n4-s0": {"de": answers([1, 1, 0])}, "clo-n4-s1": {"de": answers([1, 0, 0])},
                      "sft-n4-s0": {"de": answers([0, 1, 1])}, "sft-n4-s1": {"de": answers([0, 1, 1])}}}
    runs = [(f"{m}-n4-s{s}", m, 4, s, []) for s in (0, 1) for m in ("sft", "clo")]
    a = X.parse_args(["--model", "M", "--lang", "de", "--sizes", "4", "--seeds", "0,1", "--methods", "sft,clo",
                      "--out", "/tmp/unused", "--mc"])
    rows = {r["clo_vs"]: r for r in X.paired(audit, runs, a)}
    assert (rows["sft"]["wins"], rows["sft"]["losses"], rows["sft"]["prompts"]) == (1, 2, 3)
    assert rows["sft"]["p"] == pytest.approx(X.sign_test(1, 2)) == 1.0
    assert (rows["base"]["wins"], rows["base"]["losses"]) == (2, 0)


@pytest.mark.parametrize("extra, message", [
    (["--", "--seed", "7"], "set by the grid itself"),           # would silently override each run's seed
    (["--", "--num-samp=800"], "set by the grid itself"),         # an abbreviation argparse would accept
    (["--seeds", "1,1"], "distinct integers"),                    # one run counted twice: a fake spread of 0
    (["--sizes", "16,0"], "distinct integers of at least 1"),
    (["--seeds", "a"], "comma-separated integers"),
    (["--sizes", "900"], "has only 800 items"),                   # clo.py would train on 800 and label it 900
    (["--data", X.D.DEFAULT_DATA, "--sizes", "176"], r"--sizes 176: \S+alpaca_seed_en.jsonl has only 175 items"),
    (["--methods", "clo,clo"], "repeated"),
    (["--data", "nowhere.jsonl"], "no such file"),
    (["--lang", "ko"], "no held-out fidelity prompts"),           # the SIB prompts are the trained templates
    (["--", "--translator", "m"], "set by the grid itself"),      # the grid's one translator, for data and AlpacaEval
    (["--alpaca", "alpaca_eval"], "give --judge"),                # answers nobody would judge
    (["--alpaca", "alpaca_eval", "--judge", "http://j", "--methods", "clo,dpo"], "lacks them"),
    (["--alpaca", "nowhere.json", "--judge", "http://j"], "no such file"),
    (["--bench", "belebele,hellaswag"], "not one of belebele"),
    (["--num-alpaca", "0"], "must be at least 1"),
])
def test_grid_refuses_bad_options(extra, message):
    argv = ["--model", "M", "--lang", "de", "--out", "/tmp/unused-grid", "--mc"]
    if "--" in extra:
        argv += extra
    else:
        argv = argv + extra if extra[0] != "--lang" else ["--model", "M", "--out", "/tmp/unused-grid", "--mc"] + extra
    with pytest.raises(ValueError, match=message):
        X.parse_args(argv)


def test_grid_refuses_a_size_oasst1_cannot_fill_before_any_run(tmp_path, monkeypatch):
    """English --data was not counted (issue 20.4): the grid trained the smaller sizes, then clo.py stopped."""
    monkeypatch.setattr(X.D, "load_oasst1", lambda: [{"instruction": "q", "response": "a"}] * 3)
    with pytest.raises(ValueError, match=r"^--sizes 4: oasst1 has only 3 items\.$"):
        X.main(["--model", "M", "--lang", "sw", "--data", "oasst1", "--sizes", "2,4", "--out", str(tmp_path / "g"),
                "--mc"])
    assert not (tmp_path / "g").exists()


def test_grid_refuses_parallel_data_without_the_language(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", parallel_rows(4))   # en and de only
    with pytest.raises(ValueError, match=r"no sw_instruction/sw_response columns; the file has \['de_response', "
                                         r"'en_response'\]"):
        X.parse_args(["--model", "M", "--lang", "sw", "--data", str(tmp_path / "d.jsonl"), "--out", "/tmp/u", "--mc"])


class LongerWins(__import__("http.server").server.BaseHTTPRequestHandler):
    """A stub OpenAI-compatible judge: the longer answer wins, equal lengths tie. Keeps every prompt it was sent."""
    prompts = []

    def do_POST(self):
        prompt = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["messages"][0]["content"]
        LongerWins.prompts.append(prompt)
        a, b = answers_in(prompt)
        verdict = "A" if len(a) > len(b) else "B" if len(b) > len(a) else "tie"
        body = json.dumps({"choices": [{"message": {"role": "assistant", "content": verdict}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def answers_in(prompt):
    return (prompt.split("[Answer A]\n")[1].split("\n\n[Answer B]")[0],
            prompt.split("[Answer B]\n")[1].split("\n\nReply with")[0])


def test_paper_grid_end_to_end(tmp_path, llama_dir):
    """The paper's grid on tiny checkpoints: --tune attn, SFT, SFT+DPO and CLO (on a parallel file: English --data
    translated inside clo.py is test_clo's; the grid passes --translator to it, test_sft_dpo_plan_trains_sft_once);
    BELEBELE and MMMLU in German and English from --bench-dir; AlpacaEval's English instructions translated by
    --translator, CLO judged head to head against SFT and SFT+DPO by a stub judge. The counts must be the stub's rule
    applied by hand to the saved answers; a rerun must judge nothing again."""
    import http.server
    import threading
    import eval as E
    import model as M
    m2m = tiny.make_m2m100(str(tmp_path / "m2m"), seed=0)  # no eos bias: its translations are never empty
    data = tmp_path / "train.jsonl"
    write_jsonl(data, parallel_rows(2))
    held = tmp_path / "held.jsonl"
    write_jsonl(held, parallel_rows(2, 100))
    bench = tmp_path / "bench"
    bench.mkdir()
    for code in ("deu_Latn", "eng_Latn"):
        write_jsonl(bench / f"{code}.jsonl", [{"flores_passage": f"The dog {i} sleeps.", "question": "Who sleeps?",
                                               **{f"mc_answer{k}": f"thing {k}" for k in range(1, 5)},
                                               "correct_answer_num": str(1 + i % 4)} for i in range(3)])
    for locale in ("DE-DE", "EN-US"):
        (bench / f"mmlu_{locale}.csv").write_text("Question,A,B,C,D,Answer,Subject\n" + "".join(
            f"What is {i} plus {i}?,{i},{2 * i},{3 * i},{4 * i},B,elementary_mathematics\n" for i in range(3)))
    alpaca = tmp_path / "alpaca_eval.json"
    alpaca.write_text(json.dumps([{"instruction": t, "output": "", "generator": "x", "dataset": "x"} for t in
                                  ("Write a short poem about the sea.", "Explain gravity in simple words.",
                                   "What is the capital of France?")]))
    server = http.server.HTTPServer(("127.0.0.1", 0), LongerWins)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    LongerWins.prompts = []
    out = tmp_path / "exp"
    argv = ["--model", llama_dir, "--lang", "de", "--data", str(data), "--translator", m2m, "--sizes", "2",
            "--seeds", "0", "--methods", "sft,sft+dpo,clo", "--heldout", str(held), "--num-prompts", "1", "--mc",
            "--num-heldout", "2", "--max-new-tokens", "4", "--bench", "belebele,mmmlu", "--bench-dir", str(bench),
            "--alpaca", str(alpaca), "--alpaca-max-new-tokens", "12", "--judge",
            f"http://127.0.0.1:{server.server_port}/v1", "--judge-model", "stub", "--out", str(out),
            "--", "--tune", "attn", "--max-steps", "2", "--lr", "0.05", "--batch-size", "2", "--grad-accum", "1",
            "--max-len", "96"]  # a large step, so that the methods answer differently
    try:
        X.main(argv)
        judged = len(LongerWins.prompts)
        X.main(argv)                                   # everything saved: nothing trained, evaluated or judged again
        os.remove(out / "table.md")
        X.main(argv[:argv.index("--")] + ["--report-only"])      # the saved comparisons, in the report
        assert len(LongerWins.prompts) == judged
    finally:
        server.shutdown()
    for name, method in (("sft-n2-s0", "sft"), ("sftdpo-n2-s0", "dpo"), ("clo-n2-s0", "clo")):
        args = json.load(open(out / "runs" / name / "args.json"))
        assert (args["tune"], args["num_samples"], args["method"]) == ("attn", 2, method)
    res = json.load(open(out / "results.json"))
    # the head-to-head prompts are the translator's German for AlpacaEval's instructions, and the judge is neutral
    german = [r["de_instruction"] for r in X.D.read_jsonl(str(out / "alpaca_eval.translations.jsonl"))]
    sent = {p.split("[Instruction]\n")[1].split("\n\n[Answer A]")[0] for p in LongerWins.prompts}
    assert set(german) <= sent and len(german) == 3 and all(german)
    assert not any("language" in p for p in LongerWins.prompts)
    clo_answers = json.load(open(out / "eval" / "clo-n2-s0.json"))["alpaca_answers"]
    rows = {r["clo_vs"]: r for r in res["head_to_head"]}
    cell = res["table"]["clo"]["2"]
    for other, run in (("sft", "sft-n2-s0"), ("sft+dpo", "sftdpo-n2-s0")):
        theirs = json.load(open(out / "eval" / f"{run}.json"))["alpaca_answers"]
        lengths = [(len(x), len(y)) for x, y in zip(clo_answers, theirs)]
        want = [2 * sum(x > y for x, y in lengths), 2 * sum(x == y for x, y in lengths),
                2 * sum(x < y for x, y in lengths)]          # both orders: the stub's verdict is the same twice
        r = rows[other]
        assert [r["wins"], r["ties"], r["losses"]] == want and r["prompts"] == 3
        assert cell[f"win_vs_{other}_de"]["mean"] == want[0] / 6
        assert cell[f"tie_vs_{other}_de"]["mean"] == want[1] / 6
        assert cell[f"winhalf_vs_{other}_de"]["mean"] == (want[0] + want[1] / 2) / 6
        assert (f"| {os.path.basename(llama_dir)} | 2 | {X.LABELS[other]} | 1 | 6 | {want[0]} | {want[1]} | "
                f"{want[2]} | {100 * want[0] / 6:.1f} | {100 * want[1] / 6:.1f} | {100 * want[2] / 6:.1f} | "
                f"{100 * (want[0] + want[1] / 2) / 6:.1f} |") in open(out / "table.md").read()
    # the benchmarks for every method, in both languages; base's numbers are eval.py's scorer on the base model
    for method, size in (("base", "0"), ("sft", "2"), ("sft+dpo", "2"), ("clo", "2")):
        assert {"belebele_de", "belebele_en", "mmmlu_de", "mmmlu_en"} <= set(res["table"][method][size])
    model, tok = M.load_model(llama_dir)
    for b, lang, path in (("belebele", "de", "deu_Latn.jsonl"), ("mmmlu", "en", "mmlu_EN-US.csv")):
        acc = E.multiple_choice_accuracy(model, tok, E.read_multiple_choice(str(bench / path), lang), False)[lang]
        assert res["table"]["base"]["0"][f"{b}_{lang}"]["mean"] == acc["acc"]
    assert "| model | method | items | BELEBELE de | BELEBELE en | MMMLU de | MMMLU en |" in open(out / "table.md").read()
    assert open(out / "figure.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_head_to_head_pooled_over_seeds():
    """Counts summed over seeds, then the rates. The totals are an AlpacaEval 2 leaderboard row (tatsu-lab/alpaca_eval
    issue 471: n_wins 371, n_draws 17, n_wins_base 417 of 805), whose discrete win rate, ties as half, is
    100 * (371 + 17 / 2) / 805 = 47.142857...; with ties apart CLO wins 371 / 805 and loses 417 / 805."""
    rows = [{"items": 4, "seed": 0, "clo_vs": "sft", "prompts": 400, "wins": 200, "ties": 10, "losses": 190},
            {"items": 4, "seed": 1, "clo_vs": "sft", "prompts": 405, "wins": 171, "ties": 7, "losses": 227},
            {"items": 4, "seed": 0, "clo_vs": "sft+dpo", "prompts": 1, "wins": 0, "ties": 2, "losses": 0}]
    got = X.pooled(rows)
    c = got[(4, "sft")]
    assert (c["seeds"], c["prompts"], c["wins"], c["ties"], c["losses"]) == (2, 805, 371, 17, 417)
    assert 100 * c["win_rate"] == pytest.approx(47.142857, abs=1e-6)
    assert (c["win_rate_ties_apart"], c["tie_rate"], c["loss_rate"]) == (371 / 805, 17 / 805, 417 / 805)
    assert got[(4, "sft+dpo")]["win_rate"] == 0.5 and got[(4, "sft+dpo")]["win_rate_ties_apart"] == 0
