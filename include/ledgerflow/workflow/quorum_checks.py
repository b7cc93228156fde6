"""The checks of an approval step's quorum (``required``) against its approvers, at
every escalation level (``mode: replace`` hands it to the new approvers alone, ``add``
adds them to the approvers so far)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ledgerflow.spec.models import ApprovalStep, EscalateTo


def check_quorum(
    step: ApprovalStep, loc: tuple[Any, ...], add: Callable[[tuple[Any, ...], str], None]
) -> None:
    """``1 <= required <= the approvers named`` (when only users are named: a role's
    holders are not known before the run), at the step and at each escalation level."""
    required = step.required
    users = list(dict.fromkeys(step.approvers.users))
    roles = bool(step.approvers.roles)
    if not roles and required > len(users):
        add(
            (*loc, "required"),
            f"required: {required} approvals, but the step names only {len(users)} "
            f"approver(s) ({', '.join(users)}); name more users, a role, or lower required",
        )
    where: tuple[Any, ...] = (*loc, "at_deadline")
    outcome: Any = step.at_deadline
    level = 0
    while isinstance(outcome, EscalateTo):
        level += 1
        esc = outcome.escalate
        where = (*where, "escalate")
        new = list(dict.fromkeys(esc.approvers.users))
        if esc.mode == "add":
            users = list(dict.fromkeys([*users, *new]))
            roles = roles or bool(esc.approvers.roles)
        else:
            users, roles = new, bool(esc.approvers.roles)
        if not roles and required > len(users):
            add(
                (*where, "approvers"),
                f"escalation level {level} (mode: {esc.mode}) leaves {len(users)} "
                f"approver(s) ({', '.join(users)}) for required: {required}; name more "
                "users or a role"
                + (", or use mode: add to keep the approvers so far" if esc.mode != "add" else ""),
            )
        where = (*where, "at_deadline")
        outcome = esc.at_deadline
