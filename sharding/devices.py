"""What the planner knows of an accelerator: one row per kind, as data, with its sources.

Figures are per device, dense (no sparsity), from the vendors' datasheets. Link figures are one
direction per device: `intra_gbps` inside a host (NVLink, or ICI within a TPU slice), `inter_gbps`
across hosts (InfiniBand / RoCE per GPU, or the data-centre network between TPU slices). Every
field can be overridden from the command line (`--target.*`); the `cpu` row is measured when it
is asked for (`measure_cpu`), since no two hosts agree.
"""

from __future__ import annotations

import dataclasses
import os
import time


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    kind: str
    bf16_flops: float
    """Peak bf16 FLOP/s (dense)."""
    fp32_flops: float
    """Peak FLOP/s of float32 matmuls as XLA runs them by default (TF32 on NVIDIA GPUs)."""
    hbm_gb: float
    hbm_gbps: float
    intra_gbps: float
    """Collective bandwidth to devices of the same host (or TPU slice), GB/s one way."""
    inter_gbps: float
    """Collective bandwidth to devices of other hosts, GB/s one way per device."""
    latency_us: float = 10.0
    """Fixed cost of one collective (launch and synchronization)."""
    op_us: float = 4.0
    """Fixed cost of one kernel (launch and dispatch), whatever its size."""
    matmul_efficiency: float = 0.7
    """Share of the peak that a step's matmuls reach (large bf16 matmuls on GPUs/TPUs)."""
    widening: float = 1.0
    """Growth of 16-bit activations in XLA's plan here (see `cpu_widening`)."""
    matches: tuple[str, ...] = ()
    """Substrings of `jax.Device.device_kind` (lower case) that are this kind."""
    source: str = ""

    def flops(self, precision: str) -> float:
        return self.fp32_flops if precision == "fp32" else self.bf16_flops


# SXM cards; a PCIe H100 peaks at 756e12 (override: --peak_flops, --target.bf16_flops).
_NVIDIA = "NVIDIA datasheet (SXM); inter = one 400 Gb/s NIC per GPU"
DEVICES: dict[str, DeviceSpec] = {
    d.kind: d
    for d in (
        DeviceSpec("h100", 989e12, 494e12, 80, 3350, 450, 50, matches=("h100",), source=_NVIDIA),
        DeviceSpec("h200", 989e12, 494e12, 141, 4800, 450, 50, matches=("h200",), source=_NVIDIA),
        DeviceSpec(
            "a100",
            312e12,
            156e12,
            80,
            2039,
            300,
            25,
            matches=("a100",),
            source="NVIDIA A100 80GB SXM datasheet; inter = one 200 Gb/s NIC per GPU",
        ),
        DeviceSpec(
            "l4",
            121e12,
            60e12,
            24,
            300,
            32,
            12.5,
            matches=("l4",),
            source="NVIDIA L4 datasheet; PCIe 4.0 x16 between cards",
        ),
        # TPU fp32 matmuls run as several bf16 passes: a third of the bf16 peak is assumed.
        DeviceSpec(
            "tpu-v6e",
            918e12,
            306e12,
            32,
            1640,
            448,
            25,
            op_us=2.0,
            matches=("tpu v6",),
            source="Google Cloud TPU v6e docs (ICI 3584 Gbps/chip)",
        ),
        DeviceSpec(
            "tpu-v5p",
            459e12,
            153e12,
            95,
            2765,
            600,
            25,
            op_us=2.0,
            matches=("tpu v5p",),
            source="Google Cloud TPU v5p docs (ICI 4800 Gbps/chip)",
        ),
        DeviceSpec(
            "tpu-v5e",
            197e12,
            66e12,
            16,
            819,
            200,
            12.5,
            matches=("tpu v5 lite", "tpu v5e"),
            source="Google Cloud TPU v5e docs (ICI 1600 Gbps/chip)",
        ),
        DeviceSpec(
            "tpu-v4",
            275e12,
            92e12,
            32,
            1228,
            300,
            25,
            op_us=2.0,
            matches=("tpu v4",),
            source="Google Cloud TPU v4 docs (ICI 2400 Gbps/chip)",
        ),
    )  # fmt: skip
}
KINDS = (*DEVICES, "cpu")


def cpu_widening() -> float:
    """How much bigger 16-bit activations are in XLA's CPU plan: jax 0.10's CPU backend keeps
    part of them in fp32 (1.4, fitted to memory_analysis()); from jax 0.11 it keeps them in
    16 bits."""
    import jax

    major, minor = (int(p) for p in jax.__version__.split(".")[:2])
    return 1.4 if (major, minor) < (0, 11) else 1.0


def device_kind(device_kind: str) -> str | None:
    """The table's kind for a `jax.Device.device_kind` string, or None when it has no row."""
    text = device_kind.lower()
    for spec in DEVICES.values():
        if any(m in text for m in spec.matches):
            return spec.kind
    return None


def measure_cpu(devices: int, memory_gb: float | None = None) -> DeviceSpec:
    """A `cpu` row measured here, with `devices` virtual devices sharing this host's cores:
    XLA's matmul FLOP/s per device while all of them compute, copy bandwidth, and the time of
    one small all-reduce over them and of one small kernel on all of them."""
    import numpy as np

    flops = _xla_matmul_flops(devices)
    big = np.ones(16 * 2**20 // 4, np.float32)
    out = np.empty_like(big)
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < 0.1:
        np.copyto(out, big)
        n += 1
    copy_gbps = 2 * big.nbytes * n / (time.perf_counter() - start) / 1e9
    if memory_gb is None:
        memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    share = max(devices, 1)
    return DeviceSpec(
        "cpu",
        bf16_flops=flops,  # XLA's CPU backend computes bf16 no faster than fp32
        fp32_flops=flops,
        matmul_efficiency=1.0,  # measured as XLA runs them
        hbm_gb=memory_gb / share,
        hbm_gbps=copy_gbps / share,
        intra_gbps=copy_gbps / share,  # collectives between virtual devices are copies
        inter_gbps=copy_gbps / share,
        latency_us=_collective_latency_us(devices),
        op_us=_op_us(devices),
        widening=cpu_widening(),
        source=f"measured on this host at start-up, shared by {share} devices",
    )


def _timed(fn, x, budget_s: float) -> float:
    """Seconds per call of `fn(x)`, compiled first, over about `budget_s`."""
    fn(x).block_until_ready()
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < budget_s:
        fn(x).block_until_ready()
        n += 1
    return (time.perf_counter() - start) / n


def _rows(devices: int, rows: int, cols: int):
    """(the CPU devices used, a [devices * rows, cols] array split over them by rows, the
    mesh)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    cpus = jax.devices("cpu")[:devices]
    mesh = jax.make_mesh((len(cpus),), ("x",), devices=cpus)
    x = jax.device_put(jax.numpy.ones((len(cpus) * rows, cols)), NamedSharding(mesh, P("x")))
    return cpus, x, mesh


def _collective_latency_us(devices: int) -> float:
    """Microseconds per jitted all-reduce of a few numbers over up to `devices` CPU devices."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    cpus, x, mesh = _rows(devices, 1, 8)
    if len(cpus) < 2:
        return 10.0
    reduce = jax.jit(lambda x: x.sum(0), out_shardings=NamedSharding(mesh, P()))
    return _timed(reduce, x, 0.1) * 1e6


def _chain(w, length: int, activation=None):
    def chain(x):
        for _ in range(length):
            x = x @ w if activation is None else activation(x @ w)
        return x

    import jax

    return jax.jit(chain)


def _op_us(devices: int) -> float:
    """Microseconds per small kernel run on up to `devices` CPU devices at once: a chain of
    tiny matmuls (which XLA does not fuse), divided by its length."""
    import jax

    _, x, _ = _rows(devices, 8, 8)
    run = _chain(jax.numpy.full((8, 8), 0.1), 64, jax.numpy.tanh)
    return _timed(run, x, 0.2) / 64 * 1e6


def _xla_matmul_flops(devices: int) -> float:
    """FLOP/s per device of 256-wide matmuls compiled by XLA, all devices busy at once."""
    import jax

    cpus, x, _ = _rows(devices, 256, 256)
    run = _chain(jax.numpy.full((256, 256), 1e-3), 8)
    per_device = 2 * 256**3 * 8 / _timed(run, x, 0.3)
    return per_device * len(cpus) / max(devices, 1)
