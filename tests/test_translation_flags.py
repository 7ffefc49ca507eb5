"""Translation problems never enter training silently, and --lang accepts what the data has.

A sentence cut at the MT model's input limit (a 700-character string without spaces) is marked once in
translations.jsonl, counted in the printed pairs line and in summary.json, and left out of the pairs unless
--keep-flagged."""
import hashlib
import json

import pytest

import clo
import data as D
import model as M
import tiny

# 700 characters without spaces (a hash, as in a pasted key or URL): no clause mark or word boundary to cut at
BLOB = "".join(hashlib.sha256(str(i).encode()).hexdigest() for i in range(11))[:700]
ITEMS = [{"instruction": "Say hello.", "output": "Hello!"},
         {"instruction": "Repeat the code.", "output": f"The code is {BLOB} and nothing else."},
         {"instruction": "Name a color.", "output": "Blue."}]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flags")
    sft = tmp / "sft.jsonl"
    sft.write_text("".join(json.dumps(r) + "\n" for r in ITEMS))
    m2m = tiny.make_m2m100(str(tmp / "m2m"), seed=2, eos_bias=0.7)  # stops early: short, non-degenerate outputs
    return tmp, tiny.make_llama(str(tmp / "llama")), m2m, str(sft)


def copy_through(self, input_ids, attention_mask, tgt="ko", num_beams=4, max_new_tokens=200, **kw):
    """A stand-in decoder that returns each source's own tokens (between the language code and eos): fast, never
    empty, never degenerate; what is cut and flagged before decoding is the real code's."""
    return [row[mask.bool()].tolist()[1:-1] for row, mask in zip(input_ids, attention_mask)]


def test_a_cut_sentence_is_flagged_once(setup):
    _, _, m2m, _ = setup
    tr = D.load_translator(m2m)
    texts, flags = tr.translate_flagged(["Hello!", f"The code is {BLOB} and nothing else.", BLOB], "en", "ko",
                                        num_beams=1, progress=False)
    assert flags == [[], ["cut"], ["cut"]] and len(texts) == 3


@pytest.mark.parametrize("keep", [False, True])
def test_flagged_translations_are_marked_counted_and_left_out(setup, keep, capsys, monkeypatch):
    tmp, llama, m2m, sft = setup
    monkeypatch.setattr(D.Translator, "generate", copy_through)
    out = tmp / f"run-keep{keep}"
    clo.main(["--model", llama, "--translator", m2m, "--data", sft, "--lang", "ko", "--num-beams", "1",
              "--max-steps", "1", "--max-len", "4096", "--out", str(out), "--no-progress",
              *(["--keep-flagged"] if keep else [])])
    printed = capsys.readouterr().out
    rows = [json.loads(l) for l in open(out / "translations.jsonl")]
    assert [r.get("ko_flags") for r in rows] == [None, ["cut"], None]
    summary = json.load(open(out / "summary.json"))["pairs"]
    assert summary["translation_flags"] == {"flagged": 1, "cut": 1, "degenerate": 0}
    pairs = [json.loads(l) for l in open(out / "pairs.jsonl")]
    prompts = {p["prompt"] for p in pairs}
    assert ("Repeat the code." in prompts) == keep and len(pairs) == (6 if keep else 4)
    assert summary["dropped_flagged"] == (0 if keep else 2) and summary["pairs"] == 6
    assert "1 item translations flagged (1 with a sentence cut" in printed
    assert f"({summary['dropped_flagged']} dropped for a flagged translation" in printed


def test_translations_file_trains_any_language_it_has(setup, tmp_path):
    _, llama, _, _ = setup
    par = tmp_path / "eu.jsonl"
    par.write_text(json.dumps({"en_instruction": "Say hello.", "en_response": "Hello!",
                               "eu_instruction": "Esan kaixo.", "eu_response": "Kaixo!"}) + "\n")
    last = clo.main(["--model", llama, "--translations", str(par), "--lang", "eu", "--max-steps", "1",
                     "--out", str(tmp_path / "run"), "--no-progress"])
    assert last["step"] == 1
    with pytest.raises(ValueError, match=r"--lang sw: .*eu\.jsonl has no sw_instruction/sw_response columns; "
                                         r"its languages: eu\."):
        clo.main(["--model", llama, "--translations", str(par), "--lang", "sw", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()  # refused before anything was written


@pytest.mark.parametrize("lang,message", [
    ("en", "--lang en: English is the source language"),
    ("EN", "--lang EN: English is the source language"),
    ("en_US", "--lang en_US: English is the source language"),
    ("ko,ko", "--lang ko,ko: ko is given twice"),
    ("ko,kor_Hang", "--lang ko,kor_Hang: ko is given twice"),  # one language under two codes: the same token
    ("de,sw,__sw__", "--lang de,sw,__sw__: sw is given twice"),
    ("KO", "--lang KO: unknown language code. Did you mean ko?"),
    ("korean", "--lang korean: unknown language code. Did you mean ko?"),
    ("ko_KR", "--lang ko_KR: unknown language code. Did you mean ko?"),
])
def test_bad_language_codes_are_refused_before_any_work(lang, message, tmp_path):
    with pytest.raises(ValueError) as e:
        clo.main(["--model", str(tmp_path / "no-model"), "--lang", lang, "--out", str(tmp_path / "run")])
    assert str(e.value).startswith(message)
    assert not (tmp_path / "run").exists()


def test_a_later_translation_replaces_the_flags_of_an_earlier_one(tmp_path):
    path = tmp_path / "cache.jsonl"
    rows = [{"en_instruction": "Q", "en_response": "A", "ko_instruction": "q", "ko_response": "a", "ko_flags": ["cut"]},
            {"en_instruction": "Q", "en_response": "A", "ko_instruction": "q", "ko_response": "a, fixed"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    [row] = D.read_translations(str(path)).values()
    assert row["ko_response"] == "a, fixed" and "ko_flags" not in row
    assert D.build_pairs([row], ["ko"]) != []
