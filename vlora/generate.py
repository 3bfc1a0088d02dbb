"""Answers from a base model with zero or more named LoRA adapters: `vlora generate`, and the generation step of
`vlora eval` and of in-training evaluation (`run.eval_generate`).

A request is the conversation up to the answer (the shard layout's canonical messages) with its images as file
bytes, and the name of the adapter that answers it (`base` = no adapter). What is batched how:
  - requests are grouped by adapter, and each group runs as batches of `batch_size` (longest prompts first, so
    a batch pads little), left-padded, through `model.generate`; one adapter is active per batch (peft's
    mixed-adapter batches do not cover LoRA on the merger or the vision tower, nor DoRA);
  - `base` runs the same batches with every adapter disabled (peft's `disable_adapter`), on the same weights.
Images are resized exactly as in training (qwen-vl-utils with the given pixel budget, then the processor without
resizing), so an adapter sees at inference the image tokens it was trained on.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterable, Iterator

import torch

from vlora.errors import VloraError

BASE = "base"  # the adapter name that means: no adapter


@dataclass
class Request:
    messages: list[dict]  # canonical messages (vlora.data.formats), ending with the turn to answer
    images: list[bytes] = field(default_factory=list)  # one file per {"type": "image"} part, in reading order
    adapter: str = BASE
    id: str = ""
    max_new_tokens: int | None = None  # this request's own budget (vlora eval: its task's); None: the call's


@dataclass
class Prepared:
    messages: list[dict]  # the request's messages, boxes in the model's convention
    images: list  # PIL images, resized as in training
    last_image: tuple[tuple[int, int], tuple[int, int]] | None = None  # (original, resized) size: answers' boxes


def split_answer(messages: list[dict]) -> tuple[list[dict], str]:
    """(the messages before the last assistant turn, that turn's text): a held-out sample as prompt + reference.

    Earlier turns stay in the prompt as they were written (teacher forcing): only the last answer is generated.
    """
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        return messages, ""
    content = messages[last]["content"]
    text = content if isinstance(content, str) else "".join(p.get("text", "") for p in content
                                                            if p.get("type") == "text")
    return messages[:last], text


def prompt_text(messages: list[dict]) -> str:
    """The user-visible text of the last user turn (for reports): its text parts, images left out."""
    for m in reversed(messages):
        if m["role"] == "user":
            content = m["content"]
            return content if isinstance(content, str) else " ".join(
                p["text"] for p in content if p.get("type") == "text").strip()
    return ""


class Answerer:
    """Batched answers from a peft model (or a plain transformers model) and its processor.

    `min_pixels` / `max_pixels`: the pixel budget the adapter was trained with (data.min_pixels / max_pixels).
    `synced_gpus`: every rank runs generate's forwards in step until all ranks are done (ZeRO-3, where each forward
    gathers weights with collectives; transformers' own flag).
    `boxes`: the model family's grounding convention when prompts and answers hold boxes in the image's own pixels,
    as training data does (data.boxes=original): a prompt's boxes are converted as the collator converts them, an
    answer's mapped back to the last image's pixels (vlora.data.grounding). None: text passes untouched.
    """

    def __init__(self, model, processor, *, min_pixels: int, max_pixels: int, synced_gpus: bool = False,
                 boxes: str | None = None):
        from vlora.data.collate import Collator

        self.model, self.processor, self.synced_gpus, self.boxes = model, processor, synced_gpus, boxes
        # The training collator's image loading: the same resizing, the same per-image keys.
        self.images = Collator(processor, min_pixels=min_pixels, max_pixels=max_pixels, max_length=1 << 30)
        tok = processor.tokenizer
        self.stop_ids = [i for i in (tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id) if i is not None]
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.stop_ids[0]
        # Special tokens are left out of answers, except the grounding markers (<|box_start|>...): an answer's box
        # must keep them to be read, mapped back and scored as the reference's is.
        from vlora.data.grounding import MARKERS

        special = {i for i, t in tok.added_tokens_decoder.items() if t.special} | set(tok.all_special_ids)
        self.hidden_ids = special - {i for i, t in tok.added_tokens_decoder.items() if t.content in MARKERS}
        self.hidden_ids |= {self.pad_id, *self.stop_ids}

    def decode(self, ids: list[int]) -> str:
        """An answer's text from its new token ids: special tokens dropped, grounding markers kept."""
        return self.processor.tokenizer.decode([i for i in ids if i not in self.hidden_ids],
                                               skip_special_tokens=False)

    def prepare(self, request: Request) -> Prepared:
        """The request's images, resized as in training, and its messages with their boxes converted."""
        images, originals = self.images.load_images(request.messages, request.images)
        if not (self.boxes and images):
            return Prepared(request.messages, images)
        from vlora.data.formats import RecordError
        from vlora.data.grounding import convert_boxes

        resized = [im.size for im in images]
        try:
            messages = convert_boxes(request.messages, originals, resized, self.boxes)
        except RecordError as e:
            raise VloraError(f"request {request.id or '(no id)'}: {e}") from None
        return Prepared(messages, images, (originals[-1], resized[-1]))

    def inputs(self, requests: list[Request], prepared: list[Prepared] | None = None):
        """The processor's tensors for a batch, on the CPU: chat template, images resized as in training, left
        padding. Needs no model (`vlora serve` counts a request's prompt tokens with it before queueing it)."""
        prepared = prepared or [self.prepare(r) for r in requests]
        texts = [self.processor.apply_chat_template(p.messages, tokenize=False, add_generation_prompt=True)
                 for p in prepared]
        images = [im for p in prepared for im in p.images]
        return self.processor(text=texts, images=images or None, do_resize=False, padding=True, padding_side="left",
                              return_tensors="pt")

    def encode(self, requests: list[Request], prepared: list[Prepared] | None = None) -> dict:
        enc = self.inputs(requests, prepared)
        device = next(self.model.parameters()).device
        dtype = vision_dtype(self.model)
        return {k: v.to(device, dtype=dtype if k == "pixel_values" else None) for k, v in enc.items()}

    @torch.no_grad()
    def answer(self, requests: list[Request], *, max_new_tokens: int = 32, do_sample: bool = False,
               temperature: float = 1.0, top_p: float = 1.0, streamer=None,
               stop_strings: list[str] | None = None) -> list[str]:
        """One batch, all with the adapter that is active now; the answers, special tokens stripped.

        `stop_strings`: a row also ends once its text contains one of them (transformers' StopStringCriteria;
        the string stays in the answer: the caller cuts it)."""
        prepared = [self.prepare(r) for r in requests]
        enc = self.encode(requests, prepared)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else {
            "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        if stop_strings:
            sampling.update(stop_strings=list(stop_strings), tokenizer=self.processor.tokenizer)
        out = self.model.generate(**enc, max_new_tokens=max_new_tokens, use_cache=True, eos_token_id=self.stop_ids,
                                  pad_token_id=self.pad_id, synced_gpus=self.synced_gpus, streamer=streamer,
                                  **sampling)
        new = out[:, enc["input_ids"].shape[1]:]
        texts = [self.decode(row).strip() for row in new.tolist()]
        if not self.boxes:
            return texts
        from vlora.data.grounding import to_original

        return [to_original(t, self.boxes, *p.last_image) if p.last_image else t for t, p in zip(texts, prepared)]

    def run(self, requests: list[Request], *, batch_size: int = 8, on_answer: Callable | None = None,
            **gen) -> list[str]:
        """Answers to every request, in request order; `on_answer(request, answer)` as each batch finishes."""
        answers: list[str | None] = [None] * len(requests)
        for name, idx in group_by_adapter(requests):
            with self.use_adapter(name):
                for budget, batch in budget_batches(idx, requests, batch_size):
                    batch_gen = gen if budget is None else {**gen, "max_new_tokens": budget}
                    for i, text in zip(batch, self.answer([requests[i] for i in batch], **batch_gen)):
                        answers[i] = text
                        if on_answer is not None:
                            on_answer(requests[i], text)
        return answers  # type: ignore[return-value]

    @contextlib.contextmanager
    def use_adapter(self, name: str) -> Iterator[None]:
        """Make `name` the active adapter for the block (`base`: none), then restore the one active before."""
        if not hasattr(self.model, "peft_config"):
            if name != BASE:
                raise VloraError(f"adapter '{name}' requested, but the model was loaded without adapters")
            yield
            return
        if name == BASE:
            with self.model.disable_adapter():
                yield
            return
        if name not in self.model.peft_config:
            raise VloraError(f"no adapter named '{name}'; loaded: {', '.join(sorted(self.model.peft_config))}, base")
        before = self.model.active_adapter
        self.model.set_adapter(name)
        try:
            yield
        finally:
            self.model.set_adapter(before)


def vision_dtype(model) -> torch.dtype:
    """The dtype pixels go into the vision tower in (never quantized; a peft model or a plain one)."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    return hf.model.visual.dtype


def group_by_adapter(requests: list[Request]) -> list[tuple[str, list[int]]]:
    """[(adapter, request indices)] in order of first appearance: one adapter switch per group."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault(r.adapter, []).append(i)
    return list(groups.items())


def budget_batches(idx: list[int], requests: list[Request], batch_size: int) -> list[tuple[int | None, list[int]]]:
    """[(max_new_tokens, batch)]: `idx` grouped by each request's own budget (smallest first; None, the call's,
    last), each group in batches longest first. A batch generates until its longest answer ends, so requests with
    a short budget (a one-word VQA answer) never wait on a caption's; the base model, which rarely stops by
    itself, then costs each request its own budget."""
    groups: dict[int | None, list[int]] = {}
    for i in idx:
        groups.setdefault(requests[i].max_new_tokens, []).append(i)
    return [(budget, batch) for budget, same in sorted(groups.items(), key=lambda g: (g[0] is None, g[0] or 0))
            for batch in batches_longest_first(same, requests, batch_size)]


def batches_longest_first(idx: list[int], requests: list[Request], batch_size: int) -> Iterable[list[int]]:
    """Batches of indices, longest conversations first (a proxy for prompt length that needs no tokenizer)."""
    size = lambda i: len(json.dumps(requests[i].messages)) + 1000 * len(requests[i].images)  # noqa: E731
    ordered = sorted(idx, key=lambda i: (-size(i), i))
    return [ordered[k:k + batch_size] for k in range(0, len(ordered), batch_size)]


# ---------------------------------------------------------------------------------------------------------------
# Loading, and the `vlora generate` command


def load_for_inference(base: str, adapters: dict[str, str], *, quant: str = "nf4", dtype: str = "auto",
                       device: str | None = None):
    """(model, processor): the base (4-bit LLM linears, or unquantized) with every adapter loaded under its name."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlora.model import four_bit_config

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = resolve_dtype(dtype, dev)
    qcfg = None if quant == "none" else four_bit_config(quant, torch_dtype)  # as in training
    try:
        model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch_dtype, quantization_config=qcfg,
                                                            device_map={"": dev})
        processor = AutoProcessor.from_pretrained(base)
    except (OSError, ValueError) as e:
        raise VloraError(f"cannot load base model '{base}': {str(e).strip().splitlines()[0]}") from None
    if qcfg is not None:
        from vlora.model import keep_training_layout

        keep_training_layout(model)  # the adapter was trained on this layout; the CPU inference repack differs
    from vlora.kernels import lean_vision_tower, matmul_patch_embed

    lean_vision_tower(model)  # as in training: bit-identical, fewer operator calls
    matmul_patch_embed(model)  # as in training by default (model.matmul_patch_embed): equal within fp32 rounding
    model.eval()
    if adapters:
        from peft import PeftModel

        for k, (name, path) in enumerate(adapters.items()):
            if not (Path(path) / "adapter_config.json").is_file():
                raise VloraError(f"adapter '{name}': {path} holds no adapter_config.json (a PEFT adapter folder)")
            if k == 0:
                model = PeftModel.from_pretrained(model, path, adapter_name=name, is_trainable=False)
            else:
                model.load_adapter(path, adapter_name=name, is_trainable=False)
        model.set_adapter(next(iter(adapters)))
        model.eval()
    return model, processor


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if name not in table:
        raise VloraError(f"--dtype must be auto, fp32, bf16 or fp16; got {name}")
    return table[name]


def parse_adapters(items: list[str]) -> dict[str, str]:
    """`NAME=DIR` items (a bare DIR is named after its folder) -> {name: dir}; `base` is reserved."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).name or "adapter", item
        if name == BASE or name in out or not name:
            raise VloraError(f"--adapter {item}: adapter names must be unique, non-empty and not '{BASE}'")
        out[name] = path
    return out


def read_requests(path: str, default_adapter: str) -> list[Request]:
    """A JSONL file of requests: {"id"?, "adapter"?, "prompt", "images"?: [paths]} or {"messages", "images"?}."""
    requests = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                requests.append(request_from(rec, default_adapter, Path(path).parent, f"{path}:{n}"))
            except (ValueError, KeyError, TypeError, OSError) as e:
                raise VloraError(f"{path} line {n}: {type(e).__name__}: {e}") from None
    return requests


def request_from(rec: dict, adapter: str, root: Path, where: str) -> Request:
    images = [Path(p) if Path(p).is_absolute() else root / p for p in rec.get("images", [])]
    if "messages" in rec:
        messages = rec["messages"]
    else:
        parts = [{"type": "image"} for _ in images] + [{"type": "text", "text": rec["prompt"]}]
        messages = [{"role": "user", "content": parts}]
    return Request(messages=messages, images=[p.read_bytes() for p in images], adapter=rec.get("adapter", adapter),
                   id=str(rec.get("id", where)))


def cmd_generate(args) -> int:
    adapters = parse_adapters(args.adapter or [])
    default = next(iter(adapters), BASE)
    if args.requests:
        requests = read_requests(args.requests, default)
    elif args.prompt is not None:
        rec = {"prompt": args.prompt, "images": [str(Path(p).resolve()) for p in args.image or []], "id": "prompt"}
        requests = [request_from(rec, a, Path.cwd(), "prompt") for a in (args.use or [default])]
    else:
        raise VloraError("give --prompt (with --image) or --requests FILE.jsonl")
    model, processor = load_for_inference(args.model, adapters, quant=args.quant, dtype=args.dtype,
                                          device=args.device)
    from vlora import families

    boxes = families.of_config(model.config).box_convention(args.boxes)
    answerer = Answerer(model, processor, min_pixels=args.min_pixels, max_pixels=args.max_pixels, boxes=boxes)
    gen = {"max_new_tokens": args.max_new_tokens, "do_sample": args.temperature > 0,
           "temperature": args.temperature or 1.0, "top_p": args.top_p}
    if len(requests) == 1 and not args.requests:  # one answer: stream its tokens as they come
        from transformers import TextStreamer

        if boxes:  # the streamed tokens would hold the model's coordinates, not the image's pixels
            with answerer.use_adapter(requests[0].adapter):
                print(answerer.answer(requests, **gen)[0], flush=True)
            return 0

        with answerer.use_adapter(requests[0].adapter):
            # The streamer decodes as the answer is decoded (grounding markers kept); it only calls `decode`, with a
            # list of ids or one id.
            decoder = SimpleNamespace(decode=lambda ids, **_: answerer.decode(ids if isinstance(ids, list) else [ids]))
            answerer.answer(requests, streamer=TextStreamer(decoder, skip_prompt=True), **gen)
        return 0

    def emit(request: Request, text: str) -> None:  # one JSON line per answer, as its batch finishes
        print(json.dumps({"id": request.id, "adapter": request.adapter, "answer": text}, ensure_ascii=False),
              flush=True)

    answerer.run(requests, batch_size=args.batch_size, on_answer=emit, **gen)
    return 0


def add_generate_parser(sub) -> None:
    from vlora.config import DataArgs
    from vlora.families import BOX_MODES

    g = sub.add_parser("generate", help="answer prompts with a base model and named adapters (streamed to stdout)")
    g.add_argument("--model", required=True, help="the base model folder (or hub id) the adapters were trained on")
    g.add_argument("--adapter", action="append", metavar="NAME=DIR", help="an adapter folder under a name; repeatable")
    g.add_argument("--use", action="append", metavar="NAME", help="with --prompt: answer with these (default: the first adapter); 'base' = no adapter")
    g.add_argument("--prompt", help="one question (streams its tokens)")
    g.add_argument("--image", action="append", help="an image for --prompt; repeatable")
    g.add_argument("--requests", help='a JSONL file of {"id", "adapter", "prompt", "images"} (or "messages") requests; one JSON answer line each')
    g.add_argument("--quant", default="nf4", choices=["nf4", "fp4", "none"], help="the base's LLM linears in 4 bit (as trained) or unquantized")
    g.add_argument("--dtype", default="auto", help="auto (bf16 on a GPU that has it, else fp32) | fp32 | bf16 | fp16")
    g.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--min-pixels", type=int, default=DataArgs.min_pixels, help="the run's data.min_pixels")
    g.add_argument("--max-pixels", type=int, default=DataArgs.max_pixels, help="the run's data.max_pixels")
    g.add_argument("--boxes", choices=BOX_MODES, default="as_written",
                   help="grounding boxes in prompts and answers: in the model's own convention, as vLLM and `vlora "
                        "serve` take and give them (default), or in the image's pixels, converted both ways as "
                        "training converts its data (original)")
    g.set_defaults(func=cmd_generate)
