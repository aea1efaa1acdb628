"""Errors of the support environment (invalid input raises ``mica_core`` 's
``MicaInputError``, a ``ValueError``)."""

from __future__ import annotations

import re

__all__ = ["JudgeError", "EndpointError", "EndpointConfigError", "public_url"]


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


def public_url(url):
    """``url`` as it may be shown: a ``user:password@`` part becomes ``***@`` (with or without
    a scheme)."""
    text = str(url)
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "", text
    netloc = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if "@" in netloc:
        rest = "***@" + rest[len(netloc.rsplit("@", 1)[0]) + 1:]
    return f"{scheme}{sep}{rest}"
