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
    widening: float = 1.0
    """Growth of 16-bit activations in XLA's plan here: its CPU backend keeps part of them in
    fp32 (1.4, fitted to memory_analysis() of bf16 steps)."""
    matches: tuple[str, ...] = ()
    """Substrings of `jax.Device.device_kind` (lower case) that are this kind."""
    source: str = ""

    def flops(self, precision: str) -> float:
        return self.fp32_flops if precision == "fp32" else self.bf16_flops


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
            matches=("tpu v4",),
            source="Google Cloud TPU v4 docs (ICI 2400 Gbps/chip)",
        ),
    )  # fmt: skip
}
KINDS = (*DEVICES, "cpu")


def device_kind(device_kind: str) -> str | None:
    """The table's kind for a `jax.Device.device_kind` string, or None when it has no row."""
    text = device_kind.lower()
    for spec in DEVICES.values():
        if any(m in text for m in spec.matches):
            return spec.kind
    return None


def measure_cpu(devices: int, memory_gb: float | None = None) -> DeviceSpec:
    """A `cpu` row measured here: matmul FLOP/s and copy bandwidth of this host, shared by
    `devices` virtual devices (XLA's CPU devices all run on the same cores)."""
    import numpy as np

    a = np.ones((512, 512), np.float32)
    a @ a
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < 0.2:
        a @ a
        n += 1
    flops = 2 * 512**3 * n / (time.perf_counter() - start)
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
        bf16_flops=flops / share,  # XLA's CPU backend computes bf16 no faster than fp32
        fp32_flops=flops / share,
        hbm_gb=memory_gb / share,
        hbm_gbps=copy_gbps / share,
        intra_gbps=copy_gbps / share,  # collectives between virtual devices are copies
        inter_gbps=copy_gbps / share,
        latency_us=50.0,
        widening=1.4,
        source=f"measured on this host at start-up, shared by {share} devices",
    )
