"""The step graph of a workflow: its dependency cycle if it has one, and each step's
transitive upstream steps (what its templates may read)."""

from __future__ import annotations

from ledgerflow.spec.models import WorkflowSpec


def find_cycle(spec: WorkflowSpec) -> list[str] | None:
    """A dependency cycle of ``needs`` as the step ids along it (first = last), or None."""
    needs = {s.id: list(s.needs) for s in spec.steps}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in needs[node]:
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for step in spec.steps:
        if step.id not in state:
            found = visit(step.id)
            if found:
                return list(reversed(found))
    return None


def ancestors(spec: WorkflowSpec) -> dict[str, set[str]]:
    """Every step's transitive ``needs`` (the graph must be acyclic)."""
    needs = {s.id: set(s.needs) for s in spec.steps}
    memo: dict[str, set[str]] = {}

    def up(node: str) -> set[str]:
        if node not in memo:
            memo[node] = set()
            acc: set[str] = set()
            for parent in needs[node]:
                acc |= {parent} | up(parent)
            memo[node] = acc
        return memo[node]

    return {s.id: up(s.id) for s in spec.steps}
