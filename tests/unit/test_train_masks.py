"""raylm's packed-block attention mask against the one transformers builds from position ids."""

import pytest
import torch

from raylm.config import ModelConfig
from raylm.models.registry import build_model
from raylm.train.masks import packed_attention_mask, packed_causal_mask


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
