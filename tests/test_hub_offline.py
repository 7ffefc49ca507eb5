"""Offline (HF_HUB_OFFLINE=1), a hub id loads from the Hugging Face cache that clo's own online fetch filled. The cache is
written by the installed huggingface_hub's real download code (refs/main, blobs, snapshots/<commit>, and, from
huggingface_hub 2, trees/<commit>.json: the repository's whole file list), with its HTTP answered by a fake Hub
(httpx MockTransport) serving a repository that also holds files clo never fetches. huggingface_hub >= 2 therefore calls
the snapshot incomplete (IncompleteSnapshotError); clo used to give up there with "could not fetch it"."""
import hashlib
import importlib
import os
import re
import subprocess
import sys

import huggingface_hub
import pytest

import model as M
import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMIT = "0123456789abcdef0123456789abcdef01234567"
NEVER_FETCHED = {"README.md": b"# tiny", "pytorch_model.bin": b"pickle", "original/consolidated.00.pth": b"pickle"}


@pytest.fixture
def hub_cache(monkeypatch, tmp_path):
    """fill(repo_id, folder) -> the snapshot folder that clo's online resolve_checkpoint fetched `folder`'s files into
    (the repository: folder + NEVER_FETCHED), in tmp_path/"hub"; the fake Hub answers HTTP only."""
    httpx = importlib.import_module(type(huggingface_hub.get_session()).__module__.split(".")[0])  # huggingface_hub's own: httpx2
    repos = {}

    def answer(request):
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/(tree|revision)/[^/]+", request.url.path):
            files = repos[m[1]]
            if m[2] == "tree":
                return httpx.Response(200, json=[{"type": "file", "path": f, "size": len(data),
                                                  "oid": hashlib.sha1(data).hexdigest()} for f, data in files.items()])
            return httpx.Response(200, json={"id": m[1], "sha": COMMIT, "siblings": [{"rfilename": f} for f in files]})
        if (m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/[^/]+/(.+)", request.url.path)) and m[2] in repos[m[1]]:
            data = repos[m[1]][m[2]]
            return httpx.Response(200, content=data if request.method == "GET" else b"", headers={
                "X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha1(data).hexdigest()}"', "Content-Length": str(len(data))})
        return httpx.Response(404, headers={"X-Error-Code": "EntryNotFound"})

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    default = huggingface_hub.utils._http._GLOBAL_CLIENT_FACTORY
    huggingface_hub.set_client_factory(lambda: httpx.Client(transport=httpx.MockTransport(answer),
                                                            follow_redirects=True))

    def fill(repo_id, folder):
        repos[repo_id] = {f: open(os.path.join(folder, f), "rb").read() for f in os.listdir(folder)} | NEVER_FETCHED
        snapshot = M.resolve_checkpoint(repo_id)
        assert sorted(os.listdir(snapshot)) == sorted(os.listdir(folder))  # clo's files only: a partial snapshot
        return snapshot
    yield fill
    huggingface_hub.set_client_factory(default)


def offline(tmp_path, code):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "home"), "HF_HUB_CACHE": str(tmp_path / "hub"),
           "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_offline_hub_ids_load_from_a_snapshot_of_only_clos_files(hub_cache, llama_dir, tmp_path):
    m2m_dir = tiny.make_m2m100(str(tmp_path / "m2m"), release=True)  # M2M100 as released: sentencepiece files
    llama_snapshot, m2m_snapshot = hub_cache("org/tiny-llama", llama_dir), hub_cache("org/tiny-m2m", m2m_dir)
    code = (f"import torch, model as M, data as D\n"
            f"(m, t), (ref, _) = M.load_model('org/tiny-llama'), M.load_model({llama_dir!r})\n"
            f"ids = torch.tensor([t.encode('Hello, how are you today?')])\n"
            f"assert torch.equal(m(ids), ref(ids)), 'not the same weights'\n"
            f"tr, tr_ref = D.load_translator('org/tiny-m2m'), D.load_translator({m2m_dir!r})\n"
            f"text = ['The quick brown fox jumps over the lazy dog.']\n"
            f"assert tr.translate(text, num_beams=2) == tr_ref.translate(text, num_beams=2)\n"
            f"print(m.source)\n")
    r = offline(tmp_path, code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-1] == llama_snapshot


def test_offline_cache_without_the_weights_says_so_in_one_line(hub_cache, llama_dir, tmp_path):
    snapshot = hub_cache("org/tiny-llama", llama_dir)
    os.remove(os.path.realpath(os.path.join(snapshot, "model.safetensors")))  # its blob: the symlink dangles
    r = offline(tmp_path, "import data as D, model as M; D.exit_on_error(lambda: M.load_model('org/tiny-llama'))")
    assert "Traceback" not in r.stderr and r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: org/tiny-llama: the hub is unreachable (OfflineModeIsEnabled) and its cached snapshot {snapshot} "
        "lacks model.safetensors: run once with network access (HF_HUB_OFFLINE unset) to fetch them.")
