"""The hang watchdog of the launcher's torchrun process: which local rank stopped progressing.

Every training rank beats (``mftune.heartbeat``) at each step. When no local rank has beaten for
``heartbeat_timeout`` seconds, every local rank is asked for its Python stacks (SIGUSR1: each worker
registered ``faulthandler`` for it, writing ``LOG_DIR/worker_{rank}.stacks``; this works while the main
thread is blocked in C++, e.g. in a gloo or NCCL wait). The hard part is naming the right rank: when rank 1
hangs, rank 0 blocks in the next collective and both heartbeats stop at the same step. So a rank whose main
thread is inside ``torch.distributed`` (a c10d collective, a barrier, an FSDP or DTensor wait) is *waiting*;
the ranks that are not waiting, or that do not answer, are the hung ones (``decide``):

* some wait, some do not: the ones that do not are hung (their innermost frames go in the message);
* all wait (mismatched collectives, or the culprit is on another node): the rank furthest behind (lowest
  step, then oldest heartbeat); on a multi-node job only after a second timeout, so that the node holding
  the culprit acts first;
* none waits (every rank inside a long computation): not a hang; look again after another timeout.

The launcher's agent (``mftune.launch_agent``) kills the hung ranks, so that torchrun restarts the job or
ends it, and names them with the cause. No torch import here: the rules are plain functions, unit-tested.
"""
from __future__ import annotations

import os
import re
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mftune.heartbeat import Beat, heartbeat_path, read_beat

STACK_WAIT_S = 3.0  # how long a rank has to write its stacks after SIGUSR1
_THREAD = re.compile(r"^(?:Current thread|Thread) 0x([0-9a-fA-F]+)")
_FRAME = re.compile(r'^\s+File "(?P<file>.*)", line (?P<line>\d+) in (?P<func>.*)$')


@dataclass(frozen=True)
class Frame:
    file: str
    line: int
    func: str

    def __str__(self) -> str:
        return f"{os.path.basename(self.file)}:{self.line} {self.func}"


@dataclass(frozen=True)
class Hang:
    """A rank the watchdog found hung: its step, why it is blamed, and the file with its stacks."""

    rank: int
    step: int
    why: str
    stacks: str = ""

    @property
    def cause(self) -> str:
        return f"stopped progressing (hung) at step {self.step}"


@dataclass(frozen=True)
class Verdict:
    kind: str  # "hung" | "mismatch" (every rank waits) | "computing" (none waits: not a hang)
    hangs: dict[int, Hang] = field(default_factory=dict)


def stacks_path(log_dir: str, rank: int | str) -> str:
    return os.path.join(log_dir, f"worker_{rank}.stacks")


def parse_stacks(text: str) -> dict[int, list[Frame]]:
    """faulthandler's dump -> ``{thread id: frames, innermost first}``."""
    threads: dict[int, list[Frame]] = {}
    current: list[Frame] | None = None
    for line in text.splitlines():
        if match := _THREAD.match(line):
            current = threads.setdefault(int(match.group(1), 16), [])
        elif current is not None and (match := _FRAME.match(line)):
            current.append(Frame(match["file"], int(match["line"]), match["func"]))
    return threads


def main_thread_frames(text: str, thread: int) -> list[Frame] | None:
    """The frames of the main thread (``thread``, from the heartbeat) in a dump; None when there is no dump.
    A dump without that thread falls back to its last thread (CPython lists the oldest thread last)."""
    threads = parse_stacks(text)
    if not threads:
        return None
    return threads.get(thread, list(threads.values())[-1])


def waiting_in_collective(frames: list[Frame]) -> bool:
    """Whether the innermost frames (the run of them inside torch) are in ``torch.distributed``: a collective,
    a barrier, an FSDP or DTensor wait, i.e. the rank waits for another one."""
    for frame in frames:
        path = frame.file.replace("\\", "/")
        if "/torch/" not in path:
            return False
        if "/torch/distributed/" in path:
            return True
    return False


def innermost(frames: list[Frame], n: int = 3) -> str:
    return " < ".join(str(f) for f in frames[:n]) or "no Python frame"


def decide(beats: dict[int, Beat], stacks: dict[int, list[Frame] | None], now: float) -> Verdict:
    """Which ranks are hung, given each rank's last heartbeat and its main thread's stack (None: no answer)."""
    waiting = sorted(r for r, f in stacks.items() if f is not None and waiting_in_collective(f))
    busy = sorted(r for r, f in stacks.items() if f is not None and r not in waiting)
    silent = sorted(r for r, f in stacks.items() if f is None)
    age = {r: now - b.time for r, b in beats.items()}
    names = ", ".join(map(str, waiting))
    if waiting and (busy or silent):
        hangs = {r: Hang(r, beats[r].step, f"no heartbeat for {age[r]:.0f} s while rank(s) {names} wait for it in "
                         f"a collective; its main thread is in {innermost(stacks[r])}") for r in busy}
        hangs.update({r: Hang(r, beats[r].step, f"no heartbeat for {age[r]:.0f} s while rank(s) {names} wait for "
                              f"it in a collective; it did not answer a stack request") for r in silent})
        return Verdict("hung", hangs)
    if waiting:
        behind = min(beats[r].step for r in waiting)
        oldest = min(beats[r].time for r in waiting if beats[r].step == behind)
        return Verdict("mismatch", {r: Hang(r, behind, f"every rank waits in a collective and it is the furthest "
                                            f"behind (last heartbeat {age[r]:.0f} s ago); its main thread is in "
                                            f"{innermost(stacks[r])}")
                                    for r in waiting if beats[r].step == behind and beats[r].time == oldest})
    if silent and not busy:
        return Verdict("hung", {r: Hang(r, beats[r].step, f"no heartbeat for {age[r]:.0f} s and no rank answered "
                                        f"a stack request") for r in silent})
    return Verdict("computing")


def request_stacks(log_dir: str, workers: dict[int, int], wait_s: float = STACK_WAIT_S) -> dict[int, str | None]:
    """Ask every worker (``{rank: pid}``) for its stacks (SIGUSR1 -> faulthandler) and read them back:
    ``{rank: dump}``, None for a rank that wrote nothing within ``wait_s``."""
    for rank, pid in workers.items():
        try:
            os.truncate(stacks_path(log_dir, rank), 0)  # the worker appends (O_APPEND): the dump starts at 0
        except OSError:
            pass
        try:
            os.kill(pid, signal.SIGUSR1)
        except OSError:  # gone already: torchrun reports it
            pass
    deadline, sizes = time.monotonic() + wait_s, {}
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = {r: _size(stacks_path(log_dir, r)) for r in workers}
        if all(now[r] and now[r] == sizes.get(r) for r in workers):  # every dump written and settled
            break
        sizes = now
    out: dict[int, str | None] = {}
    for rank in workers:
        try:
            with open(stacks_path(log_dir, rank), encoding="utf-8", errors="replace") as f:
                out[rank] = f.read() or None
        except OSError:
            out[rank] = None
    return out


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


class Watchdog:
    """Checks one node's workers (``check``), at most once a second; returns the ranks to kill as hung."""

    def __init__(self, log_dir: str, timeout: float, *, multi_node: bool = False,
                 say: Callable[[str], None] | None = None, clock: Callable[[], float] = time.time,
                 ask: Callable[[dict[int, int]], dict[int, str | None]] | None = None):
        self.log_dir, self.timeout, self.multi_node = log_dir, timeout, multi_node
        self.say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        self.clock = clock
        self.ask = ask or (lambda workers: request_stacks(log_dir, workers))
        self.next_check = 0.0
        self.snooze_until = 0.0
        self.mismatch_seen = False

    def check(self, workers: dict[int, int]) -> dict[int, Hang]:
        """``workers``: ``{global rank: pid}`` of this node's current attempt."""
        now = self.clock()
        if self.timeout <= 0 or now < max(self.next_check, self.snooze_until):
            return {}
        self.next_check = now + min(1.0, self.timeout / 5)
        beats = {r: read_beat(heartbeat_path(self.log_dir, r)) for r in workers}
        beats = {r: b for r, b in beats.items() if b is not None and b.pid == workers[r]}  # this attempt's
        if not workers or len(beats) < len(workers) or not all(b.timed for b in beats.values()):
            return {}  # some rank is starting up or has finished training: nothing to compare
        if now - max(b.time for b in beats.values()) < self.timeout:
            return {}
        dumps = self.ask(workers)
        stacks = {r: main_thread_frames(dumps[r], beats[r].thread) if dumps.get(r) else None for r in workers}
        verdict = decide(beats, stacks, self.clock())
        if verdict.kind == "computing":
            self.say(f"mftune launcher: no heartbeat for {self.timeout:.0f} s, but no rank is waiting for another "
                     f"(all are computing: {'; '.join(f'rank {r} in {innermost(f)}' for r, f in stacks.items())}); "
                     f"not a hang, checking again in {self.timeout:.0f} s")
            self.snooze_until = now + self.timeout
            return {}
        if verdict.kind == "mismatch" and self.multi_node and not self.mismatch_seen:
            self.mismatch_seen = True  # the culprit may be on another node: let its launcher act first
            self.snooze_until = now + self.timeout
            return {}
        return {r: Hang(h.rank, h.step, h.why, stacks_path(self.log_dir, r)) for r, h in verdict.hangs.items()}

    def reset(self) -> None:
        """A new attempt: forget earlier snoozes."""
        self.next_check = self.snooze_until = 0.0
        self.mismatch_seen = False
