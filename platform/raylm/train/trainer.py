"""The per-worker trainer: one object owns the model, optimiser, schedule and precision.

``LMTrainer.train_step`` takes the micro-batches of one optimiser step, so that
gradient accumulation, loss normalisation and gradient sync live in one place.
The loss is a sum over label tokens divided by the number of label tokens in
the whole global batch (all micro-batches on all workers), which makes k
micro-batches of size b give the same update as one batch of size k*b, and N
workers give the same update as one worker on the same global batch.

Three tasks share the loop: ``causal_lm`` (next-token loss on packed blocks with
position ids, labels -100 where no loss is wanted), ``sequence_classification``
(one label per padded sequence, with an attention mask) and
``question_answering`` (an extractive span: start and end token positions per
padded question+context window, two classifications over positions); for the
latter two "label tokens" are labelled sequences (or span ends).

Checkpoints are sharded and portable across worker counts and layouts: every
rank writes its own part of the model and optimiser state with
``torch.distributed.checkpoint``, keyed by parameter name, and a restore
reshards it (:mod:`raylm.train.dcp`), so a checkpoint written by N FSDP (or dp x
tp) workers loads on M DDP workers and vice versa. A model with LoRA adapters
(:mod:`raylm.models.lora`) saves and restores only what trains, the adapter
matrices and their optimiser state: the frozen base is never gathered or written.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F

from raylm.models.lora import is_adapted
from raylm.train import parallel
from raylm.train.checkpoint import HISTORY_FILE, STATE_FILE, capture_rng_state, file_entries, restore_rng_state, \
    write_manifest
from raylm.train.dcp import DCP_DIR, MissingStateError, is_sharded_checkpoint, load_sharded, save_sharded
from raylm.train.masks import packed_attention_mask, single_documents
from raylm.train.optim import build_optimizer, clip_grad_norm, lr_lambda
from raylm.train.tensor_parallel import build_mesh, gather_rows

IGNORE_INDEX = -100
TRAINER_FILE = "trainer.pt"  # scheduler and GradScaler state
BATCH_KEYS = ("input_ids", "labels", "position_ids", "attention_mask", "token_type_ids")
TASKS = ("causal_lm", "sequence_classification", "question_answering")


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model it is loaded into (different architecture or size)."""


def infer_task(model: torch.nn.Module) -> str:
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "sequence_classification"
    if name.endswith("ForQuestionAnswering"):
        return "question_answering"
    return "causal_lm"


class LMTrainer:
    """Owns everything a worker needs for one optimiser step and for saving/restoring it."""

    def __init__(self, model: torch.nn.Module, train_config, device: torch.device, task: str | None = None):
        self.config = train_config
        self.device = device
        self.precision = train_config.precision
        self.task = task or infer_task(model)
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; known: {', '.join(TASKS)}")
        self.adapter_only = is_adapted(model)
        # Tensor parallelism: a group of tensor_parallel ranks computes on the union of its members' rows.
        self.tensor_parallel = train_config.tensor_parallel
        self.mesh = build_mesh(self.tensor_parallel, device) if self.tensor_parallel > 1 else None
        self.model = parallel.parallelize(
            model, train_config.parallel, device, self.precision,
            activation_checkpointing=train_config.activation_checkpointing, compile=train_config.compile,
            fused_kernels=train_config.fused_kernels, mesh=self.mesh,
        )
        self.fsdp = parallel.is_fsdp(self.model)
        # The transformers model: the DDP wrapper's inner module, or the (sharded) model itself.
        self.base_model = parallel.unwrap(self.model)
        self.optimizer = build_optimizer(self.base_model, train_config.lr, train_config.betas,
                                         train_config.weight_decay, device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(train_config.warmup_steps, train_config.max_steps, train_config.min_lr_ratio,
                                      train_config.schedule, train_config.decay_fraction)
        )
        self.scaler = self._make_scaler()
        self.step = 0
        self.skipped_steps = 0

    # ----------------------------------------------------------------- precision

    def _make_scaler(self):
        # Under FSDP2 each worker holds only gradient shards (DTensors); DTensor's handler for
        # the unscale op all-reduces "found inf" over the mesh, so every worker skips the same
        # steps with the plain GradScaler (tests/integration/test_train_parallel.py checks it).
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def _autocast(self):
        dtype = parallel.MIXED_DTYPES.get(self.precision)
        if dtype is None or self.fsdp:
            # FSDP2 casts parameters itself through its MixedPrecisionPolicy.
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    # ----------------------------------------------------------------- loss

    def _logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with self._autocast():
            if self.task == "sequence_classification":
                return self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
            if self.task == "question_answering":
                out = self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                                 token_type_ids=batch.get("token_type_ids"))
                # (batch, 2, seq) -> rows [start_0, end_0, start_1, ...]: two classifications over
                # positions per example, matching the (batch, 2) start/end labels flattened.
                return torch.stack([out.start_logits, out.end_logits], dim=1).reshape(-1, out.start_logits.size(-1))
            # No KV cache. With position ids the mask is block-diagonal causal, so packed
            # examples cannot attend to each other; raylm builds it on the device (train.masks).
            position_ids = batch.get("position_ids")
            return self.model(input_ids=batch["input_ids"], position_ids=position_ids,
                              attention_mask=packed_attention_mask(self.base_model, position_ids),
                              use_cache=False).logits

    def _targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.task in ("sequence_classification", "question_answering"):
            return batch["labels"].reshape(-1)
        # Next-token targets aligned with the logits: shift the labels, not the logits, so the
        # (batch x seq x vocab) logits are never sliced and copied (the last position has none).
        return F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)

    def _loss_sum(self, batch: dict[str, torch.Tensor], logits: torch.Tensor | None = None) -> torch.Tensor:
        logits = self._logits(batch) if logits is None else logits
        targets = self._targets(batch)
        return F.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )

    def _num_targets(self, batch: dict[str, torch.Tensor]) -> int:
        return int((self._targets(batch) != IGNORE_INDEX).sum())

    def _from_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` on the device without a host sync (a blocking copy to a GPU waits for its stream)."""
        if self.device.type != "cuda":
            return tensor.to(self.device)
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def _to_device(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        tensors = {key: torch.as_tensor(value) for key, value in batch.items() if key in BATCH_KEYS}
        mask = tensors.get("attention_mask")
        if self.task != "causal_lm" and mask is not None and mask.dim() == 2 and not self.config.compile:
            # Encoder rows are padded to one fixed length; columns that are padding in every row
            # change nothing (they are masked), so drop them: SST-2 sentences average 23 of 64 tokens.
            used = mask.bool().any(0)
            if bool(used.any()):
                first = int(used.int().argmax())
                end = len(used) - int(used.flip(0).int().argmax())
                if self.task == "question_answering":
                    first = 0  # span labels are positions: never shift them
                for key in ("input_ids", "attention_mask", "token_type_ids"):
                    if key in tensors and tensors[key].dim() == 2:
                        tensors[key] = tensors[key][:, first:end]
        if self.task == "causal_lm" and self.mesh is None and not self.config.compile \
                and single_documents(tensors.get("position_ids")):
            # Rows of one document each need no document mask: without position ids SDPA runs its causal
            # kernel (is_causal), cheaper than a (seq x seq) mask. Checked here, on the host copy: no device sync.
            del tensors["position_ids"]
        tensors = {key: value.to(self.device, dtype=torch.long, non_blocking=True) for key, value in tensors.items()}
        return gather_rows(tensors, self.mesh["tp"].get_group()) if self.mesh is not None else tensors

    # ----------------------------------------------------------------- training

    def train_step(self, micro_batches: Sequence[dict[str, Any]], sync_metrics: bool = True) -> dict[str, Any]:
        """One optimiser step over the given micro-batches; returns loss, lr, grad norm, token counts.

        With ``sync_metrics=False`` the loss and gradient norm stay on the device as
        0-d tensors (this worker's loss only): no host sync and no extra collective,
        for the steps whose metrics nobody reads.
        """
        self.model.train()
        # Count targets on the host copy, before the transfer, so no device sync is needed.
        local_targets = sum(self._num_targets({"labels": torch.as_tensor(b["labels"])}) for b in micro_batches)
        batches = [self._to_device(batch) for batch in micro_batches]
        global_targets = parallel.all_reduce_sum(
            self._from_host(torch.tensor([float(local_targets)], dtype=torch.float64)))[0].clamp(min=1.0)
        # DDP and FSDP average gradients over the data-parallel ranks, hence their number as a factor.
        normaliser = (global_targets / (parallel.world_size() // self.tensor_parallel)).float()
        loss_total = torch.zeros((), dtype=torch.float64, device=self.device)
        for index, batch in enumerate(batches):
            is_last = index == len(batches) - 1
            with parallel.gradient_sync(self.model, enabled=is_last):
                loss_sum = self._loss_sum(batch)
                self.scaler.scale(loss_sum / normaliser).backward()
            loss_total += loss_sum.detach().double()
        self.scaler.unscale_(self.optimizer)
        grad_norm = clip_grad_norm(self.base_model, self.config.max_grad_norm)
        scale_before = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if scale_before is not None and self.scaler.get_scale() < scale_before:
            self.skipped_steps += 1  # inf/nan gradients: GradScaler skipped the update
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        metrics: dict[str, Any] = {
            "loss": loss_total.detach() / global_targets,
            "lr": lr,
            "grad_norm": grad_norm.detach(),
            "tokens": sum(int(torch.as_tensor(b["input_ids"]).numel()) for b in micro_batches),
            "skipped_steps": self.skipped_steps,
        }
        if sync_metrics:
            # Each rank of a tensor-parallel group computed the same group loss.
            metrics["loss"] = float(parallel.all_reduce_sum(loss_total).item() / self.tensor_parallel
                                    / global_targets.item())
            metrics["grad_norm"] = float(grad_norm)
        return metrics

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
        """Mean loss over ``batches`` across all workers, with perplexity (LM) or accuracy (classifier).

        Every worker must call it with the same number of batches (it all-reduces once at the end).
        """
        self.model.eval()
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss sum, targets, correct
        for batch in batches:
            batch = self._to_device(batch)
            logits = self._logits(batch)
            totals[0] += self._loss_sum(batch, logits).double()
            totals[1] += self._num_targets(batch)
            if self.task in ("sequence_classification", "question_answering"):
                targets = self._targets(batch)
                mask = targets != IGNORE_INDEX
                totals[2] += float((logits.argmax(-1)[mask] == targets[mask]).sum())
        totals = parallel.all_reduce_sum(totals) / self.tensor_parallel
        count = float(totals[1])
        loss = float(totals[0]) / count if count else float("nan")
        metrics = {"eval_loss": loss}
        if self.task in ("sequence_classification", "question_answering"):
            # For spans: the share of start and end positions predicted exactly.
            metrics["eval_accuracy"] = float(totals[2]) / count if count else float("nan")
        else:
            metrics["eval_perplexity"] = float(math.exp(min(loss, 50.0)))
        return metrics

    # ----------------------------------------------------------------- state

    def save_checkpoint(self, folder: Path, extra_state: dict[str, Any],
                        history: Sequence[dict[str, Any]] = ()) -> None:
        """Write a checkpoint folder; collective. Every rank writes its own part of the model and
        optimiser state (:mod:`raylm.train.dcp`), rank 0 everything else and a manifest of all ranks' files."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_sharded(folder, self.model, self.optimizer, trainable_only=self.adapter_only)
        rng_states = parallel.gather_objects(capture_rng_state())
        # Ray Train merges every rank's upload into one folder: rank 0's manifest lists the other ranks' parts.
        others = parallel.gather_objects(file_entries(folder, f"{DCP_DIR}/__{parallel.rank()}_*")
                                         if parallel.rank() else {})
        if parallel.rank() != 0:
            return
        # What save_pretrained records: the model's own class (FSDP2 wraps it in a subclass), which export rebuilds.
        self.base_model.config.architectures = [parallel.model_class(self.base_model).__name__]
        self.base_model.config.save_pretrained(folder)
        if getattr(self.base_model, "generation_config", None) is not None and self.base_model.can_generate():
            self.base_model.generation_config.save_pretrained(folder)
        torch.save({"scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()},
                   folder / TRAINER_FILE)
        torch.save({"world_size": len(rng_states), "ranks": rng_states}, folder / "rng.pt")
        state = {"step": self.step, "skipped_steps": self.skipped_steps, "world_size": parallel.world_size(),
                 "tensor_parallel": self.tensor_parallel, "task": self.task, **extra_state}
        (folder / STATE_FILE).write_text(json.dumps(state, indent=1))
        if history:
            (folder / HISTORY_FILE).write_text("".join(json.dumps(row) + "\n" for row in history))
        write_manifest(folder, {name: entry for entries in others for name, entry in entries.items()})

    def load_checkpoint(self, folder: Path) -> dict[str, Any]:
        """Restore model, optimiser, schedule, scaler and (same world size) RNG state; collective.

        The model and optimiser state are resharded to this run's workers and layout.
        Returns the saved trainer state plus ``rng_restored``: whether this rank's
        RNG state was restored (only possible with the same number of workers).
        """
        folder = Path(folder)
        if not is_sharded_checkpoint(folder):
            raise CheckpointMismatchError(f"checkpoint {folder} has no sharded state ({DCP_DIR}/): it was written "
                                          "by an older raylm, which it cannot resume from (it still exports)")
        try:
            load_sharded(folder, self.model, self.optimizer, trainable_only=self.adapter_only)
        except MissingStateError as err:
            cause = ("without train.lora, or with other target modules" if self.adapter_only
                     else "from a different architecture or size, or with train.lora (adapters only)")
            raise CheckpointMismatchError(f"{err.args[0]}; was it saved {cause}?") from None
        saved = torch.load(folder / TRAINER_FILE, map_location="cpu", weights_only=True)
        self.scheduler.load_state_dict(saved["scheduler"])
        if saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])
        state = json.loads((folder / STATE_FILE).read_text())
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        state["rng_restored"] = False
        rng_path = folder / "rng.pt"
        if rng_path.is_file():
            rng = torch.load(rng_path, map_location="cpu", weights_only=True)
            if int(rng.get("world_size", 0)) == parallel.world_size():
                restore_rng_state(rng["ranks"][parallel.rank()])
                state["rng_restored"] = True
        return state
