import pytest

from raylm.data.demo import generate_demo_corpus
from raylm.data.formatting import format_example
from raylm.data.special_tokens import ALL_SPECIAL_TOKENS, TASK_TOKENS
from raylm.data.tokenizer import load_tokenizer, tokenizer_fingerprint, train_bpe_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    corpus = generate_demo_corpus(seed=0, num_train=300, num_dev=10)
    return train_bpe_tokenizer((p + a for p, a in map(format_example, corpus["train"])), vocab_size=600)


def test_round_trip_including_unseen_bytes(tokenizer):
    for text in ["Heute sieht der große Hund die Katze.", "naïve café — 東京 🚀", "  spaces\tand\nnewlines "]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text


def test_special_tokens_are_single_ids(tokenizer):
    for token in ALL_SPECIAL_TOKENS:
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids[0]) == token
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<|pad|>"
    prompt = TASK_TOKENS["qa"] + "Context: x"
    assert tokenizer(prompt, add_special_tokens=False)["input_ids"][0] == tokenizer.convert_tokens_to_ids(TASK_TOKENS["qa"])


def test_save_load_same_fingerprint(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert tokenizer_fingerprint(loaded) == tokenizer_fingerprint(tokenizer)
    text = "the movie was not good"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_load_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing")
