import math

import pytest

from raylm.eval.metrics import accuracy, bleu, exact_match, normalize_answer, perplexity, squad_scores, token_f1


def test_squad_normalisation_and_scores():
    assert normalize_answer("The  Baker!") == "baker"
    assert exact_match("the baker", ["Baker"]) == 1.0
    assert exact_match("a chef", ["baker"]) == 0.0
    assert token_f1("big red dog", ["red dog"]) == pytest.approx(0.8)
    em, f1 = squad_scores(["Paris", "Rome x"], [["Paris"], ["Rome"]])
    assert em == 0.5 and f1 == pytest.approx((1 + 2 / 3) / 2)


def test_accuracy_and_perplexity():
    assert accuracy(["a", "b", "a"], ["a", "a", "a"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        accuracy(["a"], [])
    assert perplexity(math.log(7.0)) == pytest.approx(7.0)


def test_bleu_is_sacrebleu_corpus_bleu():
    refs = ["Der Hund sieht die Katze.", "Heute kauft die Frau das Buch."]
    assert bleu(refs, refs) == pytest.approx(100.0)
    partial = bleu(["Der Hund sieht den Ball.", "Heute kauft die Frau das Auto."], refs)
    assert 20 < partial < 80
    assert bleu(["x y z", "q"], refs) < 5


def test_span_constrained_decoding_mask():
    from raylm.inference.decoding import span_mask

    source = [[5, 6, 7, 5, 8]]
    eos = 0
    first = span_mask(source, [[]], 10, eos)[0]
    assert sorted(int(i) for i in (first == 0).nonzero()) == [5, 6, 7, 8]
    after_five = span_mask(source, [[5]], 10, eos)[0]
    assert sorted(int(i) for i in (after_five == 0).nonzero()) == [0, 6, 8]
    after_five_six = span_mask(source, [[5, 6]], 10, eos)[0]
    assert sorted(int(i) for i in (after_five_six == 0).nonzero()) == [0, 7]
