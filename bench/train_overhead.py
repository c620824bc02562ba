"""Training-loop overhead: raylm's loop inside Ray Train against a bare loop and the HF Trainer, like with like.

The same tiny GPT-2 (``model.size=tiny``, same seed, same initial weights),
the same packed blocks (synthetic arithmetic sequences: ``--batch`` x
``--seq-len`` tokens per step, position ids restarting per block), the same
schedule (linear warmup then cosine), clipping at 1.0 and the same number of
CPU threads (``--threads``), for ``--steps`` steps. Contenders:

- ``raylm``: ``run_training`` -> ``train_loop_per_worker`` -> ``LMTrainer`` with
  1 Ray Train worker (``threads_per_worker``), the blocks as a Ray Dataset,
  fp32, one checkpoint at the end, raylm's defaults: fused AdamW over
  :func:`raylm.train.optim.param_groups`, the one-kernel GELU
  (:mod:`raylm.train.kernels`) and the malloc settings of
  :mod:`raylm.train.allocator`. Tokens/s from the loop's own meter (the
  metrics history saved in the final checkpoint) over the logged intervals
  after the first ``--warmup`` steps. ``raylm_unfused``: the same with
  ``train.fused_kernels=false``.
- ``torch_matched``: one process, a plain loop over in-memory tensors
  (``model(...).loss.backward()``, clip, step), given everything raylm's worker
  applies: the same optimiser (``build_optimizer``: fused AdamW, the same
  parameter groups), the same GELU kernel (``fuse_kernels``) and the same
  malloc settings (``keep_freed_memory``). ``ratio_vs_torch_matched`` is what
  the Ray Train loop itself costs.
- ``hf_trainer_matched``: ``transformers.Trainer`` (no evaluation, no saving,
  no reporting) given the same optimiser and schedule (``optimizers=``), the
  same GELU kernel and malloc settings; timed by a callback between the end of
  step ``--warmup`` and the last step. ``ratio_vs_hf_trainer_matched``.
- ``torch`` and ``hf_trainer``: the same two with their own defaults (torch's
  foreach AdamW over all parameters; the Trainer's ``adamw_torch_fused`` with
  its decay groups and its cosine schedule; the model as built; glibc's malloc
  defaults). ``ratio_vs_torch_default`` and ``ratio_vs_hf_trainer_default``
  compare raylm's defaults with theirs: what a user gets, not what the loop
  costs.

The bare loop and the Trainer each run in a fresh Python process (malloc
settings are process-wide and must not leak into the next contender); raylm
runs in a Ray started once by this script. Each figure is the median over
``--repeats`` runs, the contenders interleaved in an order that rotates each
repeat so that background load hits them alike; per-repeat ratios are given
too (contenders back to back). Each contender records the niceness it ran at:
the bare loop and the Trainer this script's, raylm's training worker
``train.worker_niceness`` (0 by default; Ray starts its other workers, such
as Ray Data's split coordinator, at 15: ``--ray-worker-niceness`` changes
that). Ray and worker start-up and the final
checkpoint are excluded from raylm's steady-state figure and reported
separately as ``raylm_wall_s``. Prints one JSON object. Not run in CI.
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

from _common import SizedTokenizer, machine_state, overall_rate, rotated, spawn_json  # noqa: E402

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

IN_PROCESS = ("torch", "torch_matched", "hf_trainer", "hf_trainer_matched")
CONTENDERS = (*IN_PROCESS, "raylm", "raylm_unfused")
DEFAULT_CONTENDERS = "torch_matched,hf_trainer_matched,raylm,torch,hf_trainer"
LR, WARMUP_STEPS, WEIGHT_DECAY, BETAS, MIN_LR_RATIO = 3e-3, 10, 0.1, (0.9, 0.95), 0.1
TARGETS = {"ratio_vs_torch_matched": 0.95, "ratio_vs_hf_trainer_matched": 1.0}
SHAPE_OPTIONS = ("steps", "warmup", "threads", "batch", "seq_len", "vocab", "size", "log_every")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20, help="steps excluded from the timing")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--only", default=DEFAULT_CONTENDERS,
                        help=f"comma-separated subset of {', '.join(CONTENDERS)}")
    parser.add_argument("--ray-worker-niceness", type=int, default=None,
                        help="Ray's worker_niceness for the local Ray's other workers (Ray's default: 15)")
    parser.add_argument("--arm", choices=IN_PROCESS, help=argparse.SUPPRESS)  # one in-process contender
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
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


def build(args, matched: bool):
    """The benchmark model; ``matched``: with raylm's kernel substitutions, as its worker applies them."""
    from raylm.config import ModelConfig
    from raylm.models.registry import build_model
    from raylm.train.kernels import fuse_kernels

    model = build_model(ModelConfig(size=args.size), args.vocab, args.seq_len, {"eos": 0, "pad": 1}, seed=0)
    model.config.use_cache = False  # packed blocks: block-diagonal masking needs no KV cache
    if matched:
        fuse_kernels(model)
    return model


def schedule(args):
    from raylm.train.optim import lr_lambda

    return lr_lambda(WARMUP_STEPS, args.steps, MIN_LR_RATIO)


def matched_optimizer(args, model):
    """raylm's optimiser and schedule for ``model``: fused AdamW over its parameter groups."""
    import torch

    from raylm.train.optim import build_optimizer

    optimizer = build_optimizer(model, LR, BETAS, WEIGHT_DECAY, torch.device("cpu"))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(args))


def prepare_process(args, matched: bool) -> None:
    """Thread count, and for matched contenders the malloc settings raylm's worker applies at its start."""
    import torch

    from raylm.train.allocator import keep_freed_memory

    if matched:
        keep_freed_memory()
    torch.set_num_threads(args.threads)


# --------------------------------------------------------------------------- torch


def run_torch(args, blocks, matched: bool) -> float:
    import torch

    prepare_process(args, matched)
    model = build(args, matched)
    model.train()
    if matched:
        optimizer, scheduler = matched_optimizer(args, model)
    else:
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
        if (step + 1) % args.log_every == 0:
            loss.item()  # what a loop that logs its loss every log_every steps does
    elapsed = time.perf_counter() - start
    return (args.steps - args.warmup) * args.batch * args.seq_len / elapsed


# --------------------------------------------------------------------------- HF Trainer


def run_hf_trainer(args, blocks, matched: bool) -> float:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    prepare_process(args, matched)

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

    model = build(args, matched)
    with tempfile.TemporaryDirectory() as output:
        arguments = TrainingArguments(
            output_dir=output, max_steps=args.steps, per_device_train_batch_size=args.batch,
            learning_rate=LR, weight_decay=WEIGHT_DECAY, adam_beta1=BETAS[0], adam_beta2=BETAS[1],
            warmup_steps=WARMUP_STEPS, lr_scheduler_type="cosine", max_grad_norm=1.0,
            logging_steps=args.log_every, save_strategy="no", eval_strategy="no", report_to=[],
            dataloader_num_workers=0, use_cpu=True, disable_tqdm=True, seed=0,
        )
        optimizers = matched_optimizer(args, model) if matched else (None, None)
        trainer = Trainer(model=model, args=arguments, train_dataset=Blocks(), callbacks=[Clock()],
                          optimizers=optimizers)
        with contextlib.redirect_stdout(sys.stderr):  # its log lines would break the one-JSON-object output
            trainer.train()
    return (args.steps - args.warmup) * args.batch * args.seq_len / (Clock.end - Clock.start)


def run_in_process_arm(args) -> dict:
    """One in-process contender (this is a fresh interpreter started by :func:`main`)."""
    blocks = make_blocks(args)
    matched = args.arm.endswith("_matched")
    runner = run_torch if args.arm.startswith("torch") else run_hf_trainer
    rate = runner(args, blocks, matched)
    return {"tokens_per_s": rate, "niceness": os.nice(0)}


def spawn_arm(args, name: str) -> dict:
    options = []
    for option in SHAPE_OPTIONS:
        options += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    return spawn_json(__file__, ["--arm", name, *options])


# --------------------------------------------------------------------------- raylm


def run_raylm(args, blocks, index: int, fused_kernels: bool = True) -> tuple[float, float, int]:
    """(tokens/s, wall seconds, the training worker's niceness) of one raylm run."""
    import ray.data

    from raylm.config import load_config
    from raylm.train.checkpoint import read_state
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
        niceness = read_state(result.checkpoint_dir).get("worker_niceness")
    try:
        rate = overall_rate(result.history, after_step=args.warmup)
    except ValueError:
        raise SystemExit("raylm: no logged interval after the warm-up; use more --steps or a smaller --log-every")
    return rate, wall, niceness


# --------------------------------------------------------------------------- report


def ratios(rates: dict[str, list[float]]) -> dict:
    """Medians' ratios of raylm against each baseline present, with per-repeat ratios (back-to-back runs)."""
    median = {name: statistics.median(values) for name, values in rates.items()}
    out: dict = {}
    pairs = [("raylm", "torch_matched", "ratio_vs_torch_matched"),
             ("raylm", "hf_trainer_matched", "ratio_vs_hf_trainer_matched"),
             ("raylm", "torch", "ratio_vs_torch_default"),
             ("raylm", "hf_trainer", "ratio_vs_hf_trainer_default"),
             ("raylm_unfused", "torch_matched", "unfused_ratio_vs_torch_matched"),
             ("raylm_unfused", "torch", "unfused_ratio_vs_torch_default"),
             ("raylm_unfused", "hf_trainer", "unfused_ratio_vs_hf_trainer_default")]
    for contender, baseline, key in pairs:
        if contender in median and baseline in median:
            out[key] = round(median[contender] / median[baseline], 3)
            out[f"{key}_per_repeat"] = [round(a / b, 3) for a, b in zip(rates[contender], rates[baseline])]
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.arm:
        args.out.write_text(json.dumps(run_in_process_arm(args)))
        return {}
    if args.steps - args.warmup < 2 * args.log_every:
        raise SystemExit("--steps must exceed --warmup by at least two logging intervals")
    selected = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(selected) - set(CONTENDERS))
    if unknown or not selected:
        raise SystemExit(f"--only: unknown contender {', '.join(unknown) or '(none given)'}; "
                         f"known: {', '.join(CONTENDERS)}")
    if {"hf_trainer", "hf_trainer_matched"} & set(selected):
        try:
            import accelerate  # noqa: F401  (transformers.Trainer needs it)
        except ImportError:
            raise SystemExit("bench/train_overhead.py: the HF Trainer baseline needs accelerate: "
                             "pip install -e '.[bench]' (or --only torch_matched,torch,raylm)")
    at_start = machine_state()
    blocks = make_blocks(args)
    if {"raylm", "raylm_unfused"} & set(selected):
        import ray

        system_config = {} if args.ray_worker_niceness is None else {"worker_niceness": args.ray_worker_niceness}
        ray.init(num_cpus=max(2, args.threads + 1), include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}},
                 _system_config=system_config)
    rates: dict[str, list[float]] = {name: [] for name in selected}
    niceness: dict[str, int] = {}
    walls: list[float] = []
    for repeat in range(args.repeats):
        for name in rotated(selected, repeat):
            if name in IN_PROCESS:
                result = spawn_arm(args, name)
                rates[name].append(result["tokens_per_s"])
                niceness[name] = result["niceness"]
            else:
                rate, wall, niceness[name] = run_raylm(args, blocks, repeat, fused_kernels=name == "raylm")
                rates[name].append(rate)
                if name == "raylm":
                    walls.append(wall)
            print(f"[bench] repeat {repeat}: {name} {rates[name][-1]:.0f} tokens/s", file=sys.stderr, flush=True)
    out = {
        "benchmark": "train_overhead",
        "model": f"gpt2-{args.size}",
        "tokens_per_step": args.batch * args.seq_len,
        "steps": args.steps,
        "timed_steps": args.steps - args.warmup,
        "threads": args.threads,
        "repeats": args.repeats,
        "niceness": niceness,
        "tokens_per_s": {name: round(statistics.median(values), 1) for name, values in rates.items()},
        "tokens_per_s_all": {name: [round(v, 1) for v in values] for name, values in rates.items()},
        **ratios(rates),
        "targets": {key: target for key, target in TARGETS.items()},
    }
    out["targets_met"] = {key: out[key] >= target for key, target in TARGETS.items() if key in out}
    if walls:
        out["raylm_wall_s"] = round(statistics.median(walls), 1)
    out["machine_at_start"] = at_start
    out["load_average_at_end"] = machine_state()["load_average"]
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
