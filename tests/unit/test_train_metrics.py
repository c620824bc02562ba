"""Throughput and MFU accounting (the GPU figures are checked by bench/gpu_check.sh)."""

import time

import pytest
import torch

from raylm.train.metrics import PEAK_TFLOPS, ThroughputMeter, device_peak_flops


def test_peak_table_covers_the_issue_devices():
    for device in ("A100", "H100", "H200"):
        for precision in ("bf16", "fp16"):
            assert PEAK_TFLOPS[device][precision] > 100
    assert PEAK_TFLOPS["H200"]["bf16"] == 989.0


def test_no_peak_and_no_mfu_on_cpu():
    assert device_peak_flops("bf16", torch.device("cpu")) is None
    meter = ThroughputMeter(flops_per_token=1e6, peak_flops=None, world_size=2)
    meter.add(100)
    assert "mfu" not in meter.read()


def test_tokens_per_second_global_and_per_worker_and_mfu():
    meter = ThroughputMeter(flops_per_token=2e9, peak_flops=1e12, world_size=4)
    meter.add(500)
    meter.add(500)
    time.sleep(0.2)
    figures = meter.read()
    assert figures["tokens_per_s"] == pytest.approx(4 * figures["tokens_per_s_per_worker"])
    assert 1000 / 0.5 < figures["tokens_per_s_per_worker"] <= 1000 / 0.2
    # MFU: each worker's achieved FLOP/s over one device's peak.
    assert figures["mfu"] == pytest.approx(figures["tokens_per_s_per_worker"] * 2e9 / 1e12)
    meter.reset()
    assert meter.read()["tokens_per_s"] == 0
