"""LLM-backed user simulator and judge over an OpenAI-compatible chat-completions endpoint.

Works with any server that implements ``POST {base_url}/chat/completions`` (vLLM, SGLang,
llama.cpp's server, hosted providers). Standard library only (``urllib``).

Failure handling. Each request gets ``timeout`` seconds per socket operation. Timeouts,
connection errors, HTTP 5xx, 408 and 429, bodies that are not the expected JSON and
completions that do not parse are retried ``retries`` times, sleeping ``backoff * 2**k``
seconds (at most ``backoff_max``; a ``Retry-After`` header is honoured up to that cap).
A judge turn still failing raises ``JudgeError``, which the episode handles with
``EnvConfig.on_judge_failure``; a user turn still failing falls back to the template user and
is counted in ``user_failures``. HTTP 400, 401, 403, 404, 405 and 422 mean a wrong URL, model
or key: ``EndpointConfigError`` is raised at once.

The API key comes from ``EnvConfig.api_key`` or the environment variable named by
``api_key_env``; it is sent only in the ``Authorization`` header and removed from every
message this module logs or raises.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
import urllib.error
import urllib.request
from http.client import HTTPException

from mica_core._errors import MicaInputError

from .errors import EndpointConfigError, EndpointError, JudgeError
from .rubric import AXES, PROGRESS_KEYS, parse_progress_rubric

__all__ = ["ChatClient", "LLMJudge", "LLMUser", "parse_judge_reply", "parse_user_reply",
           "judge_prompt", "user_prompt", "JUDGE_SYSTEM_PROMPT", "USER_SYSTEM_PROMPT"]

log = logging.getLogger(__name__)

_CONFIG_STATUSES = frozenset({400, 401, 403, 404, 405, 422})


class _Retryable(Exception):
    """One failed attempt that may succeed when retried."""


class ChatClient:
    """A minimal chat-completions client with retries and backoff.

    Args:
      base_url: e.g. ``http://127.0.0.1:8000/v1``; requests go to ``{base_url}/chat/completions``.
      model: the model name sent in each request.
      api_key: sent as ``Authorization: Bearer <key>`` when given; never logged.
      timeout: seconds per socket operation.
      retries: retries after the first attempt.
      backoff, backoff_max: retry delays ``min(backoff * 2**k, backoff_max)``.
      sleep: the function that waits (tests may pass a recorder).
    """

    def __init__(self, base_url, model, api_key=None, *, timeout=60.0, retries=3, backoff=0.5,
                 backoff_max=8.0, sleep=time.sleep):
        if not base_url:
            raise MicaInputError("no LLM endpoint: set EnvConfig.base_url or $MICA_LLM_BASE_URL",
                                 column="base_url", rule="required")
        if not model:
            raise MicaInputError("no LLM model: set EnvConfig.model or $MICA_LLM_MODEL",
                                 column="model", rule="required")
        if not re.match(r"^https?://", base_url):
            raise MicaInputError(f"base_url must start with http:// or https://, got "
                                 f"{base_url!r}", column="base_url", rule="url")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self._api_key = api_key or None
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.backoff_max = float(backoff_max)
        self._sleep = sleep
        self.requests = 0  # HTTP requests sent, retries included

    def __repr__(self):
        return (f"ChatClient(url={self.url!r}, model={self.model!r}, "
                f"api_key={'set' if self._api_key else None}, retries={self.retries})")

    @classmethod
    def from_config(cls, config):
        """A client from ``EnvConfig`` fields, falling back to ``$MICA_LLM_BASE_URL``,
        ``$MICA_LLM_MODEL`` and ``$<config.api_key_env>``."""
        return cls(config.base_url or os.environ.get("MICA_LLM_BASE_URL"),
                   config.model or os.environ.get("MICA_LLM_MODEL"),
                   config.api_key or os.environ.get(config.api_key_env),
                   timeout=config.timeout, retries=config.retries, backoff=config.backoff,
                   backoff_max=config.backoff_max)

    def _redact(self, text):
        text = str(text)
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return text

    def _post(self, payload):
        body = json.dumps(payload).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        self.requests += 1
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            retry_after = e.headers.get("Retry-After") if e.headers else None
            e.close()
            if e.code in _CONFIG_STATUSES:
                raise EndpointConfigError(f"{self.url} answered HTTP {e.code}: check base_url, "
                                          f"model and the API key") from None
            err = _Retryable(f"HTTP {e.code}")
            err.retry_after = retry_after
            raise err from None
        except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError,
                HTTPException, OSError) as e:
            reason = getattr(e, "reason", e)
            raise _Retryable(f"{type(e).__name__}: {reason}") from None
        try:
            data = json.loads(raw)
            content = data["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Retryable("the response is not a chat completion "
                             "(no choices[0].message.content)") from None
        if not isinstance(content, str):
            raise _Retryable("choices[0].message.content is not a string")
        return content

    def complete(self, messages, *, parse=None, temperature=0.0, max_tokens=256,
                 response_format=None, what="request"):
        """Send ``messages``; return ``parse(content)`` (or the content).

        ``parse`` raising ``ValueError`` counts as a failed attempt. Raises
        ``EndpointError`` after the last retry, ``EndpointConfigError`` at once.
        """
        payload = {"model": self.model, "messages": messages, "temperature": temperature,
                   "max_tokens": max_tokens}
        if response_format is not None:
            payload["response_format"] = response_format
        last = None
        for attempt in range(self.retries + 1):
            if attempt:
                delay = min(self.backoff * 2 ** (attempt - 1), self.backoff_max)
                retry_after = getattr(last, "retry_after", None)
                if retry_after is not None:
                    try:
                        delay = min(max(delay, float(retry_after)), self.backoff_max)
                    except ValueError:
                        pass
                self._sleep(delay)
            try:
                content = self._post(payload)
                return parse(content) if parse is not None else content
            except _Retryable as e:
                last = e
            except ValueError as e:  # parse failure, MicaInputError included
                last = e
            log.warning("%s to %s failed (attempt %d of %d): %s", what, self.url, attempt + 1,
                        self.retries + 1, self._redact(last))
        raise EndpointError(f"{what} to {self.url} failed after {self.retries + 1} attempts: "
                            f"{self._redact(last)}")


# ---------------------------------------------------------------------- parsing
_FENCE = re.compile(r"^```(?:json|JSON)?\s*\n?(.*?)\n?```$", re.S)


def parse_judge_reply(content):
    """The progress rubric from a judge completion, strictly.

    Accepted: the completion is one JSON object, possibly inside a single Markdown code
    fence, with the keys ``C.Prog`` .. ``P.Neg`` (integers, ``X.Prog`` in 0..2 and ``X.Neg`` in
    -2..0; other keys ignored). Anything else raises ``ValueError``.
    """
    text = content.strip()
    m = _FENCE.match(text)
    if m:
        text = m.group(1).strip()
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"judge reply is not a JSON object ({e.msg}): {content[:80]!r}") from None
    return parse_progress_rubric(obj, where="judge reply: ")


def parse_user_reply(content, max_chars=1000):
    """The user's next message from a completion: stripped of whitespace, surrounding quotes
    and a leading ``User:`` label; empty or longer than ``max_chars`` raises ``ValueError``."""
    text = content.strip()
    text = re.sub(r"^(user|client|seeker)\s*:\s*", "", text, flags=re.I).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    if not text:
        raise ValueError("the user simulator returned an empty message")
    if len(text) > max_chars:
        raise ValueError(f"the user simulator returned {len(text)} characters "
                         f"(at most {max_chars})")
    return text


# ---------------------------------------------------------------------- prompts
JUDGE_SYSTEM_PROMPT = """\
You are a careful rater of emotional-support conversations. A person seeking support has \
three kinds of needs: cognitive (C: understanding their situation), affective (A: feeling \
heard and emotionally steadier) and proactive (P: knowing what to do next). You rate how \
the supporter's LATEST reply changed each need, using this rubric:

X.Prog (progress, 0, 1 or 2): 0 = no progress on this need; 1 = some progress; \
2 = clear, substantial progress.
X.Neg (setback, 0, -1 or -2): 0 = no harm; -1 = the reply made this need somewhat worse \
(dismissive, off-target, premature); -2 = clearly harmful for this need.

Rate only the latest reply, in the context of the conversation and the person's state. \
Advice or analysis given while the person is still very upset usually helps little and \
can hurt the affective need. Answer with ONLY a JSON object, no other text, with exactly \
these integer fields: {"C.Prog": 0, "C.Neg": 0, "A.Prog": 0, "A.Neg": 0, "P.Prog": 0, \
"P.Neg": 0}"""

USER_SYSTEM_PROMPT = """\
You play a person who is talking to a supporter about a difficulty. Stay in character, \
write only the person's next message (one to three sentences, first person, no labels, \
no quotes). Bring up your most pressing unmet need. The deeper your affective deficit, \
the more emotional and intense your words. If all your needs feel met, say so briefly."""


def _state_lines(scenario, state):
    names = {"C": "cognitive (understanding)", "A": "affective (feeling heard)",
             "P": "proactive (knowing what to do)"}
    lines = []
    for axis, value in zip(AXES, state):
        level = ("met" if value >= -1 else "mild" if value >= -6 else "serious" if value >= -15
                 else "severe")
        lines.append(f"- {names[axis]}: {value} ({level} deficit): "
                     f"\"{scenario.needs[axis]}\"")
    return "\n".join(lines)


def _transcript(messages, limit):
    shown = messages[-limit:] if limit else messages
    names = {"user": "Person", "assistant": "Supporter"}
    return "\n".join(f"{names.get(m['role'], m['role'])}: {m['content']}" for m in shown)


def judge_prompt(scenario, state, messages, reply, history=12):
    """Chat messages asking the judge for the progress rubric of ``reply``."""
    user = (f"Topic: {scenario.topic}\n"
            f"The person's needs before the latest reply (0 = met, more negative = "
            f"deeper deficit):\n{_state_lines(scenario, state)}\n\n"
            f"Conversation so far:\n{_transcript(messages, history)}\n\n"
            f"Latest supporter reply to rate:\n{reply}\n\n"
            f"Return only the JSON object with {', '.join(PROGRESS_KEYS)}.")
    return [{"role": "system", "content": JUDGE_SYSTEM_PROMPT},
            {"role": "user", "content": user}]


def user_prompt(scenario, state, messages, history=12):
    """Chat messages asking the user simulator for its next message."""
    transcript = _transcript(messages, history) if messages else "(no messages yet: you start)"
    user = (f"Your situation: {scenario.topic}.\n"
            f"Your needs now (0 = met, more negative = deeper deficit):\n"
            f"{_state_lines(scenario, state)}\n\n"
            f"Conversation so far:\n{transcript}\n\n"
            f"Write your next message.")
    return [{"role": "system", "content": USER_SYSTEM_PROMPT},
            {"role": "user", "content": user}]


# ---------------------------------------------------------------------- components
class LLMJudge:
    """Judge that asks the endpoint for EMPA's progress rubric as JSON.

    ``messages`` is the episode's conversation list (read, never written).
    """

    def __init__(self, client, scenario, messages, config):
        self.client = client
        self.scenario = scenario
        self.messages = messages
        self.config = config

    def judge(self, reply, state):
        cfg = self.config
        prompt = judge_prompt(self.scenario, state, self.messages, reply, cfg.history_messages)
        try:
            return self.client.complete(
                prompt, parse=parse_judge_reply, temperature=cfg.judge_temperature,
                max_tokens=cfg.max_tokens, what="judge request",
                response_format={"type": "json_object"} if cfg.json_mode else None)
        except EndpointConfigError:
            raise
        except EndpointError as e:
            raise JudgeError(str(e)) from None


class LLMUser:
    """User simulator that asks the endpoint for the next message; on failure after retries
    it uses ``fallback`` (the template user) and counts ``failures``."""

    def __init__(self, client, scenario, messages, config, fallback):
        self.client = client
        self.scenario = scenario
        self.messages = messages
        self.config = config
        self.fallback = fallback
        self.failures = 0

    def message(self, state):
        cfg = self.config
        prompt = user_prompt(self.scenario, state, self.messages, cfg.history_messages)
        try:
            return self.client.complete(prompt, parse=parse_user_reply,
                                        temperature=cfg.user_temperature,
                                        max_tokens=cfg.max_tokens, what="user request")
        except EndpointConfigError:
            raise
        except EndpointError:
            self.failures += 1
            return self.fallback.message(state)
