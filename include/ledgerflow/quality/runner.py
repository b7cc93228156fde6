"""Great Expectations does the validating; this module feeds it and reads its answer.

Every validation uses a fresh *ephemeral* GX context: nothing is written to disk unless
Data Docs are asked for, and analytics are off (this engine runs where there may be no
network, and a workflow's data is nobody else's business). SQL datasets are validated
where they live (GX pushes each expectation down as SQL, so a million rows are never
loaded into the worker); a step's output is validated as a pandas DataFrame.

GX and pandas are imported inside the functions: they take seconds to import, and DAG
files (which import the step modules) must parse in milliseconds.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ledgerflow.errors import DatasetError
from ledgerflow.quality.catalog import Expectation

SAMPLE_SIZE = 20
"""Unexpected values kept per failed expectation."""


@dataclass(frozen=True)
class SqlDataset:
    """A table or a query in a SQL database (Postgres, or the SQLite demo ledger)."""

    url: str
    label: str
    table: str | None = None
    query: str | None = None


@dataclass(frozen=True)
class FrameDataset:
    """Records (a list of mappings), columns (a mapping of lists) or one record."""

    data: Any
    label: str


Dataset = SqlDataset | FrameDataset


def validate(
    dataset: Dataset,
    expectations: list[Expectation],
    *,
    data_docs_dir: Path | None = None,
    name: str = "ledgerflow",
) -> dict[str, Any]:
    """Run the expectations; return a JSON-ready report.

    ``{"success", "statistics", "row_count", "failed": [...], "results": [...],
    "duration_ms"}``; each result names its expectation, column, the number and percent
    of unexpected values, a sample of them, the observed value, and GX's error if the
    expectation could not be evaluated (a missing column, say: that counts as failed).
    Raises the driver's error when the database cannot be reached (a retryable failure),
    ``DatasetError`` when the data is not a table.
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx

    started = time.perf_counter()
    context = _context(data_docs_dir)
    suite = gx.ExpectationSuite(name=f"{name}_suite")
    for expectation in expectations:
        suite.add_expectation(expectation.to_gx())
    batch_definition, batch_parameters = _batch_definition(context, dataset)
    result_format = {
        "result_format": "SUMMARY",
        "partial_unexpected_count": SAMPLE_SIZE,
        "include_unexpected_rows": False,
    }
    if data_docs_dir is None:
        batch = batch_definition.get_batch(batch_parameters=batch_parameters)
        validation = batch.validate(suite, result_format=result_format)
    else:
        suite = context.suites.add(suite)
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=name, data=batch_definition, suite=suite)
        )
        checkpoint = context.checkpoints.add(
            gx.Checkpoint(
                name=f"{name}_checkpoint",
                validation_definitions=[definition],
                actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs")],
                result_format=result_format,
            )
        )
        run = checkpoint.run(batch_parameters=batch_parameters)
        validation = next(iter(run.run_results.values()))
    report = _report(validation.to_json_dict(), expectations)
    report["duration_ms"] = int((time.perf_counter() - started) * 1000)
    return report


def _context(data_docs_dir: Path | None) -> Any:
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    if data_docs_dir is not None:
        config.data_docs_sites = {
            "ledgerflow": {
                "class_name": "SiteBuilder",
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(data_docs_dir),
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            }
        }
    return gx.get_context(mode="ephemeral", project_config=config)


def _batch_definition(context: Any, dataset: Dataset) -> tuple[Any, dict[str, Any] | None]:
    if isinstance(dataset, FrameDataset):
        frame = to_frame(dataset.data)
        asset = context.data_sources.add_pandas("output").add_dataframe_asset("rows")
        return asset.add_batch_definition_whole_dataframe("all"), {"dataframe": frame}
    _reachable(dataset.url)
    if dataset.url.startswith("sqlite"):
        source = context.data_sources.add_sqlite("db", connection_string=dataset.url)
    else:
        source = context.data_sources.add_postgres("db", connection_string=dataset.url)
    if dataset.table is not None:
        schema, _, table = dataset.table.rpartition(".")
        extra = {"schema_name": schema} if schema else {}  # deprecated in GX; only when given
        asset = source.add_table_asset("data", table_name=table, **extra)
    else:
        assert dataset.query is not None
        asset = source.add_query_asset("data", query=dataset.query)
    return asset.add_batch_definition_whole_table("all"), None


def _reachable(url: str) -> None:
    """Connect once first: an unreachable database is a retryable failure of the step,
    not a list of expectations that "failed" because GX could not run them."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    finally:
        engine.dispose()


def to_frame(data: Any) -> Any:
    """Records, columns or one record -> a DataFrame (``DatasetError`` otherwise)."""
    import pandas as pd

    if isinstance(data, list) and all(isinstance(row, dict) for row in data):
        return pd.DataFrame.from_records(data)
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        try:
            return pd.DataFrame(data)
        except ValueError as exc:
            raise DatasetError(f"columns of different lengths: {exc}") from None
    if isinstance(data, dict):
        return pd.DataFrame.from_records([data])
    raise DatasetError(
        "a dataset from a step output is a list of records, a mapping of columns or one "
        f"record; got {type(data).__name__}"
    )


def _report(raw: dict[str, Any], expectations: list[Expectation]) -> dict[str, Any]:
    from ledgerflow.ledger.store import dumps, loads

    results: list[dict[str, Any]] = []
    row_count: int | None = None
    for position, item in enumerate(raw["results"]):
        config = item["expectation_config"]
        result = item.get("result") or {}
        error = _error(item.get("exception_info"))
        if "element_count" in result:
            row_count = int(result["element_count"])
        elif config["type"] == "expect_table_row_count_to_be_between" and error is None:
            row_count = int(result.get("observed_value", 0))
        mine = _match(config, expectations, position)
        results.append(
            {
                "expectation": mine.label if mine else config["type"],
                "type": mine.name if mine else config["type"],
                "gx_type": config["type"],
                "column": config["kwargs"].get("column"),
                "success": bool(item["success"]),
                "unexpected_count": result.get("unexpected_count"),
                "unexpected_percent": result.get("unexpected_percent"),
                "sample": result.get("partial_unexpected_list", [])[:SAMPLE_SIZE],
                "observed_value": result.get("observed_value"),
                "error": error,
            }
        )
    failed = [r for r in results if not r["success"]]
    stats = raw["statistics"]
    return loads(
        dumps(
            {
                "success": bool(raw["success"]),
                "statistics": {
                    "evaluated_expectations": stats["evaluated_expectations"],
                    "successful_expectations": stats["successful_expectations"],
                    "unsuccessful_expectations": stats["unsuccessful_expectations"],
                    "success_percent": stats["success_percent"],
                },
                "row_count": row_count,
                "failed": failed,
                "results": results,
            }
        )
    )


def _match(config: dict[str, Any], expectations: list[Expectation], position: int) -> Any:
    """The declared expectation a GX result belongs to (GX may reorder its results)."""
    from ledgerflow.quality.catalog import CATALOG

    kwargs = config["kwargs"]
    for expectation in expectations:
        gx_type = _snake(CATALOG[expectation.name].gx_class)
        if gx_type != config["type"]:
            continue
        mine = expectation.gx_kwargs()
        if all(_same(kwargs.get(k), v) for k, v in mine.items()):
            return expectation
    return expectations[position] if position < len(expectations) else None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, int | float) and isinstance(b, int | float):
        return float(a) == float(b)
    if isinstance(a, list | tuple | set) and isinstance(b, list | tuple | set):
        return sorted(map(str, a)) == sorted(map(str, b))
    return bool(a == b)


def _snake(name: str) -> str:
    import re

    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _error(info: Any) -> str | None:
    """GX's exception info: one dict, or one per metric; the first message raised."""
    if not isinstance(info, dict):
        return None
    candidates = [info] if "raised_exception" in info else list(info.values())
    for entry in candidates:
        if isinstance(entry, dict) and entry.get("raised_exception"):
            return str(entry.get("exception_message") or "the expectation raised an error")
    return None
