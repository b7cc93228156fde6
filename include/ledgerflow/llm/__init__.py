"""LLM steps: output models and checks by name, the offline rule-based model, the call.

Nothing heavy is imported here: pydantic-ai loads only when a step runs.
"""

from ledgerflow.llm.registry import check, output_model

__all__ = ["check", "output_model"]
