"""The launcher's torchrun process: ``python -m mftune.launch_agent --log-dir LOG_DIR --heartbeat-timeout S
TORCHRUN_ARGS...`` runs ``torch.distributed.run`` with its elastic agent extended, and without its
traceback dump on failure.

torchrun's agent (``LocalElasticAgent``) starts the node's workers, watches them, and on a failure stops the
others and restarts the group up to ``--max-restarts`` times (each attempt's workers see
``TORCHELASTIC_RESTART_COUNT``). ``MftuneAgent`` adds, in its monitoring loop (every 0.1 s, the same thread
that restarts, so a kill never races a restart):

* the hang watchdog (``mftune.launch_watchdog``): a local rank that stopped progressing is killed, so that
  torchrun restarts the job or ends it, and named as hung with the frames it was stuck in;
* the console report of every failure, failed rank first: a rank killed by a signal (it cannot print its
  own log tail) or hung gets its block here; a rank that failed on its own has printed its block already
  (``mftune.launch_worker``); ranks that then failed only because their peer went away get one line each,
  after it. Then one line with the cause and what happens next: ``restarting the job from its last complete
  checkpoint (restart 1 of 2)`` or ``no restarts left (2 used)`` (only with a restart budget).

When the job fails, one line names the first failure instead of torchrun's traceback and table.
torch is imported here: only the torchrun process runs this module (``mftune.launch`` stays torch-free).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from torch.distributed.elastic.agent.server.api import WorkerGroup, WorkerState
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
from torch.distributed.launcher import api as launcher_api
from torch.distributed.run import parse_args as torchrun_parse_args
from torch.distributed.run import run

from mftune.errors import USER_MISTAKE
from mftune.launch_watchdog import Hang, Watchdog
from mftune.launch_worker import failure_block, log_path, read_exit_record


@dataclass
class Settings:
    log_dir: str
    heartbeat_timeout: float  # seconds; 0: no watchdog
    first: tuple[int, str] | None = None  # (rank, cause) of the last reported attempt's first failure


@dataclass(frozen=True)
class Failure:
    rank: int
    cause: str
    # "cause": it failed by itself; "mistake": the same, with exit status 2 (a user mistake: a restart would repeat
    # it); "peer": it failed because another rank went away; "stopped": torchrun's SIGTERM after another failure
    kind: str
    printed: bool  # the worker printed its own block
    time: float
    extra: tuple[str, ...] = ()

    @property
    def primary(self) -> bool:
        return self.kind in ("cause", "mistake")


def describe(rank: int, failure: ProcessFailure, record: dict | None, hang: Hang | None) -> Failure:
    """One failed rank: its cause as the console names it, and whether it is a cause or a consequence. The
    worker's exit record comes first: a rank can be stopped by torchrun's SIGTERM after it wrote it."""
    when = record["time"] if record else float(failure.timestamp)
    if hang is not None:
        return Failure(rank, hang.cause, "cause", False, when, (f"  {hang.why}", f"  its threads' stacks: {hang.stacks}"))
    if record and record.get("peer"):
        last = f": {record['last'][:160]}" if record.get("last") else ""
        return Failure(rank, f"failed waiting for another rank (exit {record['code']}{last})", "peer", False, when)
    if record:
        kind = "mistake" if record["code"] == USER_MISTAKE else "cause"
        return Failure(rank, f"exit {record['code']}", kind, bool(record.get("printed")), when)
    if failure.exitcode == -signal.SIGTERM:  # torchrun stops the others once one rank failed
        return Failure(rank, "stopped by torchrun (signal 15, SIGTERM)", "stopped", False, when)
    if failure.exitcode < 0:
        try:
            name = f" ({signal.Signals(-failure.exitcode).name})"
        except ValueError:
            name = ""
        return Failure(rank, f"killed by signal {-failure.exitcode}{name}", "cause", False, when)
    return Failure(rank, f"exit {failure.exitcode}", "cause", False, when)


def order(failures: list[Failure]) -> list[Failure]:
    """Causes first (earliest first), then the ranks that failed because of them, then those torchrun stopped."""
    kinds = ("cause", "mistake", "peer", "stopped")
    return sorted(failures, key=lambda f: (kinds.index(f.kind), f.time, f.rank))


def report_lines(failures: list[Failure], log_dir: str) -> list[str]:
    """What the console shows for one failed attempt, before the restart line: a block (cause and log tail)
    per rank that failed by itself and has not printed its own, first; then one line per rank that failed
    because of it (ranks torchrun stopped are not named). With no cause on this node (it is on another one),
    every failed rank's block."""
    ranked = order(failures)
    out = []
    for f in ranked:
        if f.primary or not ranked[0].primary:
            if not f.printed:
                out.append(failure_block(f.rank, f.cause, log_path(log_dir, f.rank), f.extra).rstrip("\n"))
        elif f.kind == "peer":
            out.append(f"mftune launcher: rank {f.rank} then {f.cause}; see {log_path(log_dir, f.rank)}")
    return out


def restart_line(first: Failure, max_restarts: int, remaining: int, log_dir: str) -> str | None:
    """The line naming the cause and what happens next (None without a restart budget: today's output). A user
    mistake (exit 2: a bad config, a missing file) is not restarted: every attempt would fail the same way."""
    if max_restarts <= 0:
        return None
    head = f"mftune launcher: rank {first.rank} {first.cause}; "
    if first.kind == "mistake":
        return head + "not restarting: exit status 2 is a mistake in the command, its config or its files, which a " \
                      "restart would repeat (see the message above)"
    if remaining > 0:
        return (head + f"restarting the job from its last complete checkpoint (restart "
                f"{max_restarts - remaining + 1} of {max_restarts}); this attempt's worker_*.log and "
                f"worker_*.stacks in {log_dir} move to *.1")
    return head + f"no restarts left ({max_restarts} used)"


class MftuneAgent(LocalElasticAgent):
    """torchrun's local agent plus the hang watchdog and the failure report (module docstring)."""

    def __init__(self, settings: Settings, **kwargs):
        super().__init__(**kwargs)
        self.settings = settings
        self.watchdog = Watchdog(settings.log_dir, settings.heartbeat_timeout)
        self.hangs: dict[int, Hang] = {}

    def _monitor_workers(self, worker_group: WorkerGroup):
        result = super()._monitor_workers(worker_group)
        if result.state == WorkerState.HEALTHY:
            self._watch(worker_group)
        elif result.state in (WorkerState.FAILED, WorkerState.UNHEALTHY) and result.failures:
            self._report(result.failures)
        return result

    def _restart_workers(self, worker_group: WorkerGroup) -> None:
        self.hangs.clear()
        self.watchdog.reset()
        super()._restart_workers(worker_group)

    def _watch(self, group: WorkerGroup) -> None:
        workers = {w.global_rank: w.id for w in group.workers if w.id is not None}
        self.watchdog.multi_node = bool(group.workers) and group.workers[0].world_size > len(group.workers)
        for rank, hang in self.watchdog.check(workers).items():
            self.hangs[rank] = hang
            try:
                os.kill(workers[rank], signal.SIGKILL)  # torchrun sees it fail and stops (or restarts) the rest
            except ProcessLookupError:
                pass

    def _report(self, failures: dict[int, ProcessFailure]) -> None:
        log_dir = self.settings.log_dir
        described = [describe(rank, f, read_exit_record(log_dir, rank, f.pid), self.hangs.get(rank))
                     for rank, f in failures.items()]
        lines = report_lines(described, log_dir)
        first = order(described)[0]
        line = restart_line(first, self._worker_group.spec.max_restarts, self._remaining_restarts, log_dir)
        if line:
            lines.append(line)
        if first.kind == "mistake":
            self._remaining_restarts = 0  # torchrun ends the job instead of repeating the mistake
        self.settings.first = (first.rank, first.cause)
        if lines:
            print("\n".join(lines), file=sys.stderr, flush=True)


def _parse(argv: Sequence[str]) -> tuple[Settings, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m mftune.launch_agent", add_help=False)
    parser.add_argument("--log-dir", required=True)
    parser.add_argument("--heartbeat-timeout", type=float, default=0.0)
    ours, rest = parser.parse_known_args(list(argv))
    return Settings(os.path.abspath(ours.log_dir), ours.heartbeat_timeout), rest


def main(argv: Sequence[str] | None = None) -> int:
    """torchrun with ``MftuneAgent``; 0 when the job succeeds, 1 (one line naming the first failure) if not."""
    settings, torchrun_args = _parse(sys.argv[1:] if argv is None else argv)
    original = launcher_api.LocalElasticAgent
    launcher_api.LocalElasticAgent = functools.partial(MftuneAgent, settings)  # what launch_agent() builds
    try:
        run(torchrun_parse_args(torchrun_args))
    except ChildFailedError as exc:
        rank, cause = settings.first or (exc.get_first_failure()[0], f"exit {exc.get_first_failure()[1].exitcode}")
        print(f"mftune launcher: the job failed; first failure: rank {rank} ({cause})", file=sys.stderr, flush=True)
        return 1
    finally:
        launcher_api.LocalElasticAgent = original
        _remove_bookkeeping(settings.log_dir)
    return 0


def _remove_bookkeeping(log_dir: str) -> None:
    """The workers' heartbeat and exit-record files (``.heartbeat_R``, ``.exit_R``): the job's own state, of no
    use once it ended; LOG_DIR keeps the logs (and any stacks the watchdog asked for)."""
    for name in os.listdir(log_dir) if os.path.isdir(log_dir) else []:
        if name.startswith((".heartbeat_", ".exit_")):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(log_dir, name))


if __name__ == "__main__":
    sys.exit(main())
