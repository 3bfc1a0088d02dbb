"""`vlora generate`: several adapters on one 4-bit base, each request answered by its own adapter, exactly as that
adapter alone answers it; the base as `base`; the JSONL request file through the command line."""

import io
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from qwen_vl_utils import smart_resize
from helpers import REPO, clean_env, random_adapter
from vlora.errors import VloraError
from vlora.generate import (
    BASE, Answerer, Request, batches_longest_first, group_by_adapter, load_for_inference, parse_adapters,
    prompt_text, read_requests, request_from, split_answer,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

PIXELS = {"min_pixels": 3136, "max_pixels": 12544}
GEN = {"max_new_tokens": 6}


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    """Two adapters of the tiny base with different weights (drawn large, so each changes the answers)."""
    return {name: random_adapter(tiny_model_dir, tmp_path_factory.mktemp(name), seed=seed, targets=targets)
            for name, seed, targets in (("alpha", 1, "[llm_attn,llm_mlp]"), ("beta", 2, "[llm_attn,merger]"))}


@pytest.fixture(scope="module")
def requests(demo_src):
    """Four held-out demo questions with their images, as `vlora eval` builds them."""
    lines = (demo_src / "val.jsonl").read_text().splitlines()[:4]
    reqs = []
    for line in lines:
        rec = json.loads(line)
        image = (demo_src / rec["images"][0]).read_bytes()
        question = rec["messages"][0]["content"].replace("<image>", "")
        reqs.append(Request(messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
                            images=[image], id=rec["id"]))
    return reqs


def answers_with(tiny_model_dir, adapters: dict, reqs: list[Request], batch_size: int = 8) -> list[str]:
    model, processor = load_for_inference(str(tiny_model_dir), adapters, quant="nf4", dtype="fp32", device="cpu")
    return Answerer(model, processor, **PIXELS).run(reqs, batch_size=batch_size, **GEN)


def test_two_adapters_on_one_base_each_answer_as_when_loaded_alone(tiny_model_dir, adapters, requests):
    names = ["alpha", "beta", BASE]
    mixed = [Request(r.messages, r.images, adapter=names[i % 3], id=f"{r.id}/{names[i % 3]}")
             for i in range(3) for r in requests]  # alternating: alpha, beta, base, alpha, ...
    together = answers_with(tiny_model_dir, {k: str(v) for k, v in adapters.items()}, mixed, batch_size=3)
    alone = {name: answers_with(tiny_model_dir, {name: str(adapters[name])} if name != BASE else {},
                                [Request(r.messages, r.images, adapter=name) for r in requests])
             for name in names}
    for k, r in enumerate(mixed):
        assert together[k] == alone[r.adapter][requests.index(next(q for q in requests if r.id.startswith(q.id)))]
    # The adapters really differ from each other and from the base, so the comparison above can fail.
    assert alone["alpha"] != alone["beta"] and alone["alpha"] != alone[BASE] and alone["beta"] != alone[BASE]
    assert all(isinstance(a, str) for a in together) and any(together)


def test_batched_answers_equal_one_at_a_time(tiny_model_dir, adapters, requests):
    """Left padding and the attention mask: a request's greedy answer does not depend on its batch-mates."""
    reqs = [Request(r.messages, r.images, adapter="alpha") for r in requests]
    reqs.append(Request([{"role": "user", "content": "Say something long about colours and shapes."}], [],
                        adapter="alpha"))  # text-only, a different length: padding matters
    batched = answers_with(tiny_model_dir, {"alpha": str(adapters["alpha"])}, reqs, batch_size=5)
    single = answers_with(tiny_model_dir, {"alpha": str(adapters["alpha"])}, reqs, batch_size=1)
    assert batched == single


def test_the_command_reads_jsonl_requests_and_writes_one_answer_line_each(tiny_model_dir, adapters, demo_src,
                                                                          tmp_path):
    lines = (demo_src / "val.jsonl").read_text().splitlines()[:2]
    reqs = []
    for i, line in enumerate(lines):
        rec = json.loads(line)
        reqs.append({"id": f"q{i}", "adapter": ["alpha", "beta"][i], "prompt": rec["messages"][0]["content"].replace("<image>", ""),
                     "images": [str(demo_src / rec["images"][0])]})
    reqs.append({"id": "q2", "adapter": "base", "prompt": "Hello"})
    path = tmp_path / "requests.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in reqs))
    proc = subprocess.run(
        [sys.executable, "-m", "vlora.cli", "generate", "--model", str(tiny_model_dir), "--adapter",
         f"alpha={adapters['alpha']}", "--adapter", f"beta={adapters['beta']}", "--requests", str(path),
         "--max-new-tokens", "6", "--dtype", "fp32", "--device", "cpu", "--min-pixels", "3136",
         "--max-pixels", "12544"], capture_output=True, text=True, cwd=REPO, env=clean_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = {r["id"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert sorted(out) == ["q0", "q1", "q2"] and [out[f"q{i}"]["adapter"] for i in range(3)] == ["alpha", "beta", "base"]
    expected = answers_with(tiny_model_dir, {k: str(v) for k, v in adapters.items()}, read_requests(str(path), "alpha"))
    assert [out[f"q{i}"]["answer"] for i in range(3)] == expected


def test_one_prompt_streams_the_answer_the_batch_gives(tiny_model_dir, adapters, demo_src):
    """`vlora generate --prompt`: the streamed tokens add up to the answer `--requests` gives for the same input; with
    --boxes original a box off the image is one line naming the request."""
    rec = json.loads((demo_src / "val.jsonl").read_text().splitlines()[0])
    question, image = rec["messages"][0]["content"].replace("<image>", ""), str(demo_src / rec["images"][0])
    command = [sys.executable, "-m", "vlora.cli", "generate", "--model", str(tiny_model_dir), "--adapter",
               f"alpha={adapters['alpha']}", "--image", image, "--max-new-tokens", "6", "--dtype", "fp32",
               "--device", "cpu", "--min-pixels", "3136", "--max-pixels", "12544"]
    proc = subprocess.run(command + ["--prompt", question], capture_output=True, text=True, cwd=REPO,
                          env=clean_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    request = request_from({"prompt": question, "images": [image], "id": "prompt"}, "alpha", REPO, "prompt")
    [expected] = answers_with(tiny_model_dir, {"alpha": str(adapters["alpha"])}, [request])
    assert proc.stdout.strip() == expected
    proc = subprocess.run(command + ["--boxes", "original", "--prompt", "<|box_start|>(5,5),(500,9)<|box_end|>?"],
                          capture_output=True, text=True, cwd=REPO, env=clean_env(), timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].endswith(
        "request prompt: bad_box: message 0 (user): box '<|box_start|>(5,5),(500,9)<|box_end|>' has x 500 beyond the "
        "image (image 0 is 112x112)"), proc.stderr[-2000:]


def test_requests_are_grouped_by_adapter_and_batched_longest_first():
    reqs = [Request([{"role": "user", "content": "x" * n}], adapter=a) for n, a in
            ((5, "a"), (50, "b"), (20, "a"), (30, "a"), (1, "b"))]
    assert group_by_adapter(reqs) == [("a", [0, 2, 3]), ("b", [1, 4])]
    assert list(batches_longest_first([0, 2, 3], reqs, 2)) == [[3, 2], [0]]


def test_split_answer_keeps_earlier_turns_and_returns_the_last_answer():
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
            {"role": "user", "content": [{"type": "text", "text": "And the shape?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "circle"}]}]
    prompt, reference = split_answer(msgs)
    assert reference == "circle" and prompt == msgs[:3]
    assert prompt_text(prompt) == "And the shape?"
    assert split_answer(msgs[:1]) == (msgs[:1], "")


def test_bad_adapter_names_and_request_lines_are_one_line_errors(tmp_path):
    assert parse_adapters(["a=/x", "/runs/demo/adapter"]) == {"a": "/x", "adapter": "/runs/demo/adapter"}
    for bad in (["base=/x"], ["a=/x", "a=/y"], ["=/x"]):
        with pytest.raises(VloraError, match="adapter names must be unique"):
            parse_adapters(bad)
    path = tmp_path / "r.jsonl"
    path.write_text('{"prompt": "hi"}\n{"prompt": "x", "images": ["missing.png"]}\n')
    with pytest.raises(VloraError, match=r"r.jsonl line 2: FileNotFoundError"):
        read_requests(str(path), BASE)
    path.write_text('{"prompt": "hi"}\nnot json\n')
    with pytest.raises(VloraError, match=r"r.jsonl line 2: JSONDecodeError"):
        read_requests(str(path), BASE)


class EchoModel(torch.nn.Module):
    """generate's stand-in: keeps the prompt ids it was given and answers every row with `answer_ids`."""

    def __init__(self, answer_ids: list[int]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))  # Answerer puts the inputs on the model's device
        self.model = SimpleNamespace(visual=SimpleNamespace(dtype=torch.float32))  # the vision tower's dtype
        self.answer_ids, self.prompts = answer_ids, None

    def generate(self, input_ids, **kwargs):
        self.prompts = input_ids
        return torch.cat([input_ids, torch.tensor([self.answer_ids] * len(input_ids))], dim=1)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])  # absolute on the resized image; relative 0-1000
def test_boxes_in_image_pixels_reach_the_model_in_its_convention_and_come_back(family, tiny_models):
    """Answerer(boxes=the family's convention), as vlora eval and in-training exact match use it: a prompt's box in
    the image's pixels reaches the model as training's collator converts it, and the model's answer box comes back
    in the image's pixels, its grounding markers kept; without `boxes` both pass as written."""
    from vlora import families
    from vlora.model import load_processor

    fam = families.get(family)
    processor = load_processor(str(tiny_models(family)))
    tok = processor.tokenizer
    w, h = 517, 389
    png = io.BytesIO()
    Image.new("RGB", (w, h), "white").save(png, "PNG")
    nh, nw = smart_resize(h, w, factor=fam.resize_factor, **PIXELS)
    if fam.boxes == "absolute":
        (sx, sy), model_corners = (nw / w, nh / h), ((nw // 2, nh // 3), (nw - 1, nh - 1))
    else:
        (sx, sy), model_corners = (1000 / w, 1000 / h), ((500, 333), (1000, 1000))
    answer = "<|object_ref_start|>cat<|object_ref_end|><|box_start|>({},{}),({},{})<|box_end|>".format(
        *model_corners[0], *model_corners[1])
    answer_ids = tok(answer)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")] * 2
    question = "What is in <|box_start|>(100,50),(300,200)<|box_end|>?"
    request = Request(messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
                      images=[png.getvalue()], id="q1")

    model = EchoModel(answer_ids)
    [mine] = Answerer(model, processor, **PIXELS, boxes=fam.boxes).answer([request])
    prompt = tok.decode(model.prompts[0])
    assert f"<|box_start|>({round(100 * sx)},{round(50 * sy)}),({round(300 * sx)},{round(200 * sy)})<|box_end|>" in prompt
    (x1, y1), (x2, y2) = model_corners
    assert mine == (f"<|object_ref_start|>cat<|object_ref_end|><|box_start|>({round(x1 / sx)},{round(y1 / sy)}),"
                    f"({round(x2 / sx)},{round(y2 / sy)})<|box_end|>")
    if fam.boxes == "relative":
        assert (round(x2 / sx), round(y2 / sy)) == (w, h)  # 1000 is the image's far edge

    [as_written] = Answerer(model, processor, **PIXELS).answer([request])
    assert question in tok.decode(model.prompts[0]) and as_written == answer

    outside = Request(messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text":
                                "<|box_start|>(600,50),(700,60)<|box_end|>"}]}], images=[png.getvalue()], id="q2")
    with pytest.raises(VloraError, match=r"^request q2: bad_box: message 0 \(user\): box .*\(600,50\),\(700,60\)"):
        Answerer(model, processor, **PIXELS, boxes=fam.boxes).answer([outside])
