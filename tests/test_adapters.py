"""LoRA adapters against peft and transformers: tied embeddings (merge and export), and adapter_config.json fields
of adapters peft wrote: plain LoRA (use_rslora, target_modules as list, regex or "all-linear") applied, every other
field that is set (rank_pattern, layers_to_transform, exclude_modules, use_dora, ...) refused in one line."""
import json
import os

import pytest
import torch

import clo
import eval as E
import model as M
import tiny

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

PROMPT = [{"role": "user", "content": "Explain gravity in simple words."}]


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    return tiny.make_llama(str(tmp_path_factory.mktemp("tied")), tie=True, seed=3)


def _ids(tok):
    return torch.tensor([tok.apply_chat_template(PROMPT)])


def _hf(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


# ----------------------------------------------------------------------------------------------------------------------
# Tied embeddings: LoRA on lm_head


def test_lm_head_lora_on_tied_model_merges_and_exports_untied(tied_dir, tmp_path):
    model, tok = M.load_model(tied_dir)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the checkpoint really is tied
    embedding = model.model.embed_tokens.weight.detach().clone()
    M.apply_lora(model, ["q_proj", "lm_head"], r=4, alpha=8)
    with torch.no_grad():
        for m in M.lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.2)  # a trained-looking adapter
    ids = _ids(tok)
    with torch.no_grad():
        adapter, base = model(ids), M.load_model(tied_dir)[0](ids)
    assert (adapter - base).abs().max() > 0.1
    args = clo.parse_args(["--model", tied_dir, "--lang", "ko", "--tune", "lora", "--lora-r", "4", "--lora-alpha",
                           "8", "--lora-targets", "q_proj,lm_head"])
    out = str(tmp_path / "run")
    os.makedirs(out)
    clo.save_adapter(out, model, args)
    with torch.no_grad():  # peft computes the same function on the tied transformers model
        assert (peft.PeftModel.from_pretrained(_hf(tied_dir), out).eval()(ids).logits - adapter).abs().max() < 1e-4
    clo.save_merged(os.path.join(out, "merged"), model, tied_dir)  # merges in place, as eval.py does in memory
    with torch.no_grad():
        assert (model(ids) - adapter).abs().max() < 1e-4
        assert torch.equal(model.model.embed_tokens.weight, embedding)  # the input embedding is not touched
        assert model.lm_head.weight is not model.model.embed_tokens.weight and not model.config.tie_word_embeddings
        config = json.load(open(os.path.join(out, "merged", "config.json")))
        assert config["tie_word_embeddings"] is False
        ours, _ = M.load_model(os.path.join(out, "merged"))
        assert (ours(ids) - adapter).abs().max() < 1e-4
        assert (_hf(os.path.join(out, "merged"))(ids).logits - adapter).abs().max() < 1e-4
        evaluated, _ = E.load_for_eval(out)  # eval.py: base + adapter, merged in memory
        assert (evaluated(ids) - adapter).abs().max() < 1e-4


def test_untied_export_keeps_a_tied_checkpoint_tied_without_lm_head_target(tied_dir, tmp_path):
    model, tok = M.load_model(tied_dir)
    M.apply_lora(model, ["v_proj"], r=4, alpha=8)
    with torch.no_grad():
        for m in M.lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.2)
        adapter = model(_ids(tok))
    clo.save_merged(str(tmp_path / "merged"), model, tied_dir)
    assert json.load(open(tmp_path / "merged" / "config.json"))["tie_word_embeddings"] is True
    with torch.no_grad():
        assert (_hf(str(tmp_path / "merged"))(_ids(tok)).logits - adapter).abs().max() < 1e-4


@pytest.mark.parametrize("targets, line", [
    (["q_proj", "embed_tokens"], "LoRA target 'embed_tokens' (model.embed_tokens, Embedding) is not a linear layer: "
                                 "clo puts LoRA on nn.Linear layers only (q_proj, ..., down_proj, lm_head)."),
    (["q_proj", "q_prj"], "LoRA target 'q_prj' names no layer of the model; use linear layer names such as "
                          "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head."),
])
def test_targets_that_are_not_linear_layers_are_refused(tied_dir, targets, line):
    model, _ = M.load_model(tied_dir)
    with pytest.raises(ValueError) as e:
        M.apply_lora(model, targets)
    assert str(e.value) == line
    assert not M.lora_modules(model)


# ----------------------------------------------------------------------------------------------------------------------
# Adapters peft wrote: plain LoRA is applied, every other field that changes the math is refused


def _peft_adapter(base_dir, folder, seed=0, **config):
    """Saves a peft LoRA adapter with random (nonzero) lora_B on `base_dir`; returns (folder, peft's logits)."""
    model = peft.get_peft_model(_hf(base_dir), peft.LoraConfig(**config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    model.save_pretrained(folder)
    tok = M.Tokenizer(base_dir, json.load(open(os.path.join(base_dir, "config.json"))))
    with torch.no_grad():
        return folder, model.eval()(_ids(tok)).logits


CASES = {
    "rslora": dict(r=16, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"]),
    "full_names": dict(r=4, lora_alpha=16, target_modules=["model.layers.0.self_attn.q_proj", "up_proj"]),
    "regex": dict(r=4, lora_alpha=8, target_modules=r".*\.(k_proj|gate_proj)"),
    "all_linear": dict(r=2, lora_alpha=4, target_modules="all-linear"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapters_give_peft_logits(llama_dir, tmp_path, case):
    folder, ref = _peft_adapter(llama_dir, str(tmp_path / case), **CASES[case])
    model, tok = M.load_model(llama_dir)
    with torch.no_grad():
        base = model(_ids(tok))
        assert (ref - base).abs().max() > 1e-2  # the adapter matters
        merged, _ = E.load_for_eval(folder)  # eval.py's path, base model named by the adapter
        assert (merged(_ids(tok)) - ref).abs().max() < 1e-4
        names = M.load_adapter(model, folder)
        assert (model(_ids(tok)) - ref).abs().max() < 1e-4
        assert (M.merge_lora(model)(_ids(tok)) - ref).abs().max() < 1e-4
    if case == "full_names":
        assert names == ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]
    if case == "regex":
        assert names == ["model.layers.0.self_attn.k_proj", "model.layers.0.mlp.gate_proj",
                         "model.layers.1.self_attn.k_proj", "model.layers.1.mlp.gate_proj"]


def test_peft_lm_head_adapter_on_tied_model(tied_dir, tmp_path):
    folder, ref = _peft_adapter(tied_dir, str(tmp_path / "a"), r=4, lora_alpha=8, target_modules=["lm_head"])
    merged, tok = E.load_for_eval(folder)
    with torch.no_grad():
        assert (merged(_ids(tok)) - ref).abs().max() < 1e-4


PLAIN_ONLY = ("is not supported: clo applies plain LoRA adapters only (r, lora_alpha, use_rslora, target_modules, "
              "bias \"none\"); merge this one into its base model with peft (merge_and_unload) and pass the merged "
              "model instead.")
REFUSED = [(field, value, f"{field} = {json.dumps(value)} {PLAIN_ONLY}") for field, value in [
    ("use_dora", True), ("fan_in_fan_out", True), ("modules_to_save", ["lm_head"]), ("lora_bias", True),
    ("some_new_scale", 2.0), ("bias", "all"), ("init_lora_weights", "pissa"), ("peft_type", "LOHA"),
    # honoured until issue 22 (peft's per-module and per-layer selection), now refused rather than half-applied
    ("rank_pattern", {"q_proj": 8}), ("alpha_pattern", {"v_proj": 32}), ("layers_to_transform", [1]),
    ("layers_to_transform", 0), ("layers_pattern", "layers"), ("exclude_modules", ["model.layers.0.mlp.gate_proj"]),
    ("ensure_weight_tying", True)]]


@pytest.fixture(scope="module")
def plain_adapter(llama_dir, tmp_path_factory):
    folder, _ = _peft_adapter(llama_dir, str(tmp_path_factory.mktemp("plain")), r=4, lora_alpha=8,
                              target_modules=["q_proj", "v_proj"])
    return folder


@pytest.mark.parametrize("field, value, line", REFUSED, ids=[f"{r[0]}={r[1]}" for r in REFUSED])
def test_fields_that_change_the_math_are_refused(plain_adapter, tmp_path, field, value, line):
    folder = tmp_path / "a"
    folder.mkdir()
    cfg = json.load(open(os.path.join(plain_adapter, "adapter_config.json")))
    cfg[field] = value
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    (folder / "adapter_model.safetensors").write_bytes(
        open(os.path.join(plain_adapter, "adapter_model.safetensors"), "rb").read())
    with pytest.raises(ValueError) as e:
        E.load_for_eval(str(folder))
    assert str(e.value) == f"{folder / 'adapter_config.json'}: {line}"


def test_defaults_peft_writes_are_accepted(plain_adapter):
    cfg = M.adapter_config(plain_adapter)  # every field peft 0.21 writes for a plain LoRA passes
    assert cfg["r"] == 4 and not cfg.get("use_rslora")


def test_cli_refuses_embed_tokens_target_before_any_work(tied_dir, tmp_path):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, os.path.join(os.path.dirname(clo.__file__), "clo.py"), "--no-progress",
                        "--model", tied_dir, "--lang", "ko", "--tune", "lora", "--lora-targets", "q_proj,embed_tokens",
                        "--out", str(tmp_path / "run"), "--translator", str(tmp_path / "no-translator")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: LoRA target 'embed_tokens' (model.embed_tokens, Embedding) is not a linear layer: clo puts LoRA on "
        "nn.Linear layers only (q_proj, ..., down_proj, lm_head)."]


def test_adapter_names_a_home_relative_base_by_its_absolute_path(llama_dir, tmp_path, monkeypatch):
    """--model ~/m is a local folder: adapter_config.json must name it by its absolute path, never as the hub id
    "~/m" (the old rule, os.path.isdir on the unexpanded path, wrote it as an id peft cannot resolve)."""
    import argparse
    import shutil
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(llama_dir, tmp_path / "m")
    model, _ = M.load_model(str(tmp_path / "m"))
    M.apply_lora(model, ["q_proj"], r=4, alpha=8)
    args = argparse.Namespace(model="~/m", lora_r=4, lora_alpha=8.0, lora_dropout=0.0, lora_targets=["q_proj"])
    out = tmp_path / "out"
    out.mkdir()
    clo.save_adapter(str(out), model, args)
    assert json.load(open(out / "adapter_config.json"))["base_model_name_or_path"] == str(tmp_path / "m")
