"""`vlora bench` and its counters on the tiny model: the harness runs in CI so it never rots, and its numbers hold."""

import argparse
import json

import pytest
import torch

from vlora import bench
from vlora.counters import PARTS, StepCounter
from vlora.data.throughput import format_throughput, workers_needed


def bench_args(model_dir, *extra):
    parser = argparse.ArgumentParser()
    bench.add_bench_parser(parser.add_subparsers())
    return parser.parse_args(["bench", "--model", str(model_dir), "--image", "56", "--text", "96", "--batch", "2",
                              "--steps", "1", "--warmup", "1", *extra])


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir):
    args = bench_args(tiny_model_dir, "--no-gc", "lora.r=8")  # no recompute, and LoRA small beside the weights
    run, collator, processor = bench.build_vlora(bench.bench_config(tiny_model_dir, args))
    samples = bench.synthetic_samples(2, image_px=56, text_tokens=96, tokenizer=processor.tokenizer)
    batch = collator.collate([collator.encode(s) for s in samples])
    return run, batch


def test_synthetic_samples_have_the_stated_shape(tiny_run):
    run, batch = tiny_run
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 4]]  # 56 px: 4 x 4 patches, 4 image tokens
    text = (batch["attention_mask"].sum(1) - 4).tolist()
    assert all(86 <= t <= 106 for t in text), text  # about --text tokens of text each, template included
    # 85 % of what the template leaves is the answer, supervised (and its end-of-turn token)
    assert 2 * 50 <= batch["loss_index"].numel() <= 2 * 62


def test_counted_step_splits_every_operator_into_a_part(tiny_run):
    run, batch = tiny_run
    bench.vlora_step(run, batch)  # the optimizer's first step creates its state: the bench warms up first too
    first, second = bench.counted_step(run, batch), bench.counted_step(run, batch)
    for key in ("ops", "aten_ops", "gflops"):
        assert first["total"][key] == pytest.approx(sum(first[p][key] for p in PARTS))
    assert {p: first[p]["ops"] for p in PARTS} == {p: second[p]["ops"] for p in PARTS}  # the same every step
    assert all(first[p]["ops"] > 0 for p in PARTS), first
    # Fused AdamW on the CPU too: a handful of calls for the update, not a dozen per parameter tensor.
    n_tensors = sum(1 for p in run.model.parameters() if p.requires_grad)
    assert n_tensors > 20 and first["optimizer"]["ops"] < n_tensors, (first["optimizer"], n_tensors)
    # The counted FLOPs of the LLM and the loss cover the MFU formula's count, which leaves out the attention
    # scores (large beside a 64-wide model's weights) and LoRA, and recomputation (off here).
    counted = (first["llm"]["gflops"] + first["loss"]["gflops"]) * 1e9
    formula = bench.model_flops_per_step(run.model, int(batch["n_tokens"]), batch["loss_index"].numel())
    assert formula <= counted <= 2 * formula, (formula, counted)


def test_counter_attributes_by_module_boundaries():
    """A toy VLM-shaped module: vision ops, llm ops and the loss land in their parts, forward and backward."""
    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Module()
            self.model.visual = torch.nn.Linear(4, 4)
            self.model.layer = torch.nn.Linear(4, 4)
            self.lm_head = torch.nn.Linear(4, 3)

        def forward(self, x):
            h = self.model.layer(x + self.model.visual(x))
            return torch.nn.functional.cross_entropy(self.lm_head(h), torch.tensor([0, 1]))

    toy = Toy()
    counter = StepCounter(toy)
    optimizer = torch.optim.SGD(toy.parameters(), lr=0.1, foreach=False)
    with counter.counting():
        toy(torch.randn(2, 4)).backward()
        assert counter.part == "optimizer"  # from the backward's end on, as in HF Trainer's loop (no phase named)
        optimizer.step()
    by_part = counter.table()
    assert by_part["optimizer"]["ops"] >= 6  # SGD without for-each: an add_ per parameter tensor
    forward_only = StepCounter(toy)
    with forward_only.counting(), torch.no_grad():
        toy(torch.randn(2, 4))
    fwd = forward_only.table()
    assert fwd["vision"]["ops"] >= 1 and fwd["loss"]["ops"] >= 2  # addmm; addmm + log_softmax/nll
    for part in ("vision", "llm", "loss"):
        assert by_part[part]["ops"] > fwd[part]["ops"], (part, by_part, fwd)  # each part's backward is its own
    # forward and the weight gradient: its input x needs no gradient
    assert by_part["vision"]["gflops"] == pytest.approx(2 * (2 * 2 * 4 * 4) / 1e9)


def test_check_agrees_with_the_stock_forward(tiny_run):
    run, batch = tiny_run
    check = bench.check_against_stock(run, batch)
    assert check["ok"], check
    assert check["loss"] == pytest.approx(check["stock_loss"], rel=1e-5)


def test_reference_inputs_carry_the_modality_types(tiny_run):
    run, batch = tiny_run
    hf = run.model.get_base_model()
    plain = bench.reference_inputs(batch, hf.forward, hf.config.image_token_id)
    assert "loss_index" not in plain and torch.equal(plain["labels"], batch["labels"])
    assert int(plain["mm_token_type_ids"].sum()) == 8  # 2 images x 4 tokens


def test_mfu_formula_by_hand(tiny_run):
    run, _ = tiny_run
    c = run.model.get_base_model().config.text_config
    head_dim = c.hidden_size // c.num_attention_heads
    per_layer = (c.hidden_size * head_dim * (c.num_attention_heads * 2 + 2 * c.num_key_value_heads)
                 + 3 * c.hidden_size * c.intermediate_size)
    assert bench.llm_matmul_params(run.model) == (c.num_hidden_layers * per_layer, c.hidden_size * c.vocab_size)
    assert bench.model_flops_per_step(run.model, 10, 3) == 4 * 10 * c.num_hidden_layers * per_layer + 4 * 3 * c.hidden_size * c.vocab_size
    figures = bench.shape_figures(run.model, {"n_tokens": 1000, "loss_index": torch.zeros(100)}, 2,
                                  {"seconds_per_step": 0.5, "peak_mem_gib": 1.0}, torch.device("cpu"), 100.0)
    assert figures["tokens_per_s"] == 2000 and figures["samples_per_s"] == 4
    assert figures["mfu"] == pytest.approx(bench.model_flops_per_step(run.model, 1000, 100) / 0.5 / 100e12)


def test_bench_command_writes_its_table(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = bench_args(tiny_model_dir, "--check", "--json", str(out), "--loader-samples", "8")
    assert bench.cmd_bench(args) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    ours = report["results"]["vlora"]
    assert ours["tokens_per_s"] > 0 and ours["samples_per_s"] == pytest.approx(2 / ours["seconds_per_step"])
    assert ours["counts"]["total"]["ops"] > 0 and report["check"]["ok"]
    assert f"{ours['counts']['total']['ops']:,.0f}" in printed and "check against the stock forward" in printed
    # The data loader on JPEG shards of the bench's shape: 8 samples (4 batches of 2) timed per worker count.
    loader = report["loader"]
    rows = loader["rows"]
    assert [(r["workers"], r["samples"]) for r in rows] == [(0, 8), (1, 8), (2, 8)]
    for r in rows:
        assert r["per_worker"] == pytest.approx(r["samples_s"] / max(1, r["workers"]))
        assert 56 * 56 // 28**2 + 60 <= r["tokens_per_sample"] <= 4 + 140  # 4 image tokens + about --text 96
    assert rows[0]["bytes_per_sample"] == 0 and rows[1]["bytes_per_sample"] > 4 * 1176 * 4  # 16 fp32 patches
    assert rows[0]["vs_main"] == 1.0 and rows[0]["per_core"] > 0
    assert loader["step_samples_s"] == ours["samples_per_s"]
    assert loader["workers_needed"] == workers_needed(rows, ours["samples_per_s"]) >= 1
    assert f"this step's {ours['samples_per_s']:.1f} samples/s need {loader['workers_needed']} data worker(s)" in printed
    assert format_throughput(rows) in printed


def test_bench_loader_flags():
    args = bench_args("m", "--no-loader")
    assert args.loader is False and bench_args("m").loader is True and bench_args("m").loader_samples == 64
