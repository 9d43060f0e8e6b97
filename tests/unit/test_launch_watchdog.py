"""The hang watchdog's rules (which rank is hung, from heartbeats and stacks), the heartbeat records, the fault
hook, and the console report of the launcher's torchrun process. Everything here runs in this process: the
real two-rank kill and hang runs are tests/e2e/test_restart.py."""
from __future__ import annotations

import faulthandler
import importlib
import os
import threading

import pytest
import torch.distributed as dist

from mftune import faults, heartbeat
from mftune.heartbeat import Beat, beat, heartbeat_path, phase, read_beat
from mftune.launch_agent import ProcessFailure, describe, order, report_lines, restart_line  # torch's type
from mftune.launch_watchdog import (Frame, Hang, Watchdog, decide, innermost, main_thread_frames, parse_stacks,
                                    waiting_in_collective)
from mftune.launch_worker import failure_block, is_peer_error, isolate_attempt, read_exit_record

SITE = "/usr/lib/python3.11/site-packages"
# main-thread stacks as faulthandler writes them (innermost first), from the two-rank hang run
WAITING = [Frame(f"{SITE}/torch/distributed/distributed_c10d.py", 3252, "all_reduce"),
           Frame(f"{SITE}/torch/distributed/c10d_logger.py", 83, "wrapper"),
           Frame("/work/mftune/trainer/loop.py", 199, "_token_counts")]
FSDP_WAIT = [Frame(f"{SITE}/torch/_ops.py", 1243, "__call__"),
             Frame(f"{SITE}/torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py", 300, "wait_for_unshard"),
             Frame(f"{SITE}/torch/nn/modules/module.py", 1784, "_call_impl")]
SLEEPING = [Frame("/work/mftune/faults.py", 51, "inject_fault"), Frame("/work/mftune/trainer/loop.py", 95, "train_loop")]
COMPUTING = [Frame(f"{SITE}/torch/nn/functional.py", 2000, "linear"),
             Frame("/work/mftune/models/llama.py", 120, "forward"),
             Frame(f"{SITE}/torch/distributed/fsdp/_fully_shard/_fsdp_state.py", 80, "_pre_forward")]


def test_collective_waits_are_told_from_everything_else():
    assert waiting_in_collective(WAITING) and waiting_in_collective(FSDP_WAIT)
    assert not waiting_in_collective(SLEEPING)
    assert not waiting_in_collective(COMPUTING)  # torch.distributed further out does not count
    assert not waiting_in_collective([])
    assert innermost(SLEEPING) == "faults.py:51 inject_fault < loop.py:95 train_loop"


def test_a_real_dump_is_parsed_and_its_main_thread_found(tmp_path):
    stop = threading.Event()
    helper = threading.Thread(target=stop.wait, daemon=True)
    helper.start()
    path = tmp_path / "stacks"
    with open(path, "w") as f:
        faulthandler.dump_traceback(f, all_threads=True)
    stop.set()
    text = path.read_text()
    threads = parse_stacks(text)
    assert threading.main_thread().ident in threads and helper.ident in threads
    main = main_thread_frames(text, threading.main_thread().ident)
    assert main[0].func == "test_a_real_dump_is_parsed_and_its_main_thread_found"
    assert main_thread_frames("", 1) is None
    assert main_thread_frames(text, 12345) == list(threads.values())[-1]  # unknown id: the oldest thread


def _beat(step: int, at: float, phase_: str = "step") -> Beat:
    return Beat(at, step, phase_, 1, 1)


def test_the_rank_that_is_not_waiting_is_hung_not_the_one_waiting_for_it():
    beats = {0: _beat(3, 90.0), 1: _beat(3, 88.0)}
    verdict = decide(beats, {0: WAITING, 1: SLEEPING}, now=100.0)
    assert verdict.kind == "hung" and list(verdict.hangs) == [1]
    hang = verdict.hangs[1]
    assert hang.cause == "stopped progressing (hung) at step 3"
    assert "rank(s) 0 wait for it in a collective" in hang.why and "faults.py:51 inject_fault" in hang.why
    silent = decide(beats, {0: WAITING, 1: None}, now=100.0)  # no stack answer: hung too
    assert list(silent.hangs) == [1] and "did not answer a stack request" in silent.hangs[1].why


def test_everyone_waiting_names_the_rank_furthest_behind():
    beats = {0: _beat(5, 90.0), 1: _beat(4, 91.0), 2: _beat(4, 89.0), 3: _beat(5, 80.0)}
    verdict = decide(beats, {r: WAITING for r in beats}, now=100.0)
    assert verdict.kind == "mismatch" and list(verdict.hangs) == [2] and verdict.hangs[2].step == 4


def test_everyone_computing_is_not_a_hang():
    beats = {0: _beat(3, 90.0), 1: _beat(3, 90.0)}
    assert decide(beats, {0: COMPUTING, 1: SLEEPING}, now=100.0).kind == "computing"
    assert list(decide(beats, {0: None, 1: None}, now=100.0).hangs) == [0, 1]  # nobody answers at all


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _write_beat(log_dir: str, rank: int, step: int, at: float, phase_: str = "step", pid: int | None = None):
    with open(heartbeat_path(log_dir, rank), "w") as f:
        f.write(f"{at:.3f} {step} {phase_} {pid or os.getpid()} {threading.main_thread().ident}\n")


def test_watchdog_waits_for_the_timeout_then_names_the_hung_rank(tmp_path):
    log, clock, asked, said = str(tmp_path), Clock(), [], []
    dumps = {0: "Current thread 0x%x (most recent call first):\n" % threading.main_thread().ident +
             "".join(f'  File "{f.file}", line {f.line} in {f.func}\n' for f in WAITING),
             1: "Current thread 0x%x (most recent call first):\n" % threading.main_thread().ident +
             "".join(f'  File "{f.file}", line {f.line} in {f.func}\n' for f in SLEEPING)}
    dog = Watchdog(log, 5, clock=clock, say=said.append, ask=lambda w: asked.append(dict(w)) or dumps)
    workers = {0: os.getpid(), 1: os.getpid()}
    assert dog.check(workers) == {}  # no heartbeat yet: start-up is not watched
    _write_beat(log, 0, 3, 999.0)
    _write_beat(log, 1, 3, 998.0)
    assert dog.check(workers) == {} and not asked  # within the timeout
    clock.now = 1006.0
    hangs = dog.check(workers)
    assert list(hangs) == [1] and asked == [workers]
    assert hangs[1].stacks == os.path.join(log, "worker_1.stacks") and hangs[1].step == 3
    _write_beat(log, 1, 3, 998.0, pid=os.getpid() + 1)  # another attempt's record: not this worker's
    dog.reset()
    assert dog.check(workers) == {}


def test_watchdog_snoozes_when_everyone_computes_and_waits_on_multi_node_mismatch(tmp_path):
    log, clock, said = str(tmp_path), Clock(), []
    ident = threading.main_thread().ident
    stacks = {"computing": COMPUTING, "waiting": WAITING}
    current = {"which": "computing"}

    def ask(workers):
        frames = stacks[current["which"]]
        return {r: f"Current thread 0x{ident:x} (most recent call first):\n" +
                "".join(f'  File "{f.file}", line {f.line} in {f.func}\n' for f in frames) for r in workers}

    dog = Watchdog(log, 5, clock=clock, say=said.append, ask=ask, multi_node=True)
    workers = {0: os.getpid(), 1: os.getpid()}
    _write_beat(log, 0, 7, 990.0)
    _write_beat(log, 1, 6, 990.0)
    assert dog.check(workers) == {} and "not a hang, checking again in 5 s" in said[0]
    clock.now = 1002.0
    assert dog.check(workers) == {} and len(said) == 1  # snoozed
    current["which"] = "waiting"
    clock.now = 1006.0
    assert dog.check(workers) == {}  # multi-node: another node's launcher may hold the culprit
    clock.now = 1012.0
    assert list(dog.check(workers)) == [1]  # still stuck: the rank furthest behind
    _write_beat(log, 1, 6, 990.0, "done")
    dog.reset()
    assert dog.check(workers) == {}  # a rank that finished training is not watched


def test_heartbeat_records(tmp_path, monkeypatch):
    path = str(tmp_path / ".heartbeat_0")
    monkeypatch.delenv(heartbeat.ENV, raising=False)
    beat("step", 1)
    assert not os.path.exists(path)  # outside the launcher: nothing
    monkeypatch.setenv(heartbeat.ENV, path)
    beat("step", 12)
    first = read_beat(path)
    assert (first.step, first.phase, first.pid, first.thread, first.timed) == (12, "step", os.getpid(),
                                                                               threading.main_thread().ident, True)
    with phase("save", 13):
        assert (read_beat(path).phase, read_beat(path).step) == ("save", 13)
    assert (read_beat(path).phase, read_beat(path).step) == ("step", 13)
    beat("done")
    assert not read_beat(path).timed and os.path.getsize(path) == 96
    assert read_beat(str(tmp_path / "missing")) is None


def test_fault_hook_fires_only_where_told(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    faults.inject_fault(3)  # unset: nothing
    monkeypatch.setenv(faults.ENV, "rank=1,step=3,kind=error")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    faults.inject_fault(3)  # attempt 1: the fault is for attempt 0
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    faults.inject_fault(2)
    with pytest.raises(RuntimeError, match="injected error at step 3"):
        faults.inject_fault(3)
    monkeypatch.setenv(faults.ENV, "rank=1,kind=explode")
    with pytest.raises(ValueError, match="expected rank=R,step=S,kind=kill"):
        faults.inject_fault(3)


def test_peer_errors_are_told_from_real_failures():
    assert is_peer_error(RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1"))
    assert is_peer_error(type("DistBackendError", (RuntimeError,), {})("NCCL error"))
    assert not is_peer_error(ValueError("boom"))
    assert not is_peer_error(RuntimeError("CUDA out of memory"))


def _failure(rank: int, code: int, tmp_path) -> ProcessFailure:
    return ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=code, error_file=str(tmp_path / "none"))


def test_console_report_names_the_failed_rank_first(tmp_path):
    log = str(tmp_path)
    (tmp_path / "worker_1.log").write_text("step 3\nMFTUNE_FAULT: rank 1 kill at step 4\n")
    survivor = {"pid": 100, "code": 1, "peer": True, "printed": False, "time": 1.0,
                "last": "RuntimeError: Connection closed by peer [127.0.0.1]:1"}
    failed = [describe(0, _failure(0, 1, tmp_path), survivor, None),  # failed first, but only because of rank 1
              describe(1, _failure(1, -9, tmp_path), None, None),
              describe(2, _failure(2, -15, tmp_path), None, None)]  # stopped by torchrun: not named
    assert [f.rank for f in order(failed)] == [1, 0, 2]
    lines = report_lines(failed, log)
    assert lines[0].startswith(f"mftune launcher: rank 1 killed by signal 9 (SIGKILL); see {log}/worker_1.log\n")
    assert "[rank 1] MFTUNE_FAULT: rank 1 kill at step 4" in lines[0]
    assert lines[1] == (f"mftune launcher: rank 0 then failed waiting for another rank (exit 1: RuntimeError: "
                        f"Connection closed by peer [127.0.0.1]:1); see {log}/worker_0.log")
    assert len(lines) == 2
    first = order(failed)[0]
    assert restart_line(first, 2, 2, log) == (
        f"mftune launcher: rank 1 killed by signal 9 (SIGKILL); restarting the job from its last complete "
        f"checkpoint (restart 1 of 2); this attempt's worker_*.log and worker_*.stacks in {log} move to *.1")
    assert restart_line(first, 2, 0, log) == "mftune launcher: rank 1 killed by signal 9 (SIGKILL); no restarts left (2 used)"
    assert restart_line(first, 0, 0, log) is None  # no budget: today's output


def test_hung_and_self_reported_failures(tmp_path):
    log = str(tmp_path)
    hang = Hang(1, 4, "no heartbeat for 6 s while rank(s) 0 wait for it in a collective", f"{log}/worker_1.stacks")
    hung = describe(1, _failure(1, -9, tmp_path), None, hang)
    assert hung.cause == "stopped progressing (hung) at step 4"
    assert report_lines([hung], log)[0].splitlines()[1:3] == [f"  {hang.why}", f"  its threads' stacks: {log}/worker_1.stacks"]
    printed = describe(1, _failure(1, -15, tmp_path), {"pid": 101, "code": 3, "peer": False, "printed": True,
                                                        "time": 1.0, "last": "x"}, None)
    assert (printed.cause, printed.primary, report_lines([printed], log)) == ("exit 3", True, [])  # it printed its own
    mistake = describe(0, _failure(0, 2, tmp_path), {"pid": 100, "code": 2, "peer": False, "printed": True,
                                                      "time": 1.0}, None)  # e.g. a bad config: exit 2
    assert mistake.primary and restart_line(mistake, 2, 2, log) == (
        "mftune launcher: rank 0 exit 2; not restarting: exit status 2 is a mistake in the command, its config or "
        "its files, which a restart would repeat (see the message above)")
    only_peers = [describe(0, _failure(0, 1, tmp_path), {"pid": 100, "code": 1, "peer": True, "time": 1.0}, None)]
    assert report_lines(only_peers, log)[0].startswith("mftune launcher: rank 0 failed waiting")  # cause elsewhere


def test_exit_records_and_blocks(tmp_path):
    (tmp_path / ".exit_1").write_text('{"pid": 7, "code": 1, "peer": false}')
    assert read_exit_record(str(tmp_path), 1, 7)["code"] == 1
    assert read_exit_record(str(tmp_path), 1, 8) is None  # another attempt's process
    assert read_exit_record(str(tmp_path), 2, 7) is None
    (tmp_path / "worker_1.log").write_text("\n".join(f"line {i}" for i in range(9)) + "\n\n")
    block = failure_block(1, "exit 1", str(tmp_path / "worker_1.log"))
    assert block.splitlines()[1:] == [f"  [rank 1] line {i}" for i in range(4, 9)]


def test_a_restarted_attempt_sees_the_store_under_its_own_prefix(monkeypatch):
    rendezvous = importlib.import_module("torch.distributed.rendezvous")
    shared = dist.HashStore()
    monkeypatch.setattr(rendezvous, "_create_c10d_store", lambda *a, **k: shared)
    isolate_attempt("0")
    assert rendezvous._create_c10d_store("h", 1, 0, 2, None) is shared  # first attempt: torch's own store
    shared.set("default_pg/addr", "old")  # what the dead attempt left
    isolate_attempt("1")
    store = rendezvous._create_c10d_store("h", 1, 0, 2, None)
    assert not store.check(["default_pg/addr"])
    store.set("default_pg/addr", "new")
    assert shared.get("default_pg/addr") == b"old" and shared.get("mftune_attempt_1/default_pg/addr") == b"new"
