"""Per-step metrics: MFU from model FLOPs and the peak of the device; JSONL and TensorBoard."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import jax

from sharding.devices import DEVICES, device_kind


def peak_flops(device: jax.Device | None = None) -> float | None:
    """Datasheet bf16 peak of `device` (default: the first) from the device table
    (sharding.devices), or None when it has no row (e.g. CPU)."""
    device = device or jax.devices()[0]
    kind = None if device.platform == "cpu" else device_kind(device.device_kind)
    return DEVICES[kind].bf16_flops if kind else None


def peak_memory_gb(devices) -> float | None:
    """Peak bytes in use since start on the fullest of `devices`, in GB; None where the backend
    keeps no count (CPU)."""
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in devices]
    peaks = [p for p in peaks if p is not None]
    return max(peaks) / 1e9 if peaks else None


def planned_memory_gb(compiled) -> float | None:
    """Per-device bytes the compiled step needs by XLA's own plan: inputs, outputs that do not
    reuse a donated input, temporaries; in GB."""
    m = compiled.memory_analysis()
    if m is None:
        return None
    owned = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
    return (owned + m.temp_size_in_bytes) / 1e9


def format_bytes(n: float) -> str:
    """Bytes in the largest unit that keeps a leading digit: '512 B', '3.20 MB', '1.50 GB'."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def mfu(flops_per_token: float, tokens_per_sec: float, num_devices: int, peak: float | None):
    if not peak:
        return None
    return flops_per_token * tokens_per_sec / (num_devices * peak)


def _step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf  # a torn last line from a killed run: drop it


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    return value


def _summary_writer():
    """tensorboardX's SummaryWriter, imported without PyTorch. tensorboardX imports torch when it
    is installed, only to accept its tensors (we log floats): about 2 s of every run's start-up."""
    if "torch" in sys.modules or "tensorboardX" in sys.modules:
        from tensorboardX import SummaryWriter
    else:
        sys.modules["torch"] = None  # `import torch` raises ImportError, which it tolerates
        try:
            from tensorboardX import SummaryWriter
        finally:
            del sys.modules["torch"]
    return SummaryWriter


class MetricsWriter:
    """Appends one JSON object per record to `metrics.jsonl`; mirrors scalars to TensorBoard.

    Resuming from step N keeps the records up to N and drops later ones (steps about to be run
    again), so a reader never sees two losses for one step; TensorBoard purges them likewise.
    """

    def __init__(
        self, run_dir: Path, tensorboard: bool, resume_step: int = 0, enabled: bool = True
    ):
        self.file = self.tb = None
        if not enabled:  # processes other than 0 of a multi-process run
            return
        path = run_dir / "metrics.jsonl"
        kept = []
        if resume_step and path.exists():
            kept = [line for line in path.read_text().splitlines() if _step(line) <= resume_step]
        path.write_text("".join(line + "\n" for line in kept))
        self.file = open(path, "a")
        if tensorboard:
            SummaryWriter = _summary_writer()
            self.tb = SummaryWriter(
                str(run_dir), purge_step=resume_step + 1 if resume_step else None
            )

    def write(self, record: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
        self.file.flush()
        if self.tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
