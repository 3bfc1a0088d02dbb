"""The eval report: `report.json` (the numbers) and `report.html` (one self-contained page to look at).

`vlora eval` scores a fine-tuned model on held-out image+question items and hands `write_report` one dict:

    {"model": str, "adapter": str | None, "shards": str, "n_items": int, "created": str,
     "heldout_loss": {"adapter": float | None, "base": float | None},  # per supervised token; may be absent/None
     "tokenizer": "ptb" | "simple",        # the caption tokenizer BLEU-4 / CIDEr-D used
     "task_source": "label" | "answer length" | "mixed",  # where an item's task came from
     "systems": ["adapter", "base", "majority"],  # column order; any subset
     "scores": {system: {"tasks": {task: {"n": int, "exact_match": float (0-100), "bleu4"?: float, "cider_d"?: float,
                                     "box_acc50"?: float}},
                         "all": {"n": int, "exact_match": float}}},
     "items": [{"key": str, "task": str, "prompt": str, "reference": str,
                "image": bytes | None,            # the raw file bytes of the item's first image
                "answers": {system: str}, "correct": {system: bool}}]}

report.json holds that dict as sorted, indented UTF-8 JSON, with every item's "image" left out (non-finite floats
become null). report.html is one file that needs no network and no JavaScript: inline CSS, thumbnails as data URIs.
It shows a line of context, the metric table (a row per task, sorted, then "all"; per system its exact match in %,
and BLEU-4 / CIDEr-D or boxes at IoU 0.5 where a task has them; the best system of each row and metric
highlighted), the held-out loss, then up to `max_items` items as cards: the wrong answers of the first system
("adapter" when present) first, then the rest, each group in key order. Numbers are shown as the page formats
them: percentages with one decimal, BLEU-4 and CIDEr-D with two (either scale reads well), losses with three.
Every text is escaped; answers longer than 400 characters are cut in the page (report.json keeps them whole).
Both files are written atomically.

Stdlib and Pillow only, Pillow imported where used, so the CLI can import this module cheaply.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from pathlib import Path

MAX_ITEMS = 60
ANSWER_CHARS = 400  # an answer longer than this is cut in the page
PNG_SOURCE_SIDE = 256  # sources up to this size (both sides) become PNG thumbnails, larger ones JPEG
METRICS = (("exact_match", "exact match (%)", 1), ("bleu4", "BLEU-4", 2), ("cider_d", "CIDEr-D", 2),
           ("box_acc50", "boxes at IoU 0.5 (%)", 1))
TASK_SOURCES = {
    "label": "each item's own label",
    "answer length": "the reference answer's length (one word: short answer, more: caption)",
    "mixed": "labels where items have them, the reference answer's length otherwise",
}

CSS = """
body{font:14px/1.4 "DejaVu Sans",Arial,sans-serif;color:#222;margin:18px 24px;background:#fafafa}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:20px 0 6px}
.ctx,.note,.loss{color:#555;margin:2px 0}.ctx b{color:#222}
table.metrics{border-collapse:collapse;background:#fff;margin-top:10px}
.metrics th,.metrics td{border:1px solid #ddd;padding:3px 9px;text-align:right}
.metrics th{background:#eee;font-weight:600}.metrics td.task,.metrics th.task{text-align:left}
.metrics .g{border-left:2px solid #999}.metrics tr.all td{font-weight:700;border-top:2px solid #999}
.metrics td.best{background:#d9f2d9}.metrics td.na{color:#aaa}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(360px,1fr));gap:10px}
.card{display:flex;gap:10px;background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px}
.card.wrong{border-left:4px solid #c62828}
.thumb{flex:0 0 160px;height:160px;display:flex;align-items:center;justify-content:center;background:#f0f0f0}
.thumb img{max-width:160px;max-height:160px;outline:1px solid #ccc}.thumb.none{color:#999;font-size:12px}
.body{min-width:0;flex:1;overflow-wrap:anywhere}
.meta{font-size:12px;color:#777}.meta .task{background:#e8eaf6;color:#283593;border-radius:3px;padding:0 5px}
.prompt{white-space:pre-wrap;margin:3px 0}.ref{color:#444;margin-bottom:3px}
ul.answers{list-style:none;margin:0;padding:0}ul.answers li{margin:1px 0;white-space:pre-wrap}
li.ok{color:#1b5e20}li.bad{color:#c62828}li.na{color:#888}ul.answers b{color:#222;font-weight:600}
"""


def thumbnail_data_uri(image_bytes: bytes | None, max_side: int = 160) -> str | None:
    """A `data:image/...;base64,...` thumbnail whose longer side is `max_side`; None for a missing or broken image.

    Larger images are shrunk (Lanczos); smaller ones are enlarged with NEAREST, so a 112-pixel demo image shows as
    crisp blocks rather than a blur or a postage stamp. Sources up to 256x256 become PNG, larger ones (photos)
    JPEG at quality 85, on white where they were transparent. Whatever Pillow can't decode gives None.
    """
    if not image_bytes:
        return None
    try:
        from PIL import Image

        with Image.open(io.BytesIO(image_bytes)) as im:
            im.load()
            w, h = im.size
            small = w <= PNG_SOURCE_SIDE and h <= PNG_SOURCE_SIDE
            scale = max_side / max(w, h)
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            if im.mode not in ("RGB", "RGBA", "L"):
                im = im.convert("RGBA")
            resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS
            thumb = im.resize(size, resample)
        buf = io.BytesIO()
        if small:
            thumb.save(buf, "PNG")
            mime = "png"
        else:
            if thumb.mode == "RGBA":
                flat = Image.new("RGB", thumb.size, (255, 255, 255))
                flat.paste(thumb, mask=thumb.getchannel("A"))
                thumb = flat
            thumb.convert("RGB").save(buf, "JPEG", quality=85)
            mime = "jpeg"
    except Exception:  # noqa: BLE001 - a broken image must never break the report
        return None
    return f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def write_report(report: dict, out_dir, max_items: int = MAX_ITEMS) -> tuple[Path, Path]:
    """Write out_dir/report.json and out_dir/report.html (each atomically); return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out / "report.json", out / "report.html"
    _write_atomic(json_path, report_json(report))
    _write_atomic(html_path, render_html(report, max_items))
    return json_path, html_path


def report_json(report: dict) -> str:
    """The report as JSON text: sorted keys, indent 1, UTF-8 as is, items without their image bytes."""
    data = dict(report)
    data["items"] = [{k: v for k, v in item.items() if k != "image"} for item in report.get("items", [])]
    return json.dumps(_finite(data), sort_keys=True, indent=1, ensure_ascii=False) + "\n"


def _finite(value):
    """`value` with NaN and infinities replaced by None, so the JSON is strict."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def render_html(report: dict, max_items: int = MAX_ITEMS) -> str:
    """The whole page as one string."""
    title = f"vlora eval: {report.get('model', '?')}"
    if report.get("adapter"):
        title += f" + {report['adapter']}"
    parts = [
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>", _context_line(report),
        _metric_table(report), _loss_line(report), _items_section(report, max_items),
        "</body></html>\n",
    ]
    return "\n".join(p for p in parts if p)


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value, digits: int) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "–"
    return f"{value:.{digits}f}"


def _context_line(report: dict) -> str:
    tok = {"ptb": "PTB tokenizer", "simple": "simple tokenizer"}.get(report.get("tokenizer"), report.get("tokenizer"))
    source = report.get("task_source")
    bits = [
        f"model <b>{_e(report.get('model', '?'))}</b>",
        f"adapter <b>{_e(report.get('adapter') or 'none')}</b>",
        f"shards <b>{_e(report.get('shards', '?'))}</b>",
        f"<b>{_e(report.get('n_items', len(report.get('items', []))))}</b> items",
    ]
    if tok:
        bits.append(f"captions tokenized with the {_e(tok)} for BLEU-4 / CIDEr-D")
    if source:
        bits.append(f"task from {_e(TASK_SOURCES.get(source, source))}")
    if report.get("created"):
        bits.append(f"created {_e(report['created'])}")
    return '<p class="ctx">' + " · ".join(bits) + "</p>"


def _task_order(report: dict) -> list[str]:
    tasks = set()
    for scores in report.get("scores", {}).values():
        tasks.update(scores.get("tasks", {}))
    tasks.discard("all")
    return sorted(tasks) + ["all"]


def _cell(scores: dict, system: str, task: str) -> dict:
    per = scores.get(system, {})
    return per.get("all", {}) if task == "all" else per.get("tasks", {}).get(task, {})


def _metric_table(report: dict) -> str:
    """A row per task (sorted, "all" last), a column group per metric, a column per system in each group."""
    systems, scores = list(report.get("systems", [])), report.get("scores", {})
    if not systems or not scores:
        return '<p class="note">No scores.</p>'
    tasks = _task_order(report)
    cells = {(t, s): _cell(scores, s, t) for t in tasks for s in systems}
    metrics = [m for m in METRICS if m[0] == "exact_match" or any(m[0] in c for c in cells.values())]
    head1 = '<tr><th class="task" rowspan="2">task</th><th rowspan="2">n</th>' + "".join(
        f'<th class="g" colspan="{len(systems)}">{_e(label)}</th>' for _, label, _ in metrics) + "</tr>"
    head2 = "<tr>" + "".join(('<th class="g">' if i == 0 else "<th>") + f"{_e(s)}</th>"
                             for _ in metrics for i, s in enumerate(systems)) + "</tr>"
    rows = []
    for task in tasks:
        n = next((c["n"] for s in systems if "n" in (c := cells[task, s])), None)
        tds = [f'<td class="task">{_e(task)}</td><td>{_e(n if n is not None else "–")}</td>']
        for metric, _, digits in metrics:
            values = {s: cells[task, s].get(metric) for s in systems}
            shown = {s: _fmt(v, digits) for s, v in values.items()}
            best = max((float(shown[s]) for s in systems if shown[s] != "–"), default=None)
            for i, s in enumerate(systems):
                cls = ["g"] if i == 0 else []
                cls += ["na"] if shown[s] == "–" else (["best"] if float(shown[s]) == best else [])
                tds.append(f'<td class="{" ".join(cls)}">{shown[s]}</td>' if cls else f"<td>{shown[s]}</td>")
        rows.append(('<tr class="all">' if task == "all" else "<tr>") + "".join(tds) + "</tr>")
    return ('<table class="metrics"><thead>' + head1 + head2 + "</thead><tbody>" + "".join(rows)
            + '</tbody></table>\n<p class="note">Best system per row and metric highlighted.</p>')


def _loss_line(report: dict) -> str:
    loss = report.get("heldout_loss") or {}
    shown = [f"{_e(s)} <b>{_fmt(v, 3)}</b>" for s, v in loss.items() if _fmt(v, 3) != "–"]
    if not shown:
        return ""
    return '<p class="loss">Held-out loss per supervised token: ' + " · ".join(shown) + "</p>"


def first_system(report: dict) -> str | None:
    """The system whose wrong answers come first: "adapter" when present, else the first column."""
    systems = list(report.get("systems", []))
    return "adapter" if "adapter" in systems else (systems[0] if systems else None)


def ordered_items(report: dict) -> list[dict]:
    """Items wrong for the first system first (an item without its verdict counts as wrong), then the rest; each
    group by key."""
    first = first_system(report)
    return sorted(report.get("items", []),
                  key=lambda it: (bool(it.get("correct", {}).get(first, False)), str(it.get("key", ""))))


def _items_section(report: dict, max_items: int) -> str:
    items = ordered_items(report)
    shown = items[:max(0, max_items)]
    first = first_system(report)
    n_wrong = sum(not it.get("correct", {}).get(first, False) for it in items) if first else 0
    note = (f"Showing {len(shown)} of {len(items)} items"
            + (f": the {n_wrong} that {_e(first)} got wrong first, then the rest, each by key." if first else "."))
    cards = "\n".join(_card(it, report.get("systems", []), first) for it in shown)
    return f'<h2>Items</h2><p class="note">{note}</p>\n<div class="cards">\n{cards}\n</div>'


def _card(item: dict, systems: list[str], first: str | None) -> str:
    key = str(item.get("key", ""))
    uri = thumbnail_data_uri(item.get("image"))
    thumb = (f'<div class="thumb"><img src="{uri}" alt="image of {_e(key)}"></div>' if uri
             else '<div class="thumb none">no image</div>')
    correct, answers = item.get("correct", {}), item.get("answers", {})
    lis = []
    for s in systems:
        verdict = correct.get(s)
        cls, mark = {True: ("ok", "✓"), False: ("bad", "✗")}.get(verdict, ("na", "·"))
        text = str(answers.get(s, "–"))
        if len(text) > ANSWER_CHARS:
            text = text[:ANSWER_CHARS] + "…"
        lis.append(f'<li class="{cls}">{mark} <b>{_e(s)}:</b> {_e(text)}</li>')
    wrong = " wrong" if first and not correct.get(first, False) else ""
    return (f'<article class="card{wrong}" data-key="{_e(key)}">{thumb}<div class="body">'
            f'<div class="meta">{_e(key)} <span class="task">{_e(item.get("task", "?"))}</span></div>'
            f'<div class="prompt">{_e(item.get("prompt", ""))}</div>'
            f'<div class="ref">reference: <b>{_e(item.get("reference", ""))}</b></div>'
            f'<ul class="answers">{"".join(lis)}</ul></div></article>')
