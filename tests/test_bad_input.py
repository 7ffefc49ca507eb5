"""Issue 15: bad input -> the exact line clo.py / eval.py print, run as a user runs them (a subprocess): exit 2, one
`error: ...` line, no traceback, and nothing left in the run folder when the error is caught at the start. Also the
end-of-run message (clo.final_message): every output it names exists, and the commands it gives work."""
import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

PY = sys.executable
PARALLEL = os.path.join(ROOT, "samples", "mtbench_parallel_en_de_ko.jsonl")
GET = "`hf download HuggingFaceTB/SmolLM2-135M-Instruct --local-dir models/smollm2`, say"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, llama_dir, m2m_dir):
    """Bad files, each as a user would write it by mistake."""
    d = tmp_path_factory.mktemp("inputs")
    (d / "null_output.jsonl").write_text('{"instruction": "Hi", "input": "", "output": "Hello"}\n'
                                         '{"instruction": "Bye", "input": "", "output": null}\n')
    rows = [{"en_instruction": "Q1", "en_response": "A1", "de_instruction": "F1", "de_response": "A1 de"},
            {"en_instruction": "Q2", "en_response": "A2", "de_instruction": "F2"}]
    (d / "lacking.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "empty.jsonl").write_text("")
    (d / "two.jsonl").write_text('{"instruction": "Hi", "output": "Hello"}\n{"instruction": "Bye", "output": "Ciao"}\n')
    (d / "a_file").write_text("x")
    (d / "test.sw.jsonl").write_text('{"premise": "p", "choice1": "a", "choice2": "b", "question": "cause"}\n')
    (d / "unfinished").mkdir()
    (d / "unfinished" / "args.json").write_text("{}")
    (d / "adapter").mkdir()
    (d / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                                    "target_modules": ["q_proj"],
                                                                    "base_model_name_or_path": llama_dir}))
    (d / "models").mkdir()  # so that models/smol and runs/x are local paths, as in the README's layout
    for name, template in {"misspelt": "{% for m in messages %}{{ m['content'] }}\n{% endfro %}",  # chat templates
                           "unnamed": [{"name": "tool_use", "template": "{{ messages }}"}],
                           "strict": "{{ raise_exception('System message required') }}",
                           "blank": "   \n", "nulltemplate": None, "emptytemplate": ""}.items():
        shutil.copytree(llama_dir, d / name)
        cfg = json.load(open(d / name / "tokenizer_config.json"))
        json.dump(dict(cfg, chat_template=template), open(d / name / "tokenizer_config.json", "w"))
    shutil.copytree(llama_dir, d / "emptyjinja")
    (d / "emptyjinja" / "chat_template.jinja").write_text("")  # found first, so the config's template is not used
    (d / "runs").mkdir()
    return {"d": str(d), "llama": llama_dir, "m2m": m2m_dir}


CLO = ["clo.py", "--no-progress", "--model", "{llama}", "--lang", "de", "--translations", PARALLEL]
EVAL = ["eval.py", "--no-progress", "--models", "base={llama}"]
NO_CUDA = "this torch has no CUDA build" if torch.version.cuda is None else "no GPU is visible"

# (argv, the exact last line printed). {d}: the inputs folder, {out}: the run folder (absent before the run).
CASES = [
    (CLO + ["--grad-accum", "0"], "error: --grad-accum 0: must be at least 1."),
    (CLO + ["--lang", ""], "error: --lang is empty; give the target language(s), e.g. ko or ko,sw."),
    (CLO + ["--lang", " , "], "error: --lang is empty; give the target language(s), e.g. ko or ko,sw."),
    (CLO + ["--batch-size", "0"], "error: --batch-size 0: must be at least 1."),
    (CLO + ["--max-len", "0"], "error: --max-len 0: must be at least 1."),
    (CLO + ["--max-len", "-5"], "error: --max-len -5: must be at least 1."),
    (CLO + ["--epochs", "0"], "error: --epochs 0: must be at least 1."),
    (CLO + ["--lam", "1.5"], "error: --lam 1.5: must be between 0 and 1 (the NLL term's weight; 1 - lam on the pair "
                             "term)."),
    (CLO + ["--lr", "0"], "error: --lr 0.0: must be above 0."),
    (CLO + ["--dtype", "float64"], "clo.py: error: argument --dtype: invalid choice: 'float64' (choose from 'auto', "
                                   "'bf16', 'bfloat16', 'float16', 'float32', 'fp16', 'fp32')"),
    (CLO + ["--device", "tpu9"], "error: --device tpu9: not a device; use cpu, cuda or cuda:N."),
    pytest.param(CLO + ["--device", "cuda"], f"error: --device cuda: CUDA is not available ({NO_CUDA}); use --device "
                 "cpu, or install a CUDA build of torch on a machine with a GPU.",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available")),
    (CLO[:5] + ["en"] + CLO[6:], "error: --lang en: English is the source language; give the target language(s), "
                                 "e.g. ko."),
    (CLO[:5] + ["korean"] + CLO[6:], f"error: --lang korean: {PARALLEL} has no korean_instruction/korean_response "
                                     "columns; its languages: de, ko."),
    (CLO[:5] + ["ko_KR"], "error: --lang ko_KR: unknown language code. Did you mean ko? Use ISO 639-1 "
                                     "codes (" + ", ".join(sorted(__import__("data").FLORES_CODES)) + ") or "
                                     "FLORES-200 codes (kor_Hang)."),
    (CLO[:6] + ["--data", "{d}/null_output.jsonl"],
     "error: {d}/null_output.jsonl: line 2: missing field(s) ['output']. Expected Alpaca format (instruction, input, "
     "output) or chat format (messages: [{role: user, ...}, {role: assistant, ...}])."),
    # a run labelled with more items than the data holds trained on fewer (issue 20.4)
    (CLO + ["--num-samples", "25"], f"error: --num-samples 25: {PARALLEL} has only 24 items; ask for at most 24 (a run "
                                    "labelled 25 would train on fewer)."),
    (CLO[:6] + ["--data", "{d}/two.jsonl", "--num-samples", "3"], "error: --num-samples 3: {d}/two.jsonl has only 2 "
                                                                 "items; ask for at most 2 (a run labelled 3 would "
                                                                 "train on fewer)."),
    (CLO[:7] + ["{d}/nope.jsonl"], "error: --translations {d}/nope.jsonl: no such file."),
    (CLO[:7] + ["{d}/empty.jsonl"], "error: --translations {d}/empty.jsonl: no rows; the file is empty."),
    (CLO[:7] + ["{d}/lacking.jsonl"], "error: {d}/lacking.jsonl: line 2: lacks de_response (a string each); fill it "
                                      "in, or drop the row."),
    (CLO[:3] + ["models/smol"] + CLO[4:], "error: --model models/smol: no such folder. Give a local checkpoint folder "
                                          f"(config.json, *.safetensors, tokenizer.json; {GET}) or a hub id."),
    (CLO[:3] + ["{m2m}"] + CLO[4:], "error: --model {m2m}: an M2M100/NLLB translator, not a chat model; pass it as "
                                    "--translator {m2m}, and the chat model to adapt as --model."),
    (CLO[:3] + ["{d}/adapter"] + CLO[4:], "error: --model {d}/adapter: holds a LoRA adapter, not a model; pass the "
                                          "model it was trained on (base_model_name_or_path in its "
                                          "adapter_config.json), or the merged/ folder of a run trained with --merge."),
    (CLO[:3] + ["{d}/unfinished"] + CLO[4:], "error: --model {d}/unfinished: a clo run folder without a model in it; "
                                             "pass its merged/ folder (a run trained with --merge), or the model it "
                                             "was trained on."),
    (CLO + ["--tune", "lora", "--lora-targets", "q_proj,nope"], "error: LoRA target 'nope' names no layer of the "
                                                                "model; use linear layer names such as q_proj,k_proj,"
                                                                "v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head."),
    (CLO + ["--tune", "lora", "--lora-targets", "embed_tokens"], "error: LoRA target 'embed_tokens' "
                                                                 "(model.embed_tokens, Embedding) is not a linear "
                                                                 "layer: clo puts LoRA on nn.Linear layers only "
                                                                 "(q_proj, ..., down_proj, lm_head)."),
    (CLO + ["--method", "sft", "--lam", "0.3"], "error: --lam 0.3: --method sft fixes lam at 1; drop --lam, or use "
                                                "--method clo."),
    (CLO + ["--lora-r", "8"], "error: --lora-r 8: --tune attn trains full weights, without LoRA; add --tune lora, or "
                              "drop --lora-r."),
    (CLO + ["--out", "{d}/a_file"], "error: --out {d}/a_file: is a file; give a folder (created if missing)."),
    (CLO + ["--out", "{d}/no-such-run", "--resume"], "error: --resume: {d}/no-such-run does not exist, so there is "
                                                     "nothing to resume; check --out, or drop --resume to start a new run."),
    (CLO + ["--out", "{d}/a_file/run"], "error: --out {d}/a_file/run: {d}/a_file is a file, so the folder cannot be "
                                        "made there; give another path."),
    (CLO[:3] + ["{d}/misspelt"] + CLO[4:], "error: {d}/misspelt/tokenizer_config.json: its chat template fails (line "
     "2 of the template): Encountered unknown tag 'endfro'. Jinja was looking for the following tags: 'endfor' or "
     "'else'. The innermost block that needs to be closed is 'for'; fix the template there, or use another checkpoint."),
    (CLO[:3] + ["{d}/unnamed"] + CLO[4:], "error: {d}/unnamed/tokenizer_config.json: 'chat_template' is a list of "
     "named templates (tool_use) without a 'default' one, so which to use is not said; name the one to use 'default', "
     "or save it as chat_template.jinja beside it."),
    (CLO[:3] + ["{d}/blank"] + CLO[4:], "error: {d}/blank/tokenizer_config.json: its chat template renders no "
     "message content ('   ' for a user 'Hi', assistant 'Hello' exchange); fix the template there, or use another "
     "checkpoint."),
    *[(CLO[:3] + [f"{{d}}/{name}"] + CLO[4:6] + ["--translator", "{d}/no-such-translator"], f"error: {{d}}/{name}: "
       "its tokenizer has no chat template (chat_template.jinja, chat_template.json or tokenizer_config.json "
       "'chat_template'); clo needs a chat model, such as the -Instruct release of this one.")
      for name in ("nulltemplate", "emptytemplate", "emptyjinja")],
    (EVAL + ["b={d}/strict"], "error: {d}/strict/tokenizer_config.json: its chat template fails: System message "
                              "required; fix the template there, or use another checkpoint."),
    (EVAL + ["--date", "2025-02-30"], "error: --date 2025-02-30: not a date; give YYYY-MM-DD, e.g. "
                                      f"{__import__('model').today()}."),
    (EVAL + ["--batch-size", "0"], "error: --batch-size 0: must be at least 1."),
    (EVAL + ["--max-new-tokens", "0"], "error: --max-new-tokens 0: must be at least 1."),
    (EVAL + ["b={llama}", "c=runs/x"], "error: --models c=runs/x: no such folder. Give a local checkpoint folder "
                                       f"(config.json, *.safetensors, tokenizer.json; {GET}) or a hub id."),
    (EVAL + ["b={d}/unfinished"], "error: --models b: {d}/unfinished is a clo run that has not finished (no "
                                  "adapter_config.json or merged/ yet): let it finish, or continue it with `python "
                                  "clo.py ... --out {d}/unfinished --resume`."),
    (EVAL + ["base={llama}"], "error: --models: the name base is given twice; give each model its own name."),
    (EVAL + ["{llama}"], "error: --models {llama}: expected NAME=PATH, e.g. base=models/smollm2 "
                         "clo=runs/smollm2-de-clo."),
    (EVAL + ["--mc", "{d}/test.sw.jsonl"], "error: {d}/test.sw.jsonl: line 1: no field 'label'; expected XCOPA, "
                                           "BELEBELE, MMMLU or {question, choices, answer} fields."),
    (EVAL + ["--mc", "{d}/nope.jsonl"], "error: --mc {d}/nope.jsonl: no such file."),
    pytest.param(EVAL + ["--device", "cuda"], f"error: --device cuda: CUDA is not available ({NO_CUDA}); use --device "
                 "cpu, or install a CUDA build of torch on a machine with a GPU.", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available")),
]


@pytest.mark.parametrize("argv,line", CASES)
def test_bad_input_prints_one_line_and_leaves_nothing(argv, line, inputs, tmp_path):
    out = tmp_path / "run"
    fill = dict(inputs, out=str(out))

    def filled(text):  # not str.format: the expected lines hold braces of their own
        for k, v in fill.items():
            text = text.replace("{" + k + "}", v)
        return text
    argv = [filled(a) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(out)]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run([PY, os.path.join(ROOT, argv[0]), *argv[1:]], capture_output=True, text=True, cwd=inputs["d"],
                       env=env, timeout=300)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1] == filled(line)
    assert not out.exists() or not os.listdir(out)


def test_a_hub_model_whose_template_fails_stops_before_translation(inputs, tmp_path, monkeypatch, capsys):
    """A hub id is fetched in main(), not checked by validate_args: its failing template (issue 19.2) was found after
    translation and the reference pass. Now at load (before the weights), and neither runs."""
    import clo
    import data as D
    import model as M
    folder = os.path.join(inputs["d"], "misspelt")
    monkeypatch.setattr(M, "resolve_checkpoint", lambda name, *a, **k: folder if name == "someone/misspelt" else name)

    def never(*a, **k):
        raise AssertionError("work done before the template was checked")
    for module, name in ((D, "load_translator"), (D, "translate_items"), (clo, "reference_logps"), (M, "load_weights")):
        monkeypatch.setattr(module, name, never)
    with pytest.raises(SystemExit) as e:
        D.exit_on_error(lambda: clo.main(["--model", "someone/misspelt", "--lang", "de", "--no-progress", "--out",
                                          str(tmp_path / "run")]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: {folder}/tokenizer_config.json: its chat template fails (line 2"
                                                ) and err.count("\n") == 1, err


def test_final_message_names_outputs_that_exist_and_commands_that_work(llama_dir, tmp_path):
    """A tiny finished LoRA run (--tune lora --merge): each path the message names exists; its eval.py command passes eval.py's
    argument checks; its peft and transformers lines, run as printed, load models that give the same logits."""
    import clo
    import eval as E
    out = str(tmp_path / "run")
    argv = ["--model", llama_dir, "--lang", "de", "--translations", PARALLEL, "--batch-size", "2", "--grad-accum", "1",
            "--max-steps", "1", "--lr", "1e-2", "--tune", "lora", "--merge", "--no-progress", "--out", out, "--device",
            "cpu", "--dtype", "float32"]
    last = clo.main(argv)
    text = clo.final_message(clo.parse_args(argv), out, last)
    lines = text.splitlines()
    assert lines[0].startswith(f"done: {out}  step 1  loss ")
    for name in ("adapter_model.safetensors", "adapter_config.json", "merged", "metrics.jsonl", "summary.json",
                 "pairs.jsonl"):
        assert os.path.join(out, name) in text or name in text, name
        assert os.path.exists(os.path.join(out, name)), name
    command = next(l for l in lines if l.startswith("next: python eval.py "))
    a = E.parse_args(shlex.split(command)[3:])
    assert a.specs == {"base": llama_dir, "clo": out} and a.langs == "de" and a.out == out + "-eval"
    from peft import PeftModel  # noqa: F401  (the names the printed lines use)
    from transformers import AutoModelForCausalLM  # noqa: F401
    peft_line = next(l for l in lines if l.strip().startswith("peft: ")).split("peft: ", 1)[1]
    hf_line = next(l for l in lines if l.strip().startswith("transformers: ")).split("transformers: ", 1)[1]
    ids = torch.tensor([[1, 5, 9, 23, 42, 7]])
    with torch.no_grad():
        a_logits = eval(peft_line).eval()(ids).logits
        b_logits = eval(hf_line).eval()(ids).logits
        base = AutoModelForCausalLM.from_pretrained(llama_dir).eval()(ids).logits
    assert torch.allclose(a_logits, b_logits, atol=1e-4)
    assert not torch.allclose(a_logits, base, atol=1e-6)  # the adapter is there: one step moved the model


def test_help_gives_every_option_a_description_and_default():
    """--help of both scripts: every option has a help text; every option with a value shows its default."""
    import argparse

    import clo
    import eval as E
    for parse in (clo.parse_args, E.parse_args):
        captured = {}

        def grab(self, args=None, namespace=None):
            captured["parser"] = self
            raise SystemExit(0)
        orig = argparse.ArgumentParser.parse_args
        argparse.ArgumentParser.parse_args = grab
        try:
            with pytest.raises(SystemExit):
                parse([])
        finally:
            argparse.ArgumentParser.parse_args = orig
        p = captured["parser"]
        text = p.format_help()
        for action in p._actions:
            if action.dest == "help":
                continue
            assert action.help, action.option_strings
            if action.nargs != 0 and not action.required:
                assert "default" in action.help or action.default is not None, action.option_strings
        assert "(default: 4)" in text or "(default: 8)" in text
