"""The TorchTrainer driver: start workers, collect the result, export a model folder."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raylm.common import cluster, storage
from raylm.common.pretrained import checkpoint_fingerprint, locate_checkpoint
from raylm.config import ConfigError, JobConfig
from raylm.data.formatting import CHAT_TEMPLATE
from raylm.data.tokenizer import special_token_ids
from raylm.models.lora import ADAPTER_MARKERS, AdapterError, check_embedding_rows, check_targets, write_adapter_folder
from raylm.train.checkpoint import BEST_CHECKPOINT, CorruptCheckpointError, STATE_FILE, fetch_checkpoint, \
    local_valid_checkpoint, read_history, read_state, verify_checkpoint
from raylm.train.dcp import export_weights, is_sharded_checkpoint, read_model_state, saved_keys
from raylm.train.loop import train_loop_per_worker

MODEL_FILES = ("config.json", "generation_config.json")
# Ray Train V2's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default) and
# takes one report per worker per poll, and a worker blocks until its previous report was taken: every
# evaluation and checkpoint after the first, and the end of training, waited up to 2 s for the next poll.
# raylm polls every 0.5 s unless the variable is set (it reaches the controller and the workers).
HEALTH_CHECK_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
DEFAULT_HEALTH_CHECK_INTERVAL_S = "0.5"


@dataclass
class TrainingResult:
    """What a fit leaves: the final checkpoint (in storage, and as a local verified folder), metrics, history.

    ``checkpoint`` is the ``ray.train.Checkpoint`` in the run's storage (a local
    path, NFS, S3, GCS); ``checkpoint_dir`` is a local folder with the same files,
    the checkpoint itself on a local file system, else a verified download.
    """

    checkpoint_dir: Path
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    best_checkpoint_dir: Path | None = None
    problems: list[str] = field(default_factory=list)
    checkpoint: Any = None  # ray.train.Checkpoint


def experiment_uri(job: JobConfig) -> str:
    """Where Ray Train keeps this run's checkpoints and state: ``<run>/ray_results/<run_name>`` (path or URI)."""
    return storage.join(job.run_uri, "ray_results", job.run_name)


def experiment_dir(job: JobConfig) -> Path:
    """:func:`experiment_uri` for a run on a local (or shared) file system."""
    return job.run_dir / "ray_results" / job.run_name


def _tokenizer_facts(tokenizer) -> tuple[int, dict[str, int]]:
    if tokenizer is None:
        return 0, {}
    return len(tokenizer), special_token_ids(tokenizer)


def worker_runtime_env(config) -> dict:
    """The training workers' runtime env: their niceness (``train.worker_niceness``).

    Ray nices every worker process by 15 (``worker_niceness``), so a training
    worker yields its core to Ray's own processes (raylet, GCS, agents, the
    driver) and to anything else on the node whenever they wake. Ray's core
    worker reads ``RAY_worker_niceness`` from its environment (Ray's job
    supervisor uses the same variable), so the training actors start at the
    configured niceness without any privilege; other workers keep the cluster's.
    """
    if config.worker_niceness is None:
        return {}
    return {"env_vars": {"RAY_worker_niceness": str(config.worker_niceness)}}


def check_tensor_parallel_placement(config) -> None:
    """Raise :class:`ConfigError` when no node of the running Ray cluster can hold one tensor-parallel group.

    A group of ``train.tensor_parallel`` workers must share a node (its collectives
    run every layer). Only the nodes alive now are known: an autoscaling cluster
    may add bigger ones, so the check is skipped where the cluster autoscales.
    """
    import ray

    if config.tensor_parallel == 1 or not ray.is_initialized() \
            or os.environ.get("RAY_ADDRESS", "local") != "local":
        return
    needed = {"CPU": config.cpus_per_worker, **({"GPU": 1} if config.use_gpu else {})}
    capacity = 0
    for node in ray.nodes():
        if node.get("Alive"):
            resources = node.get("Resources", {})
            capacity = max(capacity, min(int(resources.get(name, 0) // amount) for name, amount in needed.items()))
    if capacity < config.tensor_parallel:
        raise ConfigError(f"config error: train.tensor_parallel: {config.tensor_parallel} workers must share a node, "
                          f"but no node of this cluster holds more than {capacity} "
                          f"({', '.join(f'{name}={amount:g}' for name, amount in needed.items())} per worker)")


def check_lora(job: JobConfig) -> None:
    """A ConfigError (one line) unless ``train.lora``'s target modules exist in ``model.init_from``'s architecture
    and the tokenizer's ids fit the checkpoint's (frozen) embedding rows.

    Needs the checkpoint's config and tokenizer (read locally, no weights), so it runs on the driver before any
    worker starts.
    """
    if job.train.lora is None or not job.model.init_from:
        return
    try:
        check_targets(job.model.init_from, job.train.lora)
        check_embedding_rows(job.model.init_from, job.data.tokenizer_path)
    except (AdapterError, FileNotFoundError) as err:
        raise ConfigError(f"config error: {err}") from None


def build_trainer(job: JobConfig, train_dataset, dev_dataset, tokenizer, mlflow_run_id: str | None = None,
                  seq_len: int | None = None, callbacks: list | None = None):
    """The ``TorchTrainer`` that runs ``train_loop_per_worker`` on ``job.train.num_workers`` workers.

    Checkpoints and Ray Train's run state live under ``<run>/ray_results``, on
    whatever storage the workdir names (a path, NFS, ``s3://``, ``gs://``);
    fitting a trainer for the same run folder again resumes from its latest
    valid checkpoint (with any worker count). A failed worker group is
    restarted from the latest checkpoint up to ``train.max_failures`` times.
    ``seq_len`` overrides ``data.seq_len`` for the FLOP count when the datasets
    use another length (e.g. padded classification rows). ``callbacks`` are
    Ray Train callbacks, such as Ray Tune's ``TuneReportCallback`` in a trial.
    """
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    check_lora(job)
    config = job.train
    check_tensor_parallel_placement(config)
    resources = {"CPU": config.cpus_per_worker}
    if config.use_gpu:
        resources["GPU"] = 1
    vocab_size, special_ids = _tokenizer_facts(tokenizer)
    # Ordered, deterministic reads: every worker reads the whole training split in the same order and
    # takes its micro-batches of each global batch (raylm.train.sample_order), so the data position is
    # the same on any worker count. Only the dev split is sharded.
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "job": job.public_dict(),
            "vocab_size": vocab_size,
            "special_ids": special_ids,
            "seq_len": seq_len,
            "mlflow_run_id": mlflow_run_id,
            "tracking_uri": job.resolved_tracking_uri(),
            # On a cluster every worker checks that it imported the driver's raylm.
            "code_fingerprint": cluster.expected_worker_code(),
        },
        # An elastic range: Ray Train V2 starts with what fits between min and max and resizes later.
        scaling_config=ScalingConfig(num_workers=(config.min_workers, config.num_workers) if config.is_elastic
                                     else config.num_workers, use_gpu=config.use_gpu,
                                     elastic_resize_monitor_interval_s=config.elastic_resize_interval_s,
                                     resources_per_worker=resources, placement_strategy=config.placement_strategy),
        run_config=RunConfig(
            name=job.run_name,
            storage_path=storage.join(job.run_uri, "ray_results"),
            failure_config=FailureConfig(max_failures=config.max_failures),
            # No score attribute: Ray keeps the K most recent; the loop keeps the best apart.
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
            callbacks=list(callbacks or []),
            worker_runtime_env=worker_runtime_env(config),
        ),
        torch_config=TorchConfig(backend="nccl" if config.use_gpu else "gloo"),
        datasets={"train": train_dataset, "dev": dev_dataset},
        dataset_config=DataConfig(datasets_to_split=["dev"], execution_options=ingest),
    )


def _best_checkpoint(job: JobConfig, filesystem, last_step: Any, last_dir: Path, scratch: Path | None) -> Path | None:
    """The verified local folder of the run's best-eval-loss copy, or None when there is no valid one.

    In remote storage it is downloaded only when it is another step than the last checkpoint.
    """
    _, experiment = storage.filesystem(experiment_uri(job))
    path = f"{experiment}/{BEST_CHECKPOINT}"
    if storage.is_remote(job.workdir):
        try:
            with filesystem.open_input_stream(f"{path}/{STATE_FILE}") as stream:
                step = json.loads(stream.read()).get("step")
        except (OSError, ValueError):
            return None
        if step == last_step:
            return last_dir
        import tempfile

        try:
            return fetch_checkpoint(path, filesystem, tempfile.mkdtemp(prefix="raylm-best-", dir=scratch))
        except CorruptCheckpointError:
            return None
    try:
        verify_checkpoint(path)
    except CorruptCheckpointError:
        return None
    return Path(path)


def fit_trainer(job: JobConfig, trainer) -> TrainingResult:
    """Fit a trainer from :func:`build_trainer` and collect its final checkpoint, metrics and history.

    The final checkpoint is read through Ray Train's ``Checkpoint`` (its path and
    file system): if it fails its manifest, the newest older one that verifies is
    taken. From remote storage the chosen checkpoint is downloaded once, verified,
    into a local folder that lives until the process exits.
    """
    from ray.train import Checkpoint

    os.environ.setdefault(HEALTH_CHECK_INTERVAL_ENV, DEFAULT_HEALTH_CHECK_INTERVAL_S)  # read by fit()
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    filesystem = result.checkpoint.filesystem
    scratch = storage.local_scratch("raylm-checkpoints-") if storage.is_remote(job.workdir) else None
    folder, chosen, problems = local_valid_checkpoint(result.checkpoint.path, filesystem, scratch)
    if folder is None:
        raise RuntimeError("no valid checkpoint: " + "; ".join(problems))
    best = _best_checkpoint(job, filesystem, read_state(folder).get("step"), folder, scratch)
    history = read_history(folder)
    if not history and result.metrics_dataframe is not None:
        history = result.metrics_dataframe.to_dict(orient="records")
    return TrainingResult(checkpoint_dir=folder, metrics=dict(result.metrics or {}), history=history,
                          best_checkpoint_dir=best, problems=problems,
                          checkpoint=Checkpoint(chosen, filesystem=filesystem))


def run_training(job: JobConfig, train_dataset, dev_dataset, tokenizer, mlflow_run_id: str | None = None,
                 seq_len: int | None = None) -> TrainingResult:
    """Build the run's ``TorchTrainer`` (:func:`build_trainer`) and fit it (:func:`fit_trainer`)."""
    return fit_trainer(job, build_trainer(job, train_dataset, dev_dataset, tokenizer, mlflow_run_id, seq_len))


def choose_export(job: JobConfig, result: TrainingResult) -> tuple[Path, dict[str, Any]]:
    """The checkpoint ``train.export`` selects, and the model card's ``export`` record.

    ``best``: the kept copy of the checkpoint with the best ``train.best_metric``
    (default: the lowest dev loss) over all evaluations (``train.eval_every``),
    else the last one with the reason why.
    The record names the policy, the step exported and its dev loss, and the last
    step and its dev loss, so a reader sees what choosing the best bought.
    """
    last_state = read_state(result.checkpoint_dir)
    record: dict[str, Any] = {
        "policy": job.train.export,
        "last_step": last_state.get("step"),
        "last_eval_loss": last_state.get("eval_loss"),
    }
    chosen, state = Path(result.checkpoint_dir), last_state
    if job.train.export == "best":
        if result.best_checkpoint_dir is not None:
            chosen = Path(result.best_checkpoint_dir)
            state = read_state(chosen)
        else:
            record["fallback"] = ("train.keep_best_checkpoint is false" if not job.train.keep_best_checkpoint
                                  else "no valid best checkpoint (no finite dev loss was measured)")
    if job.train.best_metric != "eval_loss":
        record.update(best_metric=job.train.best_metric, value=state.get(job.train.best_metric),
                      last_value=last_state.get(job.train.best_metric))
    record.update(step=state.get("step"), eval_loss=state.get("eval_loss"),
                  source="best_checkpoint" if chosen != Path(result.checkpoint_dir) else "last_checkpoint")
    return chosen, record


def is_adapter_checkpoint(checkpoint_dir: str | Path) -> bool:
    """Whether ``checkpoint_dir`` is a LoRA run's: sharded state whose model tensors are adapter matrices only."""
    if not is_sharded_checkpoint(checkpoint_dir):
        return False
    model_keys = [key for key in saved_keys(checkpoint_dir) if key.startswith("model.")]
    return bool(model_keys) and all(ADAPTER_MARKERS.search(key) for key in model_keys)


def export_model(checkpoint_dir: Path, tokenizer, model_dir: Path, card: dict[str, Any],
                 trained_steps: int | None = None, lora=None, base: str | None = None,
                 merged_dir: Path | None = None) -> Path:
    """Write a checkpoint's full weights and config as a model folder, add the tokenizer and ``raylm.json``.

    The weights of a sharded checkpoint are assembled here, once, in this one
    process (:func:`raylm.train.dcp.export_weights`); an older checkpoint's
    safetensors are copied.

    ``trained_steps`` (default: the checkpoint's step) is how far the run trained,
    which differs from the exported step when an earlier checkpoint is exported.
    A LoRA checkpoint (adapters only: :func:`is_adapter_checkpoint`) becomes a PEFT
    adapter folder on ``base`` (the run's ``model.init_from``, trained with
    ``lora``: ``train.lora``), its adapters read from the DCP files here; with
    ``merged_dir`` the base with the adapters merged in is written there too, as a
    plain model folder with the same tokenizer and card.
    """
    adapter = is_adapter_checkpoint(checkpoint_dir)
    if adapter and (lora is None or base is None):
        raise ValueError(f"{checkpoint_dir} holds LoRA adapters: exporting it needs train.lora and model.init_from")
    folders = [model_dir] + ([merged_dir] if adapter and merged_dir is not None else [])
    for folder in folders:
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
    if adapter:
        card["adapter"] = write_adapter_folder(base, lora, read_model_state(checkpoint_dir), model_dir,
                                               merged_dir if len(folders) > 1 else None)
        card["adapter"]["base_fingerprint"] = checkpoint_fingerprint(locate_checkpoint(base))
    else:
        if is_sharded_checkpoint(checkpoint_dir):
            export_weights(checkpoint_dir, model_dir)
        for path in Path(checkpoint_dir).iterdir():
            if path.suffix == ".safetensors" or path.name in MODEL_FILES \
                    or path.name.endswith(".safetensors.index.json"):
                shutil.copy2(path, model_dir / path.name)
    if card.get("config", {}).get("model", {}).get("task", "causal_lm") == "causal_lm" \
            and not getattr(tokenizer, "chat_template", None):
        # /v1/chat/completions renders conversations with the folder's template (saved with the tokenizer).
        tokenizer.chat_template = CHAT_TEMPLATE
    card["exported_step"] = read_state(checkpoint_dir).get("step")
    card["trained_steps"] = card["exported_step"] if trained_steps is None else trained_steps
    for folder in folders:
        tokenizer.save_pretrained(folder)
        merged = {"merged_into_base": True} if folder != model_dir else {}
        (folder / "raylm.json").write_text(json.dumps({**card, **merged}, indent=2, default=str))
    return model_dir
