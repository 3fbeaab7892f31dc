"""Host memory on a CPU: glibc settings that keep XLA:CPU's per-step temporaries in the heap.

XLA:CPU allocates a step's temporaries afresh (one 295 MB block for `default`) and frees them
when the step ends. glibc hands a block that large out with an mmap of its own and takes it
back with munmap, so every step faulted in fresh zeroed pages, and the unmap held the
address-space lock (a thread started right after a step waited for it). Switching mmap off
(`keep_host_memory`) covers only the main arena: a thread in any other arena maps a block over
64 MB whatever M_MMAP_MAX says, and XLA's device thread gets an arena of its own.

So, process-wide:
- `one_arena`, when `engine` is imported and JAX is about to start on one CPU device: every
  thread allocates from the main arena. It must come before JAX starts its CPU client, because
  a thread picks its arena at its first malloc and keeps it (imported after `jax.devices()`,
  or in a Jupyter kernel, it is too late: start Python with MALLOC_ARENA_MAX=1 instead).
  `default` ran 1.27x faster a step. Not with several CPU devices: their threads' blocks, in
  one heap that is never unmapped, fragmented it until a 3 GB state's checkpoint benchmark
  (8 virtual devices) ran a 24 GB host out of memory.
- `keep_host_memory`, in `setup` on a CPU: no per-block mmap, trimming only above 2 GB. The
  price of both is that the process keeps its peak host memory.

SHARDTRAIN_KEEP_HOST_MEMORY=0 leaves glibc as it is (e.g. to time another framework as shipped).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import re
import sys
import tempfile

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc's malloc.h


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc, with the signatures used here; None elsewhere (macOS, musl)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not Linux
        return None
    if not (hasattr(libc, "mallopt") and hasattr(libc, "malloc_info")):
        return None  # musl
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    return libc


def _glibc() -> ctypes.CDLL | None:
    """glibc, unless SHARDTRAIN_KEEP_HOST_MEMORY=0 says to leave it as it is."""
    return None if os.environ.get("SHARDTRAIN_KEEP_HOST_MEMORY", "1") == "0" else _libc()


def _cpu_devices(jax) -> int:
    """How many CPU devices JAX will make: jax_num_cpu_devices, else XLA_FLAGS' count, else 1."""
    configured = getattr(jax.config, "jax_num_cpu_devices", -1) if jax else -1
    if configured < 0:
        configured = int(os.environ.get("JAX_NUM_CPU_DEVICES", "-1"))
    if configured >= 0:
        return configured
    counts = re.findall(
        r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", "")
    )
    return int(counts[-1]) if counts else 1


def one_cpu_device_ahead() -> bool:
    """Whether JAX has yet to start, and will start on one CPU device: no accelerator plugin
    (or JAX_PLATFORMS naming the CPU first) and no virtual devices. Starts nothing."""
    bridge = sys.modules.get("jax._src.xla_bridge")
    if bridge is not None and getattr(bridge, "backends_are_initialized", lambda: True)():
        return False  # its threads have their arenas already (or we cannot tell)
    jax = sys.modules.get("jax")
    configured = getattr(jax.config, "jax_platforms", None) if jax else None
    platforms = configured or os.environ.get("JAX_PLATFORMS")
    if platforms:
        on_cpu = platforms.split(",")[0].strip() == "cpu"
    else:
        on_cpu = not any(importlib.util.find_spec(name) for name in ("jax_plugins", "libtpu"))
    return on_cpu and _cpu_devices(jax) == 1


@functools.cache
def one_arena() -> bool:
    """Ask glibc for one malloc arena, if JAX is about to start on one CPU device."""
    libc = _glibc()
    return bool(libc is not None and one_cpu_device_ahead() and libc.mallopt(_M_ARENA_MAX, 1))


@functools.cache
def keep_host_memory() -> bool:
    """Ask glibc to serve large blocks from its heap and to keep what is freed (no mmap/munmap
    per block, trimming only above 2 GB): `default` ran 8-15 % slower back to back than after
    a pause."""
    libc = _glibc()
    return bool(
        libc is not None
        and libc.mallopt(_M_MMAP_MAX, 0)
        and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    )


@functools.cache
def prepare_cpu(devices: int) -> str | None:
    """For a run on `devices` CPU devices, once a process: `keep_host_memory`, and a warning
    sentence if one device runs in a process whose one arena came too late."""
    if not keep_host_memory() or devices != 1:
        return None  # not glibc, switched off, or several devices (see the module)
    n = arenas()
    if n is None or n == 1:
        return None
    return (
        f"this process has {n} malloc arenas (JAX or another library started threads before "
        "`engine` was imported, as in a Jupyter kernel), so XLA:CPU maps and unmaps each step's "
        "temporaries: CPU steps up to 1.3x slower. Import engine first, or start Python with "
        "MALLOC_ARENA_MAX=1."
    )


def arenas() -> int | None:
    """How many malloc arenas the process has (glibc's malloc_info), None without glibc."""
    libc = _libc()
    if libc is None:
        return None
    with tempfile.NamedTemporaryFile("r", suffix=".xml") as f:
        stream = libc.fopen(f.name.encode(), b"w")
        libc.malloc_info(0, stream)
        libc.fclose(stream)
        return len(re.findall(r'<heap nr="\d+">', f.read()))
