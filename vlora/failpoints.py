"""Failpoints: faults injected at named places, for the tests that prove a run survives them.

As in databases (FreeBSD's fail(9), TiKV's fail-rs): production code marks the places where a fault matters with
`failpoint("name", step=...)`, and the environment variable VLORA_FAILPOINTS says which fault fires where. Unset
(always, outside tests) every call is one dictionary lookup that returns False.

    VLORA_FAILPOINTS=nan@5:rank1,kill@save:after_rename:step4

A comma-separated list of ACTION@POINT[:QUALIFIER...]:

    actions    kill        SIGKILL this process (a crash: nothing is flushed, no handler runs)
               exit        os._exit(1) at once
               raise       raise FailpointError (for in-process tests)
               sleep=S     sleep S seconds (hold a save open long enough to kill it from outside)
               term        send this process SIGTERM (a pre-emption notice arriving at that moment)
               stall       stop answering until a signal arrives, then die as a stuck process would (os._exit 143)
               nan         return True: the caller makes its value non-finite (the step's loss)
    points     loss        the step's loss, after the forward (nan)
               grad        the step's gradients, after the backward (nan: one gradient becomes inf, as an fp16
                           overflow makes it; engine ddp)
               step        the start of a step, before its collectives (stall, kill)
               save:begin, save:rank_files, save:before_rename, save:after_rename, save:after_latest, save:end
                           the stages of a checkpoint save (vlora/checkpoint.py), on the rank that reaches them
               A bare number N is short for the action's usual point at step N: nan@5 = nan@loss:step5,
               stall@3 = stall@step:step3, kill@7 = kill@step:step7.
    qualifiers stepN       only at step N (a save's step is the step it saves)
               rankR       only on global rank R (torchrun's RANK; 0 without torchrun)
               hitK        only the K-th time this entry matches in the process (e.g. the second save of a step)

Nothing else in vlora exists only for tests.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

ENV = "VLORA_FAILPOINTS"
ACTIONS = ("kill", "exit", "raise", "sleep", "stall", "term", "nan")
SAVE_POINTS = ("save:begin", "save:rank_files", "save:before_rename", "save:after_rename", "save:after_latest",
               "save:end")
POINTS = ("loss", "grad", "step", *SAVE_POINTS)
# The point a bare step number means, per action.
_DEFAULT_POINT = {"nan": "loss", "stall": "step", "kill": "step", "exit": "step", "raise": "step", "sleep": "step",
                  "term": "step"}


class FailpointError(RuntimeError):
    """What the `raise` action raises."""


@dataclass(frozen=True)
class Failpoint:
    action: str
    point: str
    step: int | None = None
    rank: int | None = None
    hit: int | None = None
    seconds: float = 0.0

    def matches(self, point: str, step: int | None, rank: int) -> bool:
        return (self.point == point and (self.step is None or self.step == step)
                and (self.rank is None or self.rank == rank))


def parse(spec: str) -> list[Failpoint]:
    """The failpoints a VLORA_FAILPOINTS value names; a malformed entry is a ValueError naming it."""
    out = []
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        action, sep, where = entry.partition("@")
        seconds = 0.0
        if action.startswith("sleep="):
            action, seconds = "sleep", float(action.split("=", 1)[1])
        if not sep or action not in ACTIONS:
            raise ValueError(f"{ENV}: '{entry}' is not ACTION@POINT with ACTION one of {', '.join(ACTIONS)}")
        parts, step, rank, hit = [], None, None, None
        for token in where.split(":"):
            if token.startswith("rank") and token[4:].isdigit():
                rank = int(token[4:])
            elif token.startswith("step") and token[4:].isdigit():
                step = int(token[4:])
            elif token.startswith("hit") and token[3:].isdigit():
                hit = int(token[3:])
            else:
                parts.append(token)
        point = ":".join(parts)
        if point.isdigit():
            point, step = _DEFAULT_POINT[action], int(point)
        if point not in POINTS:
            raise ValueError(f"{ENV}: '{entry}' names no known point (one of {', '.join(POINTS)})")
        out.append(Failpoint(action, point, step, rank, hit, seconds))
    return out


_cache: tuple[str, list[Failpoint]] = ("", [])
_hits: dict[int, int] = {}  # entry index -> how often it matched in this process


def _active() -> list[Failpoint]:
    global _cache
    spec = os.environ.get(ENV, "")
    if spec != _cache[0]:
        _cache = (spec, parse(spec))
        _hits.clear()
    return _cache[1]


def failpoint(point: str, step: int | None = None) -> bool:
    """Fire the faults set for `point` (at `step`, on this rank). True when a `nan` fault matched: the caller makes
    its value non-finite. Without VLORA_FAILPOINTS: False, and nothing else happens."""
    active = _active() if os.environ.get(ENV) else []
    if not active:
        return False
    rank = int(os.environ.get("RANK", "0"))
    poisoned = False
    for i, fp in enumerate(active):
        if not fp.matches(point, step, rank):
            continue
        _hits[i] = _hits.get(i, 0) + 1
        if fp.hit is not None and _hits[i] != fp.hit:
            continue
        if fp.action == "nan":
            poisoned = True
        elif fp.action == "sleep":
            time.sleep(fp.seconds)
        elif fp.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif fp.action == "term":
            os.kill(os.getpid(), signal.SIGTERM)
        elif fp.action == "exit":
            os._exit(1)
        elif fp.action == "raise":
            raise FailpointError(f"failpoint {fp.action}@{point} (step {step})")
        elif fp.action == "stall":
            _stall_until_signalled()
    return poisoned


def _stall_until_signalled() -> None:
    """Stop answering (the other ranks' collectives wait) until a signal comes (torchrun sends SIGTERM when another
    rank fails); then die at once, as a stuck process would when SIGKILLed (torchrun waits 30 s to do that)."""
    received = []
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: received.append(signum))
    while not received:
        time.sleep(0.1)
    os._exit(143)
