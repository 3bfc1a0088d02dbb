"""`vlora eval`: does the adapter make the model answer better? Held-out loss, and answers scored per task.

For the first `--max-samples` samples of a shard folder (packed by `vlora pack`), in order:
  - the held-out loss per supervised token (the training loss, on answers only), with the adapter and without;
  - the last assistant turn of each sample is generated (greedy; earlier turns stay as written) by the adapter,
    by the base alone, and answered by the majority baseline (each task's most frequent reference answer);
  - answers are scored per task by vlora.scoring: normalised exact match for every task; BLEU-4 and CIDEr-D for
    caption tasks. A sample's task is the `task` label stored at packing, else told by its answer's length.
Writes report.json and report.html (vlora.report) to `--out`, and prints the table.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from vlora import families
from vlora.errors import VloraError
from vlora.generate import BASE, Answerer, Request, budget_batches, load_for_inference, prompt_text, split_answer, vision_dtype

ADAPTER = "adapter"  # the adapter's name in the model and in the report

log = logging.getLogger("vlora")


def read_samples(shards: str, max_samples: int) -> list[dict]:
    """The first `max_samples` samples of a shard folder (or URL), in shard order, as webdataset dicts."""
    from vlora.data import remote, stream

    if not remote.is_remote(shards) and not (Path(shards) / "manifest.json").is_file():
        raise VloraError(f"--shards {shards}: no manifest.json there; give a folder written by `vlora pack`")
    samples = list(stream.read_samples(shards, max_samples))
    if not samples:
        raise VloraError(f"--shards {remote.redact(shards)}: no samples")
    return samples


def eval_items(samples: list[dict], *, check_boxes: bool = False) -> tuple[list[dict], str]:
    """Per sample: key, task, prompt messages, reference, images; and where the tasks came from.

    `check_boxes` (boxes in image pixels, converted for the model): a sample with a box that is not on its image
    (a shard packed before vlora checked boxes) is left out with a warning, as training's collator skips it."""
    from vlora.data.collate import sample_images
    from vlora.scoring import task_of

    items, sources = [], set()
    for s in samples:
        meta = json.loads(s["json"])
        if check_boxes and (why := bad_box(meta["messages"], sample_images(s))):
            log.warning("eval: %s left out: %s", s.get("__key__", "a sample"), why)
            continue
        messages, reference = split_answer(meta["messages"])
        task, how = task_of(meta.get("task"), reference)
        sources.add(how)
        items.append({"key": s.get("__key__", ""), "task": task, "messages": messages, "reference": reference,
                      "images": sample_images(s)})
    return items, sources.pop() if len(sources) == 1 else "mixed"


def bad_box(messages: list[dict], images: list[bytes]) -> str | None:
    """Why a box of `messages` is not on its image (vlora.data.grounding.check_boxes), or None."""
    import io

    from PIL import Image

    from vlora.data.formats import RecordError
    from vlora.data.grounding import check_boxes

    if not any(("<|box_" in t or "_2d" in t) for t in map(json.dumps, messages)):
        return None  # no box: the images need not be opened
    try:
        check_boxes(messages, [Image.open(io.BytesIO(b)).size for b in images])
    except RecordError as e:
        return str(e)
    return None


@torch.no_grad()
def heldout_loss(model, collator, encoded: list[dict], batch_size: int) -> float:
    """Summed cross-entropy over the supervised tokens / their count, with whatever adapter is active, on samples
    already encoded (`collator.encode`: encoding is most of the cost on a small model, so it is done once)."""
    from vlora.model import SupervisedLoss

    loss_model = SupervisedLoss(model).eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for k in range(0, len(encoded), batch_size):
        batch = collator.collate(encoded[k:k + batch_size])
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        total += loss_model(batch).double().item()
        count += batch["loss_index"].numel()
    return total / count if count else float("nan")


def answers_by_system(answerer: Answerer, items: list[dict], systems: list[str], budgets: dict[str, int],
                      **gen) -> dict[str, list[str]]:
    """{system: answers in item order} for the model systems (the adapter and / or the base); each item generates
    at most its task's budget (`budgets`)."""
    out = {}
    for system in systems:
        name = ADAPTER if system == "adapter" else BASE
        requests = [Request(messages=i["messages"], images=i["images"], adapter=name, id=i["key"],
                            max_new_tokens=budgets[i["task"]]) for i in items]
        out[system] = answerer.run(requests, **gen)
    return out


def answer_budget(tokenizer, references: list[str]) -> int:
    """Tokens to generate when none are given: twice the longest reference, plus 8 (room for a longer phrasing of
    a right answer and the end of turn), at most 256. An answer longer than that is wrong for exact match anyway,
    and the base model, which rarely stops by itself, then costs a few tokens per item instead of 32 or more."""
    longest = max((len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references), default=12)
    return min(256, 2 * longest + 8)


def task_budgets(tokenizer, items: list[dict], max_new_tokens: int | None = None) -> dict[str, int]:
    """{task: tokens to generate}: `max_new_tokens` for every task when given, else each task's `answer_budget`
    (a one-word VQA answer then never generates a caption's length)."""
    tasks = sorted({i["task"] for i in items})
    if max_new_tokens:
        return dict.fromkeys(tasks, max_new_tokens)
    return {t: answer_budget(tokenizer, [i["reference"] for i in items if i["task"] == t]) for t in tasks}


def evaluate(model_path: str, adapter: str | None, shards: str, out: str, *, max_samples: int = 256,
             with_base: bool = True, quant: str = "nf4", dtype: str = "auto", device: str | None = None,
             batch_size: int = 16, max_new_tokens: int | None = None, min_pixels: int, max_pixels: int,
             boxes: str = "original") -> dict:
    """Score `adapter` (and the base alone, and the majority baseline) on `shards`; write the report; return it.
    `boxes`: the run's data.boxes (original: in image pixels, converted as training converted them)."""
    from vlora.data.collate import Collator
    from vlora.report import write_report
    from vlora.scoring import exact_match, majority_items, score_items

    start = time.time()
    samples = read_samples(shards, max_samples)
    from vlora.data.manifest import read_manifest

    # Boxes as training converted them: not where the run said they are already in the model's convention, nor
    # where the shards were packed so (--boxes as_written).
    mode = "as_written" if read_manifest(shards).get("checks", {}).get("boxes") == "as_written" else boxes
    items, task_source = eval_items(samples, check_boxes=mode == "original")
    model, processor = load_for_inference(model_path, {ADAPTER: adapter} if adapter else {}, quant=quant,
                                          dtype=dtype, device=device)
    systems = (["adapter"] if adapter else []) + (["base"] if with_base or not adapter else [])
    convention = families.of_config(model.config).box_convention(mode)
    collator = Collator(processor, min_pixels=min_pixels, max_pixels=max_pixels, max_length=1 << 30,
                        pixel_dtype=vision_dtype(model), boxes=convention)
    # Answers are scored against references in the image's pixels: their boxes are mapped back first.
    answerer = Answerer(model, processor, min_pixels=min_pixels, max_pixels=max_pixels, boxes=convention)
    encoded = [x for x in map(collator.encode, samples) if x is not None]
    losses = {}
    for system in systems:
        with answerer.use_adapter(ADAPTER if system == "adapter" else BASE):
            losses[system] = heldout_loss(model, collator, encoded, batch_size)
    budgets = task_budgets(processor.tokenizer, items, max_new_tokens)
    answers = answers_by_system(answerer, items, systems, budgets, batch_size=batch_size)
    scored = {s: [{"task": i["task"], "reference": i["reference"], "prediction": a}
                  for i, a in zip(items, answers[s])] for s in systems}
    scored["majority"] = majority_items(next(iter(scored.values())))
    scores = {s: score_items(v) for s, v in scored.items()}
    report = {
        "model": model_path, "adapter": adapter, "shards": shards, "n_items": len(items),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"), "heldout_loss": losses, "max_new_tokens": budgets,
        "tokenizer": next(iter(scores.values()))["tokenizer"], "task_source": task_source,
        "systems": [*systems, "majority"], "scores": {s: {"tasks": v["tasks"], "all": v["all"]} for s, v in scores.items()},
        "seconds": round(time.time() - start, 1),
        "items": [{"key": i["key"], "task": i["task"], "prompt": prompt_text(i["messages"]), "reference": i["reference"],
                   "image": i["images"][0] if i["images"] else None,
                   "answers": {s: scored[s][n]["prediction"] for s in scored},
                   "correct": {s: exact_match(scored[s][n]["prediction"], i["reference"]) > 0 for s in scored}}
                  for n, i in enumerate(items)],
    }
    write_report(report, out)
    return report


# ---------------------------------------------------------------------------------------------------------------
# During training (run.eval_generate): a few held-out items answered at each evaluation


def heldout_items(shards: str, n: int, *, rank: int, world_size: int, check_boxes: bool = False) -> list[dict]:
    """This rank's share (every world_size-th) of the first `n` samples of `shards`, as eval items."""
    samples = read_samples(shards, n)
    return eval_items([s for i, s in enumerate(samples) if i % world_size == rank], check_boxes=check_boxes)[0]


@torch.no_grad()
def heldout_exact_match(answerer: Answerer, items: list[dict], *, batch_size: int, lockstep: bool,
                        max_new_tokens: int | None = None) -> tuple[float, float | None]:
    """Exact match (%) of greedy answers over every rank's items, with the model as it is now; and over the items
    whose reference holds a box, the share whose boxes overlap it at IoU 0.5 (None when no item has one).

    `lockstep` (ZeRO-3, every forward gathers weights with collectives): every rank runs as many batches as the
    rank with the most, repeating its own last batch (not counted), and generate runs with synced_gpus, so the
    ranks that finish first keep stepping until all do. `max_new_tokens`: by default each task's `answer_budget`.
    """
    from vlora.data.grounding import boxes_in
    from vlora.distributed import all_reduce_max, all_reduce_sum
    from vlora.scoring import box_match, exact_match

    device = next(answerer.model.parameters()).device
    budgets = task_budgets(answerer.processor.tokenizer, items, max_new_tokens)
    requests = [Request(messages=i["messages"], images=i["images"], adapter="", id=i["key"],
                        max_new_tokens=budgets[i["task"]]) for i in items]
    # Under lockstep the budgets may differ between ranks: generate's synced_gpus keeps a rank that is done
    # stepping until every rank is; only the number of generate calls must agree.
    batches = budget_batches(list(range(len(items))), requests, batch_size)
    n = len(batches)
    if lockstep:
        n = int(all_reduce_max(torch.tensor([n], device=device)).item())
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # exact matches, items, box matches, boxed items
    for b in range(n):
        budget, batch = batches[min(b, len(batches) - 1)]
        answers = answerer.answer([requests[i] for i in batch], max_new_tokens=budget)
        if b < len(batches):
            for answer, i in zip(answers, batch):
                reference = items[i]["reference"]
                boxed = bool(boxes_in(reference))
                sums += torch.tensor([exact_match(answer, reference), 1.0,
                                      box_match(answer, reference) if boxed else 0.0, float(boxed)], device=device)
    all_reduce_sum(sums)
    em = 100.0 * (sums[0] / sums[1]).item() if sums[1] > 0 else float("nan")
    return em, (100.0 * (sums[2] / sums[3]).item() if sums[3] > 0 else None)


def format_table(report: dict) -> list[str]:
    """The exact-match table as printed: one row per task, one column per system (and BLEU-4 / CIDEr-D, or the
    share of answers whose boxes overlap the reference's at IoU 0.5)."""
    systems = report["systems"]
    tasks = sorted(report["scores"][systems[0]]["tasks"])
    lines = [f"{'task':<12}{'n':>5}  " + "".join(f"{s + ' EM':>14}" for s in systems)]
    for task in [*tasks, "all"]:
        row = [report["scores"][s]["tasks"].get(task) if task != "all" else report["scores"][s]["all"] for s in systems]
        line = f"{task:<12}{row[0]['n']:>5}  " + "".join(f"{r['exact_match']:>13.1f}%" for r in row)
        extra = [f"{s} BLEU-4 {r['bleu4']:.1f} CIDEr-D {r['cider_d']:.3f}" for s, r in zip(systems, row)
                 if "cider_d" in r and s != "majority"]
        extra += [f"{s} boxes at IoU 0.5 {r['box_acc50']:.1f}%" for s, r in zip(systems, row)
                  if "box_acc50" in r and s != "majority"]
        lines.append(line + ("   " + "; ".join(extra) if extra else ""))
    return lines


def run_data(adapter: str | None) -> dict:
    """The pixel budget and box convention the adapter was trained with, from its run's config.yaml
    (runs/NAME/adapter/../), if any."""
    import yaml

    config = Path(adapter).parent / "config.yaml" if adapter else None
    if config is None or not config.is_file():
        return {}
    data = (yaml.safe_load(config.read_text()) or {}).get("data") or {}
    found = {k: data[k] for k in ("min_pixels", "max_pixels") if isinstance(data.get(k), int)}
    return found | ({"boxes": data["boxes"]} if data.get("boxes") in families.BOX_MODES else {})


def cmd_eval(args) -> int:
    from vlora.config import DataArgs

    settings = {"min_pixels": DataArgs.min_pixels, "max_pixels": DataArgs.max_pixels, "boxes": DataArgs.boxes,
                **run_data(args.adapter)}
    given = (("min_pixels", args.min_pixels), ("max_pixels", args.max_pixels), ("boxes", args.boxes))
    settings.update({k: v for k, v in given if v})
    out = args.out or str(Path(args.adapter).parent / "eval" if args.adapter else "eval")
    report = evaluate(args.model, args.adapter, args.shards, out, max_samples=args.max_samples,
                      with_base=not args.no_base, quant=args.quant, dtype=args.dtype, device=args.device,
                      batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, **settings)
    print_report(report, args.shards, out)
    return 0


def print_report(report: dict, shards: str, out) -> None:
    """The report as `vlora eval` prints it: held-out losses, then the exact-match table, then where the page is."""
    losses = ", ".join(f"{s} {v:.4f}" for s, v in report["heldout_loss"].items())
    print(f"held-out loss per supervised token: {losses}")
    tokenizer = f"; captions tokenized by {report['tokenizer']}" if report["tokenizer"] else ""
    print(f"exact match (%) on {report['n_items']} samples of {shards}; tasks from {report['task_source']}"
          f"{tokenizer}:")
    for line in format_table(report):
        print("  " + line)
    print(f"report: {Path(out) / 'report.html'} ({report['seconds']:.0f} s)", flush=True)


def add_eval_parser(sub) -> None:
    e = sub.add_parser("eval", help="score an adapter against its base and the majority answer; write report.html")
    e.add_argument("--model", required=True, help="the base model folder (or hub id)")
    e.add_argument("--adapter", default=None, help="the adapter folder (runs/NAME/adapter); none: the base alone")
    e.add_argument("--shards", required=True, help="a held-out shard folder (vlora pack --out)")
    e.add_argument("--out", default=None, help="where report.json / report.html go (default: beside the adapter, eval/)")
    e.add_argument("--max-samples", type=int, default=256)
    e.add_argument("--no-base", action="store_true", help="skip the base model's answers (half the time)")
    e.add_argument("--quant", default="nf4", choices=["nf4", "fp4", "none"], help="the base's LLM linears, as trained")
    e.add_argument("--dtype", default="auto", help="auto | fp32 | bf16 | fp16")
    e.add_argument("--device", default=None)
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--max-new-tokens", type=int, default=None,
                   help="default, per task: twice its longest reference answer's tokens + 8, at most 256")
    e.add_argument("--min-pixels", type=int, default=None, help="default: the run's data.min_pixels (its config.yaml)")
    e.add_argument("--max-pixels", type=int, default=None, help="default: the run's data.max_pixels (its config.yaml)")
    e.add_argument("--boxes", choices=families.BOX_MODES, default=None,
                   help="grounding boxes in the shards: in image pixels, converted per family (original) or already "
                        "in the model's convention (as_written); default: the run's data.boxes (its config.yaml)")
    e.set_defaults(func=cmd_eval)
