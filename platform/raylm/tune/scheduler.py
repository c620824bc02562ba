"""ASHA whose rungs survive ``raylm tune --resume``.

Tune's ``Tuner.restore`` brings back the trials and the searcher of an interrupted sweep, but its scheduler is
the object pickled when the sweep started: ASHA's rungs (the metric each trial recorded at each milestone)
start empty again (Ray issue #30838, open). Trials run after a resume were then compared only with each
other, and a trial that a finished one would have had stopped ran in full.

:class:`ResumableASHA` writes its state (what ASHA's public ``save`` writes) to the sweep folder after every decision,
and reads it back (``restore``) the first time Tune calls it, so a resumed sweep continues with the rungs the
interrupted one had recorded.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

from ray.tune.schedulers import ASHAScheduler

from raylm.common import storage

STATE_FILE = "asha_state.pkl"


class ResumableASHA(ASHAScheduler):
    """``ASHAScheduler`` (same arguments) with its state kept in ``state_path`` between runs of one sweep.

    It also names the trials it stopped (:func:`stopped_trials`): Tune's result grid shows a trial that an
    interruption ended (Ctrl-C) as terminated, as it shows one ASHA stopped.
    """

    def __init__(self, state_path: str | os.PathLike, **kwargs):
        super().__init__(**kwargs)
        self._state_path = str(state_path)
        self._state_loaded = False
        self.stopped_ids: set[str] = set()

    def _load_once(self) -> None:
        if self._state_loaded:
            return
        path = self._state_path
        if Path(path).is_file():
            self.restore(path)  # the rungs and trial brackets of the sweep's earlier run
        self._state_path, self._state_loaded = path, True  # this run's folder, even if the sweep moved

    def _save(self) -> None:
        # what ASHA's own ``save`` writes (its ``__dict__``), written whole so that a reader never sees half a state
        storage.write_bytes(self._state_path, pickle.dumps(self.__dict__))

    def on_trial_add(self, tune_controller, trial):
        self._load_once()
        super().on_trial_add(tune_controller, trial)
        self._save()

    def on_trial_result(self, tune_controller, trial, result):
        self._load_once()
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision == self.STOP:
            self.stopped_ids.add(str(trial.trial_id))
        self._save()
        return decision

    def on_trial_complete(self, tune_controller, trial, result):
        self._load_once()
        super().on_trial_complete(tune_controller, trial, result)
        self._save()

    def on_trial_remove(self, tune_controller, trial):
        self._load_once()
        super().on_trial_remove(tune_controller, trial)
        self._save()


def stopped_trials(state_path: str | os.PathLike) -> set[str]:
    """The ids of the trials ASHA stopped in this sweep (every run of it), from its saved state."""
    path = Path(state_path)
    if not path.is_file():
        return set()
    with path.open("rb") as handle:
        return set(pickle.load(handle).get("stopped_ids", ()))
