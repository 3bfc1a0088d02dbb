"""Grounding boxes: original pixels -> each family's coordinates (vlora/data/grounding.py), checked by hand-computed
values and, the point of it all, against a rectangle drawn on an image that went through training's own resize."""

import copy

import pytest
from PIL import Image, ImageDraw
from qwen_vl_utils import fetch_image, smart_resize

from vlora.data.formats import RecordError
from vlora.data.grounding import ABSOLUTE, RELATIVE, boxes_in, check_boxes, convert_boxes, to_original

W, H = 517, 389  # an odd size: no resize factor divides it
# smart_resize(389, 517, 28) at the default limits: 517 / 28 = 18.46 -> 18 * 28, 389 / 28 = 13.9 -> 14 * 28
RESIZED = (504, 392)
IMAGE = {"type": "image"}


def text(t):
    return {"type": "text", "text": t}


def chat(user: str, answer: str, images: int = 1) -> list[dict]:
    return [{"role": "user", "content": [IMAGE] * images + [text(user)]},
            {"role": "assistant", "content": [text(answer)]}]


TOKENS = "Where is <|object_ref_start|>the cat<|object_ref_end|>? <|box_start|>(100,50),(300,200)<|box_end|>"
JSON = '```json\n[{"bbox_2d": [100, 50.5, 300, 200], "label": "cat"}, {"point_2d": [ 258.5 ,194.5 ]}]\n```'


# ---- values, by hand ----
# ABSOLUTE, x * 504 / 517 and y * 392 / 389: 100 -> 97.49 -> 97, 300 -> 292.46 -> 292, 258.5 -> 252.0;
# 50 -> 50.39 -> 50, 50.5 -> 50.89 -> 51, 200 -> 201.54 -> 202, 194.5 -> 196.0.
# RELATIVE, x * 1000 / 517 and y * 1000 / 389: 100 -> 193.4 -> 193, 300 -> 580.3 -> 580, 258.5 -> 500.0;
# 50 -> 128.5 -> 129, 50.5 -> 129.8 -> 130, 200 -> 514.1 -> 514, 194.5 -> 500.0.


def test_absolute_rewrites_tokens_and_json_to_resized_pixels():
    out = convert_boxes(chat(TOKENS, JSON), [(W, H)], [RESIZED], ABSOLUTE)
    assert out[0]["content"][1]["text"] == (
        "Where is <|object_ref_start|>the cat<|object_ref_end|>? <|box_start|>(97,50),(292,202)<|box_end|>")
    assert out[1]["content"][0]["text"] == (
        '```json\n[{"bbox_2d": [97, 51, 292, 202], "label": "cat"}, {"point_2d": [ 252 ,196 ]}]\n```')


def test_relative_rewrites_tokens_and_json_to_0_1000():
    out = convert_boxes(chat(TOKENS, JSON), [(W, H)], [RESIZED], RELATIVE)
    assert out[0]["content"][1]["text"] == (
        "Where is <|object_ref_start|>the cat<|object_ref_end|>? <|box_start|>(193,129),(580,514)<|box_end|>")
    assert out[1]["content"][0]["text"] == (
        '```json\n[{"bbox_2d": [193, 130, 580, 514], "label": "cat"}, {"point_2d": [ 500 ,500 ]}]\n```')


def test_points_floats_spaces_and_string_content():
    messages = [{"role": "user", "content": [IMAGE, text("<|box_start|>( 258.5 , 194.5 )<|box_end|> and "
                                                         "<|box_start|>(10.4, 20.6), ( 30 ,40)<|box_end|>")]},
                {"role": "assistant", "content": "{'point_2d': [1e2, 5E1]} and \\\"bbox_2d\\\": [0, 0, 5.0, 7]"}]
    out = convert_boxes(messages, [(W, H)], [RESIZED], RELATIVE)
    # 10.4 -> 20.1 -> 20, 20.6 -> 52.96 -> 53, 30 -> 58.03 -> 58, 40 -> 102.8 -> 103, 5.0 -> 9.67 -> 10, 7 -> 18.0
    assert out[0]["content"][1]["text"] == ("<|box_start|>( 500 , 500 )<|box_end|> and "
                                            "<|box_start|>(20, 53), ( 58 ,103)<|box_end|>")
    assert out[1]["content"] == "{'point_2d': [193, 129]} and \\\"bbox_2d\\\": [0, 0, 10, 18]"


def test_clamping_at_the_image_edge_and_in_the_inverse():
    full = chat("all", f"<|box_start|>(0,0),({W},{H})<|box_end|>")
    # ABSOLUTE: 517 -> 504 and 389 -> 392, clamped to the last pixel (503, 391) as Qwen's notebook does.
    assert convert_boxes(full, [(W, H)], [RESIZED], ABSOLUTE)[1]["content"][0]["text"] == \
        "<|box_start|>(0,0),(503,391)<|box_end|>"
    assert convert_boxes(full, [(W, H)], [RESIZED], RELATIVE)[1]["content"][0]["text"] == \
        "<|box_start|>(0,0),(1000,1000)<|box_end|>"
    # A model may answer past the range: back to the image's bounds, never outside. 1005 * 0.517 = 519.6 -> 517.
    assert to_original('"bbox_2d": [-3, 2, 1005, 1000]', RELATIVE, (W, H), RESIZED) == \
        '"bbox_2d": [0, 1, 517, 389]'
    assert to_original("<|box_start|>(600,-1)<|box_end|>", ABSOLUTE, (W, H), RESIZED) == \
        "<|box_start|>(517,0)<|box_end|>"


def test_to_original_hand_values_and_tolerance():
    # ABSOLUTE x * 517 / 504, y * 389 / 392: 97 -> 99.5 -> 100 (even), 51 -> 50.6 -> 51; RELATIVE 193 -> 99.8 -> 100.
    assert to_original('[{"bbox_2d": [97, 51, 292, 202]}]', ABSOLUTE, (W, H), RESIZED) == \
        '[{"bbox_2d": [100, 51, 300, 200]}]'
    assert to_original("(193,129)", RELATIVE, (W, H), RESIZED) == "(193,129)"  # no marker: not a box
    assert to_original("<|box_start|>(193,129)<|box_end|>", RELATIVE, (W, H), RESIZED) == \
        "<|box_start|>(100,50)<|box_end|>"
    # Generated text can be cut short or odd: left as written, no error.
    for odd in ("<|box_start|>(193,1", "<|box_start|>(1,2,3)<|box_end|>", '"bbox_2d": [1, 2]'):
        assert to_original(odd, RELATIVE, (W, H), RESIZED) == odd
    assert to_original('"point_2d": [nan, 3]', RELATIVE, (W, H), RESIZED) == '"point_2d": [nan, 1]'  # 3 * 0.389
    with pytest.raises(ValueError, match="convention"):
        to_original("<|box_start|>(1,2)<|box_end|>", "normalised", (W, H), RESIZED)


@pytest.mark.parametrize("size", [(517, 389), (640, 480), (1000, 750), (1920, 1080), (333, 2000), (2600, 1700)])
@pytest.mark.parametrize("convention", [ABSOLUTE, RELATIVE])
def test_round_trip_is_within_a_pixel(size, convention):
    w, h = size
    nh, nw = smart_resize(h, w, 28, max_pixels=1280 * 28 * 28)  # 2600x1700 and 1920x1080 shrink about 2x
    boxes = [(1, 2, w // 3, h // 2), (w // 5 + 1, h // 7 + 3, w - 7, h - 5), (w // 2, h // 2, w // 2 + 1, h // 2 + 1)]
    for box in boxes:
        messages = chat("?", "<|box_start|>({},{}),({},{})<|box_end|>".format(*box))
        converted = convert_boxes(messages, [size], [(nw, nh)], convention)[1]["content"][0]["text"]
        back = to_original(converted, convention, size, (nw, nh))
        got = tuple(int(v) for v in back.replace("<|box_start|>", "").replace("<|box_end|>", "")
                    .replace("(", "").replace(")", "").split(","))
        # Forward rounding costs half a step of the target grid (w / nw or w / 1000 original pixels), the way back
        # half a pixel: below 2, so an integer box comes back within 1 while a step is under 3 pixels.
        assert max(abs(a - b) for a, b in zip(got, box, strict=True)) <= 1, (box, converted, back)


# ---- the real check: a drawn rectangle, resized the way training resizes ----

BG, RED, BLUE = (255, 255, 255), (220, 20, 20), (20, 40, 220)
RECTS = {RED: (37, 51, 212, 180), BLUE: (301, 203, 488, 371)}  # (x1, y1, x2, y2), x2 / y2 exclusive


def _near(pixel, colour, tol=40):
    return all(abs(a - b) <= tol for a, b in zip(pixel, colour, strict=True))


def _lands(img: Image.Image, box, colour) -> bool:
    """The box's edges are within ~2 px of the drawn ones: 2 px inside each corner is the rectangle's colour, 2-3 px
    outside each edge and corner is background."""
    x1, y1, x2, y2 = box
    mx, my = (x1 + x2) // 2, (y1 + y2) // 2
    inside = [(x1 + 2, y1 + 2), (x2 - 3, y1 + 2), (x1 + 2, y2 - 3), (x2 - 3, y2 - 3)]
    outside = [(x1 - 3, my), (x2 + 2, my), (mx, y1 - 3), (mx, y2 + 2), (x1 - 3, y1 - 3), (x2 + 2, y2 + 2)]
    if not all(0 <= x < img.width and 0 <= y < img.height for x, y in inside + outside):
        return False
    return (all(_near(img.getpixel(p), colour) for p in inside)
            and all(_near(img.getpixel(p), BG) for p in outside))


def _numbers(s: str) -> list[int]:
    inner = s[s.index("[") + 1:s.index("]")]
    return [int(v) for v in inner.split(",")]


@pytest.mark.parametrize("patch,min_pixels,max_pixels", [
    (14, 4 * 28 * 28, 256 * 28 * 28),  # factor 28, a slight shrink: 504x392 -> 476x364
    (14, 4 * 28 * 28, 64 * 28 * 28),  # factor 28, about half size
    (14, 1024 * 28 * 28, 2048 * 28 * 28),  # factor 28, min_pixels forces an upscale of about 2x
    (16, 4 * 32 * 32, 256 * 32 * 32),  # factor 32: 512x384, unchanged pixel count
    (16, 4 * 32 * 32, 64 * 32 * 32),  # factor 32, about half size
])
def test_converted_box_lands_on_the_drawn_rectangle_after_training_resize(patch, min_pixels, max_pixels):
    img = Image.new("RGB", (W, H), BG)
    draw = ImageDraw.Draw(img)
    for colour, (x1, y1, x2, y2) in RECTS.items():
        draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=colour)
    resized = fetch_image({"image": img, "min_pixels": min_pixels, "max_pixels": max_pixels}, image_patch_size=patch)
    nw, nh = resized.size
    assert (nw % (2 * patch), nh % (2 * patch)) == (0, 0)
    answer = " ".join('{{"bbox_2d": [{}, {}, {}, {}]}}'.format(*box) for box in RECTS.values())
    messages = chat("Find the boxes.", answer)
    for convention in (ABSOLUTE, RELATIVE):
        out = convert_boxes(messages, [(W, H)], [(nw, nh)], convention)[1]["content"][0]["text"]
        for (colour, original), part in zip(RECTS.items(), out.split("} "), strict=True):
            box = _numbers(part)
            if convention == RELATIVE:  # 0-1000 of the image is the same fraction of the resized image
                box = [round(v * (nw if i % 2 == 0 else nh) / 1000) for i, v in enumerate(box)]
            assert _lands(resized, box, colour), (convention, resized.size, original, box)
    # The check can fail: where the resize moved the edges by more than its margin, the unconverted box misses.
    if abs(nw - W) > 40:
        assert not any(_lands(resized, box, colour) for colour, box in RECTS.items())


# ---- check_boxes ----

GOOD = [
    "no box here at all",
    '<|object_ref_start|>cat<|object_ref_end|><|box_start|>(0,0),(517,389)<|box_end|>',
    "<|box_start|>(517, 389)<|box_end|>",
    '[{"bbox_2d": [1.5, 2, 3, 4.25], "label": "x"}, {"point_2d": [0, 389]}]',
    'Answer as JSON: {"bbox_2d": [x1, y1, x2, y2], "point_2d": [x, y]}',  # a format description, not a box
    "<|box_start|>(10,10),(10,10)<|box_end|>",  # a zero-size box is a point written as a box
]

BAD = [
    ("<|box_start|>(1,2),(3,4)", "without its <|box_end|>"),
    ("<|box_start|>(1,2)<|box_start|>(1,2),(3,4)<|box_end|>", "without its <|box_end|>"),
    ("(1,2)<|box_end|>", "without a <|box_start|>"),
    ("<|box_start|>(1,2),(3,4),(5,6)<|box_end|>", "not 1 or 2 (x,y) pairs"),
    ("<|box_start|>1,2,3,4<|box_end|>", "not 1 or 2 (x,y) pairs"),
    ("<|box_start|><|box_end|>", "not 1 or 2 (x,y) pairs"),
    ("<|box_start|>(-1,2),(3,4)<|box_end|>", "negative x"),
    ("<|box_start|>(1,2),(518,4)<|box_end|>", "x 518 beyond the image (image 0 is 517x389)"),
    ('"bbox_2d": [1, 2, 3, 390]', "y 390 beyond the image"),
    ('"bbox_2d": [30, 2, 3, 4]', "x2 < x1 or y2 < y1"),
    ("<|box_start|>(1,40),(3,4)<|box_end|>", "x2 < x1 or y2 < y1"),
    ('"bbox_2d": [1, 2, NaN, 4]', "not finite"),
    ("<|box_start|>(1e999,2)<|box_end|>", "not finite"),
    ('"bbox_2d": [1, 2, 3]', "has 3 numbers, not 4"),
    ('"point_2d": [1, 2, 3, 4]', "has 4 numbers, not 2"),
    ('"bbox_2d": [1, 2, 3, 4,]', "not a list of 4 numbers"),
    ('"bbox_2d": [1, 2, x2, 4]', "not a list of 4 numbers"),
]


@pytest.mark.parametrize("answer", GOOD)
def test_check_boxes_accepts_good_boxes(answer):
    messages = chat("Find it.", answer)
    before = copy.deepcopy(messages)
    check_boxes(messages, [(W, H)])
    assert messages == before


@pytest.mark.parametrize("answer,why", BAD)
def test_check_boxes_rejects_bad_boxes(answer, why):
    with pytest.raises(RecordError) as e:
        check_boxes(chat("Find it.", answer), [(W, H)])
    assert e.value.reason == "bad_box"
    assert e.value.detail.startswith("message 1 (assistant): box ")
    assert why in e.value.detail
    assert "\n" not in e.value.detail
    # The collator's conversion refuses the same box rather than emit an unconverted one.
    with pytest.raises(RecordError, match="bad_box"):
        convert_boxes(chat("Find it.", answer), [(W, H)], [RESIZED], ABSOLUTE)


def test_a_box_before_any_image_is_rejected_with_its_message():
    messages = [{"role": "system", "content": [text("Boxes like <|box_start|>(1,2),(3,4)<|box_end|>.")]},
                {"role": "user", "content": [IMAGE, text("Find it.")]}]
    with pytest.raises(RecordError) as e:
        check_boxes(messages, [(W, H)])
    assert e.value.reason == "bad_box"
    assert e.value.detail == ("message 0 (system): box '<|box_start|>(1,2),(3,4)<|box_end|>' comes before any image: "
                              "put the image first")
    # In the same message, before the image part, is before it too.
    with pytest.raises(RecordError, match="message 0 \\(user\\).*before any image"):
        check_boxes([{"role": "user", "content": [text('"point_2d": [1, 2]'), IMAGE]}], [(W, H)])


def test_no_box_costs_nothing_and_returns_the_same_object():
    messages = chat("Describe the image.", "A cat on a mat, with a JSON-ish {\"label\": \"cat\"} and (1,2),(3,4).")
    assert convert_boxes(messages, [(W, H)], [RESIZED], ABSOLUTE) is messages
    assert convert_boxes(messages, [], [], RELATIVE) is messages  # no box: the sizes are never looked at
    template = chat('Answer {"bbox_2d": [x1, y1, x2, y2]}.', "ok")
    assert convert_boxes(template, [(W, H)], [RESIZED], ABSOLUTE) is template
    check_boxes(messages, [])
    with pytest.raises(ValueError, match="convention"):
        convert_boxes(messages, [(W, H)], [RESIZED], "pixels")


def test_convert_does_not_mutate_and_shares_untouched_parts():
    messages = chat(TOKENS, "no box in the answer")
    before = copy.deepcopy(messages)
    out = convert_boxes(messages, [(W, H)], [RESIZED], RELATIVE)
    assert messages == before
    assert out is not messages and out[1] is messages[1]  # the answer had no box: shared
    assert out[0]["content"][0] is messages[0]["content"][0]  # the image part: shared


def test_a_box_refers_to_the_latest_image_before_it():
    # image 0: 517x389 -> 504x392; image 1: 1000x500 -> 1008x504. (100,100),(500,250) on image 1:
    # ABSOLUTE 100 * 1.008 = 100.8 -> 101, 500 * 1.008 = 504, 250 * 1.008 = 252; RELATIVE 100, 200, 500, 500.
    box = "<|box_start|>(100,100),(500,250)<|box_end|>"
    messages = [{"role": "user", "content": [IMAGE, text(box), IMAGE, text(box)]},
                {"role": "assistant", "content": [text('"bbox_2d": [100, 100, 500, 250]')]}]
    originals, resized = [(W, H), (1000, 500)], [RESIZED, (1008, 504)]
    out = convert_boxes(messages, originals, resized, ABSOLUTE)
    # on image 0: 100 * 504/517 = 97.5 -> 97, 100 * 392/389 = 100.8 -> 101, 500 -> 487.4 -> 487, 250 -> 251.9 -> 252
    assert out[0]["content"][1]["text"] == "<|box_start|>(97,101),(487,252)<|box_end|>"
    assert out[0]["content"][3]["text"] == "<|box_start|>(101,101),(504,252)<|box_end|>"
    assert out[1]["content"][0]["text"] == '"bbox_2d": [101, 101, 504, 252]'
    out = convert_boxes(messages, originals, resized, RELATIVE)
    assert out[1]["content"][0]["text"] == '"bbox_2d": [100, 200, 500, 500]'
    # x 600 fits image 1 (1000 wide) but not image 0 (517 wide): checked against the image it refers to.
    check_boxes([{"role": "user", "content": [IMAGE, IMAGE, text("<|box_start|>(600,10)<|box_end|>")]}], originals)
    with pytest.raises(RecordError, match="image 0 is 517x389"):
        check_boxes([{"role": "user", "content": [IMAGE, text("<|box_start|>(600,10)<|box_end|>"), IMAGE]}], originals)


def test_boxes_in_reads_boxes_in_reading_order_and_skips_the_rest():
    text = ('[{"bbox_2d": [30, 40, 50, 60.5]}] then <|box_start|>(1,2),(3,4)<|box_end|> '
            '{"point_2d": [7, 8]} <|box_start|>(9,9)<|box_end|> {"bbox_2d": [1, 2, nan, 4]} "bbox_2d": [x1, y1, x2, y2] '
            '<|box_start|>(5,6),(7')
    assert boxes_in(text) == [(30, 40, 50, 60.5), (1, 2, 3, 4)]  # points, non-finite, templates and cut boxes: none
    assert boxes_in("no boxes here") == []
