"""`vlora serve`: the tiny base with two adapters behind an OpenAI-compatible endpoint, driven with the `openai`
client. Every answer is compared with `vlora generate`'s for the same input (its request building and its
Answerer.run, on a model loaded separately); bad requests get a 4xx and the server goes on answering."""

import base64
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import random_adapter, wait_until
from vlora.generate import BASE, Answerer, load_for_inference, request_from

pytest.importorskip("fastapi", reason="vlora serve needs the serve extra: pip install -e '.[serve,test]'")
pytest.importorskip("uvicorn", reason="vlora serve needs the serve extra: pip install -e '.[serve,test]'")
openai = pytest.importorskip("openai", reason="the serve tests use the openai client: pip install -e '.[test]'")
httpx = pytest.importorskip("httpx", reason="the serve tests use httpx: pip install -e '.[test]'")

from vlora.serve import StreamText, cut_at_stop, make_server, parse_settings, ServeOptions  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

KEY = "test-key"
PIXELS = {"min_pixels": 3136, "max_pixels": 12544}
TOKENS = 6  # the server's --max-new-tokens, and vlora generate's --max-new-tokens for the reference
MAX_INPUT = 200
MAX_QUEUE = 4
TEXT = "Describe the picture in one word."
QUESTION = "What colour is the square?"
# name -> (adapter, prompt, image file or None): the inputs whose `vlora generate` answers the tests compare with
CASES = {
    "text/alpha": ("alpha", TEXT, None), "text/beta": ("beta", TEXT, None), "text/base": (BASE, TEXT, None),
    "image/alpha": ("alpha", QUESTION, "red.png"), "image/beta": ("beta", QUESTION, "red.png"),
    "image/base": (BASE, QUESTION, "blue.jpg"),
}


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    """Two adapters of the tiny base with different weights (drawn large, so each changes the answers)."""
    return {name: random_adapter(tiny_model_dir, tmp_path_factory.mktemp(name), seed=seed, targets=targets)
            for name, seed, targets in (("alpha", 1, "[llm_attn,llm_mlp]"), ("beta", 2, "[llm_attn,merger]"))}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """The server's --image-root: two images, and a file that is no image."""
    from PIL import Image, ImageDraw

    root = tmp_path_factory.mktemp("images")
    for name, colour, size in (("red.png", "red", (96, 64)), ("blue.jpg", "blue", (64, 80))):
        im = Image.new("RGB", size, "white")
        ImageDraw.Draw(im).rectangle((8, 8, 40, 40), fill=colour)
        im.save(root / name)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really" * 20)
    return root


@pytest.fixture(scope="module")
def reference(tiny_model_dir, adapters, images):
    """{case: (answer, prompt tokens)} as `vlora generate --prompt ... --image ...` builds and answers them."""
    model, processor = load_for_inference(str(tiny_model_dir), {k: str(v) for k, v in adapters.items()},
                                          quant="nf4", dtype="fp32", device="cpu")
    answerer = Answerer(model, processor, **PIXELS)
    requests = [request_from({"prompt": prompt, "images": [str(images / image)] if image else []}, adapter,
                             images, name) for name, (adapter, prompt, image) in CASES.items()]
    gen = {"max_new_tokens": TOKENS, "do_sample": False, "temperature": 1.0, "top_p": 1.0}  # cmd_generate's defaults
    answers = answerer.run(requests, batch_size=8, **gen)
    counts = [int(answerer.inputs([r])["attention_mask"].sum()) for r in requests]
    out = dict(zip(CASES, zip(answers, counts)))
    # The adapters answer differently from each other and from the base: a mix-up cannot pass unnoticed.
    assert len({out[f"text/{a}"][0] for a in ("alpha", "beta", BASE)}) == 3
    assert out["image/alpha"][0] != out["image/beta"][0]
    return out


@pytest.fixture(scope="module")
def server(tiny_model_dir, adapters, images):
    """`vlora serve` as the command line builds it, on a free localhost port, in a thread; stopped at the end."""
    from vlora.cli import build_parser

    args = build_parser().parse_args([
        "serve", "--model", str(tiny_model_dir), "--adapter", f"alpha={adapters['alpha']}", "--adapter",
        f"beta={adapters['beta']}", "--port", "0", "--api-key", KEY, "--image-root", str(images),
        "--max-input-tokens", str(MAX_INPUT), "--max-queue", str(MAX_QUEUE), "--max-new-tokens", str(TOKENS),
        "--dtype", "fp32", "--device", "cpu", "--min-pixels", "3136", "--max-pixels", "12544",
        "--log-level", "warning"])
    assert args.host == "127.0.0.1"  # localhost unless told otherwise
    srv, service = make_server(args)
    thread = threading.Thread(target=srv.run, name="test-serve", daemon=True)
    thread.start()
    wait_until(lambda: srv.started or not thread.is_alive(), 120, "the server to start")
    assert srv.started, "the server did not start"
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield type("Served", (), {"url": f"http://127.0.0.1:{port}", "service": service})
    srv.should_exit = True
    thread.join(60)
    assert not thread.is_alive(), "the server did not stop"
    assert not service.worker.thread.is_alive(), "the worker did not stop"


def client(server, key: str | None = KEY):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key or "none", max_retries=0, timeout=120)


def messages(case: str, images: Path, how: str = "data") -> list[dict]:
    """The OpenAI messages for a case: an image as a data: URL, or as a path under --image-root."""
    _, prompt, image = CASES[case]
    if image is None:
        return [{"role": "user", "content": prompt}]
    if how == "data":
        kind = "png" if image.endswith(".png") else "jpeg"
        url = f"data:image/{kind};base64," + base64.b64encode((images / image).read_bytes()).decode()
    else:
        url = image if how == "relative" else f"file://{images / image}"
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": prompt}]}]


def ask(server, case: str, images: Path, how: str = "data", **extra):
    return client(server).chat.completions.create(model=CASES[case][0], messages=messages(case, images, how), **extra)


def health(server) -> dict:
    return httpx.get(f"{server.url}/health", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()


def test_text_and_image_requests_answer_as_vlora_generate(server, reference, images):
    for case, how in (("text/alpha", "data"), ("image/beta", "data"), ("image/base", "relative"),
                      ("image/alpha", "file")):
        r = ask(server, case, images, how)
        answer, prompt_tokens = reference[case]
        assert r.choices[0].message.content == answer, case
        assert r.choices[0].message.role == "assistant" and r.model == CASES[case][0] and r.object == "chat.completion"
        u = r.usage
        assert u.prompt_tokens == prompt_tokens and 1 <= u.completion_tokens <= TOKENS, (case, u)
        assert u.total_tokens == u.prompt_tokens + u.completion_tokens
        assert r.choices[0].finish_reason == ("length" if u.completion_tokens == TOKENS else "stop")
    assert reference["image/alpha"][1] > reference["text/alpha"][1] + 4  # the image tokens are counted


def test_concurrent_requests_for_two_adapters_each_get_their_adapters_answer(server, reference, images, monkeypatch):
    """Requests wait while a batch runs, then go as one batch per adapter; the queue holds MAX_QUEUE, the next 503."""
    answerer, gate = server.service.worker.answerer, threading.Event()
    real = answerer.answer
    monkeypatch.setattr(answerer, "answer", lambda *a, **k: gate.wait(120) and real(*a, **k))
    before = health(server)
    cases = ["text/alpha", "text/beta", "image/alpha", "image/beta"]
    pool = ThreadPoolExecutor(len(cases) + 1)
    try:
        blocker = pool.submit(ask, server, "text/base", images)  # holds the worker (at the gate)
        wait_until(lambda: health(server)["running"] == 1, 60, "the worker to take the first request")
        waiting = [pool.submit(ask, server, case, images) for case in cases]
        wait_until(lambda: health(server)["queued"] == MAX_QUEUE, 60, "the requests to queue up")
        with pytest.raises(openai.APIStatusError) as full:
            ask(server, "text/alpha", images)
    finally:
        gate.set()
        pool.shutdown(wait=True)
    answers = [f.result().choices[0].message.content for f in waiting]
    assert blocker.result().choices[0].message.content == reference["text/base"][0]
    assert full.value.status_code == 503 and full.value.response.json()["error"]["code"] == "queue_full"
    assert answers == [reference[c][0] for c in cases]
    after = health(server)
    # the blocker alone, then the four queued ones as one batch per adapter
    assert (after["batches"] - before["batches"], after["answered"] - before["answered"]) == (3, 5)
    assert after["queued"] == after["running"] == 0


def stream(server, case: str, images: Path, **extra) -> tuple[str, list]:
    chunks = list(ask(server, case, images, stream=True, stream_options={"include_usage": True}, **extra))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def test_streaming_gives_the_same_text_as_not_streaming(server, reference, images):
    for case in ("text/beta", "image/alpha"):
        text, chunks = stream(server, case, images)
        plain = ask(server, case, images)
        assert text == plain.choices[0].message.content == reference[case][0], case
        assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
        assert len({c.id for c in chunks}) == 1
        assert sum(bool(c.choices and c.choices[0].delta.content) for c in chunks) > 1  # token by token
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finish == [plain.choices[0].finish_reason]
        assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage


def test_stop_cuts_the_answer_before_the_first_stop_string(server, reference, images):
    full = reference["text/alpha"][0]
    word = next(w for w in re.findall(r"[A-Za-z]{2,}", full) if full.index(w) > 0)  # a stop not at the start
    expected = full[:full.index(word)]
    plain = ask(server, "text/alpha", images, stop=[word, "never-generated"])
    text, chunks = stream(server, "text/alpha", images, stop=word)
    assert plain.choices[0].message.content == text == expected
    assert plain.choices[0].finish_reason == "stop" and plain.usage.completion_tokens < TOKENS
    assert chunks[-1].usage == plain.usage


def test_sampling_settings_reach_generate(server, images):
    r = ask(server, "text/alpha", images, temperature=1.0, top_p=0.9, max_tokens=3)
    assert isinstance(r.choices[0].message.content, str) and 1 <= r.usage.completion_tokens <= 3


def error_of(call) -> tuple[int, dict]:
    with pytest.raises(openai.APIStatusError) as e:
        call()
    error = e.value.response.json()["error"]
    assert set(error) >= {"message", "type", "code"} and "\n" not in error["message"], error
    return e.value.status_code, error


def test_bad_requests_get_a_4xx_and_the_next_good_one_succeeds(server, reference, images):
    c = client(server)
    chat = lambda model="alpha", **body: lambda: c.chat.completions.create(model=model, **body)  # noqa: E731
    user = lambda *parts: [{"role": "user", "content": [*parts, {"type": "text", "text": "hi"}]}]  # noqa: E731
    image = lambda url: {"type": "image_url", "image_url": {"url": url}}  # noqa: E731
    not_png = "data:image/png;base64," + base64.b64encode(b"this is text, not an image").decode()
    checks = [  # (call, status, a piece of the message)
        (chat(messages=[]), 400, "'messages' must be a non-empty list"),
        (chat(messages=[{"role": "robot", "content": "hi"}]), 400, "messages[0].role"),
        (chat(model="gamma", messages=user()), 404, "models: base, alpha, beta"),
        (chat(messages=[{"role": "user", "content": "word " * 300}]), 400, f"--max-input-tokens {MAX_INPUT}"),
        (chat(messages=user(image("data:image/png;base64,@@not base64@@"))), 400, "messages[0].content[0]"),
        (chat(messages=user(image(not_png))), 400, "messages[0].content[0]: image_unreadable"),
        (chat(messages=user(image("broken.png"))), 400, "image_unreadable"),
        (chat(messages=user(image("../outside.png"))), 403, "outside --image-root"),
        (chat(messages=user(image("https://example.com/cat.png"))), 403, "--allow-remote-images"),
        (chat(messages=user(), max_tokens=0), 400, "max_tokens"),
        (chat(messages=user(), temperature=5), 400, "temperature"),
        (chat(messages=user(), n=2), 400, "n must be 1"),
    ]
    for call, status, piece in checks:
        got, error = error_of(call)
        assert (got, piece in error["message"]) == (status, True), (status, piece, error)
    # A body that is not JSON at all, and a route that does not exist: the same error shape.
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(f"{server.url}/v1/chat/completions", content=b"{not json", headers=auth, timeout=30)
    assert r.status_code == 400 and "not JSON" in r.json()["error"]["message"]
    r = httpx.get(f"{server.url}/v1/nothing", headers=auth, timeout=30)
    assert r.status_code == 404 and "message" in r.json()["error"]
    assert ask(server, "image/beta", images).choices[0].message.content == reference["image/beta"][0]
    assert health(server)["status"] == "ok"


def test_a_missing_or_wrong_api_key_gets_401(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for method, path in (("GET", "/health"), ("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
            r = httpx.request(method, server.url + path, headers=headers, json={}, timeout=30)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (headers, path)
    status, _ = error_of(lambda: client(server, "wrong").models.list())
    assert status == 401
    assert [m.id for m in client(server).models.list().data] == [BASE, "alpha", "beta"]


# ---- without a server ----


def test_streamed_pieces_add_up_to_the_answer():
    """Whatever the decoded text does on the way (leading blanks, a half-generated character, a stop string
    that shows over several tokens), the pieces sent add up to the final answer and are sent as early as safe."""
    def run(steps: list[str], stops=()):
        s = StreamText(stops)
        pieces = [s.feed(raw) for raw in steps]
        final = cut_at_stop(steps[-1].strip(), stops)[0]
        return pieces + [s.finish(final)], final

    pieces, final = run(["\n", "\n Hel", "\n Hello\ufffd", "\n Hello\u00e9 ", "\n Hello\u00e9 wor",
                         "\n Hello\u00e9 world\n"])
    assert "".join(pieces) == final == "Hello\u00e9 world" and pieces[:3] == ["", "Hel", "lo"]
    pieces, final = run(["a", "ab", "abc", "abcX", "abcXY", "abcXYd"], stops=["XY"])
    assert "".join(pieces) == final == "abc" and pieces[:4] == ["", "a", "b", "c"]  # "X" may start "XY": held
    pieces, final = run(["a b", "a b ", "a b c"], stops=["b c"])
    assert "".join(pieces) == final == "a "
    pieces, final = run(["ab", "abcd", "abcdefg"], stops=["efg", "a long stop"])  # shorter than a stop: held
    assert "".join(pieces) == final == "abcd" and pieces[:2] == ["", ""]
    assert cut_at_stop("one two three", ["three", "two"]) == ("one ", True)
    assert cut_at_stop("abcdef", ["cdef", "bcd"]) == ("a", True)  # "bcd" is complete first: generation ends there
    assert cut_at_stop("abc", ["x"]) == ("abc", False)


def test_request_settings_default_to_vlora_generates():
    settings = parse_settings({}, ServeOptions())
    assert settings == {"max_new_tokens": 64, "sampling": {"do_sample": False}, "stop": (), "stream": False,
                        "include_usage": False}
    sampled = parse_settings({"temperature": 0.7, "top_p": 0.5, "max_tokens": 9, "stop": ["a", "a", "b"]},
                             ServeOptions())
    assert sampled["sampling"] == {"do_sample": True, "temperature": 0.7, "top_p": 0.5}
    assert (sampled["max_new_tokens"], sampled["stop"]) == (9, ("a", "b"))


def test_command_line_errors_are_one_line_before_any_model_loads(tmp_path, capsys):
    import socket

    from vlora.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for extra, message in ((["--image-root", str(tmp_path / "none")], "is not a folder"),
                               (["--port", str(port)], f"cannot listen on 127.0.0.1:{port}"),
                               (["--adapter", "base=/x"], "adapter names must be unique")):
            started = time.monotonic()
            assert main(["serve", "--model", str(tmp_path / "no-model"), *extra]) == 2
            err = capsys.readouterr().err.strip()
            assert err.startswith("vlora: error:") and message in err and "\n" not in err, err
            assert time.monotonic() - started < 10
