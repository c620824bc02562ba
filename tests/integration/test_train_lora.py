"""LoRA fine-tuning (``train.lora``) under real Ray Train: adapter-only checkpoints, kill-and-resume, PEFT export.

The base is a tiny random Llama (2 layers, hidden 64) saved as a safetensors folder with a real BPE tokenizer,
built once for the module; the data is test_train_checkpoints' synthetic corpus of arithmetic sequences.

- A 2-worker FSDP2 run (gradient accumulation 2) has one worker SIGKILLed after its first checkpoint is
  registered; it restarts from that checkpoint, repeats the lost steps with the same losses and finishes.
  Every checkpoint's sharded state holds the adapter matrices and their optimiser state only: tensors of a few
  percent of the base's bytes (on disk, DCP's per-tensor framing dominates at this toy size).
- The same run is then extended by 2 DDP workers in bf16 autocast: they resume from the FSDP2 run's adapter
  checkpoint (DCP reshards the FSDP2 run's adapter shards by name), so both modes load adapter-only ones; one
  kill covers Ray Train's restart, which is the same for both (a second one would cost ~20 s of the suite).
- The last checkpoint's adapters are read from its DCP files in the test process and exported as a PEFT
  adapter folder (``PeftModel.from_pretrained`` in plain
  transformers + peft gives raylm's trained model's logits) and, with ``export_merged``, as a merged model
  folder that raylm's engine loads like any other; raylm's engine also loads the adapter folder itself.
- A target module the architecture lacks is one config error line from ``raylm train``, before any file is written.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from raylm.config import load_config
from raylm.train.checkpoint import read_state
from raylm.train.dcp import DCP_DIR
from tests.integration.test_train_checkpoints import SEQ_LEN, _ray_train_workers, _registered_checkpoint_step, \
    synthetic_datasets

LORA_RANK = 1
FIRST_STEPS, SECOND_STEPS, CHECKPOINT_EVERY = 15, 20, 5


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A tiny random Llama folder (safetensors, config, BPE tokenizer trained on the demo corpus)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from raylm.data.demo import generate_demo_corpus
    from raylm.data.formatting import format_example
    from raylm.data.tokenizer import special_token_ids, train_bpe_tokenizer

    folder = tmp_path_factory.mktemp("lora-base") / "base"
    corpus = generate_demo_corpus(seed=0, num_train=200, num_dev=10)
    tokenizer = train_bpe_tokenizer((p + a for p, a in map(format_example, corpus["train"])), vocab_size=300)
    ids = special_token_ids(tokenizer)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, bos_token_id=ids.get("bos"), eos_token_id=ids.get("eos"),
                         pad_token_id=ids.get("pad"))
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def make_job(workdir: Path, base: Path, *overrides: str):
    return load_config(None, [
        f"workdir={workdir}", "run_name=lora", f"data.seq_len={SEQ_LEN}", f"model.init_from={base}",
        f"train.lora.r={LORA_RANK}", "train.lora.alpha=8", "train.lora.dropout=0.05", "train.num_workers=2",
        "train.micro_batch_size=4", "train.lr=1e-2", "train.warmup_steps=2", "train.weight_decay=0.0",
        "train.log_every=1", f"train.eval_every={CHECKPOINT_EVERY}", "train.eval_batches=2",
        f"train.checkpoint_every={CHECKPOINT_EVERY}", "train.keep_checkpoints=2", "train.max_failures=1",
        "tracking.enabled=true", *overrides,
    ])


def fit_and_kill(job, tokenizer, kill: bool = True) -> dict:
    """Train ``job`` on 2 workers, SIGKILL one of them 2 logged steps after the first registered checkpoint
    (``kill``); returns the result, the kill and every loss rank 0 logged (per step, one per attempt)."""
    import mlflow

    from raylm.common import tracking
    from raylm.train.driver import experiment_dir, run_training

    tracking_uri = job.resolved_tracking_uri() if kill else None  # rank 0's logged steps time the kill
    run_id = tracking.start_run(tracking_uri, "raylm-test", job.run_name, job.public_dict()) if kill else None
    client = mlflow.tracking.MlflowClient(tracking_uri=tracking_uri) if kill else None
    experiment = experiment_dir(job)
    already = _registered_checkpoint_step(experiment) or 0
    outcome: dict = {}

    def fit():
        try:
            train, dev = synthetic_datasets()
            outcome["result"] = run_training(job, train, dev, tokenizer, mlflow_run_id=run_id)
        except BaseException as err:  # surfaced by the assertions
            outcome["error"] = err

    thread = threading.Thread(target=fit)
    thread.start()
    deadline = time.time() + 300
    while kill and thread.is_alive() and time.time() < deadline and "killed" not in outcome:
        time.sleep(0.05)
        registered = _registered_checkpoint_step(experiment) or 0
        if registered <= already:
            continue
        logged = [metric.step for metric in client.get_metric_history(run_id, "loss")]
        workers = _ray_train_workers()
        if logged and max(logged) >= registered + 2 and len(workers) == 2:
            os.kill(max(workers, key=lambda process: process.pid).pid, signal.SIGKILL)
            outcome["killed"] = {"registered_step": registered, "logged_step": max(logged)}
    thread.join(timeout=600)
    outcome["logged"] = {}
    for metric in client.get_metric_history(run_id, "loss") if kill else []:
        outcome["logged"].setdefault(metric.step, []).append(metric.value)
    return outcome


def checkpoint_contents(checkpoint: Path) -> dict:
    """The sharded state's model keys, its tensors' bytes (from DCP's metadata), and the folder's files."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(checkpoint / DCP_DIR)).read_metadata().state_dict_metadata
    tensors = {key: entry.size.numel() * entry.properties.dtype.itemsize for key, entry in metadata.items()
               if isinstance(entry, TensorStorageMetadata)}
    return {"model_keys": sorted(key for key in metadata if key.startswith("model.")),
            "model_bytes": sum(size for key, size in tensors.items() if key.startswith("model.")),
            "state_bytes": sum(tensors.values()),
            "files": {str(path.relative_to(checkpoint)): path.stat().st_size
                      for path in checkpoint.rglob("*") if path.is_file()}}


@pytest.fixture(scope="module")
def lora_runs(ray_session, tmp_path_factory, base_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
    workdir = tmp_path_factory.mktemp("lora-runs")
    first_job = make_job(workdir, base_dir, "train.parallel=fsdp", "train.grad_accum_steps=2",
                         f"train.max_steps={FIRST_STEPS}")
    first = fit_and_kill(first_job, tokenizer)
    checkpoint = Path(first["result"].checkpoint_dir) if "result" in first else None
    snapshot = checkpoint_contents(checkpoint) if checkpoint else {}
    second_job = make_job(workdir, base_dir, "train.parallel=ddp", "train.precision=bf16",
                          "train.grad_accum_steps=2", f"train.max_steps={SECOND_STEPS}", "tracking.enabled=false")
    second = fit_and_kill(second_job, tokenizer, kill=False) if checkpoint else {}
    return tokenizer, (first_job, first, snapshot), (second_job, second)


def _check_resumed(job, outcome, previous_steps: int = 0):
    assert outcome.get("killed") is not None, "the run ended before a worker could be killed"
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert result.metrics["step"] == job.train.max_steps
    resumed = result.metrics["resumed_from_step"]
    assert resumed >= outcome["killed"]["registered_step"] > previous_steps
    assert resumed % CHECKPOINT_EVERY == 0 and resumed < job.train.max_steps
    # The steps between the checkpoint and the kill ran twice, from the same adapters, optimiser state, RNG
    # (adapter dropout) and data position: the second attempt repeats the first.
    repeated = [step for step, values in outcome["logged"].items() if len(values) == 2]
    assert repeated and min(repeated) == resumed + 1, repeated
    for step in repeated:
        first, second = outcome["logged"][step]
        assert second == pytest.approx(first, rel=1e-5), step
    return result


def test_fsdp_lora_run_resumes_after_a_kill_from_adapter_only_checkpoints(lora_runs, base_dir):
    _, (job, outcome, snapshot), _ = lora_runs
    result = _check_resumed(job, outcome)
    history = {row["step"]: row for row in result.history}
    assert sorted(history) == list(range(1, FIRST_STEPS + 1))
    # The adapters alone learn (slowly, on a random base): the same dev batches, evaluated every 5 steps.
    assert history[FIRST_STEPS]["eval_loss"] < history[CHECKPOINT_EVERY]["eval_loss"] < history[1]["loss"]
    # The sharded state holds the adapters (2 layers x 7 projections x A, B) and nothing of the base.
    keys = snapshot["model_keys"]
    assert len(keys) == 28 and all(".lora_A." in key or ".lora_B." in key for key in keys), keys
    assert not [name for name in snapshot["files"] if name.endswith(".safetensors")]
    base_bytes = (base_dir / "model.safetensors").stat().st_size
    assert snapshot["model_bytes"] < 0.05 * base_bytes, (snapshot, base_bytes)
    # With their optimiser state (two moments): a full run's sharded state is 3x the base.
    assert snapshot["state_bytes"] < 0.2 * base_bytes, (snapshot, base_bytes)
    # On disk, DCP frames every tensor chunk as its own record (~1.5 KB each, the bulk of the files at this toy
    # size; rng.pt, history, config and manifest do not grow with the model either): still under half of the
    # tensors alone of a full run's checkpoint.
    assert sum(snapshot["files"].values()) < 1.5 * base_bytes, (snapshot, base_bytes)


def test_ddp_bf16_lora_run_continues_from_the_fsdp_adapter_checkpoint(lora_runs):
    from raylm.train.driver import is_adapter_checkpoint

    _, (_, first, _), (job, outcome) = lora_runs
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert result.metrics["step"] == SECOND_STEPS and result.metrics["resumed_from_step"] == FIRST_STEPS
    history = {row["step"]: row for row in result.history}
    before = {row["step"]: row for row in first["result"].history}
    assert sorted(history) == list(range(1, SECOND_STEPS + 1))
    assert all(history[step]["loss"] == before[step]["loss"] for step in range(1, FIRST_STEPS + 1))
    # The adapters were loaded: the loss goes on from the FSDP run's level (bf16 autocast, hence the tolerance).
    assert history[FIRST_STEPS + 1]["loss"] == pytest.approx(before[FIRST_STEPS]["loss"], rel=0.02)
    assert history[FIRST_STEPS + 1]["loss"] < history[1]["loss"] - 0.05
    assert read_state(result.checkpoint_dir)["world_size"] == 2
    assert is_adapter_checkpoint(result.checkpoint_dir)


@pytest.fixture(scope="module")
def exported(lora_runs, tmp_path_factory):
    from raylm.train.driver import export_model

    tokenizer, _, (job, outcome) = lora_runs
    if "result" not in outcome:
        pytest.fail(f"the LoRA run failed: {outcome.get('error')}")
    folder = tmp_path_factory.mktemp("lora-export")
    checkpoint = outcome["result"].checkpoint_dir
    model_dir = export_model(checkpoint, tokenizer, folder / "model", {"config": job.public_dict()},
                             lora=job.train.lora, base=job.model.init_from, merged_dir=folder / "model-merged")
    return job, checkpoint, model_dir, folder / "model-merged"


def _trained_model(job, checkpoint: Path):
    """raylm's trained model: the base with LoRA applied and the checkpoint's adapters loaded, as a worker has it."""
    from raylm.models.lora import apply_lora
    from raylm.models.registry import build_model
    from raylm.train.trainer import LMTrainer

    model = apply_lora(build_model(job.model, 0, SEQ_LEN), job.train.lora)
    trainer = LMTrainer(model, job.train.model_copy(update={"precision": "fp32"}), torch.device("cpu"))
    trainer.load_checkpoint(checkpoint)
    return model.eval()


def test_exported_adapter_loads_in_plain_peft_with_the_same_logits(exported, base_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    job, checkpoint, model_dir, _ = exported
    files = {path.name for path in model_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files
    adapter_config = json.loads((model_dir / "adapter_config.json").read_text())
    assert adapter_config["r"] == LORA_RANK and adapter_config["base_model_name_or_path"] == str(base_dir)
    assert set(adapter_config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"}
    base = AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True)
    peft_model = PeftModel.from_pretrained(base, model_dir).eval()
    ids = torch.randint(1, 90, (2, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = _trained_model(job, checkpoint)(input_ids=ids).logits
        got = peft_model(input_ids=ids).logits
        untouched = AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True)(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - untouched).abs().max() > 1e-2  # the adapters changed the model
    card = json.loads((model_dir / "raylm.json").read_text())
    assert card["adapter"]["r"] == LORA_RANK and len(card["adapter"]["base_fingerprint"]) == 16


def test_merged_and_adapter_folders_serve_through_raylms_engine(exported):
    from raylm.inference.engine import Engine

    job, checkpoint, model_dir, merged_dir = exported
    assert (merged_dir / "config.json").is_file() and (merged_dir / "model.safetensors").is_file()
    assert json.loads((merged_dir / "raylm.json").read_text())["merged_into_base"] is True
    ids = torch.randint(1, 90, (2, SEQ_LEN), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = _trained_model(job, checkpoint)(input_ids=ids).logits
        for folder in (merged_dir, model_dir):
            engine = Engine.from_directory(folder, device="cpu")
            torch.testing.assert_close(engine.model(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_unknown_target_module_is_one_config_error_line(base_dir, tmp_path):
    from raylm.config import ConfigError
    from raylm.lifecycle.workflow import train

    workdir = tmp_path / "runs"
    job = make_job(workdir, base_dir, "train.lora.target_modules=[q_proj, c_attn]")
    with pytest.raises(ConfigError) as error:
        train(job)  # what `raylm train` runs: the CLI prints the one line and exits with 2
    message = str(error.value)
    assert len(message.splitlines()) == 1
    assert message.startswith("config error: train.lora.target_modules: c_attn not in LlamaForCausalLM") \
        and "q_proj" in message
    assert not workdir.exists()  # before the run's folder is made
