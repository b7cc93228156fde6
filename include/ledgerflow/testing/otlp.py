"""A tiny OpenTelemetry trace collector for tests: OTLP over HTTP (protobuf) on 127.0.0.1.

Point an exporter at ``url`` (``OTEL_TRACES_EXPORTER=otlp_proto_http``,
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=<url>``); every span it receives is kept as a plain
dict (name, trace and span ids in hex, parent span id, attributes).
"""

from __future__ import annotations

import threading
from typing import Any

from ledgerflow.testing.loopback import Answer, LoopbackPeer


class OtlpCollector(LoopbackPeer):
    base_path = "/v1/traces"

    def __init__(self) -> None:
        super().__init__()
        self.spans: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def answer(self, method: str, path: str, headers: Any, body: bytes) -> Answer:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        request = trace_service_pb2.ExportTraceServiceRequest()
        request.ParseFromString(body)
        self._keep(request)
        reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        return Answer(200, reply, "application/x-protobuf")

    def _keep(self, request: Any) -> None:
        found = []
        for resource in request.resource_spans:
            for scope in resource.scope_spans:
                for span in scope.spans:
                    found.append(
                        {
                            "name": span.name,
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent_span_id": span.parent_span_id.hex() or None,
                            "scope": scope.scope.name,
                            "attributes": {a.key: _value(a.value) for a in span.attributes},
                        }
                    )
        with self._lock:
            self.spans.extend(found)

    def named(self, name: str) -> list[dict[str, Any]]:
        with self._lock:
            return [s for s in self.spans if s["name"] == name]


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    return None if kind is None else getattr(value, kind)
