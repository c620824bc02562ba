"""LoRA adapters side by side on one base (raylm.inference.adapters, raylm.models.lora.AdapterSlots): each adapter
answers as it does alone, the base stays itself, unloading frees the matrices, a foreign adapter is refused."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from raylm.inference.adapters import SharedBase
from raylm.inference.engine import Engine
from raylm.inference.task_model import GenerationRequest, SamplingParams
from raylm.models.lora import AdapterError
from tests.model_folders import build_adapter_folder, build_tiny_model_folder

PROMPTS = ["the cat sat on", "translate to german: good morning", "question: who wrote it?", "once upon a time"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    base = build_tiny_model_folder(root / "base")
    other_base = build_tiny_model_folder(root / "other-base", seq_len=128)
    return {"base": base, "a": build_adapter_folder(base, root / "a", seed=1),
            "b": build_adapter_folder(base, root / "b", seed=2),
            "foreign": build_adapter_folder(other_base, root / "foreign", seed=3)}


def greedy(engine: Engine, prompts=PROMPTS, tokens: int = 12) -> list[str]:
    requests = [GenerationRequest(prompt, SamplingParams(max_tokens=tokens, temperature=0.0)) for prompt in prompts]
    return [result.text for result in engine.generate(requests)]


def test_each_adapter_answers_as_it_does_alone_and_the_base_stays_itself(folders):
    alone = {key: greedy(Engine.from_directory(folders[key])) for key in ("base", "a", "b")}
    assert alone["a"] != alone["base"] and alone["b"] != alone["base"] and alone["a"] != alone["b"], \
        "the test adapters must change the answers, or this test proves nothing"
    shared = SharedBase(Engine.from_directory(folders["base"]), folders["base"])
    views = {"base": shared.view(None, "base")}
    for key in ("a", "b"):
        views[key] = shared.view(shared.load(folders[key], key), key)
    for key in ("b", "base", "a", "base", "b"):  # switching back and forth
        assert greedy(views[key]) == alone[key], key
    base_parameters = sum(p.numel() for name, p in shared.model.named_parameters() if "lora_" not in name)
    assert base_parameters == sum(p.numel() for p in Engine.from_directory(folders["base"]).model.parameters())


def test_two_adapters_decoding_at_once_on_two_threads_keep_their_own_answers(folders):
    alone = {key: greedy(Engine.from_directory(folders[key]), tokens=24) for key in ("a", "b")}
    shared = SharedBase(Engine.from_directory(folders["base"]), folders["base"])
    views = {key: shared.view(shared.load(folders[key], key), key) for key in ("a", "b")}
    got: dict[str, list] = {}
    errors: list[BaseException] = []

    def run(key: str) -> None:
        try:
            for _ in range(3):
                got.setdefault(key, []).append(greedy(views[key], tokens=24))
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(key,)) for key in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for key in ("a", "b"):
        assert got[key] == [alone[key]] * 3, key


def test_unloading_frees_the_matrices_and_leaves_the_others(folders):
    shared = SharedBase(Engine.from_directory(folders["base"]), folders["base"])
    alone_b = greedy(Engine.from_directory(folders["b"]))
    slot_a = shared.load(folders["a"], "a")
    slot_b = shared.load(folders["b"], "b")
    lora_names = lambda slot: [name for name, _ in shared.model.named_parameters() if f".{slot}." in name]  # noqa: E731
    assert lora_names(slot_a) and lora_names(slot_b)
    shared.unload(slot_a)
    assert not lora_names(slot_a) and shared.loaded() == [slot_b]
    assert greedy(shared.view(slot_b, "b")) == alone_b
    shared.unload(slot_b)
    assert shared.loaded() == [] and not [name for name, _ in shared.model.named_parameters() if "lora_" in name]
    assert greedy(shared.view(None, "base")) == greedy(Engine.from_directory(folders["base"]))


def test_an_adapter_trained_on_another_base_is_refused_in_one_line(folders):
    shared = SharedBase(Engine.from_directory(folders["base"]), folders["base"])
    with pytest.raises(AdapterError, match=r"^adapter 'foreign' was trained on another base model \(base "
                                           r"fingerprint \w{12}\.\.\., the served base is \w{12}\.\.\.\)$"):
        shared.load(folders["foreign"], "'foreign'")
    assert shared.loaded() == []


def test_an_adapter_whose_matrices_do_not_fit_is_refused_and_leaves_nothing_behind(folders, tmp_path):
    # Written elsewhere (no raylm card): the base check cannot tell, peft's shapes can.
    folder = tmp_path / "misfit"
    folder.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (folder / name).write_bytes((folders["foreign"] / name).read_bytes())
    config = json.loads((folder / "adapter_config.json").read_text())
    from safetensors.torch import load_file, save_file

    weights = {name: torch.zeros(tensor.shape[0] + 1, *tensor.shape[1:]) if ".lora_B." in name else tensor
               for name, tensor in load_file(str(folder / "adapter_model.safetensors")).items()}
    save_file(weights, str(folder / "adapter_model.safetensors"))
    assert config["peft_type"] == "LORA"
    shared = SharedBase(Engine.from_directory(folders["base"]), folders["base"])
    with pytest.raises(AdapterError, match=r"^misfit: its matrices do not fit the base model"):
        shared.load(folder, "'misfit'")
    assert shared.loaded() == []
    assert not [name for name, _ in shared.model.named_parameters() if ".adapter1." in name]


@pytest.mark.parametrize("serve, message", [
    ({"model_path": "/m", "adapters": {"a/b": "/x"}}, "adapters: name 'a/b' must be letters, digits"),
    ({"model_path": "/m", "adapters": {"a": "/x"}, "engine": "vllm"}, "adapters are served by engine raylm only"),
    ({"model_path": "/m", "adapters": {"a": "/x"}, "max_adapters_per_replica": 0}, "max_adapters_per_replica"),
])
def test_adapter_settings_that_cannot_work_are_one_config_error(serve, message):
    from raylm.config import ConfigError, validate_config

    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        validate_config({"serve": serve})


def test_adapters_without_their_base_are_refused_before_anything_deploys():
    from raylm.config import ConfigError, ServeConfig
    from raylm.serving.app import build_app

    with pytest.raises(ConfigError, match=r"serve.adapters need their base model: give --model or serve.model_path"):
        build_app(None, ServeConfig(adapters={"a": "/x"}, models={"sentiment": "/s"}))


def test_serve_models_may_give_a_task_to_an_adapter():
    from raylm.config import validate_config

    serve = validate_config({"serve": {"model_path": "/m", "adapters": {"de": "/x"},
                                       "models": {"translate": "de", "sentiment": "/s"}}}).serve
    assert serve.task_adapters() == {"translate": "de"}
    assert serve.task_models() == {"sentiment": "/s", "qa": "/m", "completions": "/m", "chat": "/m"}


def test_deploy_time_checks_name_the_adapter_that_cannot_be_served(folders, tmp_path):
    from raylm.config import ServeConfig
    from raylm.serving.app import check_model_references

    def check(**adapters):
        check_model_references(ServeConfig(model_path=str(folders["base"]), adapters=adapters))

    check(a=str(folders["a"]), b=str(folders["b"]))
    with pytest.raises(AdapterError, match=r"^adapter 'foreign' was trained on another base model"):
        check(a=str(folders["a"]), foreign=str(folders["foreign"]))
    with pytest.raises(AdapterError, match=r"^serve.adapters.full: .* is not a LoRA adapter folder"):
        check(full=str(folders["base"]))
    with pytest.raises(FileNotFoundError, match=r"^serve.adapters.gone: adapter folder not found: "):
        check(gone=str(tmp_path / "gone"))
