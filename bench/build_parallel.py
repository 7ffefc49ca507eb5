"""Build the parallel data sets bench/experiments.py trains and evaluates on, from the offline copies in ../shared/data.

    python bench/build_parallel.py [--src ../shared/data] [--out samples]

Writes, in clo.py's --translations format (en_instruction, en_response, <lang>_instruction, <lang>_response, ...):

- sib200_parallel.jsonl (SIB-200 train + dev, 800 rows, shuffled with seed 0 so that the first N rows, which
  `clo.py --num-samples N` takes, are a random sample) and sib200_heldout.jsonl (SIB-200 test, 204 rows, never trained
  on). One row per FLORES-200 sentence: the instruction is a hand-written TEMPLATE per language, "Write one sentence
  about {topic}." (the topic is SIB-200's label of the sentence), the response is the FLORES-200 sentence of that index
  in that language. FLORES-200 sentences are professional human translations of the same English sentence, so the
  responses are honestly aligned; the instructions are ours (one template per language, topic names translated by
  hand), and say so in samples/SOURCES.md.
- mgsm_parallel_en_de_sw_zh.jsonl (250 rows): MGSM's human-translated grade-school questions as instructions, and the
  TEMPLATE answer "The answer is N." per language (N is MGSM's number). experiments.py uses only its questions, as
  held-out fidelity prompts (a different task from the training sentences).

- xcopa_prompts_id.jsonl (100 rows): the premises of XCOPA's first 100 Indonesian TEST items (human translations of
  COPA) with a hand-written Indonesian question by the item's type, "Apa penyebabnya?" (cause) or "Apa yang terjadi
  kemudian?" (effect), as id_instruction; en_instruction is XCOPA's own English translation of the premise (Google
  MT, data-gmt/) with "What was the cause?" / "What happened next?". No responses: experiments.py uses them as held-out
  fidelity prompts for Indonesian (open questions of another task than the training sentences; the validation split,
  not these, is the multiple-choice set).

Languages: en, de, ko, zh, sw, id (those of SIB-200 here for which we can write the template; Yoruba left out).
"""
import argparse
import csv
import json
import os
import random

SIB_CODES = {"en": "eng_Latn", "de": "deu_Latn", "ko": "kor_Hang", "zh": "zho_Hans", "sw": "swh_Latn",
             "id": "ind_Latn"}
# SIB-200's seven topic labels, translated by hand (the template's only variable part)
TOPICS = {
    "en": {"science/technology": "science and technology", "travel": "travel", "politics": "politics",
           "sports": "sports", "health": "health", "entertainment": "entertainment", "geography": "geography"},
    "de": {"science/technology": "Wissenschaft und Technik", "travel": "Reisen", "politics": "Politik",
           "sports": "Sport", "health": "Gesundheit", "entertainment": "Unterhaltung", "geography": "Geografie"},
    "ko": {"science/technology": "과학과 기술", "travel": "여행", "politics": "정치", "sports": "스포츠",
           "health": "건강", "entertainment": "연예", "geography": "지리"},
    "zh": {"science/technology": "科学技术", "travel": "旅行", "politics": "政治", "sports": "体育",
           "health": "健康", "entertainment": "娱乐", "geography": "地理"},
    "sw": {"science/technology": "sayansi na teknolojia", "travel": "usafiri", "politics": "siasa",
           "sports": "michezo", "health": "afya", "entertainment": "burudani", "geography": "jiografia"},
    "id": {"science/technology": "sains dan teknologi", "travel": "perjalanan", "politics": "politik",
           "sports": "olahraga", "health": "kesehatan", "entertainment": "hiburan", "geography": "geografi"},
}
TEMPLATES = {"en": "Write one sentence about {}.", "de": "Schreibe einen Satz über {}.",
             "ko": "{}에 대해 한 문장을 써 주세요.", "zh": "请写一句关于{}的话。",
             "sw": "Andika sentensi moja kuhusu {}.", "id": "Tulis satu kalimat tentang {}."}
MGSM_LANGS = ("en", "de", "sw", "zh")
ANSWER_TEMPLATES = {"en": "The answer is {}.", "de": "Die Antwort ist {}.", "sw": "Jibu ni {}.", "zh": "答案是{}。"}


def read_tsv(path):
    """SIB-200 split file: header index_id, category, text. Returns the rows as dicts, in file order."""
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def sib_rows(src, split):
    """One parallel row per sentence of a SIB-200 split, aligned by index_id (checked, not assumed)."""
    per_lang = {lang: read_tsv(os.path.join(src, "sib200", code, f"{split}.tsv")) for lang, code in SIB_CODES.items()}
    rows = []
    for i, en in enumerate(per_lang["en"]):
        row = {"source": f"sib200:{split}:{en['index_id']}", "topic": en["category"]}
        for lang, lines in per_lang.items():
            r = lines[i]
            if r["index_id"] != en["index_id"] or r["category"] != en["category"]:
                raise ValueError(f"sib200/{SIB_CODES[lang]}/{split}.tsv line {i + 2}: index_id {r['index_id']} "
                                 f"does not match English {en['index_id']}; the copies are not aligned.")
            row[f"{lang}_instruction"] = TEMPLATES[lang].format(TOPICS[lang][en["category"]])
            row[f"{lang}_response"] = r["text"].strip()
        rows.append(row)
    return rows


def mgsm_rows(src):
    per_lang = {}
    for lang in MGSM_LANGS:
        with open(os.path.join(src, "mgsm", f"mgsm_{lang}.tsv"), encoding="utf-8", newline="") as f:
            per_lang[lang] = [r for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    rows = []
    for i, (q_en, a_en) in enumerate(per_lang["en"]):
        row = {"source": f"mgsm:{i}"}
        for lang in MGSM_LANGS:
            q, a = per_lang[lang][i]
            if a != a_en:
                raise ValueError(f"mgsm/mgsm_{lang}.tsv line {i + 1}: answer {a} differs from English {a_en}.")
            row[f"{lang}_instruction"], row[f"{lang}_response"] = q.strip(), ANSWER_TEMPLATES[lang].format(a)
        rows.append(row)
    return rows


XCOPA_QUESTION = {"id": {"cause": "Apa penyebabnya?", "effect": "Apa yang terjadi kemudian?"},
                  "en": {"cause": "What was the cause?", "effect": "What happened next?"}}


def xcopa_prompt_rows(src, lang="id", n=100):
    """Open questions from XCOPA test premises, aligned with XCOPA's English translation by `idx` (checked)."""
    def read(name):
        with open(os.path.join(src, "xcopa", name), encoding="utf-8") as f:
            return [json.loads(line) for line in f][:n]
    rows = []
    for own, en in zip(read(f"test.{lang}.jsonl"), read(f"test.{lang}.en-translation.jsonl")):
        if (own["idx"], own["question"]) != (en["idx"], en["question"]):
            raise ValueError(f"xcopa test.{lang}: item {own['idx']} is not aligned with its English translation")
        rows.append({"en_instruction": f"{en['premise']} {XCOPA_QUESTION['en'][en['question']]}",
                     f"{lang}_instruction": f"{own['premise']} {XCOPA_QUESTION[lang][own['question']]}"})
    return rows


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main(argv=None):
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", default=os.path.join(here, "..", "shared", "data"))
    p.add_argument("--out", default=os.path.join(here, "samples"))
    a = p.parse_args(argv)
    train = sib_rows(a.src, "train") + sib_rows(a.src, "dev")
    random.Random(0).shuffle(train)
    write_jsonl(os.path.join(a.out, "sib200_parallel.jsonl"), train)
    write_jsonl(os.path.join(a.out, "sib200_heldout.jsonl"), sib_rows(a.src, "test"))
    write_jsonl(os.path.join(a.out, "mgsm_parallel_en_de_sw_zh.jsonl"), mgsm_rows(a.src))
    write_jsonl(os.path.join(a.out, "xcopa_prompts_id.jsonl"), xcopa_prompt_rows(a.src))
    print(f"wrote {len(train)} training rows, 204 held-out rows (SIB-200), 250 MGSM rows, 100 XCOPA prompts to {a.out}")


if __name__ == "__main__":
    main()
