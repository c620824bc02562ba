"""data.sources configuration: format inference, field maps, corpus/dev rules, one-line errors."""

import pytest

from raylm.checks import load_job
from raylm.config import ConfigError, load_config


def test_demo_stays_the_default():
    job = load_config()
    assert job.data.corpus == "demo" and job.data.sources == [] and job.data.dev_fraction == 0


def test_sources_imply_the_corpus_and_formats_are_inferred():
    job = load_config(None, [
        "data.sources=[{path: a/*.jsonl.gz, task: sentiment, fields: {text: sentence}}, {path: b.txt},"
        " {path: c.parquet, task: qa}, {path: stanfordnlp/sst2, format: hf, task: sentiment, split: train}]",
        "data.dev_fraction=0.1",
    ])
    data = job.data
    assert data.corpus == "sources"
    assert [s.format for s in data.sources] == ["jsonl", "text", "parquet", "hf"]
    assert data.sources[0].column("text") == "sentence" and data.sources[0].column("label") == "label"
    assert data.sources[1].task == "lm" and data.sources[1].text_unit == "file"


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["data.sources=[{path: corpus/}]", "data.dev_fraction=0.1"],
         "config error: data.sources.0: cannot infer the format of 'corpus/'"),
        (["data.sources=[{path: a.jsonl, task: sentiment, fields: {txt: x}}]", "data.dev_fraction=0.1"],
         "config error: data.sources.0: fields: txt not used by task 'sentiment' (it uses text, label)"),
        (["data.sources=[{path: a.jsonl}]", "data.dev_sources=[{path: b.jsonl, task: qa, fields: {label: y}}]"],
         "config error: data.dev_sources.0: fields: label not used by task 'qa' (it uses context, question, answers)"),
        (["data.sources=[{path: a.txt, task: qa}]", "data.dev_fraction=0.1"],
         "config error: data.sources.0: text files hold plain text: task must be 'lm'"),
        (["data.sources=[{path: a.jsonl}]"], "config error: data: give dev_sources or a dev_fraction > 0"),
        (["data.sources=[{path: a.jsonl}]", "data.dev_sources=[{path: b.jsonl}]", "data.dev_fraction=0.1"],
         "config error: data: give dev_sources or dev_fraction, not both"),
        (["data.corpus=demo", "data.sources=[{path: a.jsonl}]", "data.dev_fraction=0.1"],
         "config error: data: sources are listed but corpus is 'demo'"),
        (["data.corpus=sources"], "config error: data: corpus is 'sources' but sources is empty"),
        (["data.corpus=wiki"], "config error: data.corpus: Input should be 'demo' or 'sources'"),
        (["data.sources=[{path: a.jsonl, weight: -1}]", "data.dev_fraction=0.1"],
         "config error: data.sources.0.weight: Input should be greater than or equal to 0"),
        (["data.sources=[{path: a.jsonl, bogus: 1}]", "data.dev_fraction=0.1"],
         "config error: data.sources.0.bogus: unknown key"),
        (["data.sources=[{path: a.jsonl}]", "data.dev_fraction=1.5"], "config error: data.dev_fraction"),
    ],
)
def test_source_config_errors_are_one_line_naming_the_field(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_job(None, overrides)
    assert str(info.value).startswith(expected), str(info.value)
    assert "\n" not in str(info.value)
