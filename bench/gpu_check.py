"""GPU check: GPT-2 small, bf16, FSDP2, compiled, through raylm's Ray Train loop on 1 GPU; then fp16.

Run by ``bench/gpu_check.sh``. Both runs go through the real path:
``run_training`` -> ``train_loop_per_worker`` -> ``LMTrainer`` with 1 Ray
Train worker (NCCL process group), ``train.parallel=fsdp``, the blocks as a
Ray Dataset of random tokens (plain causal blocks, no packing, so attention
uses the flash SDPA kernel).

1. bf16: GPT-2 small (124M, vocabulary padded to 50304), sequence 1024,
   micro-batch ``--batch``, FSDP2 with a bf16 MixedPrecisionPolicy, every block
   ``torch.compile``d. Tokens/s and MFU (6N + attention FLOPs per token against
   the device's dense bf16 peak, 989 TFLOP/s on an H200) from the loop's own
   meter, over the logged intervals after ``--warmup`` steps (compilation).
2. fp16: a short run with GradScaler (no compile): tokens/s, MFU, skipped
   steps, and whether the loss stayed finite and fell.

``--dry-run`` runs the same code path on CPU (gloo) with the debug model, so
the script is known to work before a GPU is lent. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "platform"))
sys.path.insert(0, str(REPO_ROOT / "bench"))

from _common import SizedTokenizer, overall_rate  # noqa: E402  (bench/ on the path above)

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, debug model: checks the code path only")
    parser.add_argument("--steps", type=int, default=None, help="bf16 steps (default 300; dry run 30)")
    parser.add_argument("--warmup", type=int, default=None, help="steps excluded from timing (default 50; dry 10)")
    parser.add_argument("--batch", type=int, default=None, help="micro-batch (default 32; dry run 4)")
    parser.add_argument("--fp16-steps", type=int, default=None, help="default 60; dry run 20")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args(argv)
    dry = args.dry_run
    args.steps = args.steps or (30 if dry else 300)
    args.warmup = args.warmup if args.warmup is not None else (10 if dry else 50)
    args.batch = args.batch or (4 if dry else 32)
    args.fp16_steps = args.fp16_steps or (20 if dry else 60)
    args.size = "debug" if dry else "small"
    args.seq_len = 64 if dry else 1024
    args.vocab = 512 if dry else 50304
    args.log_every = 5 if dry else 10
    return args


def random_blocks(num_rows: int, seq_len: int, vocab: int, seed: int):
    import ray.data

    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(num_rows, seq_len), dtype=np.int64)
    # Labels are the inputs (the trainer shifts them); no position ids: plain causal blocks.
    return ray.data.from_numpy(ids).map_batches(
        lambda batch: {"input_ids": batch["data"], "labels": batch["data"]}, batch_format="numpy").materialize()


def run(args, name: str, precision: str, steps: int, compile_blocks: bool, workdir: str) -> dict:
    from raylm.config import load_config
    from raylm.train.driver import run_training

    use_gpu = not args.dry_run
    job = load_config(None, [
        f"workdir={workdir}", f"run_name={name}", f"data.seq_len={args.seq_len}", f"model.size={args.size}",
        "train.num_workers=1", f"train.use_gpu={str(use_gpu).lower()}", "train.parallel=fsdp",
        f"train.precision={precision}", f"train.compile={str(compile_blocks).lower()}",
        f"train.micro_batch_size={args.batch}", f"train.max_steps={steps}", "train.lr=6e-4",
        f"train.warmup_steps={min(20, steps // 4)}", f"train.log_every={args.log_every}", "train.eval_batches=2",
        "train.threads_per_worker=2", "train.keep_best_checkpoint=false", "tracking.enabled=false",
    ])
    train = random_blocks(steps * args.batch, args.seq_len, args.vocab, seed=0)
    dev = random_blocks(2 * args.batch, args.seq_len, args.vocab, seed=1)
    started = time.perf_counter()
    result = run_training(job, train, dev, SizedTokenizer(args.vocab))
    wall = time.perf_counter() - started
    warmup = args.warmup if steps > args.warmup + 2 * args.log_every else 0
    rate = overall_rate(result.history, after_step=warmup)
    mfus = [row["mfu"] for row in result.history if row["step"] > warmup and row.get("mfu") is not None]
    losses = [row["loss"] for row in result.history]
    return {
        "precision": precision,
        "compiled": compile_blocks,
        "steps": steps,
        "timed_steps": steps - warmup,
        "tokens_per_step": args.batch * args.seq_len,
        "tokens_per_s": round(rate, 1),
        "mfu": round(overall_rate(result.history, "mfu", after_step=warmup), 4) if mfus else None,
        "loss_first": round(losses[0], 4),
        "loss_last": round(losses[-1], 4),
        "loss_finite": all(math.isfinite(loss) for loss in losses),
        "skipped_steps": int(result.history[-1].get("skipped_steps", 0)),
        "wall_s": round(wall, 1),
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    out: dict = {"benchmark": "gpu_check", "dry_run": args.dry_run, "torch": torch.__version__}
    if not args.dry_run and not torch.cuda.is_available():
        out["error"] = "no CUDA device; use --dry-run to check the code path on CPU"
        print(json.dumps(out))
        raise SystemExit(1)
    out["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.dry_run else "cpu"
    import ray

    ray.init(num_cpus=4, num_gpus=0 if args.dry_run else 1, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}})
    with tempfile.TemporaryDirectory() as workdir:
        out["bf16_fsdp"] = run(args, "bf16", "bf16", args.steps, not args.no_compile, workdir)
        out["fp16_fsdp"] = run(args, "fp16", "fp16", args.fp16_steps, False, workdir)
    out["tokens_per_s"] = out["bf16_fsdp"]["tokens_per_s"]
    out["mfu"] = out["bf16_fsdp"]["mfu"]
    out["target_mfu_h200"] = 0.40
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
