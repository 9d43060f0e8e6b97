"""Measuring one process on Linux, for the benchmarks: memory from /proc (current, peak, private,
file-backed), the bytes it read, and the torch.distributed collectives it called."""
from __future__ import annotations

import resource
import threading
import time


def proc_status() -> dict[str, int]:
    """This process's VmRSS, VmHWM (peak RSS), RssAnon, RssFile and RssShmem in bytes (/proc/self/status)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    return out


def mem_available() -> int:
    """MemAvailable of the machine, in bytes (/proc/meminfo)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so that VmHWM afterwards is the peak of what follows."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rchar() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    return 0


def ru_maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Meter:
    """One measured section: wall time; VmHWM growth over the RSS at the start (the kernel's exact peak,
    file-backed mmap pages included); the peak of RssAnon (private memory) over its start value, sampled
    every 5 ms by a thread; rchar (bytes through read syscalls; mmap reads are not counted)."""

    def __enter__(self):
        self.reset = reset_peak()
        st = proc_status()
        self.rss_before, self.anon_before = st["VmRSS"], st["RssAnon"]
        self.anon_peak = st["RssAnon"]
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(0.005):
                self.anon_peak = max(self.anon_peak, proc_status()["RssAnon"])

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        self.rchar0 = rchar()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.read_bytes = rchar() - self.rchar0
        st = proc_status()
        self._stop.set()
        self._thread.join()
        self.anon_peak = max(self.anon_peak, st["RssAnon"])
        self.hwm = st["VmHWM"]
        self.growth = max(0, st["VmHWM"] - self.rss_before) if self.reset else None
        self.anon_growth = max(0, self.anon_peak - self.anon_before)
        return False

    def as_dict(self) -> dict:
        return {"seconds": self.seconds, "rss_before": self.rss_before, "hwm": self.hwm,
                "growth": self.growth, "anon_growth": self.anon_growth, "read_bytes": self.read_bytes,
                "ru_maxrss": ru_maxrss()}


C10D_NAMES = ("all_gather_object", "gather_object", "scatter_object_list", "broadcast_object_list",
              "all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
              "broadcast", "barrier", "monitored_barrier", "all_to_all", "all_to_all_single", "send", "recv",
              "isend", "irecv", "gather", "scatter", "reduce", "batch_isend_irecv")
FUNC_NAMES = ("all_reduce", "all_gather_tensor", "reduce_scatter_tensor", "all_to_all_single", "broadcast",
              "all_reduce_coalesced", "all_gather_into_tensor_coalesced", "reduce_scatter_tensor_coalesced")


class CollectiveCounter:
    """Counts top-level calls of torch.distributed's collectives (c10d and functional) while active;
    a collective called from inside another (all_gather_object -> all_gather) counts once."""

    def __init__(self):
        self.calls: dict[str, int] = {}
        self.seconds = 0.0  # wall time inside the counted (top-level) calls, waiting for other ranks included
        self._depth = 0
        self._saved = []

    def _wrap(self, name, fn):
        def wrapper(*args, **kwargs):
            top = self._depth == 0
            if top:
                self.calls[name] = self.calls.get(name, 0) + 1
            self._depth += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
                if top:
                    self.seconds += time.perf_counter() - t0
        return wrapper

    def __enter__(self):
        import torch.distributed as dist
        import torch.distributed._functional_collectives as fc
        import torch.distributed.distributed_c10d as c10d
        for mod, names, prefix in ((dist, C10D_NAMES, ""), (c10d, C10D_NAMES, ""), (fc, FUNC_NAMES, "funcol.")):
            for name in names:
                fn = getattr(mod, name, None)
                if callable(fn):
                    self._saved.append((mod, name, fn))
                    setattr(mod, name, self._wrap(prefix + name, fn))
        return self

    def __exit__(self, *exc):
        for mod, name, fn in reversed(self._saved):
            setattr(mod, name, fn)
        self._saved.clear()
        return False


class PeakSampler(threading.Thread):
    """Samples /proc/self/status every 5 ms: the largest RssAnon and RssFile seen (separately)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop, self.anon, self.file = threading.Event(), 0, 0

    def run(self):
        while not self.stop.is_set():
            m = proc_status()
            self.anon, self.file = max(self.anon, m["RssAnon"]), max(self.file, m["RssFile"])
            time.sleep(0.005)
