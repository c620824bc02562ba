"""The promotion gate: move a registry alias only to a model that is better on the same eval set.

``raylm promote models:/<name>/<version> --alias production`` (and
``tracking.promote_alias`` at the end of ``raylm train``) compares the
candidate with the version that holds the alias now, metric by metric
(``eval.promotion_metrics``; by default the main metric of every task both
were scored on). Each comparison is a paired bootstrap over the examples of
the eval set (:func:`raylm.eval.bootstrap.paired_bootstrap`): the candidate
must beat the holder by more than ``eval.promotion_min_delta`` of that metric
in at least ``eval.confidence`` of the resamples. The per-example scores come
from each version's eval report (``eval_report.json`` in its model folder), and
both must have been scored on the same eval set: the same task fingerprint for
every compared metric. Otherwise the alias stays where it is and the
comparison table says why.

``force`` moves the alias anyway and records the reason. Every decision
(promoted, refused, forced) is recorded on the candidate version as the tag
``raylm.promotion.<alias>`` (JSON: outcome, holder, time, reason, table).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import mlflow
from mlflow.exceptions import MlflowException

from raylm.common.tracking import RegistryError, get_model_version, mlflow_client, parse_registry_uri
from raylm.eval.bootstrap import PairedComparison, paired_bootstrap
from raylm.eval.metrics import METRICS
from raylm.eval.runner import PRIMARY_METRICS, EvalReport
from raylm.lifecycle.evaluate import EVAL_REPORT_FILE

logger = logging.getLogger(__name__)

DECISION_TAG = "raylm.promotion.{alias}"
MAX_TAG_CHARS = 4900  # MLflow keeps tag values up to 5000 characters


class PromotionRefused(Exception):
    """The gate kept the alias where it was; ``decision`` has the comparison table."""

    def __init__(self, decision: "PromotionDecision"):
        super().__init__(decision.reasons[0] if decision.reasons else "promotion refused")
        self.decision = decision


@dataclass
class PromotionDecision:
    """What the gate decided about moving ``alias`` to ``candidate``, and why."""

    alias: str
    candidate: str
    holder: Optional[str]
    outcome: str  # promoted | refused | forced | unchanged
    comparisons: list[PairedComparison] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    force_reason: Optional[str] = None
    decided_at: float = field(default_factory=time.time)

    @property
    def moved(self) -> bool:
        return self.outcome in ("promoted", "forced", "unchanged")

    def as_dict(self) -> dict[str, Any]:
        return {"alias": self.alias, "candidate": self.candidate, "holder": self.holder, "outcome": self.outcome,
                "reasons": self.reasons, "force_reason": self.force_reason,
                "decided_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.decided_at)),
                "comparisons": [comparison.as_dict() for comparison in self.comparisons]}

    def table(self) -> str:
        """The comparison table printed by ``raylm promote``."""
        holder = self.holder or "(none)"
        lines = [f"promotion of {self.candidate} to @{self.alias} (holder: {holder})"]
        if self.comparisons:
            header = ("metric", "candidate", "holder", "gain [CI]", "P(gain > margin)", "margin", "verdict")
            rows = [header]
            for c in self.comparisons:
                rows.append((c.metric, _number(c.candidate), _number(c.baseline),
                             f"{c.delta:+.4f} [{c.delta_low:+.4f}, {c.delta_high:+.4f}]", f"{c.win_rate:.3f}",
                             _number(c.min_delta), "better" if c.significant else "not shown better"))
            widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
            for row in rows:
                lines.append("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
            if self.comparisons:
                first = self.comparisons[0]
                lines.append(f"(paired bootstrap over {first.num_examples} examples, {first.num_samples} resamples; "
                             f"'better' needs P >= {first.confidence:.2f}; gain is oriented so that positive is better)")
        lines.extend(f"- {reason}" for reason in self.reasons)
        verdicts = {"promoted": f"promoted: @{self.alias} -> {self.candidate}",
                    "forced": f"forced: @{self.alias} -> {self.candidate} (reason: {self.force_reason})",
                    "unchanged": f"unchanged: {self.candidate} already holds @{self.alias}",
                    "refused": f"refused: @{self.alias} stays on {holder}"}
        lines.append(verdicts[self.outcome])
        return "\n".join(lines)


def _number(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) else str(value)


def version_uri(version) -> str:
    return f"models:/{version.name}/{version.version}"


def load_version_report(tracking_uri: str, version) -> Optional[EvalReport]:
    """The eval report stored in a model version's folder, or None when it has none."""
    with tempfile.TemporaryDirectory(prefix="raylm-report-") as folder:
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=f"{version.source}/{EVAL_REPORT_FILE}",
                                                        dst_path=folder, tracking_uri=tracking_uri)
        except Exception:  # absent artifact: MlflowException or OSError depending on the store
            return None
        try:
            return EvalReport.from_json(Path(local).read_text(encoding="utf-8"))
        except (OSError, ValueError, KeyError) as err:
            raise RegistryError(f"{version_uri(version)}: unreadable {EVAL_REPORT_FILE}: {err}") from None


def compare_reports(candidate: EvalReport, holder: EvalReport, eval_config) -> tuple[list[PairedComparison],
                                                                                       list[str]]:
    """Paired comparisons on the gated metrics, and the reasons (if any) why they cannot all be made."""
    reasons: list[str] = []
    metrics = list(eval_config.promotion_metrics) or [
        PRIMARY_METRICS[task] for task in PRIMARY_METRICS if task in candidate.examples and task in holder.examples]
    if not metrics:
        return [], ["the candidate and the holder were not scored on any common task"]
    comparisons = []
    for name in metrics:
        task = METRICS[name].task
        if name not in candidate.stats or name not in holder.stats:
            missing = "candidate" if name not in candidate.stats else "holder"
            reasons.append(f"{name}: the {missing} has no per-example scores for it")
            continue
        mine, theirs = candidate.task_fingerprints.get(task), holder.task_fingerprints.get(task)
        if mine != theirs:
            reasons.append(f"{name}: evaluated on different eval sets ({task} fingerprint {mine} vs {theirs}); "
                           "evaluate both on the same rows")
            continue
        comparison = paired_bootstrap(candidate.metric_stats(name), holder.metric_stats(name), name,
                                      min_delta=eval_config.promotion_min_delta.get(name, 0.0),
                                      confidence=eval_config.confidence, num_samples=eval_config.bootstrap_samples,
                                      seed=eval_config.bootstrap_seed)
        comparisons.append(comparison)
        if not comparison.significant:
            reasons.append(f"{name}: the candidate is not better than the holder by more than "
                           f"{comparison.min_delta:g} at {comparison.confidence:.0%} (P = {comparison.win_rate:.3f})")
    return comparisons, reasons


def _record(tracking_uri: str, decision: PromotionDecision, name: str, version: str) -> None:
    payload = decision.as_dict()
    text = json.dumps(payload, default=str)
    if len(text) > MAX_TAG_CHARS:  # keep the verdict and the reason; drop the table
        text = json.dumps({**payload, "comparisons": "(omitted: too long for a tag)"}, default=str)[:MAX_TAG_CHARS]
    mlflow_client(tracking_uri).set_model_version_tag(name, version, DECISION_TAG.format(alias=decision.alias), text)


def promote(tracking_uri: str, candidate_uri: str, alias: str, eval_config, force: bool = False,
            reason: Optional[str] = None) -> PromotionDecision:
    """Move ``alias`` to the candidate version if it passes the gate (or ``force``, with a ``reason``).

    Returns the decision when the alias moved (or already pointed there); raises
    :class:`PromotionRefused` (holding the decision) when the gate kept it where it was.
    """
    if force and not (reason and reason.strip()):
        raise RegistryError("--force needs a reason (--reason '...'): it is recorded with the promotion")
    name = parse_registry_uri(candidate_uri)[0]
    candidate = get_model_version(tracking_uri, candidate_uri)
    uri = version_uri(candidate)
    client = mlflow_client(tracking_uri)
    try:
        holder = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        holder = None
    holder_uri = version_uri(holder) if holder is not None else None
    decision = PromotionDecision(alias=alias, candidate=uri, holder=holder_uri, outcome="refused")
    if holder is not None and holder.version == candidate.version:
        decision.outcome = "unchanged"
        return decision
    if holder is None:
        decision.reasons.append(f"no version holds @{alias} yet")
    else:
        candidate_report = load_version_report(tracking_uri, candidate)
        holder_report = load_version_report(tracking_uri, holder)
        if candidate_report is None or holder_report is None:
            which = uri if candidate_report is None else holder_uri
            decision.reasons.append(f"{which} has no {EVAL_REPORT_FILE} (it was registered without an evaluation)")
        else:
            decision.comparisons, reasons = compare_reports(candidate_report, holder_report, eval_config)
            decision.reasons.extend(reasons)
    gate_passed = holder is None or (decision.comparisons and not decision.reasons)
    if gate_passed:
        decision.outcome = "promoted"
    elif force:
        decision.outcome = "forced"
        decision.force_reason = reason.strip()
    if decision.outcome == "refused":
        _record(tracking_uri, decision, name, candidate.version)
        raise PromotionRefused(decision)
    client.set_registered_model_alias(name, alias, candidate.version)
    _record(tracking_uri, decision, name, candidate.version)
    logger.info(f"@{alias} -> {uri} ({decision.outcome})")
    return decision
