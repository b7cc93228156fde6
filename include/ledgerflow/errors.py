"""The one error root of Ledgerflow and its typed subclasses."""

from __future__ import annotations


class LedgerflowError(Exception):
    """Root of every error Ledgerflow raises on purpose."""

    code = "ledgerflow_error"


class SpecError(LedgerflowError):
    """A workflow file is invalid. Names the file, the line and the field."""

    code = "spec_invalid"

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.message = message
        self.file = file
        self.line = line
        self.field = field
        super().__init__(self.__str__())

    def __str__(self) -> str:
        where = self.file or "<workflow>"
        if self.line is not None:
            where += f":{self.line}"
        if self.field:
            where += f": {self.field}"
        return f"{where}: {self.message}"


class SpecErrors(SpecError):
    """Several problems in one file; ``errors`` holds each, ``str()`` lists all."""

    def __init__(self, errors: list[SpecError]) -> None:
        self.errors = errors
        first = errors[0]
        super().__init__(first.message, file=first.file, line=first.line, field=first.field)

    def __str__(self) -> str:
        if len(self.errors) == 1:
            return str(self.errors[0])
        return f"{len(self.errors)} problems:\n" + "\n".join(f"  {e}" for e in self.errors)


class UnknownToolError(LedgerflowError):
    """A tool name that is not in the registry."""

    code = "tool_unknown"

    def __init__(self, name: str, known: list[str], hint: str | None = None) -> None:
        self.name = name
        self.known = known
        more = f" ({hint})" if hint else ""
        super().__init__(
            f"unknown tool {name!r}; registered tools: {', '.join(known) or 'none'}{more}"
        )


class ToolError(LedgerflowError):
    """A tool call failed in a way that may succeed when retried."""

    code = "tool_failed"


class NonRetryableError(LedgerflowError):
    """A failure that retrying cannot fix (bad input, a 4xx answer, a refused charge)."""

    code = "non_retryable"


class LedgerError(LedgerflowError):
    """The ledger cannot be reached or holds something it should not."""

    code = "ledger_error"


class InjectedFault(BaseException):
    """Raised at a named commit point by the fault-injection hooks (tests only).

    A ``BaseException`` so that user code and tool code cannot swallow it.
    """


class SettingError(LedgerflowError, ValueError):
    """A ``[ledgerflow]`` setting whose value does not parse; names the option and where
    the value came from."""

    code = "setting_invalid"
