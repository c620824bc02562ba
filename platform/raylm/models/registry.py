"""Models of the named sizes (:mod:`raylm.models.shapes`) built from transformers configs; parameter and FLOP counts."""

from __future__ import annotations

from typing import Any

import torch

from raylm.common.pretrained import locate_checkpoint
from raylm.models.pretrained import load_pretrained
from raylm.models.shapes import MODEL_SIZES, model_shape


def build_hf_config(arch: str, size: str, vocab_size: int, max_positions: int, dropout: float = 0.0,
                    bos_token_id: int | None = None, eos_token_id: int | None = None,
                    pad_token_id: int | None = None, shape: dict[str, int] | None = None) -> Any:
    """Return the transformers config for a named size (``shape``: that size with overrides applied)."""
    shape = {**MODEL_SIZES[arch][size], **(shape or {})}
    if arch == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(
            vocab_size=vocab_size,
            n_positions=max_positions,
            n_embd=shape["hidden_size"],
            n_layer=shape["num_layers"],
            n_head=shape["num_heads"],
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=True,
        )
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=max_positions,
        hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["num_heads"],
        num_key_value_heads=shape["num_kv_heads"],
        attention_dropout=dropout,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        tie_word_embeddings=size in ("debug", "tiny"),
    )


def build_model(model_config, vocab_size: int, max_positions: int, special_ids: dict[str, int] | None = None,
                seed: int = 0) -> torch.nn.Module:
    """Build the model a :class:`raylm.config.ModelConfig` describes.

    ``model.task`` picks the head: a causal LM, a sequence classifier with
    ``model.num_labels`` classes, or a span head (start/end logits) for
    extractive QA. With ``init_from`` the weights come from a local
    transformers folder (never the hub, never remote code; a missing head, such as
    a classifier on a pretrained encoder, is initialised from ``seed``) and the
    token embeddings grow if the tokenizer has more tokens than the checkpoint;
    otherwise a fresh model of the named size is initialised deterministically
    from ``seed``.
    """
    from transformers import AutoModelForCausalLM, AutoModelForQuestionAnswering, AutoModelForSequenceClassification

    task = getattr(model_config, "task", "causal_lm")
    classify = task == "sequence_classification"
    auto_class = {"sequence_classification": AutoModelForSequenceClassification,
                  "question_answering": AutoModelForQuestionAnswering}.get(task, AutoModelForCausalLM)
    head_kwargs = {"num_labels": model_config.num_labels} if classify else {}
    special_ids = special_ids or {}
    torch.manual_seed(seed)
    if model_config.init_from:
        try:
            checkpoint = locate_checkpoint(model_config.init_from)
        except (FileNotFoundError, ValueError) as err:
            raise FileNotFoundError(f"model.init_from: {err}") from None
        model = load_pretrained(auto_class, checkpoint, **head_kwargs)
        embeddings = model.get_input_embeddings()
        if embeddings is not None and vocab_size and vocab_size > embeddings.num_embeddings:
            model.resize_token_embeddings(vocab_size)
        if classify and model.config.pad_token_id is None and special_ids.get("pad") is not None:
            model.config.pad_token_id = special_ids["pad"]
        return model
    hf_config = build_hf_config(
        model_config.arch,
        model_config.size,
        vocab_size=vocab_size,
        max_positions=max_positions,
        dropout=model_config.dropout,
        bos_token_id=special_ids.get("bos"),
        eos_token_id=special_ids.get("eos"),
        pad_token_id=special_ids.get("pad"),
        shape=model_shape(model_config),
    )
    for key, value in head_kwargs.items():
        setattr(hf_config, key, value)
    if classify and hf_config.pad_token_id is None:
        # The classifier pools the last non-padding token, which needs a pad id.
        hf_config.pad_token_id = special_ids.get("eos", 0) or 0
    return auto_class.from_config(hf_config)


def count_parameters(model: torch.nn.Module, exclude_embeddings: bool = False) -> int:
    """Number of unique parameters; optionally without the token/position embeddings."""
    seen: set[int] = set()
    total = 0
    embedding_ids: set[int] = set()
    if exclude_embeddings:
        for module in model.modules():
            if isinstance(module, torch.nn.Embedding):
                embedding_ids.add(id(module.weight))
    for param in model.parameters():
        if id(param) in seen or id(param) in embedding_ids:
            continue
        seen.add(id(param))
        total += param.numel()
    return total


def flops_per_token(model: torch.nn.Module, seq_len: int, frozen_weights: bool = False) -> float:
    """Training FLOPs per token: 6N for the dense weights plus the attention term.

    With ``frozen_weights`` (LoRA: the base is frozen) backward computes no weight
    gradients, 4N instead of 6N; the adapters' own few FLOPs are left out.

    N counts the non-embedding parameters plus a tied output projection (a real
    vocabulary-sized matmul even though its weight is the embedding); an untied
    head is already a Linear layer in N, and a classifier has no vocabulary head.
    The attention term is 12 * layers * hidden * seq_len (PaLM appendix B),
    covering QK^T and attention-times-V, forward and backward.
    """
    config = model.config
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    dense = count_parameters(model, exclude_embeddings=True)
    output_projection = 0
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if head is not None and embeddings is not None and head.weight is embeddings.weight:
        output_projection = head.weight.shape[0] * head.weight.shape[1]
    return (4.0 if frozen_weights else 6.0) * (dense + output_projection) + 12.0 * layers * hidden * seq_len
