"""Benchmark: time to parse 200 generated workflow files in one dags folder.

Target: <= 10 s for 200 Ledgerflow workflow versions (YAML + the two-line shim ``v1.py``).

It is measured the way Airflow's dag-processor does it: a fresh subprocess (own
``AIRFLOW_HOME``, examples off) builds ``BundleDagBag`` over the folder and serializes
every DAG with ``DagSerialization.to_dict``. Only the DagBag fill and the serialization
are timed, not interpreter start or the import of Airflow itself. The baseline is a
folder of 200 plain Airflow DAG files of the same shape (same tasks, dependencies,
params, retries, mapped fan-out), parsed the same way in the same script, interleaved.

Also measured: what the first import of ``ledgerflow`` costs (DAG files import it), in a
bare interpreter and in a process that already has Airflow loaded, like a parser.

The last line is ``parse_s_per_200=<median seconds for the Ledgerflow folder>``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import (  # bench/ is on sys.path when run as a script
    RESULTS,
    finish,
    logger,
)

TARGET_S = 10.0

# Imported before the clock starts in the child: a dag-processor has Airflow loaded.
AIRFLOW_PRELUDE = (
    "from airflow.dag_processing.dagbag import BundleDagBag",
    "from airflow.serialization.serialized_objects import DagSerialization",
)


log = logger("parse", clock=False)


# -- the shape shared by both folders ---------------------------------------------


def workflow_shape(index: int) -> dict[str, Any]:
    """6-10 steps: a diamond, a chain, a for_each fan-out, a ``when`` and a final step."""
    n_steps = 6 + index % 5
    extra = n_steps - 6
    steps: list[dict[str, Any]] = [
        {
            "id": "start",
            "needs": [],
            "value": "{{ params.order_id }}",
            "idem": {"key": "{{ params.order_id }}"},
        },
        {
            "id": "validate",
            "needs": ["start"],
            "value": "{{ steps.start.output.value }}-checked",
            "idem": "natural",
            "retry": {"max_attempts": 5, "initial": "2s", "non_retryable": ["ValueError"]},
        },
        {
            "id": "price",
            "needs": ["start"],
            "value": "{{ steps.start.output.value }}:{{ params.amount }}",
            "idem": {"key": "{{ params.order_id }}-price"},
        },
    ]
    previous = "price"
    for k in range(1, extra + 1):
        step_id = f"enrich_{k}"
        steps.append(
            {
                "id": step_id,
                "needs": [previous],
                "value": f"{{{{ steps.{previous}.output.value }}}}+{k}",
                "idem": "natural" if k % 2 else {"key": f"{{{{ params.order_id }}}}-e{k}"},
                "retry": {"max_attempts": 2 + k, "initial": "1s"} if k % 2 == 0 else None,
            }
        )
        previous = step_id
    steps += [
        {
            "id": "fan_out",
            "needs": ["validate", previous],
            "for_each": "params.items",
            "value": "{{ item }}@{{ index }}",
            "idem": {"key": "{{ params.order_id }}-{{ index }}"},
        },
        {
            "id": "notify",
            "needs": ["fan_out"],
            "when": "params.notify and steps.validate.output.value != ''",
            "value": "{{ steps.fan_out.output | length }} items for {{ params.order_id }}",
            "idem": {"key": "{{ params.order_id }}-notify"},
        },
        {
            "id": "finish",
            "needs": ["notify", "validate"],
            "value": "{{ run.id }}",
            "idem": "natural",
            "timeout": "30s",
        },
    ]
    return {"name": f"wf_{index:03d}", "index": index, "steps": steps}


def _q(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid YAML double-quoted scalar


def workflow_yaml(shape: dict[str, Any]) -> str:
    lines = [
        f"name: {shape['name']}",
        "version: 1",
        "description: |",
        f"  Generated benchmark workflow {shape['index']}: a diamond, a chain of enrich steps,",
        "  a for_each fan-out and a conditional notification, all on demo.noop.",
        "owner: bench-team",
        "tags: [bench, generated]",
        "params:",
        '  order_id: {type: string, required: true, description: "Business key"}',
        "  amount: {type: number, default: 10.5}",
        "  notify: {type: boolean, default: true}",
        "  items: {type: array, default: [a, b, c]}",
        "  tier: {type: string, default: gold, enum: [gold, silver, bronze]}",
        "defaults:",
        "  retry: {max_attempts: 3, backoff: {initial: 1s, multiplier: 2, max: 30s}, jitter: full}",
        "  timeout: 5m",
        "steps:",
    ]
    for step in shape["steps"]:
        lines.append(f"  - id: {step['id']}")
        if step["needs"]:
            lines.append(f"    needs: [{', '.join(step['needs'])}]")
        lines.append("    tool: demo.noop")
        if step.get("for_each"):
            lines.append(f"    for_each: {_q(step['for_each'])}")
        if step.get("when"):
            lines.append(f"    when: {_q(step['when'])}")
        lines.append(f"    args: {{value: {_q(step['value'])}}}")
        idem = step["idem"]
        if isinstance(idem, dict):
            lines.append(f"    idempotency: {{key: {_q(idem['key'])}}}")
        else:
            lines.append(f"    idempotency: {idem}")
        retry = step.get("retry")
        if retry:
            extra = ""
            if retry.get("non_retryable"):
                extra = f", non_retryable: [{', '.join(retry['non_retryable'])}]"
            lines.append(
                f"    retry: {{max_attempts: {retry['max_attempts']}, "
                f"backoff: {{initial: {retry['initial']}, multiplier: 2, max: 1m}}{extra}}}"
            )
        if step.get("timeout"):
            lines.append(f"    timeout: {step['timeout']}")
    return "\n".join(lines) + "\n"


def baseline_py(shape: dict[str, Any]) -> str:
    """A hand-written-style plain Airflow DAG with the same tasks and dependencies."""
    dag_id = f"bl_{shape['index']:03d}"
    out = [
        f'"""Plain Airflow DAG {dag_id}: the same shape as workflow {shape["name"]}."""',
        "",
        "from __future__ import annotations",
        "",
        "from datetime import timedelta",
        "",
        "import pendulum",
        "from airflow.providers.standard.operators.python import PythonOperator",
        "from airflow.sdk import DAG, Param",
        "",
        "",
        "def _run(value=None, **_):",
        '    return {"value": value}',
        "",
        "",
        "def _items(**context):",
        '    return [[item] for item in context["params"]["items"]]',
        "",
        "",
        "with DAG(",
        f'    dag_id="{dag_id}",',
        f'    description="Generated benchmark workflow {shape["index"]}",',
        "    schedule=None,",
        '    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),',
        "    catchup=False,",
        '    tags=["bench", "generated", "plain"],',
        f'    doc_md="## {dag_id}\\n\\nA diamond, a chain, a fan-out and a notification.",',
        "    params={",
        '        "order_id": Param(type="string", description="Business key"),',
        '        "amount": Param(10.5, type=["number", "null"]),',
        '        "notify": Param(True, type=["boolean", "null"]),',
        '        "items": Param(["a", "b", "c"], type=["array", "null"]),',
        '        "tier": Param("gold", type=["string", "null"], enum=["gold", "silver", "bronze"]),',
        "    },",
        '    default_args={"owner": "bench-team"},',
        "    max_active_runs=16,",
        "):",
    ]
    for step in shape["steps"]:
        retry = step.get("retry") or {"max_attempts": 3, "initial": "1s"}
        retries = retry["max_attempts"] - 1
        delay = int(retry["initial"].rstrip("s"))
        timeout = "timedelta(seconds=30)" if step.get("timeout") else "timedelta(minutes=5)"
        rule = "none_failed_min_one_success" if step["needs"] else "all_success"
        common = (
            f"retries={retries}, retry_delay=timedelta(seconds={delay}), "
            f'execution_timeout={timeout}, doc_md="step {step["id"]}"'
        )
        value = json.dumps(step["value"])
        if step.get("for_each"):
            out += [
                f"    {step['id']}__items = PythonOperator(",
                f'        task_id="{step["id"]}__items", python_callable=_items, trigger_rule="{rule}"',
                "    )",
                f"    {step['id']} = PythonOperator.partial(",
                f'        task_id="{step["id"]}", python_callable=_run, {common}',
                f"    ).expand(op_args={step['id']}__items.output)",
            ]
        else:
            out += [
                f"    {step['id']} = PythonOperator(",
                f'        task_id="{step["id"]}",',
                "        python_callable=_run,",
                f'        op_kwargs={{"value": {value}}},',
                f'        trigger_rule="{rule}",',
                f"        {common},",
                "    )",
            ]
    for step in shape["steps"]:
        head = f"{step['id']}__items" if step.get("for_each") else step["id"]
        for need in step["needs"]:
            out.append(f"    {need} >> {head}")
    return "\n".join(out) + "\n"


def generate(root: Path, count: int) -> tuple[Path, Path]:
    from ledgerflow.cli import SHIM

    lf = root / "ledgerflow_dags"
    bl = root / "plain_dags"
    for i in range(count):
        shape = workflow_shape(i)
        folder = lf / "workflows" / shape["name"]
        folder.mkdir(parents=True)
        (folder / "v1.yaml").write_text(workflow_yaml(shape))
        (folder / "v1.py").write_text(SHIM)
        target = bl / "dags" / f"bl_{i:03d}.py"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(baseline_py(shape))
    return lf, bl


# -- the child: one parse of one folder --------------------------------------------


def child_parse(folder: str) -> None:
    t_import = time.perf_counter()
    from airflow.dag_processing.dagbag import BundleDagBag
    from airflow.serialization.serialized_objects import DagSerialization

    c0 = time.process_time()
    t0 = time.perf_counter()
    bag = BundleDagBag(dag_folder=folder, bundle_path=Path(folder), bundle_name="bench")
    t1 = time.perf_counter()
    sizes = []
    for dag in bag.dags.values():
        sizes.append(len(json.dumps(DagSerialization.to_dict(dag), default=str)))
    t2 = time.perf_counter()
    cpu = time.process_time() - c0
    stats = sorted(bag.dagbag_stats, key=lambda s: s.file)
    durations = [s.duration.total_seconds() for s in stats]
    print(
        json.dumps(
            {
                "airflow_import_s": t0 - t_import,
                "fill_s": t1 - t0,
                "serialize_s": t2 - t1,
                "total_s": t2 - t0,
                "cpu_s": cpu,
                "dags": len(bag.dags),
                "tasks": sum(len(d.tasks) for d in bag.dags.values()),
                "import_errors": {k: v[-2000:] for k, v in bag.import_errors.items()},
                "file_durations_s": durations,
                # The slowest file is the one parsed first: it pays the one-time imports.
                "slowest_file_s": max(durations) if durations else None,
                "serialized_bytes_mean": statistics.mean(sizes) if sizes else 0,
                "ledgerflow_loaded": "ledgerflow" in sys.modules,
            }
        )
    )


def child_import(yaml_a: str, yaml_b: str) -> None:
    """The one-time cost a parser pays for the first Ledgerflow DAG file."""
    for line in AIRFLOW_PRELUDE:
        exec(line, {})
    before = set(sys.modules)
    t0 = time.perf_counter()
    from ledgerflow import dag_for_spec_file

    t1 = time.perf_counter()
    dag_for_spec_file(str(Path(yaml_a).with_suffix(".py")))
    t2 = time.perf_counter()
    dag_for_spec_file(str(Path(yaml_b).with_suffix(".py")))
    t3 = time.perf_counter()
    new = sorted(set(sys.modules) - before)
    tops = sorted({m.split(".")[0] for m in new})
    print(
        json.dumps(
            {
                "import_s": t1 - t0,
                "first_build_s": t2 - t1,
                "second_build_s": t3 - t2,
                "new_modules": len(new),
                "new_top_packages": tops,
            }
        )
    )


# -- the parent --------------------------------------------------------------------


def child_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(home / "dags"),
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.pop("AIRFLOW_CONN_LEDGERFLOW_DB", None)
    return env


def run_child(args: list[str], home: Path, extra: list[str] | None = None) -> dict[str, Any]:
    cmd = [sys.executable, *(extra or []), str(Path(__file__).resolve()), *args]
    proc = subprocess.run(cmd, env=child_env(home), capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"child {args} failed with exit code {proc.returncode}")
    result: dict[str, Any] = json.loads(lines[-1])
    result["_stderr"] = proc.stderr
    return result


def parse_once(kind: str, folder: Path, home: Path, expected: int) -> dict[str, Any]:
    result = run_child(["--child-parse", str(folder)], home)
    result.pop("_stderr", None)
    errors = result["import_errors"]
    if errors:
        first = next(iter(errors.items()))
        raise SystemExit(f"{kind}: {len(errors)} import errors, first: {first[0]}\n{first[1]}")
    if result["dags"] != expected:
        raise SystemExit(f"{kind}: expected {expected} DAGs, got {result['dags']}")
    return result


IMPORTTIME = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)")


def importtime_top(home: Path, yaml_a: str) -> dict[str, Any]:
    """``python -X importtime`` of the Ledgerflow imports on top of Airflow's."""
    code = "; ".join(
        [
            *AIRFLOW_PRELUDE,
            "import sys; sys.stderr.write('--- ledgerflow ---\\n')",
            "from ledgerflow import dag_for_spec_file",
            f"dag_for_spec_file({str(Path(yaml_a).with_suffix('.py'))!r})",
        ]
    )
    bare = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import ledgerflow"],
        env=child_env(home),
        capture_output=True,
        text=True,
        check=True,
    )
    bare_us = sum(int(m.group(1)) for m in IMPORTTIME.finditer(bare.stderr))
    full = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        env=child_env(home),
        capture_output=True,
        text=True,
        check=True,
    )
    tail = full.stderr.split("--- ledgerflow ---", 1)[1]
    rows = [
        (int(m.group(1)), int(m.group(2)), len(m.group(3)), m.group(4))
        for m in IMPORTTIME.finditer(tail)
    ]
    total_us = sum(r[0] for r in rows)
    # Packages imported at depth 0 (what the Ledgerflow code imports directly or lazily).
    top = sorted((r for r in rows if r[2] <= 1), key=lambda r: -r[1])[:10]
    return {
        "bare_import_ledgerflow_ms": bare_us / 1000,
        "after_airflow_total_ms": total_us / 1000,
        "after_airflow_top": [{"module": r[3], "cumulative_ms": r[1] / 1000} for r in top],
    }


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Time Airflow parsing (BundleDagBag + DAG serialization) of N generated "
        "Ledgerflow workflow files against N plain Airflow DAG files of the same shape.",
    )
    parser.add_argument("--files", type=int, default=200, help="workflow files (default 200)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="timed rounds per folder, interleaved (default 3)"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed rounds per folder first (warm page cache and .pyc, default 1)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the generated folders")
    parser.add_argument(
        "--json", type=Path, default=RESULTS / "parse.json", help="where to write the results"
    )
    parser.add_argument("--child-parse", metavar="FOLDER", help=argparse.SUPPRESS)
    parser.add_argument("--child-import", nargs=2, metavar="YAML", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_parse:
        child_parse(args.child_parse)
        return 0
    if args.child_import:
        child_import(*args.child_import)
        return 0
    if args.rounds < 1 or args.files < 1:
        parser.error("--rounds and --files must be >= 1")

    root = Path(tempfile.mkdtemp(prefix="lf_bench_parse_"))
    home = root / "airflow_home"
    (home / "dags").mkdir(parents=True)
    try:
        log(f"generating {args.files} workflow versions + {args.files} plain DAG files in {root}")
        lf, bl = generate(root, args.files)

        log("one-time cost of importing ledgerflow")
        a = lf / "workflows" / "wf_000" / "v1.yaml"
        b = lf / "workflows" / "wf_001" / "v1.yaml"
        first_import = [
            run_child(["--child-import", str(a), str(b)], home) for _ in range(args.rounds)
        ]
        for item in first_import:
            item.pop("_stderr", None)
        importtime = importtime_top(home, str(a))

        folders = {"ledgerflow": lf, "plain": bl}
        for w in range(args.warmup):
            for kind, folder in folders.items():
                log(f"warm-up {w + 1}/{args.warmup}: {kind}")
                parse_once(kind, folder, home, args.files)
        runs: dict[str, list[dict[str, Any]]] = {"ledgerflow": [], "plain": []}
        for r in range(args.rounds):
            order = ["ledgerflow", "plain"] if r % 2 == 0 else ["plain", "ledgerflow"]
            for kind in order:
                result = parse_once(kind, folders[kind], home, args.files)
                runs[kind].append(result)
                log(
                    f"round {r + 1}/{args.rounds} {kind:10s} total {result['total_s']:.2f} s "
                    f"(fill {result['fill_s']:.2f} + serialize {result['serialize_s']:.2f})"
                )
    finally:
        if args.keep:
            log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    summary: dict[str, Any] = {}
    for kind, items in runs.items():
        total = statistics.median(i["total_s"] for i in items)
        per_file = [d for i in items for d in i["file_durations_s"]]
        summary[kind] = {
            "total_s_median": total,
            "fill_s_median": statistics.median(i["fill_s"] for i in items),
            "serialize_s_median": statistics.median(i["serialize_s"] for i in items),
            "cpu_s_median": statistics.median(i["cpu_s"] for i in items),
            "per_file_ms": 1000 * total / args.files,
            "file_import_ms_p50": 1000 * pct(per_file, 50),
            "file_import_ms_p90": 1000 * pct(per_file, 90),
            "slowest_file_ms_median": 1000 * statistics.median(i["slowest_file_s"] for i in items),
            "tasks": items[0]["tasks"],
            "serialized_kb_mean": items[0]["serialized_bytes_mean"] / 1024,
            "airflow_import_s_median": statistics.median(i["airflow_import_s"] for i in items),
            "rounds_total_s": [i["total_s"] for i in items],
        }
    lfs, bls = summary["ledgerflow"], summary["plain"]
    ratio = lfs["total_s_median"] / bls["total_s_median"]
    scaled = lfs["total_s_median"] * 200 / args.files
    imp = {
        "import_ms_median": 1000 * statistics.median(i["import_s"] for i in first_import),
        "first_build_ms_median": 1000 * statistics.median(i["first_build_s"] for i in first_import),
        "second_build_ms_median": 1000
        * statistics.median(i["second_build_s"] for i in first_import),
        "new_modules": first_import[0]["new_modules"],
        "new_top_packages": first_import[0]["new_top_packages"],
        **importtime,
    }
    imp["one_time_ms"] = (
        imp["import_ms_median"] + imp["first_build_ms_median"] - imp["second_build_ms_median"]
    )

    print(f"parse benchmark: {args.files} files, {args.rounds} interleaved rounds (medians)")
    print(
        f"{'':12s} {'total s':>8s} {'fill s':>8s} {'serial s':>8s} {'CPU s':>8s} "
        f"{'ms/file':>8s} {'tasks':>6s}"
    )
    for kind, s in (("ledgerflow", lfs), ("plain", bls)):
        print(
            f"{kind:12s} {s['total_s_median']:8.2f} {s['fill_s_median']:8.2f} "
            f"{s['serialize_s_median']:8.2f} {s['cpu_s_median']:8.2f} {s['per_file_ms']:8.1f} "
            f"{s['tasks']:6d}"
        )
    print(
        f"per-file import (DagBag's own stats) p50/p90: ledgerflow "
        f"{lfs['file_import_ms_p50']:.1f}/{lfs['file_import_ms_p90']:.1f} ms, plain "
        f"{bls['file_import_ms_p50']:.1f}/{bls['file_import_ms_p90']:.1f} ms; slowest file "
        f"(the first parsed, pays one-time imports) {lfs['slowest_file_ms_median']:.0f} vs "
        f"{bls['slowest_file_ms_median']:.0f} ms"
    )
    print(
        f"ratio ledgerflow/plain: {ratio:.2f}x; target <= {TARGET_S:.0f} s: "
        f"{'met' if lfs['total_s_median'] <= TARGET_S else 'MISSED'}"
    )
    print(
        f"first import of ledgerflow: bare `import ledgerflow` {imp['bare_import_ledgerflow_ms']:.0f} ms; "
        f"after Airflow is loaded: `from ledgerflow import dag_for_spec_file` "
        f"{imp['import_ms_median']:.0f} ms + first DAG {imp['first_build_ms_median']:.0f} ms "
        f"(second DAG {imp['second_build_ms_median']:.0f} ms) -> one-time {imp['one_time_ms']:.0f} ms, "
        f"{imp['new_modules']} new modules"
    )
    print(
        "  heaviest imports after Airflow (-X importtime, cumulative ms): "
        + ", ".join(f"{t['module']} {t['cumulative_ms']:.0f}" for t in imp["after_airflow_top"][:6])
    )
    if os.environ.get("PYTHONDONTWRITEBYTECODE") or sys.dont_write_bytecode:
        print(
            "(PYTHONDONTWRITEBYTECODE is set: no .pyc is written, so the editable ledgerflow "
            "package and every DAG file are compiled from source in each process)"
        )
    print(
        f"(Airflow itself, imported before the clock: {lfs['airflow_import_s_median']:.2f} s per "
        f"child; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)"
    )

    result = {
        "benchmark": "parse",
        "files": args.files,
        "rounds": args.rounds,
        "target_s": TARGET_S,
        "ledgerflow": lfs,
        "plain": bls,
        "ratio": ratio,
        "parse_s_per_200": scaled,
        "first_import": imp,
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "dont_write_bytecode": bool(os.environ.get("PYTHONDONTWRITEBYTECODE")),
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    log(f"results in {args.json}")
    if args.files != 200:
        print(f"(--files {args.files}: the last line is scaled linearly to 200 files)")
    finish(args.json, result, "parse_s_per_200", scaled)
    return 0


if __name__ == "__main__":
    sys.exit(main())
