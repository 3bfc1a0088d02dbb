"""VLORA_FAILPOINTS: the grammar, the qualifiers, and nothing at all when unset."""

import os
import subprocess
import sys

import pytest

from vlora import failpoints
from vlora.failpoints import Failpoint, FailpointError, failpoint, parse


def test_the_grammar():
    assert parse("nan@5:rank1,kill@save:after_rename:step4, sleep=0.5@save:begin ,term@save:end:step2:hit2") == [
        Failpoint("nan", "loss", step=5, rank=1),
        Failpoint("kill", "save:after_rename", step=4),
        Failpoint("sleep", "save:begin", seconds=0.5),
        Failpoint("term", "save:end", step=2, hit=2),
    ]
    assert parse("stall@3:rank0") == [Failpoint("stall", "step", step=3, rank=0)]
    assert parse("") == []


@pytest.mark.parametrize("bad", ["nan", "boom@5", "kill@save:nowhere", "nan@loss:stepX"])
def test_a_malformed_entry_is_named(bad):
    with pytest.raises(ValueError, match=bad.split(":")[0]):
        parse(bad)


def test_unset_does_nothing(monkeypatch):
    monkeypatch.delenv("VLORA_FAILPOINTS", raising=False)
    assert failpoint("loss", 5) is False
    assert failpoint("save:begin", 1) is False


def test_step_rank_and_hit_qualifiers(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("VLORA_FAILPOINTS", "nan@loss:step3:rank1,nan@loss:step4:rank0,raise@save:end:hit2")
    assert [failpoint("loss", s) for s in (2, 3, 4)] == [False, True, False]
    failpoint("save:end", 2)  # the first hit passes
    with pytest.raises(FailpointError):
        failpoint("save:end", 4)  # the second raises
    failpoint("save:end", 6)  # and later ones pass again


def test_kill_is_a_real_sigkill(tmp_path):
    code = "from vlora.failpoints import failpoint; failpoint('step', 2); print('survived'); failpoint('step', 3)"
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "VLORA_FAILPOINTS": "kill@3"},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9 and proc.stdout == "survived\n"


def test_no_vlora_debug_variables_are_left():
    """The failpoints replaced every VLORA_DEBUG_* switch: none is read anywhere in vlora/."""
    root = os.path.dirname(failpoints.__file__)
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(folder, name)) as f:
                    assert "VLORA_DEBUG" not in f.read(), name
