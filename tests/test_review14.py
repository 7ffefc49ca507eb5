"""Review of issue 14 (a run folder never lies): regressions found by trying to break it."""
import json

import data as D
from test_clo import PARALLEL


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
    D._append_lines(str(cache), rows[:2])
    D._append_lines(str(cache), rows[2:])
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
    assert [n for n, _ in D.read_lines(str(torn), own=True, log=said.append)] == [1, 3]
    assert said == [f"{torn}: line 4 was cut short by a kill (no final newline, not valid JSON): dropped; what it "
                    "held is redone"]


def test_resume_without_a_checkpoint_records_the_settings_it_trains_with(tmp_path, capsys):
    """--resume in a folder whose run was killed before its first checkpoint starts at step 0 with whatever settings
    it is given (nothing saved depends on the old ones), yet kept the old args.json: the finished folder said
    --lr 0.001 in args.json and 0.002 in summary.json. args.json is now this run's."""
    import shutil

    import clo
    import tiny
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
