"""Shared benchmark helpers: median timing (CUDA events on GPU), peak memory, machine facts, JSON and tables."""
import os
import resource
import statistics
import threading
import time

import torch

from leakycuda import _json
from leakycuda._env import machine_info  # noqa: F401  (re-exported for the bench scripts)


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_fn(fn, *, device="cpu", warmup=2, repeats=7):
    """Runs fn() warmup times, then times repeats calls; returns the median and min in ms."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    cuda = str(device).startswith("cuda")
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "times_ms": times}


def rss_bytes():
    """The process's current resident set (Linux), or None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return None


class PeakMemory:
    """Peak memory above the level at entry: the CUDA allocator's peak, or sampled RSS on CPU (every ~1 ms)."""

    def __init__(self, device="cpu"):
        self.cuda = str(device).startswith("cuda")
        self.peak_bytes = None

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = rss_bytes()
            self.max, self.stop = self.base, threading.Event()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while not self.stop.wait(0.001):
            self.max = max(self.max, rss_bytes())

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated() - self.base
        else:
            self.stop.set()
            self.thread.join()
            self.peak_bytes = max(self.max, rss_bytes()) - self.base
        return False


def write_json(path, payload):
    """Writes payload as strict JSON (non-finite floats as null: leakycuda._json's convention)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _json.dump(payload, path, indent=2)
    print("wrote", path)


def print_table(rows, columns):
    """Prints rows (dicts) as an aligned table; columns is a list of (key, header, format)."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([("" if r.get(k) is None else fmt.format(r[k])) for k, _, fmt in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    for n, c in enumerate(cells):
        print("  ".join(s.rjust(wd) for s, wd in zip(c, widths)))
        if n == 0:
            print("  ".join("-" * wd for wd in widths))
