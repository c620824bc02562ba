"""The search space of a sweep: which config keys vary, how, and what one trial's config is.

A sweep is the job config plus ``tune.space``, a mapping from dotted config
keys (``model.hidden_size``, ``train.lr``) to a grid, a set of choices or a
range. Everything a user can get wrong is checked here, before Ray starts: a
key the job config does not have, a key a sweep cannot vary (the data is
prepared once for every trial; trial resources are fixed), an empty space, a
grid larger than ``tune.max_trials``, and every grid combination that would
not make a valid job config (say ``hidden_size`` not divisible by ``num_heads``).
"""

from __future__ import annotations

import copy
import itertools
import math
from typing import Any

from pydantic import BaseModel, ValidationError

from raylm.checks import check_job
from raylm.config import ConfigError, JobConfig, SearchDimension, format_validation_error

# Keys a sweep may not vary, with the reason shown to the user.
FIXED_PREFIXES: dict[str, str] = {
    "data.": "the sweep prepares the data once for all trials",
    "tune.": "the sweep's own settings are not swept",
    "serve.": "serving settings do not change a trial",
    "eval.": "evaluation settings do not change a trial",
    "tracking.": "tracking settings do not change a trial",
    "run_name": "each trial's run name comes from its trial id",
    "run_id": "each trial's run id comes from its trial id",
    "workdir": "trials live in the sweep's folder",
    "train.num_workers": "trial resources are fixed for a sweep",
    "train.cpus_per_worker": "trial resources are fixed for a sweep",
    "train.use_gpu": "trial resources are fixed for a sweep",
    "model.init_from": "a sweep trains models built from sizes, or adapters of one model.init_from",
}


def _fixed_reason(key: str) -> str | None:
    for prefix, reason in FIXED_PREFIXES.items():
        if key == prefix.rstrip(".") or (prefix.endswith(".") and key.startswith(prefix)):
            return reason
    return None


def _section(annotation: Any) -> Any:
    """The config section an optional section (``Optional[LoraConfig]``) holds; other annotations unchanged."""
    arguments = getattr(annotation, "__args__", ())
    sections = [arg for arg in arguments if isinstance(arg, type) and issubclass(arg, BaseModel)]
    return sections[0] if len(sections) == 1 and type(None) in arguments else annotation


def _key_exists(model_class: type[BaseModel], parts: list[str]) -> bool:
    fields = model_class.model_fields
    if parts[0] not in fields:
        return False
    annotation = _section(fields[parts[0]].annotation)
    if len(parts) == 1:
        return not (isinstance(annotation, type) and issubclass(annotation, BaseModel))
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return _key_exists(annotation, parts[1:])
    return False


def split_key(key: str) -> list[str]:
    """The config keys a space entry sets: ``a.b`` -> [a.b]; tied keys ``a.b,a.c`` -> [a.b, a.c]."""
    return [part.strip() for part in key.split(",")]


def check_space_keys(space: dict[str, Any]) -> None:
    """Every key of ``tune.space`` names leaves of the job config that a sweep may vary (else ValueError).

    Keys joined by commas vary together: each value is a list with one entry
    per key (``model.num_layers,model.hidden_size,model.num_heads: {grid: [[6, 384, 6], [12, 768, 12]]}``).
    """
    for entry, dimension in space.items():
        keys = split_key(entry)
        for key in keys:
            if not _key_exists(JobConfig, key.split(".")):
                raise ValueError(f"{key!r} is not a key of the job config")
            reason = _fixed_reason(key)
            if reason:
                raise ValueError(f"{key!r} cannot be swept ({reason})")
        if len(keys) > 1:
            if dimension.kind not in ("grid", "choice"):
                raise ValueError(f"{entry!r}: tied keys take grid or choice values, one list per combination")
            for value in dimension.values:
                if not isinstance(value, (list, tuple)) or len(value) != len(keys):
                    raise ValueError(f"{entry!r}: each value must list {len(keys)} entries, one per key; got {value!r}")


def expand_params(params: dict[str, Any]) -> dict[str, Any]:
    """Trial params with tied keys (``a,b: [1, 2]``) spread into their config keys (``a: 1, b: 2``)."""
    expanded: dict[str, Any] = {}
    for entry, value in params.items():
        keys = split_key(entry)
        if len(keys) == 1:
            expanded[entry] = value
        else:
            expanded.update(zip(keys, value))
    return expanded


def trial_config(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The raw config of one trial: ``base`` (a public config dump) with the dotted ``params`` set.

    When a trial sets the global batch size or the micro-batch size, the
    gradient accumulation is derived again from them, as for a config file
    that names only ``global_batch_size``.
    """
    params = expand_params(params)
    raw = copy.deepcopy(base)
    raw.pop("run_id", None)
    train = raw.setdefault("train", {})
    if any(key in params for key in ("train.global_batch_size", "train.micro_batch_size")):
        if params.get("train.global_batch_size", train.get("global_batch_size")) is not None:
            train.pop("grad_accum_steps", None)
            train["global_batch_size"] = params.get("train.global_batch_size", train.get("global_batch_size"))
    for key, value in params.items():
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return raw


def validate_trial(base: dict[str, Any], params: dict[str, Any]) -> JobConfig:
    """The validated job config of one trial; a ConfigError naming the trial's values if it is invalid."""
    try:
        return check_job(JobConfig.model_validate(trial_config(base, params)))
    except ValidationError as err:
        message = format_validation_error(err)
    except ConfigError as err:
        message = str(err)
    shown = ", ".join(f"{key}={value}" for key, value in params.items())
    raise ConfigError(f"config error: tune.space: the trial {shown} is invalid: "
                      f"{message.removeprefix('config error: ')}") from None


def _discrete(dimension: SearchDimension) -> list[Any] | None:
    return list(dimension.values) if dimension.kind in ("grid", "choice") else None


def _range_ends(dimension: SearchDimension) -> list[Any]:
    low, high = dimension.values
    return [low, high]


def count_trials(job: JobConfig) -> int:
    """How many trials the sweep runs: grid size x num_samples (grid, random), or num_samples (optuna)."""
    tune = job.tune
    if tune.search == "optuna":
        return tune.num_samples
    grid = math.prod(len(dimension.values) for dimension in tune.space.values() if dimension.kind == "grid")
    if tune.search == "grid":
        grid *= math.prod(len(dimension.values) for dimension in tune.space.values() if dimension.kind == "choice")
    return grid * tune.num_samples


def validate_sweep(job: JobConfig) -> dict[str, Any]:
    """Check the sweep before Ray starts; returns a summary (trial count, largest max_steps).

    Raises :class:`ConfigError` (one line) for an empty space, a key that is not
    in the job config or that a sweep may not vary, a grid search over
    a range, a space larger than ``tune.max_trials``, ASHA without intermediate
    evaluations, or any combination of discrete values (and range ends) that is
    not a valid job config.
    """
    tune = job.tune
    if not tune.space:
        raise ConfigError("config error: tune.space is empty: give at least one key to sweep, "
                          "e.g. tune.space={model.hidden_size: {grid: [64, 128]}}")
    try:
        check_space_keys(tune.space)
    except ValueError as err:
        raise ConfigError(f"config error: tune.space: {err}") from None
    if "://" in job.workdir:  # s3://, gs://: Tune's and the trials' folders need a file system here
        raise ConfigError(f"config error: workdir: a sweep needs a file system workdir (local or shared), "
                          f"not {job.workdir}")
    if job.model.init_from and job.train.lora is None:
        raise ConfigError("config error: model.init_from: a sweep trains models built from sizes, or LoRA adapters "
                          "of model.init_from (set train.lora)")
    if job.model.task != "causal_lm":
        raise ConfigError("config error: model.task: sweeps fit the scaling law of causal LMs only")
    if tune.search == "grid":
        ranges = [key for key, dimension in tune.space.items() if _discrete(dimension) is None]
        if ranges:
            raise ConfigError(f"config error: tune.search: grid needs grid or choice values, but "
                              f"{', '.join(ranges)} is a range; use search: random or optuna")
    if tune.search == "optuna":
        grids = [key for key, dimension in tune.space.items() if dimension.kind == "grid"]
        if grids:
            raise ConfigError(f"config error: tune.space: Optuna chooses values itself; write {', '.join(grids)} "
                              "as choice instead of grid")
        tied = [key for key in tune.space if len(split_key(key)) > 1]
        if tied:
            raise ConfigError(f"config error: tune.space: Optuna cannot choose among lists ({', '.join(tied)}); "
                              "use search: grid or random")
    num_trials = count_trials(job)
    if num_trials > tune.max_trials:
        raise ConfigError(f"config error: tune.space: the sweep has {num_trials} trials, more than "
                          f"tune.max_trials={tune.max_trials}")
    base = job.public_dict()
    values = {key: _discrete(dimension) or _range_ends(dimension) for key, dimension in tune.space.items()}
    if tune.search == "grid" or math.prod(len(v) for v in values.values()) <= 4 * tune.max_trials:
        combinations = itertools.product(*values.values())
    else:  # ranges crossed with large choices: check each value against the base config alone
        combinations = ([value if k == key else values[k][0] for k in values] for key in values for value in values[key])
    trials = [validate_trial(base, dict(zip(values, combination))) for combination in combinations]
    if tune.scheduler == "asha":
        if not job.train.eval_every:
            raise ConfigError("config error: train.eval_every: ASHA compares trials at their evaluations; "
                              "set train.eval_every > 0 (or tune.scheduler: none)")
        for trial in trials:
            if trial.train.checkpoint_every % trial.train.eval_every:
                raise ConfigError(f"config error: train.checkpoint_every ({trial.train.checkpoint_every}) must be a "
                                  f"multiple of train.eval_every ({trial.train.eval_every}) in a sweep: every report "
                                  "to Tune carries the dev loss")
    max_steps = max(trial.train.max_steps for trial in trials)
    eval_every = max(1, min(trial.train.eval_every or trial.train.max_steps for trial in trials))
    return {"num_trials": num_trials, "max_steps": max_steps,
            "max_evaluations": math.ceil(max_steps / eval_every)}


def tune_param_space(job: JobConfig) -> dict[str, Any]:
    """``tune.space`` as a Ray Tune param space (flat dotted keys)."""
    from ray import tune

    space: dict[str, Any] = {}
    for key, dimension in job.tune.space.items():
        kind, values = dimension.kind, dimension.values
        if kind == "grid" or (kind == "choice" and job.tune.search == "grid"):
            space[key] = tune.grid_search(list(values))
        elif kind == "choice":
            space[key] = tune.choice(list(values))
        elif kind == "uniform":
            space[key] = tune.uniform(*values)
        elif kind == "loguniform":
            space[key] = tune.loguniform(*values)
        elif kind == "randint":
            space[key] = tune.randint(values[0], values[1] + 1)  # Tune's upper bound is exclusive
        else:
            space[key] = tune.lograndint(values[0], values[1] + 1)
    return space
