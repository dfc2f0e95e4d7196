"""JAX's persistent compilation cache, on for the commands: a second run compiles nothing.

`use_compilation_cache()` points JAX at `$XDG_CACHE_HOME/mnist20k/jax/<machine>` (default
`~/.cache/mnist20k/jax/...`) and keeps every compiled program there. `MNIST20K_JAX_CACHE=DIR`
moves it, `MNIST20K_JAX_CACHE=off` turns it off, and a `JAX_COMPILATION_CACHE_DIR` of the user's
own is left as it is. Several processes may share the directory: JAX writes each entry whole.
XLA compiles for the CPU it runs on, so the directory is one per CPU (its model and vector
extensions) and JAX version: a home directory shared by different machines stays safe.
"""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path

import jax

ENV = "MNIST20K_JAX_CACHE"
OFF = ("off", "0", "no", "false", "none")


def machine_key() -> str:
    """This machine's CPU (model and flags) and JAX version, as a short directory name."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        lines = [line for line in cpuinfo.splitlines()
                 if line.startswith(("model name", "flags", "Features", "CPU part"))]
        cpu = "\n".join(sorted(set(lines)))
    except OSError:  # not Linux
        cpu = platform.processor()
    digest = hashlib.sha256(f"{platform.machine()}\n{cpu}".encode()).hexdigest()[:12]
    return f"{platform.machine()}-{digest}-jax{jax.__version__}"


def use_compilation_cache() -> Path | None:
    """Turn on JAX's persistent compilation cache for this process (see the module docstring);
    the directory it uses, None where it is off."""
    setting = os.environ.get(ENV, "").strip()
    if setting.lower() in OFF:
        return None
    if jax.config.jax_compilation_cache_dir:  # the user's own choice
        return Path(jax.config.jax_compilation_cache_dir)
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    directory = (Path(setting).expanduser() if setting else Path(xdg) / "mnist20k" / "jax") / \
        machine_key()
    jax.config.update("jax_compilation_cache_dir", str(directory))
    # Every program, however quick to compile: the start-up compiles many small ones.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory
