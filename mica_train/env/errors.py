"""Errors of the support environment (invalid input raises ``mica_core`` 's
``MicaInputError``, a ``ValueError``)."""

from __future__ import annotations

__all__ = ["JudgeError", "EndpointError", "EndpointConfigError"]


class JudgeError(RuntimeError):
    """A judge turn that failed (for the LLM judge: after its retries).

    ``Episode.step`` catches it and applies ``EnvConfig.on_judge_failure``.
    """


class EndpointError(RuntimeError):
    """A chat-completions request that failed after its retries (timeouts, connection
    errors, 5xx, 408, 429, unparsable replies)."""


class EndpointConfigError(EndpointError):
    """A request the endpoint refused as invalid (400, 401, 403, 404, 405, 422): a wrong URL,
    model or key. Never retried and never turned into a judge fallback: it propagates."""
