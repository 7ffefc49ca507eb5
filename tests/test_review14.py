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
