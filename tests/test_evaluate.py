"""`vlora eval` and in-training exact match (run.eval_generate): the report's numbers agree with its own items and
with an independent recomputation; an adapter that changes nothing scores exactly as the base."""

import collections
import json

import pytest
import torch

from helpers import random_adapter, train_in_process
from vlora import cli
from vlora.evaluate import ADAPTER, heldout_loss, read_samples
from vlora.generate import BASE, Answerer, Request, load_for_inference, split_answer
from vlora.scoring import exact_match, normalize_answer

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

PIXELS = ["--min-pixels", "3136", "--max-pixels", "12544"]


@pytest.fixture(scope="module")
def report(tiny_model_dir, demo_shards, tmp_path_factory):
    """`vlora eval` of a random adapter on 12 held-out demo samples: (report.json, the folder, printed lines)."""
    adapter = random_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter"), seed=3)
    out = tmp_path_factory.mktemp("eval")
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = cli.main(["eval", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--shards",
                         str(demo_shards / "val"), "--out", str(out), "--max-samples", "12", "--dtype", "fp32",
                         "--device", "cpu", "--max-new-tokens", "12", *PIXELS])
    assert code == 0
    return json.loads((out / "report.json").read_text()), out, printed.getvalue().splitlines()


def test_the_report_table_is_the_mean_of_its_items(report):
    rep, out, _ = report
    assert rep["n_items"] == 12 and rep["systems"] == ["adapter", "base", "majority"]
    assert rep["task_source"] == "label"  # the demo shards carry each sample's kind as its task
    for system in rep["systems"]:
        by_task = collections.defaultdict(list)
        for item in rep["items"]:
            # Each item's verdict is exact match of its answer against its reference, recomputed here.
            assert item["correct"][system] == bool(exact_match(item["answers"][system], item["reference"]))
            by_task[item["task"]].append(item["correct"][system])
        scores = rep["scores"][system]
        assert sorted(scores["tasks"]) == sorted(by_task)
        for task, verdicts in by_task.items():
            assert scores["tasks"][task]["n"] == len(verdicts)
            assert scores["tasks"][task]["exact_match"] == pytest.approx(100 * sum(verdicts) / len(verdicts))
        everything = [v for vs in by_task.values() for v in vs]
        assert scores["all"]["exact_match"] == pytest.approx(100 * sum(everything) / len(everything))
    html = (out / "report.html").read_text()
    assert "<table" in html and html.count("data:image/png;base64,") == 12


def test_the_majority_baseline_answers_each_tasks_most_frequent_reference(report):
    rep = report[0]
    refs = collections.defaultdict(collections.Counter)
    for item in rep["items"]:
        refs[item["task"]][normalize_answer(item["reference"])] += 1
    for item in rep["items"]:
        top = max(refs[item["task"]].values())
        most = sorted(a for a, n in refs[item["task"]].items() if n == top)[0]
        assert normalize_answer(item["answers"]["majority"]) == most


def test_the_answers_are_the_models_own(report, tiny_model_dir, demo_shards):
    """The adapter's and the base's answers in the report equal greedy answers computed here, one at a time."""
    rep = report[0]
    samples = read_samples(str(demo_shards / "val"), 3)
    adapter_dir = rep["adapter"]
    model, processor = load_for_inference(str(tiny_model_dir), {ADAPTER: adapter_dir}, dtype="fp32", device="cpu")
    answerer = Answerer(model, processor, min_pixels=3136, max_pixels=12544)
    from vlora.data.collate import sample_images

    by_key = {i["key"]: i for i in rep["items"]}
    for s in samples:
        messages, _ = split_answer(json.loads(s["json"])["messages"])
        for system, name in (("adapter", ADAPTER), ("base", BASE)):
            with answerer.use_adapter(name):
                [mine] = answerer.answer([Request(messages, sample_images(s))], max_new_tokens=12)
            assert by_key[s["__key__"]]["answers"][system] == mine
    assert any(i["answers"]["adapter"] != i["answers"]["base"] for i in rep["items"])  # the adapter matters
    assert rep["heldout_loss"]["adapter"] != pytest.approx(rep["heldout_loss"]["base"], rel=1e-3)


def test_the_printed_table_shows_every_task_and_the_overall_row(report):
    rep, out, lines = report
    table = [line.split() for line in lines if line.startswith("  ")]
    rows = {cells[0]: cells for cells in table[1:]}
    assert sorted(rows) == sorted([*rep["scores"]["adapter"]["tasks"], "all"])
    for task, cells in rows.items():
        n = rep["scores"]["adapter"]["all" if task == "all" else "tasks"]
        n = n["n"] if task == "all" else n[task]["n"]
        assert int(cells[1]) == n
        adapter_em = rep["scores"]["adapter"]["all"] if task == "all" else rep["scores"]["adapter"]["tasks"][task]
        assert cells[2] == f"{adapter_em['exact_match']:.1f}%"
    assert any(str(out / "report.html") in line for line in lines)


def test_an_adapter_at_its_init_has_the_bases_heldout_loss(tiny_model_dir, demo_shards, tmp_path):
    """peft's init leaves B = 0: the adapter must change nothing, so its held-out loss equals the base's exactly."""
    from conftest import tiny_lora_model
    from vlora.data.collate import Collator

    model = tiny_lora_model(tiny_model_dir)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.zero_()
    model.save_pretrained(str(tmp_path / "zero"))
    model, processor = load_for_inference(str(tiny_model_dir), {ADAPTER: str(tmp_path / "zero")}, dtype="fp32",
                                          device="cpu")
    collator = Collator(processor, min_pixels=3136, max_pixels=12544, max_length=4096)
    samples = read_samples(str(demo_shards / "val"), 8)
    answerer = Answerer(model, processor, min_pixels=3136, max_pixels=12544)
    encoded = [collator.encode(s) for s in samples]
    losses = {}
    for name in (ADAPTER, BASE):
        with answerer.use_adapter(name):
            losses[name] = heldout_loss(model, collator, encoded, batch_size=4)
    assert losses[ADAPTER] == losses[BASE] and 0 < losses[BASE] < 20


def test_the_answer_budget_follows_the_longest_reference(tiny_model_dir):
    from transformers import AutoTokenizer

    from vlora.evaluate import answer_budget

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    longest = len(tok("three red circles on the left", add_special_tokens=False)["input_ids"])
    assert answer_budget(tok, ["two", "three red circles on the left", "blue"]) == 2 * longest + 8
    assert answer_budget(tok, ["word " * 400]) == 256


@pytest.mark.slow
def test_training_logs_the_exact_match_that_its_adapter_gives(monkeypatch, tiny_model_dir, demo_shards, tmp_path):
    """run.eval_generate: val_exact_match at every evaluation; the last equals what the saved adapter scores on
    the same held-out samples when loaded afresh. Answers are generated run.eval_batch at a time."""
    sizes = []
    unspied = Answerer.answer
    monkeypatch.setattr(Answerer, "answer", lambda self, requests, **kw: sizes.append(len(requests))
                        or unspied(self, requests, **kw))
    run = train_in_process(monkeypatch, tiny_model_dir, demo_shards, tmp_path, **{
        "optim.max_steps": 4, "optim.global_batch": 4, "optim.micro_batch": 2, "run.eval_every": 2,
        "run.eval_generate": 6, "run.eval_batch": 4, "data.val_samples": 8, "run.plot": "true"})
    assert sum(sizes) == 3 * 6 and 2 < max(sizes) <= 4  # 3 evaluations, batches over micro_batch
    records = [json.loads(line) for line in (run.dir / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["val_exact_match"] for r in records if "val_exact_match" in r}
    assert sorted(logged) == [0, 2, 4] and all(0 <= v <= 100 for v in logged.values())
    assert not any("val_box_acc50" in r for r in records)  # no reference holds a box
    model, processor = load_for_inference(str(tiny_model_dir), {ADAPTER: str(run.dir / "adapter")}, dtype="fp32",
                                          device="cpu")
    answerer = Answerer(model, processor, min_pixels=run.cfg.data.min_pixels, max_pixels=run.cfg.data.max_pixels)
    hits = []
    for s in read_samples(str(demo_shards / "val"), 6):
        messages, reference = split_answer(json.loads(s["json"])["messages"])
        from vlora.data.collate import sample_images

        [answer] = answerer.answer([Request(messages, sample_images(s))])
        hits.append(exact_match(answer, reference))
    assert logged[4] == pytest.approx(100 * sum(hits) / len(hits))
    assert (run.dir / "curves.png").is_file()


def test_each_task_generates_at_most_its_own_budget(tiny_model_dir):
    """Per task: twice its longest reference + 8, or the budget given for all; requests are batched by budget."""
    from transformers import AutoTokenizer

    from vlora.evaluate import answer_budget, task_budgets
    from vlora.generate import Request, budget_batches

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    items = [{"task": "colour", "reference": "red"}, {"task": "caption", "reference": "three red circles on the left"},
             {"task": "colour", "reference": "blue"}, {"task": "caption", "reference": "one square"}]
    budgets = task_budgets(tok, items)
    ntok = lambda s: len(tok(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    assert budgets == {"caption": 2 * ntok("three red circles on the left") + 8,
                       "colour": 2 * max(ntok("red"), ntok("blue")) + 8}
    assert budgets["colour"] < budgets["caption"] == answer_budget(tok, [i["reference"] for i in items])
    assert task_budgets(tok, items, 5) == {"caption": 5, "colour": 5}

    requests = [Request(messages=[{"role": "user", "content": "q" * (i + 1)}], max_new_tokens=budgets[x["task"]])
                for i, x in enumerate(items)] + [Request(messages=[{"role": "user", "content": "q"}])]
    got = budget_batches(list(range(5)), requests, batch_size=1)
    assert got == [(budgets["colour"], [2]), (budgets["colour"], [0]), (budgets["caption"], [3]),
                   (budgets["caption"], [1]), (None, [4])]


def test_eval_items_leave_out_a_box_off_its_image_as_training_does(caplog):
    """A shard packed before boxes were checked may hold a box off its image: training's collator skips it, and so
    do the eval items when boxes are converted (the Answerer would refuse it); without conversion it stays."""
    import io
    import logging

    from PIL import Image

    from vlora.evaluate import eval_items

    png = io.BytesIO()
    Image.new("RGB", (40, 30), "white").save(png, "PNG")

    def sample(key: str, box: str) -> dict:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where is the cat?"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": box}]}]
        return {"__key__": key, "json": json.dumps({"messages": messages}).encode(), "0.png": png.getvalue()}

    samples = [sample("on", "<|box_start|>(1,2),(40,30)<|box_end|>"), sample("off", '{"bbox_2d": [1, 2, 41, 30]}')]
    vlora_log = logging.getLogger("vlora")  # it does not propagate once a run in this process set up logging
    vlora_log.addHandler(caplog.handler)
    try:
        items, _ = eval_items(samples, check_boxes=True)
    finally:
        vlora_log.removeHandler(caplog.handler)
    assert [i["key"] for i in items] == ["on"] and items[0]["reference"] == "<|box_start|>(1,2),(40,30)<|box_end|>"
    assert "eval: off left out: bad_box: message 1 (assistant): box" in caplog.text
    assert [i["key"] for i in eval_items(samples)[0]] == ["on", "off"]


def test_eval_takes_the_runs_pixels_and_box_convention_from_its_config(tmp_path):
    from vlora.evaluate import run_data

    (tmp_path / "adapter").mkdir()
    (tmp_path / "config.yaml").write_text("data:\n  min_pixels: 3136\n  max_pixels: 12544\n  boxes: as_written\n")
    assert run_data(str(tmp_path / "adapter")) == {"min_pixels": 3136, "max_pixels": 12544, "boxes": "as_written"}
    (tmp_path / "config.yaml").write_text("data:\n  max_pixels: 12544\n  boxes: sideways\n")  # not a value: ignored
    assert run_data(str(tmp_path / "adapter")) == {"max_pixels": 12544}
    assert run_data(None) == {}


def test_in_training_scores_boxes_by_overlap_beside_exact_match(tiny_model_dir):
    """heldout_exact_match: exact match over every item, and over the items whose reference holds a box the share of
    answers whose boxes overlap it at IoU 0.5; None for that when no reference holds one."""
    from types import SimpleNamespace

    from vlora.evaluate import heldout_exact_match
    from vlora.model import load_processor

    answers = {"a": "red", "b": "<|box_start|>(0,0),(10,14)<|box_end|>", "c": "<|box_start|>(0,0),(10,30)<|box_end|>",
               "d": "nothing"}
    references = {"a": "red", "b": "<|box_start|>(0,0),(10,10)<|box_end|>", "c": "<|box_start|>(0,0),(10,10)<|box_end|>",
                  "d": '{"bbox_2d": [0, 0, 10, 10]}'}
    answerer = SimpleNamespace(model=torch.nn.Linear(1, 1), processor=load_processor(str(tiny_model_dir)),
                               answer=lambda requests, **_: [answers[r.id] for r in requests])
    items = [{"key": k, "task": "t", "messages": [{"role": "user", "content": "?"}], "images": [], "reference": r}
             for k, r in references.items()]
    em, boxes = heldout_exact_match(answerer, items, batch_size=2, lockstep=False)
    assert (em, boxes) == (25.0, pytest.approx(100 / 3))  # b overlaps at 10/14; c at 1/3; d has no box
    assert heldout_exact_match(answerer, items[:1], batch_size=2, lockstep=False) == (100.0, None)
