"""The M2M100/NLLB translator against transformers' M2M100ForConditionalGeneration on the same checkpoint, and the
text splitter that lets a sentence-level MT model translate real SFT responses."""
import pytest
import torch

import data as D

transformers = pytest.importorskip("transformers")

TEXTS = ["Hello, how are you today?", "The quick brown fox jumps over the lazy dog. Machine learning models learn.",
         "Write a poem.", "Explain gravity in simple words, please, for a child of five years old."]


@pytest.fixture(scope="module")
def pair(m2m_dir):
    ours = D.load_translator(m2m_dir)
    ref = transformers.M2M100ForConditionalGeneration.from_pretrained(m2m_dir, dtype=torch.float32).eval()
    return ours, ref


def batch(ours, src="en"):
    return ours.pad_batch([ours.encode_source(t, src) for t in TEXTS])


def test_source_layout_is_lang_tokens_eos(pair):
    ours, _ = pair
    ids = ours.encode_source("Hello", "en")
    assert ids[0] == ours.vocab["eng_Latn"] and ids[-1] == 2 and ids[1:-1] == ours.tok.encode("Hello",
                                                                                               add_special_tokens=False).ids
    assert ours.lang_id("ko") == ours.lang_id("kor_Hang") == ours.vocab["kor_Hang"]


def test_unknown_language_lists_close_matches(pair):
    ours, _ = pair
    with pytest.raises(ValueError, match=r"language 'kor_Hangul' is not supported.*Did you mean ko\? "):
        ours.lang_id("kor_Hangul")
    with pytest.raises(ValueError, match="language 'xx' is not supported"):
        ours.translate(["Hi"], "en", "xx")


def test_encoder_and_decoder_logits_match(pair):
    ours, ref = pair
    ids, mask = batch(ours)
    dec = torch.tensor([[2, ours.lang_id("ko"), 10, 20, 30, 40]] * len(TEXTS))
    with torch.no_grad():
        enc_ref = ref.model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        enc = ours.model.encode(ids, mask)
        real = mask.bool()
        assert (enc - enc_ref)[real].abs().max() < 1e-4
        logits = ours.model(ids, mask, dec)
        logits_ref = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert (logits - logits_ref).abs().max() < 1e-4


def reference_generate(ref, ours, ids, mask, num_beams, n):
    out = ref.generate(input_ids=ids, attention_mask=mask, forced_bos_token_id=ours.lang_id("ko"), num_beams=num_beams,
                       max_new_tokens=n + 1, do_sample=False, length_penalty=1.0, early_stopping=False,
                       decoder_start_token_id=2, eos_token_id=2, pad_token_id=1)
    rows = []
    for row in out[:, 2:].tolist():  # drop decoder_start and the forced language code
        row = row[:row.index(2)] if 2 in row else row
        rows.append([t for t in row if t != 1])
    return rows


@pytest.fixture(scope="module")
def runs_to_limit(tmp_path_factory):
    """A checkpoint with no eos bias: every hypothesis runs to max_new_tokens (the other stopping path)."""
    import tiny
    folder = tiny.make_m2m100(str(tmp_path_factory.mktemp("m2m_long")), seed=0)
    return D.load_translator(folder), transformers.M2M100ForConditionalGeneration.from_pretrained(folder).eval()


@pytest.mark.parametrize("num_beams", [1, 4])
def test_generation_token_identical(pair, runs_to_limit, num_beams):
    lengths = []
    for ours, ref in (pair, runs_to_limit):
        ids, mask = batch(ours)
        for n in (6, 16):
            got = ours.generate(ids, mask, tgt="ko", num_beams=num_beams, max_new_tokens=n)
            assert got == reference_generate(ref, ours, ids, mask, num_beams, n)
            lengths += [len(g) for g in got]
    # both stopping paths were exercised: outputs that ended with eos, and outputs cut at the limit
    assert min(lengths) < 6 and max(lengths) == 16


def test_translate_keeps_structure_and_code(pair):
    ours, _ = pair
    text = ("Here is a list:\n\n1. First item. Second sentence!\n- Use `print(x)` to show it.\n\n"
            "```python\ndef add(a, b):\n    return a + b\n```\n## Done\n    indented line")
    out = ours.translate([text, "Hi"], "en", "ko", num_beams=2, progress=False)[0]
    lines, src_lines = out.split("\n"), text.split("\n")
    assert len(lines) == len(src_lines)
    assert lines[1] == "" and lines[4] == ""
    assert lines[2].startswith("1. ") and lines[3].startswith("- ") and lines[9].startswith("## ")
    assert lines[10].startswith("    ")
    assert lines[5:9] == src_lines[5:9]  # the fenced code block, verbatim
    assert "`print(x)`" in lines[3]      # inline code survives, placeholder or not


def test_splitter_roundtrip_and_degenerate_detection():
    text = "First one. Second one? Third!\n\n* item with `code`\n```\nx = 1. y\n```\n123"
    plan, sentences = D.split_for_translation(text)
    assert sentences == ["First one.", "Second one?", "Third!", "item with <0>"]
    assert D.join_translation(plan, sentences) == text  # identity translation gives the text back
    assert D.is_degenerate([5] * 10, [7, 8, 9] * 5)  # a phrase four times in a row
    assert D.is_degenerate([5] * 3, list(range(40)))  # far longer than its source
    assert not D.is_degenerate([5] * 10, [1, 2, 3, 4, 5, 6, 1, 2])
    run_on = ", ".join(f"clause number {i} goes on and on" for i in range(40)) + "."
    pieces = D.split_long(run_on, max_chars=200)
    assert len(pieces) > 1 and all(len(p) <= 200 for p in pieces) and " ".join(pieces) == run_on
    words = "x" * 50 + " " + " ".join(["word"] * 200)
    assert " ".join(D.split_long(words, 100)) == words and max(map(len, D.split_long(words, 100))) <= 100
    plan, sentences = D.split_for_translation(run_on)
    assert len(sentences) > 1 and D.join_translation(plan, sentences) == run_on
