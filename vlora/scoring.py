"""Answer scoring for `vlora eval` and in-training evaluation: exact match on VQA-normalised answers for
short answers, corpus BLEU-4 (sacrebleu) and CIDEr-D (pycocoevalcap) for captions, and for grounding answers
(boxes in the reference) the share whose boxes overlap the reference's at IoU >= 0.5.

An item is a dict {"task": str, "reference": str or list of str, "prediction": str}. `score_items` scores a
list of them per task; `majority_items` replaces every prediction by its task's most frequent answer, so the
same `score_items` call gives the baseline a model has to beat.

Captions are tokenized once per corpus for both BLEU-4 and CIDEr-D, by the same tokenizer: pycocoevalcap's
Stanford PTB tokenizer (as coco-caption does) when `java` is on PATH, else `simple_tokenize`. BLEU-4 then
runs on those tokens with sacrebleu's tokenize="none", so the two caption metrics always see the same words
and the tokenizer name reported ("ptb" or "simple") covers both.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import warnings
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable, Sequence

from vlora.data.grounding import boxes_in
from vlora.errors import VloraError

# Answers of at most this many words are short (VQA-style) answers; longer ones are captions. Used both to
# guess the task of an unlabelled record (task_of) and to decide whether a task is scored as captions.
VQA_MAX_WORDS = 3

# The PTB tokenizer is one JVM start (~1 s) plus tokenizing; a run this long means java is stuck, not busy.
PTB_TIMEOUT_S = 300

CAPTION_METRICS = ("exact_match", "bleu4", "cider_d")
ANSWER_METRICS = ("exact_match",)
BOX_METRIC = "box_acc50"  # added to a grounding task's metrics
# A predicted box is right when it overlaps its reference this much (intersection over union): the Acc@0.5 that
# grounding benchmarks (RefCOCO) and Qwen-VL's reports use.
BOX_IOU = 0.5

_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"))}
_ARTICLES = frozenset(("a", "an", "the"))
# A few of the VQA script's contractions, written without the apostrophe by models and annotators alike.
_CONTRACTIONS = {w.replace("'", ""): w for w in (
    "don't", "doesn't", "didn't", "isn't", "aren't", "wasn't", "weren't", "can't", "won't", "couldn't",
    "shouldn't", "wouldn't", "haven't", "hasn't", "i'm", "i've", "you're", "they're", "that's", "what's")}
_NUMBER_COMMA = re.compile(r"(?<=\d),(?=\d)")
_LONE_PERIOD = re.compile(r"(?<!\d)\.|\.(?!\d)")
_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!]")  # the VQA script's list, less the period


def normalize_answer(text: str) -> str:
    """VQA v2 answer normalisation, as in the official eval script but with its quirks made regular.

    In order: lowercase; drop commas between digits ("1,000" -> "1000"); drop periods unless between digits
    ("2.5" stays, "red." -> "red"); replace the characters ; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? ! by a space
    ("t-shirt" -> "t shirt"; the VQA script sometimes deletes them instead); split on whitespace; number words
    zero..ten -> digits ("two" -> "2"; the VQA script's "none" -> "0" is not applied); drop the articles a, an,
    the; restore the apostrophe of common contractions ("dont" -> "don't"); join with single spaces.
    Apostrophes, colons and other symbols are kept ("dog's", "3:00").
    """
    text = _NUMBER_COMMA.sub("", text.lower())
    text = _PUNCT.sub(" ", _LONE_PERIOD.sub("", text))
    words = (_NUMBER_WORDS.get(w, w) for w in text.split())
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def _ref_list(reference: str | Sequence[str], what: str) -> list[str]:
    refs = [reference] if isinstance(reference, str) else list(reference)
    if not refs or not all(isinstance(r, str) for r in refs):
        raise VloraError(f"{what}: a reference must be a string or a non-empty list of strings, got {reference!r}")
    return refs


def exact_match(prediction: str, reference: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals the normalised reference (or any of a list of them), else 0.0.

    This is plain exact match, not the VQA v2 "min(#annotators agreeing / 3, 1)" accuracy. Against a reference that
    holds a box, commas between digits stay separators."""
    refs = _ref_list(reference, "exact_match")
    return float(any(_normalize(prediction, boxed) == _normalize(r, boxed)
                     for r in refs for boxed in [bool(boxes_in(r))]))


def _normalize(text: str, boxed: bool) -> str:
    # Against a reference with boxes, a comma between digits separates coordinates: (1,23) is not (12,3).
    return normalize_answer(text.replace(",", ", ") if boxed else text)


# --- grounding ------------------------------------------------------------------------------------------

def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two boxes (x1, y1, x2, y2), corners in either order; 0.0 for two empty boxes."""
    ax1, ax2, ay1, ay2 = min(a[0], a[2]), max(a[0], a[2]), min(a[1], a[3]), max(a[1], a[3])
    bx1, bx2, by1, by2 = min(b[0], b[2]), max(b[0], b[2]), min(b[1], b[3]), max(b[1], b[3])
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union if union > 0 else 0.0


def box_match(prediction: str, reference: str | Sequence[str]) -> float:
    """1.0 if the prediction's boxes pair up one to one with the boxes of the reference (or of any of a list), each
    pair at IoU >= BOX_IOU, in any order (RefCOCO's Acc@0.5 for one box); else 0.0, also for a reference without a
    box. Both must be in the same coordinates: `vlora eval` maps answers back to the image's pixels first."""
    predicted = boxes_in(prediction)
    for ref in _ref_list(reference, "box_match"):
        wanted = boxes_in(ref)
        if wanted and len(wanted) == len(predicted) and _pair_up(predicted, wanted):
            return 1.0
    return 0.0


def _pair_up(predicted: list, wanted: list) -> bool:
    """Whether every predicted box gets its own wanted box at IoU >= BOX_IOU: a perfect bipartite matching
    (augmenting paths; a greedy pass by IoU can miss one where two boxes overlap the same reference)."""
    good = [[box_iou(p, w) >= BOX_IOU for w in wanted] for p in predicted]
    owner = [-1] * len(wanted)

    def place(i: int, seen: set[int]) -> bool:
        for j in range(len(wanted)):
            if good[i][j] and j not in seen:
                seen.add(j)
                if owner[j] < 0 or place(owner[j], seen):
                    owner[j] = i
                    return True
        return False

    return all(place(i, set()) for i in range(len(predicted)))


def is_grounding_task(references: Sequence) -> bool:
    """A task is scored on boxes when at least half of its items' references hold a box (vlora.data.grounding's
    syntaxes; an item with a list of references counts when one of them does)."""
    boxed = sum(any(boxes_in(r) for r in ([ref] if isinstance(ref, str) else ref)) for ref in references)
    return bool(references) and 2 * boxed >= len(references)


# --- caption tokenization ---------------------------------------------------------------------------

_CLITIC = re.compile(r"(?<=\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_SIMPLE_PUNCT = re.compile(r"(?<!\d)[.,]|[.,](?!\d)|[?!:;\"`()\[\]{}]")


def simple_tokenize(texts: Sequence[str]) -> list[str]:
    """The fallback caption tokenizer, close to PTB tokenization followed by coco-caption's punctuation removal.

    Per text: lowercase; line breaks become spaces; split clitics off as PTB does ("dog's" -> "dog 's",
    "don't" -> "do n't"); replace . and , (unless between digits: "2.5", "1,000" stay) and ? ! : ; " ` ( ) [ ] { }
    by spaces; split on whitespace; drop tokens without a letter or digit (lone "-", "--", "'").
    Hyphenated words stay whole, as in PTB. Unlike PTB it does not split off symbols such as % or $, drops
    brackets where coco-caption keeps PTB's lowercased "-lrb-"/"-rrb-", and leaves quotes glued to a word
    ("'red'") in place. On plain captions ("Two red circles on the left.") both give the same tokens.
    Returns one space-separated token string per text."""
    out = []
    for text in texts:
        text = _SIMPLE_PUNCT.sub(" ", _CLITIC.sub(r" \1", " ".join(text.lower().splitlines())))
        out.append(" ".join(w for w in text.split() if any(c.isalnum() for c in w)))
    return out


def _ptb_tokenize(texts: Sequence[str]) -> list[str]:
    """pycocoevalcap's tokenization: its Stanford CoreNLP 3.4.1 PTBTokenizer (lowercased, one line per text),
    then its PUNCTUATIONS tokens removed. Runs the jar itself rather than through PTBTokenizer.tokenize, which
    writes a temporary file next to the jar (site-packages), ignores java's exit status and silently misaligns
    texts when a line goes missing; here any of that raises RuntimeError."""
    from pycocoevalcap.tokenizer import ptbtokenizer as ptb

    if not texts:
        return []
    jar = Path(ptb.__file__).with_name(ptb.STANFORD_CORENLP_3_4_1_JAR)
    lines = [" ".join(t.splitlines()) for t in texts]  # one input line per text, whatever its line breaks
    cmd = ["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase",
           "-encoding", "utf-8"]
    try:
        proc = subprocess.run(cmd, input="".join(line + "\n" for line in lines).encode("utf-8"),
                              capture_output=True, timeout=PTB_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"java could not run the PTB tokenizer: {e}") from e
    if proc.returncode != 0:
        tail = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"the PTB tokenizer exited with status {proc.returncode}: {tail[0]}")
    out = proc.stdout.decode("utf-8", "replace").split("\n")
    # Every input line comes back newline-terminated, so the split leaves exactly one empty string at the end.
    if len(out) != len(lines) + 1 or out[-1]:
        raise RuntimeError(f"the PTB tokenizer returned {len(out) - 1} lines for {len(lines)} texts")
    punct = set(ptb.PUNCTUATIONS)
    return [" ".join(w for w in line.split() if w not in punct) for line in out[:-1]]


def caption_tokenizer(tokenizer: str | None = None) -> tuple[str, Callable[[Sequence[str]], list[str]]]:
    """(name, fn) of the caption tokenizer: "ptb" when `tokenizer` is "ptb", or None and `java` is on PATH;
    "simple" (simple_tokenize) when it is "simple", or None and there is no java. fn maps a list of texts to a
    list of space-separated token strings; the PTB one starts a JVM per call, so call it once per corpus."""
    if tokenizer is None:
        tokenizer = "ptb" if shutil.which("java") else "simple"
    if tokenizer == "ptb":
        if not shutil.which("java"):
            raise VloraError("tokenizer 'ptb' needs java on PATH (Debian: apt-get install default-jre-headless);"
                             " use tokenizer 'simple' instead")
        return "ptb", _ptb_tokenize
    if tokenizer == "simple":
        return "simple", simple_tokenize
    raise VloraError(f"unknown caption tokenizer {tokenizer!r}: use 'ptb', 'simple' or None (ptb if java is found)")


def tokenize_captions(texts: Sequence[str], tokenizer: str | None = None) -> tuple[str, list[str]]:
    """(name of the tokenizer actually used, tokenized texts). A failing PTB tokenizer (java crashes, hangs or
    returns the wrong number of lines) falls back to simple_tokenize with a warning instead of failing the eval."""
    name, fn = caption_tokenizer(tokenizer)
    try:
        return name, fn(texts)
    except RuntimeError as e:
        if name != "ptb":
            raise
        warnings.warn(f"PTB tokenizer failed ({e}); captions tokenized with simple_tokenize instead", stacklevel=2)
        return "simple", simple_tokenize(texts)


def _tokenize_corpus(predictions: Sequence[str], references: Sequence, tokenizer: str | None, what: str):
    """Tokenize predictions and all references in one tokenizer call: (name, hyps, list of ref lists)."""
    if not predictions:
        raise VloraError(f"{what}: no predictions to score")
    if len(predictions) != len(references):
        raise VloraError(f"{what}: {len(predictions)} predictions but {len(references)} references")
    if not all(isinstance(p, str) for p in predictions):
        raise VloraError(f"{what}: every prediction must be a string")
    refs = [_ref_list(r, what) for r in references]
    name, tokens = tokenize_captions([*predictions, *(r for rs in refs for r in rs)], tokenizer)
    hyps, rest = tokens[:len(predictions)], iter(tokens[len(predictions):])
    return name, hyps, [[next(rest) for _ in rs] for rs in refs]


# --- caption metrics ---------------------------------------------------------------------------------

def _bleu4_tokens(hyps: list[str], refs: list[list[str]]) -> float:
    from sacrebleu.metrics import BLEU

    # sacrebleu wants one stream per reference position; None marks "this segment has fewer references".
    streams = [[rs[i] if i < len(rs) else None for rs in refs] for i in range(max(map(len, refs)))]
    return float(BLEU(tokenize="none").corpus_score(hyps, streams).score)


def _cider_d_tokens(hyps: list[str], refs: list[list[str]]) -> float:
    from pycocoevalcap.cider.cider import Cider

    if not any(r.split() for rs in refs for r in rs):
        return 0.0  # no reference n-gram at all: pycocoevalcap would fail on max() of an empty df table
    score, _ = Cider().compute_score({i: rs for i, rs in enumerate(refs)}, {i: [h] for i, h in enumerate(hyps)})
    return float(score)


def bleu4(predictions: Sequence[str], references: Sequence, tokenizer: str | None = None) -> float:
    """Corpus BLEU-4 on a 0-100 scale, as sacrebleu reports it (uniform 1..4-gram weights, brevity penalty,
    closest reference length, "exp" smoothing of zero n-gram counts). references: one string per prediction,
    or one list of strings per prediction (multiple references). Texts are first tokenized by the caption
    tokenizer (see caption_tokenizer) and scored with tokenize="none", so BLEU and CIDEr-D see the same tokens."""
    _, hyps, refs = _tokenize_corpus(predictions, references, tokenizer, "bleu4")
    return _bleu4_tokens(hyps, refs)


def cider_d(predictions: Sequence[str], references: Sequence, tokenizer: str | None = None) -> float:
    """Corpus CIDEr-D as coco-caption computes it (pycocoevalcap's Cider: 1..4-grams, TF-IDF, Gaussian length
    penalty with sigma 6, clipped counts, x10), on coco-caption's scale: 0 up to 10 per caption when it
    matches all of its references, typically 0-3 for real models. references as for bleu4.
    The IDF comes from the references of the evaluated corpus itself: an n-gram found in every item's
    references weighs nothing, so a one-item corpus always scores 0.0 and small corpora score noisily."""
    _, hyps, refs = _tokenize_corpus(predictions, references, tokenizer, "cider_d")
    return _cider_d_tokens(hyps, refs)


# --- tasks, baselines and aggregation ------------------------------------------------------------------

def task_of(record_task: str | None, answer: str) -> tuple[str, str]:
    """(task, how): the packer's task label with how="label" when there is one; otherwise "vqa" for a reference
    answer of at most VQA_MAX_WORDS whitespace-separated words and "caption" for a longer one, how="answer length"."""
    if record_task:
        return record_task, "label"
    return ("vqa" if len(answer.split()) <= VQA_MAX_WORDS else "caption"), "answer length"


def is_caption_task(task: str, references: Sequence = ()) -> bool:
    """A task is scored as captions if its name contains "caption" (any case) or its references (strings or
    lists of strings) average more than VQA_MAX_WORDS whitespace-separated words."""
    if "caption" in task.lower():
        return True
    lengths = [len(r.split()) for ref in references for r in ([ref] if isinstance(ref, str) else ref)]
    return bool(lengths) and sum(lengths) / len(lengths) > VQA_MAX_WORDS


def metric_kind(task: str, references: Sequence = ()) -> tuple[str, ...]:
    """The metrics `score_items` reports for `task`: CAPTION_METRICS ("exact_match", "bleu4", "cider_d") for a
    caption task (exact match is kept for information), else ANSWER_METRICS ("exact_match",); and "box_acc50" for a
    grounding task (is_grounding_task). A grounding task is a caption task by its name only: the words of a box
    answer (`[{"bbox_2d": [...], "label": "cat"}]`) do not make it a caption."""
    grounding = is_grounding_task(references)
    caption = "caption" in task.lower() if grounding else is_caption_task(task, references)
    return (CAPTION_METRICS if caption else ANSWER_METRICS) + ((BOX_METRIC,) if grounding else ())


def majority_baseline(references_by_task: dict[str, Sequence]) -> dict[str, str]:
    """Per task, the most frequent normalised reference answer (each string of a list reference counts once);
    ties go to the alphabetically first answer, so the baseline is the same on every run."""
    majority = {}
    for task, refs in references_by_task.items():
        counts = Counter(normalize_answer(r) for ref in refs for r in _ref_list(ref, f"majority_baseline[{task!r}]"))
        if not counts:
            raise VloraError(f"majority_baseline: task {task!r} has no reference answers")
        majority[task] = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0]
    return majority


def _check_items(items: Sequence[dict], what: str) -> None:
    if not items:
        raise VloraError(f"{what}: no items to score")
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("task"), str) \
                or not isinstance(item.get("prediction"), str) or "reference" not in item:
            raise VloraError(f"{what}: item {i} needs a string 'task', a 'reference' and a string 'prediction'")
        _ref_list(item["reference"], f"{what}: item {i}")


def majority_items(items: Sequence[dict], majority: dict[str, str] | None = None) -> list[dict]:
    """Copies of `items` with each prediction replaced by its task's majority answer: from `majority` if given
    (e.g. majority_baseline of the training answers), else from these items' own references, which makes the
    baseline a little optimistic (it has seen the answers it is scored on)."""
    _check_items(items, "majority_items")
    if majority is None:
        by_task = defaultdict(list)
        for item in items:
            by_task[item["task"]].append(item["reference"])
        # Answered as a reference is written (the first, alphabetically, of those that normalise to the majority):
        # the report shows it, and BLEU / CIDEr score it, as a person's answer, not as the normalised form.
        majority = {task: min(r for ref in refs for r in _ref_list(ref, task) if normalize_answer(r) == answer)
                    for task, refs in by_task.items() for answer in [majority_baseline({task: refs})[task]]}
    missing = sorted({item["task"] for item in items} - set(majority))
    if missing:
        raise VloraError(f"majority_items: no majority answer for task(s) {', '.join(missing)}")
    return [{**item, "prediction": majority[item["task"]]} for item in items]


def score_items(items: Sequence[dict], tokenizer: str | None = None) -> dict:
    """Score items {"task", "reference", "prediction"} per task and over all of them.

    Returns {"tokenizer": name of the caption tokenizer used ("ptb"/"simple"; None if no task is a caption task),
    "tasks": {task: {"n", "exact_match", for caption tasks "bleu4", "cider_d", for grounding tasks "box_acc50"}},
    "all": {"n", "exact_match"}},
    tasks in sorted order. exact_match is a percentage (0-100); "all" is the micro average over every item.
    bleu4 (0-100) and cider_d (coco-caption scale, see cider_d) are corpus scores over the task's items; all
    caption tasks are tokenized in one tokenizer call. tokenizer: "ptb", "simple" or None (see caption_tokenizer).
    """
    _check_items(items, "score_items")
    groups: dict[str, list[dict]] = defaultdict(list)
    for item in sorted(items, key=lambda it: it["task"]):  # stable: items keep their order within a task
        groups[item["task"]].append(item)
    hits = {task: [exact_match(it["prediction"], it["reference"]) for it in group]
            for task, group in groups.items()}
    tasks = {task: {"n": len(group), "exact_match": 100.0 * sum(hits[task]) / len(group)}
             for task, group in groups.items()}
    kinds = {task: metric_kind(task, [it["reference"] for it in group]) for task, group in groups.items()}
    for task in (task for task, kind in kinds.items() if BOX_METRIC in kind):
        group = groups[task]
        tasks[task][BOX_METRIC] = 100.0 * sum(box_match(it["prediction"], it["reference"]) for it in group) / len(group)
    caption_tasks = [task for task, kind in kinds.items() if "cider_d" in kind]
    name = None
    if caption_tasks:
        flat = [it for task in caption_tasks for it in groups[task]]
        name, hyps, refs = _tokenize_corpus([it["prediction"] for it in flat], [it["reference"] for it in flat],
                                            tokenizer, "score_items")
        start = 0
        for task in caption_tasks:
            end = start + len(groups[task])
            tasks[task]["bleu4"] = _bleu4_tokens(hyps[start:end], refs[start:end])
            tasks[task]["cider_d"] = _cider_d_tokens(hyps[start:end], refs[start:end])
            start = end
    all_hits = [h for task_hits in hits.values() for h in task_hits]
    return {"tokenizer": name, "tasks": tasks,
            "all": {"n": len(all_hits), "exact_match": 100.0 * sum(all_hits) / len(all_hits)}}
