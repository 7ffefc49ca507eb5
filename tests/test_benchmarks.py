"""The paper's benchmarks (BELEBELE, MMMLU, XCOPA) scored by eval.py against lm-evaluation-harness itself: the
harness's own task templates pointed at local files (nothing downloaded), its HF backend on the same checkpoint; the
same per-choice log-probs (1e-4), the same chosen answers and acc. Plus the offline/hub paths and bad input."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import eval as E
import model as M
import tiny
from conftest import ROOT, smollm2_path

XCOPA = os.path.join(ROOT, "..", "shared", "data", "xcopa")
SW_PASSAGE = "Mwanaume alifungua bomba la maji. Maji yalitiririka kutoka kwenye bomba hadi sakafuni."


def write_bench_dir(folder):
    """Small BELEBELE- and MMMLU-format files (sw, en) with the hub's names, and XCOPA's real files."""
    os.makedirs(folder, exist_ok=True)
    for flores, passage in (("swh_Latn", SW_PASSAGE), ("eng_Latn", "The man opened the tap. Water flowed out.")):
        with open(os.path.join(folder, f"{flores}.jsonl"), "w") as f:
            for i in range(6):
                f.write(json.dumps({"link": "x", "question_number": 1, "flores_passage": passage,
                                    "question": f" Swali {i}? ", "mc_answer1": "maji", "mc_answer2": "bomba",
                                    "mc_answer3": f"sakafu {i}", "mc_answer4": "mwanaume", "dialect": flores,
                                    "correct_answer_num": str(1 + i % 4), "ds": "2023-05-03"}) + "\n")
    for locale in ("SW-KE", "EN-US"):
        with open(os.path.join(folder, f"mmlu_{locale}.csv"), "w") as f:
            f.write(",Question,A,B,C,D,Answer,Subject\n")
            for i in range(6):
                f.write(f'{i},"Ni nini {i} + {i}?\n",{i},{2 * i},"{i}, {i}",sifuri,{"ABCD"[i % 4]},'
                        'abstract_algebra\n')
    if os.path.isdir(XCOPA):
        for lang in ("sw", "id", "zh"):
            shutil.copy(os.path.join(XCOPA, f"val.{lang}.jsonl"), os.path.join(folder, f"test.{lang}.jsonl"))
        shutil.copy(os.path.join(XCOPA, "val.sw.en-translation.jsonl"), os.path.join(folder,
                                                                                      "test.sw.en-translation.jsonl"))
    return folder


def harness_tasks(folder, bench_dir):
    """Task YAMLs for the harness: its own installed templates (belebele, openai-mmmlu with its description, xcopa
    with its utils.py), the data swapped for our local files through the `json`/`csv` dataset builders."""
    import lm_eval
    import yaml
    tasks = os.path.join(os.path.dirname(lm_eval.__file__), "tasks")
    os.makedirs(folder, exist_ok=True)
    shutil.copy(os.path.join(tasks, "xcopa", "utils.py"), os.path.join(folder, "utils.py"))
    bele = yaml.safe_load(open(os.path.join(tasks, "belebele", "_default_template_yaml")))
    mmmlu = yaml.safe_load(open(os.path.join(tasks, "openai-mmmlu", "default", "_default_template_yaml")))
    text = open(os.path.join(tasks, "openai-mmmlu", "default", "mmmlu_sw_ke_abstract_algebra.yaml")).read()
    desc = yaml.safe_load(text.replace("!function ", ""))["description"]
    configs = {"h_belebele_sw": {**bele, "dataset_path": "json", "test_split": "train", "fewshot_split": "train",
                                 "dataset_kwargs": {"data_files": {"train": f"{bench_dir}/swh_Latn.jsonl"}}},
               "h_mmmlu_sw": {**mmmlu, "dataset_path": "csv", "test_split": "train", "fewshot_split": "train",
                              "description": desc,
                              "dataset_kwargs": {"data_files": {"train": f"{bench_dir}/mmlu_SW-KE.csv"}}}}
    for cfg in configs.values():
        cfg.pop("should_decontaminate", None), cfg.pop("doc_to_decontamination_query", None)
    for name, cfg in configs.items():
        with open(os.path.join(folder, f"{name}.yaml"), "w") as f:
            yaml.safe_dump({"task": name, **cfg}, f, allow_unicode=True)
    for lang in ("sw", "id", "zh"):
        with open(os.path.join(folder, f"h_xcopa_{lang}.yaml"), "w") as f:
            f.write(f"task: h_xcopa_{lang}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: "
                    f"{bench_dir}/test.{lang}.jsonl\noutput_type: multiple_choice\ntest_split: test\n"
                    f"doc_to_text: !function utils.doc_to_text_{lang}\ndoc_to_target: label\n"
                    "doc_to_choice: !function utils.doc_to_choice\nmetric_list:\n  - metric: acc\n")
    return ["h_belebele_sw", "h_mmmlu_sw"] + [f"h_xcopa_{l}" for l in ("sw", "id", "zh")]


def harness_run(checkpoint, task_dir, tasks):
    """{task: (per-doc per-choice log-probs, acc, acc_norm or None)} from lm_eval.simple_evaluate on HFLM."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    lm = HFLM(pretrained=checkpoint, dtype="float32", device="cpu", batch_size=8)
    out = simple_evaluate(model=lm, tasks=tasks, num_fewshot=0, log_samples=True,
                          task_manager=TaskManager(include_path=task_dir, include_defaults=False))
    got = {}
    for t in tasks:
        samples = sorted(out["samples"][t], key=lambda s: s["doc_id"])
        lls = [[r[0] for r in s["filtered_resps"]] for s in samples]
        res = out["results"][t]
        got[t] = (lls, res["acc,none"], res.get("acc_norm,none"))
    return got


def ours(model, tok, bench_dir, task):
    _, bench, lang = task.split("_")
    rows = E.read_multiple_choice(E.bench_file(bench, lang, bench_dir), lang)
    return rows, E.choice_logprobs(model, tok, rows, progress=False), E.multiple_choice_accuracy(
        model, tok, rows, progress=False)[lang]


def check_parity(checkpoint, tmp_path):
    pytest.importorskip("lm_eval")
    if not os.path.isdir(XCOPA):
        pytest.skip("../shared/data/xcopa is not here")
    bench_dir = write_bench_dir(str(tmp_path / "bench"))
    tasks = harness_tasks(str(tmp_path / "tasks"), bench_dir)
    theirs = harness_run(checkpoint, str(tmp_path / "tasks"), tasks)
    model, tok = M.load_model(checkpoint)
    for task in tasks:
        rows, lls, acc = ours(model, tok, bench_dir, task)
        h_lls, h_acc, h_norm = theirs[task]
        assert len(lls) == len(h_lls) == len(rows), task
        for mine, ref in zip(lls, h_lls):
            assert mine == pytest.approx(ref, abs=1e-4), task
            assert mine.index(max(mine)) == ref.index(max(ref)), task
        assert acc["acc"] == pytest.approx(h_acc, abs=1e-12), task
        if h_norm is not None:
            assert acc["acc_norm"] == pytest.approx(h_norm, abs=1e-12), task


def test_parity_with_lm_evaluation_harness_tiny(llama_dir, tmp_path):
    check_parity(llama_dir, tmp_path)


def test_parity_with_lm_evaluation_harness_tiny_bos(tmp_path):
    """A tokenizer whose post-processor adds BOS (Llama's): the harness's encode keeps it, so must we."""
    from tokenizers import Tokenizer, processors
    folder = tiny.make_llama(str(tmp_path / "bos"), seed=3)
    tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    tok.save(os.path.join(folder, "tokenizer.json"))
    check_parity(folder, tmp_path)


def test_parity_with_lm_evaluation_harness_smollm2(tmp_path):
    path = smollm2_path()
    if path is None:
        pytest.skip("SmolLM2 is not here (CLO_BUILD_SMOLLM2=1 builds it)")
    check_parity(path, tmp_path)


def test_every_xcopa_language_has_the_harness_connectors(tmp_path):
    """All 11 XCOPA languages read as the harness's xcopa_<lang> doc_to_text/doc_to_choice write them; an unknown
    language is an error naming the table (it used to fall back to English for tr, vi, th, ta, ht, qu)."""
    lm_eval = pytest.importorskip("lm_eval")
    sys.path.insert(0, os.path.join(os.path.dirname(lm_eval.__file__), "tasks", "xcopa"))
    import utils as xcopa_utils
    sys.path.pop(0)
    doc = {"premise": "Premise here.", "choice1": "Ölçü A.", "choice2": "Bé B.", "label": 0, "idx": 0}
    for lang in ("et", "ht", "id", "it", "qu", "sw", "ta", "th", "tr", "vi", "zh"):
        for question in ("cause", "effect"):
            path = tmp_path / f"test.{lang}.jsonl"
            path.write_text(json.dumps({**doc, "question": question}, ensure_ascii=False) + "\n")
            row = E.read_multiple_choice(str(path))[0]
            d = {**doc, "question": question}
            assert row["context"] == getattr(xcopa_utils, f"doc_to_text_{lang}")(d), (lang, question)
            assert row["choices"] == xcopa_utils.doc_to_choice(d) and row["lang"] == lang
    (tmp_path / "test.xx.jsonl").write_text(json.dumps({**doc, "question": "cause"}) + "\n")
    with pytest.raises(ValueError, match=r"test.xx.jsonl: line 1: no XCOPA connector for language 'xx'.*"
                                         r"eval.XCOPA_CONNECTORS has"):
        E.read_multiple_choice(str(tmp_path / "test.xx.jsonl"))


def test_bad_benchmark_input(tmp_path):
    d = write_bench_dir(str(tmp_path / "bench"))
    with pytest.raises(ValueError, match=r"--bench 'hellaswag': unknown benchmark; choose from belebele, mmmlu, xcopa"):
        E.bench_file("hellaswag", "sw", d)
    with pytest.raises(ValueError, match=r"--bench-dir .*: no kor_Hang.jsonl for belebele in ko"):
        E.bench_file("belebele", "ko", d)
    assert E.bench_file("belebele", "qu", d) is None and E.bench_file("mmmlu", "tr", d) is None  # lacks them
    bad = tmp_path / "swh_Latn.jsonl"
    bad.write_text(open(os.path.join(d, "swh_Latn.jsonl")).readline() + json.dumps(
        {"flores_passage": "P", "question": "Q", "mc_answer1": "a", "mc_answer2": "b", "mc_answer3": "c",
         "mc_answer4": "d", "correct_answer_num": "7"}) + "\n")
    with pytest.raises(ValueError, match=r"swh_Latn.jsonl: line 2: 'answer' must be the index of the right choice "
                                         r"\(0 to 3\), got '7'"):
        E.read_multiple_choice(str(bad), "sw")
    bad.write_text(json.dumps({"flores_passage": "P", "question": "Q"}) + "\n")
    with pytest.raises(ValueError, match=r"swh_Latn.jsonl: line 1: no field 'mc_answer1'"):
        E.read_multiple_choice(str(bad), "sw")
    csv_bad = tmp_path / "mmlu_SW-KE.csv"
    csv_bad.write_text("Question,A,B,C,D,Answer,Subject\nQ?,1,2,3,4,E,anatomy\n")
    with pytest.raises(ValueError, match=r"mmlu_SW-KE.csv: line 2: 'answer' must be the index"):
        E.read_multiple_choice(str(csv_bad), "sw")


def test_prompt_formats_by_hand(tmp_path):
    d = write_bench_dir(str(tmp_path / "bench"))
    b = E.read_multiple_choice(os.path.join(d, "swh_Latn.jsonl"), "sw")[1]
    assert b == {"context": f"P: {SW_PASSAGE}\nQ: Swali 1?\nA: maji\nB: bomba\nC: sakafu 1\nD: mwanaume\nAnswer:",
                 "choices": ["A", "B", "C", "D"], "answer": 1, "lang": "sw"}
    m = E.read_multiple_choice(os.path.join(d, "mmlu_SW-KE.csv"), "sw")[2]
    assert m["context"] == ("The following are multiple choice questions (with answers) about abstract algebra "
                            "(Swahili).\n\nNi nini 2 + 2?\nA. 2\nB. 4\nC. 2, 2\nD. sifuri\nAnswer:")
    assert m["answer"] == 2
    en = E.read_multiple_choice(os.path.join(d, "mmlu_EN-US.csv"), "en")[0]["context"]
    assert en.startswith("The following are multiple choice questions (with answers) about abstract algebra.\n\n")
    rows = list(range(100))
    assert E.subset(rows, 5) == E.subset(rows, 5) == sorted(E.subset(rows, 5)) and len(E.subset(rows, 5)) == 5
    assert E.subset(rows, None) == rows == E.subset(rows, 500)


def test_bench_files_from_the_hub_cache_layout(tmp_path):
    """The hub path, offline, against the cache layout huggingface_hub writes (as the model loader's test does)."""
    d = write_bench_dir(str(tmp_path / "bench"))
    sha = "0123456789abcdef0123456789abcdef01234567"
    for repo, sub, name in (("facebook/belebele", "data", "swh_Latn.jsonl"), ("openai/MMMLU", "test", "mmlu_SW-KE.csv")):
        base = tmp_path / "hub" / ("datasets--" + repo.replace("/", "--"))
        os.makedirs(base / "snapshots" / sha / sub)
        shutil.copy(os.path.join(d, name), base / "snapshots" / sha / sub / name)
        os.makedirs(base / "refs")
        (base / "refs" / "main").write_text(sha)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "PYTHONPATH": ROOT}
    code = ("import eval as E; print(E.bench_file('belebele', 'sw')); print(E.bench_file('mmmlu', 'sw')); "
            "print(len(E.read_multiple_choice(E.bench_file('mmmlu', 'sw'), 'sw')))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    bele, mmmlu, n = out.stdout.split()
    assert bele.startswith(str(tmp_path / "hub")) and bele.endswith("data/swh_Latn.jsonl")
    assert mmmlu.endswith("test/mmlu_SW-KE.csv") and n == "6"
    out = subprocess.run([sys.executable, "-c", "import eval as E; E.bench_file('belebele', 'de')"], env=env,
                         capture_output=True, text=True, cwd=ROOT)
    assert "belebele: could not fetch facebook/belebele/data/deu_Latn.jsonl from the hub" in out.stderr


def test_offline_end_to_end_benchmarks_and_translated_alpaca_eval(llama_dir, m2m_dir, tmp_path):
    """eval.py --bench from a local bench dir and --prompts from a local alpaca_eval.json translated by a tiny
    M2M100: the paper's table columns per language, results.json with acc_norm, and a rerun translates nothing."""
    d = write_bench_dir(str(tmp_path / "bench"))
    alpaca = tmp_path / "alpaca_eval.json"
    alpaca.write_text(json.dumps([{"instruction": f"Say hello number {i}.", "output": "Hello.", "generator": "x",
                                   "dataset": "helpful_base"} for i in range(4)]))
    out = str(tmp_path / "eval")
    cmd = [sys.executable, os.path.join(ROOT, "eval.py"), "--no-progress", "--models", f"base={llama_dir}",
           f"sft={llama_dir}", "--langs", "sw", "--prompts", str(alpaca), "--translator", m2m_dir, "--num-prompts",
           "2", "--max-new-tokens", "4", "--heldout", "", "--bench", "belebele,mmmlu,xcopa", "--bench-dir", d,
           "--num-items", "3", "--out", out]
    if not os.path.isdir(XCOPA):
        cmd[cmd.index("belebele,mmmlu,xcopa")] = "belebele,mmmlu"
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    saved = json.load(open(os.path.join(out, "results.json")))
    res, bench = saved["results"]["base"], saved["benchmarks"]["base"]
    for b in ("belebele", "mmmlu") + (("xcopa",) if os.path.isdir(XCOPA) else ()):
        for lang in ("sw", "en"):
            assert bench[b][lang]["n"] == 3 and res[f"{b}_{lang}"] == bench[b][lang]["acc"]
            assert 0 <= bench[b][lang]["acc_norm"] <= 1
    assert [p["lang"] for p in saved["prompts"]] == ["en", "en", "sw", "sw"]
    assert saved["prompts"][0]["prompt"] == "Say hello number 0."
    cache = os.path.join(out, "alpaca_eval.translations.jsonl")
    assert len(open(cache).readlines()) == 2
    header = next(l for l in r.stdout.splitlines() if l.startswith("| model |")).split(" | ")
    assert header.index("belebele_sw") < header.index("in_lang_sw") < header.index("belebele_en")  # sw first, en last
    r = subprocess.run(cmd[:cmd.index("--translator") + 1] + ["/no/such/translator"] + cmd[cmd.index(m2m_dir) + 1:],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr  # everything was in the cache: the translator was never loaded


@pytest.mark.parametrize("header,row,message", [
    (",Question,A,B,C,D,Answer,Subject", '0,q,a,b,c,d,,college_medicine', "got ''"),
    (",Question,A,B,C,D,Answer,Subject", '0,q,a,b,c,d,BC,college_medicine', "got 'BC'"),
])
def test_malformed_mmmlu_answers_are_refused(tmp_path, header, row, message):
    path = tmp_path / "mmlu_SW-KE.csv"
    path.write_text(header + "\n" + row + "\n")
    with pytest.raises(ValueError, match=f"line 2: 'answer' must be the index of the right choice .*{message}"):
        E.read_multiple_choice(str(path), "sw")


@pytest.mark.parametrize("value", [2.9, "2.9", True, "five"])
def test_malformed_belebele_and_xcopa_answers_are_refused(tmp_path, value):
    bele = tmp_path / "swh_Latn.jsonl"
    bele.write_text(json.dumps({"flores_passage": "P", "question": "Q", "mc_answer1": "a", "mc_answer2": "b",
                                "mc_answer3": "c", "mc_answer4": "d", "correct_answer_num": value}) + "\n")
    with pytest.raises(ValueError, match="line 1: 'answer' must be the index"):
        E.read_multiple_choice(str(bele), "sw")
    xcopa = tmp_path / "test.sw.jsonl"
    xcopa.write_text(json.dumps({"premise": "P.", "choice1": "A", "choice2": "B", "question": "cause",
                                 "label": True if value is True else value, "idx": 0}) + "\n")
    with pytest.raises(ValueError, match="line 1: 'answer' must be the index"):
        E.read_multiple_choice(str(xcopa), "sw")


def test_generic_mc_trailing_whitespace_as_the_harness(llama_dir, tmp_path):
    """A generic --mc question ending in whitespace ("...Answer: "): the harness's _encode_pair moves the context's
    trailing whitespace into the continuation before tokenizing; its HF backend's log-likelihoods of the requests a
    multiple_choice task sends, (question, " " + choice), on the same checkpoint, to 1e-4."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    questions = ["Question: What is 1+1?\nAnswer: ", "The sky is\n", "Hello, how are  \t", "2+2?"]
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps({"question": q, "choices": ["2", "blue", "you today", " four"], "answer": 0})
                            + "\n" for q in questions))
    rows = E.read_multiple_choice(str(path))
    model, tok = M.load_model(llama_dir)
    mine = E.choice_logprobs(model, tok, rows, progress=False)
    lm = HFLM(pretrained=llama_dir, dtype="float32", device="cpu", batch_size=4)
    reqs = [Instance("loglikelihood", {}, (r["context"], f" {c}"), i) for i, r in enumerate(rows) for c in r["choices"]]
    theirs = [ll for ll, _ in lm.loglikelihood(reqs, disable_tqdm=True)]
    assert [x for row in mine for x in row] == pytest.approx(theirs, abs=1e-4)
