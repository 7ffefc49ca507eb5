"""The paper's MT model as released (facebook/m2m100_418M, m2m100_1.2B: sentencepiece.bpe.model + vocab.json, no
tokenizer.json) against transformers' M2M100Tokenizer and generate() on the same folder; every --lang checked against
the translator as soon as it loads; outputs that end at the decoding cap flagged "cut" (issue 19, items 4-6)."""
import fnmatch
import hashlib
import inspect
import json
import os
import shutil
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch

import clo
import data as D
import model as M
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



class FakeHub:
    """One repository's revisions ({revision: {file: bytes}}) and pull requests, served through huggingface_hub's
    functions as the Hub does: one snapshot folder per revision of relative links into blobs/. `asked` records each
    file fetched as (revision, file)."""
    def __init__(self, monkeypatch, root, revisions, prs):
        self.root, self.revs, self.prs, self.asked = root, revisions, prs, []
        for name in ("list_repo_files", "get_paths_info", "get_repo_discussions", "hf_hub_download",
                     "snapshot_download"):
            real = getattr(huggingface_hub, name)
            monkeypatch.setattr(huggingface_hub, name, self.checked(real, getattr(self, name)))

    @staticmethod
    def checked(real, fake):  # each call as clo makes it must also suit the installed huggingface_hub's function
        return lambda *a, **kw: (inspect.signature(real).bind(*a, **kw), fake(*a, **kw))[1]

    def list_repo_files(self, repo_id, revision=None, **kw):
        return sorted(self.revs[revision or "main"])

    def get_paths_info(self, repo_id, paths, revision=None, **kw):  # blob_id: the git blob of the file's bytes
        return [SimpleNamespace(path=p, blob_id=hashlib.sha1(self.revs[revision or "main"][p]).hexdigest())
                for p in paths if p in self.revs[revision or "main"]]

    def get_repo_discussions(self, repo_id, author=None, discussion_type=None, discussion_status=None, **kw):
        return (d for d in self.prs if author in (None, d.author) and discussion_status in (None, d.status)
                and discussion_type in (None, "pull_request" if d.is_pull_request else "discussion"))

    def snapshot_download(self, repo_id, revision=None, allow_patterns=None, local_files_only=False, **kw):
        assert not local_files_only
        rev, snap = revision or "main", self.root / "snapshots" / (revision or "main").replace("/", "_")
        for f, data in self.revs[rev].items():
            if any(fnmatch.fnmatch(f, p) for p in allow_patterns):
                self.asked.append((rev, f))
                blob = self.root / "blobs" / hashlib.sha1(data).hexdigest()
                blob.parent.mkdir(parents=True, exist_ok=True)
                blob.write_bytes(data)
                snap.mkdir(parents=True, exist_ok=True)
                if not (snap / f).is_symlink():
                    (snap / f).symlink_to(os.path.relpath(blob, snap))
        return str(snap)

    def hf_hub_download(self, repo_id, filename, revision=None, **kw):
        return os.path.join(self.snapshot_download(repo_id, revision, [filename]), filename)


def bot_prs(*specs):
    return [SimpleNamespace(num=n, author=a, status=s, is_pull_request=True) for n, a, s in specs]


def m2m100_repo(folder):
    """facebook/m2m100_1.2B's layout: main has the release's files with pytorch_model.bin for weights; refs/pr/1,
    SFconvertbot's conversion of that main, adds model.safetensors; refs/pr/2 (someone else's) and refs/pr/3 (a
    conversion of an older pickle) carry weights that are not the release's."""
    files = {f: open(os.path.join(folder, f), "rb").read() for f in RELEASE}
    main = {**files, "pytorch_model.bin": b"pickle", "README.md": b""}
    del main["model.safetensors"]
    wrong = {**main, "model.safetensors": b"not these weights"}
    return {"main": main, "refs/pr/1": {**main, "model.safetensors": files["model.safetensors"],
                                        "generation_config.json": b"{}"},  # an older one: main's is read
            "refs/pr/2": wrong, "refs/pr/3": {**wrong, "pytorch_model.bin": b"older pickle"}}


def test_pickle_only_release_loads_the_hubs_safetensors_conversion(release, monkeypatch, tmp_path, capsys):
    """--translator facebook/m2m100_1.2B as the Hub has it (transformers#34731): the weights from SFconvertbot's
    pull request, config and tokenizer from main, in one folder that generates as transformers does."""
    prs = bot_prs((5, "SFconvertbot", "closed"), (3, "SFconvertbot", "open"), (2, "mallory", "open"),
                  (1, "SFconvertbot", "open"))
    hub = FakeHub(monkeypatch, tmp_path, m2m100_repo(release[0].name), prs)
    tr = D.load_translator("facebook/m2m100_1.2B")
    assert sorted(hub.asked) == sorted([("main", f) for f in RELEASE if f != "model.safetensors"]
                                       + [("refs/pr/1", "model.safetensors")])
    assert "pull request refs/pr/1 by SFconvertbot" in capsys.readouterr().err
    folder = M.resolve_checkpoint("facebook/m2m100_1.2B")  # again, over the links already made
    assert os.path.realpath(os.path.join(folder, "model.safetensors")).startswith(str(tmp_path / "blobs"))
    assert open(os.path.join(folder, "generation_config.json"), "rb").read() != b"{}"
    ours, _, ref = release
    ids, mask = ours.pad_batch([ours.encode_source(t, "en") for t in TEXTS])
    assert tr.generate(ids, mask, tgt="ko", num_beams=1, max_new_tokens=16) == reference_generate(ref, ours, ids, mask,
                                                                                                   1, 16)


def test_sharded_conversion_reads_the_pull_requests_index(monkeypatch, tmp_path):
    # a sharded pickle converts to shards + model.safetensors.index.json, which exist only in the pull request
    shards = {f"model-0000{i}-of-00002.safetensors": b"%d" % i for i in (1, 2)}
    main = {"config.json": b"{}", "tokenizer.json": b"{}", "pytorch_model.bin.index.json": b"{}",
            "pytorch_model-00001-of-00002.bin": b"a", "pytorch_model-00002-of-00002.bin": b"b"}
    index = json.dumps({"weight_map": dict(zip("xy", shards))})
    pr = {**main, **shards, "model.safetensors.index.json": index.encode()}
    hub = FakeHub(monkeypatch, tmp_path, {"main": main, "refs/pr/7": pr}, bot_prs((7, "SFconvertbot", "open")))
    folder = M.resolve_checkpoint("org/sharded")
    assert sorted(hub.asked) == sorted([("main", "config.json"), ("main", "tokenizer.json")] + [
        ("refs/pr/7", f) for f in ["model.safetensors.index.json"] * 2 + list(shards)])  # read, then fetched
    assert sorted(os.listdir(folder)) == sorted(["config.json", "tokenizer.json", "model.safetensors.index.json",
                                                 *shards])

def test_pickle_only_repo_without_a_conversion_is_refused_in_one_line(release, monkeypatch, tmp_path):
    # no pull request by SFconvertbot of main's pickle: someone else's, a closed one, one of an older pickle
    prs = bot_prs((5, "SFconvertbot", "closed"), (3, "SFconvertbot", "open"), (2, "mallory", "open"))
    hub = FakeHub(monkeypatch, tmp_path, m2m100_repo(release[0].name), prs)
    with pytest.raises(ValueError) as e:
        D.load_translator("facebook/m2m100_1.2B")
    assert str(e.value).startswith("facebook/m2m100_1.2B: the repository has no Hugging Face-layout safetensors "
                                   "weights (it has: pytorch_model.bin)") and "\n" not in str(e.value)
    assert "No safetensors conversion of them exists on the Hub" in str(e.value) and hub.asked == []

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
    # fr is an ISO 639-1 code: the translator lacks its token, so no "Use an ISO 639-1 code" hint
    assert str(e.value) == f"language 'fr' is not supported by {m2m_dir}: it has no fra_Latn or __fr__ token."
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
