"""The ``notify:`` field: targets name a notifier kind and a connection; events are checked."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from ledgerflow.errors import SpecErrors
from ledgerflow.spec.notify import EVENTS, routes
from ledgerflow.workflow.validate import load_workflow

HEAD = """\
name: told
version: 1
notify:
{notify}
steps:
  - id: ask
    kind: approval
    subject: hi
    approvers: {{users: [manager]}}
{step_notify}
"""


def load(tmp_path: Path, notify: str, step_notify: str = "") -> object:
    path = tmp_path / "told.yaml"
    path.write_text(
        HEAD.format(
            notify=textwrap.indent(textwrap.dedent(notify), "  "),
            step_notify=textwrap.indent(textwrap.dedent(step_notify), "    "),
        )
    )
    return load_workflow(path)


def problems(tmp_path: Path, notify: str, step_notify: str = "") -> list[str]:
    with pytest.raises(SpecErrors) as info:
        load(tmp_path, notify, step_notify)
    return [str(e) for e in info.value.errors]


def test_an_unquoted_on_is_the_events_and_every_event_is_the_default(tmp_path: Path) -> None:
    """YAML 1.1 reads ``on:`` as true: the target still gets exactly the events listed
    under it; a target without ``on`` gets every event; the routes kept with each run say
    the same."""
    spec = load(
        tmp_path,
        """\
        - kind: smtp
          conn_id: mail
          to: [ops@example.com]
          on: [dead_letter]
        - kind: slack_webhook
          conn_id: chat
        """,
    )
    smtp, slack = spec.notify  # type: ignore[attr-defined]
    assert smtp.on == ("dead_letter",) and smtp.label == "smtp:mail"
    assert slack.on == EVENTS
    kept = routes(spec)
    assert kept is not None and kept["steps"] == {}
    assert [t["on"] for t in kept["workflow"]] == [["dead_letter"], list(EVENTS)]  # type: ignore[index]


def test_an_unknown_event_is_refused_at_its_line(tmp_path: Path) -> None:
    """An event name that does not exist is an error naming the file, its line and the
    field (``notify[0].on[1]``)."""
    found = problems(
        tmp_path,
        """\
        - kind: smtp
          conn_id: mail
          to: [ops@example.com]
          on:
            - dead_letter
            - approval_exploded
        """,
    )
    assert len(found) == 1
    assert "told.yaml:9: notify[0].on[1]" in found[0] and "dead_letter" in found[0]


@pytest.mark.parametrize(
    ("target", "field", "words"),
    [
        ("{kind: smtp, conn_id: mail}", "notify[0]", "needs `to`"),
        ("{kind: slack_webhook, conn_id: chat, to: [a@b.c]}", "notify[0]", "`to` is for smtp"),
        ("{kind: smtp, conn_id: mail, to: [not-an-address]}", "notify[0].to", "not an e-mail"),
        ("{kind: pager, conn_id: p}", "notify[0].kind", "smtp"),
        ("{kind: smtp, conn_id: 'a b', to: [a@b.c]}", "notify[0].conn_id", "pattern"),
        (
            "{kind: smtp, conn_id: m, to: [a@b.c], url: 'http://x'}",
            "notify[0].url",
            "unknown field",
        ),
        ("{kind: smtp, conn_id: m, to: [a@b.c], on: []}", "notify[0].on", "at least 1"),
    ],
)
def test_bad_targets_name_their_field(tmp_path: Path, target: str, field: str, words: str) -> None:
    """A target without recipients, recipients on a webhook, an unknown kind, a
    connection id that is not one, a field the model does not know (a secret or URL in
    the file) or an empty event list: one error naming its line and field."""
    found = problems(tmp_path, f"- {target}\n")
    assert len(found) == 1, found
    assert f"told.yaml:4: {field}" in found[0] and words in found[0], found


def test_an_approval_steps_notify_takes_its_approval_events_only(tmp_path: Path) -> None:
    """An approval step's targets replace the workflow's for its approval events; a
    dead-letter event there is refused (it belongs at the workflow's notify)."""
    spec = load(
        tmp_path,
        "[]\n",
        """\
        notify:
          - {kind: smtp, conn_id: mail, to: [boss@example.com]}
        """,
    )
    kept = routes(spec)
    assert kept is not None and kept["workflow"] == []
    assert list(kept["steps"]) == ["ask"]  # type: ignore[call-overload]
    found = problems(
        tmp_path,
        "[]\n",
        """\
        notify:
          - {kind: smtp, conn_id: mail, to: [boss@example.com], on: [dead_letter]}
        """,
    )
    assert len(found) == 1 and "steps[0].notify" in found[0] and "dead_letter" in found[0]


def test_a_workflow_without_notify_keeps_no_routes(tmp_path: Path) -> None:
    """No target anywhere: nothing is written for its runs (no cost)."""
    assert routes(load(tmp_path, "[]\n")) is None
