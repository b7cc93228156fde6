"""A pending approval in Airflow's Browse -> Required Actions (its human-in-the-loop view).

The approval task writes a ``hitl_detail`` row for its task instance before it defers
(:func:`open_in_airflow`, the Task SDK's ``upsert_hitl_detail``): options Approve/Reject,
the subject, the body and payload the ledger recorded (the approver sees exactly what our
page shows), the approvers as ``assigned_users`` and a link to our page.

The ledger stays the only place where a decision is made. A response given in Airflow is
a *request* to decide, applied by :func:`apply_response` through ``approvals.decide``
(the same conditional update, audit event and NOTIFY as our page, with ``source:
airflow``): whoever is first in the ledger wins, a later response changes nothing and is
recorded as ignored. It reaches us by one of two ways: Airflow's own response route
resumes the deferred task with the response as its event (``ApprovalOperator.resume``),
or, when the task was not deferred yet, the approval trigger finds it on its next look
(``read_response``). A decision made elsewhere (our page, the CLI, the deadline) closes
the Airflow entry: :func:`close_in_session` from the api-server, :func:`close_from_trigger`
from the triggerer.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

OPTIONS = {"approved": "Approve", "rejected": "Reject"}
DECISION_OF_OPTION = {v: k for k, v in OPTIONS.items()}
# An approval whose approvers Airflow cannot name (roles under an auth manager that cannot
# list its users) is assigned to this id, which no user has: Airflow refuses every
# response with 403 ("not a respondent") and the entry points to our page instead.
NOBODY = {"id": "ledgerflow:decide-on-the-ledgerflow-page", "name": "Ledgerflow approvers"}
SOURCE = "airflow"


def _users_with_roles(roles: list[str]) -> list[str] | None:
    """Users holding one of ``roles`` when the auth manager can list them from its
    configuration (SimpleAuthManager); None when it cannot (FAB, Keycloak...)."""
    try:
        from airflow.api_fastapi.app import get_auth_manager_cls

        get_users = getattr(get_auth_manager_cls(), "get_users", None)
        if not callable(get_users):
            return None
        wanted = {r.lower() for r in roles}
        return [u.username for u in get_users() if str(getattr(u, "role", "")).lower() in wanted]
    except Exception:
        return None


def roles_of(name: str) -> set[str]:
    """The roles of ``name`` when the auth manager can tell outside the api-server."""
    try:
        from airflow.api_fastapi.app import get_auth_manager_cls

        get_users = getattr(get_auth_manager_cls(), "get_users", None)
        if callable(get_users):
            return {str(u.role) for u in get_users() if u.username == name and u.role}
    except Exception:
        pass
    return set()


def assigned_users(approvers: dict[str, list[str]]) -> list[dict[str, str]]:
    """Airflow's respondents for our approvers: the named users, and the holders of the
    named roles when the auth manager can list them. Airflow matches a respondent by
    ``user.get_id()``; SimpleAuthManager's id is the user name, which is what our
    approvers list holds (FAB's ids are numbers: nobody matches, use our page)."""
    names = list(dict.fromkeys(approvers.get("users", [])))
    roles = list(approvers.get("roles", []))
    if roles:
        holders = _users_with_roles(roles)
        names += [n for n in holders or [] if n not in names]
    return [{"id": n, "name": n} for n in names] or [dict(NOBODY)]


def body_of(approval: Any) -> str:
    """What the approver reads in Airflow: the ledger's body and payload, and our page."""
    from ledgerflow.ledger.store import dumps
    from ledgerflow.links import approval_page

    payload = dumps(approval.payload)
    return (
        f"{approval.body}\n\n**Payload** (sha256 `{approval.payload_hash[:12]}`):\n\n"
        f"```json\n{payload}\n```\n\n"
        f"Ledgerflow approval {approval.id} (workflow `{approval.workflow}` "
        f"v{approval.version}): [open it in Ledgerflow]({approval_page(approval.id)}). "
        "A decision here is recorded in the Ledgerflow ledger; if one was made there "
        "first, that one stands."
    )


def open_in_airflow(ti_id: Any, approval: Any) -> bool:
    """Write (or find again) the task instance's Required Actions entry, from the task
    before it defers. Never stops the approval: on any error it logs and returns False."""
    try:
        from airflow.sdk import Param
        from airflow.sdk.execution_time.hitl import upsert_hitl_detail

        comment = Param(
            "",
            type=["string", "null"],
            description="Comment, recorded with the decision in the Ledgerflow ledger",
        )
        upsert_hitl_detail(
            ti_id=ti_id,
            options=list(OPTIONS.values()),
            subject=approval.subject,
            body=body_of(approval),
            defaults=None,
            multiple=False,
            params={"comment": comment.serialize()},
            assigned_users=assigned_users(approval.approvers),  # type: ignore[arg-type]
        )
        return True
    except Exception as exc:
        log.warning("approval %s: not listed in Airflow's Required Actions: %s", approval.id, exc)
        return False


def apply(ledger: Any, approval: Any, response: Any) -> tuple[str, Any]:
    """Apply Airflow's ``response`` (the resume event, or the Task SDK's response the
    trigger read) to the ledger: :func:`apply_response` with its fields and identity."""
    chosen, by, comment = response_fields(response)
    outcome, current = apply_response(
        ledger,
        approval,
        chosen=chosen,
        responder=by,
        comment=comment,
        responded_at=responded_at(response),
    )
    log.info("approval %s: response from Airflow by %s (%s): %s", approval.id, by, chosen, outcome)
    return outcome, current


def apply_response(
    ledger: Any,
    approval: Any,
    *,
    chosen: list[str],
    responder: str | None,
    comment: str | None,
    responded_at: Any = None,
) -> tuple[str, Any]:
    """Apply a response given in Airflow to the ledger; returns (what happened, approval):
    ``decided`` (this response is the decision), ``partial`` (one decision of a quorum,
    recorded; the approval still waits), ``late`` (the ledger was decided first: it
    stands), ``refused`` (not an approver now, not a decision, or this person decided
    before).

    ``responded_at`` (when Airflow stored the response) makes it applied once: the
    resumed task and the trigger's look may both bring the same response, and the second
    gets the first's outcome without recording anything (``ledger.responses``)."""
    from ledgerflow.ledger import approvals, responses

    at = responses.stamp(responded_at)
    if at is None:
        current = approvals.get(ledger, approval.id)
        return _apply(ledger, current, chosen, responder, comment, None, None)
    with responses.turn(ledger, approval.id) as conn:
        current = approvals.get(ledger, approval.id, conn)
        seen = responses.applied(conn, current.run_id, current.step_key, current.id, responder, at)
        if seen is not None:
            log.info(
                "approval %s: %s's response of %s was applied: %s", approval.id, responder, at, seen
            )
            return seen, current
        return _apply(ledger, current, chosen, responder, comment, at, conn)


def _apply(
    ledger: Any,
    current: Any,
    chosen: list[str],
    responder: str | None,
    comment: str | None,
    at: str | None,
    conn: Any,
) -> tuple[str, Any]:
    """``apply_response`` for a response not applied before (``current``: the approval as
    it is now, read in ``conn``, the caller's transaction, when given)."""
    from ledgerflow.errors import DecidedBefore
    from ledgerflow.ledger import approvals
    from ledgerflow.ledger.responses import KIND_OF_OUTCOME

    option = chosen[0] if len(chosen) == 1 else None
    decision = DECISION_OF_OPTION.get(option or "")
    data = {"approval_id": current.id, "source": SOURCE, "by": responder, "chosen": chosen}
    if at is not None:
        data["responded_at"] = at

    def recorded(outcome: str, approval: Any) -> tuple[str, Any]:
        kind = KIND_OF_OUTCOME[outcome]
        ledger.record_event(approval.run_id, approval.step_key, kind, data, conn=conn)
        return outcome, approval

    if not current.pending:
        return recorded("late", current)
    if (
        responder is None
        or decision is None
        or not current.may_decide(responder, roles_of(responder))
    ):
        return recorded("refused", current)
    try:
        decided = approvals.decide(
            ledger,
            current.id,
            decision=decision,
            by=responder,
            comment=comment or None,
            seen_hash=current.payload_hash,  # Airflow showed the ledger's payload
            source=SOURCE,
            responded_at=at,
            conn=conn,
        )
    except DecidedBefore:
        data["reason"] = "decided before"
        return recorded("refused", current)
    except approvals.ApprovalConflict:
        return recorded("late", approvals.get(ledger, current.id, conn))
    return ("partial" if decided.pending else "decided"), decided


def response_fields(event: Any) -> tuple[list[str], str | None, str | None]:
    """(chosen options, responder name, comment) of Airflow's response, from its resume
    event (a dict) or the Task SDK's ``HITLDetailResponse``."""
    user = _field(event, "responded_by_user")
    params = _field(event, "params_input") or {}
    comment = params.get("comment") if isinstance(params, dict) else None
    name = _field(user, "name") if user is not None else None
    return list(_field(event, "chosen_options") or []), name, comment


def responded_at(event: Any) -> Any:
    """When Airflow stored the response (its identity with the responder), either shape."""
    return _field(event, "responded_at")


def _field(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)


def is_response(event: Any) -> bool:
    return isinstance(event, dict) and "chosen_options" in event


def read_response(ti_id: Any) -> Any:
    """Airflow's response to the task instance's entry, or None (none yet, or no entry)."""
    from airflow.sdk.execution_time.hitl import get_hitl_detail_content_detail

    try:
        resp = get_hitl_detail_content_detail(ti_id=ti_id)
    except Exception as exc:
        log.debug("no Required Actions entry for %s: %s", ti_id, exc)
        return None
    # ``dag.test()``'s in-process comms answer nothing at all (no entry to read).
    if resp is None or not resp.response_received or not resp.chosen_options:
        return None
    return resp


def close_from_trigger(ti_id: Any, approval: Any) -> None:
    """Record the ledger's decision as the entry's response (from the triggerer, through
    the Task SDK), so Airflow stops listing it; Airflow answers 409 when it has one."""
    from airflow.sdk.execution_time.hitl import update_hitl_detail_response

    option = OPTIONS.get(approval.status)
    if option is None or read_response(ti_id) is not None:
        return
    try:
        update_hitl_detail_response(
            ti_id=ti_id, chosen_options=[option], params_input={"comment": approval.comment}
        )
    except Exception as exc:
        log.info("approval %s: Required Actions entry not closed: %s", approval.id, exc)


def close_in_session(session: Any, ti_id: Any, approval: Any) -> bool:
    """Record the ledger's decision as the entry's response in Airflow's database (the
    api-server, in the session that holds the task instance's lock, as Airflow's own
    response route does): Airflow stops listing it, and a later response there gets 409."""
    from airflow.models.hitl import HITLDetail
    from sqlalchemy import select

    option = OPTIONS.get(approval.status)
    if option is None:
        return False
    detail = session.scalar(
        select(HITLDetail).where(HITLDetail.ti_id == ti_id).with_for_update(of=HITLDetail)
    )
    if detail is None or detail.responded_at is not None:
        return False
    detail.responded_by = {"id": approval.decided_by, "name": approval.decided_by}
    detail.responded_at = approval.decided_at
    detail.chosen_options = [option]
    detail.params_input = {"comment": approval.comment}
    session.add(detail)
    return True
