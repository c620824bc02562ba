"""The per-worker trainer: one object owns the model, optimiser, schedule and precision.

``LMTrainer.train_step`` takes the micro-batches of one optimiser step, so that
gradient accumulation, loss normalisation and gradient sync live in one place.
The loss is a sum over label tokens divided by the number of label tokens in
the whole global batch (all micro-batches on all workers), which makes k
micro-batches of size b give the same update as one batch of size k*b.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from raylm.train import parallel
from raylm.train.checkpoint import STATE_FILE, write_manifest

IGNORE_INDEX = -100


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay matrices; no decay on biases, norms and embeddings."""
    embedding_params = {
        id(module.weight) for module in model.modules() if isinstance(module, torch.nn.Embedding)
    }
    decay, no_decay, seen = [], [], set()
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        if param.ndim < 2 or id(param) in embedding_params:
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_lambda(warmup_steps: int, max_steps: int, min_lr_ratio: float):
    """Linear warmup to the peak, then cosine decay to ``min_lr_ratio`` of it."""

    def schedule(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return schedule


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Clip by the global gradient norm; under FSDP2 the norm is reduced across shards."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
        norm = norm.full_tensor()
    return norm


class LMTrainer:
    """Owns everything a worker needs for one optimiser step and for saving/restoring it."""

    def __init__(self, model: torch.nn.Module, train_config, device: torch.device):
        self.config = train_config
        self.device = device
        self.precision = train_config.precision
        self.base_model = model
        if train_config.activation_checkpointing:
            parallel.apply_activation_checkpointing(model)
        self.model = parallel.apply_parallelism(model, train_config.parallel, device, self.precision)
        if train_config.compile:
            self.model = torch.compile(self.model)
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, train_config.weight_decay),
            lr=train_config.lr,
            betas=tuple(train_config.betas),
            fused=device.type == "cuda",
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(train_config.warmup_steps, train_config.max_steps, train_config.min_lr_ratio)
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self.step = 0
        self.skipped_steps = 0

    # ----------------------------------------------------------------- precision

    def _autocast(self):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        if dtype is None or self.config.parallel == "fsdp":
            # FSDP2 casts parameters itself through its MixedPrecisionPolicy.
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with self._autocast():
            # No KV cache: with position ids and no cache, transformers builds a block-diagonal
            # causal mask, so packed examples cannot attend to each other.
            logits = self.model(input_ids=batch["input_ids"], position_ids=batch.get("position_ids"),
                                use_cache=False).logits
        shifted_logits = logits[:, :-1, :].float()
        shifted_labels = batch["labels"][:, 1:]
        return F.cross_entropy(
            shifted_logits.reshape(-1, shifted_logits.size(-1)),
            shifted_labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )

    def _to_device(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {key: torch.as_tensor(value).to(self.device, dtype=torch.long, non_blocking=True)
                for key, value in batch.items() if key in ("input_ids", "labels", "position_ids")}

    # ----------------------------------------------------------------- training

    def train_step(self, micro_batches: Sequence[dict[str, Any]]) -> dict[str, float]:
        """One optimiser step over the given micro-batches; returns loss, lr, grad norm, token counts."""
        self.model.train()
        batches = [self._to_device(batch) for batch in micro_batches]
        local_label_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
        counts = torch.tensor([local_label_tokens], dtype=torch.float64, device=self.device)
        global_label_tokens = float(parallel.all_reduce_sum(counts).item())
        # DDP and FSDP average gradients over workers, hence the world-size factor.
        normaliser = max(global_label_tokens, 1.0) / parallel.world_size()
        loss_total = torch.zeros((), dtype=torch.float64, device=self.device)
        for index, batch in enumerate(batches):
            is_last = index == len(batches) - 1
            with parallel.gradient_sync(self.model, enabled=is_last):
                loss_sum = self._loss_sum(batch)
                self.scaler.scale(loss_sum / normaliser).backward()
            loss_total += loss_sum.detach().double()
        self.scaler.unscale_(self.optimizer)
        grad_norm = clip_grad_norm(self.model, self.config.max_grad_norm)
        scale_before = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if scale_before is not None and self.scaler.get_scale() < scale_before:
            self.skipped_steps += 1  # inf/nan gradients: GradScaler skipped the update
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        loss_total = parallel.all_reduce_sum(loss_total)
        tokens = sum(int(b["input_ids"].numel()) for b in batches)
        return {
            "loss": float(loss_total.item()) / max(global_label_tokens, 1.0),
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens": tokens,
            "skipped_steps": self.skipped_steps,
        }

    @torch.no_grad()
    def evaluate(self, batches) -> float:
        """Mean per-token loss over ``batches`` across all workers."""
        self.model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        for batch in batches:
            batch = self._to_device(batch)
            totals[0] += self._loss_sum(batch).double()
            totals[1] += float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        totals = parallel.all_reduce_sum(totals)
        return float(totals[0] / totals[1].clamp(min=1))

    # ----------------------------------------------------------------- state

    def full_model_state(self) -> dict[str, torch.Tensor]:
        """The complete (unsharded) model state dict, on CPU; collective under FSDP."""
        if self.config.parallel == "fsdp" and parallel.world_size() > 1:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.base_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {key: value.detach().cpu() for key, value in parallel.unwrap(self.model).state_dict().items()}

    def full_optimizer_state(self) -> dict[str, Any]:
        if self.config.parallel == "fsdp" and parallel.world_size() > 1:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(
                self.base_model, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
        return self.optimizer.state_dict()

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.full_optimizer_state(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "skipped_steps": self.skipped_steps,
        }

    def save_checkpoint(self, folder: Path, extra_state: dict[str, Any]) -> None:
        """Write a checkpoint folder (rank 0 writes; every rank must call it under FSDP)."""
        model_state = self.full_model_state()
        trainer_state = self.state_dict()
        if parallel.rank() != 0:
            return
        folder.mkdir(parents=True, exist_ok=True)
        model = parallel.unwrap(self.base_model)
        model.save_pretrained(folder, state_dict=model_state, safe_serialization=True)
        torch.save(
            {key: trainer_state[key] for key in ("optimizer", "scheduler", "scaler")},
            folder / "optimizer.pt",
        )
        torch.save(capture_rng_state(), folder / "rng.pt")
        state = {"step": self.step, "skipped_steps": self.skipped_steps, **extra_state}
        (folder / STATE_FILE).write_text(json.dumps(state, indent=1))
        write_manifest(folder)

    def load_checkpoint(self, folder: Path) -> dict[str, Any]:
        """Restore model, optimiser, schedule, scaler and RNG state; returns the saved trainer state."""
        from safetensors.torch import load_file

        weights = {}
        for shard in sorted(Path(folder).glob("*.safetensors")):
            weights.update(load_file(str(shard)))
        if self.config.parallel == "fsdp" and parallel.world_size() > 1:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False, strict=False)
            set_model_state_dict(self.base_model, weights, options=options)
        else:
            parallel.unwrap(self.model).load_state_dict(weights, strict=False)
        saved = torch.load(Path(folder) / "optimizer.pt", map_location="cpu", weights_only=True)
        if self.config.parallel == "fsdp" and parallel.world_size() > 1:
            set_optimizer_state_dict(self.base_model, self.optimizer, saved["optimizer"], options=options)
        else:
            self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(saved["scaler"])
        # Tied weights are saved once; re-tie after loading.
        tie = getattr(parallel.unwrap(self.base_model), "tie_weights", None)
        if callable(tie) and self.config.parallel != "fsdp":
            tie()
        rng_path = Path(folder) / "rng.pt"
        if rng_path.is_file():
            restore_rng_state(torch.load(rng_path, map_location="cpu", weights_only=True))
        state = json.loads((Path(folder) / STATE_FILE).read_text())
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        return state


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG state as plain tensors, loadable with ``weights_only=True``."""
    version, python_state, gauss = random.getstate()
    _, numpy_keys, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": torch.tensor(python_state, dtype=torch.int64),
        "python_meta": [version, gauss],
        "numpy_keys": torch.from_numpy(numpy_keys.astype(np.int64)),
        "numpy_meta": [int(numpy_pos), int(numpy_has_gauss), float(numpy_gauss)],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, gauss = state["python_meta"]
    random.setstate((version, tuple(int(v) for v in state["python"].tolist()), gauss))
    pos, has_gauss, cached = state["numpy_meta"]
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
