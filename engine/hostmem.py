"""Host memory on a CPU: glibc settings that keep XLA:CPU's per-step temporaries in the heap.

XLA:CPU allocates a step's temporaries afresh, one block per device (295 MB for `default`,
486 MB per device for `small` at 8 layers over 8 devices), and frees them when the step ends.
glibc hands a block that large out with an mmap of its own and takes it back with munmap, so
every step faulted in fresh zeroed pages, and the unmap held the address-space lock (a thread
started right after a step waited 0.2-0.7 s). Switching mmap off (`keep_host_memory`) covers
only the main arena: a thread in any other arena maps a block over 64 MB whatever M_MMAP_MAX
says, and XLA's device threads each get an arena of their own.

So, two settings, process-wide:
- `one_arena`, when `engine` is imported: every thread allocates from the main arena. It must
  come before JAX starts its CPU client, because a thread picks its arena at its first malloc
  and keeps it (imported after `jax.devices()`, or in a Jupyter kernel, it is too late: start
  Python with MALLOC_ARENA_MAX=1 instead). `default` ran 15-22 % faster a step.
- `keep_host_memory`, in `setup` on a CPU: no per-block mmap and no trimming. The price of both
  is that the process keeps its peak host memory.

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
def _glibc() -> ctypes.CDLL | None:
    if os.environ.get("SHARDTRAIN_KEEP_HOST_MEMORY", "1") == "0":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not Linux
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_info") else None  # musl


def _cpu_client_ahead() -> bool:
    """Whether JAX has yet to start, and will start on the CPU: no accelerator plugin, or
    JAX_PLATFORMS naming the CPU first. Reads only what is there; starts nothing."""
    bridge = sys.modules.get("jax._src.xla_bridge")
    if bridge is not None and bridge.backends_are_initialized():
        return False  # its threads have their arenas already
    jax = sys.modules.get("jax")
    platforms = (jax.config.jax_platforms if jax else None) or os.environ.get("JAX_PLATFORMS")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not any(importlib.util.find_spec(name) for name in ("jax_plugins", "libtpu"))


@functools.cache
def one_arena() -> bool:
    """Ask glibc for one malloc arena, if JAX is about to start on the CPU (see the module)."""
    libc = _glibc()
    return bool(libc is not None and _cpu_client_ahead() and libc.mallopt(_M_ARENA_MAX, 1))


@functools.cache
def keep_host_memory() -> bool:
    """Ask glibc to serve large blocks from its heap and to keep what is freed (no mmap/munmap
    per block, no trimming): `default` ran 8-15 % slower back to back than after a pause."""
    libc = _glibc()
    return bool(
        libc is not None
        and libc.mallopt(_M_MMAP_MAX, 0)
        and libc.mallopt(_M_TRIM_THRESHOLD, -1)  # never (mallopt(3)); 2**31 - 1 trimmed 4 GB
    )


@functools.cache
def prepare_cpu() -> str | None:
    """For a run on CPU devices, once a process: `keep_host_memory`, and a warning sentence if
    the one arena came too late (other threads had arenas before `engine` was imported)."""
    if not keep_host_memory():
        return None  # not glibc, or switched off
    n = arenas()
    if n is None or n == 1:
        return None
    return (
        f"this process has {n} malloc arenas (JAX or another library started threads before "
        "`engine` was imported, as in a Jupyter kernel), so XLA:CPU maps and unmaps each step's "
        "temporaries: CPU steps up to 20 % slower. Import engine first, or start Python with "
        "MALLOC_ARENA_MAX=1."
    )


def arenas() -> int | None:
    """How many malloc arenas the process has (glibc's malloc_info), None without glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.fopen.restype = ctypes.c_void_p
        libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
        libc.fclose.argtypes = [ctypes.c_void_p]
        libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    except (OSError, AttributeError):
        return None
    with tempfile.NamedTemporaryFile("r", suffix=".xml") as f:
        stream = libc.fopen(f.name.encode(), b"w")
        libc.malloc_info(0, stream)
        libc.fclose(stream)
        return len(re.findall(r'<heap nr="\d+">', f.read()))
