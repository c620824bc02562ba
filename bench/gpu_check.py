"""GPU check: GPT-2 small through raylm's Ray Train loop on 1 GPU against a plain compiled torch loop.

Run by ``bench/gpu_check.sh``. Three runs in one call, on the same packed blocks:

1. ``torch``: the baseline, in a fresh process: the same model with the same
   kernels (:func:`raylm.train.kernels.fuse_kernels`), bf16 autocast, the same
   optimiser (:func:`raylm.train.optim.build_optimizer`: fused AdamW, the same
   parameter groups), every transformer block ``torch.compile``d as raylm
   compiles them, and a plain loop over batches already on the GPU's host side
   (``model(input_ids, position_ids, labels, attention_mask).loss.backward()``,
   clip, step), with the block-diagonal mask built as raylm builds it
   (:func:`raylm.train.masks.packed_attention_mask`, no host sync).
2. ``bf16_fsdp``: ``run_training`` -> ``train_loop_per_worker`` -> ``LMTrainer``
   with 1 Ray Train worker (NCCL process group), ``train.parallel=fsdp`` with a
   bf16 MixedPrecisionPolicy, ``train.compile=true``, the blocks as a Ray Dataset.
3. ``fp16_fsdp``: a short run with GradScaler (no compile): tokens/s, MFU, skipped
   steps, and whether the loss stayed finite and fell.

The blocks are what real training reads: documents of random length (random
tokens) concatenated and cut by :func:`raylm.data.packing.pack_documents`, with
position ids restarting at every document, so that transformers builds the same
block-diagonal causal mask as in training (the SDPA path with a mask, not the
mask-free flash path). GPT-2 small (124M, vocabulary padded to 50304),
sequence 1024, micro-batch ``--batch``.

MFU counts causal attention: 6N (dense weights and the output projection) plus
6 x layers x hidden x seq_len per token for QK^T and attention-times-V forward
and backward, half of PaLM's full-attention term because a causal query sees on
average half the block; the document boundaries inside a block are not
subtracted (a kernel with a dense mask computes them anyway). Against the
device's dense bf16 peak (989 TFLOP/s on an H200). Tokens/s for raylm come from
the loop's own meter over the logged intervals after ``--warmup`` steps
(compilation); for the baseline from synchronised timestamps over the same
steps. ``ratio_vs_torch`` = raylm bf16 tokens/s over the baseline's.

``--dry-run`` runs the same code paths on CPU (gloo) with the debug model, so the
script is known to work before a GPU is lent. Prints one JSON object.
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

from _common import SizedTokenizer, machine_state, overall_rate, spawn_json  # noqa: E402

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LR, BETAS, WEIGHT_DECAY, PAD_ID = 6e-4, (0.9, 0.95), 0.1, 0
ROWS_PER_CHUNK = 64
TARGET_MFU_H200 = 0.40


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, debug model: checks the code paths only")
    parser.add_argument("--steps", type=int, default=None, help="bf16 steps, each run (default 200; dry run 30)")
    parser.add_argument("--warmup", type=int, default=None, help="steps excluded from timing (default 40; dry 10)")
    parser.add_argument("--batch", type=int, default=None, help="micro-batch (default 32; dry run 4)")
    parser.add_argument("--fp16-steps", type=int, default=None, help="default 60; dry run 20")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--skip-baseline", action="store_true", help="only the raylm runs")
    parser.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)  # the baseline's process
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    dry = args.dry_run
    args.steps = args.steps or (30 if dry else 200)
    args.warmup = args.warmup if args.warmup is not None else (10 if dry else 40)
    args.batch = args.batch or (4 if dry else 32)
    args.fp16_steps = args.fp16_steps or (20 if dry else 60)
    args.size = "debug" if dry else "small"
    args.seq_len = 64 if dry else 1024
    args.vocab = 512 if dry else 50304
    args.log_every = 5 if dry else 10
    return args


# --------------------------------------------------------------------------- data and accounting


def packed_chunk(index: int, seq_len: int, vocab: int, rows: int = ROWS_PER_CHUNK) -> dict[str, np.ndarray]:
    """``rows`` packed blocks (chunk ``index``, deterministic): documents of random length and random tokens.

    Document lengths are geometric with mean ``seq_len / 4`` (some longer than a
    block), packed by raylm's own :func:`pack_documents`; the last block's padding
    is cut off, so every row is full.
    """
    from raylm.data.packing import pack_documents

    rng = np.random.default_rng(1000 + index)
    documents, total = [], 0
    while total < (rows + 1) * seq_len:
        length = int(min(rng.geometric(4.0 / seq_len), 4 * seq_len)) + 1
        documents.append(rng.integers(1, vocab, size=length))
        total += length
    packed = pack_documents(documents, documents, seq_len, PAD_ID)
    return {name: np.ascontiguousarray(values[:rows], dtype=np.int64) for name, values in packed.items()}


def num_chunks(args) -> int:
    """Enough distinct blocks for up to 100 steps; longer runs read the dataset again (a new epoch)."""
    return max(1, math.ceil(min(args.steps, 100) * args.batch / ROWS_PER_CHUNK))


def causal_flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token with causal attention: raylm's count with half its (full) attention term."""
    from raylm.models.registry import flops_per_token

    config = model.config
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    return flops_per_token(model, seq_len) - 6.0 * layers * hidden * seq_len


def model_facts(args) -> tuple[float, float | None]:
    """(causal training FLOPs per token, the device's dense bf16 peak or None on CPU)."""
    import torch

    from raylm.config import ModelConfig
    from raylm.models.registry import build_model
    from raylm.train.metrics import device_peak_flops

    with torch.device("meta"):
        model = build_model(ModelConfig(size=args.size), args.vocab, args.seq_len, {"eos": 0, "pad": PAD_ID})
    peak = None if args.dry_run else device_peak_flops("bf16", torch.device("cuda"))
    return causal_flops_per_token(model, args.seq_len), peak


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None) -> float | None:
    return round(tokens_per_s * flops_per_token / peak, 4) if peak else None


# --------------------------------------------------------------------------- baseline (own process)


def run_baseline(args) -> dict:
    """The plain compiled torch loop, with raylm's kernels and optimiser (this is a fresh process)."""
    import torch

    from raylm.config import ModelConfig
    from raylm.models.registry import build_model
    from raylm.train.kernels import fuse_kernels
    from raylm.train.masks import packed_attention_mask
    from raylm.train.parallel import compile_blocks
    from raylm.train.optim import build_optimizer, lr_lambda

    device = torch.device("cpu" if args.dry_run else "cuda")
    torch.manual_seed(0)
    model = build_model(ModelConfig(size=args.size), args.vocab, args.seq_len, {"eos": 0, "pad": PAD_ID}, seed=0)
    model.config.use_cache = False
    fuse_kernels(model)
    model.to(device).train()
    if not args.no_compile:
        compile_blocks(model)
    optimizer = build_optimizer(model, LR, BETAS, WEIGHT_DECAY, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(min(20, args.steps // 4), args.steps, 0.1))
    chunks = [packed_chunk(index, args.seq_len, args.vocab) for index in range(num_chunks(args))]
    rows = {name: torch.from_numpy(np.concatenate([chunk[name] for chunk in chunks])) for name in chunks[0]}
    if device.type == "cuda":
        rows = {name: value.pin_memory() for name, value in rows.items()}
    num_batches = len(rows["input_ids"]) // args.batch

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize()

    losses, start = [], None
    for step in range(args.steps):
        if step == args.warmup:
            synchronize()
            start = time.perf_counter()
        offset = (step % num_batches) * args.batch
        batch = {name: value[offset : offset + args.batch].to(device, non_blocking=True) for name, value in rows.items()}
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            loss = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                         attention_mask=packed_attention_mask(model, batch["position_ids"]), use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % args.log_every == 0:
            losses.append(loss.detach().item())  # a loop that logs its loss syncs here, as raylm's does
    synchronize()
    elapsed = time.perf_counter() - start
    return {"tokens_per_s": (args.steps - args.warmup) * args.batch * args.seq_len / elapsed,
            "loss_first": losses[0], "loss_last": losses[-1], "loss_finite": all(map(math.isfinite, losses))}


# --------------------------------------------------------------------------- raylm (Ray Train)


def packed_dataset(args):
    import ray.data

    seq_len, vocab = args.seq_len, args.vocab
    return ray.data.range(num_chunks(args), override_num_blocks=num_chunks(args)).map_batches(
        lambda batch: packed_chunk(int(batch["id"][0]), seq_len, vocab), batch_size=1,
        batch_format="numpy").materialize()


def run_raylm(args, name: str, precision: str, steps: int, compile_blocks: bool, workdir: str,
              flops_per_token: float, peak: float | None) -> dict:
    import ray.data

    from raylm.config import load_config
    from raylm.train.driver import run_training

    use_gpu = not args.dry_run
    job = load_config(None, [
        f"workdir={workdir}", f"run_name={name}", f"data.seq_len={args.seq_len}", f"model.size={args.size}",
        "train.num_workers=1", f"train.use_gpu={str(use_gpu).lower()}", "train.parallel=fsdp",
        f"train.precision={precision}", f"train.compile={str(compile_blocks).lower()}",
        f"train.micro_batch_size={args.batch}", f"train.max_steps={steps}", f"train.lr={LR}",
        f"train.warmup_steps={min(20, steps // 4)}", f"train.log_every={args.log_every}", "train.eval_batches=2",
        "train.threads_per_worker=2", "train.keep_best_checkpoint=false", "tracking.enabled=false",
    ])
    train = packed_dataset(args)
    dev = ray.data.from_items([{name: values[i] for name, values in packed_chunk(10_000, args.seq_len, args.vocab,
                                                                                rows=2 * args.batch).items()}
                               for i in range(2 * args.batch)]).materialize()
    started = time.perf_counter()
    result = run_training(job, train, dev, SizedTokenizer(args.vocab, eos_token_id=0, pad_token_id=PAD_ID))
    wall = time.perf_counter() - started
    warmup = args.warmup if steps > args.warmup + 2 * args.log_every else 0
    rate = overall_rate(result.history, after_step=warmup)
    losses = [row["loss"] for row in result.history]
    return {
        "precision": precision,
        "compiled": compile_blocks,
        "steps": steps,
        "timed_steps": steps - warmup,
        "tokens_per_step": args.batch * args.seq_len,
        "tokens_per_s": round(rate, 1),
        "mfu": mfu(rate, flops_per_token, peak),
        "loss_first": round(losses[0], 4),
        "loss_last": round(losses[-1], 4),
        "loss_finite": all(math.isfinite(loss) for loss in losses),
        "skipped_steps": int(result.history[-1].get("skipped_steps", 0)),
        "wall_s": round(wall, 1),
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.baseline:
        args.out.write_text(json.dumps(run_baseline(args)))
        return {}
    import torch

    out: dict = {"benchmark": "gpu_check", "dry_run": args.dry_run, "torch": torch.__version__,
                 "machine_at_start": machine_state()}
    if not args.dry_run and not torch.cuda.is_available():
        out["error"] = "no CUDA device; use --dry-run to check the code path on CPU"
        print(json.dumps(out))
        raise SystemExit(1)
    out["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.dry_run else "cpu"
    flops_per_token, peak = model_facts(args)
    out.update({"model": f"gpt2-{args.size}", "seq_len": args.seq_len, "batch": args.batch,
                "flops_per_token_causal": flops_per_token, "peak_flops": peak})
    if not args.skip_baseline:
        # Before Ray starts, in its own process: the GPU is free and nothing of raylm's is loaded in it.
        options = ["--baseline", "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch)]
        started = time.perf_counter()
        baseline = spawn_json(__file__, options + (["--dry-run"] if args.dry_run else [])
                              + (["--no-compile"] if args.no_compile else []))
        out["torch_compiled"] = {
            "precision": "bf16 autocast", "compiled": not args.no_compile, "steps": args.steps,
            "timed_steps": args.steps - args.warmup, "tokens_per_s": round(baseline["tokens_per_s"], 1),
            "mfu": mfu(baseline["tokens_per_s"], flops_per_token, peak),
            "loss_first": round(baseline["loss_first"], 4), "loss_last": round(baseline["loss_last"], 4),
            "loss_finite": baseline["loss_finite"], "wall_s": round(time.perf_counter() - started, 1)}
    import ray

    ray.init(num_cpus=4, num_gpus=0 if args.dry_run else 1, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}})
    with tempfile.TemporaryDirectory() as workdir:
        out["bf16_fsdp"] = run_raylm(args, "bf16", "bf16", args.steps, not args.no_compile, workdir,
                                     flops_per_token, peak)
        out["fp16_fsdp"] = run_raylm(args, "fp16", "fp16", args.fp16_steps, False, workdir, flops_per_token, peak)
    out["tokens_per_s"] = out["bf16_fsdp"]["tokens_per_s"]
    out["mfu"] = out["bf16_fsdp"]["mfu"]
    if "torch_compiled" in out:
        out["ratio_vs_torch"] = round(out["bf16_fsdp"]["tokens_per_s"] / out["torch_compiled"]["tokens_per_s"], 3)
    out["target_mfu_h200"] = TARGET_MFU_H200
    out["load_average_at_end"] = machine_state()["load_average"]
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
