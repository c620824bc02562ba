import numpy as np
import pytest

from raylm.data.demo import generate_demo_corpus
from raylm.data.formatting import FormatError, format_example
from raylm.data.packing import IGNORE_INDEX, pack_sequences, tokenize_rows, unpack_segments
from raylm.data.tokenizer import encoder_spec, train_bpe_tokenizer


@pytest.fixture(scope="module")
def corpus_and_tokenizer():
    corpus = generate_demo_corpus(seed=0, num_train=200, num_dev=10)
    tokenizer = train_bpe_tokenizer((p + a for p, a in map(format_example, corpus["train"])), vocab_size=600)
    return corpus["train"], tokenizer


def test_labels_mask_prompt_only(corpus_and_tokenizer):
    rows, tokenizer = corpus_and_tokenizer
    sentiment = next(r for r in rows if r["task"] == "sentiment")
    ids, labels, skipped = tokenize_rows([sentiment], encoder_spec(tokenizer))
    assert skipped == 0
    answer = [i for i, l in zip(ids[0], labels[0]) if l != IGNORE_INDEX]
    assert tokenizer.decode(answer) == " " + sentiment["label"] + tokenizer.eos_token
    lm = next(r for r in rows if r["task"] == "lm")
    ids, labels, _ = tokenize_rows([lm], encoder_spec(tokenizer))
    # plain text: everything after the separator and task token is a target
    assert all(label != IGNORE_INDEX for label in labels[0][2:])


def test_packing_invariants(corpus_and_tokenizer):
    rows, tokenizer = corpus_and_tokenizer
    ids, labels, _ = tokenize_rows(rows, encoder_spec(tokenizer))
    seq_len = 128
    packed = pack_sequences(ids, labels, seq_len, tokenizer.pad_token_id)
    assert packed["input_ids"].shape[1] == seq_len
    assert packed["input_ids"].shape == packed["labels"].shape == packed["position_ids"].shape
    # no token lost or duplicated: the segments are exactly the examples (as block-sized chunks)
    # (a continuation chunk's first label is masked: it would be predicted across segments)
    chunks = sorted((tuple(seq_ids[i : i + seq_len]),
                     tuple(([IGNORE_INDEX] if i else seq_labels[i : i + 1]) + seq_labels[i + 1 : i + seq_len]))
                    for seq_ids, seq_labels in zip(ids, labels) for i in range(0, len(seq_ids), seq_len))
    segments = sorted((tuple(a), tuple(b)) for a, b in unpack_segments(packed, tokenizer.pad_token_id))
    assert segments == chunks
    flat_ids = packed["input_ids"].reshape(-1)
    flat_labels = packed["labels"].reshape(-1)
    keep = flat_ids != tokenizer.pad_token_id
    assert keep.sum() == sum(len(seq) for seq in ids)
    # masks aligned: a label is either ignored or equal to its input token; pads are never targets
    assert np.all((flat_labels == IGNORE_INDEX) | (flat_labels == flat_ids))
    assert np.all(flat_labels[~keep] == IGNORE_INDEX)
    # packing is dense: only block tails are padding
    assert keep.mean() > 0.9
    # deterministic
    again = pack_sequences(ids, labels, seq_len, tokenizer.pad_token_id)
    assert all(np.array_equal(packed[key], again[key]) for key in packed)


def test_long_examples_are_chunked_not_dropped():
    ids = [list(range(1, 151))]
    labels = [list(range(1, 151))]
    packed = pack_sequences(ids, labels, seq_len=64, pad_id=0)
    assert packed["input_ids"].shape == (3, 64)
    assert packed["input_ids"].reshape(-1)[:150].tolist() == ids[0]
    # continuation chunks start a new segment whose first label is masked; the rest are kept
    assert packed["position_ids"][1, 0] == 0 and packed["labels"][1, 0] == IGNORE_INDEX
    assert packed["labels"][1, 1:].tolist() == ids[0][65:128]


def test_malformed_rows_are_skipped_and_counted(corpus_and_tokenizer):
    _, tokenizer = corpus_and_tokenizer
    rows = [{"task": "qa", "context": "x"}, {"task": "sentiment", "text": "ok", "label": 7},
            {"task": "nope"}, {"task": "translate", "source": "the dog.", "target": "Der Hund."}]
    ids, labels, skipped = tokenize_rows(rows, encoder_spec(tokenizer))
    assert skipped == 3 and len(ids) == 1
    with pytest.raises(FormatError):
        format_example({"task": "sentiment", "text": "", "label": 1})


def test_a_checkpoint_tokenizer_brings_its_bos_and_end_of_turn():
    """A Llama-like tokenizer (adds <s>, a chat template closing turns with <|eot_id|>): every example starts
    with its BOS, not raylm's separator, and a reply ends with <|eot_id|>; plain text ends with its EOS. raylm's
    chat template on the same tokenizer (a base checkpoint's exported folder) keeps raylm's task format."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from raylm.data.formatting import CHAT_TEMPLATE

    words = ["<s>", "</s>", "<|eot_id|>", "<unk>"] + sorted({*"abcdefghijklmnopqrstuvwxyz.:?"})
    backend = Tokenizer(models.WordLevel({word: index for index, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", additional_special_tokens=["<|eot_id|>"])
    tokenizer.chat_template = ("{% for m in messages %}{{ bos_token }}{{ m['content'] }}<|eot_id|>{% endfor %}"
                               "{% if add_generation_prompt %}:{% endif %}")
    encoder = encoder_spec(tokenizer)
    assert (encoder.prefix, encoder.end_id, encoder.native) == ((0,), 2, False)
    rows = [{"task": "sentiment", "text": "so good", "label": 1}, {"task": "lm", "text": "a b"}]
    (chat_ids, lm_ids), (chat_labels, lm_labels), _ = tokenize_rows(rows, encoder)
    answer = tokenizer("positive", add_special_tokens=False).input_ids
    prompt = chat_ids[:-len(answer) - 1]
    assert prompt[0] == 0 and prompt[-2:] == [2, words.index(":")]  # BOS ... the user turn's end, the cue
    assert chat_ids[-len(answer) - 1:] == [*answer, 2] and chat_labels[-len(answer) - 1:] == [*answer, 2]
    assert all(label == IGNORE_INDEX for label in chat_labels[:len(prompt)])
    assert lm_ids[0] == 0 and lm_ids[-1] == 1 and lm_labels[0] == IGNORE_INDEX  # BOS text EOS
    tokenizer.chat_template = CHAT_TEMPLATE
    base = encoder_spec(tokenizer)
    assert base.chat_template is None and base.end_id == 1
    (ids,), (labels,), _ = tokenize_rows(rows[:1], base)
    prompt, label = format_example(rows[0])
    assert ids == [0, *tokenizer(prompt + label, add_special_tokens=False).input_ids, 1]  # raylm's format
