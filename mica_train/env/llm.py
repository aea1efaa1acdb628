"""LLM-backed user simulator and judge over an OpenAI-compatible chat-completions endpoint.

Works with any server that implements ``POST {base_url}/chat/completions`` (vLLM, SGLang,
llama.cpp's server, hosted providers). The HTTP client is ``httpx``: one ``ChatClient`` keeps
a pool of up to ``max_concurrency`` keep-alive connections and is shared by every episode of
an environment, whose steps run concurrently (``SupportEnv.step_episodes``).

Failure handling. Each request gets ``timeout`` seconds per connect, read, write and pool
wait. Timeouts, connection errors (refused, reset, closed without an answer), HTTP 5xx, 408,
429 and other unexpected statuses, bodies that are not a chat completion and completions that
do not parse are retried ``retries`` times, sleeping ``min(backoff * 2**k, backoff_max) * (1 -
jitter * u)`` seconds with ``u`` uniform in [0, 1) (the openai client's schedule; a
``Retry-After`` header is honoured up to ``backoff_max``). Each failed attempt is counted in the
episode's ``RequestStats`` by kind. A judge turn still failing raises ``JudgeError``, which the
episode handles with ``EnvConfig.on_judge_failure``; a user turn still failing falls back to the
template user and is counted in ``user_failures``. HTTP 400, 401, 403, 404, 405 and 422 mean a
wrong URL, model or key: ``EndpointConfigError`` is raised at once.

The API key comes from ``EnvConfig.api_key`` or the environment variable named by
``api_key_env``; it is sent only in the ``Authorization`` header and removed from every
message this module logs or raises.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import threading
import time
from dataclasses import asdict, dataclass

import httpx

from mica_core._errors import MicaInputError

from .errors import EndpointConfigError, EndpointError, JudgeError
from .rubric import AXES, PROGRESS_KEYS, parse_progress_rubric

__all__ = ["ChatClient", "LLMJudge", "LLMUser", "RequestStats", "parse_judge_reply",
           "parse_user_reply", "judge_prompt", "user_prompt", "progress_rubric_schema",
           "JUDGE_SYSTEM_PROMPT", "USER_SYSTEM_PROMPT"]

log = logging.getLogger(__name__)

_CONFIG_STATUSES = frozenset({400, 401, 403, 404, 405, 422})


@dataclass
class RequestStats:
    """Endpoint traffic of one episode: requests sent (retries included) and failed attempts
    by kind. ``Episode.metrics()`` reports them as ``llm_<field>``.

    One episode steps in one thread at a time, so its counters need no lock.
    """

    requests: int = 0
    retries: int = 0             # attempts after a failed one
    timeouts: int = 0            # connect, read, write or pool timeout
    connection_errors: int = 0   # refused, reset, or closed without an answer
    server_errors: int = 0       # HTTP 5xx, 408, 429 and other unexpected statuses
    bad_responses: int = 0       # a body that is not a chat completion (malformed JSON, ...)
    parse_failures: int = 0      # a completion that did not parse (judge JSON, user message)

    def as_metrics(self):
        return {f"llm_{k}": v for k, v in asdict(self).items()}


class _Retryable(Exception):
    """One failed attempt that may succeed when retried; ``kind`` is a ``RequestStats`` field."""

    def __init__(self, message, kind, retry_after=None):
        super().__init__(message)
        self.kind = kind
        self.retry_after = retry_after


class ChatClient:
    """A chat-completions client with a keep-alive connection pool, retries and jittered
    exponential backoff. Thread-safe: share one client between concurrent episodes.

    Args:
      base_url: e.g. ``http://127.0.0.1:8000/v1``; requests go to ``{base_url}/chat/completions``.
      model: the model name sent in each request.
      api_key: sent as ``Authorization: Bearer <key>`` when given; never logged.
      timeout: seconds per connect, read, write and pool wait of one request.
      retries: retries after the first attempt.
      backoff, backoff_max, jitter: retry ``k`` (from 0) waits
        ``min(backoff * 2**k, backoff_max) * (1 - jitter * u)``, ``u`` uniform in [0, 1).
      max_connections: size of the connection pool (the environment's ``max_concurrency``).
      sleep: the function that waits (tests may pass a recorder).
    """

    def __init__(self, base_url, model, api_key=None, *, timeout=60.0, retries=3, backoff=0.5,
                 backoff_max=8.0, jitter=0.25, max_connections=64, sleep=time.sleep):
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
        self.jitter = float(jitter)
        self._sleep = sleep
        # Jitter only spreads retries in time; its own generator keeps the seeded global
        # generators (and so the run) untouched.
        self._jitter_rng = random.Random()
        self._lock = threading.Lock()
        self._requests = 0
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        n = max(1, int(max_connections))
        self._http = httpx.Client(
            headers=headers, timeout=httpx.Timeout(self.timeout),
            limits=httpx.Limits(max_connections=n, max_keepalive_connections=n))

    def __repr__(self):
        return (f"ChatClient(url={self.url!r}, model={self.model!r}, "
                f"api_key={'set' if self._api_key else None}, retries={self.retries})")

    @property
    def requests(self):
        """HTTP requests sent by this client, retries included."""
        return self._requests

    @classmethod
    def from_config(cls, config):
        """A client from ``EnvConfig`` fields, falling back to ``$MICA_LLM_BASE_URL``,
        ``$MICA_LLM_MODEL`` and ``$<config.api_key_env>``."""
        return cls(config.base_url or os.environ.get("MICA_LLM_BASE_URL"),
                   config.model or os.environ.get("MICA_LLM_MODEL"),
                   config.api_key or os.environ.get(config.api_key_env),
                   timeout=config.timeout, retries=config.retries, backoff=config.backoff,
                   backoff_max=config.backoff_max, jitter=config.backoff_jitter,
                   max_connections=config.max_concurrency)

    def close(self):
        """Close the pooled connections."""
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _redact(self, text):
        text = str(text)
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return text

    def _post(self, body):
        with self._lock:
            self._requests += 1
        try:
            resp = self._http.post(self.url, content=body)
        except httpx.TimeoutException as e:
            raise _Retryable(f"timeout ({type(e).__name__})", "timeouts") from None
        except httpx.TransportError as e:
            raise _Retryable(f"{type(e).__name__}: {e}", "connection_errors") from None
        except httpx.RequestError as e:  # a body that cannot be decoded
            raise _Retryable(f"{type(e).__name__}: {e}", "bad_responses") from None
        if resp.status_code in _CONFIG_STATUSES:
            raise EndpointConfigError(f"{self.url} answered HTTP {resp.status_code}: check "
                                      f"base_url, model and the API key")
        if resp.status_code != 200:
            raise _Retryable(f"HTTP {resp.status_code}", "server_errors",
                             retry_after=resp.headers.get("Retry-After"))
        try:
            data = json.loads(resp.content)
            content = data["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Retryable("the response is not a chat completion "
                             "(no choices[0].message.content)", "bad_responses") from None
        if not isinstance(content, str):
            raise _Retryable("choices[0].message.content is not a string", "bad_responses")
        return content

    def retry_delay(self, attempt, retry_after=None):
        """Seconds to wait before retry ``attempt`` (1-based)."""
        delay = min(self.backoff * 2 ** (attempt - 1), self.backoff_max)
        delay *= 1.0 - self.jitter * self._jitter_rng.random()
        if retry_after is not None:
            try:
                delay = min(max(delay, float(retry_after)), self.backoff_max)
            except ValueError:
                pass
        return delay

    def complete(self, messages, *, parse=None, temperature=0.0, max_tokens=256,
                 response_format=None, what="request", stats=None):
        """Send ``messages``; return ``parse(content)`` (or the content).

        ``parse`` raising ``ValueError`` counts as a failed attempt. Each attempt and failure
        is counted in ``stats`` (a ``RequestStats``) when given. Raises ``EndpointError``
        after the last retry, ``EndpointConfigError`` at once.
        """
        payload = {"model": self.model, "messages": messages, "temperature": temperature,
                   "max_tokens": max_tokens}
        if response_format is not None:
            payload["response_format"] = response_format
        body = json.dumps(payload).encode("utf-8")
        stats = RequestStats() if stats is None else stats
        last = None
        for attempt in range(self.retries + 1):
            if attempt:
                stats.retries += 1
                self._sleep(self.retry_delay(attempt, getattr(last, "retry_after", None)))
            stats.requests += 1
            try:
                content = self._post(body)
            except _Retryable as e:
                last = e
                setattr(stats, e.kind, getattr(stats, e.kind) + 1)
            else:
                try:
                    return parse(content) if parse is not None else content
                except ValueError as e:  # MicaInputError included
                    last = e
                    stats.parse_failures += 1
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


def progress_rubric_schema():
    """The JSON schema of a judge reply (the six progress-rubric fields as integers in
    range, nothing else), for servers that constrain decoding to a schema."""
    props = {k: {"type": "integer", "enum": [0, 1, 2] if k.endswith("Prog") else [-2, -1, 0]}
             for k in PROGRESS_KEYS}
    return {"type": "object", "properties": props, "required": list(PROGRESS_KEYS),
            "additionalProperties": False}


def judge_response_format(config):
    """``response_format`` of judge requests: a JSON schema (``json_schema``, OpenAI's form,
    which vLLM and SGLang turn into guided decoding), JSON mode (``json_mode``) or None."""
    if config.json_schema:
        return {"type": "json_schema",
                "json_schema": {"name": "progress_rubric", "strict": True,
                                "schema": progress_rubric_schema()}}
    if config.json_mode:
        return {"type": "json_object"}
    return None


# ---------------------------------------------------------------------- components
class LLMJudge:
    """Judge that asks the endpoint for EMPA's progress rubric as JSON.

    ``messages`` is the episode's conversation list (read, never written); requests are
    counted in ``stats`` (the episode's ``RequestStats``).
    """

    def __init__(self, client, scenario, messages, config, stats=None):
        self.client = client
        self.scenario = scenario
        self.messages = messages
        self.config = config
        self.stats = RequestStats() if stats is None else stats

    def judge(self, reply, state):
        cfg = self.config
        prompt = judge_prompt(self.scenario, state, self.messages, reply, cfg.history_messages)
        try:
            return self.client.complete(
                prompt, parse=parse_judge_reply, temperature=cfg.judge_temperature,
                max_tokens=cfg.max_tokens, what="judge request",
                response_format=judge_response_format(cfg), stats=self.stats)
        except EndpointConfigError:
            raise
        except EndpointError as e:
            raise JudgeError(str(e)) from None


class LLMUser:
    """User simulator that asks the endpoint for the next message; on failure after retries
    it uses ``fallback`` (the template user) and counts ``failures``."""

    def __init__(self, client, scenario, messages, config, fallback, stats=None):
        self.client = client
        self.scenario = scenario
        self.messages = messages
        self.config = config
        self.fallback = fallback
        self.stats = RequestStats() if stats is None else stats
        self.failures = 0

    def message(self, state):
        cfg = self.config
        prompt = user_prompt(self.scenario, state, self.messages, cfg.history_messages)
        try:
            return self.client.complete(prompt, parse=parse_user_reply,
                                        temperature=cfg.user_temperature,
                                        max_tokens=cfg.max_tokens, what="user request",
                                        stats=self.stats)
        except EndpointConfigError:
            raise
        except EndpointError:
            self.failures += 1
            return self.fallback.message(state)
