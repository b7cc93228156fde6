"""Hostile workflow files are refused cheaply: a typed ``file:line`` error, no traceback.

The DAG loader reads files the same way as ``ledgerflow validate``, so a file that costs
seconds or gigabytes here stalls the dag-processor for every workflow. The worst cases
run ``ledgerflow validate`` in a child process with its memory capped and a time limit:
before the loader bounded aliases and nesting, a "billion laughs" file under 0.5 KB ran
past the limit (2.8-5.1 GB), and deep nesting or a recursive alias ended in a
``RecursionError`` traceback. A property test then throws generated hostile files at the
loader in this process.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledgerflow.errors import SpecError
from ledgerflow.spec.loader import MAX_DEPTH, MAX_FILE_BYTES, MAX_VALUES, parse_spec

HEADER = "name: hostile\nversion: 1\n"


def laughs(levels: int, fanout: int) -> str:
    """Each level lists the previous one ``fanout`` times: fanout**levels values."""
    lines = [HEADER + 'l0: &l0 "lol"']
    for n in range(1, levels + 1):
        lines.append(f"l{n}: &l{n} [" + ", ".join([f"*l{n - 1}"] * fanout) + "]")
    lines.append(f"steps: *l{levels}")
    return "\n".join(lines) + "\n"


HOSTILE = {
    # 9**9 (387 million) strings from 450 bytes
    "billion_laughs": (laughs(9, 9), "values once aliases are expanded", None),
    "deep_list": (HEADER + "steps: " + "[" * 10_000 + "]" * 10_000 + "\n", "nested more", 3),
    "deep_mapping": (
        HEADER + "steps: " + "{a: " * 5_000 + "1" + "}" * 5_000 + "\n",
        "nested more",
        3,
    ),
    "recursive_alias": (HEADER + "steps: &s [1, *s]\n", "recursive alias", 3),
}


def limit_memory() -> None:  # in the child, before it starts Python
    cap = 1536 * 1024 * 1024  # far above what validating a file needs, far below a bomb
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_validate_refuses_a_hostile_file_with_its_line_and_no_traceback(
    tmp_path: Path, case: str
) -> None:
    text, fragment, line = HOSTILE[case]
    path = tmp_path / "workflows" / "hostile" / "v1.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(text, encoding="utf-8")
    validate = "from ledgerflow.cli import main; raise SystemExit(main())"
    proc = subprocess.run(
        [sys.executable, "-c", validate, "validate", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=limit_memory,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-2000:]
    assert "Traceback" not in output, output[-2000:]
    assert fragment in output, output[-2000:]
    where = f"{path}:{line}:" if line else f"{path}:"
    assert where in output, output[-2000:]


def test_a_file_over_the_size_limit_is_refused_before_it_is_parsed() -> None:
    text = HEADER + "description: " + "x" * MAX_FILE_BYTES + "\n"
    with pytest.raises(SpecError, match="bytes; a workflow file may have at most"):
        parse_spec(text, "big.yaml")


def test_a_set_tag_on_a_scalar_is_a_spec_error_not_a_value_error() -> None:
    """Found by the property test below: the constructor of ``!!set`` raised a raw
    ValueError ("not enough values to unpack") on a scalar."""
    with pytest.raises(SpecError, match=r"set.yaml:3: not valid YAML"):
        parse_spec(HEADER + "steps: !!set '0'\n", "set.yaml")


def test_sharing_a_block_with_an_alias_is_still_allowed() -> None:
    text = (
        HEADER + "defaults: {retry: &retry {max_attempts: 3}}\n"
        "steps:\n"
        "  - {id: a, tool: http, args: {url: 'http://x'}, idempotency: natural, retry: *retry}\n"
        "  - {id: b, tool: http, args: {url: 'http://x'}, idempotency: natural, retry: *retry}\n"
    )
    spec, lines = parse_spec(text, "shared.yaml")
    assert [s.id for s in spec.steps] == ["a", "b"]
    assert lines[("steps", 1, "retry")] == 6  # where the alias is used (step b)


# -- generated hostile files ----------------------------------------------------------

scalars = st.one_of(
    st.text(max_size=20),  # any unicode, control characters included
    st.integers(),
    st.sampled_from(["~", "true", "0x1F", "1e400", ".nan", "'", '"', "&", "*", "!", "%"]),
)
tags = st.sampled_from(
    ["!!python/object/apply:os.system", "!!python/name:os.system", "!!binary", "!foo", "!!set"]
)


@st.composite
def hostile_files(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["laughs", "deep", "tags", "noise", "wide"]))
    if kind == "laughs":
        return laughs(draw(st.integers(2, 14)), draw(st.integers(2, 12)))
    if kind == "deep":
        depth = draw(st.integers(MAX_DEPTH - 2, 3 * MAX_DEPTH))
        opener, closer = draw(st.sampled_from([("[", "]"), ("{a: ", "}")]))
        return HEADER + "steps: " + opener * depth + closer * depth + "\n"
    if kind == "tags":
        return HEADER + f"steps: {draw(tags)} {draw(scalars)!r}\n"
    if kind == "wide":  # many plain values, under the budget or just over it
        count = draw(st.sampled_from([10, MAX_VALUES // 2, MAX_VALUES + 10]))
        return HEADER + "steps: [" + ", ".join(["1"] * count) + "]\n"
    return HEADER + draw(st.text(max_size=400))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_files())
def test_generated_hostile_files_end_in_a_spec_error_or_a_spec(text: str) -> None:
    """Whatever the file, the loader returns a spec or raises SpecError (with the file
    name) - never another exception, and never after building more than the budget."""
    try:
        parse_spec(text, "gen.yaml")
    except SpecError as error:
        problems = getattr(error, "errors", [error])
        assert all(p.file == "gen.yaml" for p in problems), str(error)
