"""data.py: English SFT data -> machine translation -> cross-lingual preference pairs -> token batches.

CLO (Lee et al., ACL 2025, Sec. 3) needs, for each English SFT item (x_en, y_en) and target language l, its
translation (x_l, y_l). Each item then gives two preference pairs:

    (prompt x_en, chosen y_en, rejected y_l)    answer English in English
    (prompt x_l,  chosen y_l,  rejected y_en)   answer language l in language l

Every bad input raises one ValueError naming the file and line (or the value) and what to do.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import difflib
import errno
import gzip
import hashlib
import json
import os
import pathlib
import random
import re
import sys
from dataclasses import dataclass

import torch

import model as M

DEFAULT_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "samples", "alpaca_seed_en.jsonl")


# ----------------------------------------------------------------------------------------------------------------------
# English SFT data


def sft_item(row: dict, path: str) -> dict:
    """One row of Alpaca format (instruction, input, output) or chat format (messages) -> {instruction, response}."""
    where = f"{path}: line {row.get('_line', '?')}"
    if "messages" in row:
        msgs = row["messages"]
        user = next((m for m in msgs if m.get("role") == "user"), None)
        if user is None:
            raise ValueError(f"{where}: 'messages' has no user turn.")
        reply = next((m for m in msgs[msgs.index(user) + 1:] if m.get("role") == "assistant"), None)
        if reply is None:
            raise ValueError(f"{where}: 'messages' has no assistant turn after the first user turn.")
        return {"instruction": user.get("content") or "", "response": reply.get("content") or ""}
    missing = [k for k in ("instruction", "output") if not isinstance(row.get(k), str)]  # absent, or null/number
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}. Expected Alpaca format (instruction, input, output) "
                         "or chat format (messages: [{role: user, ...}, {role: assistant, ...}]).")
    instruction = f"{row['instruction']}\n\n{row['input']}" if row.get("input") else row["instruction"]
    return {"instruction": instruction, "response": row["output"]}


def load_oasst1() -> list[dict]:
    """--data oasst1: the release's ready trees (one gzip JSONL file from the hub), selected by oasst1_pairs."""
    from huggingface_hub import hf_hub_download
    try:
        path = hf_hub_download("OpenAssistant/oasst1", "2023-04-12_oasst_ready.trees.jsonl.gz", repo_type="dataset")
    except Exception as e:
        raise ValueError(f"oasst1: could not fetch OpenAssistant/oasst1 from the hub ({type(e).__name__}: {e}); "
                         "pass --data with a local file instead.") from e
    return oasst1_pairs(path)


def oasst1_pairs(trees_path: str) -> list[dict]:
    """oasst1 message trees (JSONL, gzip too; a tree a line, {"prompt": message}, each message with role, lang, text,
    rank, deleted, review_result, labels {name: {value}}, emojis {name: count}, replies) -> SFT items, best first: the
    README's reading of the paper's "top 6,400 highly-ranked single-turn data entries from OpenAssistant"."""
    def kept(m):
        return not m.get("deleted") and m.get("review_result") is not False and m.get("text")
    scored = []
    for tree in read_jsonl(trees_path):
        prompt = tree.get("prompt") or {}
        if prompt.get("lang") != "en" or prompt.get("role") != "prompter" or not kept(prompt):
            continue
        for reply in prompt.get("replies") or []:
            if reply.get("role") == "assistant" and reply.get("rank") is not None and kept(reply):
                quality = ((reply.get("labels") or {}).get("quality") or {}).get("value") or 0.0
                votes = (reply.get("emojis") or {}).get("+1") or 0
                scored.append(((-reply["rank"], quality, votes), {"instruction": prompt["text"],
                                                                   "response": reply["text"]}))
    scored.sort(key=lambda s: s[0], reverse=True)  # every rank-0 reply first; stable: ties keep the release's order
    return [item for _, item in scored]


def first_items(items: list, num_samples: int | None, source: str) -> list:
    """The first num_samples items (None: all); ValueError if `source` has none, or fewer than asked."""
    if not items:
        raise ValueError(f"{source}: no SFT items found; the file is empty.")
    if num_samples is not None and num_samples > len(items):
        raise ValueError(f"--num-samples {num_samples}: {source} has only {len(items)} items; ask for at most "
                         f"{len(items)} (a run labelled {num_samples} would train on fewer).")
    return items[:num_samples]


def load_sft(source: str | None = None, num_samples: int | None = None) -> list[dict]:
    """--data (an Alpaca JSON/JSONL file, a chat JSONL file, 'oasst1', None: the shipped sample) -> first_items."""
    if source == "oasst1":
        return first_items(load_oasst1(), num_samples, "oasst1 (ranked replies to English root prompts)")
    path = source or DEFAULT_DATA
    return first_items([sft_item(row, path) for row in read_jsonl(path)], num_samples, path)


# ----------------------------------------------------------------------------------------------------------------------
# Language codes: ISO 639-1 (ko) -> FLORES-200 (kor_Hang: NLLB's language tokens). M2M100's tokens are __xx__ with these
# ISO-like codes, numbered after vocab.json in M2M100_CODES' order (fairseq's list; its WMT21 models use their own 8).


FLORES_CODES = {
    "en": "eng_Latn", "ko": "kor_Hang", "zh": "zho_Hans", "de": "deu_Latn", "id": "ind_Latn", "sw": "swh_Latn",
    "yo": "yor_Latn", "fr": "fra_Latn", "es": "spa_Latn", "pt": "por_Latn", "it": "ita_Latn", "nl": "nld_Latn",
    "ja": "jpn_Jpan", "ru": "rus_Cyrl", "uk": "ukr_Cyrl", "pl": "pol_Latn", "cs": "ces_Latn", "ar": "arb_Arab",
    "fa": "pes_Arab", "he": "heb_Hebr", "tr": "tur_Latn", "hi": "hin_Deva", "bn": "ben_Beng", "ur": "urd_Arab",
    "ta": "tam_Taml", "te": "tel_Telu", "th": "tha_Thai", "vi": "vie_Latn", "ms": "zsm_Latn", "tl": "tgl_Latn",
    "el": "ell_Grek", "sv": "swe_Latn", "da": "dan_Latn", "fi": "fin_Latn", "hu": "hun_Latn", "ro": "ron_Latn",
    "am": "amh_Ethi", "ha": "hau_Latn", "ig": "ibo_Latn", "zu": "zul_Latn", "xh": "xho_Latn", "ca": "cat_Latn",
}
M2M100_CODES = {"m2m100": "af am ar ast az ba be bg bn br bs ca ceb cs cy da de el en es et fa ff fi fr fy ga gd gl "
                "gu ha he hi hr ht hu hy id ig ilo is it ja jv ka kk km kn ko lb lg ln lo lt lv mg mk ml mn mr ms my "
                "ne nl no ns oc or pa pl ps pt ro ru sd si sk sl so sq sr ss su sv sw ta th tl tn tr uk ur uz vi wo xh "
                "yi yo zh zu".split(), "wmt21": "en ha is ja cs ru zh de".split()}
LANGUAGE_TOKEN = re.compile(r"[a-z]{3}_[A-Z][a-z]{3}|__[a-z]{2,3}__")


def check_languages(langs: list[str], have: list[str] | None = None, path: str | None = None):
    """--lang, before any work: ValueError on a language the run cannot train: one `path` has no columns for (`have`:
    its languages), else one neither the tables nor a FLORES-200/__xx__ token know (a translator's: language_token)."""
    if not langs:  # --lang "" or ",": nothing to train, and translate_items would fail on an empty language list
        raise ValueError("--lang is empty; give the target language(s), e.g. ko or ko,sw.")
    codes = [FLORES_CODES.get(lang.strip("_"), lang.strip("_")) for lang in langs]  # ko, kor_Hang, __ko__: one
    for lang, code in zip(langs, codes):
        if lang.lower().startswith("en"):  # en, EN, en_US, eng_Latn, english: no other language code starts so
            raise ValueError(f"--lang {lang}: English is the source language; give the target language(s), e.g. ko.")
        if codes.count(code) > 1:
            raise ValueError(f"--lang {','.join(langs)}: {lang} is given twice; each language's pairs would train "
                             "twice per epoch.")
    for lang in langs:
        if have is not None and lang not in have:
            raise ValueError(f"--lang {lang}: {path} has no {lang}_instruction/{lang}_response columns; its "
                             f"languages: {', '.join(have) or 'none'}.")
        if have is None and not (lang in FLORES_CODES or lang in M2M100_CODES["m2m100"]
                                 or LANGUAGE_TOKEN.fullmatch(lang)):
            raise ValueError(f"--lang {lang}: unknown language code.{close_codes(lang, FLORES_CODES)} Use ISO 639-1 "
                             f"codes ({', '.join(sorted(FLORES_CODES))}) or FLORES-200 codes (kor_Hang).")


def close_codes(code: str, names) -> str:
    """The one close-match hint for a language code: its two-letter stem (KO, korean, ko_KR -> ko), else difflib's."""
    stem = code.lower()[:2]
    close = [stem] if stem in names else difflib.get_close_matches(code, list(names), n=3, cutoff=0.5)
    return f" Did you mean {' or '.join(close)}?" if close else ""


def language_token(vocab: dict, code: str, name: str = "this translator") -> tuple[str, int]:
    """An ISO 639-1 (ko) or FLORES-200 (kor_Hang) code -> the checkpoint's language token and id: NLLB's kor_Hang or
    M2M100's __ko__, never a text piece that spells the code. Raises ValueError naming code and translator (`name`)."""
    iso = {fl: iso for iso, fl in FLORES_CODES.items()}.get(code, code)
    for token in (FLORES_CODES.get(code, code), f"__{iso}__"):
        if LANGUAGE_TOKEN.fullmatch(token) and token in vocab:
            return token, vocab[token]
    tried = [t for t in (FLORES_CODES.get(code, code), f"__{iso}__") if LANGUAGE_TOKEN.fullmatch(t)]
    if LANGUAGE_TOKEN.fullmatch(FLORES_CODES.get(code, code)):  # a known code: the hint below would mislead
        raise ValueError(f"language {code!r} is not supported by {name}: it has no {' or '.join(tried)} token.")
    names = {t for t in vocab if LANGUAGE_TOKEN.fullmatch(t)} | {i for i, fl in FLORES_CODES.items() if fl in vocab}
    raise ValueError(f"language {code!r} is not supported by {name}.{close_codes(code, sorted(names))} Use an ISO "
                     f"639-1 code ({', '.join(sorted(FLORES_CODES)[:12])}, ...) or a FLORES-200 code such as kor_Hang.")


# ----------------------------------------------------------------------------------------------------------------------
# Translation: sentence splitting, the Translator service around model.py's M2M100 network


SENTENCE_END = re.compile(r"(?<=[.!?。！？])\s+(?=\S)")
LINE_PREFIX = re.compile(r"^(\s*(?:[-*+]\s+|\d+[.)]\s+|#{1,6}\s+|>\s*)*)")
FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`[^`\n]+`")


def split_for_translation(text: str):
    """A text -> (plan, sentences): the sentences a sentence-level MT model should see, inline code spans replaced by
    placeholders <0>, <1>, ... that MT copies, and the plan join_translation puts back together: per line (markdown
    prefix, [(sentence_index, code_spans), ...]); a line kept verbatim (fenced code, no words) is (line, [])."""
    plan, sentences, in_fence = [], [], False
    for line in text.split("\n"):
        fence = FENCE.match(line)
        in_fence ^= bool(fence)  # a fence line opens or closes a code block
        prefix = LINE_PREFIX.match(line).group(1)
        body = line[len(prefix):]
        if fence or in_fence or not re.search(r"[^\W\d_]", body):  # code, or nothing to translate (blank, numbers)
            plan.append((line, []))
            continue
        parts = []
        for sentence in (piece for s in SENTENCE_END.split(body) for piece in split_long(s)):
            spans = INLINE_CODE.findall(sentence)
            for i, span in enumerate(spans):
                sentence = sentence.replace(span, f"<{i}>", 1)
            parts.append((len(sentences), spans))
            sentences.append(sentence)
        plan.append((prefix, parts))
    return plan, sentences


def split_long(sentence: str, max_chars: int = 400) -> list[str]:
    """A run-on sentence (over max_chars, ~100+ tokens) cut at clause marks, else between words, into pieces the MT
    model translates whole: NLLB drops or garbles the tail of long inputs, and cutting by tokens would lose text."""
    if len(sentence) <= max_chars:
        return [sentence]
    pieces, current = [], ""
    for chunk in re.split(r"(?<=[,;:])\s+", sentence):
        for word in chunk.split(" ") if len(chunk) > max_chars else [chunk]:
            if current and len(current) + 1 + len(word) > max_chars:
                pieces.append(current)
                current = ""
            current += (" " if current else "") + word
    return pieces + ([current] if current else [])


def join_translation(plan, translated: list[str]) -> str:
    lines = []
    for prefix, parts in plan:
        out = []
        for index, spans in parts:
            sentence = translated[index]
            for i, span in enumerate(spans):  # a placeholder the model dropped: its code span goes at the end, not lost
                sentence = sentence.replace(f"<{i}>", span, 1) if f"<{i}>" in sentence else f"{sentence} {span}"
            out.append(sentence)
        lines.append(prefix + " ".join(out))
    return "\n".join(lines)


def is_degenerate(source_ids: list[int], output_ids: list[int]) -> bool:
    """An MT output gone wrong: far longer than its source, or a phrase (1 to 8 tokens) repeated 4+ times in a row."""
    return len(output_ids) > 3 * len(source_ids) + 10 or any(
        output_ids[start:start + size] * 4 == output_ids[start:start + 4 * size]
        for size in range(1, 9) for start in range(len(output_ids) - 4 * size + 1))


class SentencePieceTokenizer:
    """M2M100's released tokenizer (Translator's tokenizers.Tokenizer methods) as fairseq's: pieces -> vocab.json ids
    (a missing piece: <unk>, transformers#11336), then __xx__ in M2M100_CODES' order; text spelling </s> stays text."""

    def __init__(self, folder: str):
        import sentencepiece
        self.sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(folder, "sentencepiece.bpe.model"))
        self.vocab = M.read_json(os.path.join(folder, "vocab.json"))
        self.pieces = {i: p for p, i in self.vocab.items() if p not in ("<s>", "<pad>", "</s>", "<unk>")}
        cfg = os.path.join(folder, "tokenizer_config.json")
        codes = M2M100_CODES[M.read_json(cfg).get("language_codes", "m2m100") if os.path.exists(cfg) else "m2m100"]
        self.vocab.update({f"__{c}__": len(self.vocab) + k for k, c in enumerate(codes)})

    def get_vocab(self) -> dict:
        return self.vocab

    def encode(self, text: str, add_special_tokens=False):
        from types import SimpleNamespace
        return SimpleNamespace(ids=[self.vocab.get(p, self.vocab["<unk>"]) for p in self.sp.encode(text, out_type=str)])

    def decode(self, ids: list[int], skip_special_tokens=True) -> str:
        return self.sp.decode([self.pieces[i] for i in ids if i in self.pieces]).strip()


class Translator:
    """An M2M100/NLLB model and its tokenizer: translate() for texts, generate() for raw ids; errors say `name`."""

    def __init__(self, model: M.M2M100ForConditionalGeneration, tokenizer, name: str = "this translator"):
        self.model, self.tok, self.name = model, tokenizer, name
        self.sentences = 0  # sentences translated so far: the unit of translate_items' rate
        self.vocab = tokenizer.get_vocab()

    def lang_id(self, code: str) -> int:
        return language_token(self.vocab, code, self.name)[1]

    def encode_source(self, text: str, src: str) -> list[int]:
        """NLLB's current layout, and M2M100's: [src_lang_code] tokens [eos]."""
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return [self.lang_id(src)] + ids + [self.model.config.eos_token_id]

    def pad_batch(self, sources: list[list[int]]):
        """Left-pads a list of id lists with the pad id: (input_ids, attention_mask) on the model's device."""
        return M.pad_batch(sources, self.model.config.pad_token_id, device=self.model.lm_head.weight.device)

    def generate(self, input_ids, attention_mask, tgt: str = "ko", num_beams: int = 4,
                 max_new_tokens: int = 200) -> list[list[int]]:
        """Raw decoding of laid-out sources; returns the ids after the forced target-language token (no eos, no pad)."""
        forced = self.lang_id(tgt)
        if num_beams <= 1:
            return M.seq2seq_greedy(self.model, input_ids, attention_mask, forced, max_new_tokens)
        return M.seq2seq_beam_search(self.model, input_ids, attention_mask, forced, num_beams, max_new_tokens)

    def _decode(self, sources, src, tgt, num_beams, batch_size, progress, room=2) -> tuple[list[list[int]], set]:
        """Laid-out sources in length-sorted batches, each with room for room x its longest source + 10 new tokens ->
        the outputs' ids, and the indices of the outputs that reached that cap without the end token."""
        from tqdm import tqdm
        order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
        out, capped = [[] for _ in sources], set()
        bar = tqdm(total=len(sources), desc=f"translate {src}->{tgt}", unit="sent", disable=not progress)
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            ids, mask = self.pad_batch([sources[i] for i in idx])
            cap = room * max(len(sources[i]) for i in idx) + 10
            for i, gen in zip(idx, self.generate(ids, mask, tgt, num_beams, cap)):
                out[i] = gen
                if len(gen) >= cap:  # generate() drops the end token: an output this long never produced it
                    capped.add(i)
            bar.update(len(idx))
        bar.close()
        return out, capped

    def translate(self, texts: list[str], *args, **kwargs) -> list[str]:
        """translate_flagged's translations only (the same arguments)."""
        return self.translate_flagged(texts, *args, **kwargs)[0]

    def translate_flagged(self, texts: list[str], src: str = "en", tgt: str = "ko", num_beams: int = 4,
                          batch_size: int = 16, max_input_tokens: int = 256,
                          progress: bool = True) -> tuple[list[str], list[list[str]]]:
        """Real texts (README, Python API: splitting, caps, the retry) -> the translations and, per text, its problems:
        "cut" (a sentence over max_input_tokens, or output still at the cap), "degenerate" (still, after the retry)."""
        self.lang_id(src), self.lang_id(tgt)  # fail early on an unknown language
        split = [split_for_translation(text) for text in texts]  # per text: (plan, sentences)
        self.sentences += sum(len(sents) for _, sents in split)
        unique = list(dict.fromkeys(s for _, sents in split for s in sents))  # each distinct sentence translated once
        sources = [self.encode_source(s, src) for s in unique]
        cut = {i for i, ids in enumerate(sources) if len(ids) > max_input_tokens}  # after split_long: word-less blobs
        sources = [ids[:max_input_tokens - 1] + ids[-1:] if i in cut else ids for i, ids in enumerate(sources)]
        outputs, capped = self._decode(sources, src, tgt, num_beams, batch_size, progress)
        bad = [i for i, (s, o) in enumerate(zip(sources, outputs)) if i in capped or is_degenerate(s, o)]
        retried, recapped = self._decode([sources[i] for i in bad], src, tgt, 1 if num_beams > 1 else 4, batch_size,
                                         False, room=3)
        for k, (i, r) in enumerate(zip(bad, retried)):
            if k not in recapped and not is_degenerate(sources[i], r):
                outputs[i] = r
                capped.discard(i)
        by_text = {s: self.tok.decode(o, skip_special_tokens=True) for s, o in zip(unique, outputs)}
        problems = {"cut": {unique[i] for i in cut | capped},
                    "degenerate": {unique[i] for i, (s, o) in enumerate(zip(sources, outputs)) if is_degenerate(s, o)}}
        flags = [list(dict.fromkeys(name for s in sents for name, found in problems.items() if s in found))
                 for _, sents in split]
        return [join_translation(plan, [by_text[s] for s in sents]) for plan, sents in split], flags


def load_translator(path_or_id: str = "facebook/nllb-200-distilled-600M", dtype=torch.float32, device="cpu"):
    """An M2M100/NLLB-200 checkpoint (model.load_m2m100) and its tokenizer.json (NLLB) or M.SENTENCEPIECE_FILES (M2M100)
    -> Translator; before the weights load, ValueError: not a checkpoint folder, FileNotFoundError: no tokenizer."""
    from tokenizers import Tokenizer
    folder = M.resolve_checkpoint(path_or_id)
    M.check_checkpoint_folder(folder, "--translator", chat=False)
    if os.path.exists(os.path.join(folder, "tokenizer.json")):
        tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    elif all(os.path.exists(os.path.join(folder, f)) for f in M.SENTENCEPIECE_FILES):
        tok = SentencePieceTokenizer(folder)
    else:
        raise FileNotFoundError(f"{folder}: no tokenizer: an NLLB checkpoint has tokenizer.json, an M2M100 one "
                                f"{' + '.join(M.SENTENCEPIECE_FILES)}.")
    return Translator(M.load_m2m100(folder, dtype, device), tok, path_or_id)


# ----------------------------------------------------------------------------------------------------------------------
# Parallel files (--translations; the run's cache, translated once, chunk by chunk, resumable): a row per English
# item with en_instruction, en_response and, per language, e.g. ko_instruction, ko_response, ko_flags


def read_translations(path: str, own: bool = False, log=print, lines: dict | None = None) -> dict[tuple, dict]:
    """A parallel JSONL file -> {(english instruction, english response): row}; a later line of an item adds to its
    earlier ones (`lines`, if given, gets each item's first line number). `own`: the run's cache (see read_jsonl)."""
    table = {}
    if not os.path.exists(path):
        return table
    for row in read_jsonl(path, own, log):
        number = row.pop("_line")
        missing = [k for k in ("en_instruction", "en_response") if k not in row]
        if missing:
            raise ValueError(f"{path}: line {number}: missing field(s) {missing}; a translations file has "
                             "en_instruction, en_response and, per language, e.g. ko_instruction, ko_response.")
        key = (row["en_instruction"], row["en_response"])
        # a later translation of a language replaces its flags too (absent: no longer flagged)
        stale = {f[:-len("_response")] + "_flags" for f in row if f.endswith("_response") and f != "en_response"}
        table[key] = {**{k: v for k, v in table.get(key, {}).items() if k not in stale}, **row}
        if lines is not None:
            lines.setdefault(key, number)
    return table


def read_parallel(path: str, langs: list[str], num_samples: int | None = None,
                  items: list[dict] | None = None) -> list[dict]:
    """--translations, read once and checked whole before any model loads -> the rows of `items` (--data's), else of
    the file's first num_samples items, with en_* and <lang>_* strings for each of langs; ValueError names the line."""
    if not os.path.isfile(path):
        raise ValueError(f"--translations {path}: no such file.")
    lines = {}
    table = read_translations(path, lines=lines)
    if not table:
        raise ValueError(f"--translations {path}: no rows; the file is empty.")
    check_languages(langs, sorted({k[:-len("_response")] for row in table.values() for k in row
                                   if k.endswith("_response") and k != "en_response"}), path)
    keys = first_items(list(table), num_samples, path) if items is None else [
        (it["instruction"], it["response"]) for it in items]
    for key in keys:
        if key not in table:
            raise ValueError(f"{path}: has no row for the English item {key[0][:60]!r}; with --translations, --data "
                             "must hold the same English items (or leave --data out to train on the translations "
                             "file's own English side).")
        lacking = [f"{l}_{f}" for l in langs for f in ("instruction", "response")
                   if not isinstance(table[key].get(f"{l}_{f}"), str)]
        if lacking:
            raise ValueError(f"{path}: line {lines[key]}: lacks {', '.join(lacking)} (a string each); fill it in, or "
                             "drop the row.")
    return [table[key] for key in keys]


def item_key(item: dict, lang: str) -> str:
    """Hash of the English source text and the target language: the cache's key for one translation."""
    raw = json.dumps([lang, item["instruction"], item["response"]], ensure_ascii=False)
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()[:20]


def translate_items(items: list[dict], langs: list[str], cache_path: str, translator=None, chunk: int = 8,
                    log=print, progress: bool = True, **translate_kwargs) -> list[dict]:
    """One row per item, with en_* and <lang>_* for each of langs: the cache's, else `translator`'s (or a function's
    that loads one, if needed), appended chunk by chunk: a kill loses one chunk at most, a rerun translates the rest."""
    from tqdm import tqdm
    cached = read_translations(cache_path, own=True, log=log)
    for lang in langs:
        todo = [it for it in items if f"{lang}_response" not in cached.get((it["instruction"], it["response"]), {})]
        if todo:
            log(f"translating {len(todo)} items to {lang} ({len(items) - len(todo)} already in {cache_path})")
            if not hasattr(translator, "translate_flagged"):
                translator = translator()
                for code in langs if hasattr(translator, "lang_id") else ():
                    translator.lang_id(code)  # every language checked as soon as it loads, before any translation
        bar = tqdm(total=len(todo), desc=f"translate en->{lang}", unit="item", disable=not (progress and todo))
        before = getattr(translator, "sentences", 0)
        for start in range(0, len(todo), chunk):
            part = todo[start:start + chunk]
            texts = [t for it in part for t in (it["instruction"], it["response"])]
            out, flags = translator.translate_flagged(texts, "en", lang, progress=False, **translate_kwargs)
            bar.update(len(part))
            rate = (getattr(translator, "sentences", 0) - before) / max(bar.format_dict["elapsed"], 1e-6)
            bar.set_postfix_str(f"{rate:.1f} sentences/s")
            new = []
            for k, it in enumerate(part):
                row = {"key": item_key(it, lang), "en_instruction": it["instruction"], "en_response": it["response"],
                       f"{lang}_instruction": out[2 * k], f"{lang}_response": out[2 * k + 1]}
                problems = sorted(set(flags[2 * k]) | set(flags[2 * k + 1]))
                if problems:  # kept in the file, so that the run (and a rerun) knows; see build_pairs
                    row[f"{lang}_flags"] = problems
                new.append(row)
                key = (it["instruction"], it["response"])
                cached[key] = {**cached.get(key, {}), **row}
            append_jsonl(cache_path, new)
        bar.close()
    return [cached[(it["instruction"], it["response"])] for it in items]


# ----------------------------------------------------------------------------------------------------------------------
# Cross-lingual pairs (CLO, Sec. 3), their tokens and batches


def build_pairs(rows: list[dict], langs: list[str], keep_flagged: bool = False) -> list[dict]:
    """Two pairs per item and language, with the row's number (`item`); `in_target_lang`: the chosen answer is in the
    target language (only those enter CLO's NLL term). A flagged translation misleads: none unless keep_flagged."""
    pairs = []
    for item, row in enumerate(rows):
        x_en, y_en = row["en_instruction"], row["en_response"]
        for lang in langs:
            if row.get(f"{lang}_flags") and not keep_flagged:
                continue
            x_l, y_l = row[f"{lang}_instruction"], row[f"{lang}_response"]
            pairs.append({"lang": lang, "item": item, "in_target_lang": False, "prompt": x_en, "chosen": y_en,
                          "rejected": y_l})
            pairs.append({"lang": lang, "item": item, "in_target_lang": True, "prompt": x_l, "chosen": y_l,
                          "rejected": y_en})
    return pairs


def translation_flags(rows: list[dict], langs: list[str]) -> dict[str, int]:
    """How many (item, language) translations carry each flag, and how many are flagged at all."""
    flags = [row.get(f"{lang}_flags") or [] for row in rows for lang in langs]
    return {"flagged": sum(map(bool, flags)), "cut": 0, "degenerate": 0,
            **collections.Counter(f for found in flags for f in found)}


@dataclass
class TokenizedPair:
    prompt: list[int]     # chat-templated user turn + assistant header
    chosen: list[int]     # response tokens, up to and including the end-of-turn token
    rejected: list[int]
    in_target_lang: bool  # the chosen answer is in the target language (it enters CLO's NLL term)
    index: int            # position in pairs.jsonl
    item: int | None = None  # the English item it comes from: its pairs (2 per language) train in one micro-batch


def conversation_tokens(tok, prompt: str, responses: list[str]) -> tuple[list[int], list[list[int]], bool]:
    """Each whole conversation (user turn `prompt`, assistant turn `response`) encoded at once, as the model sees it,
    split at the longest common prefix into the prompt and each response through its last end-of-turn token (README,
    Tokenization: why). Returns (prompt ids, [response ids], whether a token straddled the boundary)."""
    user = [{"role": "user", "content": prompt}]
    prompt_text = tok.render_chat(user, add_generation_prompt=True)
    prompt_ids = tok.encode(prompt_text)
    fulls = []
    for text in responses:
        full_text = tok.render_chat(user + [{"role": "assistant", "content": text}], add_generation_prompt=False)
        if not full_text.startswith(prompt_text):
            at = next((i for i, (a, b) in enumerate(zip(prompt_text, full_text)) if a != b), len(full_text))
            raise ValueError(f"the chat template renders the conversation of the prompt {prompt[:50]!r} differently "
                             f"from its generation prompt, from character {at} on ({prompt_text[at:at + 30]!r} vs "
                             f"{full_text[at:at + 30]!r}); clo needs a template whose generation prompt is a prefix "
                             "of the whole conversation (the model's tokenizer_config.json or chat_template.jinja).")
        fulls.append(tok.encode(full_text))
    shared = len(os.path.commonprefix([prompt_ids, *fulls]))  # commonprefix compares any sequences, not only paths
    if shared == 0:
        raise ValueError("the chat template's prompt and the whole conversation share no tokens (prompt "
                         f"{prompt[:40]!r}); check the tokenizer and chat template.")
    ends = [max((i + 1 for i in range(shared, len(ids)) if ids[i] in tok.eos_ids), default=len(ids)) for ids in fulls]
    return prompt_ids[:shared], [ids[shared:end] for ids, end in zip(fulls, ends)], shared < len(prompt_ids)


def tokenize_pairs(pairs: list[dict], tok, max_len: int = 1024) -> tuple[list[TokenizedPair], dict]:
    """Tokens of each pair (conversation_tokens) under the README's truncation policy (max_len: tokens of prompt +
    response) -> the kept pairs, and counts of those dropped or cut ("boundary_moved": conversation_tokens' moved)."""
    kept, report = [], {"pairs": len(pairs), "dropped_empty": 0, "dropped_long_prompt": 0, "truncated": 0,
                        "boundary_moved": 0}
    for index, p in enumerate(pairs):
        if not (p["prompt"].strip() and p["chosen"].strip() and p["rejected"].strip()):
            report["dropped_empty"] += 1
            continue
        prompt_ids, responses, moved = conversation_tokens(tok, p["prompt"], [p["chosen"], p["rejected"]])
        if len(prompt_ids) > max_len // 2:
            report["dropped_long_prompt"] += 1
            continue
        report["boundary_moved"] += moved
        room = max_len - len(prompt_ids)
        report["truncated"] += sum(len(ids) > room for ids in responses)
        responses = [ids[:room] for ids in responses]
        kept.append(TokenizedPair(prompt_ids, responses[0], responses[1], p["in_target_lang"], index,
                                  p.get("item", index)))
    report["kept"] = len(kept)
    return kept, report


def length_grouped_batches(pairs: list[TokenizedPair], batch_size: int, seed: int, epoch: int,
                           by_item: bool = True) -> list[list[list[int]]]:
    """Batches of batch_size groups of pair indices, similar lengths together; a group is one item's pairs (by_item;
    README, Item-paired batches) or one pair. Shuffled per epoch by seed: a rerun or resume sees the same batches."""
    groups = {}
    for i, p in enumerate(pairs):
        groups.setdefault(p.item if by_item and p.item is not None else -1 - i, []).append(i)
    length = [max(len(pairs[i].prompt) + max(len(pairs[i].chosen), len(pairs[i].rejected)) for i in g)
              for g in groups.values()]
    order = [g for _, g in sorted(zip(length, groups.values()), key=lambda x: (x[0], x[1][0]))]
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    random.Random(seed * 1000 + epoch).shuffle(batches)
    return batches


def collate(pairs: list[TokenizedPair], pad_id: int, pack_to: int | None = None):
    """B pairs -> collate_sequences of their 2B sequences, chosen_1..chosen_B then rejected_1..rejected_B."""
    return collate_sequences([(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs],
                             pad_id, pack_to)


def collate_sequences(sequences: list[tuple[list[int], list[int]]], pad_id: int, pack_to: int | None = None):
    """N (prompt ids, response ids) sequences -> input_ids (R, T); labels (R, T): the next token where it is a response
    token, else -100; positions (R, T) in its own sequence; segments (R, T): which of the N sequences (-1: padding).
    pack_to None: one sequence per row (R = N), right-padded. pack_to L: first-fit-decreasing into rows of at most
    max(L, longest) tokens; attention stays within a sequence (model.hidden_states), so the result is as unpacked."""
    seqs = [prompt + response for prompt, response in sequences]
    if pack_to is None:
        rows = [[s] for s in range(len(seqs))]
    else:
        capacity = max(pack_to, max(map(len, seqs)))
        rows, room = [], []
        for s in sorted(range(len(seqs)), key=lambda s: -len(seqs[s])):
            fit = next((r for r, free in enumerate(room) if free >= len(seqs[s])), len(rows))
            if fit == len(rows):  # no row has room: a new one
                rows.append([]), room.append(capacity)
            rows[fit].append(s)
            room[fit] -= len(seqs[s])
    T = max(sum(len(seqs[s]) for s in row) for row in rows)
    input_ids, labels, positions, segments = (torch.full((len(rows), T), fill, dtype=torch.long)
                                              for fill in (pad_id, -100, 0, -1))
    for r, row in enumerate(rows):
        at = 0
        for s in row:
            seq, n = seqs[s], len(sequences[s][1])
            end = at + len(seq)
            input_ids[r, at:end] = torch.tensor(seq)
            # position t predicts token t+1: the response tokens seq[-n:] are predicted at len(seq)-n-1 .. len(seq)-2
            labels[r, end - n - 1:end - 1] = torch.tensor(seq[len(seq) - n:])
            positions[r, at:end] = torch.arange(len(seq))
            segments[r, at:end] = s
            at = end
    return input_ids, labels, positions, segments


# ----------------------------------------------------------------------------------------------------------------------
# Files that survive a kill: read whole, appended whole lines (the cache, metrics.jsonl), or replaced atomically


def read_jsonl(path: str, own: bool = False, log=print) -> list[dict]:
    """The one JSONL reader: a JSONL file (gzip too), or a JSON array file, read whole -> dicts, each with its line
    number (in an array: its position) as `_line`. ValueError names the line that is not valid JSON, or not an object;
    but in the run's own append-only files (`own`: the translation cache, metrics.jsonl) an invalid last line without
    its final newline is what a kill mid-append leaves: dropped and said."""
    if not os.path.exists(path):
        raise ValueError(f"{path}: no such file.")
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        data = f.read()
    text = data.decode("utf-8", errors="replace" if own else "strict")
    torn = text.count("\n") + 1 if own and data and not data.endswith(b"\n") else None  # a kill may have cut it
    # at "\n" only: str.splitlines() also splits at U+2028, U+2029, U+0085, which JSON strings may hold raw
    lines = [(number, line) for number, line in enumerate(text.split("\n"), 1) if line.strip() or number == torn]
    if lines and lines[0][1].lstrip().startswith("["):  # Alpaca's own release is one JSON array
        try:
            rows = json.loads("\n".join(line for _, line in lines))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {lines[e.lineno - 1][0]}: not valid JSON ({e.msg}).") from e
        numbered = list(enumerate(rows, 1))
    else:
        numbered = []
        for number, line in lines:
            try:
                numbered.append((number, json.loads(line)))
            except json.JSONDecodeError as e:
                if number == torn:
                    log(f"{path}: line {number} was cut short by a kill (no final newline, not valid JSON): dropped; "
                        "what it held is redone")
                    break
                raise ValueError(f"{path}: line {number}: not valid JSON ({e.msg}); each line must be one JSON "
                                 "object.") from e
    for number, row in numbered:
        if not isinstance(row, dict):
            raise ValueError(f"{path}: line {number}: expected a JSON object, got {type(row).__name__}.")
    return [dict(row, _line=number) for number, row in numbered]


def append_jsonl(path: str, rows: list[dict]):
    """Appends whole lines and fsyncs. A last line a crash left without its newline is cut off when it is partial, or
    given its newline when it is complete JSON (the kill fell just before the newline)."""
    with open(path, "ab+") as f:  # appends, whatever the position; truncate works at any
        f.seek(0)
        data = f.read()
        if data and not data.endswith(b"\n"):
            start = data.rfind(b"\n") + 1
            try:  # a whole row the kill left without its newline gets it; a partial one is cut off
                json.loads(data[start:].decode("utf-8", errors="replace"))
                f.write(b"\n")
            except json.JSONDecodeError:
                f.truncate(start)
        f.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: str, write):
    """write(tmp) (a str: that UTF-8 text), then tmp renamed to path: a kill leaves the old file or the new one, never
    half of one. A failed write (disk full) removes tmp and raises OSError naming `path` (safetensors: its own type)."""
    tmp = path + ".tmp"
    try:
        if isinstance(write, str):
            pathlib.Path(tmp).write_text(write, encoding="utf-8")
        else:
            write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        found = re.search(r"os error (\d+)", str(e))  # safetensors: "I/O error: No space left on device (os error 28)"
        code = e.errno if isinstance(e, OSError) else int(found.group(1)) if found else None
        if code is None:
            raise
        error = OSError(f"{path}: could not write it: {os.strerror(code)}")
        error.errno = code
        raise error from e


def save_json(path: str, obj):
    """JSON, written atomically; UTF-8 text as itself (a Korean answer stays readable), read back by model.read_json."""
    write_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False))


def write_jsonl(path: str, rows: list[dict]):
    """JSONL (pairs.jsonl, metrics.jsonl rewritten on resume), written atomically."""
    write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


# ----------------------------------------------------------------------------------------------------------------------
# Command-line helpers, shared by clo.py and eval.py


class HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """--help with "(default: X)" after each option's help but on/off flags', required options' and None defaults'."""

    def _get_help_string(self, action):
        if action.required or action.default is None or action.nargs == 0:
            return action.help
        return super()._get_help_string(action)


def exit_on_error(main_fn, *errors, kept=None):
    """Runs a script's main(): bad input (and `errors`) prints one line `error: ...`, no traceback, and exits 2; Ctrl-C
    one line, exit 130. `kept()`: what a stopped run leaves (clo: its last checkpoint), said on Ctrl-C and full disk."""
    def note():
        return f"; {said}" if kept and (said := kept()) else ""
    try:
        main_fn()
    except KeyboardInterrupt:
        print(f"interrupted (Ctrl-C){note()}", file=sys.stderr)
        sys.exit(130)
    except (ValueError, FileNotFoundError, OSError, *errors) as e:
        full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
        print(f"error: {'disk full: ' if full else ''}{e}{note() if full else ''}", file=sys.stderr)
        sys.exit(2)
