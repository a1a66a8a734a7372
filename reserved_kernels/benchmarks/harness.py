"""Shared benchmark plumbing: timing medians, copy bandwidth, environment metadata, result files."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch


def environment() -> dict:
    """Device name, versions, commit and date: what every result file records."""
    import reserved_kernels
    from reserved_kernels import _backend

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(__file__), check=False).stdout.strip() or None
    except OSError:
        commit = None
    env = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
               triton=triton_version, reserved_kernels=reserved_kernels.__version__, commit=commit,
               cpu=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
               cuda_extension=_backend.extension_status()[0])
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, check=False).stdout.strip()
        except OSError:
            env["driver"] = None
    return env


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


# Children measuring CPU memory run with glibc's mmap threshold fixed: large blocks then come from (and go
# back to) the kernel, so the peak RSS follows the live tensors. With the default, dynamic threshold, glibc
# raises the threshold as large blocks are freed and keeps later ones on its heap (Gemma 3 270M's steps peaked a
# hundred MiB or more higher), an amount that depends on what the set-up freed.
MEASURING_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def measure_step(step, device: torch.device, what: str, repeat: int) -> dict:
    """In a child: ``{"extra_bytes"}`` (``what="memory"``), the step's median and quantiles (``"time"``; on a CPU
    each step's time too, ``times_ms``), or both."""
    out = {}
    if what in ("memory", "both"):
        out["extra_bytes"] = peak_bytes(step, device)
    if what in ("time", "both"):
        if device.type == "cuda":
            out.update(gpu_median(step, warmup_ms=50, rep_ms=300))
        else:
            times = cpu_times(step, warmup=0 if out else 1, repeat=repeat)
            out.update(_summary(times), times_ms=times)
    return out


def _child_json(cmd: list[str], env: dict) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:])} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_measured(cmd: list[str], device_type: str, memory_runs: int = 3) -> dict:
    """Run a measuring child (``cmd`` takes ``--measure``) in fresh processes and merge what they report
    (:func:`run_interleaved` for one child)."""
    return run_interleaved({"child": cmd}, device_type, memory_runs)["child"]


def run_interleaved(cmds: dict, device_type: str, memory_runs: int = 3, time_runs: int = 1) -> dict:
    """Run measuring children (name -> command taking ``--measure``) in fresh processes: {name: what they report}.

    On a CPU, memory and time come from separate processes: ``memory_runs`` memory ones per child with
    ``MEASURING_ENV`` (see there), whose median is ``extra_bytes`` (each in ``extra_bytes_runs``: a loaded
    machine still moves the RSS of one process by several percent), and ``time_runs`` timed ones per child with
    the allocator as users have it (a fixed mmap threshold costs page faults: a step runs markedly slower with
    it), taken round by round across the children — round ``i`` starting at the ``i``-th — with their steps
    pooled into one median: a shared machine drifts over minutes (the same step differs by a tenth between two
    processes a few minutes apart), and this spreads the drift over every child alike. On CUDA one process per
    child measures both: the allocator's count is exact, the clock steady.
    """
    if device_type == "cuda":
        return {name: _child_json(cmd + ["--measure=both"], dict(os.environ)) for name, cmd in cmds.items()}
    if memory_runs < 1 or time_runs < 1:
        raise ValueError(f"memory_runs and time_runs must be at least 1, got {memory_runs} and {time_runs}")
    names = list(cmds)
    timed: dict = {name: [] for name in names}
    for i in range(time_runs):
        for name in names[i % len(names):] + names[:i % len(names)]:
            timed[name].append(_child_json(cmds[name] + ["--measure=time"], dict(os.environ)))
    out = {}
    for name in names:
        steps = [t for run in timed[name] for t in run["times_ms"]]
        memory = [_child_json(cmds[name] + ["--measure=memory"], dict(os.environ, **MEASURING_ENV))["extra_bytes"]
                  for _ in range(memory_runs)]
        out[name] = {**timed[name][0], **_summary(steps), "times_ms": steps, "time_runs": time_runs,
                     "extra_bytes": int(statistics.median(memory)), "extra_bytes_runs": memory}
    return out


def child_command(module: str, config: dict, keys, **fixed) -> list[str]:
    """``python -m module --child`` with ``fixed`` options and each configuration key in ``keys`` as its
    option: a True value as a bare flag, None and False left out (the child's default)."""
    cmd = [sys.executable, "-m", module, "--child"] + [f"--{k}={v}" for k, v in fixed.items()]
    for key in keys:
        value = config.get(key)
        if value is True:
            cmd.append(f"--{key}")
        elif value is not None and value is not False:
            cmd.append(f"--{key}={value}")
    return cmd


def machine_phrase(env: dict) -> str:
    """The GPU, or the CPU and its cores, from :func:`environment`'s record."""
    return env.get("gpu") or f"CPU {env.get('cpu')}, {env.get('cpu_count')} cores"


def write_report(path: str, payload: dict, caption: str, table: str) -> None:
    """The results as JSON at ``path`` and, beside it, the caption and table as Markdown (``.md``)."""
    write_results(path, payload)
    with open(path.removesuffix(".json") + ".md", "w") as f:
        f.write(caption + "\n\n" + table + "\n")
    print(f"wrote {path} and its .md", file=sys.stderr)


def processes_phrase(config: dict) -> str:
    """How a result file's figures were measured, for its caption (files before ``memory_runs`` had one, before
    ``time_runs`` one timed process)."""
    runs, timed = config.get("memory_runs", 1), config.get("time_runs", 1)
    if config["device"] == "cuda" or runs == timed == 1:
        return "each in a fresh process"
    parts = [f"memory: the median of {runs}"] if runs > 1 else []
    if timed > 1:
        parts.append(f"time: the median step of {timed} processes a recipe, taken in turn across the recipes")
    return f"each in fresh processes ({'; '.join(parts)})"


def peak_bytes(fn, device: torch.device) -> int:
    """The most memory two calls of ``fn()`` hold beyond what was allocated before them: CUDA
    ``max_memory_allocated``; on a CPU the peak RSS (the high-water mark reset first, where Linux allows)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    base = _rss_bytes("VmRSS")
    if not _reset_peak_rss():
        base = _rss_bytes("VmHWM")
    fn()
    fn()
    return _rss_bytes("VmHWM") - base


def cpu_median(fn, *, warmup: int = 1, repeat: int = 5) -> dict:
    """Median, p20 and p80 wall time in ms of ``fn()`` on the CPU."""
    return _summary(cpu_times(fn, warmup=warmup, repeat=repeat))


def cpu_times(fn, *, warmup: int = 1, repeat: int = 5) -> list[float]:
    """Wall time in ms of each of ``repeat`` calls of ``fn()`` on the CPU, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _summary(times: list[float]) -> dict:
    """Median, p20 and p80 of ``times`` (ms)."""
    q = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
    return dict(median_ms=statistics.median(times), p20_ms=q[0], p80_ms=q[3])


def gpu_median(fn, *, warmup_ms: int = 10, rep_ms: int = 40) -> dict:
    """Median, p20 and p80 in ms of ``fn()`` with CUDA events (triton.testing.do_bench, L2 flushed)."""
    import triton.testing

    med, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return dict(median_ms=med, p20_ms=p20, p80_ms=p80)


def copy_bandwidth_gbs(nbytes: int = 2 << 30, device: torch.device | str = "cuda") -> float:
    """Copy bandwidth on ``device`` (bytes read + bytes written per second), measured now."""
    device = torch.device(device)
    if device.type == "cpu":
        nbytes = min(nbytes, 256 << 20)
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timer = gpu_median if device.type == "cuda" else cpu_median
    ms = timer(lambda: dst.copy_(src))["median_ms"]
    return 2 * nbytes / ms / 1e6


def head_only_gemma(weight: torch.Tensor) -> torch.nn.Module:
    """A ``GemmaForCausalLM`` with no decoder layers whose tied table is ``weight`` (embedding, final norm,
    output head): the whole output side of a step, without a body. Needs transformers."""
    import transformers

    vocab, dim = weight.shape
    config = transformers.GemmaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=0,
                                      num_attention_heads=1, num_key_value_heads=1, head_dim=64, pad_token_id=0,
                                      eos_token_id=1, bos_token_id=2, tie_word_embeddings=True)
    model = transformers.GemmaForCausalLM(config).to(device=weight.device, dtype=weight.dtype)
    model.get_input_embeddings().weight = torch.nn.Parameter(weight, requires_grad=False)
    model.tie_weights()
    return model


def write_results(path: str, payload: dict) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)
