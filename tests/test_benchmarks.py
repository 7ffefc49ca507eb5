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
