"""Per-step metrics: MFU from model FLOPs and the peak of the device; JSONL and TensorBoard."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax

# Dense bf16 peak FLOP/s per device from the vendors' datasheets (no sparsity).
PEAK_BF16_FLOPS = {
    "h200": 989e12,
    "h100": 989e12,  # SXM; the PCIe card is 756e12 (override with --peak_flops)
    "a100": 312e12,
    "l4": 121e12,
    "tpu v6": 918e12,
    "tpu v5p": 459e12,
    "tpu v5 lite": 197e12,
    "tpu v5e": 197e12,
    "tpu v4": 275e12,
}


def peak_flops(device: jax.Device | None = None) -> float | None:
    """Datasheet bf16 peak of `device` (default: the first), or None when unknown (e.g. CPU)."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return None
    kind = device.device_kind.lower()
    for name, flops in PEAK_BF16_FLOPS.items():
        if name in kind:
            return flops
    return None


def mfu(flops_per_token: float, tokens_per_sec: float, num_devices: int, peak: float | None):
    if not peak:
        return None
    return flops_per_token * tokens_per_sec / (num_devices * peak)


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    return value


class MetricsWriter:
    """Appends one JSON object per record to `metrics.jsonl`; mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool):
        self.file = open(run_dir / "metrics.jsonl", "w")
        self.tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(run_dir))

    def write(self, record: dict) -> None:
        self.file.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
        self.file.flush()
        if self.tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
