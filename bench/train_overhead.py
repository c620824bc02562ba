"""Training-loop overhead: raylm's loop inside Ray Train against a bare loop and the HF Trainer.

The same tiny GPT-2 (``model.size=tiny``, same seed, same initial weights),
the same packed blocks (synthetic arithmetic sequences: ``--batch`` x
``--seq-len`` tokens per step, position ids restarting per block), the same
optimiser settings (AdamW, linear warmup then cosine, clipping at 1.0) and the
same number of CPU threads (``--threads``), for ``--steps`` steps, three ways:

- raylm: ``run_training`` -> ``train_loop_per_worker`` -> ``LMTrainer`` with 1
  Ray Train worker (``threads_per_worker``), the blocks as a Ray Dataset, fp32,
  one checkpoint at the end. Tokens/s come from the loop's own meter (the
  metrics history saved in the final checkpoint), over the logged intervals
  after the first ``--warmup`` steps.
- torch: one process, a plain loop over in-memory tensors:
  ``model(input_ids, position_ids, labels).loss.backward()``, clip, step.
- hf_trainer: ``transformers.Trainer`` (no evaluation, no saving, no
  reporting), timed by a callback between the end of step ``--warmup`` and the
  last step.

What differs is what each does by default. Optimiser: the bare loop uses
torch's default AdamW (foreach kernels), the HF Trainer its default
``adamw_torch_fused``, raylm the fused AdamW too (its ``LMTrainer`` picks the
fused kernel on every device that has one). Kernels: raylm swaps GPT-2's
Python-level ``gelu_new`` for transformers' one-kernel ``GELUTanh``, the same
function (``train.fused_kernels``, on by default; see
``raylm/train/kernels.py``); the other two run the model as built.
``--only ...,raylm_unfused`` adds raylm with ``train.fused_kernels=false``, to
show what the loop costs without that substitution.

Each figure is the median over ``--repeats`` runs, the three interleaved (in
an order that rotates each repeat) so that background load hits them alike.
Ray starts its worker processes at niceness 15 (its ``worker_niceness``
setting), so on a busy machine the Ray Train worker yields to everything
else; ``--ray-worker-niceness 0`` measures the loop without that handicap.
Ray start-up, worker start-up and the final checkpoint are excluded from
raylm's steady-state figure and reported separately as ``raylm_wall_s``. Prints one JSON object. Not run in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
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

CONTENDERS = ("torch", "hf_trainer", "raylm", "raylm_unfused")
LR, WARMUP_STEPS, WEIGHT_DECAY, BETAS, MIN_LR_RATIO = 3e-3, 10, 0.1, (0.9, 0.95), 0.1


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20, help="steps excluded from the timing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--only", default="torch,hf_trainer,raylm",
                        help=f"comma-separated subset of {', '.join(CONTENDERS)}")
    parser.add_argument("--ray-worker-niceness", type=int, default=None,
                        help="Ray's worker_niceness for the local Ray (Ray's default starts workers at nice 15)")
    return parser.parse_args(argv)


def make_blocks(args) -> dict[str, np.ndarray]:
    """steps x batch packed blocks of learnable arithmetic sequences, two examples per block."""
    rng = np.random.default_rng(0)
    rows = args.steps * args.batch
    half = args.seq_len // 2
    starts = rng.integers(3, args.vocab, size=(rows, 2))
    strides = rng.integers(1, 7, size=(rows, 2))
    positions = np.concatenate([np.arange(half), np.arange(args.seq_len - half)])
    offsets = np.where(np.arange(args.seq_len) < half, 0, 1)
    ids = (starts[:, offsets] + strides[:, offsets] * positions) % (args.vocab - 3) + 3
    labels = ids.copy()
    labels[:, [0, half]] = -100  # the first token of each example is never a target
    return {"input_ids": ids.astype(np.int64), "labels": labels.astype(np.int64),
            "position_ids": np.tile(positions, (rows, 1)).astype(np.int64)}


def build(args):
    from raylm.config import ModelConfig
    from raylm.models.registry import build_model

    model = build_model(ModelConfig(size=args.size), args.vocab, args.seq_len, {"eos": 0, "pad": 1}, seed=0)
    model.config.use_cache = False  # packed blocks: block-diagonal masking needs no KV cache
    return model


def schedule(args):
    from raylm.train.trainer import lr_lambda

    return lr_lambda(WARMUP_STEPS, args.steps, MIN_LR_RATIO)


# --------------------------------------------------------------------------- torch


def run_torch(args, blocks) -> float:
    import torch

    torch.set_num_threads(args.threads)
    model = build(args)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(args))
    tensors = {key: torch.from_numpy(value) for key, value in blocks.items()}
    start = None
    for step in range(args.steps):
        if step == args.warmup:
            start = time.perf_counter()
        batch = {key: value[step * args.batch : (step + 1) * args.batch] for key, value in tensors.items()}
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # what a loop that logs its loss does
    elapsed = time.perf_counter() - start
    return (args.steps - args.warmup) * args.batch * args.seq_len / elapsed


# --------------------------------------------------------------------------- HF Trainer


def run_hf_trainer(args, blocks) -> float:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    torch.set_num_threads(args.threads)

    class Blocks(torch.utils.data.Dataset):
        def __len__(self):
            return len(blocks["input_ids"])

        def __getitem__(self, index):
            return {key: torch.from_numpy(value[index]) for key, value in blocks.items()}

    class Clock(TrainerCallback):
        start = end = None

        def on_step_end(self, arguments, state, control, **kwargs):
            if state.global_step == args.warmup:
                Clock.start = time.perf_counter()
            if state.global_step == args.steps:
                Clock.end = time.perf_counter()

    with tempfile.TemporaryDirectory() as output:
        arguments = TrainingArguments(
            output_dir=output, max_steps=args.steps, per_device_train_batch_size=args.batch,
            learning_rate=LR, weight_decay=WEIGHT_DECAY, adam_beta1=BETAS[0], adam_beta2=BETAS[1],
            warmup_steps=WARMUP_STEPS, lr_scheduler_type="cosine", max_grad_norm=1.0,
            logging_steps=args.log_every, save_strategy="no", eval_strategy="no", report_to=[],
            dataloader_num_workers=0, use_cpu=True, disable_tqdm=True, seed=0,
        )
        trainer = Trainer(model=build(args), args=arguments, train_dataset=Blocks(), callbacks=[Clock()])
        with contextlib.redirect_stdout(sys.stderr):  # its log lines would break the one-JSON-object output
            trainer.train()
    return (args.steps - args.warmup) * args.batch * args.seq_len / (Clock.end - Clock.start)


# --------------------------------------------------------------------------- raylm


def run_raylm(args, blocks, index: int, fused_kernels: bool = True) -> tuple[float, float]:
    import ray.data

    from raylm.config import load_config
    from raylm.train.driver import run_training

    rows = [{key: value[i] for key, value in blocks.items()} for i in range(len(blocks["input_ids"]))]
    train = ray.data.from_items(rows).materialize()
    dev = ray.data.from_items(rows[: args.batch]).materialize()
    with tempfile.TemporaryDirectory() as workdir:
        job = load_config(None, [
            f"workdir={workdir}", f"run_name=overhead{index}", f"data.seq_len={args.seq_len}",
            f"model.size={args.size}", "train.num_workers=1", f"train.threads_per_worker={args.threads}",
            f"train.micro_batch_size={args.batch}", f"train.max_steps={args.steps}", f"train.lr={LR}",
            f"train.warmup_steps={WARMUP_STEPS}", f"train.weight_decay={WEIGHT_DECAY}",
            f"train.min_lr_ratio={MIN_LR_RATIO}", f"train.log_every={args.log_every}", "train.eval_batches=1",
            f"train.fused_kernels={str(fused_kernels).lower()}", "tracking.enabled=false",
        ])
        started = time.perf_counter()
        result = run_training(job, train, dev, SizedTokenizer(args.vocab, eos_token_id=0, pad_token_id=1))
        wall = time.perf_counter() - started
    try:
        rate = overall_rate(result.history, after_step=args.warmup)
    except ValueError:
        raise SystemExit("raylm: no logged interval after the warm-up; use more --steps or a smaller --log-every")
    return rate, wall


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.steps - args.warmup < 2 * args.log_every:
        raise SystemExit("--steps must exceed --warmup by at least two logging intervals")
    selected = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(selected) - set(CONTENDERS))
    if unknown or not selected:
        raise SystemExit(f"--only: unknown contender {', '.join(unknown) or '(none given)'}; "
                         f"known: {', '.join(CONTENDERS)}")
    if "hf_trainer" in selected:
        try:
            import accelerate  # noqa: F401  (transformers.Trainer needs it)
        except ImportError:
            raise SystemExit("bench/train_overhead.py: the HF Trainer baseline needs accelerate: "
                             "pip install -e '.[bench]' (or --only torch,raylm)")
    blocks = make_blocks(args)
    if {"raylm", "raylm_unfused"} & set(selected):
        import ray

        system_config = {} if args.ray_worker_niceness is None else {"worker_niceness": args.ray_worker_niceness}
        ray.init(num_cpus=max(2, args.threads + 1), include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}},
                 _system_config=system_config)
    rates: dict[str, list[float]] = {name: [] for name in selected}
    walls: list[float] = []
    for repeat in range(args.repeats):
        # Rotate the order each repeat so that no contender always runs first or last.
        shift = repeat % len(selected)
        for name in selected[shift:] + selected[:shift]:
            if name == "torch":
                rates[name].append(run_torch(args, blocks))
            elif name == "hf_trainer":
                rates[name].append(run_hf_trainer(args, blocks))
            elif name in ("raylm", "raylm_unfused"):
                rate, wall = run_raylm(args, blocks, repeat, fused_kernels=name == "raylm")
                rates[name].append(rate)
                if name == "raylm":
                    walls.append(wall)

            print(f"[bench] repeat {repeat}: {name} {rates[name][-1]:.0f} tokens/s", file=sys.stderr, flush=True)
    median = {name: statistics.median(values) for name, values in rates.items()}
    out = {
        "benchmark": "train_overhead",
        "model": f"gpt2-{args.size}",
        "tokens_per_step": args.batch * args.seq_len,
        "steps": args.steps,
        "timed_steps": args.steps - args.warmup,
        "threads": args.threads,
        "repeats": args.repeats,
        "ray_worker_niceness": args.ray_worker_niceness if args.ray_worker_niceness is not None else "ray default (15)",
        "tokens_per_s": {name: round(value, 1) for name, value in median.items()},
        "tokens_per_s_all": {name: [round(v, 1) for v in values] for name, values in rates.items()},
    }
    for contender, prefix in (("raylm", ""), ("raylm_unfused", "unfused_")):
        for baseline, target in (("torch", 0.90), ("hf_trainer", 1.0)):
            if contender in median and baseline in median:
                out[f"{prefix}ratio_vs_{baseline}"] = round(median[contender] / median[baseline], 3)
                # Ratios within each repeat: the contenders ran back to back, so slow drifts of the
                # machine's speed cancel out more than across repeats.
                out[f"{prefix}ratio_vs_{baseline}_per_repeat"] = [
                    round(a / b, 3) for a, b in zip(rates[contender], rates[baseline])]
                if not prefix:
                    out[f"target_ratio_vs_{baseline}"] = target
    if walls:
        out["raylm_wall_s"] = round(statistics.median(walls), 1)
    out["load_average_1m"] = round(os.getloadavg()[0], 2)
    out["cpu_count"] = os.cpu_count()
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
