"""raylm's packed-block attention mask against the one transformers builds from position ids."""

import pytest
import torch

from raylm.config import ModelConfig
from raylm.models.registry import build_model
from raylm.train.masks import packed_attention_mask, packed_causal_mask, single_documents


def test_mask_is_causal_within_documents_only():
    # documents of 3, 2 and 1 tokens; a document can start at any position (not only 0)
    mask = packed_causal_mask(torch.tensor([[0, 1, 2, 5, 6, 0]]))
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ], dtype=torch.bool)
    assert mask.shape == (1, 1, 6, 6) and mask.dtype == torch.bool
    assert torch.equal(mask[0, 0], expected)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_model_output_equals_transformers_own_packed_mask(arch):
    model = build_model(ModelConfig(arch=arch, size="debug"), 128, 32, seed=0).eval()
    ids = torch.randint(1, 128, (3, 32), generator=torch.Generator().manual_seed(0))
    positions = torch.stack([torch.cat([torch.arange(10), torch.arange(22)]),
                             torch.arange(32),
                             torch.cat([torch.arange(5), torch.arange(5), torch.arange(22)])])
    mask = packed_attention_mask(model, positions)
    assert mask is not None
    with torch.no_grad():
        theirs = model(input_ids=ids, position_ids=positions, use_cache=False).logits
        ours = model(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=False).logits
        plain = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # the packed rows differ from an unmasked causal pass after their first document; the one-document row does not
    assert not torch.allclose(ours[0, 10:], plain[0, 10:], atol=1e-3)
    torch.testing.assert_close(ours[1], plain[1], rtol=1e-5, atol=1e-5)


def test_other_attention_implementations_keep_transformers_mask():
    model = build_model(ModelConfig(size="debug"), 128, 16, seed=0)
    positions = torch.arange(16).unsqueeze(0)
    assert packed_attention_mask(model, None) is None
    model.config._attn_implementation = "eager"
    assert packed_attention_mask(model, positions) is None


def test_rows_of_one_document_from_zero_need_no_mask():
    assert single_documents(torch.arange(8).repeat(3, 1))
    assert not single_documents(torch.tensor([[0, 1, 2, 0, 1, 2]]))  # two documents
    assert not single_documents(torch.tensor([[3, 4, 5, 6]]))  # one document, not from position 0
    assert not single_documents(torch.stack([torch.arange(4), torch.tensor([0, 1, 0, 1])]))  # one row packed
    assert not single_documents(None) and not single_documents(torch.arange(4))


@pytest.mark.parametrize("packed", [False, True])
def test_the_trainer_drops_position_ids_only_where_rows_are_single_documents(packed):
    """Dropped, the model takes the default positions and SDPA's causal kernel: the same loss as with the
    explicit document mask, which a packed row still gets."""
    from raylm.config import TrainConfig
    from raylm.train.trainer import LMTrainer

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="llama", size="debug"), 128, 16, seed=0)
    trainer = LMTrainer(model, TrainConfig(num_workers=1), torch.device("cpu"))
    positions = torch.arange(16).repeat(2, 1)
    if packed:
        positions[1] = torch.cat([torch.arange(6), torch.arange(10)])
    ids = torch.randint(1, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids.clone(), "position_ids": positions}
    moved = trainer._to_device(batch)
    assert ("position_ids" in moved) == packed
    with torch.no_grad():
        fast = trainer._loss_sum(moved)
        masked = model(input_ids=ids, position_ids=positions, use_cache=False,
                       attention_mask=packed_attention_mask(model, positions)).logits
    reference = torch.nn.functional.cross_entropy(masked[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1),
                                                  reduction="sum")
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-4)
