"""The machine a result was measured on: CPU name, vector extensions, rough peak (no jax, no torch)."""

from __future__ import annotations

import datetime
import os
import platform


def cpu_name() -> str:
    """The CPU model, from /proc/cpuinfo where there is one."""
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> set[str]:
    """The CPU's feature flags, from /proc/cpuinfo where there is one."""
    try:
        with open("/proc/cpuinfo") as file:
            line = next((line for line in file if line.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.partition(":")[2].split())


def vector_extensions() -> str:
    """The widest vector extensions of this CPU, as speed numbers must state them."""
    flags = cpu_flags()
    widest = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "SSE"
    return widest + ("+FMA" if "fma" in flags else "")


def peak_gflops() -> float | None:
    """Rough float32 peak of this CPU: cores x clock x FLOPs per cycle (FMA: 2 per lane).

    AVX-512 with FMA: 2 x 16 lanes x 2; AVX2 with FMA: 2 units x 8 lanes x 2 (Zen 2+, Haswell+).
    """
    try:
        with open("/proc/cpuinfo") as file:
            text = file.read()
    except OSError:
        return None
    flags = next((line for line in text.splitlines() if line.startswith("flags")), "").split()
    mhz = next((float(line.split(":")[1]) for line in text.splitlines()
                if line.startswith("cpu MHz")), None)
    if mhz is None or "fma" not in flags:
        return None
    per_cycle = 64 if "avx512f" in flags else 32 if "avx2" in flags else 16
    return (os.cpu_count() or 1) * mhz * 1e6 * per_cycle / 1e9


def machine_line(what: str) -> str:
    """A results file's header line: the time, `what`, and the machine."""
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"# {when} {what}; {cpu_name()} {vector_extensions()} {os.cpu_count()} cores\n"
