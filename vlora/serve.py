"""`vlora serve`: an OpenAI-compatible HTTP endpoint over `vlora generate`'s code, one adapter per request.

    POST /v1/chat/completions   OpenAI's chat format: text and images (data: URLs; files under --image-root;
                                http(s) URLs only with --allow-remote-images), `model` = the adapter (`base`: none),
                                max_tokens / max_completion_tokens, temperature, top_p, stop, stream (SSE), usage
    GET  /v1/models             the base and the adapters
    GET  /health                whether the worker is alive, and how many requests wait and run

How a request travels: the handler checks it, reads its images and counts its prompt tokens (template and image
tokens included) in a thread of its own, so a bad request gets its 4xx at once and never reaches the model; a good
one goes into a bounded queue (full: 503). One worker thread owns the model (torch's generate is not safe to run
concurrently on one model): it takes everything queued, groups it as `vlora generate` does (`group_by_adapter`,
then per request budget, `budget_batches`, longest first) and answers a batch at a time with `Answerer.answer`,
the same call `vlora generate` makes, so an answer equals `vlora generate`'s for the same input and settings.
Requests that want different sampling settings or stop strings do not share a batch (generate takes them per call).

Defaults follow `vlora generate`: greedy unless the request sets temperature > 0, --max-new-tokens tokens.
Streaming sends each request's text as its batch generates it (a streamer that follows every row of the batch),
holding back only what may still change (see StreamText), so the deltas add up to exactly the non-streamed answer.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import hmac
import ipaddress
import json
import logging
import os
import queue
import re
import socket
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from transformers.generation.streamers import BaseStreamer

from vlora.errors import VloraError
from vlora.generate import BASE, Answerer, Request, budget_batches, group_by_adapter, load_for_inference, parse_adapters

log = logging.getLogger("uvicorn.error")  # uvicorn configures and prints this one: one log for the whole server

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOPS = 4  # OpenAI's limit on `stop` strings
UNSUPPORTED = ("tools", "functions", "logprobs", "response_format")  # refused when set (response_format: text is fine)
REMOTE_TIMEOUT_S = 10


@dataclass
class ServeOptions:
    max_new_tokens: int = 64  # a request's budget when it names none (vlora generate's default)
    max_output_tokens: int = 2048  # the most a request may ask for
    max_input_tokens: int = 8192  # prompt tokens after the chat template, image tokens included
    max_queue: int = 64
    batch_size: int = 8
    image_root: Path | None = None  # local image paths are read under this folder only; None: refused
    allow_remote_images: bool = False
    api_key: str | None = None


class ApiError(Exception):
    """An answer other than 200, as OpenAI writes it: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, one_line(message), kind, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def one_line(text: object) -> str:
    return " ".join(str(text).split())[:500]


def bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


# ---------------------------------------------------------------------------------------------------------------
# A request's body -> a vlora Request and its settings


@dataclass
class Call:
    request: Request  # canonical messages, image bytes, adapter, max_new_tokens
    sampling: dict  # Answerer.answer's do_sample / temperature / top_p
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    prompt_tokens: int = 0

    @property
    def batch_key(self) -> tuple:
        """What one model.generate call shares: requests that differ here go in different batches."""
        return tuple(sorted(self.sampling.items())), self.stop


def parse_settings(body: dict, opts: ServeOptions) -> dict:
    """max_new_tokens, sampling, stop, stream and include_usage from a chat request's body, checked."""
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = opts.max_new_tokens
    if type(max_tokens) is not int or not 1 <= max_tokens <= opts.max_output_tokens:
        raise bad(f"max_tokens must be an integer from 1 to {opts.max_output_tokens}; got {max_tokens!r}", "max_tokens")
    temperature = number(body, "temperature", 0.0, 0.0, 2.0)
    top_p = number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise bad("top_p must be above 0", "top_p")
    if body.get("n", 1) != 1:
        raise bad(f"n must be 1 (one answer per request); got {body['n']!r}", "n")
    for key in UNSUPPORTED:  # an answer that silently ignored them would look like one that honoured them
        if body.get(key) and body[key] != {"type": "text"}:
            raise bad(f"{key} is not supported by vlora serve", key)
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOPS or not all(isinstance(s, str) and s for s in stop):
        raise bad(f"stop must be a non-empty string or a list of at most {MAX_STOPS} of them", "stop")
    stream, options = body.get("stream", False), body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise bad("stream must be true or false, stream_options an object", "stream")
    # As `vlora generate`: temperature 0 (the default) is greedy, and then temperature and top_p play no part.
    sampling = ({"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0
                else {"do_sample": False})
    return {"max_new_tokens": max_tokens, "sampling": sampling, "stop": tuple(dict.fromkeys(stop)),
            "stream": stream, "include_usage": bool(options.get("include_usage"))}


def number(body: dict, key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise bad(f"{key} must be a number from {low:g} to {high:g}; got {value!r}", key)
    return float(value)


class ImageReader:
    """Image bytes behind an image_url part, checked as `vlora pack` checks them (decodable, size, aspect ratio)."""

    def __init__(self, opts: ServeOptions):
        self.root = Path(os.path.realpath(opts.image_root)) if opts.image_root is not None else None
        self.remote = opts.allow_remote_images

    def __call__(self, ref: str, where: str, i: int) -> bytes:
        from vlora.data.formats import RecordError
        from vlora.data.pack import read_image

        try:
            if ref.startswith("data:"):
                return read_image(ref, i)[0]
            if ref.startswith(("http://", "https://")):
                return read_image(self.fetch(ref, where), i)[0]
            return read_image(self.local(ref, where), i)[0]
        except RecordError as e:  # PIL names the in-memory file it could not read: say nothing of it
            message = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))
            raise ApiError(400, f"{where}: {message}", code="bad_image", param=where) from None

    def local(self, ref: str, where: str) -> Path:
        if self.root is None:
            raise ApiError(403, f"{where}: local image paths are refused; send a data: URL, or start the server with "
                                "--image-root DIR", code="image_path_refused", param=where)
        path = Path(ref.removeprefix("file://"))
        # realpath: `..` and symlinks are followed as open() would follow them, then the result must be inside.
        real = Path(os.path.realpath(self.root / path))
        if real != self.root and self.root not in real.parents:
            raise ApiError(403, f"{where}: {ref[:100]} is outside --image-root {self.root}",
                           code="image_path_refused", param=where)
        return real

    def fetch(self, url: str, where: str) -> str:
        """The image at `url` as a data: URL (read_image checks those); only with --allow-remote-images."""
        from vlora.data.pack import MAX_IMAGE_BYTES

        if not self.remote:
            raise ApiError(403, f"{where}: remote image URLs are refused; send a data: URL, or start the server with "
                                "--allow-remote-images", code="remote_image_refused", param=where)
        try:
            with urllib.request.urlopen(url, timeout=REMOTE_TIMEOUT_S) as r:  # noqa: S310 (http(s) only, above)
                data = r.read(MAX_IMAGE_BYTES + 1)
        except (OSError, ValueError) as e:
            raise ApiError(400, f"{where}: cannot fetch {url[:100]}: {e}", code="bad_image", param=where) from None
        return "data:;base64," + base64.b64encode(data).decode()


def parse_messages(messages, read_image: ImageReader) -> tuple[list[dict], list[bytes]]:
    """OpenAI chat messages -> (vlora's canonical messages, one image's bytes per {"type": "image"}, in order).

    Text stays as written: an `<image>` in it is text here, not a placeholder as in annotation files."""
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list", "messages")
    out: list[dict] = []
    images: list[bytes] = []
    for j, m in enumerate(messages):
        where = f"messages[{j}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise bad(f"{where}.role must be one of system, developer, user, assistant", where)
        role, content = ROLES[m["role"]], m.get("content")
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        elif isinstance(content, list) and content:
            parts = [content_part(p, f"{where}.content[{k}]", role, read_image, images) for k, p in enumerate(content)]
        else:
            raise bad(f"{where}.content must be a string or a non-empty list of parts", where)
        out.append({"role": role, "content": parts})
    return out, images


def content_part(part, where: str, role: str, read_image: ImageReader, images: list[bytes]) -> dict:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise bad(f"{where}: a text part needs a 'text' string", where)
        return {"type": "text", "text": part["text"]}
    if kind != "image_url":
        raise bad(f"{where}: unsupported part type {kind!r}; use text or image_url", where)
    if role != "user":
        raise bad(f"{where}: images go in user messages", where)
    ref = part.get("image_url")
    ref = ref.get("url") if isinstance(ref, dict) else ref
    if not isinstance(ref, str) or not ref:
        raise bad(f"{where}: image_url needs a 'url' string", where)
    images.append(read_image(ref, where, len(images)))
    return {"type": "image"}


# ---------------------------------------------------------------------------------------------------------------
# Stop strings and streamed text


def cut_at_stop(text: str, stops) -> tuple[str, bool]:
    """(text up to the stop string that is completed first, whether one was): what generation stopped at."""
    found = [(i + len(s), i) for s in stops if (i := text.find(s)) >= 0]
    if not found:
        return text, False
    return text[:min(found)[1]], True


class StreamText:
    """The deltas of one streamed answer, which add up to exactly the non-streamed answer (the decoded text,
    stripped, cut at the first stop string). In: the row's decoded text so far; out: what can no longer change.
    Held back until more comes: leading and trailing whitespace (the answer is stripped), U+FFFD (a character
    whose UTF-8 bytes are not all generated yet decodes as one), and the last len(stop) - 1 characters, where a
    stop string may begin. Once a stop string shows, nothing more is sent until the answer itself comes."""

    TAIL = re.compile(r"[\s\ufffd]+$")

    def __init__(self, stops=()):
        self.stops, self.sent, self.stopped = tuple(stops), "", False
        self.hold = max((len(s) for s in self.stops), default=1) - 1

    def feed(self, raw: str) -> str:
        text = raw.lstrip()
        if self.stopped or cut_at_stop(text, self.stops)[1]:
            self.stopped = True
            return ""
        safe = self.TAIL.sub("", text[:max(0, len(text) - self.hold)])
        return self._send(safe) if len(safe) > len(self.sent) and safe.startswith(self.sent) else ""

    def finish(self, answer: str) -> str:
        if not answer.startswith(self.sent):  # should not happen: decoding a longer row changed its start
            log.warning("vlora serve: streamed text %r is not a prefix of the answer %r", self.sent[:80], answer[:80])
            return ""
        return self._send(answer)

    def _send(self, upto: str) -> str:
        delta, self.sent = upto[len(self.sent):], upto
        return delta


class RowStreamer(BaseStreamer):
    """transformers' streamer hook for a whole batch (its own streamers take one row): each row's new token ids,
    counted up to its end (a stop id, or a stop string, where transformers' StopStringCriteria ends it too; after
    that generate pads the row); a streaming request gets its text so far after every token."""

    def __init__(self, jobs: list["Job"], decode: Callable[[list[int]], str], stop_ids: list[int]):
        self.jobs, self.decode, self.stop_ids = jobs, decode, set(stop_ids)
        self.ids: list[list[int]] = [[] for _ in jobs]
        self.ended = [False] * len(jobs)
        self.prompt = True

    def put(self, value) -> None:
        if self.prompt:  # generate first puts the prompt
            self.prompt = False
            return
        for i, row in enumerate(value.reshape(len(self.jobs), -1).tolist()):
            for token in row:
                if self.ended[i]:
                    break
                self.ids[i].append(token)
                self.ended[i] = token in self.stop_ids
                self._text(i)

    def _text(self, i: int) -> None:
        call = self.jobs[i].call
        if not (call.stream or call.stop):
            return
        text = self.decode(self.ids[i])  # as Answerer.answer decodes the whole answer
        if call.stop and cut_at_stop(text, call.stop)[1]:
            self.ended[i] = True
        if call.stream:
            self.jobs[i].send("text", text)

    def end(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------------------------
# The queue and the worker that owns the model


@dataclass
class Answer:
    content: str
    completion_tokens: int
    finish_reason: str  # "stop" (end of turn or a stop string) | "length" (max_tokens)


@dataclass
class Job:
    """A queued Call and the way back to its handler: events put on the handler's event loop."""
    call: Call
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False  # the client went away: not worth generating for

    def send(self, kind: str, value) -> None:
        """("text", decoded so far) | ("done", Answer) | ("error", ApiError), from the worker's thread."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: the server is gone, nobody waits
            pass


class Worker:
    """The one thread that runs the model: takes whatever is queued, answers it a batch at a time."""

    def __init__(self, answerer: Answerer, opts: ServeOptions):
        self.answerer, self.batch_size = answerer, opts.batch_size
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=opts.max_queue)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.loop, name="vlora-serve-worker", daemon=True)
        self.running = self.batches = self.answered = 0

    def submit(self, job: Job) -> None:
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise ApiError(503, f"the queue is full ({self.queue.maxsize} requests wait); try again shortly",
                           kind="server_error", code="queue_full") from None

    def loop(self) -> None:
        while not self.stopping.is_set():
            try:
                jobs = [self.queue.get(timeout=0.2)]
            except queue.Empty:
                continue
            while True:  # and everything else that waits: it is batched with it
                try:
                    jobs.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            jobs = [j for j in jobs if not j.cancelled]
            self.running = len(jobs)
            try:
                for name, budget, batch in plan(jobs, self.batch_size):
                    with self.answerer.use_adapter(name):
                        self.answer_batch(batch, budget)
                    self.running -= len(batch)
            except Exception as e:  # noqa: BLE001 (the thread must live on; answered jobs ignore a late error)
                log.exception("vlora serve: the worker failed")
                for j in jobs:
                    j.send("error", ApiError(500, f"{type(e).__name__}: {e}", kind="server_error"))
            self.running = 0

    def answer_batch(self, jobs: list[Job], budget: int) -> None:
        call = jobs[0].call  # the batch shares its sampling settings and stop strings (Call.batch_key)
        streamer = RowStreamer(jobs, self.answerer.decode, self.answerer.stop_ids)
        try:
            texts = self.answerer.answer([j.call.request for j in jobs], max_new_tokens=budget, streamer=streamer,
                                         stop_strings=list(call.stop) or None, **call.sampling)
        except Exception as e:  # noqa: BLE001 (one failed batch fails its requests, not the server)
            log.exception("vlora serve: a batch of %d failed", len(jobs))
            for j in jobs:
                j.send("error", ApiError(500, f"generation failed: {type(e).__name__}: {e}", kind="server_error"))
            return
        self.batches += 1
        for j, text, ids, ended in zip(jobs, texts, streamer.ids, streamer.ended):
            content, hit = cut_at_stop(text, j.call.stop)
            finish = "stop" if hit or ended or len(ids) < budget else "length"
            j.send("done", Answer(content, len(ids), finish))
            self.answered += 1

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=30)


def plan(jobs: list[Job], batch_size: int) -> list[tuple[str, int, list[Job]]]:
    """[(adapter, max_new_tokens, jobs)]: grouped by adapter in order of arrival (one adapter switch each), then
    by what a generate call shares, then batched as `vlora generate` batches (budget_batches)."""
    requests = [j.call.request for j in jobs]
    out = []
    for name, idx in group_by_adapter(requests):
        by_key: dict[tuple, list[int]] = {}
        for i in idx:
            by_key.setdefault(jobs[i].call.batch_key, []).append(i)
        for same in by_key.values():
            out += [(name, budget, [jobs[i] for i in batch])
                    for budget, batch in budget_batches(same, requests, batch_size)]
    return out


# ---------------------------------------------------------------------------------------------------------------
# The service and its HTTP app


class Service:
    def __init__(self, model, processor, adapters: dict[str, str], opts: ServeOptions, *, min_pixels: int,
                 max_pixels: int):
        self.opts, self.models, self.created = opts, [BASE, *adapters], int(time.time())
        self.worker = Worker(Answerer(model, processor, min_pixels=min_pixels, max_pixels=max_pixels), opts)
        # The handlers' threads count prompt tokens with a processor of their own: a fast tokenizer is not safe to
        # use from two threads at once (it raises "Already borrowed"), and the worker's is busy generating.
        self.counter = Answerer(None, copy.deepcopy(processor), min_pixels=min_pixels, max_pixels=max_pixels)
        self.count_lock = threading.Lock()
        self.read_image = ImageReader(opts)

    def prepare(self, body) -> Call:
        """The Call a request body asks for, or the ApiError that answers it; reads images, counts tokens."""
        if not isinstance(body, dict):
            raise bad("the request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str) or model not in self.models:
            status = 400 if not isinstance(model, str) else 404
            raise ApiError(status, f"model {model!r} is not served here; models: {', '.join(self.models)}",
                           code="model_not_found", param="model")
        settings = parse_settings(body, self.opts)
        messages, images = parse_messages(body.get("messages"), self.read_image)
        request = Request(messages, images, adapter=model, id=f"chatcmpl-{uuid.uuid4().hex}",
                          max_new_tokens=settings.pop("max_new_tokens"))
        try:
            with self.count_lock:
                n = int(self.counter.inputs([request])["attention_mask"].sum())
        except Exception as e:  # noqa: BLE001 (the processor refusing this input is the request's fault)
            raise bad(f"cannot prepare the prompt: {type(e).__name__}: {e}", "messages") from None
        if n > self.opts.max_input_tokens:
            raise ApiError(400, f"the prompt is {n} tokens (chat template and image tokens included), over this "
                                f"server's --max-input-tokens {self.opts.max_input_tokens}",
                           code="context_length_exceeded", param="messages")
        return Call(request, prompt_tokens=n, **settings)

    def health(self) -> tuple[int, dict]:
        w = self.worker
        alive = w.thread.is_alive()
        return (200 if alive else 503), {"status": "ok" if alive else "worker stopped", "models": self.models,
                                         "queued": w.queue.qsize(), "running": w.running, "batches": w.batches,
                                         "answered": w.answered}

    def model_list(self) -> dict:
        return {"object": "list", "data": [{"id": m, "object": "model", "created": self.created, "owned_by": "vlora"}
                                           for m in self.models]}


def create_app(service: Service):
    """The FastAPI app; its lifespan starts and stops the worker."""
    import contextlib

    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.worker.thread.start()
        yield
        service.worker.stop()

    app = FastAPI(title="vlora serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def check_key(request, call_next):
        key = service.opts.api_key
        given = request.headers.get("authorization", "")
        if key is not None and not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            error = ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                             code="invalid_api_key")
            return JSONResponse(error.body(), status_code=401)
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):  # unknown paths, wrong methods: OpenAI's error shape too
        return JSONResponse(ApiError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    add_routes(app, service)
    return app


def add_routes(app, service: Service) -> None:
    # Starlette-style endpoints (the request is their argument): no annotations for FastAPI to resolve, so
    # fastapi is imported only here, and `vlora --help` works without the `serve` extra.
    from fastapi.responses import JSONResponse, StreamingResponse

    async def health(request):
        status, body = service.health()
        return JSONResponse(body, status_code=status)

    async def models(request):
        return JSONResponse(service.model_list())

    async def chat(request):
        try:
            body = json.loads(await request.body())
        except ValueError as e:
            raise bad(f"the request body is not JSON: {e}") from None
        call = await asyncio.to_thread(service.prepare, body)  # reads images, tokenizes: not on the event loop
        job = Job(call, asyncio.get_running_loop())
        service.worker.submit(job)
        if call.stream:
            return StreamingResponse(stream(job, body["model"]), media_type="text/event-stream")
        try:
            kind, value = await next_result(job)
        finally:
            job.cancelled = True  # done, or the client left: either way the worker need not start it
        if kind == "error":
            raise value
        return JSONResponse(completion(job, body["model"], value))

    app.add_route("/health", health, methods=["GET"])
    app.add_route("/v1/models", models, methods=["GET"])
    app.add_route("/v1/chat/completions", chat, methods=["POST"])


async def next_result(job: Job):
    while True:
        kind, value = await job.events.get()
        if kind != "text":
            return kind, value


def usage(call: Call, answer: Answer) -> dict:
    return {"prompt_tokens": call.prompt_tokens, "completion_tokens": answer.completion_tokens,
            "total_tokens": call.prompt_tokens + answer.completion_tokens}


def completion(job: Job, model: str, answer: Answer) -> dict:
    return {"id": job.call.request.id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.content},
                         "finish_reason": answer.finish_reason}],
            "usage": usage(job.call, answer)}


async def stream(job: Job, model: str):
    """Server-sent events in OpenAI's chat.completion.chunk format, ending with `data: [DONE]`."""
    head = {"id": job.call.request.id, "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model}

    def event(choices: list, **extra) -> str:
        return f"data: {json.dumps({**head, 'choices': choices, **extra}, ensure_ascii=False)}\n\n"

    def delta(d: dict, finish: str | None = None) -> str:
        return event([{"index": 0, "delta": d, "finish_reason": finish}])

    text = StreamText(job.call.stop)
    try:
        yield delta({"role": "assistant", "content": ""})
        while True:
            kind, value = await job.events.get()
            if kind == "text":
                if piece := text.feed(value):
                    yield delta({"content": piece})
                continue
            if kind == "error":
                yield f"data: {json.dumps(value.body())}\n\n"
                break
            if piece := text.finish(value.content):
                yield delta({"content": piece})
            yield delta({}, value.finish_reason)
            if job.call.include_usage:
                yield event([], usage=usage(job.call, value))
            break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled = True


# ---------------------------------------------------------------------------------------------------------------
# The `vlora serve` command


def options_from(args) -> ServeOptions:
    for flag in ("max_new_tokens", "max_output_tokens", "max_input_tokens", "max_queue", "batch_size"):
        if getattr(args, flag) < 1:
            raise VloraError(f"--{flag.replace('_', '-')} must be at least 1; got {getattr(args, flag)}")
    if args.max_new_tokens > args.max_output_tokens:
        raise VloraError(f"--max-new-tokens {args.max_new_tokens} is above --max-output-tokens "
                         f"{args.max_output_tokens}")
    if args.image_root is not None and not Path(args.image_root).is_dir():
        raise VloraError(f"--image-root {args.image_root} is not a folder")
    return ServeOptions(max_new_tokens=args.max_new_tokens, max_output_tokens=args.max_output_tokens,
                        max_input_tokens=args.max_input_tokens, max_queue=args.max_queue, batch_size=args.batch_size,
                        image_root=args.image_root, allow_remote_images=args.allow_remote_images,
                        api_key=args.api_key or None)


def check_listen(host: str, port: int) -> None:
    """Fail in one line, before the model loads, when the address cannot be listened on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # "::1" and other IPv6 literals
    try:
        with socket.create_server((host, port), family=family):
            pass
    except OSError as e:
        raise VloraError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def make_server(args):
    """(the uvicorn server `vlora serve` runs, its Service): options checked, model and adapters loaded."""
    try:
        import uvicorn
    except ImportError:
        raise VloraError("vlora serve needs fastapi and uvicorn: pip install -e '.[serve]'") from None
    adapters = parse_adapters(args.adapter or [])
    opts = options_from(args)
    if args.port:  # port 0: the system picks one (the tests), nothing to check
        check_listen(args.host, args.port)
    model, processor = load_for_inference(args.model, adapters, quant=args.quant, dtype=args.dtype,
                                          device=args.device)
    service = Service(model, processor, adapters, opts, min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    config = uvicorn.Config(create_app(service), host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=5)
    return uvicorn.Server(config), service


def cmd_serve(args) -> int:
    server, service = make_server(args)
    if not is_loopback(args.host) and not args.api_key:
        log.warning("vlora serve: listening on %s without --api-key: whoever reaches the port can use the model",
                    args.host)
    print(f"vlora serve: models {', '.join(service.models)} at http://{args.host}:{args.port}/v1", flush=True)
    server.run()
    return 0


def add_serve_parser(sub) -> None:
    from vlora.config import DataArgs

    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP endpoint: a base model and named adapters")
    s.add_argument("--model", required=True, help="the base model folder (or hub id) the adapters were trained on")
    s.add_argument("--adapter", action="append", metavar="NAME=DIR", help="an adapter folder under a name (the request's 'model'); repeatable")
    s.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=os.environ.get("VLORA_API_KEY"), help="every request must send 'Authorization: Bearer KEY' (default: $VLORA_API_KEY)")
    s.add_argument("--image-root", type=Path, default=None, help="image paths in requests are read under this folder only (default: refused)")
    s.add_argument("--allow-remote-images", action="store_true", help="download http(s) image URLs (default: refused)")
    s.add_argument("--max-input-tokens", type=int, default=8192, help="refuse longer prompts (chat template and image tokens included)")
    s.add_argument("--max-new-tokens", type=int, default=64, help="a request's max_tokens when it gives none")
    s.add_argument("--max-output-tokens", type=int, default=2048, help="the most max_tokens a request may ask for")
    s.add_argument("--max-queue", type=int, default=64, help="requests that may wait; more are answered 503")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--quant", default="nf4", choices=["nf4", "fp4", "none"], help="the base's LLM linears in 4 bit (as trained) or unquantized")
    s.add_argument("--dtype", default="auto", help="auto (bf16 on a GPU that has it, else fp32) | fp32 | bf16 | fp16")
    s.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    s.add_argument("--min-pixels", type=int, default=DataArgs.min_pixels, help="the run's data.min_pixels")
    s.add_argument("--max-pixels", type=int, default=DataArgs.max_pixels, help="the run's data.max_pixels")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.set_defaults(func=cmd_serve)
