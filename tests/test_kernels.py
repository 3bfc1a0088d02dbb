"""vlora.kernels: the lean vision tower computes exactly what transformers' tower computes, with far fewer operator
calls. Every comparison is torch.equal (bit-identical), on CPU in float32, on a tiny tower of the 3B's structure
(windowed and full-attention layers)."""

import collections
import logging

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vlora import kernels
from vlora.kernels import lean_vision_tower, stock_vision_tower

BATCH_4X448 = [(448, 448)] * 4  # 32x32 patches each: 16 windows of 64 patches, 256 merged tokens
MIXED = [(448, 448), (224, 336), (112, 112)]  # every window full, three image lengths: views, no gather
RAGGED = [(252, 364), (224, 224), (252, 364), (196, 140)]  # partial windows, repeated sizes apart: gathers


def tiny_qwen2_5_vl(attn_implementation="sdpa"):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        vision_config=dict(depth=4, fullatt_block_indexes=[1, 3], window_size=112, hidden_size=32, num_heads=2,
                           intermediate_size=64, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                           out_hidden_size=64, in_channels=3),
        text_config=dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=1024, bos_token_id=0, eos_token_id=1))
    config._attn_implementation = attn_implementation
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_qwen2_vl():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2, hidden_size=64, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        text_config=dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=1024, bos_token_id=0, eos_token_id=1))
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return Qwen2VLForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_qwen2_5_vl()


@pytest.fixture(autouse=True)
def stock_after(model):
    yield
    stock_vision_tower(model)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny ops: a second thread only waits at every barrier on a busy machine (3x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def images(sizes, frames=1, seed=0):
    """pixel_values and grid_thw as the processor gives them: one (3*2*14*14)-vector per patch."""
    grid = torch.tensor([[frames, h // 14, w // 14] for h, w in sizes])
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14, generator=generator), grid


class CountOps(TorchDispatchMode):
    """Every aten operator call, views included."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self):
        return sum(self.calls.values())

    @property
    def sdpa(self):
        return sum(n for name, n in self.calls.items() if "scaled_dot_product" in name)


def vision(model, sizes, frames=1, **kwargs):
    pixels, grid = images(sizes, frames)
    with torch.no_grad():
        return model.model.visual(pixels, grid_thw=grid, **kwargs)


def assert_same(stock, lean):
    assert type(stock) is type(lean) and stock.keys() == lean.keys()
    for name in stock.keys():
        if isinstance(stock[name], tuple):
            assert all(torch.equal(a, b) for a, b in zip(stock[name], lean[name], strict=True)), name
        else:
            assert torch.equal(stock[name], lean[name]), name


@pytest.mark.parametrize("sizes,frames", [(BATCH_4X448, 1), (MIXED, 1), (RAGGED, 1), (MIXED, 2)],
                         ids=["4x448", "mixed", "ragged", "video-t2"])
def test_lean_tower_is_bit_identical_to_stock(model, sizes, frames):
    stock = vision(model, sizes, frames)
    assert lean_vision_tower(model) == 1 + len(model.model.visual.blocks)
    lean = vision(model, sizes, frames)
    again = vision(model, sizes, frames)  # from the cached plan
    assert_same(stock, lean)
    assert_same(stock, again)


def test_undo_restores_stock(model):
    stock = vision(model, MIXED)
    visual = model.model.visual
    assert lean_vision_tower(model) == 5
    assert lean_vision_tower(model) == 0  # already lean: nothing more to change
    assert "forward" in vars(visual) and all("forward" in vars(b.attn) for b in visual.blocks)
    assert stock_vision_tower(model) == 5
    assert stock_vision_tower(model) == 0
    for module in visual.modules():
        assert not any(name.startswith("_vlora") or name == "forward" for name in vars(module)), module
    assert_same(stock, vision(model, MIXED))


def count(model, sizes):
    pixels, grid = images(sizes)
    with torch.no_grad():
        model.model.visual(pixels, grid_thw=grid)  # the lean tower's first call builds the plan: count the second
        with CountOps() as ops:
            model.model.visual(pixels, grid_thw=grid)
    return ops


def test_lean_tower_runs_at_least_4x_fewer_operators(model):
    stock = count(model, BATCH_4X448)
    lean_vision_tower(model)
    lean = count(model, BATCH_4X448)
    # Stock: one SDPA per window (2 windowed layers x 64 windows) and per image (2 full layers x 4 images).
    assert (stock.sdpa, lean.sdpa) == (2 * 64 + 2 * 4, 4)
    assert stock.total >= 4 * lean.total, (stock.total, lean.total)
    # A mixed batch: one SDPA per distinct length per layer (windows all 64 long, images three lengths).
    stock_vision_tower(model)
    stock, lean = count(model, MIXED), (lean_vision_tower(model), count(model, MIXED))[1]
    assert lean.sdpa == 2 * 1 + 2 * 3 and lean.total < stock.total / 2, (stock.total, lean.total)


def test_gradients_equal_stock_when_a_vision_weight_trains(model):
    weight = model.model.visual.blocks[0].attn.qkv.weight  # a windowed layer; full layers follow it
    pixels, grid = images(RAGGED[:2])
    weights = torch.randn(int(grid.prod(-1).sum()) // 4, 64, generator=torch.Generator().manual_seed(1))
    grads = []
    try:
        weight.requires_grad_(True)
        for install in (stock_vision_tower, lean_vision_tower):
            install(model)
            weight.grad = None
            out = model.model.visual(pixels, grid_thw=grid)
            ((out.pooler_output * weights).sum() + out.last_hidden_state.sum()).backward()
            grads.append(weight.grad.clone())
    finally:
        weight.requires_grad_(False)
        weight.grad = None
    assert grads[0].abs().sum() > 0 and torch.equal(grads[0], grads[1])


def test_plans_are_cached_per_grid_in_a_small_lru(model, monkeypatch):
    monkeypatch.setattr(kernels, "PLAN_CACHE", 2)
    lean_vision_tower(model)
    plans = model.model.visual._vlora_plans
    vision(model, MIXED)
    first = next(iter(plans.values()))
    vision(model, MIXED)
    assert len(plans) == 1 and next(iter(plans.values())) is first
    vision(model, RAGGED)
    vision(model, BATCH_4X448[:1])
    assert len(plans) == 2 and first not in plans.values()  # the least recently used went


def test_return_dict_and_hidden_states_outputs_match(model):
    stock = vision(model, MIXED, output_hidden_states=True)
    stock_tuple = vision(model, MIXED, return_dict=False)
    lean_vision_tower(model)
    lean = vision(model, MIXED, output_hidden_states=True)
    assert len(stock.hidden_states) >= len(model.model.visual.blocks)
    assert_same(stock, lean)
    lean_tuple = vision(model, MIXED, return_dict=False)
    assert isinstance(lean_tuple, tuple) and all(map(torch.equal, stock_tuple, lean_tuple))


def test_eager_attention_stays_stock_and_the_tower_is_still_exact(caplog):
    model = tiny_qwen2_5_vl("eager")
    stock = vision(model, RAGGED)
    with caplog.at_level(logging.INFO, logger="vlora"):
        assert lean_vision_tower(model) == 5
    assert "attention stays transformers' (attn_implementation=eager)" in caplog.text
    assert_same(stock, vision(model, RAGGED))


def test_unexpected_transformers_code_keeps_the_stock_tower(model, monkeypatch, caplog):
    needs = dict(kernels.NEEDS, attention=kernels.NEEDS["attention"] + ("a line transformers never had",))
    monkeypatch.setattr(kernels, "NEEDS", needs)
    with caplog.at_level(logging.INFO, logger="vlora"):
        assert lean_vision_tower(model) == 0
    assert "keeps transformers' forward" in caplog.text and "a line transformers never had" in caplog.text
    assert not any("forward" in vars(m) for m in model.model.visual.modules())


def test_qwen2_vl_tower_is_covered_too():
    model = tiny_qwen2_vl()
    stock = vision(model, RAGGED)
    stock_ops = count(model, RAGGED)
    assert lean_vision_tower(model) == 3
    assert_same(stock, vision(model, RAGGED))
    lean_ops = count(model, RAGGED)
    assert (stock_ops.sdpa, lean_ops.sdpa) == (2 * 4, 2 * 3) and lean_ops.total < stock_ops.total


def test_every_forward_calls_the_same_modules_cached_or_not(model):
    """ZeRO-3 gathers weights in module hooks and refuses ranks that call modules in different orders: a grid
    whose plan is cached must call exactly the modules a new grid calls."""
    lean_vision_tower(model)
    names = {m: n for n, m in model.model.visual.named_modules()}
    called = []
    hooks = [m.register_forward_pre_hook(lambda m, a: called.append(names[m])) for m in names]
    try:
        runs = []
        for sizes in (MIXED, MIXED, RAGGED):  # new, cached, new
            called.clear()
            vision(model, sizes)
            runs.append(list(called))
    finally:
        for h in hooks:
            h.remove()
    assert runs[0] == runs[1] == runs[2] and "merger" in runs[0] and "blocks.0.attn.qkv" in runs[0]
    assert "rotary_pos_emb" not in runs[0]


def test_the_patch_embedding_as_one_matmul_equals_the_convolution_and_its_gradient(model):
    """matmul_patch_embed: the tower's outputs within fp32 rounding of the Conv3d's (a sum in another order), the
    gradient of a LoRA-like input the same; ZeRO-3's hooks see the Conv3d called; stock_vision_tower undoes it."""
    from vlora.kernels import matmul_patch_embed

    visual = model.model.visual
    pixels, grid = images(MIXED)
    calls = []
    handle = visual.patch_embed.proj.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape))
    with torch.no_grad():
        want = visual(pixels, grid_thw=grid).pooler_output
        assert matmul_patch_embed(model) == 1 and matmul_patch_embed(model) == 0
        with CountOps() as ops:
            got = visual(pixels, grid_thw=grid).pooler_output
    handle.remove()
    assert len(calls) == 2 and calls[0] == calls[1]
    assert not any("convolution" in name for name in ops.calls) and ops.calls["aten.mm"] >= 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # the same products, summed in another order

    x = pixels[:64].clone().requires_grad_(True)
    visual.patch_embed(x).square().sum().backward()
    grad_matmul = x.grad.clone()
    assert stock_vision_tower(model) == 1 and "forward" not in vars(visual.patch_embed.proj)
    x.grad = None
    visual.patch_embed(x).square().sum().backward()
    torch.testing.assert_close(grad_matmul, x.grad, rtol=1e-5, atol=1e-6)
    assert grad_matmul.abs().sum() > 0
