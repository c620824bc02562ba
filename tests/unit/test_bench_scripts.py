"""The benchmarks compare like with like: what each script's contenders are given, how its ratios are named,
and that its inputs are what training reads. Fast, no Ray, no timing assertions."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import data_throughput  # noqa: E402
import gpu_check  # noqa: E402
import lora_step  # noqa: E402
import train_overhead  # noqa: E402

from raylm.train.optim import param_groups  # noqa: E402


def overhead_args(*extra):
    return train_overhead.parse_args(["--steps", "40", "--warmup", "10", "--vocab", "256", "--size", "debug",
                                      "--seq-len", "32", *extra])


def test_matched_arms_get_raylms_kernel_and_optimiser_and_defaults_do_not():
    from transformers.activations import GELUTanh, NewGELUActivation

    args = overhead_args()
    matched, default = train_overhead.build(args, matched=True), train_overhead.build(args, matched=False)
    assert {type(m) for m in matched.modules()} & {GELUTanh, NewGELUActivation} == {GELUTanh}
    assert NewGELUActivation in {type(m) for m in default.modules()}
    # Same initial weights: the kernel swap holds no parameters.
    for (name, a), (_, b) in zip(matched.state_dict().items(), default.state_dict().items()):
        assert torch.equal(a, b), name
    optimizer, scheduler = train_overhead.matched_optimizer(args, matched)
    assert optimizer.defaults["fused"] is True
    expected = param_groups(matched, train_overhead.WEIGHT_DECAY)
    assert [[id(p) for p in g["params"]] for g in optimizer.param_groups] == \
        [[id(p) for p in g["params"]] for g in expected]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [train_overhead.WEIGHT_DECAY, 0.0]
    # raylm's schedule: warmup to the peak, then cosine down to min_lr_ratio
    lrs = []
    for _ in range(args.steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert max(lrs) == pytest.approx(train_overhead.LR)
    assert lrs[-1] == pytest.approx(train_overhead.LR * train_overhead.MIN_LR_RATIO, rel=0.05)


def test_ratios_name_matched_and_default_comparisons_apart():
    rates = {"raylm": [100.0, 90.0, 110.0], "torch_matched": [100.0, 100.0, 100.0], "torch": [50.0, 50.0, 50.0],
             "hf_trainer_matched": [200.0, 200.0, 200.0]}
    out = train_overhead.ratios(rates)
    assert out["ratio_vs_torch_matched"] == 1.0 and out["ratio_vs_torch_matched_per_repeat"] == [1.0, 0.9, 1.1]
    assert out["ratio_vs_torch_default"] == 2.0 and out["ratio_vs_hf_trainer_matched"] == 0.5
    assert "ratio_vs_hf_trainer_default" not in out and "ratio_vs_torch" not in out


def test_only_rejects_unknown_contenders():
    with pytest.raises(SystemExit, match="unknown contender nope"):
        train_overhead.main(["--only", "torch,nope"])


def test_gpu_check_counts_causal_attention_flops():
    from raylm.config import ModelConfig
    from raylm.models.registry import build_model, count_parameters

    model = build_model(ModelConfig(size="debug"), 512, 64, {"eos": 0, "pad": 0})
    layers, hidden, seq_len = model.config.n_layer, model.config.n_embd, 64
    dense = count_parameters(model, exclude_embeddings=True) + model.lm_head.weight.numel()  # tied head
    # Causal: each query attends to half the block on average, half of the full-attention 12*L*H*T.
    assert gpu_check.causal_flops_per_token(model, seq_len) == pytest.approx(6 * dense + 6 * layers * hidden * seq_len)


def test_gpu_check_blocks_are_full_packed_documents_on_the_packed_mask_path():
    from transformers.masking_utils import find_packed_sequence_indices

    chunk = gpu_check.packed_chunk(3, seq_len=128, vocab=512, rows=16)
    again = gpu_check.packed_chunk(3, seq_len=128, vocab=512, rows=16)
    assert all(np.array_equal(chunk[name], again[name]) for name in chunk)
    assert not np.array_equal(chunk["input_ids"], gpu_check.packed_chunk(4, 128, 512, rows=16)["input_ids"])
    assert chunk["input_ids"].shape == (16, 128) and (chunk["input_ids"] != gpu_check.PAD_ID).all()
    starts = chunk["position_ids"] == 0
    assert starts.sum() > 16  # documents end inside blocks, not only at block starts
    assert (chunk["labels"][starts] == -100).all() and (chunk["labels"][~starts] == chunk["input_ids"][~starts]).all()
    # transformers sees packed sequences, so training builds the block-diagonal causal mask
    assert find_packed_sequence_indices(torch.from_numpy(chunk["position_ids"])) is not None


def test_data_baseline_packs_a_file_as_raylm_packs_its_segments(tmp_path):
    from raylm.data.parse import SourcePlan
    from raylm.data.read import read_bytes_segments
    from raylm.data.segments import pack_segment
    from raylm.data.tokenizer import encoder_spec, train_bpe_tokenizer

    paragraphs = [f"Paragraph {i} says something about item {i * 7} and then some more." for i in range(60)]
    text = "\n\n".join(paragraphs) + "\n"
    encoder = encoder_spec(train_bpe_tokenizer(paragraphs, 300))
    plan = SourcePlan(index=0, label="corpus", format="text", task="lm", text_unit="paragraph")
    # raylm: the file's segments, one Ray Data row each, packed one by one (pack_segment per row)
    segments = read_bytes_segments(text.encode(), "/corpus/part-0.txt", 1024, "paragraph")
    assert len(segments) > 2
    per_segment = [pack_segment(segment, plan, encoder, 32)[0] for segment in segments]
    raylm_blocks = {name: np.concatenate([blocks[name] for blocks in per_segment]) for name in per_segment[0]}
    baseline_blocks = data_throughput._pack_files({"text": [text]}, plan, encoder, 32, segment_bytes=1024)
    assert raylm_blocks["input_ids"].shape[0] > 5
    for name in ("input_ids", "labels", "position_ids"):
        assert np.array_equal(raylm_blocks[name], baseline_blocks[name]), name
    # one segment for the whole file packs fewer padded tail blocks: the segment size matters to the blocks
    whole = data_throughput._pack_files({"text": [text]}, plan, encoder, 32, segment_bytes=1 << 20)
    assert whole["input_ids"].shape[0] < raylm_blocks["input_ids"].shape[0]


def test_json_stdout_keeps_everything_but_the_report_off_stdout():
    """Ray's raylet lines reach a driver's stdout (file descriptor 1, also a child's): only the JSON may stay."""
    import json
    import subprocess

    script = ("import os, subprocess, sys; sys.path.insert(0, %r)\n"
              "from _common import json_stdout\n"
              "with json_stdout() as emit:\n"
              "    print('python print'); os.write(1, b'raw fd write\\n')\n"
              "    subprocess.run(['echo', 'child process'])\n"
              "    emit({'figure': 1.5})\n"
              "print('after')\n") % str(BENCH)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [json.dumps({"figure": 1.5}), "after"]
    assert done.stderr.splitlines() == ["python print", "raw fd write", "child process"]


def test_lora_step_gives_the_plain_loop_raylms_lora_config_and_names_its_ratios():
    from raylm.config import LoraConfig, ModelConfig
    from raylm.models.lora import peft_config
    from raylm.models.registry import build_model

    args = lora_step.parse_args(["--rank", "4", "--alpha", "8"])
    assert lora_step.lora_section(args) == LoraConfig(r=4, alpha=8.0)
    config = peft_config(lora_step.lora_section(args), build_model(ModelConfig(arch="llama", size="debug"), 64, 16))
    assert (config.r, config.lora_alpha) == (4, 8.0) and "down_proj" in config.target_modules
    figures = {"peft_loop": {"tokens_per_s": 100.0, "checkpoint_bytes": 5}, "full_loop": {"tokens_per_s": 50.0,
               "checkpoint_bytes": 100}, "raylm_lora": {"tokens_per_s": 96.0, "checkpoint_bytes": 4},
               "raylm_full": {"tokens_per_s": 48.0, "checkpoint_bytes": 100}}
    out = lora_step.ratios(figures)
    assert out["ratio_lora_vs_peft_loop"] == 0.96 and out["lora_checkpoint_fraction"] == 0.04
    assert out["ratio_full_vs_full_loop"] == 0.96 and out["peft_loop_checkpoint_fraction"] == 0.05
    assert "ratio_lora_vs_peft_loop" not in lora_step.ratios({"raylm_lora": figures["raylm_lora"]})
