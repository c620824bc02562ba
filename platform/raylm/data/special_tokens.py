"""Special tokens, defined once for the tokenizer, formatting, training and serving."""

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
TASK_TOKENS = {
    "lm": "<|lm|>",
    "sentiment": "<|sentiment|>",
    "qa": "<|qa|>",
    "translate": "<|translate|>",
}
ALL_SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN, *TASK_TOKENS.values()]
