"""The paper's experiments as one command: base -> SFT, SFT+DPO and CLO at several data sizes and seeds, each run
evaluated on held-out material, written as a table, JSON and the paper's figure (metric against number of items).

    python bench/experiments.py --model MODEL --lang sw --data samples/sib200_parallel.jsonl \
        --sizes 64,128,256 --seeds 0,1 --methods sft,sft+dpo,clo --out runs/exp-sw [-- clo.py options ...]

The paper's grid (README "Experiments"): --data oasst1 --sizes 1600,3200,6400 --translator facebook/m2m100_1.2B
--bench belebele,mmmlu --alpaca alpaca_eval --judge URL -- --tune attn.

Everything after `--` goes to every clo.py run unchanged (--lr, --epochs, --tune, --beta, --lam, --max-len, ...), so
all methods share seeds, data and budget. `--data oasst1` with a translator works as in clo.py (translated once per
run folder, cached); offline, pass a parallel file (bench/build_parallel.py builds them from ../shared/data).

Runs (OUT/runs/<method>-n<N>-s<seed>/) are clo.py subprocesses: a kill loses at most the run in progress; a run is
finished when its summary.json exists, and a rerun skips it (an interrupted one continues from its checkpoint with
clo.py --resume). SFT+DPO is `--method sft --merge` (the SFT run, shared with the SFT method) then `--method dpo` on
its merged/ folder. Each finished run is evaluated into OUT/eval/<run>.json (skipped if present); base is
OUT/eval/base.json. Then OUT/results.json (every run's metrics and the mean/std over seeds), OUT/table.md,
OUT/figure.png and OUT/answers.json (every fidelity answer with its language, echo and loop verdicts, to audit).

Metrics (the fidelity prompts are held out; the preference/NLL pairs have held-out answers to the trained prompt
templates):
- fidelity_<l>: share of answers to target-language prompts (--fidelity file, default MGSM questions) that are in the
  prompt's language AND not an echo (is_echo: half the answer copied from the prompt) AND not a loop (is_loop:
  repetition); in_lang_<l> is the share in the language without either rule, echo_<l> and loop_<l> the shares of
  echoes and loops. Same for English (fidelity_en).
- pref_acc_<l>: TRL's eval reward accuracy on held-out pairs (--heldout) with the BASE model as reference: the share
  of target-language prompts for which the model, relative to the base model, prefers the target-language answer to
  the English one (margin > 0); pref_acc_en: English prompt, English answer preferred. Undefined for base itself.
- nll_<l>, nll_en: mean per-token NLL of the held-out reference answers (eval.response_nll).
- mc_<l>, mc_en: multiple-choice accuracy (lm-eval-harness scoring, eval.multiple_choice_accuracy), --mc files.
- win_<l>: with --judge, the pairwise win rate of each run over base on the target-language prompts (eval.win_rate,
  ties as half).
- belebele_<l>, mmmlu_<l> (and _en), with --bench: the paper's benchmarks, scored as eval.py --bench scores them.
- win_vs_<m>_<l>, tie_vs_<m>_<l>, winhalf_vs_<m>_<l>, with --alpaca and --judge (CLO runs only): CLO head to head
  against method m (sft, sft+dpo) of the same size and seed on translated AlpacaEval prompts, both orders per prompt:
  the share of verdicts CLO wins and ties (ties apart, the paper's) and its win rate with ties as half (AlpacaEval's);
  the counts in results.json "head_to_head" and table.md.
The primary metric (stated before running, README "Experiments") is fidelity_<target>.
"""
from __future__ import annotations

import argparse
import difflib
import math
import os
import re
import shutil
import signal
import string
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)

import clo  # noqa: E402  (after the path insert: the repository's own modules)
import data as D  # noqa: E402
import model as M  # noqa: E402

SHARED = os.path.join(HERE, "..", "shared", "data")
METHODS = ("sft", "sft+dpo", "clo", "dpo")
GRID_FLAGS = ("--model", "--method", "--lang", "--data", "--translations", "--num-samples", "--seed", "--out",
              "--resume", "--merge", "--translator")  # clo.py options each run gets from the grid
LABELS = {"base": "base", "sft": "SFT", "sft+dpo": "SFT+DPO", "clo": "CLO", "dpo": "DPO"}  # as the paper names them


# ----------------------------------------------------------------------------------------------------------------------
# The echo rule


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def copied_share(prompt: str, answer: str, min_block: int = 12) -> float:
    """Share of the answer's characters (whitespace collapsed, case folded) that lie in stretches of at least
    `min_block` characters copied, in order, from the prompt (difflib's matching blocks). A near-copy with a changed
    letter here and there ("Mike spielt 40 Minen lang Pingpong. In den ersten 20 Minen ...") scores near 1; a quoted
    phrase or a shared word does not count."""
    p, a = _norm(prompt), _norm(answer)
    if not a:
        return 1.0
    blocks = difflib.SequenceMatcher(None, a, p, autojunk=False).get_matching_blocks()
    return sum(b.size for b in blocks if b.size >= min_block) / len(a)


def is_echo(prompt: str, answer: str, share: float = 0.5) -> bool:
    """Whether an answer merely repeats or continues its prompt (counted as a fidelity failure, whatever its language):
    it is empty, or starts with the whole prompt (said again, then perhaps continued), or at least `share` of it is
    copied from the prompt (copied_share). Known limits: a short correct answer that restates the question's phrase
    ("Der ursprüngliche Preis des Buches war 26 US-Dollar.") and an English step-by-step answer that restates the
    givens for half its length count as echoes; the rule is the same for every model compared."""
    p, a = _norm(prompt), _norm(answer)
    if not a or (p and a.startswith(p)):
        return True
    return copied_share(prompt, answer) >= share


_STRIP = string.punctuation + "«»„“”‚‘’…"


def _is_cjk(ch: str) -> bool:
    return "\u2e80" <= ch <= "\u9fff" or "\uac00" <= ch <= "\ud7af" or "\uf900" <= ch <= "\ufaff"


def is_loop(answer: str, repeats: int = 3, max_unit: int = 4, max_rep4: float = 0.5) -> bool:
    """Whether an answer degenerates into repetition (counted as a fidelity failure, whatever its language). Any of:
    1. a unit of 2 to `max_unit` words, one of them with a letter, occurs `repeats` or more times back to back ("wie
       vielen können, wie vielen können, wie vielen können"; punctuation and case ignored), or one word `repeats` + 1
       times ("kuza kuza kuza kuza");
    2. at least `max_rep4` of the answer's word 4-grams already occurred earlier in it (seq-rep-4 of Welleck et al.
       2019, "Neural text generation with unlikelihood training", sec. 6): a sentence said again and again;
    3. a unit of 2 to 8 letters repeated 4 or more times in a row ("kakakaka", "Schlösschlösschlösschlös"), or one
       non-space character 10 or more times ("10.100000000000000001"; a billion, 1000000000, is not a loop).
    Text that is mostly Chinese, Japanese or Korean characters is read character by character (letters only) for 1
    and 2, with units up to 4 * `max_unit` characters. Known limits: with answers cut at 64 tokens, a long sentence
    said twice and cut in its third saying is not caught (a sentence said twice is allowed on purpose)."""
    letters = [c for c in answer if c.isalpha()]
    if letters and sum(map(_is_cjk, letters)) >= len(letters) / 2:
        tokens, max_unit = [c.casefold() for c in letters], 4 * max_unit
    else:
        tokens = [t for t in (w.strip(_STRIP) for w in answer.casefold().split()) if t]
    for unit in range(1, max_unit + 1):
        times = repeats + (unit == 1)  # one word needs one more: "Die, die die Regeln kennen" is German
        for start in range(0, len(tokens) - unit * times + 1):
            first = tokens[start:start + unit]
            if any(c.isalpha() for t in first for c in t) and all(
                    tokens[start + k * unit:start + (k + 1) * unit] == first for k in range(1, times)):
                return True
    grams = [tuple(tokens[i:i + 4]) for i in range(len(tokens) - 3)]
    if grams and 1 - len(set(grams)) / len(grams) >= max_rep4:
        return True
    return re.search(r"([^\W\d_]{2,8})\1{3,}|(\S)\2{9,}", answer, re.IGNORECASE) is not None


def verdict(prompt: str, answer: str) -> dict:
    """The rules' verdict on one answer: {answer, detected (fastText's language), echo, loop}."""
    import eval as E
    return {"answer": answer, "detected": E.detect_language(answer), "echo": is_echo(prompt, answer),
            "loop": is_loop(answer)}


def passes(v: dict, lang: str) -> bool:
    """The primary metric's test of one answer: in the prompt's language, and neither an echo nor a loop."""
    return v["detected"] == lang and not v["echo"] and not v["loop"]


def shares(verdicts: list[dict], lang: str) -> dict:
    """{fidelity, in_lang, echo, loop}: the share of answers that pass (the primary metric); the share in `lang`; the
    share of echoes; the share of loops."""
    n = len(verdicts)
    return {"fidelity": sum(passes(v, lang) for v in verdicts) / n,
            "in_lang": sum(v["detected"] == lang for v in verdicts) / n,
            "echo": sum(v["echo"] for v in verdicts) / n, "loop": sum(v["loop"] for v in verdicts) / n}


def fidelity(prompts, answers, lang):
    """shares() of the answers to `prompts`."""
    return shares([verdict(p, a) for p, a in zip(prompts, answers)], lang)


# ----------------------------------------------------------------------------------------------------------------------
# Held-out material


def heldout_material(a):
    """The evaluation inputs, fixed for every model: fidelity prompts, held-out parallel rows, multiple-choice rows."""
    import eval as E
    langs = (a.lang, "en")
    fid_rows = D.read_jsonl(a.fidelity)
    for lang in langs:
        if f"{lang}_instruction" not in fid_rows[0]:
            raise ValueError(f"--fidelity {a.fidelity}: no {lang}_instruction column; pass a file with prompts in "
                             f"{lang} (e.g. samples/sib200_heldout.jsonl).")
    fid_rows = E.subset(fid_rows, a.num_prompts, seed=0)
    held = D.read_jsonl(a.heldout)
    for lang in langs:
        if f"{lang}_response" not in held[0]:
            raise ValueError(f"--heldout {a.heldout}: no {lang}_instruction/{lang}_response columns.")
    held = E.subset(held, a.num_heldout, seed=0)
    mc = []
    for path in a.mc:
        mc += E.subset(E.read_multiple_choice(path), a.num_mc, seed=0)
    bench = {}
    for name in a.bench:
        for lang in langs:
            path = E.bench_file(name, lang, a.bench_dir, a.lang)
            if path is None:
                print(f"{name}: has no {lang}; its column is left out", file=sys.stderr)
            else:
                bench[name, lang] = E.subset(E.read_multiple_choice(path, lang), a.num_items)
    return {"prompts": {lang: [r[f"{lang}_instruction"] for r in fid_rows] for lang in langs}, "heldout": held,
            "mc": mc, "bench": bench, "alpaca": alpaca_prompts(a) if a.alpaca else None}


def alpaca_prompts(a):
    """The head-to-head prompts in the target language (eval.read_prompts): a JSONL {lang, prompt} file's rows in
    --lang as they are (your own translations); or AlpacaEval's English instructions (alpaca_eval: the hub's
    tatsu-lab/alpaca_eval; or a local alpaca_eval.json), the first --num-alpaca translated by --translator, once,
    cached in OUT/alpaca_eval.translations.jsonl. The paper's own translated set is not public."""
    import types
    import eval as E
    dtype = M.DTYPES[M.resolve_dtype("auto", a.device)[0]]
    ns = types.SimpleNamespace(prompts=a.alpaca, num_prompts=a.num_alpaca, out=a.out, translator=a.translator,
                               dtype=dtype, device=a.device)
    prompts = [r["prompt"] for r in E.read_prompts(ns, ["en", a.lang]) if r.get("lang") == a.lang][:a.num_alpaca]
    if not prompts:
        raise ValueError(f"--alpaca {a.alpaca}: no prompts in {a.lang}; give rows {{lang: {a.lang}, prompt}} or "
                         "English AlpacaEval instructions to translate.")
    return prompts


def pair_logps(model, tok, rows, lang, batch_size=8):
    """Summed log-probs of both answers to each row's `lang` prompt: (own-language answer, other answer) lists.
    For the target language the other answer is English; for English it is the target language's."""
    import torch
    other = rows[0]["_other"]
    own, alt = [], []
    with torch.no_grad():
        for b in range(0, len(rows), batch_size):
            seqs = []
            for r in rows[b:b + batch_size]:
                o = "en" if lang != "en" else other
                prompt_ids, (y_own, y_alt), _ = D.conversation_tokens(
                    tok, r[f"{lang}_instruction"], [r[f"{lang}_response"], r[f"{o}_response"]])
                seqs += [(prompt_ids, y_own), (prompt_ids, y_alt)]
            batch = [t.to(model.lm_head.weight.device) for t in D.collate_sequences(seqs, tok.pad_id)]
            logp, _ = clo.sequence_logps(model, batch, len(seqs))
            own += logp[0::2].tolist()
            alt += logp[1::2].tolist()
    return own, alt


def score_answers(result, material):
    """(Re)judge an evaluation's saved answers, in place: result["verdicts"][lang] (one verdict() per answer, kept for
    the audit file and the paired test) and the fidelity metrics from them. The echo and loop rules are applied
    whenever a table is written, so a saved evaluation never carries numbers from an older rule."""
    result["verdicts"] = {}
    for lang, answers in result["answers"].items():
        prompts = material["prompts"][lang]
        if len(answers) != len(prompts):
            raise ValueError(f"evaluation of {result.get('run')}: {len(answers)} {lang} answers for "
                             f"{len(prompts)} prompts; it was made with other --num-prompts.")
        result["verdicts"][lang] = [verdict(p, ans) for p, ans in zip(prompts, answers)]
        result["metrics"].update({f"{k}_{lang}": v for k, v in shares(result["verdicts"][lang], lang).items()})
    return result


def evaluate(path, material, a, name, ref=None, base_answers=None):
    """Every metric for one model (a checkpoint or a clo run folder) but the fidelity ones, which score_answers
    computes from the answers, and the head-to-head ones (head_to_head). Returns (metrics, answers, logps); answers
    has the fidelity answers per language and, with --alpaca, the head-to-head answers under "alpaca"."""
    import torch
    import eval as E
    torch.manual_seed(0)
    model, tok = E.load_for_eval(path, device=a.device)
    metrics, answers, logps = {}, {}, {}
    for lang in (a.lang, "en"):
        prompts = material["prompts"][lang]
        answers[lang] = E.answer_prompts(model, tok, prompts, a.max_new_tokens, progress=False)
        metrics[f"nll_{lang}"] = E.response_nll(model, tok, material["heldout"], lang)
        rows = [dict(r, _other=a.lang) for r in material["heldout"]]
        logps[lang] = pair_logps(model, tok, rows, lang)
        if ref is not None:  # margin of the (own-language answer, other answer) pair relative to the base model
            margins = [(po - ro) - (pa - ra) for po, pa, ro, ra in zip(*logps[lang], *ref[lang])]
            metrics[f"pref_acc_{lang}"] = sum(m > 0 for m in margins) / len(margins)
            metrics[f"pref_margin_{lang}"] = sum(margins) / len(margins)
    if material["mc"]:
        for lang, r in E.multiple_choice_accuracy(model, tok, material["mc"], progress=False).items():
            metrics[f"mc_{lang}"] = r["acc"]
    for (bench, lang), rows in material["bench"].items():
        metrics[f"{bench}_{lang}"] = E.multiple_choice_accuracy(model, tok, rows, progress=False)[lang]["acc"]
    if material["alpaca"]:
        answers["alpaca"] = E.answer_prompts(model, tok, material["alpaca"], a.alpaca_max_new_tokens, progress=False)
    if a.judge and base_answers is not None:
        prompts = material["prompts"][a.lang]
        metrics[f"win_{a.lang}"] = E.win_rate(judge(a), prompts, [a.lang] * len(prompts), answers[a.lang],
                                              base_answers[a.lang], a.judge_language_rule)["win_rate"]
    return metrics, answers, logps


def judge(a):
    """eval.py's judge client for --judge: local:PATH (a chat model) or an OpenAI-compatible URL."""
    import eval as E
    return E.local_judge(a.judge[6:], device=a.device) if a.judge.startswith("local:") else E.http_judge(
        a.judge, a.judge_model)


# ----------------------------------------------------------------------------------------------------------------------
# Runs


def plan(a):
    """The training runs, in order: (name, method, size, seed, clo.py argv without --out). SFT+DPO's SFT stage is the
    SFT run of the same size and seed (merged), so it is trained once."""
    runs = []
    for size in a.sizes:
        for seed in a.seeds:
            common = ["--lang", a.lang, "--num-samples", str(size), "--seed", str(seed), "--no-progress"]
            common += ["--translations", a.data] if a.parallel else ["--data", a.data, "--translator", a.translator]
            sft = f"sft-n{size}-s{seed}"
            for method in a.methods:
                if method in ("sft", "sft+dpo") and sft not in [r[0] for r in runs]:
                    runs.append((sft, "sft", size, seed,
                                 ["--model", a.model, "--method", "sft"] + common
                                 + (["--merge"] if "sft+dpo" in a.methods else []) + train_args(a, "sft")))
                if method == "sft+dpo":
                    runs.append((f"sftdpo-n{size}-s{seed}", "sft+dpo", size, seed,
                                 ["--model", os.path.join(a.out, "runs", sft, "merged"), "--method", "dpo"]
                                 + common + train_args(a, "dpo")))
                elif method in ("clo", "dpo"):
                    runs.append((f"{method}-n{size}-s{seed}", method, size, seed,
                                 ["--model", a.model, "--method", method] + common + train_args(a, method)))
    return runs


def train_args(a, method: str) -> list[str]:
    """The clo.py options after `--` for one run, less those the method ignores (clo.ignored_flags: clo.py refuses
    them)."""
    dropped = clo.ignored_flags(method)
    out, skip = [], False
    for arg in a.train_args:
        if skip or arg.split("=")[0] in dropped:
            skip = arg in dropped
            continue
        out.append(arg)
    return out


def share_translations(out, a):
    """English --data (clo.py translates it): seed a new run's translation cache with the largest one another run of
    the grid has, so each item is translated once for the whole grid. clo.py's cache is keyed by item and language,
    so rows of items this run does not use are harmless."""
    cache = os.path.join(out, "translations.jsonl")
    if os.path.exists(cache):
        return
    done = [os.path.join(a.out, "runs", r, "translations.jsonl") for r in os.listdir(os.path.join(a.out, "runs"))]
    done = [p for p in done if os.path.exists(p) and p != cache]
    if done:
        shutil.copyfile(max(done, key=os.path.getsize), cache)


def die_with_parent():
    """In the clo.py child: be sent SIGTERM when this script dies, even by SIGKILL (Linux), so that a rerun never
    finds an orphan still writing the run folder it resumes."""
    if sys.platform.startswith("linux"):
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def run_command(out):
    """The clo.py command line a run folder was started with (the first line of its train.log), or None."""
    if not os.path.exists(os.path.join(out, "train.log")):
        return None
    with open(os.path.join(out, "train.log")) as f:
        return f.readline().rstrip("\n").removesuffix(" --resume")


def train_run(name, argv, a, log):
    """One clo.py run as a subprocess, output to RUN/train.log. Skipped when finished (summary.json); resumed from its
    checkpoint when one was left by a kill."""
    out = os.path.join(a.out, "runs", name)
    cmd = [sys.executable, os.path.join(HERE, "clo.py")] + argv + ["--out", out]
    first = run_command(out)
    if first is not None and not first.endswith(" ".join(argv + ["--out", out])):  # the python path may differ
        raise ValueError(f"{out}: trained with another command ({first!r}), now {' '.join(cmd)!r}; pass the same "
                         "options, use another --out, or delete that run folder to train it again.")
    if os.path.exists(os.path.join(out, "summary.json")):
        log(f"{name}: finished earlier, skipped")
        return False
    resume = os.path.exists(os.path.join(out, "args.json"))  # started before: clo.py finds whatever checkpoint is left
    os.makedirs(out, exist_ok=True)
    if not a.parallel:
        share_translations(out, a)
    cmd += ["--resume"] if resume else []
    model = argv[argv.index("--model") + 1]
    if model.startswith(a.out) and not os.path.isdir(model):  # SFT+DPO's start: the SFT run's merged model
        raise ValueError(f"{name}: {model} does not exist: its SFT run finished without --merge (it was trained "
                         f"before sft+dpo was in --methods); delete {os.path.dirname(model)} to train it again.")
    log(f"{name}: training{' (resumed)' if resume else ''}")
    t = time.time()
    with open(os.path.join(out, "train.log"), "a") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=HERE, preexec_fn=die_with_parent).returncode
    if rc != 0:
        with open(os.path.join(out, "train.log")) as f:
            tail = f.read()[-2000:]
        raise ValueError(f"{name}: clo.py exited with {rc}; its log ({out}/train.log) ends:\n{tail}")
    log(f"{name}: trained in {time.time() - t:.0f} s")
    return True


def material_settings(a):
    """What an evaluation depends on besides the model: a cached OUT/eval/<run>.json is reused only if these match."""
    s = {k: getattr(a, k) for k in ("lang", "fidelity", "num_prompts", "heldout", "num_heldout", "mc", "num_mc",
                                    "max_new_tokens", "judge")}
    # the later options only when used, so that evaluations made before they existed stay valid
    s.update({k: getattr(a, k) for k in ("bench", "bench_dir", "num_items") if a.bench})
    s.update({k: getattr(a, k) for k in ("alpaca", "num_alpaca", "alpaca_max_new_tokens", "translator") if a.alpaca})
    s.update({"judge_language_rule": True} if a.judge_language_rule else {})
    return s


def eval_source(name, a):
    """What an evaluation evaluated: the base model's path, or the command that trained the run."""
    return a.model if name == "base" else run_command(os.path.join(a.out, "runs", name))


def load_eval(dest, material, a, name):
    """A saved evaluation, its fidelity rescored from its answers; refused if it was made on other material, or of
    another model than the one there now (a run retrained with other options)."""
    done = M.read_json(dest)
    if done.get("settings") != material_settings(a):  # a table must not mix evaluations on different material
        raise ValueError(f"{dest}: evaluated with other settings ({done.get('settings')}), now "
                         f"{material_settings(a)}; pass the same options, use another --out, or delete OUT/eval to "
                         "evaluate every run again.")
    # evaluations written before "source" was recorded (2026-11-29) cannot be checked, and are taken as they are
    if "source" in done and done["source"] != eval_source(name, a):
        raise ValueError(f"{dest}: evaluates {done['source']!r}, but {name} is now {eval_source(name, a)!r}; delete "
                         "the evaluation to evaluate the run again.")
    return score_answers(done, material)


def eval_run(name, path, material, a, log, ref=None, base_answers=None):
    dest = os.path.join(a.out, "eval", f"{name}.json")
    if os.path.exists(dest):
        return load_eval(dest, material, a, name)
    t = time.time()
    metrics, answers, logps = evaluate(path, material, a, name, ref, base_answers)
    alpaca = answers.pop("alpaca", None)
    result = score_answers({"run": name, "settings": material_settings(a), "source": eval_source(name, a),
                            "metrics": metrics, "answers": answers, "alpaca_answers": alpaca, "logps": logps,
                            "seconds": time.time() - t}, material)
    D.save_json(dest, result)
    log(f"{name}: evaluated in {time.time() - t:.0f} s: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(metrics.items())
                                                                        if not k.startswith("pref_margin")))
    return result


def head_to_head(evals, runs, a, material, ask=None):
    """CLO against SFT and SFT+DPO of the same size and seed on the --alpaca prompts, in the target language:
    eval.win_rate (each prompt judged in both orders). Each comparison is saved in OUT/judge/<clo run>_vs_<run>.json
    with a digest of what it judged (judge, rule, prompts, both answer lists) and judged again only when that changed;
    with `ask` None (--report-only) only saved comparisons count. Adds win_vs_<m>_<l>, tie_vs_<m>_<l> and
    winhalf_vs_<m>_<l> to the CLO run's metrics (for the table and figure) and returns one row per comparison:
    {items, seed, clo_vs, wins, ties, losses, prompts, win_rate, win_rate_ties_apart, tie_rate}."""
    import hashlib
    import json
    import eval as E
    names = {(method, size, seed): name for name, method, size, seed, _ in runs}
    rows = []
    for name, method, size, seed, _ in runs:
        for other in ("sft", "sft+dpo") if method == "clo" else ():
            rival = names.get((other, size, seed))
            mine, theirs = (evals[n].get("alpaca_answers") if n in evals else None for n in (name, rival))
            if mine is None or theirs is None:  # not evaluated yet (--report-only), or evaluated without --alpaca
                continue
            what = [a.judge, a.judge_model, a.judge_language_rule, E.JUDGE_PROMPT, material["alpaca"], mine, theirs]
            digest = hashlib.sha256(json.dumps(what, ensure_ascii=False).encode("utf-8")).hexdigest()
            path = os.path.join(a.out, "judge", f"{name}_vs_{rival}.json")
            w = M.read_json(path) if os.path.exists(path) else None
            if w is None or w.get("digest") != digest:
                if ask is None:
                    continue
                w = dict(E.win_rate(ask, material["alpaca"], [a.lang] * len(mine), mine, theirs, a.judge_language_rule),
                         digest=digest, clo=name, rival=rival)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                D.save_json(path, w)
            evals[name]["metrics"].update({f"win_vs_{other}_{a.lang}": w["win_rate_ties_apart"],
                                           f"tie_vs_{other}_{a.lang}": w["tie_rate"],
                                           f"winhalf_vs_{other}_{a.lang}": w["win_rate"]})
            rows.append({"items": size, "seed": seed, "clo_vs": other, "prompts": len(mine),
                         **{k: w[k] for k in ("wins", "ties", "losses", "win_rate", "win_rate_ties_apart",
                                              "tie_rate")}})
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# Report


def aggregate(evals, runs, a):
    """{method: {size: {metric: {mean, std, n, values}}}}; base is method 'base', size 0. std: sample standard
    deviation over seeds (0 with one seed)."""
    import statistics
    groups = {("base", 0): [evals["base"]["metrics"]]}
    for name, method, size, seed, _ in runs:
        if name in evals:
            groups.setdefault((method, size), []).append(evals[name]["metrics"])
    table = {}
    for (method, size), ms in groups.items():
        cell = {}
        for k in sorted({k for m in ms for k in m}):
            vals = [m[k] for m in ms if k in m]
            cell[k] = {"mean": sum(vals) / len(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                       "n": len(vals), "values": vals}
        table.setdefault(method, {})[str(size)] = cell
    return table


def metric_columns(table, a):
    keys = sorted({k for m in table.values() for c in m.values() for k in c if not k.startswith("pref_margin")})
    first = [f"fidelity_{a.lang}"]
    return first + [k for k in keys if k not in first]


def markdown(table, a):
    """Mean ± sample std over the seeds finished; a cell with one value shows the value alone (no spread to show)."""
    cols = metric_columns(table, a)
    lines = ["| method | items | seeds | " + " | ".join(cols) + " |", "|---|---|---|" + "---|" * len(cols)]
    for method in ["base"] + [m for m in METHODS if m in table]:
        for size, cell in sorted(table[method].items(), key=lambda kv: int(kv[0])):
            vals = ["" if c not in cell else f"{cell[c]['mean']:.3f}" if cell[c]["n"] < 2 else
                    f"{cell[c]['mean']:.3f} ± {cell[c]['std']:.3f}" for c in cols]
            n = max(v["n"] for v in cell.values())
            lines.append(f"| {method} | {size if method != 'base' else 0} | {n} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def figure(table, a, path):
    """One panel per metric: mean over seeds against the number of items, one line per method (error bars: std),
    base as a dashed line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = metric_columns(table, a)
    ncol = 4
    nrow = (len(cols) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(4 * ncol, 3.2 * nrow), squeeze=False)
    markers = "osD^v"
    for ax, col in zip(axes.flat, cols):
        for i, method in enumerate(m for m in METHODS if m in table):
            pts = sorted((int(s), c[col]) for s, c in table[method].items() if col in c)
            if pts:  # each method a little to the side, so that equal values do not hide one another
                ax.errorbar([p[0] * 1.04 ** (i - 1) for p in pts], [p[1]["mean"] for p in pts],
                            yerr=[p[1]["std"] for p in pts], marker=markers[i], capsize=3, label=method)
        if not col.startswith("nll"):  # shares: on their whole scale, so one prompt of 32 does not fill the panel
            ax.set_ylim(-0.03, 1.03)
        if col in table["base"]["0"]:
            ax.axhline(table["base"]["0"][col]["mean"], color="gray", linestyle="--", label="base")
        ax.set_title(col)
        ax.set_xlabel("items")
        ax.set_xscale("log", base=2)
    for ax in list(axes.flat)[len(cols):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"{os.path.basename(a.model.rstrip('/'))}, {a.lang}: held-out metrics, mean ± std over the seeds "
                 "finished (n per point: results.json)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------------
# CLI


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="chat model (folder or hub id)")
    p.add_argument("--lang", required=True, help="one target language (ISO 639-1)")
    p.add_argument("--data", default=os.path.join(HERE, "samples", "sib200_parallel.jsonl"),
                   help="parallel JSONL (clo.py --translations format), or English data for clo.py --data "
                        "(oasst1, Alpaca) translated by the MT model")
    p.add_argument("--sizes", default="64,128,256", help="numbers of items (the first N of --data)")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--methods", default="sft,sft+dpo,clo", help=f"comma-separated, of {','.join(METHODS)}")
    p.add_argument("--heldout", default=os.path.join(HERE, "samples", "sib200_heldout.jsonl"),
                   help="held-out parallel JSONL: preference accuracy and NLL")
    p.add_argument("--num-heldout", type=int, default=64)
    p.add_argument("--fidelity", default=None, help="parallel JSONL whose <lang>_instruction/en_instruction are the "
                   "fidelity prompts (default: MGSM questions for de/sw/zh, XCOPA premise questions for id; other languages must pass it)")
    p.add_argument("--num-prompts", type=int, default=32, help="fidelity prompts per language")
    p.add_argument("--mc", nargs="*", default=None, help="multiple-choice files (default: XCOPA val in the target "
                   "language and its English translation, where ../shared/data has them)")
    p.add_argument("--num-mc", type=int, default=100)
    p.add_argument("--judge", default=None, help="OpenAI-compatible URL or local:PATH: win rate over base, and with "
                   "--alpaca CLO's head to head")
    p.add_argument("--judge-model", default="gpt-4o-mini")
    p.add_argument("--judge-language-rule", action="store_true", help="tell the judge that an answer in another "
                   "language than the user's is a poor one (eval.JUDGE_RULE; default: nothing on languages)")
    p.add_argument("--bench", default="", help="comma-separated, of belebele,mmmlu,xcopa: the paper's benchmarks in "
                   "the target language and English (eval.bench_file: the hub's, or --bench-dir)")
    p.add_argument("--bench-dir", default=None, help="local benchmark files, named as on the hub (eval.py --bench-dir)")
    p.add_argument("--num-items", type=int, default=None, help="a fixed, seeded subset of each benchmark (default all)")
    p.add_argument("--alpaca", default=None, help="head-to-head prompts: alpaca_eval (the hub's English AlpacaEval, "
                   "translated by --translator) or a local alpaca_eval.json, or a JSONL {lang, prompt} of your own "
                   "translations; needs --judge")
    p.add_argument("--num-alpaca", type=int, default=805, help="head-to-head prompts (AlpacaEval has 805)")
    p.add_argument("--alpaca-max-new-tokens", type=int, default=512, help="answer length cap for the head to head")
    p.add_argument("--translator", default="facebook/nllb-200-distilled-600M", help="M2M100/NLLB for English --data "
                   "(passed to every clo.py run) and --alpaca instructions (the paper's: facebook/m2m100_1.2B)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True)
    p.add_argument("--report-only", action="store_true", help="train and evaluate nothing: write the table, JSON and "
                   "figure from the evaluations already in OUT/eval (a partial grid, while another process runs)")
    a = p.parse_args(argv)
    a.train_args = train_args
    for arg in train_args:  # the grid sets these per run; argparse would let a later copy silently win
        name = arg.split("=")[0]
        if arg.startswith("--") and len(name) > 2 and any(f.startswith(name) for f in GRID_FLAGS):
            raise ValueError(f"after --: {arg} is set by the grid itself for every run ({', '.join(GRID_FLAGS)}); "
                             "use this script's --model/--lang/--data/--translator/--sizes/--seeds/--methods/--out "
                             "instead.")
    a.sizes, a.seeds = int_list("--sizes", a.sizes, 1), int_list("--seeds", a.seeds, 0)
    a.methods = [m.strip() for m in a.methods.split(",")]
    a.bench = [b.strip() for b in a.bench.split(",") if b.strip()]
    for b in a.bench:
        if b not in ("belebele", "mmmlu", "xcopa"):
            raise ValueError(f"--bench: {b!r} is not one of belebele, mmmlu, xcopa.")
    for flag, value in (("--num-items", a.num_items), ("--num-alpaca", a.num_alpaca),
                        ("--alpaca-max-new-tokens", a.alpaca_max_new_tokens)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value}: must be at least 1.")
    if a.alpaca and not a.judge:
        raise ValueError("--alpaca: the answers are judged head to head; give --judge URL or --judge local:PATH.")
    if a.alpaca and ("clo" not in a.methods or not {"sft", "sft+dpo"} & set(a.methods)):
        raise ValueError(f"--alpaca: judges CLO against SFT and SFT+DPO; --methods {','.join(a.methods)} lacks them.")
    if a.alpaca and a.alpaca != "alpaca_eval" and not os.path.isfile(a.alpaca):
        raise ValueError(f"--alpaca {a.alpaca}: no such file.")
    for m in a.methods:
        if m not in METHODS:
            raise ValueError(f"--methods: {m!r} is not one of {', '.join(METHODS)}.")
    if len(set(a.methods)) != len(a.methods):
        raise ValueError(f"--methods {','.join(a.methods)}: a method is repeated.")
    if a.fidelity is None:
        mgsm = os.path.join(HERE, "samples", "mgsm_parallel_en_de_sw_zh.jsonl")
        xcopa = os.path.join(HERE, "samples", f"xcopa_prompts_{a.lang}.jsonl")
        a.fidelity = mgsm if a.lang in ("de", "sw", "zh") else xcopa if os.path.exists(xcopa) else None
        if a.fidelity is None:  # the SIB prompts are the 7 templates the runs train on: not held out
            raise ValueError(f"--lang {a.lang}: no held-out fidelity prompts ship for it (MGSM has de/sw/zh, the XCOPA "
                             "file id); pass --fidelity FILE.jsonl with en_instruction and "
                             f"{a.lang}_instruction columns of prompts that are not in the training data.")
    if a.mc is None:
        a.mc = [p for p in (os.path.join(SHARED, "xcopa", f"val.{a.lang}.jsonl"),
                            os.path.join(SHARED, "xcopa", f"val.{a.lang}.en-translation.jsonl")) if os.path.exists(p)]
    a.out = os.path.abspath(a.out)
    if a.data.endswith(".jsonl") and not os.path.exists(a.data):
        raise ValueError(f"--data {a.data}: no such file.")
    rows = D.read_jsonl(a.data) if a.data.endswith(".jsonl") else []
    if a.data.endswith(".jsonl") and not rows:
        raise ValueError(f"--data {a.data}: the file has no rows.")
    a.parallel = bool(rows) and "en_instruction" in rows[0]
    if a.parallel:
        a.data = os.path.abspath(a.data)
        if f"{a.lang}_response" not in rows[0]:
            raise ValueError(f"--data {a.data}: no {a.lang}_instruction/{a.lang}_response columns; the file has "
                             f"{sorted(k for k in rows[0] if k.endswith('_response'))}.")
    if a.data != "oasst1":  # oasst1: counted by main() once fetched
        refuse_sizes(a, D.read_parallel(a.data, [a.lang]) if a.parallel else D.load_sft(a.data))
    return a


def refuse_sizes(a, items):
    """A size the data cannot fill is refused before any run (clo.py would refuse it only when its turn came)."""
    if max(a.sizes) > len(items):
        raise ValueError(f"--sizes {max(a.sizes)}: {a.data} has only {len(items)} items.")


def int_list(flag, text, least):
    """A comma-separated list of distinct integers >= `least` (a repeated seed would fake the spread)."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag} {text}: give comma-separated integers, e.g. 16,32,64.") from None
    if min(values) < least or len(set(values)) != len(values):
        raise ValueError(f"{flag} {text}: give distinct integers of at least {least}.")
    return values


def stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt  # subprocess.run then kills the clo.py child too; Ctrl-C already does this


def main(argv=None):
    from tqdm import tqdm
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    a = parse_args(argv)
    if a.data == "oasst1" and not a.report_only:
        refuse_sizes(a, D.load_sft("oasst1"))
    import importlib.util
    if importlib.util.find_spec("matplotlib") is None:  # the figure comes last: say so now, not after hours of training
        raise ValueError("the figure needs matplotlib: pip install matplotlib (requirements-test.txt has it).")
    if a.report_only and not os.path.isdir(os.path.join(a.out, "eval")):
        raise ValueError(f"{a.out}/eval: no evaluations there yet; nothing to report (check --out).")
    os.makedirs(os.path.join(a.out, "runs"), exist_ok=True)
    os.makedirs(os.path.join(a.out, "eval"), exist_ok=True)
    if not a.report_only:
        D.save_json(os.path.join(a.out, "config.json"), {k: v for k, v in vars(a).items()})
    runs = plan(a)
    material = heldout_material(a)
    if a.report_only:
        evals = {}
        for name in ["base"] + [r[0] for r in runs]:
            path = os.path.join(a.out, "eval", f"{name}.json")
            if os.path.exists(path):
                evals[name] = load_eval(path, material, a, name)
        if "base" not in evals:
            raise ValueError(f"{a.out}/eval/base.json: not there yet; nothing to report.")
        return report(evals, runs, a, material)
    bar = tqdm(total=len(runs) * 2 + 1, desc="experiments", unit="step")
    log = bar.write
    base = eval_run("base", a.model, material, a, log)
    ref = {lang: tuple(v) for lang, v in base["logps"].items()}
    bar.update(1)
    evals = {"base": base}
    for name, method, size, seed, argv_run in runs:
        bar.set_postfix_str(name)
        train_run(name, argv_run, a, log)
        bar.update(1)
        evals[name] = eval_run(name, os.path.join(a.out, "runs", name), material, a, log, ref, base["answers"])
        bar.update(1)
    bar.close()
    return report(evals, runs, a, material, judge(a) if a.alpaca else None)


def audit_file(evals, material):
    """Every fidelity answer with the rules' verdict on it, so that a reader can audit the primary metric:
    {prompts: {lang: [prompt]}, runs: {run: {lang: [{answer, detected, echo, loop}]}}}, answers in prompt order."""
    return {"prompts": material["prompts"], "runs": {name: e["verdicts"] for name, e in evals.items()}}


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided sign test (McNemar's exact test on the discordant prompts): the probability, if neither model
    were better, of a split at least this uneven. 1.0 when there is nothing to compare."""
    n, k = wins + losses, min(wins, losses)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0


def paired(audit, runs, a):
    """CLO against each other method at each size on the primary metric, prompt by prompt: a prompt's score is the
    share of seeds whose answer passes fidelity; `wins` counts prompts where CLO scores higher, `losses` lower. The
    prompts, not the seeds, are the units (the seeds answer the same prompts), so this is the test of whether a
    difference in the table is more than the luck of which 32 prompts were drawn."""
    lang = a.lang
    ok = {n: [passes(v, lang) for v in r[lang]] for n, r in audit["runs"].items()}
    by = {}
    for name, method, size, seed, _ in runs:
        if name in ok:
            by.setdefault((method, size), []).append(ok[name])
    def score(key):
        return [sum(col) / len(col) for col in zip(*by[key])]
    by[("base", 0)] = [ok["base"]]
    out = []
    for size in a.sizes:
        # at equal items (claim 3), against base, and against the others at twice the items (claim 4: data efficiency)
        others = [(m, size) for m in a.methods if m != "clo"] + [("base", 0)]
        others += [(m, 2 * size) for m in ("sft", "sft+dpo") if m in a.methods and 2 * size in a.sizes]
        for key in others:
            if ("clo", size) not in by or key not in by:
                continue
            mine, theirs = score(("clo", size)), score(key)
            wins, losses = sum(x > y for x, y in zip(mine, theirs)), sum(x < y for x, y in zip(mine, theirs))
            out.append({"items": size, "clo_vs": key[0] if key[1] in (0, size) else f"{key[0]} at {key[1]} items",
                        "wins": wins, "losses": losses, "prompts": len(mine), "p": sign_test(wins, losses)})
    return out


def run_args(a, name):
    """clo.py's own record of a run's settings (RUN/args.json): what the run was trained with, whatever options the
    report was written with."""
    path = os.path.join(a.out, "runs", name, "args.json")
    if not os.path.exists(path):
        return None
    return M.read_json(path)


def pooled(h2h):
    """The head-to-head rows summed over seeds: {(items, clo_vs): {seeds, prompts, wins, ties, losses, rates}}."""
    out = {}
    for r in h2h:
        c = out.setdefault((r["items"], r["clo_vs"]), {"seeds": 0, "prompts": 0, "wins": 0, "ties": 0, "losses": 0})
        c.update({k: c[k] + (1 if k == "seeds" else r[k]) for k in c})
    for c in out.values():
        n = c["wins"] + c["ties"] + c["losses"]
        c.update(win_rate_ties_apart=c["wins"] / n, tie_rate=c["ties"] / n, loss_rate=c["losses"] / n,
                 win_rate=(c["wins"] + c["ties"] / 2) / n)
    return out


def paper_tables(table, h2h, a):
    """The paper's layout, in %: its BELEBELE and MMMLU tables (a row per model and method, a column per benchmark and
    language, English last), here a row per method and size; and its AlpacaEval comparison, CLO against each baseline
    head to head, wins, ties and losses apart and the win rate with ties as half."""
    def rows(header, lines):
        return "| " + " | ".join(header) + " |\n" + "|---" * len(header) + "|\n" + "".join(
            "| " + " | ".join(map(str, line)) + " |\n" for line in lines)
    model = os.path.basename(a.model.rstrip("/"))
    cols = [f"{b}_{l}" for b in a.bench for l in (a.lang, "en") if any(f"{b}_{l}" in c for m in table.values()
                                                                        for c in m.values())]
    md = ""
    if cols:
        lines = [[model, LABELS[method], size if method != "base" else "-"] + [
                     f"{100 * cell[c]['mean']:.1f}" if c in cell else "" for c in cols]
                 for method in ["base"] + [m for m in METHODS if m in table]
                 for size, cell in sorted(table[method].items(), key=lambda kv: int(kv[0]))]
        md += "\nThe paper's benchmark tables: accuracy (%), mean over the seeds finished\n\n" + rows(
            ["model", "method", "items"] + [c.replace("belebele_", "BELEBELE ").replace("mmmlu_", "MMMLU ")
                                            .replace("xcopa_", "XCOPA ") for c in cols], lines)
    if h2h:
        lines = [[model, size, LABELS[other], c["seeds"], c["wins"] + c["ties"] + c["losses"], c["wins"], c["ties"],
                  c["losses"]] + [f"{100 * c[k]:.1f}" for k in ("win_rate_ties_apart", "tie_rate", "loss_rate",
                                                                  "win_rate")]
                 for (size, other), c in sorted(pooled(h2h).items())]
        md += (f"\nThe paper's AlpacaEval comparison: CLO head to head on translated AlpacaEval prompts ({a.lang}), "
               "each prompt judged in both orders, verdicts summed over the seeds; CLO's wins, ties and losses in % "
               "of the verdicts (ties apart, as the paper reports them), then its win rate with ties as half "
               "(AlpacaEval's)\n\n" + rows(["model", "items", "CLO vs", "seeds", "verdicts", "wins", "ties", "losses",
                                            "CLO win %", "tie %", "CLO loss %", "win rate, ties as half %"], lines))
    return md


def report(evals, runs, a, material, ask=None):
    h2h = head_to_head(evals, runs, a, material, ask) if a.alpaca else []
    table = aggregate(evals, runs, a)
    audit = audit_file(evals, material)
    D.save_json(os.path.join(a.out, "answers.json"), audit)
    comparisons = paired(audit, runs, a)
    D.save_json(os.path.join(a.out, "results.json"),
               {"primary_metric": f"fidelity_{a.lang}", "config": {k: v for k, v in vars(a).items()},
                "table": table, "paired": comparisons, "runs": {n: e["metrics"] for n, e in evals.items()},
                "run_args": {n: run_args(a, n) for n in evals if n != "base"},
                **({"head_to_head": h2h, "head_to_head_pooled": [{"items": k[0], "clo_vs": k[1], **c} for k, c in
                                                                 sorted(pooled(h2h).items())]} if a.alpaca else {})})
    md = markdown(table, a)
    if comparisons:
        md += (f"\nCLO against each method on fidelity_{a.lang}, prompt by prompt (a prompt's score: the share of seeds "
               "whose answer passes; exact two-sided sign test over the prompts where the two differ):\n\n"
               "| items | CLO vs | CLO higher | CLO lower | equal | p |\n|---|---|---|---|---|---|\n")
        md += "".join(f"| {c['items']} | {c['clo_vs']} | {c['wins']} | {c['losses']} | "
                      f"{c['prompts'] - c['wins'] - c['losses']} | {c['p']:.2f} |\n" for c in comparisons)
    md += paper_tables(table, h2h, a)
    with open(os.path.join(a.out, "table.md"), "w") as f:
        f.write(md)
    figure(table, a, os.path.join(a.out, "figure.png"))
    print(md)
    print(f"wrote {a.out}/results.json, table.md, figure.png, answers.json")
    return table


if __name__ == "__main__":
    D.exit_on_error(main)
