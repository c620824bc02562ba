"""Throughput and model-FLOPs-utilisation accounting."""

from __future__ import annotations

import time

import torch

# Dense peak TFLOP/s per device (no sparsity), from the vendors' data sheets.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
}


def device_peak_flops(precision: str, device: torch.device | str | None = None) -> float | None:
    """Peak FLOP/s of the current accelerator for ``precision``; None on CPU or unknown devices."""
    if not torch.cuda.is_available():
        return None
    if device is not None and torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).upper()
    for key, table in PEAK_TFLOPS.items():
        if key in name:
            return table.get(precision, table["fp32"]) * 1e12
    return None


class ThroughputMeter:
    """Counts tokens between logging intervals and turns them into tokens/s and MFU."""

    def __init__(self, flops_per_token: float, peak_flops: float | None, world_size: int):
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.world_size = world_size
        self.reset()

    def reset(self) -> None:
        self._tokens = 0
        self._start = time.perf_counter()

    def add(self, num_tokens: int) -> None:
        self._tokens += num_tokens

    def read(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        per_worker = self._tokens / elapsed
        figures = {
            "tokens_per_s_per_worker": per_worker,
            "tokens_per_s": per_worker * self.world_size,
        }
        if self.peak_flops:
            figures["mfu"] = per_worker * self.flops_per_token / self.peak_flops
        return figures
