"""The eval report: report.json round-trips the numbers without image bytes, report.html shows the table as
formatted, wrong answers first, everything escaped, thumbnails decodable, and renders in a real browser."""

import base64
import html
import io
import json
import re
import shutil
import subprocess

import pytest
from PIL import Image, ImageDraw

from vlora.report import render_html, thumbnail_data_uri, write_report

SYSTEMS = ["adapter", "base", "majority"]


def png(size=(112, 112), colour=(220, 30, 30), background=(255, 255, 255)) -> bytes:
    img = Image.new("RGB", size, background)
    ImageDraw.Draw(img).ellipse((10, 10, size[0] // 2, size[1] // 2), fill=colour)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def item(key, task, reference, answers, image=b"png"):
    return {"key": key, "task": task, "prompt": f"<image>What {task}?", "reference": reference,
            "image": png() if image == b"png" else image, "answers": answers,
            "correct": {s: a == reference for s, a in answers.items()}}


def sample_report() -> dict:
    items = [
        item("k3", "colour", "red", {"adapter": "red", "base": "blue", "majority": "red"}),
        item("k1", "colour", "red", {"adapter": "green", "base": "red", "majority": "red"}),
        item("k5", "caption", "Two red circles.", {"adapter": "Two red circles.", "base": "<script>alert(1)</script>",
                                                   "majority": "One blue square."}),
        item("k2", "shape", "circle", {"adapter": "circle", "base": "square", "majority": "square"}, image=None),
        item("k4", "shape", "square", {"adapter": "circle", "base": "square", "majority": "square"},
             image=b"\x89PNG\r\n\x1a\n broken"),
    ]
    scores = {
        "adapter": {"tasks": {"colour": {"n": 2, "exact_match": 50.0}, "shape": {"n": 2, "exact_match": 50.0},
                              "caption": {"n": 1, "exact_match": 100.0, "bleu4": 41.2345, "cider_d": 1.8432}},
                    "all": {"n": 5, "exact_match": 60.0}},
        "base": {"tasks": {"colour": {"n": 2, "exact_match": 50.0}, "shape": {"n": 2, "exact_match": 50.0},
                           "caption": {"n": 1, "exact_match": 0.0, "bleu4": 3.1, "cider_d": 0.05}},
                 "all": {"n": 5, "exact_match": 40.0}},
        "majority": {"tasks": {"colour": {"n": 2, "exact_match": 100.0}, "shape": {"n": 2, "exact_match": 50.0},
                               "caption": {"n": 1, "exact_match": 0.0}},
                     "all": {"n": 5, "exact_match": 2 / 3 * 100}},
    }
    return {"model": "Qwen/Qwen2.5-VL-3B-Instruct", "adapter": "runs/demo/step_000400", "shards": "shards/demo/val",
            "n_items": len(items), "created": "2025-01-01T00:00:00Z",
            "heldout_loss": {"adapter": 0.21349, "base": None},
            "tokenizer": "ptb", "task_source": "label", "systems": SYSTEMS, "scores": scores, "items": items}


def table_rows(page: str) -> dict[str, list[str]]:
    """task -> the texts of its row's cells, as the page shows them."""
    table = page[page.index('<table class="metrics">'):page.index("</table>")]
    rows = {}
    for row in re.findall(r"<tr[^>]*>(.*?)</tr>", table.split("<tbody>")[1]):
        cells = [html.unescape(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row)]
        rows[cells[0]] = cells[1:]
    return rows


def card_keys(page: str) -> list[str]:
    return [html.unescape(k) for k in re.findall(r'<article class="card[^"]*" data-key="([^"]*)"', page)]


def test_json_round_trips_numbers_and_leaves_out_images(tmp_path):
    report = sample_report()
    json_path, html_path = write_report(report, tmp_path / "out")
    assert (json_path, html_path) == (tmp_path / "out/report.json", tmp_path / "out/report.html")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.html", "report.json"]  # no temp left
    data = json.loads(json_path.read_text(encoding="utf-8"))
    assert data["scores"] == report["scores"]
    assert data["heldout_loss"] == {"adapter": 0.21349, "base": None}
    assert data["systems"] == SYSTEMS and data["n_items"] == 5 and data["tokenizer"] == "ptb"
    assert [it["key"] for it in data["items"]] == ["k3", "k1", "k5", "k2", "k4"]  # the input order, untouched
    for got, want in zip(data["items"], report["items"]):
        assert "image" not in got
        assert got == {k: v for k, v in want.items() if k != "image"}
    assert "image" in report["items"][0]  # the caller's dict is not modified
    want = json.dumps(data, sort_keys=True, indent=1, ensure_ascii=False) + "\n"
    assert json_path.read_text(encoding="utf-8") == want


def test_json_keeps_unicode_and_turns_nan_into_null(tmp_path):
    report = sample_report()
    report["items"][0]["answers"]["adapter"] = "rouge – ✓"
    report["heldout_loss"]["base"] = float("nan")
    json_path, _ = write_report(report, tmp_path)
    text = json_path.read_text(encoding="utf-8")
    assert "rouge – ✓" in text and "NaN" not in text
    assert json.loads(text)["heldout_loss"]["base"] is None


def test_table_shows_the_numbers_as_formatted_and_marks_the_best(tmp_path):
    _, html_path = write_report(sample_report(), tmp_path)
    page = html_path.read_text(encoding="utf-8")
    rows = table_rows(page)
    assert list(rows) == ["caption", "colour", "shape", "all"]  # sorted, "all" last
    # n, then exact match per system, BLEU-4 per system, CIDEr-D per system
    assert rows["caption"] == ["1", "100.0", "0.0", "0.0", "41.23", "3.10", "–", "1.84", "0.05", "–"]
    assert rows["colour"] == ["2", "50.0", "50.0", "100.0"] + ["–"] * 6
    assert rows["all"] == ["5", "60.0", "40.0", "66.7"] + ["–"] * 6
    assert '<tr class="all">' in page
    best = re.findall(r'<tr>(<td class="task">colour</td>.*?)</tr>', page)[0]
    assert re.findall(r'class="[^"]*best[^"]*">([^<]*)<', best) == ["100.0"]
    shape = re.findall(r'<tr>(<td class="task">shape</td>.*?)</tr>', page)[0]
    assert re.findall(r'class="[^"]*best[^"]*">([^<]*)<', shape) == ["50.0"] * 3  # ties are all best
    assert "Held-out loss per supervised token: adapter <b>0.213</b>" in page and "base <b>" not in page
    assert "PTB tokenizer" in page and "each item&#x27;s own label" in page


def test_table_without_base_nor_caption_metrics():
    report = sample_report()
    report["systems"] = ["adapter", "majority"]
    for s in report["scores"].values():
        s["tasks"]["caption"].pop("bleu4", None)
        s["tasks"]["caption"].pop("cider_d", None)
    del report["heldout_loss"]
    page = render_html(report)
    assert ">BLEU-4<" not in page and ">CIDEr-D<" not in page and "Held-out loss" not in page
    assert table_rows(page)["all"] == ["5", "60.0", "66.7"]
    assert ">base:" not in page


def test_wrong_answers_of_the_first_system_come_first_then_the_rest_by_key():
    page = render_html(sample_report())
    assert card_keys(page) == ["k1", "k4", "k2", "k3", "k5"]
    assert "Showing 5 of 5 items: the 2 that adapter got wrong first" in page
    assert card_keys(render_html(sample_report(), max_items=3)) == ["k1", "k4", "k2"]
    no_adapter = sample_report()
    no_adapter["systems"] = ["base", "majority"]
    assert card_keys(render_html(no_adapter)) == ["k2", "k3", "k5", "k1", "k4"]  # base's wrong first


def test_untrusted_text_is_escaped():
    report = sample_report()
    report["items"][1]["prompt"] = 'What "colour" & <b>why</b>?'
    report["items"][1]["key"] = 'k1"><script>'
    page = render_html(report)
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "What &quot;colour&quot; &amp; &lt;b&gt;why&lt;/b&gt;?" in page
    assert card_keys(page)[0] == 'k1"><script>'


def test_right_and_wrong_answers_are_marked():
    page = render_html(sample_report())
    card = page[page.index('data-key="k3"'):]
    card = card[:card.index("</article>")]
    assert '<li class="ok">✓ <b>adapter:</b> red</li>' in card
    assert '<li class="bad">✗ <b>base:</b> blue</li>' in card


def test_thumbnail_of_a_small_png_is_enlarged_to_the_expected_size():
    uri = thumbnail_data_uri(png((112, 112)))
    assert uri.startswith("data:image/png;base64,")
    img = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert img.format == "PNG" and img.size == (160, 160)
    assert img.getpixel((0, 0)) == (255, 255, 255) and img.getpixel((40, 40)) == (220, 30, 30)  # NEAREST: no blur
    wide = thumbnail_data_uri(png((112, 56)), max_side=100)
    assert Image.open(io.BytesIO(base64.b64decode(wide.split(",", 1)[1]))).size == (100, 50)


def test_thumbnail_of_a_large_photo_is_a_smaller_jpeg():
    uri = thumbnail_data_uri(png((800, 600)))
    assert uri.startswith("data:image/jpeg;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).size == (160, 120)


@pytest.mark.parametrize("data", [None, b"", b"not an image", b"\x89PNG\r\n\x1a\n broken", png()[:60]])
def test_broken_or_missing_image_gives_none_and_the_page_says_no_image(data):
    assert thumbnail_data_uri(data) is None
    report = sample_report()
    report["items"] = [item("k9", "colour", "red", {"adapter": "red"}, image=data)]
    page = render_html(report)
    assert '<div class="thumb none">no image</div>' in page and "<img" not in page


def test_page_is_self_contained():
    page = render_html(sample_report())
    assert "<script" not in page.lower() and "http://" not in page and "https://" not in page
    assert page.count('<img src="data:image/png;base64,') == 3  # k1, k3, k5; k2 has none, k4 is broken
    assert page.count("no image") == 2


def test_the_page_renders_in_headless_chromium(tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed")
    _, html_path = write_report(sample_report(), tmp_path / "out")
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1200,1600", html_path.resolve().as_uri()],
                   check=True, timeout=120, capture_output=True, cwd=tmp_path)
    img = Image.open(shot).convert("RGB")
    assert img.size == (1200, 1600)
    colours = img.getcolors(maxcolors=1 << 20)
    assert len(colours) > 20, len(colours)  # text, table, thumbnails: far from one blank colour
    reds = sum(n for n, (r, g, b) in colours if r > 180 and g < 80 and b < 80)
    assert reds > 100  # the red circles of the thumbnails and the red wrong answers are drawn
