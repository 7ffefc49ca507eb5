"""data.translate_items shows one bar per language over the items it translates (items/s, and sentences/s as the
postfix), and nothing with progress=False."""
import data as D


class CopyTranslator:
    """Returns each text as its own translation: what the bar reports does not depend on the MT model."""

    sentences = 0  # as data.Translator: the sentences translated so far, the rate's unit

    def translate_flagged(self, texts, src, tgt, progress=True, **kwargs):
        self.sentences += sum(len(D.split_for_translation(t)[1]) for t in texts)
        return list(texts), [[] for _ in texts]


ITEMS = [{"instruction": f"Question {i}. Answer briefly!", "response": f"Answer {i}. It is short. Really."}
         for i in range(5)]  # 2 + 3 = 5 sentences an item


def test_bar_counts_items_and_sentences(tmp_path, capsys):
    rows = D.translate_items(ITEMS, ["ko"], str(tmp_path / "cache.jsonl"), CopyTranslator(), chunk=2,
                             log=lambda *_: None, progress=True)
    assert [r["ko_response"] for r in rows] == [it["response"] for it in ITEMS]
    err = capsys.readouterr().err
    assert "translate en->ko" in err and "5/5" in err and "item/s" in err and "sentences/s" in err
    assert sum(len(D.split_for_translation(t)[1]) for it in ITEMS for t in it.values()) == 25  # what the rate counts


def test_no_bar_without_progress_or_without_work(tmp_path, capsys):
    cache = str(tmp_path / "cache.jsonl")
    D.translate_items(ITEMS, ["ko"], cache, CopyTranslator(), log=lambda *_: None, progress=False)
    assert capsys.readouterr().err == ""
    D.translate_items(ITEMS, ["ko"], cache, CopyTranslator(), log=lambda *_: None)  # all cached: nothing to show
    assert capsys.readouterr().err == ""
