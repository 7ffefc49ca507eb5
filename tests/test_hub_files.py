"""Hub downloads fetch exactly what loading reads: checked against fake repository listings, with huggingface_hub's
listing and download calls intercepted (nothing touches the network)."""
import fnmatch
import json
import os

import huggingface_hub
import pytest

import model as M

META = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
        "chat_template.jinja"]
JUNK = ["README.md", ".gitattributes", "pytorch_model.bin", "original/params.json", "original/consolidated.00.pth",
        "adapter_config.json", "tokenizer.model", "onnx/model.onnx"]
SHARDS = ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"]


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """Serves one fake repository: fake_hub(listing, index) -> a dict that records what was asked for."""
    calls = {}

    def install(listing, index=None):
        calls.update(listing=listing, downloads=[], snapshot=None)

        def list_repo_files(repo_id, **kw):
            return list(listing)

        def hf_hub_download(repo_id, filename, **kw):
            assert filename in listing
            calls["downloads"].append(filename)
            path = tmp_path / "dl" / filename
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(index))
            return str(path)

        def snapshot_download(repo_id, allow_patterns=None, local_files_only=False, **kw):
            assert not local_files_only
            calls["snapshot"] = sorted(f for f in listing if any(fnmatch.fnmatch(f, p) for p in allow_patterns))
            return str(tmp_path / "snapshot")

        monkeypatch.setattr(huggingface_hub, "list_repo_files", list_repo_files)
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
        monkeypatch.setattr(huggingface_hub, "get_repo_discussions", lambda repo_id, **kw: iter(()))  # no conversion
        return calls
    return install


def test_sharded_repo_with_stray_consolidated_fetches_index_and_its_shards(fake_hub, tmp_path):
    # Mistral-7B-Instruct-v0.3's layout: HF shards + index, and a native consolidated.safetensors as large as them
    index = {"metadata": {"total_size": 3}, "weight_map": {"a": SHARDS[0], "b": SHARDS[1], "c": SHARDS[2],
                                                          "d": SHARDS[0]}}
    calls = fake_hub(META + JUNK + SHARDS + ["model.safetensors.index.json", "consolidated.safetensors"], index)
    assert M.resolve_checkpoint("mistralai/Mistral-7B-Instruct-v0.3") == str(tmp_path / "snapshot")
    assert calls["snapshot"] == sorted(META + SHARDS + ["model.safetensors.index.json"])
    assert calls["downloads"] == ["model.safetensors.index.json"]


def test_index_names_only_some_files_of_the_repo(fake_hub):
    # a repo with leftover shards of an older upload: only those the index names are fetched
    index = {"weight_map": {"a": SHARDS[0], "b": SHARDS[1]}}
    calls = fake_hub(["config.json", "tokenizer.json", "model.safetensors.index.json"] + SHARDS, index)
    M.resolve_checkpoint("org/model")
    assert calls["snapshot"] == sorted(["config.json", "tokenizer.json", "model.safetensors.index.json"] + SHARDS[:2])


def test_single_file_repo_with_stray_consolidated(fake_hub):
    calls = fake_hub(META + JUNK + ["model.safetensors", "consolidated.safetensors", "chat_template.json"])
    M.resolve_checkpoint("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert calls["snapshot"] == sorted(META + ["model.safetensors", "chat_template.json"])
    assert calls["downloads"] == []


def test_oddly_named_weights_fall_back_to_top_level_safetensors(fake_hub):
    calls = fake_hub(["config.json", "tokenizer.json", "weights.safetensors", "consolidated.safetensors",
                      "adapter_model.safetensors", "original/model.safetensors"])
    M.resolve_checkpoint("org/odd")
    assert calls["snapshot"] == ["config.json", "tokenizer.json", "weights.safetensors"]


def test_listing_fails_then_the_cached_snapshot_is_used(monkeypatch, tmp_path):
    def offline(*a, **kw):
        raise huggingface_hub.errors.OfflineModeIsEnabled("offline")
    asked = []

    def snapshot_download(repo_id, local_files_only=False, **kw):
        asked.append((repo_id, local_files_only, kw))
        return str(tmp_path)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", offline)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    (tmp_path / "config.json").write_text("{}")  # huggingface_hub < 2 keeps no file list: the folder's own files count
    with pytest.raises(OSError, match=r"org/cached: .* lacks its \*\.safetensors weights: run once with network"):
        M.resolve_checkpoint("org/cached")
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert M.resolve_checkpoint("org/cached") == str(tmp_path)
    assert asked == [("org/cached", True, {})] * 2


def test_local_folder_prefers_model_safetensors_over_stray_consolidated(llama_dir, tmp_path):
    import shutil
    folder = tmp_path / "m"
    shutil.copytree(llama_dir, folder)
    shutil.copy(folder / "model.safetensors", folder / "consolidated.safetensors")
    assert M.safetensors_files(str(folder)) == [str(folder / "model.safetensors")]
    os.remove(folder / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors weights found"):
        M.safetensors_files(str(folder))


@pytest.mark.parametrize("listing,named", [
    (META + ["pytorch_model.bin", "README.md"], "pytorch_model.bin"),
    (META + ["consolidated.safetensors"], "consolidated.safetensors"),
    (META + ["weights/model.safetensors"], "weights/model.safetensors"),
])
def test_a_repo_without_loadable_weights_is_refused_before_any_download(fake_hub, listing, named):
    calls = fake_hub(listing)
    with pytest.raises(ValueError) as e:
        M.resolve_checkpoint("org/model")
    assert str(e.value).startswith("org/model: the repository has no Hugging Face-layout safetensors weights "
                                   f"(it has: {named})")
    # pickles: also that the Hub has no conversion of them, and where to make one (tests/test_m2m100_release.py)
    assert str(e.value).endswith("spaces/safetensors/convert, then run again.") == named.endswith(".bin")
    assert calls["snapshot"] is None and calls["downloads"] == []
