"""`raylm train`, `finetune`, `prepare` and `demo` refuse bad input before they import Ray, torch or MLflow:
a mistake costs a second, not the import of the training stack."""

import json
import subprocess
import sys
import textwrap

from tests.conftest import REPO_ROOT

# Every command in one fresh interpreter: none of them may have imported the heavy layers by the end.
PROBE = textwrap.dedent("""
    import json, sys
    from typer.testing import CliRunner
    from raylm.cli import app

    outcomes = [CliRunner().invoke(app, args) for args in json.loads(sys.argv[1])]
    heavy = sorted(name for name in ("ray", "torch", "mlflow", "transformers") if name in sys.modules)
    print(json.dumps({"outcomes": [[result.exit_code, result.output] for result in outcomes], "heavy": heavy}))
""")


def test_bad_inputs_fail_before_the_heavy_layers_load(tmp_path, tmp_path_factory):
    smoke = str(REPO_ROOT / "jobs" / "configs" / "smoke.yaml")
    model = tmp_path_factory.mktemp("model")  # a checkpoint folder as far as the checks look (config.json)
    (model / "config.json").write_text("{}")
    short = tmp_path_factory.mktemp("short-model")  # a checkpoint with a 64-token context
    (short / "config.json").write_text('{"max_position_embeddings": 64}')
    # A checkpoint with 4 embedding rows and its own 4-token tokenizer; tokenizers that cannot feed it.
    own, larger, other = (_word_tokenizer(tmp_path_factory, words) for words in ("abcd", "abcdef", "wxyz"))
    (own / "config.json").write_text('{"vocab_size": 4}')
    cases = [
        (["finetune", "--config", smoke, f"model.init_from={own}", f"data.tokenizer_path={larger}"], 2,
         "error: config error: data.tokenizer_path: its token ids reach 5, beyond the 4 embedding rows of "
         "model.init_from"),
        (["finetune", "--config", smoke, f"model.init_from={own}", f"data.tokenizer_path={other}"], 2,
         "error: config error: data.tokenizer_path: not the tokenizer of model.init_from (4 tokens against its 4, "
         "8 token ids differ)"),
        (["train", "--config", smoke, f"model.init_from={tmp_path / 'missing'}"], 1,
         f"error: model.init_from: checkpoint not found: {tmp_path / 'missing'}"),
        (["train", "--config", smoke, f"workdir={tmp_path}", "--resume", "nope"], 2,
         f"error: resume: no run 'nope' (neither a run folder nor a run id under {tmp_path})"),
        (["finetune", "--config", smoke, f"model.init_from={model}", "--resume", "nope"], 2,
         "error: resume: no run 'nope'"),
        (["finetune", "--config", smoke, f"model.init_from={short}", "data.seq_len=128"], 2,
         "error: config error: data.seq_len: 128 tokens exceed the context of model.init_from (64 tokens)"),
        (["finetune", "--config", smoke, f"model.init_from={tmp_path}"], 1,
         f"error: model.init_from: not a model folder (no config.json or .gguf file): {tmp_path}"),
        (["prepare", "data", f"data.sources=[{{path: {tmp_path}/train.jsonl}}]", "data.dev_fraction=0.1"], 1,
         f"error: data.sources[0].path: no such file or folder: '{tmp_path}/train.jsonl'"),
        (["demo", "--config", smoke, f"data.tokenizer_path={tmp_path / 'tok'}"], 1,
         f"error: data.tokenizer_path: folder not found: {tmp_path / 'tok'}"),
    ]
    result = subprocess.run([sys.executable, "-c", PROBE, json.dumps([args for args, _, _ in cases])],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120,
                            env={"PYTHONPATH": str(REPO_ROOT / "platform"), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-3000:]
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    for (args, code, message), (exit_code, output) in zip(cases, probe["outcomes"]):
        assert exit_code == code and output.strip().startswith(message), (args, exit_code, output)
    assert probe["heavy"] == []
    assert list(tmp_path.iterdir()) == []  # no run folder, no MLflow store


def _word_tokenizer(tmp_path_factory, words: str):
    """A folder with a tokenizer.json of one token per letter of ``words``."""
    from tokenizers import Tokenizer, models

    folder = tmp_path_factory.mktemp("tokenizer")
    Tokenizer(models.WordLevel({word: index for index, word in enumerate(words)}, unk_token=words[0])).save(
        str(folder / "tokenizer.json"))
    return folder
