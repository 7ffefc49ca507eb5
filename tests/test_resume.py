"""A run folder never lies (issue 14): --resume refuses state made with other settings, naming the setting; a short
run is checkpointed by default; whatever a kill leaves (a torn file, a checkpoint between its two renames) is
recovered; user files are read whole; Ctrl-C and a full disk end in one line naming what was kept. Every resumed run
is compared with an uninterrupted one, bitwise.

Most runs go through clo.main in this process (the same code path as the command line, without a new interpreter per
run); one test kills a real process with SIGKILL."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import clo
import data as D
import tiny
from conftest import ROOT
from test_clo import PARALLEL

# 3 items, 6 pairs (ko), 1 item (2 pairs) a step: 3 steps an epoch, 9 in all; the default cadence saves at steps 3, 6
STEPS = 9


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    par = tmp / "parallel.jsonl"
    par.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in PARALLEL))
    llama = tiny.make_llama(str(tmp / "llama"))
    common = ["--model", llama, "--translations", str(par), "--lang", "ko", "--batch-size", "1", "--grad-accum", "1",
              "--lr", "1e-3", "--tune", "lora", "--no-progress"]
    straight = {}
    for max_len in ("1024", "64"):  # 64: one pair fewer (a prompt over half of it)
        out = str(tmp / f"straight-{max_len}")
        clo.main([*common, "--max-len", max_len, "--out", out])
        straight[max_len] = out
    return tmp, common, straight


def run(capsys, *argv):
    """clo.py's command line, in this process: (exit code, stdout, stderr)."""
    code = 0
    try:
        D.exit_on_error(lambda: clo.main(list(argv)), FloatingPointError, kept=clo.stopped_run_note)
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_same_adapter(a, b):
    x, y = load_file(os.path.join(a, "adapter_model.safetensors")), load_file(os.path.join(b, "adapter_model.safetensors"))
    assert x.keys() == y.keys()
    for k in x:
        assert torch.equal(x[k], y[k]), k


def metric_steps(out):
    return [json.loads(l)["step"] for l in open(os.path.join(out, "metrics.jsonl"))]


def stopped_run(capsys, setup, name, after, *extra):
    tmp, common, _ = setup
    out = str(tmp / name)
    code, stdout, err = run(capsys, *common, *extra, "--out", out, "--stop-after", str(after))
    assert code == 0 and f"stopped after step {after} of {STEPS}" in stdout, err
    assert (f"checkpoint in {out}/checkpoint; continue with: python clo.py ... --out {out} --resume (the same "
            "options)") in stdout  # the command to continue (clo.final_message's, before: never printed)
    return out


def test_default_cadence_checkpoints_a_short_run_killed_after_its_middle_step(setup, capsys):
    """The old default (--save-every 100) never saved a run of 9 steps: a kill lost everything and --resume silently
    started over. Now a quarter of the run: a SIGKILL during step 6 resumes from step 3."""
    tmp, common, straight = setup
    out = str(tmp / "killed")
    script = (f"import os, signal, sys\nsys.path.insert(0, {ROOT!r})\nimport clo\nreal = clo.lr_at\n"
              "def lr_at(step, *a):\n"
              "    if step == 5:  # 5 steps done, the 6th under way\n"
              "        os.kill(os.getpid(), signal.SIGKILL)\n"
              "    return real(step, *a)\n"
              f"clo.lr_at = lr_at\nclo.main({[*common, '--out', out]!r})\n")
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert "checkpoints: every 3 steps and every 30 minutes (9 steps in all)" in killed.stdout
    code, stdout, err = run(capsys, *common, "--out", out, "--resume")
    assert code == 0, err
    assert f"resumed from {out}/checkpoint at step 3 of 9" in stdout
    assert_same_adapter(out, straight["1024"])
    assert metric_steps(out) == list(range(1, STEPS + 1))


@pytest.mark.parametrize("change,said", [
    (["--max-len", "64"], "--max-len 1024, now 64"),
    (["--lang", "ko,sw"], "--lang ko, now ko,sw"),
    (["--batch-size", "3"], "--batch-size 1, now 3"),
    (["--grad-accum", "2"], "--grad-accum 1, now 2"),
    (["--lr", "2e-3"], "--lr 0.001, now 0.002"),
    (["--method", "sft"], "--method clo, now sft; --lam 0.5, now 1.0"),  # sft fixes lam
    (["--beta", "0.2"], "--beta 0.1, now 0.2"),
    (["--lam", "0.3"], "--lam 0.5, now 0.3"),
    (["--tune", "attn"], "--tune lora, now attn"),
    (["--lora-r", "8"], "--lora-r 16, now 8"),
    (["--epochs", "2"], "--epochs 3, now 2"),
    (["--seed", "1"], "--seed 0, now 1"),
    (["--method", "sft-target"], "--method clo, now sft-target; --lam 0.5, now 1.0"),
    (["--pairing", "pairs"], "--pairing items, now pairs"),
])
def test_resume_with_another_setting_is_refused_naming_it(setup, capsys, change, said):
    """Before: --max-len silently reused the old reference table for other pairs, --lang died in an IndexError,
    --batch-size continued on another batch plan. Now one line at start, and the folder is left as it was."""
    tmp, common, _ = setup
    out = str(tmp / "stopped-for-refusal")
    if not os.path.exists(out):
        stopped_run(capsys, setup, "stopped-for-refusal", 3)
    before = {n: open(os.path.join(out, n), "rb").read() for n in ("args.json", "checkpoint/progress.json",
                                                                   "metrics.jsonl", "reference_logps.safetensors")}
    code, stdout, err = run(capsys, *common, *change, "--out", out, "--resume")
    assert code == 2 and err.count("\n") == 1, err
    assert err == (f"error: --resume: {out} was made with {said}. Rerun with the same settings, or use a new --out "
                   "(or drop --resume) to start over.\n")
    assert "reference log-probs" not in stdout and "training" not in stdout  # refused before any work
    assert before == {n: open(os.path.join(out, n), "rb").read() for n in before}


def test_resume_with_other_pairs_model_files_or_ranks_is_refused(setup, capsys, tmp_path):
    tmp, common, _ = setup
    out = stopped_run(capsys, setup, "stopped-for-pairs", 2)
    edited = tmp_path / "edited.jsonl"  # the same English items, one translation changed
    rows = [dict(r) for r in PARALLEL]
    rows[1]["ko_response"] = "남색."
    edited.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    argv = [a if a != common[common.index("--translations") + 1] else str(edited) for a in common]
    code, stdout, err = run(capsys, *argv, "--out", out, "--resume")
    assert code == 2 and "was made with other training pairs (their tokens differ" in err and "\n" not in err[:-1]
    # the model's files changed since (a rewritten config.json, say): another model
    model = tmp_path / "llama"
    shutil.copytree(common[1], model)
    out2 = stopped_run(capsys, setup, "stopped-for-model", 1, "--model", str(model))
    os.utime(model / "config.json", ns=(1, 1))
    code, _, err = run(capsys, *common, "--model", str(model), "--out", out2, "--resume")
    assert code == 2 and "was made with other files in --model (config.json or weights changed since)" in err
    # ranks (torchrun's --nproc_per_node) are part of the batch plan
    old = clo.run_settings(clo.parse_args(common[:-1]), common[1], 2)
    new = clo.run_settings(clo.parse_args(common[:-1]), common[1], 1)
    assert clo.setting_differences(old, new, clo.TRAINING_SETTINGS) == ["2 ranks, now 1"]
    assert clo.setting_differences(old, old, clo.TRAINING_SETTINGS) == []


def test_reference_table_of_other_settings_is_recomputed_and_said(setup, capsys):
    """No checkpoint yet (killed in the reference pass or before the first save), then --resume with another
    --max-len: the stale table (6 rows for 5 pairs) was used before; now it is recomputed, and the run equals a
    straight run at --max-len 64 bitwise."""
    tmp, common, straight = setup
    out = stopped_run(capsys, setup, "stale-reference", 2)
    shutil.rmtree(os.path.join(out, "checkpoint"))
    code, stdout, err = run(capsys, *common, "--max-len", "64", "--out", out, "--resume")
    assert code == 0, err
    assert f"--resume: no checkpoint in {out}: starting at step 0" in stdout
    assert (f"{out}/reference_logps.safetensors: computed with --max-len 1024, now 64: recomputing it"
            in stdout)
    assert_same_adapter(out, straight["64"])
    assert metric_steps(out) == list(range(1, STEPS + 1))


def test_checkpoint_between_its_two_renames_is_found(setup, capsys, tmp_path):
    """save_checkpoint renames checkpoint -> checkpoint.old, then checkpoint.tmp -> checkpoint. A kill between the two
    left no checkpoint/ and --resume silently started over; the newest complete one is now taken wherever it is."""
    tmp, common, straight = setup
    at3 = stopped_run(capsys, setup, "at3", 3)
    at6 = stopped_run(capsys, setup, "at6", 6)
    out = str(tmp_path / "between")
    shutil.copytree(at6, out)
    os.rename(os.path.join(out, "checkpoint"), os.path.join(out, "checkpoint.tmp"))
    shutil.copytree(os.path.join(at3, "checkpoint"), os.path.join(out, "checkpoint.old"))
    code, stdout, err = run(capsys, *common, "--out", out, "--resume")
    assert code == 0, err
    assert f"checkpoint: took {out}/checkpoint.tmp (step 6)" in stdout and "at step 6 of 9" in stdout
    assert_same_adapter(out, straight["1024"])
    assert metric_steps(out) == list(range(1, STEPS + 1))
    assert not any(os.path.exists(os.path.join(out, n)) for n in ("checkpoint", "checkpoint.tmp", "checkpoint.old"))


def test_torn_files_of_a_kill_during_writes_are_tolerated(setup, capsys, tmp_path):
    """A kill while writing: a new checkpoint half written (checkpoint.tmp with a cut state file and no
    progress.json), a reference table cut short (a SafetensorError traceback before), metrics.jsonl ending in half a
    line ("Unterminated string" naming no file before). The run resumes from the last whole checkpoint and ends
    bitwise equal to a straight run."""
    tmp, common, straight = setup
    out = str(tmp_path / "torn")
    shutil.copytree(stopped_run(capsys, setup, "torn-source", 4), out)
    partial = os.path.join(out, "checkpoint.tmp")
    os.makedirs(partial)
    state = open(os.path.join(out, "checkpoint", "state.safetensors"), "rb").read()
    open(os.path.join(partial, "state.safetensors"), "wb").write(state[:len(state) // 2])
    ref = os.path.join(out, "reference_logps.safetensors")
    data = open(ref, "rb").read()
    open(ref, "wb").write(data[:len(data) - 7])
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"step": 5, "epoch": 1.667, "loss": 0.6')
    code, stdout, err = run(capsys, *common, "--out", out, "--resume")
    assert code == 0, err
    assert f"{ref}: unreadable (cut short by a kill?): recomputing it" in stdout
    assert f"{out}/metrics.jsonl: line 5 was cut short by a kill" in stdout
    assert "at step 4 of 9" in stdout  # checkpoint/ (--stop-after 4), not the half-written tmp
    assert_same_adapter(out, straight["1024"])
    assert metric_steps(out) == list(range(1, STEPS + 1))


@pytest.mark.parametrize("fault", ["ctrl-c", "disk full"])
def test_ctrl_c_and_a_full_disk_end_in_one_line_naming_the_checkpoint(setup, capsys, tmp_path, monkeypatch, fault):
    """Before: a 55-line KeyboardInterrupt traceback; a SafetensorError traceback. Now one line each, naming the last
    good checkpoint, which --resume continues from to the same result."""
    tmp, common, straight = setup
    out = str(tmp_path / "run")
    if fault == "ctrl-c":
        real = clo.lr_at

        def lr_at(step, *a):
            if step == 4:
                raise KeyboardInterrupt
            return real(step, *a)
        monkeypatch.setattr(clo, "lr_at", lr_at)
    else:
        import safetensors.torch
        from safetensors import SafetensorError
        real, saves = safetensors.torch.save_file, []

        def save_file(tensors, path, metadata=None):
            if "checkpoint.tmp" in path:
                saves.append(path)
                if len(saves) == 2:  # the save at step 6: the disk is full
                    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
            return real(tensors, path, metadata=metadata)
        monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    code, stdout, err = run(capsys, *common, "--out", out)
    step = 3
    if fault == "ctrl-c":
        assert code == 130
        assert err == f"interrupted (Ctrl-C); kept: {out}/checkpoint (step {step}); continue with --resume\n"
    else:
        assert code == 2
        assert err == (f"error: disk full: {out}/checkpoint.tmp/state.safetensors: could not write it: No space left "
                       f"on device; kept: {out}/checkpoint (step {step}); continue with --resume\n")
        assert not os.path.exists(os.path.join(out, "checkpoint.tmp"))  # what the failed save took is freed
    monkeypatch.undo()
    code, stdout, err = run(capsys, *common, "--out", out, "--resume")
    assert code == 0 and f"at step {step} of 9" in stdout, err
    assert_same_adapter(out, straight["1024"])


def test_ctrl_c_before_any_checkpoint_says_so(setup, capsys, tmp_path, monkeypatch):
    tmp, common, _ = setup
    out = str(tmp_path / "run")
    monkeypatch.setattr(clo, "reference_logps", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    code, _, err = run(capsys, *common, "--out", out)
    assert code == 130 and err == (f"interrupted (Ctrl-C); no checkpoint in {out} yet: --resume will start at step 0 "
                                   "(finished translations are kept in its cache)\n")


def test_finished_run_is_said_and_left_alone_and_args_json_is_the_first(setup, capsys, tmp_path):
    tmp, common, straight = setup
    out = str(tmp_path / "finished")
    shutil.copytree(straight["1024"], out)
    args_before = open(os.path.join(out, "args.json")).read()
    adapter = os.path.join(out, "adapter_model.safetensors")
    mtime = os.stat(adapter).st_mtime_ns
    code, stdout, err = run(capsys, *common, "--out", out, "--resume", "--merge")  # --merge: changes no state
    assert code == 0, err
    assert f"{out} is finished (9 steps; see summary.json): nothing to resume" in stdout
    assert os.stat(adapter).st_mtime_ns == mtime and not os.path.exists(os.path.join(out, "merged"))
    assert open(os.path.join(out, "args.json")).read() == args_before
    # more epochs on a finished run (LlamaFactory #3975: it just ended; transformers #18070: the LR had decayed to 0)
    code, _, err = run(capsys, *common, "--out", out, "--resume", "--epochs", "5")
    assert code == 2 and "was made with --epochs 3, now 5" in err
    # a stopped run resumed with a setting that changes nothing saved (--no-pack: float rounding only): its
    # args.json stays the one it was started with
    stopped = stopped_run(capsys, setup, "first-args", 2)
    first = json.load(open(os.path.join(stopped, "args.json")))
    code, stdout, err = run(capsys, *common, "--no-pack", "--out", stopped, "--resume", "--stop-after", "4")
    assert code == 0 and "at step 2 of 9" in stdout, err
    assert json.load(open(os.path.join(stopped, "args.json"))) == first and first["pack"] is True
    # a new run (no --resume) in a folder with a checkpoint says it removes it
    code, stdout, err = run(capsys, *common, "--out", stopped, "--max-steps", "1")
    assert code == 0 and f"{stopped}: removing the checkpoint (step 4) of an earlier run there" in stdout, err
    assert json.load(open(os.path.join(stopped, "args.json")))["max_steps"] == 1


def test_translations_file_without_final_newline_keeps_all_rows(setup, capsys, tmp_path):
    """The torn-line rule of the run's own cache dropped a user file's last row when it had no final newline."""
    tmp, common, _ = setup
    path = tmp_path / "no-newline.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in PARALLEL))  # no final newline
    assert len(D.read_parallel(str(path), ["ko"])) == 3
    assert len(D.read_translations(str(path))) == 3
    argv = [a if not a.endswith("parallel.jsonl") else str(path) for a in common]
    code, stdout, err = run(capsys, *argv, "--out", str(tmp_path / "run"), "--max-steps", "1")
    assert code == 0 and "pairs: 6 kept of 6" in stdout, err
    # a user file whose last line is broken is an error naming it, not a row dropped in silence
    path.write_text(path.read_text() + '\n{"en_instruction": "cut')
    with pytest.raises(ValueError, match=r"no-newline.jsonl: line 4: not valid JSON"):
        D.read_translations(str(path))
    # the run's own cache: a half line is dropped and said; a whole row missing only its newline is kept
    cache = tmp_path / "cache.jsonl"
    cache.write_text(json.dumps(PARALLEL[0]) + "\n" + json.dumps(PARALLEL[1]))
    said = []
    assert len(D.read_translations(str(cache), own=True, log=said.append)) == 2 and not said
    D.append_jsonl(str(cache), [PARALLEL[2]])
    assert [json.loads(l) for l in open(cache)] == PARALLEL
    cache.write_text(cache.read_text() + '{"en_instruction": "cut')
    assert len(D.read_translations(str(cache), own=True, log=said.append)) == 3
    assert said == [f"{cache}: line 4 was cut short by a kill (no final newline, not valid JSON): dropped; what it "
                    "held is redone"]


def test_rows_holding_line_separators_read_back_whole(tmp_path):
    """json.dumps(ensure_ascii=False) writes U+2028, U+2029 and U+0085 raw inside strings; str.splitlines() cut such a
    row in two, so a --data/--translations file holding one was "not valid JSON" at a valid line, and the run's own
    translation cache, which clo writes itself, could not be read back on --resume. Lines are split at "\\n" only."""
    rows = [dict(PARALLEL[0], en_response="Hello\u2028there!"), dict(PARALLEL[1], ko_response="파란\u0085색."),
            dict(PARALLEL[2], en_instruction="Count\u2029to three.")]
    user = tmp_path / "user.jsonl"
    user.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert [r for r in D.read_translations(str(user)).values()] == rows
    cache = tmp_path / "cache.jsonl"  # the run's own cache, written as translate_items writes it
    D.append_jsonl(str(cache), rows[:2])
    D.append_jsonl(str(cache), rows[2:])
    said = []
    assert list(D.read_translations(str(cache), own=True, log=said.append).values()) == rows and not said
    # an Alpaca JSON array (--data) with one inside a string
    alpaca = tmp_path / "alpaca.json"
    items = [{"instruction": "Say\u2028hi.", "input": "", "output": "Hi\u0085!"}]
    alpaca.write_text(json.dumps(items, ensure_ascii=False, indent=2), encoding="utf-8")
    assert [{k: v for k, v in r.items() if k != "_line"} for r in D.read_jsonl(str(alpaca))] == items
    # line numbers and the torn-last-line rule are unchanged
    torn = tmp_path / "torn.jsonl"
    torn.write_text(json.dumps(rows[0], ensure_ascii=False) + "\r\n\n" + json.dumps(rows[1], ensure_ascii=False)
                    + "\n" + '{"en_instruction": "cu', encoding="utf-8")
    assert [r["_line"] for r in D.read_jsonl(str(torn), own=True, log=said.append)] == [1, 3]
    assert said == [f"{torn}: line 4 was cut short by a kill (no final newline, not valid JSON): dropped; what it "
                    "held is redone"]


def test_resume_without_a_checkpoint_records_the_settings_it_trains_with(tmp_path, capsys):
    """--resume in a folder whose run was killed before its first checkpoint starts at step 0 with whatever settings
    it is given (nothing saved depends on the old ones), yet kept the old args.json: the finished folder said
    --lr 0.001 in args.json and 0.002 in summary.json. args.json is now this run's."""
    par = tmp_path / "parallel.jsonl"
    par.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in PARALLEL))
    common = ["--model", tiny.make_llama(str(tmp_path / "llama")), "--translations", str(par), "--lang", "ko",
              "--batch-size", "2", "--grad-accum", "1", "--no-progress", "--max-steps", "2", "--out",
              str(tmp_path / "run")]
    clo.main([*common, "--lr", "1e-3", "--stop-after", "1"])
    shutil.rmtree(tmp_path / "run" / "checkpoint")  # killed before its first checkpoint
    clo.main([*common, "--lr", "2e-3", "--resume"])
    assert "--resume: no checkpoint in" in capsys.readouterr().out
    args = json.load(open(tmp_path / "run" / "args.json"))
    summary = json.load(open(tmp_path / "run" / "summary.json"))
    assert args["lr"] == summary["settings"]["lr"] == 2e-3


def test_readme_says_what_resume_checks():
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text[text.index("### Resuming a run"):]
    section = section[:section.index("\n#", 1)]
    for flag in ("--model", "--dtype", "--lang", "--max-len", "--method", "--beta", "--lam", "--pairing",
                 "--tune", "--lora-r", "--lr", "--warmup", "--epochs", "--max-steps", "--batch-size", "--grad-accum",
                 "--seed", "ranks", "--save-every", "--save-minutes", "--stop-after", "args.json", "finished"):
        assert flag in section, flag
    help_text = subprocess.run([sys.executable, os.path.join(ROOT, "clo.py"), "--help"], capture_output=True,
                               text=True, cwd=ROOT).stdout
    assert "--stop-after" in help_text and "a quarter of the run's steps" in " ".join(help_text.split())


def test_other_english_items_are_refused_before_any_translation(tmp_path, capsys, monkeypatch):
    """A checkpointed run, resumed with another --num-samples: refused by the English items' digest before the
    translator is loaded, not after hours of translating the new items. A changed --translator is refused too."""
    llama = tiny.make_llama(str(tmp_path / "llama"))
    m2m = tiny.make_m2m100(str(tmp_path / "m2m"), seed=2, eos_bias=0.7)
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"instruction": f"Say {w}.", "output": f"{w}!"}) + "\n"
                           for w in ("hello", "goodbye", "thanks")))
    out = str(tmp_path / "run")
    common = ["--model", llama, "--data", str(sft), "--lang", "ko", "--num-beams", "1", "--batch-size", "1",
              "--grad-accum", "1", "--max-steps", "3", "--keep-flagged", "--out", out, "--no-progress"]
    code, printed, err = run(capsys, *common, "--translator", m2m, "--num-samples", "2", "--stop-after", "1")
    assert code == 0 and "stopped after step 1" in printed, err

    def no_translator(*a, **k):
        raise AssertionError("the translator was loaded")
    monkeypatch.setattr(D, "load_translator", no_translator)
    code, printed, err = run(capsys, *common, "--translator", m2m, "--num-samples", "3", "--resume")
    assert code == 2 and "other English items (--data, --num-samples or the --translations file changed)" in err
    code, printed, err = run(capsys, *common, "--translator", str(tmp_path / "m2m2"), "--num-samples", "2",
                             "--resume")
    assert code == 2 and f"--translator {m2m}, now {tmp_path / 'm2m2'}" in err


# as Llama 3.2's: the system header carries today's date from strftime_now
DATED = ("{{ bos_token }}<|im_start|>system\nToday Date: {{ strftime_now('%d %b %Y') }}<|im_end|>\n"
         "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def set_clock(monkeypatch, day):
    """The day both readings of the clock say, the old code's (datetime.now at each render) and clo's (date.today)."""
    import datetime
    real_date, real_datetime = monkeypatch.__dict__.setdefault("real_clock", (datetime.date, datetime.datetime))

    class Date(real_date):
        @classmethod
        def today(cls):
            return cls.fromisoformat(day)

    class Datetime(real_datetime):
        @classmethod
        def now(cls, tz=None):
            return cls.fromisoformat(f"{day}T12:00:00")
    monkeypatch.setattr(datetime, "date", Date)
    monkeypatch.setattr(datetime, "datetime", Datetime)


def test_a_template_that_writes_the_date_resumes_the_next_day(tmp_path, capsys, monkeypatch):
    """Issue 19.3: strftime_now read the clock at each render, so a run stopped one day and resumed the next had
    other pairs, and --resume refused it blaming --data/--translations/the cache. Now the run's date is fixed when it
    starts (args.json, and the settings its checkpoints record) and --resume keeps it: the resumed run equals an
    uninterrupted one bitwise. A checkpoint of an older clo (no date recorded) is refused naming the date."""
    import transformers
    import model as M
    llama = tiny.make_llama(str(tmp_path / "llama"), template=DATED)
    tok, ref = M.Tokenizer(llama), transformers.AutoTokenizer.from_pretrained(llama)
    convo = [{"role": "user", "content": "Hi"}]
    assert tok.render_chat(convo) == ref.apply_chat_template(convo, add_generation_prompt=True, tokenize=False)
    par = tmp_path / "parallel.jsonl"
    par.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in PARALLEL))
    common = ["--model", llama, "--translations", str(par), "--lang", "ko", "--batch-size", "2", "--grad-accum", "1",
              "--lr", "1e-3", "--max-steps", "3", "--no-progress", "--tune", "lora"]  # compared: the adapters
    set_clock(monkeypatch, "2025-01-31")
    clo.main([*common, "--out", str(tmp_path / "straight")])
    for name in ("older", "stopped"):
        code, said, err = run(capsys, *common, "--out", str(tmp_path / name), "--stop-after", "1")
        assert code == 0, err
    set_clock(monkeypatch, "2025-02-01")  # the next day
    code, printed, err = run(capsys, *common, "--out", str(tmp_path / "stopped"), "--resume")
    assert code == 0 and "resumed from" in printed, err  # was: "made with other training pairs (... --data ...)"
    assert "chat template: writes the date (strftime_now): 2025-01-31, this run's" in said + printed
    assert_same_adapter(str(tmp_path / "stopped"), str(tmp_path / "straight"))
    summary = json.load(open(tmp_path / "stopped" / "summary.json"))
    assert summary["settings"]["date"] == json.load(open(tmp_path / "stopped" / "args.json"))["date"] == "2025-01-31"
    tok.date = "2025-01-31"  # what the run trained on, not today's
    assert "Today Date: 31 Jan 2025" in tok.render_chat(convo) and tok.dated
    older = tmp_path / "older"  # as an older clo left it: no date in args.json or in the checkpoint's settings
    for path in (older / "args.json", older / "checkpoint" / "progress.json"):
        saved = json.load(open(path))
        saved.pop("date", None), (saved.get("settings") or {}).pop("date", None)
        json.dump(saved, open(path, "w"))
    code, printed, err = run(capsys, *common, "--out", str(older), "--resume")
    assert code == 2 and err == (f"error: --resume: {older} was made by an older clo, which did not record the date "
                                 "the chat template writes (strftime_now), and its pairs differ from today's "
                                 "(2025-02-01); use a new --out (or drop --resume) to start over.\n")


def test_a_checkpoint_of_the_older_format_still_resumes(setup, capsys, tmp_path):
    """Checkpoints before issue 19.1 held rank 0's CPU random state alone, as "rng/cpu": one process takes it, as
    before, and the run equals an uninterrupted one bitwise."""
    from safetensors.torch import save_file
    tmp, common, straight = setup
    out = stopped_run(capsys, setup, "older-format", 3)
    path = os.path.join(out, "checkpoint", "state.safetensors")
    tensors = load_file(path)
    assert [k for k in tensors if k.startswith("rng/")] == ["rng/cpu/0"]  # one process on the CPU: no CUDA state
    tensors["rng/cpu"] = tensors.pop("rng/cpu/0")
    save_file(tensors, path)
    code, stdout, err = run(capsys, *common, "--out", out, "--resume")
    assert code == 0 and "at step 3 of 9" in stdout and "older checkpoint" not in stdout, err
    assert_same_adapter(out, straight["1024"])


@pytest.mark.parametrize("tune", ["lora", "attn"])
def test_resumed_bf16_run_continues_bit_identically(setup, capsys, tune):
    """Mixed precision (issue 21): the checkpoint holds the fp32 trained tensors and AdamW state; the bf16 frozen
    weights are reloaded from the model as they were: a bf16 run stopped at step 4 and resumed ends bitwise where
    an uninterrupted one does."""
    tmp, common, _ = setup
    extra = ("--dtype", "bfloat16", "--tune", tune)
    straight = str(tmp / f"straight-bf16-{tune}")
    assert run(capsys, *common, *extra, "--out", straight)[0] == 0
    out = stopped_run(capsys, setup, f"stopped-bf16-{tune}", 4, *extra)
    code, stdout, err = run(capsys, *common, *extra, "--out", out, "--resume")
    assert code == 0 and "resumed from" in stdout, err
    name = "adapter_model.safetensors" if tune == "lora" else "merged/model.safetensors"
    a, b = load_file(os.path.join(straight, name)), load_file(os.path.join(out, name))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [json.loads(l)["loss"] for l in open(os.path.join(straight, "metrics.jsonl"))] == [
        json.loads(l)["loss"] for l in open(os.path.join(out, "metrics.jsonl"))]


@pytest.mark.parametrize("after", [1, 3])
def test_resume_with_stop_after_at_or_below_the_checkpoint_is_refused(setup, capsys, after):
    """Before: --resume --stop-after 1 on a checkpoint at step 3 ran step 4 and said "stopped after step 4 of 9
    (--stop-after 1)". Now one line as soon as the checkpoint is found, and the folder is left as it was."""
    tmp, common, _ = setup
    out = str(tmp / "stopped-for-stop-after")
    if not os.path.exists(out):
        stopped_run(capsys, setup, "stopped-for-stop-after", 3)
    before = {n: open(os.path.join(out, n), "rb").read() for n in ("checkpoint/progress.json", "metrics.jsonl")}
    code, stdout, err = run(capsys, *common, "--out", out, "--resume", "--stop-after", str(after))
    assert (code, err) == (2, f"error: --stop-after {after}: the checkpoint is already at step 3; give a later step, "
                              "or drop --stop-after.\n"), err
    assert "training" not in stdout and "stopped after" not in stdout
    assert before == {n: open(os.path.join(out, n), "rb").read() for n in before}
