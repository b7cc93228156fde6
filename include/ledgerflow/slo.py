"""Service level objectives: judged against the ledger's indicators, alerted once.

Each workflow's objectives come from the ``slo:`` of its latest version's file
(``spec.slo``). An objective allows a share of bad runs (5% for a ``*_p95``, 50% for a
``*_p50``, ``100% - success_rate`` of the finished runs for ``success_rate``); its *error
budget burn* is the bad runs over the allowed ones: 1.0 means the budget is spent.

- ``ok``: less than half the budget burnt; ``burning``: half or more; ``breached``: more
  than all of it (the objective is not met); ``no_data``: no run to judge.

``check_alerts`` (the maintenance DAG, every few minutes) notifies when an objective
*enters* burning or breached — once per breach, not once per check or per run — and
records its state in ``lf_slo_alerts`` (a conditional update: two checks at once notify
once). Notifiers: the log (a WARNING naming the workflow, objective, measure and target)
and the metrics ``ledgerflow.slo.burning`` / ``ledgerflow.slo.breached``. (The waits
issue's notifiers — mail, chat — are not part of Ledgerflow yet; when they are, they
plug in as another ``Notifier``.)
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ledgerflow.ledger.indicators import Window, WorkflowFacts, measure, percentile
from ledgerflow.spec.slo import LATENCY_OBJECTIVES

if TYPE_CHECKING:
    from ledgerflow.ledger.store import Ledger
    from ledgerflow.spec.slo import SloSpec

log = logging.getLogger(__name__)

STATES = ("no_data", "ok", "burning", "breached")
_RANK = {"no_data": 0, "ok": 0, "burning": 1, "breached": 2}
BURNING_AT = 0.5


@dataclass(frozen=True)
class Objective:
    """One objective of one workflow, judged over a window."""

    workflow: str
    name: str
    target: float  # seconds, or a rate 0..1
    measured: float | None  # the percentile, or the success rate
    runs: int  # runs judged
    bad: int  # runs beyond the target (failed, for success_rate)
    allowed: float  # bad runs the budget allows
    burn: float | None  # bad / allowed (None: no data)
    state: str

    @property
    def kind(self) -> str:
        return "rate" if self.name == "success_rate" else "duration"

    def as_dict(self) -> dict[str, Any]:
        burn = self.burn
        return {
            "workflow": self.workflow,
            "objective": self.name,
            "target": self.target,
            "measured": self.measured,
            "runs": self.runs,
            "bad": self.bad,
            "allowed": round(self.allowed, 4),
            "budget_burn": None if burn is None else (burn if math.isfinite(burn) else "inf"),
            "state": self.state,
        }

    def describe(self) -> str:
        def show(v: float | None) -> str:
            if v is None:
                return "-"
            return f"{v * 100:.2f}%" if self.kind == "rate" else f"{v:.1f}s"

        burn = "-" if self.burn is None else f"{self.burn:.2f}"
        return (
            f"{self.workflow} {self.name}: {show(self.measured)} (target {show(self.target)}), "
            f"{self.bad} of {self.runs} runs bad, budget burn {burn}: {self.state}"
        )


def _state(bad: int, allowed: float, runs: int) -> tuple[float | None, str]:
    if runs == 0:
        return None, "no_data"
    burn = bad / allowed if allowed > 0 else (math.inf if bad else 0.0)
    if burn > 1:
        return burn, "breached"
    return burn, "burning" if burn >= BURNING_AT else "ok"


def judge(facts: WorkflowFacts, slo: SloSpec) -> list[Objective]:
    """Each objective of ``slo`` over the runs in ``facts``."""
    out = []
    for name, target in slo.objectives().items():
        if name == "success_rate":
            # A cancelled run is neither a success nor a failure (``indicators.NEITHER``).
            finished = [r for r in facts.runs if r.outcome not in ("running", "cancelled")]
            bad = sum(1 for r in finished if r.outcome != "succeeded")
            allowed = (1 - float(target)) * len(finished)
            measured = None if not finished else (len(finished) - bad) / len(finished)
            burn, state = _state(bad, allowed, len(finished))
            out.append(
                Objective(
                    facts.workflow,
                    name,
                    float(target),
                    measured,
                    len(finished),
                    bad,
                    allowed,
                    burn,
                    state,
                )
            )
            continue
        indicator, share = LATENCY_OBJECTIVES[name]
        values = _values(facts, indicator)
        limit = target.total_seconds()
        bad = sum(1 for v in values if v > limit)
        allowed = share * len(values)
        burn, state = _state(bad, allowed, len(values))
        out.append(
            Objective(
                facts.workflow,
                name,
                limit,
                percentile(values, 1 - share),
                len(values),
                bad,
                allowed,
                burn,
                state,
            )
        )
    return out


def _values(facts: WorkflowFacts, indicator: str) -> list[float]:
    if indicator == "completion":
        return [r.completion for r in facts.runs if r.completion is not None]
    if indicator == "human_wait":
        return [r.human_wait for r in facts.runs if r.human_wait > 0]
    return [r.first_step for r in facts.runs if r.first_step is not None]


def sla_breach_rate(facts: WorkflowFacts, slo: SloSpec | None) -> float | None:
    """Share of succeeded runs slower than the completion objective (p95's, else p50's)."""
    target = None if slo is None else (slo.completion_p95 or slo.completion_p50)
    values = _values(facts, "completion")
    if target is None or not values:
        return None
    return sum(1 for v in values if v > target.total_seconds()) / len(values)


def load_slos(dags_folder: Path | None = None) -> dict[str, SloSpec]:
    """The ``slo:`` of each workflow's latest version under ``<dags folder>/workflows``;
    a file that does not load is skipped (``ledgerflow validate`` names its problem).
    A file is parsed again only when it changed (the dashboard asks on every request)."""
    from ledgerflow import settings, versions

    folder = settings.dags_folder(dags_folder) / "workflows"
    found: dict[str, SloSpec] = {}
    if not folder.is_dir():
        return found
    for workflow in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = versions.version_files(workflow)
        if not files:
            continue
        path = files[max(files)]
        try:
            stat = path.stat()
        except OSError:
            continue
        name, objectives = _slo_of(str(path), stat.st_mtime_ns, stat.st_size)
        if name is not None and objectives is not None:
            found[name] = objectives
    return found


@lru_cache(maxsize=1024)
def _slo_of(path: str, _mtime_ns: int, _size: int) -> tuple[str | None, SloSpec | None]:
    """The workflow's name and ``slo:``, validated without building the whole workflow
    (its steps, templates, tools), read with the loader's refusals of hostile YAML.
    ``ledgerflow validate`` checks the whole file, ``slo:`` included, naming lines."""
    from pydantic import ValidationError

    from ledgerflow.errors import LedgerflowError
    from ledgerflow.spec.loader import MAX_FILE_BYTES, load_yaml
    from ledgerflow.spec.slo import SloSpec

    try:
        if _size > MAX_FILE_BYTES:
            raise LedgerflowError(f"over {MAX_FILE_BYTES:,} bytes")
        with open(path, encoding="utf-8") as handle:
            data, _lines = load_yaml(handle.read(), path)
        if not isinstance(data.get("name"), str):
            return None, None
        raw = data.get("slo")
        return data["name"], None if raw is None else SloSpec.model_validate(raw)
    except (OSError, UnicodeDecodeError, LedgerflowError, ValidationError) as exc:
        log.warning("no SLO from %s (`ledgerflow validate` says why): %s", path, exc)
        return None, None


@dataclass
class Report:
    """Indicators of every workflow (each over its SLO's window, else the base window), and
    the objectives of those that have an SLO."""

    base: Window
    facts: dict[str, tuple[WorkflowFacts, Window]]
    slos: dict[str, SloSpec]
    objectives: list[Objective]

    def workflows(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for name, (facts, window) in sorted(self.facts.items()):
            summary = facts.summary(window.hours)
            summary["since"] = window.since.isoformat()
            summary["until"] = window.until.isoformat()
            summary["sla_breach_rate"] = sla_breach_rate(facts, self.slos.get(name))
            summary["objectives"] = [o.as_dict() for o in self.objectives if o.workflow == name]
            out[name] = summary
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "since": self.base.since.isoformat(),
            "until": self.base.until.isoformat(),
            "workflows": self.workflows(),
            "breaker_openings": len(self.base.breaker_openings),
            "auth_failures": {
                "unauthenticated_401": self.base.auth_failures.get(401, 0),
                "forbidden_403": self.base.auth_failures.get(403, 0),
            },
        }


DEFAULT_WINDOW = timedelta(days=7)


def report(
    ledger: Ledger,
    *,
    slos: dict[str, SloSpec],
    since: datetime | None = None,
    until: datetime | None = None,
    workflows: Iterable[str] | None = None,
    dag_ids: Iterable[str] | None = None,
    now: datetime | None = None,
) -> Report:
    """Indicators of the runs started since ``since`` (default: over each workflow's SLO
    window, 7 days without one) and each objective judged over the same runs."""
    from ledgerflow.ledger._engine import now as ledger_now

    current = now or ledger_now()
    end = until or current
    wanted = None if workflows is None else set(workflows)
    kw: dict[str, Any] = {"until": end, "dag_ids": dag_ids, "now": current}
    base = measure(ledger, since=since or end - DEFAULT_WINDOW, workflows=wanted, **kw)
    spans: dict[timedelta, set[str]] = defaultdict(set)
    if since is None:
        for name, slo in slos.items():
            if slo.window != DEFAULT_WINDOW and (wanted is None or name in wanted):
                spans[slo.window].add(name)
    own = {
        span: measure(ledger, since=end - span, workflows=names, **kw)
        for span, names in spans.items()
    }
    facts: dict[str, tuple[WorkflowFacts, Window]] = {}
    for name, found in base.workflows.items():
        facts[name] = (found, base)
    for span, names in spans.items():
        window = own[span]
        for name in names:
            facts[name] = (window.workflows.get(name) or WorkflowFacts(name), window)
    objectives: list[Objective] = []
    for name, slo in sorted(slos.items()):
        if wanted is not None and name not in wanted:
            continue
        if name not in facts:
            facts[name] = (WorkflowFacts(name), base)
        objectives.extend(judge(facts[name][0], slo))
    return Report(base, facts, slos, objectives)


# -- metrics and alerts --------------------------------------------------------------


def emit_metrics(rep: Report) -> int:
    """Every numeric indicator as a gauge ``ledgerflow.slo.<name>`` (tag ``workflow``),
    and each objective's burn as ``ledgerflow.slo.burn.<objective>``. Returns how many."""
    from ledgerflow import observability

    sent = 0
    for workflow, summary in rep.workflows().items():
        for name, value in summary.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                observability.indicator(name, workflow, float(value))
                sent += 1
        for name, n in summary["outcomes"].items():
            observability.indicator(f"runs_{name}", workflow, float(n))
            sent += 1
    for o in rep.objectives:
        if o.burn is not None and math.isfinite(o.burn):
            observability.indicator(f"burn.{o.name}", o.workflow, o.burn)
            sent += 1
    return sent


Notifier = Callable[[Objective, str], None]
"""``notify(objective, previous_state)``: called once when an objective enters
``burning`` or ``breached``."""


def log_notifier(objective: Objective, previous: str) -> None:
    from ledgerflow import observability

    log.warning("SLO %s (was %s): %s", objective.state, previous, objective.describe())
    observability.slo_alert(objective.workflow, objective.name, objective.state)


def check_alerts(
    ledger: Ledger,
    objectives: Iterable[Objective],
    notifiers: Iterable[Notifier] = (log_notifier,),
    now: datetime | None = None,
) -> list[Objective]:
    """Record each objective's state; notify those that entered a worse state than the
    one recorded (once: a second check finds the state recorded). Returns the notified."""
    from sqlalchemy import select, update

    from ledgerflow.ledger import schema as t
    from ledgerflow.ledger._engine import now as ledger_now

    stamp = now or ledger_now()
    a = t.slo_alerts
    notified: list[Objective] = []
    notifiers = list(notifiers)
    for o in objectives:
        state = "ok" if o.state == "no_data" else o.state
        with ledger.begin() as conn:
            row = conn.execute(
                select(a.c.state).where(a.c.workflow == o.workflow, a.c.objective == o.name)
            ).first()
            if row is None:
                written = conn.execute(
                    ledger._insert(a)
                    .values(
                        workflow=o.workflow,
                        objective=o.name,
                        state=state,
                        since=stamp,
                        detail=o.describe(),
                        updated_at=stamp,
                    )
                    .on_conflict_do_nothing()
                ).rowcount
                previous = "ok"
            elif row.state != state:
                previous = row.state
                written = conn.execute(
                    update(a)
                    .where(
                        a.c.workflow == o.workflow,
                        a.c.objective == o.name,
                        a.c.state == previous,
                    )
                    .values(state=state, since=stamp, detail=o.describe(), updated_at=stamp)
                ).rowcount
            else:
                conn.execute(
                    update(a)
                    .where(a.c.workflow == o.workflow, a.c.objective == o.name)
                    .values(detail=o.describe(), updated_at=stamp)
                )
                continue
        if not written:
            continue  # another check recorded it first (and notified)
        if _RANK[state] > _RANK[previous]:
            notified.append(o)
            for notify in notifiers:
                try:
                    notify(o, previous)
                except Exception:
                    log.exception("an SLO notifier failed for %s", o.describe())
        elif state == "ok":
            log.info("SLO recovered (was %s): %s", previous, o.describe())
    return notified


def alert_states(ledger: Ledger) -> list[dict[str, Any]]:
    from sqlalchemy import select

    from ledgerflow.ledger import schema as t

    with ledger.engine.connect() as conn:
        rows = conn.execute(select(t.slo_alerts).order_by(t.slo_alerts.c.workflow)).mappings()
        return [dict(r) for r in rows]


def shown_pct(value: float | None, digits: int) -> str:
    """A ratio as a percentage for people (``-``: no data)."""
    return "-" if value is None else f"{value * 100:.{digits}f}%"


def shown_secs(value: float | None, digits: int, *, days: bool) -> str:
    """Seconds as s, m, h (and d with ``days``) for people (``-``: no data)."""
    if value is None:
        return "-"
    if value < 120:
        return f"{value:.{digits}f}s"
    if value < 7200:
        return f"{value / 60:.1f}m"
    if not days or value < 172800:
        return f"{value / 3600:.1f}h"
    return f"{value / 86400:.1f}d"
