"""LoRA against full fine-tuning of the same checkpoint, through raylm and through a plain peft + torch loop.

The same pretrained causal LM (``--checkpoint``: a transformers folder, e.g. a
converted SmolLM2-135M-Instruct; without it a random Llama of 4 layers x 256
is built in a temporary folder), the same packed blocks (synthetic arithmetic
sequences, ``--batch`` x ``--seq-len`` tokens per step), the same schedule,
clipping, optimiser (raylm's ``build_optimizer``: fused AdamW over its
parameter groups) and CPU threads, for ``--steps`` steps. Contenders:

- ``peft_loop`` / ``full_loop``: one fresh process each, a plain loop over
  in-memory tensors (``model(...).loss.backward()``, clip, step);
  ``peft_loop`` wraps the model with ``peft.get_peft_model`` and the LoRA
  config raylm builds from ``train.lora`` (same targets, rank, alpha).
  Checkpoint bytes: ``save_pretrained`` (the adapter, or the whole model) plus
  ``torch.save`` of the optimiser state.
- ``raylm_lora`` / ``raylm_full``: ``run_training`` with 1 Ray Train worker,
  ``model.init_from`` = the checkpoint, with and without ``train.lora``.
  Tokens/s from the loop's own meter after ``--warmup`` steps; checkpoint
  bytes: every file of the final checkpoint folder.

Peak memory is the summed PSS of each contender's whole process tree (for
raylm: this process with its Ray: raylet, GCS, the worker, the object store).
Ratios: ``ratio_lora_vs_peft_loop`` (raylm's LoRA step against the plain
loop's, target >= 0.95), ``lora_checkpoint_fraction`` (raylm's LoRA checkpoint
against its full one, target <= 0.05), and the same two for the plain loops
and LoRA against full fine-tuning. Prints one JSON object. Not run in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "platform"))
sys.path.insert(0, str(REPO_ROOT / "bench"))

from _common import SizedTokenizer, TreeMemorySampler, json_stdout, machine_state, overall_rate, rotated, \
    spawn_json  # noqa: E402

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LOOPS = ("peft_loop", "full_loop")
CONTENDERS = (*LOOPS, "raylm_lora", "raylm_full")
LR, WARMUP_STEPS, WEIGHT_DECAY, BETAS, MIN_LR_RATIO = 1e-3, 5, 0.0, (0.9, 0.95), 0.1
TARGETS = {"ratio_lora_vs_peft_loop": (">=", 0.95), "lora_checkpoint_fraction": ("<=", 0.05)}
SHAPE_OPTIONS = ("steps", "warmup", "threads", "batch", "seq_len", "rank", "alpha", "log_every", "checkpoint")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="a transformers causal-LM folder (default: a random Llama)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10, help="steps excluded from the timing")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--only", default=",".join(CONTENDERS), help=f"subset of {', '.join(CONTENDERS)}")
    parser.add_argument("--arm", choices=LOOPS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def build_random_checkpoint(folder: Path) -> Path:
    """A random Llama (4 layers x 256, vocab 2048) saved as a safetensors folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder


def lora_section(args):
    from raylm.config import LoraConfig

    return LoraConfig(r=args.rank, alpha=args.alpha)


def make_blocks(args, vocab: int):
    """steps x batch blocks of learnable arithmetic sequences below the checkpoint's vocabulary."""
    import numpy as np

    rng = np.random.default_rng(0)
    rows = args.steps * args.batch
    starts, strides = rng.integers(3, vocab, size=(rows, 1)), rng.integers(1, 7, size=(rows, 1))
    ids = (starts + strides * np.arange(args.seq_len)) % (vocab - 3) + 3
    labels = ids.copy()
    labels[:, 0] = -100
    return {"input_ids": ids.astype(np.int64), "labels": labels.astype(np.int64),
            "position_ids": np.tile(np.arange(args.seq_len), (rows, 1)).astype(np.int64)}


def vocab_size(checkpoint: Path) -> int:
    return int(json.loads((checkpoint / "config.json").read_text())["vocab_size"])


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


# --------------------------------------------------------------------------- the plain loops


def run_loop(args) -> dict:
    """One plain loop (this is a fresh interpreter): LoRA with peft, or full fine-tuning."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from raylm.models.lora import peft_config
    from raylm.train.allocator import keep_freed_memory
    from raylm.train.optim import build_optimizer, lr_lambda

    keep_freed_memory()  # what raylm's worker applies at its start
    torch.set_num_threads(args.threads)
    with TreeMemorySampler() as memory:
        model = AutoModelForCausalLM.from_pretrained(args.checkpoint, local_files_only=True, use_safetensors=True)
        model.config.use_cache = False
        if args.arm == "peft_loop":
            model = get_peft_model(model, peft_config(lora_section(args), model))
        model.train()
        optimizer = build_optimizer(model, LR, BETAS, WEIGHT_DECAY, torch.device("cpu"))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(WARMUP_STEPS, args.steps, MIN_LR_RATIO))
        blocks = make_blocks(args, vocab_size(args.checkpoint))
        tensors = {key: torch.from_numpy(value) for key, value in blocks.items()}
        trainable = [p for p in model.parameters() if p.requires_grad]
        start = None
        for step in range(args.steps):
            if step == args.warmup:
                start = time.perf_counter()
            batch = {key: value[step * args.batch: (step + 1) * args.batch] for key, value in tensors.items()}
            loss = model(**batch, use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if (step + 1) % args.log_every == 0:
                loss.item()  # a loop that logs its loss every log_every steps
        elapsed = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder, safe_serialization=True)
            torch.save(optimizer.state_dict(), Path(folder) / "optimizer.pt")
            checkpoint_bytes = folder_bytes(Path(folder))
    return {"tokens_per_s": (args.steps - args.warmup) * args.batch * args.seq_len / elapsed,
            "checkpoint_bytes": checkpoint_bytes, "peak_tree_pss_bytes": memory.peak_pss,
            "trainable_parameters": sum(p.numel() for p in trainable)}


def spawn_loop(args, name: str) -> dict:
    options = []
    for option in SHAPE_OPTIONS:
        options += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    return spawn_json(__file__, ["--arm", name, *options])


# --------------------------------------------------------------------------- raylm


def run_raylm(args, blocks, index: int, lora: bool) -> dict:
    import ray.data

    from raylm.config import load_config
    from raylm.train.driver import run_training

    rows = [{key: value[i] for key, value in blocks.items()} for i in range(len(blocks["input_ids"]))]
    train = ray.data.from_items(rows).materialize()
    dev = ray.data.from_items(rows[: args.batch]).materialize()
    lora_overrides = [f"train.lora.r={args.rank}", f"train.lora.alpha={args.alpha}"] if lora else []
    with tempfile.TemporaryDirectory() as workdir, TreeMemorySampler() as memory:
        job = load_config(None, [
            f"workdir={workdir}", f"run_name=lora{index}", f"data.seq_len={args.seq_len}",
            f"model.init_from={args.checkpoint}", "train.num_workers=1", f"train.threads_per_worker={args.threads}",
            f"train.micro_batch_size={args.batch}", f"train.max_steps={args.steps}", f"train.lr={LR}",
            f"train.warmup_steps={WARMUP_STEPS}", f"train.weight_decay={WEIGHT_DECAY}",
            f"train.min_lr_ratio={MIN_LR_RATIO}", f"train.log_every={args.log_every}", "train.eval_batches=1",
            "train.keep_best_checkpoint=false", "tracking.enabled=false", *lora_overrides,
        ])
        result = run_training(job, train, dev, SizedTokenizer(vocab_size(args.checkpoint), 0, 1))
        checkpoint_bytes = folder_bytes(result.checkpoint_dir)
    return {"tokens_per_s": overall_rate(result.history, after_step=args.warmup),
            "checkpoint_bytes": checkpoint_bytes, "peak_tree_pss_bytes": memory.peak_pss}


# --------------------------------------------------------------------------- report


def ratios(figures: dict[str, dict]) -> dict:
    def ratio(a: str, b: str, key: str):
        return round(figures[a][key] / figures[b][key], 4) if a in figures and b in figures else None

    out = {"ratio_lora_vs_peft_loop": ratio("raylm_lora", "peft_loop", "tokens_per_s"),
           "ratio_full_vs_full_loop": ratio("raylm_full", "full_loop", "tokens_per_s"),
           "lora_checkpoint_fraction": ratio("raylm_lora", "raylm_full", "checkpoint_bytes"),
           "peft_loop_checkpoint_fraction": ratio("peft_loop", "full_loop", "checkpoint_bytes"),
           "lora_speedup_vs_full": ratio("raylm_lora", "raylm_full", "tokens_per_s"),
           "peft_loop_speedup_vs_full_loop": ratio("peft_loop", "full_loop", "tokens_per_s")}
    return {key: value for key, value in out.items() if value is not None}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.arm:
        args.out.write_text(json.dumps(run_loop(args)))
        return {}
    selected = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(selected) - set(CONTENDERS))
    if unknown or not selected:
        raise SystemExit(f"--only: unknown contender {', '.join(unknown) or '(none given)'}; "
                         f"known: {', '.join(CONTENDERS)}")
    if args.steps - args.warmup < 2 * args.log_every:
        raise SystemExit("--steps must exceed --warmup by at least two logging intervals")
    at_start = machine_state()
    with tempfile.TemporaryDirectory() as scratch, json_stdout() as emit:
        described = str(args.checkpoint) if args.checkpoint else "random llama, 4 layers x 256, vocab 2048"
        if args.checkpoint is None:
            args.checkpoint = build_random_checkpoint(Path(scratch) / "base")
        blocks = make_blocks(args, vocab_size(args.checkpoint))
        if {"raylm_lora", "raylm_full"} & set(selected):
            import ray

            ray.init(num_cpus=max(2, args.threads + 1), include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}})
        runs: dict[str, list[dict]] = {name: [] for name in selected}
        for repeat in range(args.repeats):
            for name in rotated(selected, repeat):
                runs[name].append(spawn_loop(args, name) if name in LOOPS
                                  else run_raylm(args, blocks, repeat, lora=name == "raylm_lora"))
                print(f"[bench] repeat {repeat}: {name} {runs[name][-1]['tokens_per_s']:.0f} tokens/s",
                      file=sys.stderr, flush=True)
        figures = {name: {key: statistics.median(run[key] for run in values) for key in values[0]}
                   for name, values in runs.items()}
        out = {
            "benchmark": "lora_step",
            "checkpoint": described,
            "tokens_per_step": args.batch * args.seq_len, "steps": args.steps,
            "timed_steps": args.steps - args.warmup, "threads": args.threads, "repeats": args.repeats,
            "lora": {"r": args.rank, "alpha": args.alpha},
            "tokens_per_s": {name: round(f["tokens_per_s"], 1) for name, f in figures.items()},
            "tokens_per_s_all": {name: [round(run["tokens_per_s"], 1) for run in values]
                                 for name, values in runs.items()},
            "checkpoint_bytes": {name: int(f["checkpoint_bytes"]) for name, f in figures.items()},
            "peak_tree_pss_bytes": {name: int(f["peak_tree_pss_bytes"]) for name, f in figures.items()},
            **ratios(figures),
            "targets": {key: f"{op} {value}" for key, (op, value) in TARGETS.items()},
        }
        out["targets_met"] = {key: (out[key] >= value if op == ">=" else out[key] <= value)
                              for key, (op, value) in TARGETS.items() if key in out}
        out["machine_at_start"] = at_start
        out["load_average_at_end"] = machine_state()["load_average"]
        emit(out)
    return out


if __name__ == "__main__":
    main()
