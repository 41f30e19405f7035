"""Timing, memory and environment helpers shared by ``mass bench`` and ``bench/microbench.py``.

CUDA: ``triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])`` (it flushes the L2 cache and synchronises),
peak memory from ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
CPU: a timer loop with warm-up; several providers are timed in interleaved rounds (one call of each per round)
so that a background load hits all of them alike; peak memory is the largest amount of tensor memory allocated
above the starting level during one call, from the profiler's allocation events (resident-set growth where the
profiler lacks them).
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime
import gc
import os
import platform
import subprocess
import sys
import threading
import time
from typing import Callable, Optional, Sequence

import torch


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameter numbers (malloc.h)


def retain_freed_memory() -> str:
    """Ask glibc's malloc to keep freed memory for reuse: large blocks come from the heap instead of fresh
    mmaps, and the heap is never trimmed. A freshly mapped page costs a page fault when first written; on
    small VMs those faults take a large and erratic share of a forward. Process-wide and not undone; returns
    what was set, or why nothing was."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "default (not glibc)"
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError as exc:
        return f"default (libc not loaded: {exc})"
    if libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) != 1 or libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) != 1:
        return "default (mallopt refused)"
    return "retain (glibc mallopt: M_MMAP_THRESHOLD 1 GiB, M_TRIM_THRESHOLD 2 GiB)"


def add_malloc_argument(p) -> None:
    p.add_argument("--malloc", default="retain", choices=["retain", "default"],
                   help="CPU: 'retain' (default) makes glibc keep freed memory for reuse instead of returning it "
                        "(fresh pages fault on first write: a large, erratic cost on small VMs); every row runs "
                        "under the same setting, and the report records it")


def malloc_setting(device: torch.device, choice: str) -> str:
    """Apply ``--malloc``: :func:`retain_freed_memory` on the CPU when asked; returns what the report records."""
    return retain_freed_memory() if device.type == "cpu" and choice == "retain" else "default"


def _median_p20_p80(values: Sequence[float]) -> list:
    t = torch.tensor(list(values), dtype=torch.float64)
    return torch.quantile(t, torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)).tolist()


def quantiles_ms(samples_s: Sequence[float]) -> dict:
    q = _median_p20_p80([s * 1e3 for s in samples_s])
    return {"median_ms": q[0], "p20_ms": q[1], "p80_ms": q[2], "n": len(samples_s)}


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_cuda(fn: Callable[[], object], rep_ms: int = 200, warmup_ms: int = 25) -> dict:
    import triton.testing

    med, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return {"median_ms": med, "p20_ms": p20, "p80_ms": p80, "n": None, "timer": "triton.testing.do_bench"}


def time_interleaved_cpu(
    fns: dict, repeats: int = 10, warmup: int = 2, min_time_s: float = 0.0, max_time_s: float = float("inf")
) -> dict:
    """Time every callable in ``fns`` in rounds (one call each per round); returns name -> quantiles."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples = {name: [] for name in fns}
    start = time.perf_counter()
    rounds = 0
    while True:
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
        rounds += 1
        elapsed = time.perf_counter() - start
        if rounds >= repeats and elapsed >= min_time_s:
            break
        if rounds >= 3 and elapsed >= max_time_s:
            break
    out = {}
    for name, s in samples.items():
        out[name] = quantiles_ms(s)
        out[name]["timer"] = "perf_counter interleaved rounds"
        out[name]["samples_ms"] = [t * 1e3 for t in s]  # round i of every provider ran back to back
    return out


def paired_ratio(samples_ms: Sequence[float], floor_samples_ms: Sequence[float]) -> Optional[dict]:
    """Median [p20, p80] over rounds of ``sample_i / floor_i``: each ratio is taken within one round, so slow
    drift of the machine cancels. None unless both providers were timed in the same rounds."""
    if not samples_ms or len(samples_ms) != len(floor_samples_ms):
        return None
    q = _median_p20_p80([a / b for a, b in zip(samples_ms, floor_samples_ms)])
    return {"median": q[0], "p20": q[1], "p80": q[2]}


def time_providers(fns: dict, device: torch.device, **cpu_kwargs) -> dict:
    if device.type == "cuda":
        return {name: time_cuda(fn) for name, fn in fns.items()}
    return time_interleaved_cpu(fns, **cpu_kwargs)


def _rss_bytes() -> Optional[int]:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


@contextlib.contextmanager
def _native_stderr_silenced():
    """Send what native code writes to file descriptor 2 to /dev/null for the block: the profiler's C++ side
    logs a start/stop line pair each time it is used, two noise lines per benchmark row. The call it wraps has
    already run before (checked and timed), so its warnings were shown then; exceptions still propagate."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable descriptor 2: nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as sink:
            os.dup2(sink.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_tensor_bytes(fn: Callable[[], object]) -> Optional[int]:
    """Largest amount of CPU tensor memory allocated above the starting level during one call, summed from the
    profiler's allocation events (frees included), so independent of what the C allocator keeps mapped. None
    where this torch's profiler does not expose them."""
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile

        with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        stack, allocations = list(prof.profiler.kineto_results.experimental_event_tree()), []
        while stack:
            event = stack.pop()
            stack.extend(event.children)
            if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
                allocations.append((event.start_time_ns, event.extra_fields.alloc_size))
    except (ImportError, AttributeError, RuntimeError):
        return None
    running = peak = 0
    for _, size in sorted(allocations, key=lambda a: a[0]):
        running += size
        peak = max(peak, running)
    return peak


def peak_memory(fn: Callable[[], object], device: torch.device) -> dict:
    """Peak memory of one call above the pre-call level: CUDA max allocated; CPU tensor bytes from the profiler's
    allocation events, else (older torch) resident-set growth."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_bytes": peak, "peak_above_start_bytes": peak - before,
                "method": "torch.cuda.max_memory_allocated"}
    peak_tensors = _cpu_peak_tensor_bytes(fn)
    if peak_tensors is not None:
        return {"peak_bytes": None, "peak_above_start_bytes": peak_tensors,
                "method": "CPU tensor bytes allocated above the start of one call (torch.profiler allocation events)"}
    base = _rss_bytes()
    if base is None:
        return {"peak_bytes": None, "peak_above_start_bytes": None, "method": "n/a (no /proc/self/statm)"}
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            r = _rss_bytes()
            if r is not None and r > peak[0]:
                peak[0] = r
            time.sleep(0.0005)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        fn()
    finally:
        done.set()
        th.join()
    peak[0] = max(peak[0], _rss_bytes() or 0)
    return {"peak_bytes": peak[0], "peak_above_start_bytes": peak[0] - base,
            "method": "RSS growth during one call, sampled from /proc/self/statm every 0.5 ms (coarse)"}


def tensor_bytes(*objs) -> int:
    """Bytes of all distinct tensor storages held (parameters and buffers of modules, or tensors)."""
    seen, total = set(), 0
    for obj in objs:
        tensors = []
        if isinstance(obj, torch.nn.Module):
            tensors = list(obj.parameters()) + [b for b in obj.buffers() if b is not None]
        elif isinstance(obj, torch.Tensor):
            tensors = [obj]
        for t in tensors:
            key = (t.untyped_storage().data_ptr(), t.device)
            if key in seen:
                continue
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = None
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                name = line.split(":", 1)[1].strip()
                break
    except (OSError, subprocess.SubprocessError):
        pass
    return f"{name or platform.processor() or platform.machine()} ({os.cpu_count()} CPUs)"


def device_slug(device: torch.device) -> str:
    if device.type == "cuda":
        base = torch.cuda.get_device_name(device)
    else:
        base = f"cpu-{os.cpu_count()}core"
    return "".join(c if c.isalnum() else "-" for c in base.lower()).strip("-")


def git_commit(root: Optional[str] = None) -> Optional[str]:
    """HEAD of the repository at ``root`` (default: this checkout), with ``-dirty`` when tracked files differ
    from it. Results written by earlier runs (``bench/results``) do not count: they do not change the code
    being measured."""
    root = root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)bench/results"], capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - triton is optional on CPU
        triton_version = None
    try:
        import transformers

        tf_version = transformers.__version__
    except Exception:  # noqa: BLE001
        tf_version = None
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": tf_version,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_at_start": load,
        "kernel_impl_env": os.environ.get("MASS_KERNEL_IMPL") or None,
    }
