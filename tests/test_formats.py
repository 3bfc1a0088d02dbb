"""Every annotation format -> the one canonical sample; placeholders, path resolution, per-line errors."""

import json
import os
from pathlib import Path

import pytest

from helpers import REPO
from vlora.data.formats import FORMATS, PER_IMAGE_KEYS, PathResolver, RecordError, detect, load_samples, read_annotations
from vlora.errors import VloraError

# LLaMA-Factory's demo files, in ../shared beside the checkout (not part of the repository).
PEERS = REPO.parent / "shared" / "peers" / "llamafactory_mllm_demo"
needs_peers = pytest.mark.skipif(not PEERS.is_dir(), reason=f"{PEERS} is absent (../shared/peers is not beside this checkout)")


def _jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _records(src, **kw):
    return list(read_annotations(src, **kw).records)


def text(t):
    return {"type": "text", "text": t}


IMG = {"type": "image"}


def user_assistant(user: list, answer: str) -> list:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": [text(answer)]}]


def test_sharegpt_to_canonical(tmp_path):
    src = _jsonl(tmp_path / "d.jsonl", [{
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Compare <image> and<image>\nplease."},
            {"role": "assistant", "content": "Same."},
            {"role": "user", "content": "Why?"},
            {"role": "assistant", "content": "Red <image> twice."},
        ],
        "images": ["x/1.png", "/abs/2.jpg", "3.png"],
    }])
    (sample,) = load_samples(src)
    assert sample["messages"] == [
        {"role": "system", "content": [text("Be brief.")]},
        {"role": "user", "content": [text("Compare "), IMG, text(" and"), IMG, text("\nplease.")]},
        {"role": "assistant", "content": [text("Same.")]},
        {"role": "user", "content": [text("Why?")]},
        {"role": "assistant", "content": [text("Red "), IMG, text(" twice.")]},
    ]
    # Nothing exists: each path is where it would most likely be (beside the file, or under the root).
    assert sample["images"] == [tmp_path.absolute() / "x/1.png", Path("/abs/2.jpg"), tmp_path.absolute() / "3.png"]
    (rooted,) = load_samples(src, image_root=tmp_path / "root")
    assert rooted["images"][0] == (tmp_path / "root/x/1.png").absolute()


def test_llava_to_canonical_json_array(tmp_path):
    src = tmp_path / "llava.json"
    src.write_text(json.dumps([
        {"id": "0", "image": "a.jpg", "conversations": [
            {"from": "system", "value": "Sys."},
            {"from": "human", "value": "<image>\nWhat is it?"},
            {"from": "gpt", "value": "A cat."}]},
        {"id": "1", "images": ["b.png", "c.png"], "system": "Top-level system.", "conversations": [
            {"from": "human", "value": "<image><image>Diff?"}, {"from": "gpt", "value": "None."}]},
        {"id": "2", "conversations": [{"from": "human", "value": "Text only."}, {"from": "gpt", "value": "OK."}]},
    ], indent=1))
    source = read_annotations(src)
    assert source.format == "llava"
    a, b, c = (r.sample for r in source.records)
    assert a == {"messages": [{"role": "system", "content": [text("Sys.")]}] + user_assistant([IMG, text("\nWhat is it?")], "A cat."),
                 "images": [tmp_path.absolute() / "a.jpg"]}
    assert b["messages"][0] == {"role": "system", "content": [text("Top-level system.")]}
    assert b["messages"][1]["content"] == [IMG, IMG, text("Diff?")]
    assert b["images"] == [tmp_path.absolute() / "b.png", tmp_path.absolute() / "c.png"]
    assert c["images"] == []


def test_openai_content_lists_every_image_spelling(tmp_path):
    src = _jsonl(tmp_path / "oa.jsonl", [
        {"messages": [
            {"role": "system", "content": [{"type": "text", "text": "Sys."}]},
            {"role": "user", "content": [
                {"type": "image", "image": "a.png", "max_pixels": 3136, "min_pixels": 784},
                {"type": "image_url", "image_url": {"url": "b.png"}},
                {"type": "image_url", "image_url": "c.png", "resized_height": 56, "resized_width": 84},
                {"type": "image_url", "value": "d.png"},
                {"type": "image", "image": "file:///abs/e.png"},
                {"type": "text", "value": "Which?"}]},
            {"role": "assistant", "content": "The first."},  # string content mixes in
        ]},
        # TRL's layout: bare image parts take the record's "images" in order; top-level system string.
        {"system": "Be brief.", "images": ["x.png", "y.png"], "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Same."}]}]},
    ])
    first, second = _records(src)
    assert first.sample["messages"] == [{"role": "system", "content": [text("Sys.")]}] + user_assistant([
        {"type": "image", "max_pixels": 3136, "min_pixels": 784}, IMG,
        {"type": "image", "resized_height": 56, "resized_width": 84}, IMG, IMG, text("Which?")], "The first.")
    d = tmp_path.absolute()
    assert first.sample["images"] == [d / "a.png", d / "b.png", d / "c.png", d / "d.png", Path("/abs/e.png")]
    assert second.sample == {"messages": [{"role": "system", "content": [text("Be brief.")]}] + user_assistant([IMG, text("and"), IMG], "Same."),
                             "images": [d / "x.png", d / "y.png"]}
    assert (first.line, second.line) == (1, 2)
    assert PER_IMAGE_KEYS == __import__("vlora.data.collate", fromlist=["x"]).PER_IMAGE_KEYS


@pytest.mark.parametrize("part, detail", [
    ({"type": "video", "video": "v.mp4"}, "unsupported part type 'video'"),
    ({"type": "text"}, "a text part needs a 'text'"),
    ({"type": "image", "image": ""}, "non-empty string"),
    ({"type": "image", "image": "a.png", "max_pixels": "big"}, "max_pixels must be a positive integer"),
])
def test_openai_bad_parts(tmp_path, part, detail):
    src = _jsonl(tmp_path / "oa.jsonl", [{"messages": [{"role": "user", "content": [part]}, {"role": "assistant", "content": "x"}]}])
    (r,) = _records(src, fmt="openai")
    assert r.error.reason == "bad_record" and detail in r.error.detail


def test_caption_and_instruction(tmp_path):
    d = tmp_path.absolute()
    cap = _jsonl(tmp_path / "cap.jsonl", [{"image_path": "a.png", "text": "A red circle."}, {"image": "b.png", "caption": " <kept> "}])
    assert read_annotations(cap).format == "caption"
    assert load_samples(cap) == [
        {"messages": user_assistant([IMG], "A red circle."), "images": [d / "a.png"]},
        {"messages": user_assistant([IMG], " <kept> "), "images": [d / "b.png"]},  # a caption is an answer, kept verbatim
    ]
    ins = _jsonl(tmp_path / "ins.jsonl", [
        {"image_path": "a.png", "instruction": "Describe it.", "input": "Be short.", "output": "Red."},
        {"image_path": "a.png", "instruction": "Describe it.", "input": "", "output": "Red."},
        {"images": ["a.png", "b.png"], "instruction": "Is <image_2> bigger than <image_1>?", "output": "No."},
        {"instruction": "No image.", "output": "Fine.", "system": "Sys."},
    ])
    assert read_annotations(ins).format == "instruction"
    s = load_samples(ins)
    assert s[0] == {"messages": user_assistant([IMG, text("Describe it.\nBe short.")], "Red."), "images": [d / "a.png"]}
    assert s[1]["messages"][0]["content"] == [IMG, text("Describe it.")]
    assert s[2] == {"messages": user_assistant([text("Is "), IMG, text(" bigger than "), IMG, text("?")], "No."), "images": [d / "b.png", d / "a.png"]}
    assert s[3] == {"messages": [{"role": "system", "content": [text("Sys.")]}] + user_assistant([text("No image.")], "Fine."), "images": []}


@pytest.mark.parametrize("record, detail", [
    ({"image_path": "a.png", "text": "A <image> here."}, "'text' (the answer) holds the image placeholder '<image>'"),
    ({"image": "a.png", "caption": "<image_no_1> a cat"}, "'caption' (the answer) holds the image placeholder '<image_no_1>'"),
    ({"image_path": "a.png", "instruction": "Describe.", "output": "It is <|vision_start|>b.png<|vision_end|>"},
     "'output' (the answer) holds the image placeholder '<|vision_start|>b.png<|vision_end|>'"),
])
def test_a_placeholder_in_an_answer_is_a_mismatch(tmp_path, record, detail):
    """The images of a caption / instruction record belong to its user turn: a placeholder in the answer is refused."""
    (r,) = _records(_jsonl(tmp_path / "a.jsonl", [record]))
    assert r.sample is None and r.error.reason == "image_count_mismatch"
    assert r.error.detail == detail + "; an image belongs to the user turn: move it to the prompt or drop it"


def test_instruction_input_placeholders_place_the_images(tmp_path):
    d = tmp_path.absolute()
    (s,) = load_samples(_jsonl(tmp_path / "i.jsonl", [
        {"images": ["a.png", "b.png"], "instruction": "Compare.", "input": "<image_2> then <image_1>", "output": "Same."}]))
    assert s == {"messages": user_assistant([text("Compare.\n"), IMG, text(" then "), IMG], "Same."), "images": [d / "b.png", d / "a.png"]}


def test_null_image_fields_mean_no_images(tmp_path):
    """HF exports and LLaVA's text-only rows write `"image": null`: no images, not a bad record."""
    src = _jsonl(tmp_path / "n.jsonl", [
        {"image": None, "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
        {"images": None, "image": "a.png", "conversations": [{"from": "human", "value": "<image>?"}, {"from": "gpt", "value": "A."}]},
    ])
    a, b = load_samples(src)
    assert a == {"messages": user_assistant([text("Hi")], "Hello."), "images": []}
    assert b["images"] == [tmp_path.absolute() / "a.png"]
    (c,) = load_samples(_jsonl(tmp_path / "s.jsonl", [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo."}], "images": None}]))
    assert c == {"messages": user_assistant([text("Hi")], "Yo."), "images": []}
    (e,) = load_samples(_jsonl(tmp_path / "c.jsonl", [{"image_path": None, "instruction": "Say hi.", "output": "Hi."}]))
    assert e == {"messages": user_assistant([text("Say hi.")], "Hi."), "images": []}


# One record per format, each with a task: the label is read in one place (to_sample), whatever the reader.
TASK_RECORDS = {
    "sharegpt": {"messages": [{"role": "user", "content": "<image>Q?"}, {"role": "assistant", "content": "A."}], "images": ["a.png"]},
    "llava": {"image": "a.png", "conversations": [{"from": "human", "value": "<image>Q?"}, {"from": "gpt", "value": "A."}]},
    "openai": {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "Q?"}]},
                            {"role": "assistant", "content": [{"type": "text", "text": "A."}]}]},
    "instruction": {"image_path": "a.png", "instruction": "Q?", "output": "A."},
    "caption": {"image_path": "a.png", "text": "A."},
}


@pytest.mark.parametrize("fmt", list(TASK_RECORDS))
def test_a_task_label_is_kept_in_every_format(tmp_path, fmt):
    record = TASK_RECORDS[fmt]
    src = _jsonl(tmp_path / "t.jsonl", [{**record, "task": "vqa"}, record, {**record, "task": None}, {**record, "task": "Cap tion/é ✓"}])
    with_task, without, null, odd = _records(src)
    assert read_annotations(src).format == fmt
    assert with_task.sample["task"] == "vqa" and odd.sample["task"] == "Cap tion/é ✓"
    assert "task" not in without.sample and null.sample == without.sample  # null: no task, as "image": null is no image
    assert {k: v for k, v in with_task.sample.items() if k != "task"} == without.sample  # nothing else changes


@pytest.mark.parametrize("task, detail", [
    (3, "'task' must be a string, got a JSON int"),
    (["caption"], "'task' must be a string, got a JSON list"),
    (True, "'task' must be a string, got a JSON bool"),
    ({"name": "vqa"}, "'task' must be a string, got a JSON dict"),
    ("", "'task' is empty"),
    ("   ", "'task' is empty"),
    ("x" * 65, "has 65 characters, over 64"),
    ("cap\ntion", "holds the control character '\\n'"),
    ("cap\ttion", "holds the control character '\\t'"),
    ("vqa\x00", "holds the control character '\\x00'"),
    ("vqa\x7f", "holds the control character '\\x7f'"),
    ("vqa\x85", "holds the control character '\\x85'"),
])
@pytest.mark.parametrize("fmt", ["sharegpt", "caption"])
def test_a_bad_task_is_a_bad_task_reject(tmp_path, fmt, task, detail):
    (r,) = _records(_jsonl(tmp_path / "t.jsonl", [{**TASK_RECORDS[fmt], "task": task}]))
    assert r.sample is None and r.error.reason == "bad_task" and detail in r.error.detail
    assert r.raw["task"] == task
    # the limits are inclusive: 64 characters is fine
    (ok,) = _records(_jsonl(tmp_path / "ok.jsonl", [{**TASK_RECORDS[fmt], "task": "x" * 64}]))
    assert ok.error is None and ok.sample["task"] == "x" * 64


def test_unhashable_role_is_a_bad_record_not_a_crash(tmp_path):
    src = _jsonl(tmp_path / "r.jsonl", [
        {"conversations": [{"from": ["human"], "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
        {"messages": [{"role": {"name": "user"}, "content": "Hi"}, {"role": "assistant", "content": "Yo."}]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
    ])
    a, b, c = _records(src, fmt="llava")[0], _records(src, fmt="sharegpt")[1], _records(src, fmt="llava")[2]
    assert (a.error.reason, a.error.detail) == ("bad_record", "conversations[0].from must be one of human, user, gpt, assistant, system")
    assert (b.error.reason, b.error.detail) == ("bad_record", "messages[0].role must be one of human, user, gpt, assistant, system")
    assert c.error is None


def test_content_lists_after_a_text_only_first_record(tmp_path):
    """A content-list file whose first record has only string content is detected as sharegpt: its image records
    must still be read, not rejected."""
    d = tmp_path.absolute()
    src = _jsonl(tmp_path / "oa.jsonl", [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "What?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "Red."}]}]},
    ])
    source = read_annotations(src)
    first, second = source.records
    assert source.format == "sharegpt" and first.error is None and second.error is None
    assert second.sample == {"messages": user_assistant([IMG, text("What?")], "Red."), "images": [d / "a.png"]}


def test_numbered_and_inline_placeholders(tmp_path):
    d = tmp_path.absolute()
    # numbered: 1-based into the list, in order of appearance, repeats allowed
    (a,) = load_samples(_jsonl(tmp_path / "n.jsonl", [
        {"messages": [{"role": "user", "content": "<image_no_2> vs <image_no_1>, again <image_no_2>"}, {"role": "assistant", "content": "x"}],
         "images": ["a.png", "b.png"]}]))
    src = _jsonl(tmp_path / "p.jsonl", [
        {"conversations": [{"from": "human", "value": "<image_1>?"}, {"from": "gpt", "value": "x"}], "image": "a.png"},
        # <|vision_start|>path<|vision_end|>: an image at that path, with or without <|image_pad|> inside
        {"conversations": [{"from": "human", "value": "Picture 1: <|vision_start|>sub/c.png<|vision_end|>and "
                                                      "<|vision_start|><|image_pad|>/abs/d.png<|image_pad|><|vision_end|>"},
                           {"from": "gpt", "value": "x"}]},
        {"conversations": [{"from": "human", "value": "<|vision_start|><|image_pad|><|vision_end|>?"}, {"from": "gpt", "value": "x"}], "images": ["a.png"]},
    ])
    b, c, e = load_samples(src)
    assert a["messages"][0]["content"] == [IMG, text(" vs "), IMG, text(", again "), IMG]
    assert a["images"] == [d / "b.png", d / "a.png", d / "b.png"]
    assert b["images"] == [d / "a.png"]
    assert c["messages"][0]["content"] == [text("Picture 1: "), IMG, text("and "), IMG]
    assert c["images"] == [d / "sub/c.png", Path("/abs/d.png")]
    assert e["messages"][0]["content"] == [IMG, text("?")] and e["images"] == [d / "a.png"]


@pytest.mark.parametrize("content, images, detail", [
    ("<image><image>Two?", ["a.png"], "2 <image> tag(s) but 1 image(s); make them match"),
    ("No tag?", ["a.png"], "0 <image> tag(s) but 1 image(s); make them match"),
    ("<image_3>?", ["a.png", "b.png"], "placeholder <image_3> but the record lists 2 image(s)"),
    ("<image_1> only", ["a.png", "b.png"], "image 2 of 2 is never referenced"),
    ("<image_1> and <image>", ["a.png", "b.png"], "mixes <image> tags with numbered placeholders"),
])
def test_placeholder_mismatches(tmp_path, content, images, detail):
    src = _jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "x"}], "images": images}])
    (r,) = _records(src)
    assert r.error.reason == "image_count_mismatch" and detail in r.error.detail


def test_path_resolution_order_and_suffix_fallback(tmp_path):
    ann, root = tmp_path / "ann", tmp_path / "root"
    for p in (ann / "only_ann.png", root / "both.png", ann / "both.png", ann / "imgs/deep.png"):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    r = PathResolver(ann, root)
    assert r("both.png") == root / "both.png"  # image_root first
    assert r("only_ann.png") == ann / "only_ann.png"  # then beside the annotation file
    assert r("data/repo/imgs/deep.png") == ann / "imgs/deep.png"  # then with leading folders dropped
    assert r("elsewhere/nope.png") == root / "elsewhere/nope.png"  # none exists: the first candidate, for the reject
    assert r("/abs/x.png") == Path("/abs/x.png") and r("file:///abs/y.png") == Path("/abs/y.png")
    assert r("data:image/png;base64,AAAA") == "data:image/png;base64,AAAA"  # decoded at pack time
    assert r.by_suffix == 1
    for url in ("http://example.com/a.png", "https://example.com/a.png"):
        with pytest.raises(RecordError) as e:
            r(url)
        assert e.value.reason == "remote_image" and url in e.value.detail
    assert PathResolver(ann)("both.png") == ann / "both.png"


def test_fallbacks_never_bind_a_bare_file_name_from_another_folder(tmp_path):
    """`cats/1.jpg` and `dogs/1.jpg` must not both become annotation_dir/1.jpg; a path relative to an ancestor of
    the annotation folder (a repository root) is found there, up to three levels up."""
    repo = tmp_path / "top" / "repo"
    ann = repo / "data" / "anns"
    for p in (ann / "1.jpg", repo / "data/imgs/2.jpg", repo / "data/anns/sub/3.jpg", repo / "4.jpg", tmp_path / "a/5.jpg"):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    r = PathResolver(ann)
    assert r("cats/1.jpg") == ann / "cats/1.jpg" and r("dogs/1.jpg") == ann / "dogs/1.jpg"  # missing: rejected, not bound
    assert r.by_suffix == 0
    assert r("data/imgs/2.jpg") == repo / "data/imgs/2.jpg"  # relative to the repository root, two levels up
    assert r("imgs/2.jpg") == repo / "data/imgs/2.jpg"  # relative to the parent folder
    assert r("x/y/sub/3.jpg") == ann / "sub/3.jpg"  # leading folders dropped, the file's own folder kept
    assert r.by_suffix == 3
    assert r("4.jpg") == ann / "4.jpg"  # a bare file name is only looked for beside the annotation file
    assert r("a/5.jpg") == ann / "a/5.jpg"  # four levels up is too far
    assert r.by_suffix == 3


@needs_peers
def test_confine_takes_paths_as_written_and_refuses_any_outside_the_roots(tmp_path):
    """--confine: no fallback guesses, and the path taken must resolve (symlinks, `..`) under image_root or the
    annotation folder; refused before anything is opened, existing or not."""
    tmp_path = Path(os.path.realpath(tmp_path))  # the details name real paths
    repo, root, outside = tmp_path / "repo", tmp_path / "root", tmp_path / "outside"
    ann = repo / "data"
    for p in (ann / "in.png", ann / "sub/deep.png", repo / "imgs/up.png", root / "r.png", outside / "secret.png"):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    (ann / "escape.png").symlink_to(outside / "secret.png")
    (ann / "outdir").symlink_to(outside, target_is_directory=True)
    (ann / "alias.png").symlink_to(ann / "in.png")
    (tmp_path / "linked").symlink_to(ann, target_is_directory=True)
    free, confined = PathResolver(ann, root), PathResolver(ann, root, confine=True)
    # Inside the roots: the same path as without --confine (symlinks within the roots are fine).
    for ref in ("in.png", "r.png", "alias.png", str(ann / "in.png"), f"file://{root / 'r.png'}"):
        assert confined(ref) == free(ref)
    assert confined("data:image/png;base64,AAAA") == "data:image/png;base64,AAAA"
    # The fallbacks are off: the path as written, missing here (an image_missing reject), not a guess.
    assert free("imgs/up.png") == repo / "imgs/up.png" and free("x/sub/deep.png") == ann / "sub/deep.png"
    assert confined("imgs/up.png") == root / "imgs/up.png" and confined("x/sub/deep.png") == root / "x/sub/deep.png"
    assert confined.by_suffix == 0
    for ref, real in [("escape.png", outside / "secret.png"), ("outdir/secret.png", outside / "secret.png"),
                      ("../../outside/secret.png", outside / "secret.png"), (str(outside / "secret.png"), outside / "secret.png"),
                      (f"file://{outside}/nope.png", outside / "nope.png"), ("../elsewhere.png", tmp_path / "elsewhere.png")]:  # missing: judged as root/../elsewhere.png
        free(ref)  # without --confine: taken
        with pytest.raises(RecordError) as e:
            confined(ref)
        assert e.value.reason == "image_outside_root" and e.value.detail.startswith(f"{ref}: ")
        assert f"outside {root} and {ann}; --confine reads images under --image-root and the annotation file's folder only" in e.value.detail
        assert str(real) in e.value.detail
    with pytest.raises(RecordError, match="remote_image"):
        confined("https://example.com/a.png")
    # An annotation folder reached through a symlink still holds its own images; its escaping link still escapes.
    via_link = PathResolver(tmp_path / "linked", confine=True)
    assert via_link("in.png") == tmp_path / "linked/in.png"
    with pytest.raises(RecordError, match="image_outside_root"):
        via_link("escape.png")
    # Paths no file can have are one reject each, confined or not, not the end of the pack.
    for resolver in (free, confined):
        with pytest.raises(RecordError, match=r"^image_unreadable: 'a\\x00\.png': a NUL byte in the path$"):
            resolver("a\0.png")
        with pytest.raises(RecordError, match="^image_missing: ~no-such-user-here/a.png: no home folder for that user$"):
            resolver("~no-such-user-here/a.png")
    # read_annotations passes it on; a record's reject names the reason.
    src = _jsonl(ann / "d.jsonl", [{"image_path": p, "text": "t"} for p in ("in.png", "escape.png")])
    assert [r.error.reason if r.error else None for r in _records(src, confine=True)] == [None, "image_outside_root"]
    assert [r.error for r in _records(src)] == [None, None]


@needs_peers
def test_llamafactory_files_give_the_same_samples():
    """The two LLaMA-Factory demo files hold the same conversations in two formats, with differently rooted paths."""
    sharegpt = read_annotations(PEERS / "mllm_demo.json")
    samples = [r.sample for r in sharegpt.records]
    assert sharegpt.format == "sharegpt" and len(samples) == 6 and sum(len(s["images"]) for s in samples) == 8
    assert sharegpt.resolver.by_suffix == 0
    v1 = read_annotations(PEERS / "v1_multimodal_demo.jsonl")
    records = list(v1.records)
    # The v1 file repeats the six conversations four times (24 lines, 32 image references), as upstream ships it.
    assert v1.format == "openai" and len(records) == 24 and all(r.error is None for r in records)
    assert [r.sample for r in records] == samples * 4
    assert v1.resolver.by_suffix == 32  # every `data/mllm_demo_data/...` path found by dropping `data/`
    assert records[0].sample["images"][0] == PEERS / "mllm_demo_data/1.jpg"
    assert samples[0]["images"] == [PEERS / "mllm_demo_data/1.jpg"] * 2


def test_detect_and_unknown_format(tmp_path):
    qa = {"messages": [{"role": "user", "content": "<image>Q?"}, {"role": "assistant", "content": "A"}], "images": ["a.png"]}
    assert detect(qa) == "sharegpt"
    assert detect({"conversations": [{"from": "human", "value": "hi"}]}) == "llava"
    assert detect({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]}) == "openai"
    assert detect({"image_path": "a.png", "text": "c"}) == "caption"
    assert detect({"image_path": "a.png", "instruction": "i", "input": "", "output": "o"}) == "instruction"
    assert detect({"question": "q", "answer": "a"}) is None and detect([1]) is None
    assert list(FORMATS) == ["sharegpt", "llava", "openai", "instruction", "caption"]
    src = _jsonl(tmp_path / "weird.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(VloraError, match="weird.jsonl: matches no known format") as e:
        read_annotations(src)
    assert "\n" not in str(e.value)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(VloraError, match="empty.jsonl: has no records"):
        read_annotations(tmp_path / "empty.jsonl")
    (tmp_path / "broken.json").write_text('[{"messages": ]')
    with pytest.raises(VloraError, match="broken.json: not valid JSON"):
        read_annotations(tmp_path / "broken.json")
    with pytest.raises(VloraError, match="unknown format 'alpaca'"):
        read_annotations(src, fmt="alpaca")
    # A forced format reads what detection would skip: here every record is bad_record.
    assert [r.error.reason for r in _records(src, fmt="caption")] == ["bad_record"]
    mixed = _jsonl(tmp_path / "mixed.jsonl", [qa, {"image_path": "a.png", "text": "c"}])
    assert _records(mixed)[1].error.detail == "'messages' must be a non-empty list (the record looks like caption, the file is read as sharegpt)"


def test_invalid_utf8_is_one_reject_naming_the_line(tmp_path):
    good = json.dumps({"image_path": "a.png", "text": "ok"}).encode()
    src = tmp_path / "u.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + good + b"\n\n" + good[:-2] + b'\xff"}\n' + good + b"\n")
    recs = _records(src)
    assert [(r.index, r.line, r.error.reason if r.error else None) for r in recs] == [(0, 1, None), (1, 3, "invalid_utf8"), (2, 4, None)]
    assert recs[1].error.detail.startswith("line 3: byte 0xff at column ")
    arr = tmp_path / "u.json"
    arr.write_bytes(b'[\n{"image_path": "a.png",\n "text": "\xff"}]')
    with pytest.raises(VloraError, match=r"u.json: line 3 is not valid UTF-8"):
        read_annotations(arr)
