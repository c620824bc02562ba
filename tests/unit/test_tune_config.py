"""The sweep config: typed tune section, space checks before Ray, trial configs, the WSD schedule, N without a model."""

import subprocess
import sys

import pytest

from raylm.config import ConfigError, ModelConfig, load_config
from raylm.models.registry import build_model, count_parameters
from raylm.models.shapes import non_embedding_parameters
from raylm.train.optim import lr_lambda
from raylm.tune.space import count_trials, trial_config, tune_param_space, validate_sweep, validate_trial

SPACE = "tune.space={model.hidden_size: {grid: [32, 64]}, train.max_steps: {grid: [40, 80]}}"
BASE = ["model.size=debug", "train.eval_every=20", "train.warmup_steps=5"]


def _error(overrides):
    with pytest.raises(ConfigError) as caught:
        job = load_config(None, overrides)
        validate_sweep(job)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("config error:")
    return message


def test_valid_sweep_counts_trials_and_evaluations():
    job = load_config(None, BASE + [SPACE])
    summary = validate_sweep(job)
    assert summary == {"num_trials": 4, "max_steps": 80, "max_evaluations": 4}
    job = load_config(None, BASE + [SPACE, "tune.num_samples=3"])
    assert count_trials(job) == 12
    random = load_config(None, BASE + ["tune.search=random", "tune.num_samples=5",
                                       "tune.space={model.hidden_size: {grid: [32, 64]}, train.lr: {loguniform: [1e-4, 1e-2]}}"])
    assert validate_sweep(random)["num_trials"] == 10
    optuna = load_config(None, BASE + ["tune.search=optuna", "tune.num_samples=6",
                                       "tune.space={model.hidden_size: {choice: [32, 64]}, train.lr: {uniform: [1e-3, 3e-3]}}"])
    assert validate_sweep(optuna)["num_trials"] == 6


@pytest.mark.parametrize("overrides, expected", [
    (["tune.space={model.sise: [1, 2]}"], "tune.space: 'model.sise' is not a key of the job config"),
    (["tune.space={train: [1, 2]}"], "'train' is not a key"),
    (["tune.space={data.seq_len: [64, 128]}"], "'data.seq_len' cannot be swept (the sweep prepares the data once"),
    (["tune.space={train.num_workers: [1, 2]}"], "cannot be swept (trial resources are fixed"),
    (["tune.space={train.lr: {uniform: [2e-3, 1e-3]}}"], "uniform: low (0.002) must be below high (0.001)"),
    (["tune.space={train.lr: {grid: []}}"], "grid is empty"),
    (["tune.space={train.lr: {grid: [1], choice: [2]}}"], "give exactly one of"),
    (["tune.space={train.lrr: [1]}"], "'train.lrr' is not a key"),
    (["tune.serch=grid"], "tune.serch: unknown key"),
    ([], "tune.space is empty"),
    ([SPACE, "tune.max_trials=3"], "the sweep has 4 trials, more than tune.max_trials=3"),
    ([SPACE, "tune.num_samples=2", "tune.max_trials=7"], "the sweep has 8 trials"),
    (["tune.space={model.hidden_size: [64, 65]}"], "the trial model.hidden_size=65 is invalid: model: hidden_size (65) "
                                                   "must be a multiple of num_heads (2)"),
    (["tune.space={train.max_steps: [4, 40]}"], "the trial train.max_steps=4 is invalid: train: warmup_steps (5) must "
                                                "be < max_steps (4)"),
    (["tune.space={train.lr: {loguniform: [1e-4, 1e-2]}}"], "grid needs grid or choice values, but train.lr is a range"),
    (["tune.search=optuna", "tune.space={train.lr: [1e-3, 2e-3]}"], "write train.lr as choice instead of grid"),
    (["train.eval_every=0", SPACE], "train.eval_every: ASHA compares trials at their evaluations"),
    (["train.checkpoint_every=30", SPACE], "train.checkpoint_every (30) must be a multiple of train.eval_every (20)"),
    (['tune.space={"model.num_layers,model.hidden_size": {grid: [[1, 32], [2]]}}'], "each value must list 2 entries"),
])
def test_bad_sweeps_are_one_line_config_errors(overrides, expected):
    assert expected in _error(BASE + overrides)


def test_trial_config_sets_keys_and_rederives_accumulation():
    job = load_config(None, BASE + ["train.num_workers=2", "train.micro_batch_size=4", "train.global_batch_size=16",
                                    "tune.space={train.global_batch_size: [8, 32]}"])
    assert job.train.grad_accum_steps == 2
    bigger = validate_trial(job.public_dict(), {"train.global_batch_size": 32})
    assert bigger.train.grad_accum_steps == 4 and bigger.train.effective_global_batch_size == 32
    tied = trial_config(job.public_dict(), {"model.num_layers,model.hidden_size,model.num_heads": [3, 96, 4]})
    assert tied["model"]["num_layers"] == 3 and tied["model"]["hidden_size"] == 96 and tied["model"]["num_heads"] == 4
    assert "run_id" not in tied


def test_tune_param_space_maps_each_kind():
    job = load_config(None, BASE + ["tune.search=random", "tune.space={model.hidden_size: [32, 64], "
                                    "train.lr: {loguniform: [1e-4, 1e-2]}, train.max_steps: {randint: [40, 50]}, "
                                    "train.seed: {choice: [1, 2]}}"])
    space = tune_param_space(job)
    assert space["model.hidden_size"] == {"grid_search": [32, 64]}
    assert space["train.lr"].lower == pytest.approx(1e-4) and type(space["train.lr"].sampler).__name__ == "_LogUniform"
    assert space["train.max_steps"].upper == 51  # inclusive in raylm, exclusive in Tune
    assert list(space["train.seed"].categories) == [1, 2]


def test_cli_config_errors_exit_2_without_traceback(tmp_path):
    for overrides in (["tune.space={model.sise: [1]}"], BASE + [SPACE, "tune.max_trials=2"], []):
        result = subprocess.run([sys.executable, "-m", "raylm.cli", "tune", "run", *overrides,
                                 f"workdir={tmp_path}"], capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: config error:"), result.stderr
    # Nothing was started or written for a rejected sweep.
    assert not any(tmp_path.iterdir())
    resume = subprocess.run([sys.executable, "-m", "raylm.cli", "tune", "--resume", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert resume.returncode == 2 and "is not a sweep folder" in resume.stderr and "Traceback" not in resume.stderr


def test_wsd_schedule_is_flat_then_decays_and_matches_cosine_in_warmup():
    wsd = lr_lambda(10, 100, 0.1, schedule="wsd", decay_fraction=0.2)
    cosine = lr_lambda(10, 100, 0.1)
    assert [wsd(step) for step in range(10)] == [cosine(step) for step in range(10)]
    assert all(wsd(step) == 1.0 for step in range(10, 80))
    assert wsd(90) == pytest.approx(1 - 0.9 * 0.5) and wsd(100) == pytest.approx(0.1)
    decay = [wsd(step) for step in range(80, 101)]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    # Two lengths share the schedule until the shorter one decays: what makes ASHA's early rungs fair.
    longer = lr_lambda(10, 200, 0.1, schedule="wsd", decay_fraction=0.2)
    assert all(wsd(step) == longer(step) for step in range(80))
    job = load_config(None, ["train.schedule=wsd", "train.decay_fraction=0.3"])
    assert job.train.schedule == "wsd"
    with pytest.raises(ConfigError, match="train.schedule"):
        load_config(None, ["train.schedule=linear"])


@pytest.mark.parametrize("model", [
    ModelConfig(size="debug"), ModelConfig(size="tiny", num_layers=3, hidden_size=96, num_heads=4),
    ModelConfig(arch="llama", size="tiny"),
    ModelConfig(arch="llama", size="debug", hidden_size=128, num_heads=4, num_kv_heads=2, intermediate_size=200),
])
def test_non_embedding_parameters_match_the_built_model(model):
    built = build_model(model, vocab_size=300, max_positions=64)
    assert non_embedding_parameters(model) == count_parameters(built, exclude_embeddings=True)


def test_non_embedding_parameters_exclude_an_untied_head():
    model = ModelConfig(arch="llama", size="160m", num_layers=1, hidden_size=64, num_heads=2, num_kv_heads=2,
                        intermediate_size=128)
    built = build_model(model, vocab_size=300, max_positions=64)
    head = built.get_output_embeddings().weight.numel()
    assert non_embedding_parameters(model) == count_parameters(built, exclude_embeddings=True) - head


def test_asha_rungs_survive_a_new_scheduler_on_the_same_sweep_folder(tmp_path):
    """What ``raylm tune --resume`` does to ASHA: Tune restores the scheduler object pickled at the start (no
    rungs); raylm's reads the rungs back, so a trial after the resume meets the rung recorded before it."""
    from types import SimpleNamespace

    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from raylm.tune.scheduler import ResumableASHA, stopped_trials

    settings = {"time_attr": "evaluations", "max_t": 5, "grace_period": 2, "reduction_factor": 2}
    path = tmp_path / "asha_state.pkl"
    good, bad = SimpleNamespace(trial_id="good"), SimpleNamespace(trial_id="bad")

    def start(scheduler):
        scheduler.set_search_properties("eval_loss", "min")
        return scheduler

    before = start(ResumableASHA(path, **settings))
    before.on_trial_add(None, good)
    for evaluation, loss in ((1, 5.0), (2, 4.0)):
        assert before.on_trial_result(None, good, {"evaluations": evaluation, "eval_loss": loss}) == \
            TrialScheduler.CONTINUE
    after = start(ResumableASHA(path, **settings))  # the sweep resumed: a new object from the same arguments
    after.on_trial_add(None, bad)
    assert after.on_trial_result(None, bad, {"evaluations": 1, "eval_loss": 6.0}) == TrialScheduler.CONTINUE
    assert after.on_trial_result(None, bad, {"evaluations": 2, "eval_loss": 5.5}) == TrialScheduler.STOP
    assert stopped_trials(path) == {"bad"}  # what tells an ASHA stop from a trial a Ctrl-C ended
    # Ray's own ASHA in the same place forgets the first trial and lets the bad one run on.
    forgetful = start(ASHAScheduler(**settings))
    forgetful.on_trial_add(None, bad)
    forgetful.on_trial_result(None, bad, {"evaluations": 1, "eval_loss": 6.0})
    assert forgetful.on_trial_result(None, bad, {"evaluations": 2, "eval_loss": 5.5}) == TrialScheduler.CONTINUE
