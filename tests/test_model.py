"""model.py's Llama-family decoder, loader, tokenizer and generation against transformers on the same checkpoint."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import data as D
import model as M
import tiny
from conftest import ROOT, smollm2_path

transformers = pytest.importorskip("transformers")

VARIANTS = {
    "llama": dict(model_type="llama"),
    "llama_tied": dict(model_type="llama", tie=True),
    "llama3_rope": dict(model_type="llama", rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                          "original_max_position_embeddings": 32}),
    "linear_rope": dict(model_type="llama", rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "llama_bias_headdim": dict(model_type="llama", attention_bias=True, head_dim=24),
    "mistral_window": dict(model_type="mistral", sliding_window=8),
    "qwen2_bias": dict(model_type="qwen2", tie=True),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
    folder = tiny.make_llama(str(tmp_path_factory.mktemp(request.param)), **VARIANTS[request.param])
    ours, tok = M.load_model(folder)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return request.param, folder, ours, tok, ref


def prompt_ids(tok, text="Explain gravity in simple words."):
    return tok.apply_chat_template([{"role": "user", "content": text}])


def test_logits_match_transformers(variant):
    name, _, ours, tok, ref = variant
    ids = torch.tensor([prompt_ids(tok) * 2])  # 30+ tokens: longer than the Mistral window and llama3's short context
    assert ids.shape[1] > 16
    with torch.no_grad():
        diff = (ours(ids) - ref(ids).logits).abs().max().item()
    assert diff < 1e-4, f"{name}: max |logit difference| {diff}"


def test_qwen2_has_qkv_bias_and_no_o_bias(tmp_path):
    ours, _ = M.load_model(tiny.make_llama(str(tmp_path), model_type="qwen2"))
    attn = ours.model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.v_proj.bias is not None and attn.o_proj.bias is None


def test_greedy_20_tokens_match_transformers(variant):
    name, _, ours, tok, ref = variant
    ids = prompt_ids(tok)
    new = M.generate(ours, tok, [ids], max_new_tokens=20)[0]
    out = ref.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                       max_new_tokens=20, do_sample=False, eos_token_id=tok.eos_ids, pad_token_id=tok.pad_id)
    theirs = out[0, len(ids):].tolist()
    cut = next((i for i, t in enumerate(theirs) if t in tok.eos_ids), len(theirs))
    assert new == theirs[:cut], name
    assert len(new) > 0


def test_batched_left_padded_equals_one_at_a_time(variant):
    name, _, ours, tok, ref = variant
    prompts = [prompt_ids(tok, t) for t in ("Hi", "Write a short poem about the sea, please.", "What is 1+1?")]
    assert len({len(p) for p in prompts}) == 3
    batched = M.generate(ours, tok, prompts, max_new_tokens=12)
    alone = [M.generate(ours, tok, [p], max_new_tokens=12)[0] for p in prompts]
    assert batched == alone, name
    # and transformers' own batched generation (its left padding) agrees
    P = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_id] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    out = ref.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_ids,
                       pad_token_id=tok.pad_id)[:, P:].tolist()
    theirs = [row[:next((i for i, t in enumerate(row) if t in tok.eos_ids), len(row))] for row in out]
    assert batched == theirs, name


@pytest.mark.parametrize("template_file", [False, True])
def test_chat_template_matches_transformers(tmp_path, template_file):
    folder = tiny.make_llama(str(tmp_path), template_file=template_file)
    _, tok = M.load_model(folder)
    ref = transformers.AutoTokenizer.from_pretrained(folder)
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  Hello there!  "},
             {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Translate 'dog' to German."}]
    for gen_prompt in (True, False):
        expected = ref.apply_chat_template(convo, add_generation_prompt=gen_prompt, tokenize=False)
        assert tok.render_chat(convo, gen_prompt) == expected
        expected_ids = ref.apply_chat_template(convo, add_generation_prompt=gen_prompt, tokenize=True)
        expected_ids = expected_ids["input_ids"] if hasattr(expected_ids, "keys") else expected_ids
        assert tok.apply_chat_template(convo, gen_prompt) == list(expected_ids)
    ids = tok.apply_chat_template(convo)
    assert ids[0] == tok.bos_id and ids[1] != tok.bos_id  # the template's BOS, once


def test_chat_template_is_sandboxed_and_raise_exception_works(llama_dir):
    _, tok = M.load_model(llama_dir)
    with pytest.raises(Exception, match="unknown role robot"):
        tok.render_chat([{"role": "robot", "content": "x"}])
    tok.chat_template = "{{ messages.__class__.__mro__ }}"
    del tok._template
    with pytest.raises(Exception, match="unsafe|not safely|access"):
        tok.render_chat([{"role": "user", "content": "x"}])


# {% generation %} as TRL's assistant-only-loss templates write it; `said`, set inside the block, is not seen outside
GENERATION = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}"
              "{% generation %}{% set said = m['content'] | trim %}{{ said }}<|im_end|>{% endgeneration %}"
              "{{ said | default('') }}{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CONVO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": " Hello there "}, {"role": "user", "content": "Bye"}]


def reference_ids(ref, convo, gen_prompt):
    return list(ref.apply_chat_template(convo, add_generation_prompt=gen_prompt, tokenize=True,
                                        return_dict=True)["input_ids"])


def test_generation_blocks_render_their_body_as_transformers(tmp_path):
    """Issue 19.2: {% generation %} (TRL's assistant-only-loss templates, so TRL-saved SFT checkpoints) was an
    unknown tag: a TemplateSyntaxError. Now its body renders unchanged in its own scope: text and tokens equal
    transformers' apply_chat_template, for our template and the training templates TRL ships (when installed)."""
    import importlib.util
    folder = tiny.make_llama(str(tmp_path), template_file=True)
    trl = importlib.util.find_spec("trl")
    templates = {"ours": GENERATION}
    for name in ("llama3", "qwen3", "phi3_5", "gptoss"):
        path = os.path.join(trl.submodule_search_locations[0], "chat_templates", f"{name}_training.jinja") if trl else ""
        if os.path.exists(path):
            templates[name] = open(path).read()
    for name, template in templates.items():
        assert "{% generation %}" in template.replace("{%- generation %}", "{% generation %}"), name
        with open(os.path.join(folder, "chat_template.jinja"), "w") as f:
            f.write(template)
        tok, ref = M.Tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
        for convo, gen_prompt in ((CONVO[:3], False), (CONVO, True)):
            assert tok.render_chat(convo, gen_prompt) == ref.apply_chat_template(
                convo, add_generation_prompt=gen_prompt, tokenize=False), name
            assert tok.apply_chat_template(convo, gen_prompt) == reference_ids(ref, convo, gen_prompt), name


def test_named_templates_without_default_are_refused_naming_them(tmp_path):
    """Issue 19.9: a tokenizer_config.json list of named templates without "default" was rendered with its first
    entry (tool_use); transformers refuses (unless told a name). Now refused at load, in one line naming the file and
    the templates; with a "default", that one is used, as transformers does."""
    folder = tiny.make_llama(str(tmp_path))
    path = os.path.join(folder, "tokenizer_config.json")
    cfg = json.load(open(path))
    tool_use = tiny.CHATML.replace("<|im_start|>{{ m['role'] }}", "<|im_start|>[{{ m['role'] }}]")
    cfg["chat_template"] = [{"name": "tool_use", "template": tool_use}, {"name": "rag", "template": GENERATION}]
    json.dump(cfg, open(path, "w"))
    with pytest.raises(ValueError, match="no default specified"):
        transformers.AutoTokenizer.from_pretrained(folder).apply_chat_template(CONVO, tokenize=False)
    with pytest.raises(ValueError) as e:
        M.Tokenizer(folder)
    assert str(e.value) == (f"{path}: 'chat_template' is a list of named templates (rag, tool_use) without a "
                            "'default' one, so which to use is not said; name the one to use 'default', or save it "
                            "as chat_template.jinja beside it.")
    cfg["chat_template"].append({"name": "default", "template": tiny.CHATML})
    json.dump(cfg, open(path, "w"))
    ref = transformers.AutoTokenizer.from_pretrained(folder)
    assert M.Tokenizer(folder).apply_chat_template(CONVO) == reference_ids(ref, CONVO, True)


def test_special_tokens_from_configs(llama_dir):
    _, tok = M.load_model(llama_dir)
    vocab = tok.tok.get_vocab()
    assert tok.bos_id == vocab["<s>"]
    assert set(tok.eos_ids) == {vocab["<|im_end|>"], vocab["</s>"]}  # generation_config's list, and the tokenizer's
    assert tok.pad_id == vocab["<unk>"]
    assert tok.decode(tok.encode("Hello, how are you today?")) == "Hello, how are you today?"


def test_sharded_checkpoint_and_bf16(tmp_path):
    folder = tiny.make_llama(str(tmp_path), shard=True)
    assert os.path.exists(os.path.join(folder, "model.safetensors.index.json"))
    ours, tok = M.load_model(folder)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids(tok)])
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max() < 1e-4
    half, _ = M.load_model(folder, dtype=torch.bfloat16)
    assert half.lm_head.weight.dtype == torch.bfloat16 and half.inv_freq.dtype == torch.float32
    with torch.no_grad():
        assert (half(ids).float() - ref(ids).logits).abs().max() < 0.5


def test_sampling_is_seeded_and_top_p_restricts(llama_dir):
    ours, tok = M.load_model(llama_dir)
    ids = prompt_ids(tok)
    a = M.generate(ours, tok, [ids], 10, temperature=1.0, seed=7)
    b = M.generate(ours, tok, [ids], 10, temperature=1.0, seed=7)
    assert a == b
    # top_p so small that only the most likely token survives: sampling equals greedy
    assert M.generate(ours, tok, [ids], 10, temperature=1.0, top_p=1e-6, seed=3) == M.generate(ours, tok, [ids], 10)
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    probs = torch.softmax(logits, -1)[0]  # 0.032, 0.087, 0.237, 0.644: top_p 0.8 keeps tokens 3 and 2 only
    draws = {M.sample_next(logits, 1.0, 0.8, torch.Generator().manual_seed(s)).item() for s in range(200)}
    assert draws == {2, 3} and probs[3] < 0.8 < probs[3] + probs[2]
    draws = {M.sample_next(logits, 1.0, 1.0, torch.Generator().manual_seed(s), top_k=2).item() for s in range(200)}
    assert draws == {2, 3}  # top_k 2: the two largest logits only
    # repetition_penalty 2 by hand: seen 2.0 -> 1.0 (divided), seen -1.0 -> -2.0 (multiplied), unseen 1.5 kept
    seen = torch.tensor([[True, True, False, False]])
    pen = torch.tensor([[2.0, -1.0, 1.5, -3.0]])
    assert M.sample_next(pen, 0.0, 1.0, repetition_penalty=2.0, seen=seen).item() == 2
    assert M.sample_next(pen, 0.0, 1.0, repetition_penalty=0.5, seen=seen).item() == 0  # 2.0 -> 4.0


@pytest.mark.parametrize("penalty", [1.5, 0.7])
def test_repetition_penalty_matches_transformers(llama_dir, penalty):
    """Greedy with repetition_penalty, batched with left padding, token for token as transformers' generate(do_sample=
    False, repetition_penalty=...) (RepetitionPenaltyLogitsProcessor over prompt + generated tokens, padding left
    out); each row as alone; and the penalty changes the answers."""
    ours, tok = M.load_model(llama_dir)
    ref = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    prompts = [prompt_ids(tok, t) for t in ("Hi", "Write a short poem about the sea, please.", "What is 1+1?")]
    got = M.generate(ours, tok, prompts, max_new_tokens=16, repetition_penalty=penalty)
    P = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_id] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    out = ref.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, repetition_penalty=penalty,
                       eos_token_id=tok.eos_ids, pad_token_id=tok.pad_id)[:, P:].tolist()
    assert got == [row[:next((i for i, t in enumerate(row) if t in tok.eos_ids), len(row))] for row in out]
    assert got == [M.generate(ours, tok, [p], max_new_tokens=16, repetition_penalty=penalty)[0] for p in prompts]
    assert got != M.generate(ours, tok, prompts, max_new_tokens=16)


def test_kv_cache_is_sized_by_the_request(llama_dir):
    ours, tok = M.load_model(llama_dir)
    sizes = []
    orig = ours.new_kv_cache
    ours.new_kv_cache = lambda b, n: sizes.append((b, n)) or orig(b, n)
    M.generate(ours, tok, [[1, 2, 3], [1, 2, 3, 4, 5]], max_new_tokens=7)
    assert sizes == [(2, 12)]


def _hub_layout(src, cache, repo="tiny-org/tiny-llama"):
    sha = "0123456789abcdef0123456789abcdef01234567"
    base = os.path.join(cache, "models--" + repo.replace("/", "--"))
    shutil.copytree(src, os.path.join(base, "snapshots", sha))
    os.makedirs(os.path.join(base, "refs"))
    with open(os.path.join(base, "refs", "main"), "w") as f:
        f.write(sha)
    return repo


def test_load_by_hub_id_offline(llama_dir, tmp_path):
    repo = _hub_layout(llama_dir, str(tmp_path / "hub"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "PYTHONPATH": ROOT}
    code = (f"import model, torch; m, t = model.load_model({repo!r}); "
            f"print(m(torch.tensor([t.encode('Hello')])).shape[-1], m.source)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    vocab, source = out.stdout.split()
    assert int(vocab) == json.load(open(os.path.join(llama_dir, "config.json")))["vocab_size"]
    assert source.startswith(str(tmp_path / "hub"))
    code = "import model; model.load_model('tiny-org/not-there')"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "tiny-org/not-there: could not fetch it from the Hugging Face hub" in out.stderr


def _copy(src, dst, skip=()):
    os.makedirs(dst)
    for f in os.listdir(src):
        if f not in skip:
            shutil.copy(os.path.join(src, f), dst)
    return dst


def test_loader_errors(llama_dir, tmp_path):
    with pytest.raises(ValueError, match=f"^--model {tmp_path}/nowhere: no such folder"):
        M.load_model(str(tmp_path / "nowhere"))
    pickled = _copy(llama_dir, str(tmp_path / "pickled"), skip=("model.safetensors",))
    torch.save({}, os.path.join(pickled, "pytorch_model.bin"))
    with pytest.raises(ValueError, match=r"only pickle weights \(pytorch_model.bin\).*never unpickles"):
        M.load_model(pickled)
    noconfig = _copy(llama_dir, str(tmp_path / "noconfig"), skip=("config.json",))
    with pytest.raises(ValueError, match="no config.json there"):
        M.load_model(noconfig)
    gpt2 = _copy(llama_dir, str(tmp_path / "gpt2"))
    cfg = json.load(open(os.path.join(gpt2, "config.json")))
    json.dump({**cfg, "model_type": "gpt2"}, open(os.path.join(gpt2, "config.json"), "w"))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported.*llama, mistral, qwen2"):
        M.load_model(gpt2)
    wide = _copy(llama_dir, str(tmp_path / "wide"))
    json.dump({**cfg, "intermediate_size": 100}, open(os.path.join(wide, "config.json"), "w"))
    with pytest.raises(ValueError, match=r"mlp\.\w+_proj.weight' has shape \((128, 64|64, 128)\), the model expects \((100, 64|64, 100)\)"):
        M.load_model(wide)
    deep = _copy(llama_dir, str(tmp_path / "deep"))
    json.dump({**cfg, "num_hidden_layers": 3}, open(os.path.join(deep, "config.json"), "w"))
    with pytest.raises(ValueError, match="lacks .* tensors the model needs.*layers.2"):
        M.load_model(deep)
    broken = _copy(llama_dir, str(tmp_path / "broken"))
    open(os.path.join(broken, "config.json"), "w").write('{"model_type": "llama",\n oops}')
    with pytest.raises(ValueError, match=r"config.json: line 2: not valid JSON"):
        M.load_model(broken)
    notok = _copy(llama_dir, str(tmp_path / "notok"), skip=("tokenizer.json",))
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        M.load_model(notok)


def test_a_folder_without_chat_template_is_refused_before_the_weights(llama_dir, tmp_path, monkeypatch):
    """A base model's tokenizer has no chat template, and transformers v5 renders none by default (it raises
    "tokenizer.chat_template is not set"): refused in one line naming the folder, before any weights load (it
    used to fail after translation, at the first render)."""
    base = _copy(llama_dir, str(tmp_path / "base"))
    cfg = json.load(open(os.path.join(base, "tokenizer_config.json")))
    del cfg["chat_template"]
    json.dump(cfg, open(os.path.join(base, "tokenizer_config.json"), "w"))
    with pytest.raises(ValueError, match="chat_template is not set"):
        transformers.AutoTokenizer.from_pretrained(base).apply_chat_template([{"role": "user", "content": "Hi"}])
    monkeypatch.setattr(M, "load_weights", lambda *a, **k: pytest.fail("weights loaded"))
    line = (f"{base}: its tokenizer has no chat template (chat_template.jinja, chat_template.json or "
            "tokenizer_config.json 'chat_template'); clo needs a chat model, such as the -Instruct release of this "
            "one.")
    for check in (lambda: M.load_model(base), lambda: M.check_checkpoint_folder(base)):
        with pytest.raises(ValueError) as e:
            check()
        assert str(e.value) == line
    assert M.check_checkpoint_folder(llama_dir)["model_type"] == "llama"


def test_local_path_rule_and_folder_messages(llama_dir, m2m_dir, tmp_path, monkeypatch):
    """is_local_path: the one rule clo, eval and resolve_checkpoint share (an owner/name that is no path here is a hub
    id); check_checkpoint_folder names the flag and the value as the user gave them."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for local in ("./x", "/abs", "~/x", "a/b/c", "models/smol", "models"):
        assert M.is_local_path(local), local
    for hub in ("HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2"):
        assert not M.is_local_path(hub), hub
    with pytest.raises(ValueError, match=r"^--models c=runs/x: no such folder\."):
        M.check_checkpoint_folder("runs/x", "--models c=")
    with pytest.raises(ValueError, match=r"^--models c runs/x: no such folder\."):
        M.check_checkpoint_folder("runs/x", "--models c")
    with pytest.raises(ValueError) as e:
        M.load_model(m2m_dir)
    assert str(e.value) == (f"--model {m2m_dir}: an M2M100/NLLB translator, not a chat model; pass it as --translator "
                            f"{m2m_dir}, and the chat model to adapt as --model.")
    assert M.check_checkpoint_folder(m2m_dir, "--translator", chat=False)["model_type"] == "m2m_100"
    with pytest.raises(ValueError, match="^--device tpu9: not a device"):
        M.check_device("tpu9")
    assert M.check_device("cpu") == torch.device("cpu")


@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_path()
    if path is None:
        pytest.skip("SmolLM2-135M-Instruct not available (run ../shared/tools/smollm2.sh)")
    return path


def test_smollm2_parity_and_coherent_answer(smollm2):
    ours, tok = M.load_model(smollm2)
    ref = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    reft = transformers.AutoTokenizer.from_pretrained(smollm2)
    convo = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(convo)
    expected = reft.apply_chat_template(convo, add_generation_prompt=True, tokenize=True)
    assert ids == list(expected["input_ids"] if hasattr(expected, "keys") else expected)
    with torch.no_grad():
        assert (ours(torch.tensor([ids])) - ref(torch.tensor([ids])).logits).abs().max() < 1e-4
    new = M.generate(ours, tok, [ids], max_new_tokens=20)[0]
    theirs = ref.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)[0, len(ids):].tolist()
    assert new == theirs[:len(new)]
    assert "Paris" in tok.decode(new)


def test_more_loader_errors(tmp_path):
    folder = tiny.make_llama(str(tmp_path / "sharded"), shard=True)
    index = json.load(open(os.path.join(folder, "model.safetensors.index.json")))
    os.remove(os.path.join(folder, sorted(set(index["weight_map"].values()))[-1]))
    with pytest.raises(FileNotFoundError, match=r"model.safetensors.index.json: names shards that are not in the "
                                                r"folder"):
        M.load_model(folder)
    extra = tiny.make_llama(str(tmp_path / "extra"))
    from safetensors.torch import load_file, save_file
    state = load_file(os.path.join(extra, "model.safetensors"))
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # old checkpoints carry this: ignored
    save_file(state, os.path.join(extra, "model.safetensors"))
    M.load_model(extra)
    state["model.vision_tower.weight"] = torch.ones(2)
    save_file(state, os.path.join(extra, "model.safetensors"))
    with pytest.raises(ValueError, match="tensor 'model.vision_tower.weight' has no place in this model"):
        M.load_model(extra)
    with pytest.raises(ValueError, match="is not a translator"):
        D.load_translator(tiny.make_llama(str(tmp_path / "not-mt")))


def test_packed_training_rows_match_transformers_per_sequence(variant):
    """The training path (train mode, packed rows, additive mask built once, silu recomputed in backward, weights in
    the layout load_model chose) against transformers on each sequence alone: logits at the scored positions and the
    gradients of the summed response log-probs agree to fp32 tolerance."""
    name, _, ours, _, ref = variant
    g = torch.Generator().manual_seed(0)
    lengths = [(9, 7), (20, 13), (3, 4), (12, 30), (5, 2)]  # (prompt, response); 43 tokens: past the Mistral window
    seqs = [(torch.randint(5, ours.config.vocab_size, (p,), generator=g).tolist(),
             torch.randint(5, ours.config.vocab_size, (r,), generator=g).tolist()) for p, r in lengths]
    input_ids, labels, positions, segments = D.collate_sequences(seqs, 0, pack_to=48)
    assert input_ids.shape[0] < len(seqs)  # several sequences share a row
    scored = labels != -100
    ours.train()
    try:
        logits = ours(input_ids, score_mask=scored, positions=positions, segments=segments)
        seq = segments[scored]
        theirs = []
        for s, (prompt, response) in enumerate(seqs):
            full = ref(torch.tensor([prompt + response])).logits[0]
            theirs.append(full[len(prompt) - 1:len(prompt) + len(response) - 1])
        for s in range(len(seqs)):  # collate orders scored positions by row; compare sequence by sequence
            diff = (logits[seq == s] - theirs[s]).abs().max().item()
            assert diff < 1e-4, f"{name}: sequence {s}: max |logit difference| {diff}"
        ours_logp = -torch.nn.functional.cross_entropy(logits, labels[scored], reduction="sum")
        their_logp = sum(-torch.nn.functional.cross_entropy(t, torch.tensor(r), reduction="sum")
                         for t, (_, r) in zip(theirs, seqs))
        ours_logp.backward()
        their_logp.backward()
        for path in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.gate_proj.weight",
                     "model.layers.1.mlp.up_proj.weight"):
            a, b = ours.get_parameter(path).grad, ref.get_parameter(path).grad
            assert (a - b).abs().max() <= 1e-4 * b.abs().max(), f"{name}: {path} gradient"
    finally:
        ours.eval()
        ours.zero_grad(set_to_none=True), ref.zero_grad(set_to_none=True)


def test_packed_training_forward_keeps_one_mask_and_not_the_silu_output(llama_dir):
    """What a packed training forward keeps for backward: the attention mask once for all layers (SDPA used to turn
    the bool mask into a float one in every layer, each kept: 30 of them on SmolLM2), and not silu(gate), which
    backward recomputes (a third of the MLP's activations)."""
    model, _ = M.load_model(llama_dir)
    input_ids, labels, positions, segments = D.collate_sequences([([5, 6, 7], [8, 9]), ([10, 11], [12, 13, 14])],
                                                                 0, pack_to=16)
    R, T = input_ids.shape
    kept = []

    def pack(t):
        kept.append((type(t.grad_fn).__name__, tuple(t.shape), t.untyped_storage().data_ptr()))
        return t
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids, score_mask=labels != -100, positions=positions, segments=segments).sum().backward()
    assert len({ptr for _, shape, ptr in kept if shape == (R, 1, T, T)}) == 1
    assert model.config.num_hidden_layers > 1 and not [k for k in kept if k[0] == "SiluBackward0"]


def test_decode_layout_is_the_callers_choice(llama_dir):
    """load_model(layout="decode") stores the wide projections column-major on CPU (batch-1 decoding streams them);
    the default, which training loads, is plain row-major, as FSDP and optimizers expect. Same logits either way."""
    (train, tok), (decode, _) = M.load_model(llama_dir), M.load_model(llama_dir, layout="decode")
    assert all(p.is_contiguous() for p in train.parameters())
    up, down = decode.model.layers[0].mlp.up_proj.weight, decode.model.layers[0].mlp.down_proj.weight
    assert up.shape == (128, 64) and up.stride() == (1, 128) and down.is_contiguous()  # out >= in: transposed
    ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": "Hi"}])])
    with torch.no_grad():
        assert torch.allclose(train(ids), decode(ids), atol=1e-5)
    assert M.generate(train, tok, [ids[0].tolist()], 8) == M.generate(decode, tok, [ids[0].tolist()], 8)
