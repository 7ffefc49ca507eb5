"""The paper's MT model as released (facebook/m2m100_418M, m2m100_1.2B: sentencepiece.bpe.model + vocab.json, no
tokenizer.json) against transformers' M2M100Tokenizer and generate() on the same folder; every --lang checked against
the translator as soon as it loads; outputs that end at the decoding cap flagged "cut" (issue 19, items 4-6)."""
import json
import os
import shutil

import huggingface_hub
import pytest
import torch

import clo
import data as D
import tiny
from test_translator import reference_generate

transformers = pytest.importorskip("transformers")

TEXTS = ["Hello, how are you today?", "The quick brown fox jumps over the lazy dog.", "안녕하세요. 你好。 Habari yako?",
         "Explain gravity in simple words, zebra!"]  # "ow" (in "how") is a piece vocab.json lacks -> <unk>
RELEASE = ["config.json", "generation_config.json", "model.safetensors", "sentencepiece.bpe.model",
           "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    folder = tiny.make_m2m100(str(tmp_path_factory.mktemp("m2m100_release")), seed=2, eos_bias=0.5, release=True)
    assert sorted(os.listdir(folder)) == RELEASE
    ref_tok = transformers.M2M100Tokenizer.from_pretrained(folder)
    ref = transformers.M2M100ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    return D.load_translator(folder), ref_tok, ref


def test_release_tokenizer_equals_transformers(release):
    ours, ref_tok, _ = release
    ref_tok.src_lang = "en"
    for text in TEXTS:
        ids = ours.encode_source(text, "en")
        assert ids == ref_tok(text)["input_ids"]
        assert ids[0] == ref_tok.get_lang_id("en") and ids[-1] == 2  # [__en__] tokens </s>
        assert ours.tok.decode(ids) == ref_tok.decode(ids, skip_special_tokens=True)
    assert ref_tok.unk_token_id in ours.encode_source(TEXTS[0], "en")  # the missing piece, as transformers#11336
    assert len(ref_tok.lang_code_to_id) == 100  # M2M100's ISO-like codes (ko, sw, zh, ast), numbered after vocab.json
    assert all(ours.lang_id(code) == i for code, i in ref_tok.lang_code_to_id.items())
    assert ours.lang_id("kor_Hang") == ours.lang_id("ko") and ours.lang_id("swh_Latn") == ref_tok.get_lang_id("sw")
    with pytest.raises(ValueError, match=r"language 'quy_Latn' is not supported by .*m2m100_release"):
        ours.lang_id("quy_Latn")


def test_language_code_is_never_a_text_piece():
    # "ko" is also a sentencepiece piece in real vocabularies: the language token is __ko__ (or kor_Hang), never it
    assert D.language_token({"ko": 5, "__ko__": 9}, "ko") == ("__ko__", 9)
    assert D.language_token({"ko": 5, "kor_Hang": 7, "__ko__": 9}, "ko") == ("kor_Hang", 7)
    with pytest.raises(ValueError, match="language 'ko' is not supported by this translator"):
        D.language_token({"ko": 5, "eng_Latn": 6}, "ko")


@pytest.mark.parametrize("num_beams", [1, 4])
def test_release_generation_equals_transformers(release, num_beams):
    ours, ref_tok, ref = release
    ids, mask = ours.pad_batch([ours.encode_source(t, "en") for t in TEXTS])
    ended = []
    for n in (6, 16):
        got = ours.generate(ids, mask, tgt="ko", num_beams=num_beams, max_new_tokens=n)
        assert got == reference_generate(ref, ours, ids, mask, num_beams, n)
        ended += [len(g) < n for g in got]
        assert [ours.tok.decode(g) for g in got] == ref_tok.batch_decode(got, skip_special_tokens=True)
    assert any(ended) and not all(ended)  # outputs that ended with eos, and outputs that ran to the limit


def test_hub_id_fetches_the_sentencepiece_files(release, monkeypatch, tmp_path):
    """--translator facebook/m2m100_1.2B: the listing of the release (and its pickle); only what is fetched loads."""
    folder = release[0].name
    listing = RELEASE + ["README.md", ".gitattributes", "pytorch_model.bin"]
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo_id, **kw: listing)

    def snapshot_download(repo_id, allow_patterns=(), **kw):
        for f in allow_patterns:
            if f in RELEASE:
                shutil.copy(os.path.join(folder, f), tmp_path)
        return str(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    tr = D.load_translator("facebook/m2m100_1.2B")
    assert sorted(os.listdir(tmp_path)) == RELEASE and tr.name == "facebook/m2m100_1.2B"
    assert tr.encode_source(TEXTS[0], "en") == release[0].encode_source(TEXTS[0], "en")
    # NLLB ships tokenizer.json and sentencepiece.bpe.model: only the former is fetched
    assert "sentencepiece.bpe.model" not in D.M.hub_files_to_fetch(listing + ["tokenizer.json"], None)


@pytest.fixture(scope="module")
def run_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("langs")
    sft = tmp / "sft.jsonl"
    sft.write_text("".join(json.dumps(r) + "\n" for r in ITEMS))
    return tmp, tiny.make_llama(str(tmp / "llama")), str(sft)


ITEMS = [{"instruction": "Say hello.", "output": "Hello!"},
         {"instruction": "Tell a story.", "output": "The quick brown fox jumps over the lazy dog, and it sleeps on."},
         {"instruction": "Name a color.", "output": "Blue."}]


def test_every_language_is_checked_before_any_translation(run_files, m2m_dir, monkeypatch):
    tmp, llama, sft = run_files
    calls = []
    monkeypatch.setattr(D.Translator, "generate", lambda *a, **k: calls.append(1))
    with pytest.raises(ValueError) as e:  # the tiny NLLB has Korean, no French
        clo.main(["--model", llama, "--translator", m2m_dir, "--data", sft, "--lang", "ko,fr",
                  "--out", str(tmp / "run"), "--no-progress"])
    assert str(e.value).startswith(f"language 'fr' is not supported by {m2m_dir}.")
    assert calls == [] and not (tmp / "run" / "translations.jsonl").exists()


def test_outputs_at_the_cap_are_flagged_cut(tmp_path):
    """A tiny model that never emits the end token: every output ends at the cap, beam and greedy."""
    tr = D.load_translator(tiny.make_m2m100(str(tmp_path / "never-ends"), seed=2, eos_bias=-30.0))
    for beams in (1, 4):
        _, flags = tr.translate_flagged(TEXTS[:2], "en", "ko", num_beams=beams, progress=False)
        assert all("cut" in f for f in flags)


def runs_on(need):
    """A stand-in decoder: each source shorter than 12 tokens is copied; a longer one needs need(length) distinct
    tokens and gets as many as the cap allows, without the end token beyond it."""
    def generate(self, input_ids, attention_mask, tgt="ko", num_beams=4, max_new_tokens=200):
        rows = [row[m.bool()].tolist()[1:-1] for row, m in zip(input_ids, attention_mask)]
        return [r if len(r) < 12 else list(range(10, 10 + min(need(len(r)), max_new_tokens))) for r in rows]
    return generate


def test_a_cut_output_is_retried_with_more_room(m2m_dir, monkeypatch):
    tr = D.load_translator(m2m_dir)
    text = ITEMS[1]["output"]
    length = len(tr.encode_source(text, "en")) - 2
    monkeypatch.setattr(D.Translator, "generate", runs_on(lambda n: 2 * n + 20))  # over 2n + 10, within 3n + 10
    out, flags = tr.translate_flagged([text], "en", "ko", progress=False)
    assert flags == [[]] and out == [tr.tok.decode(list(range(10, 10 + 2 * length + 20)))]


@pytest.mark.parametrize("keep", [False, True])
def test_cut_outputs_are_marked_counted_and_left_out(run_files, m2m_dir, monkeypatch, capsys, keep):
    tmp, llama, sft = run_files
    monkeypatch.setattr(D.Translator, "generate", runs_on(lambda n: 10 * n))  # fluent but past every cap
    out = tmp / f"cut-{keep}"
    clo.main(["--model", llama, "--translator", m2m_dir, "--data", sft, "--lang", "ko", "--max-steps", "1",
              "--max-len", "4096", "--out", str(out), "--no-progress", *(["--keep-flagged"] if keep else [])])
    rows = [json.loads(line) for line in open(out / "translations.jsonl")]
    assert [r.get("ko_flags") for r in rows] == [None, ["cut"], None]
    summary = json.load(open(out / "summary.json"))["pairs"]
    assert summary["translation_flags"] == {"flagged": 1, "cut": 1, "degenerate": 0}
    assert summary["dropped_flagged"] == (0 if keep else 2)
    assert len(open(out / "pairs.jsonl").readlines()) == (6 if keep else 4)
    assert "1 item translations flagged (1 with a sentence cut at the MT model's input limit or output cap" in \
        capsys.readouterr().out
