"""vlora.scoring against values computed by hand (or by an independent few-line implementation) in the test."""

import math
import shutil
import subprocess
import sys
from collections import Counter

import pytest

from vlora.errors import VloraError
from vlora.scoring import (ANSWER_METRICS, BOX_METRIC, CAPTION_METRICS, VQA_MAX_WORDS, bleu4, box_iou,
                           box_match, caption_tokenizer, cider_d, exact_match, majority_baseline, majority_items,
                           metric_kind, normalize_answer, score_items, simple_tokenize, task_of, tokenize_captions)


# --- normalisation and exact match -------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("Red", "red"),
    ("  RED  ", "red"),
    ("The red one", "red 1"),
    ("an apple", "apple"),
    ("a dog's ball", "dog's ball"),
    ("1,000", "1000"),
    ("1,000,000 people", "1000000 people"),
    ("red, blue", "red blue"),
    ("2.5", "2.5"),
    ("2.5.", "2.5"),
    ("Yes.", "yes"),
    ("U.S.", "us"),
    ("two", "2"),
    ("Zero or ten", "0 or 10"),
    ("eleven", "eleven"),
    ("none", "none"),
    ("t-shirt", "t shirt"),
    ("what?!", "what"),
    ("(left)", "left"),
    ("dont", "don't"),
    ("isnt it", "isn't it"),
    ("It is 3:00", "it is 3:00"),
    ("Two red circles\n on the  left.", "2 red circles on left"),
    ("", ""),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_single_and_list_references():
    assert exact_match("The Red.", "red") == 1.0
    assert exact_match("two", "2") == 1.0
    assert exact_match("red", "blue") == 0.0
    assert exact_match("lime", ["green", "Lime!"]) == 1.0
    assert exact_match("blue", ["green", "lime"]) == 0.0
    assert exact_match("red circle", "red circles") == 0.0  # no stemming
    with pytest.raises(VloraError, match="reference"):
        exact_match("red", [])


# --- tokenizers --------------------------------------------------------------------------------------

def test_simple_tokenize():
    assert simple_tokenize(["Two red circles on the left.", "A dog's t-shirt (red), don't stop!", "",
                            "The 2.5 cats, 1,000 men; it's \"fine\" -- yes...", "line\nbreak"]) == [
        "two red circles on the left", "a dog 's t-shirt red do n't stop", "",
        "the 2.5 cats 1,000 men it 's fine yes", "line break"]


def _fake_java(tmp_path, monkeypatch, script: str | None):
    """PATH holding only a fake `java` running `script` (or no java at all when script is None)."""
    if script is not None:
        java = tmp_path / "java"
        java.write_text("#!/bin/sh\n" + script + "\n")
        java.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))


def test_caption_tokenizer_choice(tmp_path, monkeypatch):
    assert caption_tokenizer("simple") == ("simple", simple_tokenize)
    with pytest.raises(VloraError, match="unknown caption tokenizer 'nltk'"):
        caption_tokenizer("nltk")
    _fake_java(tmp_path, monkeypatch, None)
    assert caption_tokenizer()[0] == "simple"
    with pytest.raises(VloraError, match="java"):
        caption_tokenizer("ptb")
    _fake_java(tmp_path, monkeypatch, "exit 0")
    assert caption_tokenizer()[0] == "ptb"


@pytest.mark.parametrize("script, reason", [
    ("echo 'Error: could not load main class' >&2; exit 1", "exited with status 1: Error: could not load"),
    ("echo 'only one line'", "returned 1 lines for 2 texts"),
    ("kill -9 $$", "exited with status -9"),
])
def test_a_failing_ptb_tokenizer_falls_back_to_simple_with_a_warning(tmp_path, monkeypatch, script, reason):
    _fake_java(tmp_path, monkeypatch, script)
    with pytest.warns(UserWarning, match=reason):
        assert tokenize_captions(["Two red circles.", "One blue square."], "ptb") == (
            "simple", ["two red circles", "one blue square"])


@pytest.mark.skipif(not shutil.which("java"), reason="no java on PATH: the PTB tokenizer cannot run")
def test_ptb_tokenizer_with_java():
    name, tokens = tokenize_captions(["A dog's t-shirt (red), don't stop.", "",
                                      "The 2.5 cats, 1,000 men; it's \"fine\" -- yes!", "Café naïve – ok",
                                      "Two red circles\non the left."], "ptb")
    assert name == "ptb"
    # coco-caption's quirk kept: PUNCTUATIONS lists "-LRB-", but -lowerCase makes it "-lrb-", so it stays.
    assert tokens == ["a dog 's t-shirt -lrb- red -rrb- do n't stop", "",
                      "the 2.5 cats 1,000 men it 's fine yes", "café naïve ok", "two red circles on the left"]


# --- BLEU-4 ------------------------------------------------------------------------------------------

def test_bleu4_by_hand():
    preds = ["The cat sat on the mat.", "A red circle on the left"]
    refs = ["the cat sat on a mat", "Two red circles on the left side."]
    # Clipped matches / hypothesis n-grams, per sentence (tokens lowercased, punctuation dropped):
    #   1-grams: 5/6 (the x2 clipped to 1) + 4/6 (red on the left) = 9/12
    #   2-grams: 3/5 (the cat, cat sat, sat on) + 2/5 (on the, the left) = 5/10
    #   3-grams: 2/4 + 1/4 (on the left) = 3/8;  4-grams: 1/3 (the cat sat on) + 0/3 = 1/6
    # hypothesis length 12, reference length 6 + 7 = 13: brevity penalty exp(1 - 13/12).
    expected = 100 * math.exp(1 - 13 / 12) * (9 / 12 * 5 / 10 * 3 / 8 * 1 / 6) ** 0.25
    assert bleu4(preds, refs, tokenizer="simple") == pytest.approx(expected, abs=1e-6)
    assert bleu4(preds, refs, tokenizer="simple") == pytest.approx(35.9987, abs=1e-4)


def test_bleu4_multiple_references():
    preds = ["red circle on the left", "blue square"]
    refs = [["the red circle on the left", "a circle"], ["blue square"]]
    # Every hypothesis n-gram is in a reference: precisions 7/7, 5/5, 3/3, 2/2. Reference length: the closest
    # one per sentence, 6 (not 2) for the first, 2 for the second: 8 against 7 hypothesis words.
    assert bleu4(preds, refs, tokenizer="simple") == pytest.approx(100 * math.exp(1 - 8 / 7), abs=1e-6)
    assert bleu4(preds[:1], [refs[0][::-1]], tokenizer="simple") == pytest.approx(100 * math.exp(1 - 6 / 5))
    assert bleu4(["a b c d"], ["a b c d"], tokenizer="simple") == pytest.approx(100.0)


def test_bleu4_rejects_bad_input():
    with pytest.raises(VloraError, match="bleu4: 2 predictions but 1 references"):
        bleu4(["a", "b"], ["a"], tokenizer="simple")
    with pytest.raises(VloraError, match="bleu4: no predictions"):
        bleu4([], [], tokenizer="simple")


# --- CIDEr-D -----------------------------------------------------------------------------------------

def _ngrams(tokens: list[str]) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for n in range(1, 5) for i in range(len(tokens) - n + 1))


def _cider_d_reference(hyps: list[str], refs: list[list[str]], sigma: float = 6.0) -> float:
    """CIDEr-D from the paper (Vedantam et al. 2015, sec. 4 and 8), written independently of pycocoevalcap:
    tf-idf n-gram vectors with idf log(N / df) over reference sets, per-n cosine with the candidate's counts
    clipped at the reference's, Gaussian length penalty, mean over n = 1..4 and references, x10.
    (pycocoevalcap measures length in bigrams, words - 1: the same difference for non-empty sentences.)"""
    df = Counter(g for rs in refs for g in set().union(*(_ngrams(r.split()) for r in rs)))
    idf = {g: math.log(len(refs)) - math.log(c) for g, c in df.items()}

    def vectors(text):
        counts = _ngrams(text.split())
        return [{g: c * idf.get(g, math.log(len(refs))) for g, c in counts.items() if len(g) == n}
                for n in range(1, 5)], len(text.split())

    scores = []
    for hyp, rs in zip(hyps, refs):
        hv, hlen = vectors(hyp)
        total = 0.0
        for ref in rs:
            rv, rlen = vectors(ref)
            for h, r in zip(hv, rv):
                norms = math.sqrt(sum(v * v for v in h.values())) * math.sqrt(sum(v * v for v in r.values()))
                dot = sum(min(v, r.get(g, 0.0)) * r.get(g, 0.0) for g, v in h.items())
                total += (dot / norms if norms else 0.0) * math.exp(-((hlen - rlen) ** 2) / (2 * sigma ** 2))
        scores.append(10 * total / 4 / len(rs))
    return sum(scores) / len(scores)


def test_cider_d_identical_captions_score_10():
    refs = ["red circle on left", "blue square at top"]  # no n-gram shared: every idf is log 2
    assert cider_d(refs, refs, tokenizer="simple") == pytest.approx(10.0, abs=1e-12)


def test_cider_d_one_item_corpus_is_zero():
    # One document: every n-gram has df = N = 1, so every idf, and the score, is 0.
    assert cider_d(["red circle on left"], ["red circle on left"], tokenizer="simple") == 0.0


def test_cider_d_by_hand():
    preds, refs = ["Red circle.", "Blue square at top"], ["red circle on left", "blue square at top"]
    # Item 2 matches its reference: 10. Item 1, with every idf log 2 (l): 1-grams 2 l^2 / (sqrt(2) l * 2 l),
    # 2-grams l^2 / (l * sqrt(3) l), no 3- or 4-grams; length 2 against 4 words: penalty exp(-2^2 / (2 * 6^2)).
    item1 = 10 * (1 / math.sqrt(2) + 1 / math.sqrt(3)) / 4 * math.exp(-4 / 72)
    assert cider_d(preds, refs, tokenizer="simple") == pytest.approx((item1 + 10) / 2, abs=1e-9)
    assert cider_d(preds, refs, tokenizer="simple") == pytest.approx(6.5188, abs=1e-4)


def test_cider_d_against_an_independent_implementation():
    hyps = ["a red red circle on the left", "two blue squares at the top", "one green triangle", ""]
    refs = [["a red circle on the left", "red circle left side"], ["two blue squares at the top"],
            ["one green triangle on the right", "a green triangle", "green triangle right"],
            ["two red circles on the left"]]
    expected = _cider_d_reference(hyps, refs)
    assert 1.0 < expected < 10.0  # a case where clipping, shared n-grams and lengths all matter
    assert cider_d(hyps, refs, tokenizer="simple") == pytest.approx(expected, abs=1e-9)


# --- tasks, baselines, aggregation -------------------------------------------------------------------

def test_task_of():
    assert VQA_MAX_WORDS == 3
    assert task_of("colour", "a long answer of many words") == ("colour", "label")
    assert task_of(None, "red") == ("vqa", "answer length")
    assert task_of(None, "on the left") == ("vqa", "answer length")
    assert task_of("", "two red circles left") == ("caption", "answer length")


def test_metric_kind():
    assert CAPTION_METRICS == ("exact_match", "bleu4", "cider_d") and ANSWER_METRICS == ("exact_match",)
    assert metric_kind("caption") == CAPTION_METRICS
    assert metric_kind("Image_Captioning", ["red"]) == CAPTION_METRICS
    assert metric_kind("colour", ["red", "light blue"]) == ANSWER_METRICS
    assert metric_kind("describe", ["one two three", "one two three"]) == ANSWER_METRICS  # mean 3: not > 3
    assert metric_kind("describe", ["one two three", "one two three four five"]) == CAPTION_METRICS  # mean 4
    assert metric_kind("describe", [["one two three four"], "x"]) == ANSWER_METRICS  # mean 2.5


def test_majority_baseline():
    assert majority_baseline({"colour": ["red", "Red", "blue", "blue.", "green"],  # red 2, blue 2: tie -> blue
                              "count": ["two", "2", "3"],
                              "position": [["left", "on the left"], "left"]}) == {
        "colour": "blue", "count": "2", "position": "left"}
    with pytest.raises(VloraError, match="'shape' has no reference answers"):
        majority_baseline({"shape": []})


ITEMS = [
    {"task": "colour", "reference": "red", "prediction": "Red."},
    {"task": "caption", "reference": "Two red circles on the left.", "prediction": "Two red circles on the left."},
    {"task": "colour", "reference": "green", "prediction": "blue"},
    {"task": "count", "reference": "2", "prediction": "two"},
    {"task": "caption", "reference": "One blue square at the top.", "prediction": "One blue square at the bottom."},
    {"task": "colour", "reference": ["green", "lime"], "prediction": "the green"},
    {"task": "count", "reference": "three", "prediction": "3"},
]


def test_score_items():
    scores = score_items(ITEMS, tokenizer="simple")
    assert scores["tokenizer"] == "simple"
    assert list(scores["tasks"]) == ["caption", "colour", "count"]
    caption = scores["tasks"]["caption"]
    assert set(caption) == {"n", "exact_match", "bleu4", "cider_d"}
    assert (caption["n"], caption["exact_match"]) == (2, 50.0)
    caps = [it for it in ITEMS if it["task"] == "caption"]
    preds, refs = [it["prediction"] for it in caps], [it["reference"] for it in caps]
    assert caption["bleu4"] == pytest.approx(bleu4(preds, refs, tokenizer="simple"), abs=1e-9)
    # Item 1 matches; item 2 misses 'bottom': 1-grams 11/12, 2-grams 9/10, 3-grams 7/8, 4-grams 5/6;
    # 12 words on each side, so no brevity penalty.
    assert caption["bleu4"] == pytest.approx(100 * (11 / 12 * 9 / 10 * 7 / 8 * 5 / 6) ** 0.25, abs=1e-6)
    assert caption["cider_d"] == pytest.approx(_cider_d_reference(
        simple_tokenize(preds), [[r] for r in simple_tokenize(refs)]), abs=1e-9)
    assert scores["tasks"]["colour"] == {"n": 3, "exact_match": pytest.approx(200 / 3)}
    assert scores["tasks"]["count"] == {"n": 2, "exact_match": 100.0}
    assert scores["all"] == {"n": 7, "exact_match": pytest.approx(500 / 7)}


def test_score_items_without_captions_uses_no_tokenizer():
    vqa = [it for it in ITEMS if it["task"] != "caption"]
    assert score_items(vqa) == {"tokenizer": None,
                                "tasks": {"colour": {"n": 3, "exact_match": pytest.approx(200 / 3)},
                                          "count": {"n": 2, "exact_match": 100.0}},
                                "all": {"n": 5, "exact_match": 80.0}}


def test_majority_items_and_their_scores():
    baseline = majority_items(ITEMS)
    assert ITEMS[0]["prediction"] == "Red."  # the input is not modified
    # colour: green 2, red 1, lime 1; count: 2 and 3 tie -> "2"; caption: one each, "1 blue..." < "2 red...",
    # answered as that reference is written.
    assert [it["prediction"] for it in baseline] == ["green", "One blue square at the top.", "green", "2",
                                                    "One blue square at the top.", "green", "2"]
    assert [{k: v for k, v in it.items() if k != "prediction"} for it in baseline] == \
        [{k: v for k, v in it.items() if k != "prediction"} for it in ITEMS]
    scores = score_items(baseline, tokenizer="simple")
    assert [scores["tasks"][t]["exact_match"] for t in ("caption", "colour", "count")] == \
        [50.0, pytest.approx(200 / 3), 50.0]
    assert scores["all"] == {"n": 7, "exact_match": pytest.approx(400 / 7)}
    given = majority_items(ITEMS, {"colour": "red", "count": "4", "caption": "x"})
    assert [it["prediction"] for it in given] == ["red", "x", "red", "4", "x", "red", "4"]
    with pytest.raises(VloraError, match="no majority answer for task.s. caption, count"):
        majority_items(ITEMS, {"colour": "red"})


@pytest.mark.parametrize("items, match", [
    ([], "no items"),
    ([{"task": "colour", "reference": "red"}], "item 0 needs"),
    ([{"task": "colour", "reference": [], "prediction": "red"}], "item 0: a reference must be"),
    ([{"task": 3, "reference": "red", "prediction": "red"}], "item 0 needs"),
])
def test_score_items_rejects_bad_items(items, match):
    with pytest.raises(VloraError, match=match):
        score_items(items)


@pytest.mark.skipif(not shutil.which("java"), reason="no java on PATH: the PTB tokenizer cannot run")
def test_score_items_with_ptb_matches_simple_on_plain_captions():
    ptb, simple = score_items(ITEMS, tokenizer="ptb"), score_items(ITEMS, tokenizer="simple")
    assert ptb["tokenizer"] == "ptb"
    assert ptb["tasks"] == simple["tasks"]


def test_importing_scoring_is_cheap():
    code = "import sys, vlora.scoring; print(sorted({'sacrebleu', 'pycocoevalcap', 'numpy', 'torch'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- grounding -------------------------------------------------------------------------------------------

def box(x1, y1, x2, y2) -> str:
    return f"<|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>"


def test_box_iou_by_hand():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((10, 10, 0, 0), (5, 0, 15, 10)) == pytest.approx(50 / 150)  # corners in either order
    assert box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0  # empty boxes: no division by zero


@pytest.mark.parametrize("prediction, reference, expected", [
    (box(0, 0, 100, 100), box(0, 0, 100, 100), 1.0),
    (box(0, 0, 100, 100), box(0, 0, 100, 199), 1.0),  # IoU 100/199 = 0.5025
    (box(0, 0, 100, 100), box(0, 0, 100, 201), 0.0),  # IoU 100/201 = 0.4975
    ('[{"bbox_2d": [0, 0, 100, 100], "label": "cat"}]', box(2, 2, 98, 98), 1.0),  # syntaxes need not agree
    ("a cat", box(0, 0, 100, 100), 0.0),  # no box in the answer
    (box(0, 0, 100, 100), "a cat", 0.0),  # no box in the reference
    (box(0, 0, 10, 10) + box(50, 50, 60, 60), box(50, 50, 60, 60) + box(0, 0, 10, 10), 1.0),  # any order
    (box(0, 0, 10, 10), box(50, 50, 60, 60) + box(0, 0, 10, 10), 0.0),  # one box missing
    (box(0, 0, 10, 10) + box(0, 0, 10, 10), box(0, 0, 10, 10), 0.0),  # one box too many
    # Only the pairing a-B (IoU 0.67), b-A (0.6) matches both: a greedy pass by IoU would pair a-A (1.0) first and
    # leave b with B (0.4).
    (box(0, 0, 100, 100) + box(0, 0, 100, 60), box(0, 0, 100, 100) + box(0, 0, 100, 150), 1.0),
    (box(0, 0, 10, 10), ["red", box(0, 0, 10, 10)], 1.0),  # any of a list of references
])
def test_box_match(prediction, reference, expected):
    assert box_match(prediction, reference) == expected


def test_grounding_tasks_are_scored_on_boxes_not_on_words():
    items = [{"task": "ground", "reference": box(0, 0, 100, 100), "prediction": box(0, 0, 100, 150)},  # IoU 2/3
             {"task": "ground", "reference": box(0, 0, 100, 100), "prediction": box(0, 0, 100, 100)},
             {"task": "ground", "reference": box(0, 0, 100, 100), "prediction": box(60, 60, 100, 100)},  # 0.16
             {"task": "ground", "reference": box(0, 0, 100, 100), "prediction": "nothing there"},
             {"task": "colour", "reference": "red", "prediction": "red"}]
    scores = score_items(items)
    assert scores["tasks"]["ground"] == {"n": 4, "exact_match": 25.0, "box_acc50": 50.0}  # no BLEU over coordinates
    assert scores["tasks"]["colour"] == {"n": 1, "exact_match": 100.0}
    assert scores["all"] == {"n": 5, "exact_match": 40.0}
    assert scores["tokenizer"] is None
    json_boxes = ['[{"bbox_2d": [1, 2, 3, 4], "label": "a cat on the sofa"}]'] * 2
    assert metric_kind("ground", json_boxes) == (*ANSWER_METRICS, BOX_METRIC)  # words of JSON: not a caption
    assert metric_kind("ground", [box(1, 2, 3, 4), "red"]) == (*ANSWER_METRICS, BOX_METRIC)  # half of them
    assert metric_kind("ground", [box(1, 2, 3, 4), "red", "blue"]) == ANSWER_METRICS
    assert metric_kind("ground", [[box(1, 2, 3, 4), "red"], "blue"]) == (*ANSWER_METRICS, BOX_METRIC)
    grounded_captions = ['a cat <|box_start|>(1,2),(3,4)<|box_end|> sleeps on a long sofa'] * 2
    assert metric_kind("grounded_caption", grounded_captions) == (*CAPTION_METRICS, BOX_METRIC)
    assert metric_kind("caption", ['a format such as {"bbox_2d": [x1, y1, x2, y2]} long text']) == CAPTION_METRICS
    both = score_items([{"task": "grounded_caption", "reference": r, "prediction": r} for r in grounded_captions])
    assert both["tasks"]["grounded_caption"]["box_acc50"] == 100.0 and "cider_d" in both["tasks"]["grounded_caption"]


def test_exact_match_keeps_coordinates_apart():
    assert exact_match(box(1, 23, 4, 5), box(12, 3, 4, 5)) == 0.0  # "1,23" and "12,3" are not one number
    assert exact_match(box(1, 23, 4, 5), box(1, 23, 4, 5)) == 1.0
    assert exact_match("1,000", "1000") == 1.0  # a thousands comma still is one, without boxes
