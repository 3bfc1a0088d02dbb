"""metrics.jsonl and the loss / lr plot drawn from it (runs/NAME/curves.png)."""

import json
import logging
import math
import sys

import pytest
from PIL import Image

from vlora.metrics import Metrics, _curves, plot_curves, read_metrics


def write_records(path, records, torn_after: int | None = None) -> None:
    with open(path, "a") as f:
        for i, r in enumerate(records):
            f.write(json.dumps(r) + "\n")
            if i == torn_after:
                f.write('{"time": 3.1, "step": 9, "lo')  # a process killed mid-write


def segment(steps, *, t0=0.0, lr=1e-3, val_every=0, loss0=7.0):
    out = []
    for i, s in enumerate(steps):
        out.append({"time": t0 + 0.5 * i, "step": s, "loss": loss0 * math.exp(-s / 20) + 0.5, "lr": lr,
                    "grad_norm": 1.0, "tokens_per_s": 1000.0})
        if val_every and s % val_every == 0:
            out.append({"time": t0 + 0.5 * i, "step": s, "val_loss": loss0 * math.exp(-s / 20) + 0.8})
    return out


def check_png(path):
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG"
        assert im.size == (800, 600)
        colours = im.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 20  # lines, labels and grid drawn, not an empty canvas


def test_plot_curves_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    records = [{"time": 0.1, "step": 0, "val_loss": 7.4}] + segment(range(1, 41), t0=0.2, val_every=20)
    write_records(tmp_path / "metrics.jsonl", records)
    out = plot_curves(tmp_path)
    assert out == tmp_path / "curves.png"
    check_png(out)
    assert not list(tmp_path.glob(".curves*"))  # written beside, then renamed


def test_plot_curves_of_a_resumed_run(tmp_path):
    """Segments appended by resumed runs, one of them killed mid-line: the plot is drawn, and the steps a killed
    run logged after its last checkpoint give way to the resumed run's."""
    pytest.importorskip("matplotlib")
    path = tmp_path / "metrics.jsonl"
    first = [{"time": 0.1, "step": 0, "val_loss": 7.4}] + segment(range(1, 31), t0=0.2, val_every=10)
    write_records(path, first, torn_after=len(first) - 1)  # killed at step 30, its checkpoint at step 20
    path.write_text(path.read_text() + "\n")  # what Metrics does before appending to a torn file
    write_records(path, segment(range(21, 51), lr=5e-4, val_every=10, loss0=6.5))  # resumed from step 20
    write_records(path, segment(range(45, 61), lr=2e-4, val_every=10, loss0=6.0))  # resumed from step 44

    records, bad = read_metrics(path)
    assert bad == 1
    loss, val, lr, resumes, em = _curves(records)
    assert resumes == [21, 45]
    assert sorted(loss) == list(range(1, 61))
    assert lr[20] == 1e-3 and lr[21] == 5e-4 and lr[44] == 5e-4 and lr[45] == 2e-4
    assert sorted(val) == [0, 10, 20, 30, 40, 50, 60]
    assert val[30] == pytest.approx(6.5 * math.exp(-30 / 20) + 0.8)  # the resumed run's, not the killed one's
    check_png(plot_curves(tmp_path))


def test_plot_curves_without_matplotlib_says_why(tmp_path, monkeypatch, caplog):
    write_records(tmp_path / "metrics.jsonl", segment(range(1, 5)))
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if it were not installed
    logger = logging.getLogger("vlora")
    logger.addHandler(caplog.handler)
    try:
        assert plot_curves(tmp_path) is None
        assert plot_curves(tmp_path / "nowhere") is None
    finally:
        logger.removeHandler(caplog.handler)
    assert "matplotlib is not installed" in caplog.text
    assert "does not exist" in caplog.text
    assert not (tmp_path / "curves.png").exists()


def test_metrics_after_a_torn_line_start_on_a_line_of_their_own(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"time": 1.0, "step": 1, "loss": 2.0}\n{"time": 1.5, "st')
    metrics = Metrics(tmp_path, enabled=True, total_steps=3, progress=False, wandb_config=None)
    metrics.write({"step": 2, "val_loss": 1.0})
    metrics.close()
    records, bad = read_metrics(tmp_path / "metrics.jsonl")
    assert bad == 1 and [r["step"] for r in records] == [1, 2]


def test_curves_carry_the_exact_match_and_drop_a_killed_runs_tail(tmp_path):
    """run.eval_generate's val_exact_match records: kept per step, replaced by the resumed run's from where it
    resumed, and drawn (on their own axis) in curves.png."""
    pytest.importorskip("matplotlib")
    path = tmp_path / "metrics.jsonl"
    first = [{"time": 0.1, "step": 0, "val_loss": 7.4, "val_exact_match": 12.5}] + segment(range(1, 21), t0=0.2)
    first += [{"time": 10.0, "step": 20, "val_loss": 3.0, "val_exact_match": 40.0}] + segment(range(21, 31), t0=10.1)
    first += [{"time": 16.0, "step": 30, "val_loss": 2.9, "val_exact_match": 45.0}]
    write_records(path, first)
    write_records(path, segment(range(21, 41), lr=5e-4) + [{"time": 20.0, "step": 40, "val_loss": 2.5,
                                                             "val_exact_match": 62.5}])
    loss, val, lr, resumes, em = _curves(read_metrics(path)[0])
    assert resumes == [21]
    assert em == {0: 12.5, 20: 40.0, 40: 62.5}  # step 30's belonged to the killed run
    check_png(plot_curves(tmp_path))
