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
    material = {"prompts": {"de": ["Hallo"], "en": ["Hello"]}, "heldout": held, "mc": []}
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
    X.clo.save_json(str(out / "eval" / "clo-n4-s0.json"), evaluation)
    with pytest.raises(ValueError, match="delete the evaluation"):
        X.main(argv)


def test_sft_dpo_plan_trains_sft_once(tmp_path):
    a = X.parse_args(["--model", "M", "--lang", "sw", "--data", "oasst1", "--sizes", "8", "--seeds", "0,1",
                      "--methods", "sft,sft+dpo,clo", "--out", str(tmp_path), "--mc", "--", "--lr", "1e-4"])
    runs = X.plan(a)
    names = [r[0] for r in runs]
    assert names == ["sft-n8-s0", "sftdpo-n8-s0", "clo-n8-s0", "sft-n8-s1", "sftdpo-n8-s1", "clo-n8-s1"]
    sft, dpo = runs[0][4], runs[1][4]
    assert "--merge" in sft and sft[sft.index("--data") + 1] == "oasst1" and sft[-2:] == ["--lr", "1e-4"]
    assert dpo[dpo.index("--model") + 1] == os.path.join(str(tmp_path), "runs", "sft-n8-s0", "merged")
    assert dpo[dpo.index("--method") + 1] == "dpo"


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
