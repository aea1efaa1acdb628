"""LLM-backed user simulator and judge over an OpenAI-compatible chat-completions endpoint.

Works with any server that implements ``POST {base_url}/chat/completions`` (vLLM, SGLang,
llama.cpp's server, hosted providers). The HTTP client is ``httpx``: one ``ChatClient`` keeps
a pool of up to ``max_concurrency`` keep-alive connections and is shared by every episode of
an environment, whose steps run concurrently (``SupportEnv.step_episodes``).

Failure handling. Each attempt gets ``timeout`` seconds in all, from connecting to the last
byte of the answer (a server that drips its answer cannot stretch it), and a body of at most
``max_response_bytes`` bytes (read as it arrives; a longer one is abandoned at the cap; a
compressed one, which the client does not ask for, is refused).
Timeouts, connection errors (refused, reset, closed without an answer), HTTP 5xx, 408, 429 and
other unexpected statuses, bodies that are not a chat completion (too large, nested too deeply,
not JSON, ...) and completions that do not parse are retried ``retries`` times, sleeping
``min(backoff * 2**k, backoff_max) * (1 - jitter * u)`` seconds with ``u`` uniform in [0, 1)
(the openai client's schedule; a ``Retry-After`` header is honoured up to ``backoff_max``).
Each failed attempt is counted in the episode's ``RequestStats`` by kind. A judge turn still
failing raises ``JudgeError``, which the episode handles with ``EnvConfig.on_judge_failure``; a
user turn still failing falls back to the template user and is counted in ``user_failures``.
HTTP 400, 401, 403, 404, 405 and 422 mean a wrong URL, model or key: ``EndpointConfigError`` is
raised at once.

The API key comes from ``EnvConfig.api_key`` or the environment variable named by
``api_key_env``; it is sent only in the ``Authorization`` header. A ``user:password@`` in the
base URL is sent as HTTP Basic authentication and never as part of the URL. Neither the key,
the password nor the header values appear in any message this module logs or raises.

``ChatClient.abort()`` (called by ``SupportEnv.close()`` and by an interrupted
``SupportEnv.step_episodes``) ends the calls in flight at once: their sockets are shut down
and their retries dropped, so SIGTERM or Ctrl-C during a call stops the process promptly.
Calls begun after it are served as usual.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import re
import socket
import threading
import time
import weakref
from dataclasses import asdict, dataclass
from urllib.parse import unquote, urlsplit, urlunsplit

import httpcore
import httpx

from mica_core import MicaInputError

from .errors import EndpointConfigError, EndpointError, JudgeError, public_url
from .rubric import AXES, PROGRESS_KEYS, parse_progress_rubric

__all__ = ["ChatClient", "LLMJudge", "LLMUser", "RequestStats", "parse_judge_reply",
           "parse_user_reply", "judge_prompt", "user_prompt", "progress_rubric_schema",
           "JUDGE_SYSTEM_PROMPT", "USER_SYSTEM_PROMPT", "DEFAULT_MAX_RESPONSE_BYTES"]

log = logging.getLogger(__name__)

_CONFIG_STATUSES = frozenset({400, 401, 403, 404, 405, 422})

#: Largest response body read by default (1 MiB): a chat completion of a few hundred tokens
#: is a few kilobytes.
DEFAULT_MAX_RESPONSE_BYTES = 1 << 20


@dataclass
class RequestStats:
    """Endpoint traffic of one episode: requests sent (retries included) and failed attempts
    by kind. ``Episode.metrics()`` reports them as ``llm_<field>``.

    One episode steps in one thread at a time, so its counters need no lock.
    """

    requests: int = 0
    retries: int = 0             # attempts after a failed one
    timeouts: int = 0            # connect, read, write or pool timeout, or the deadline
    connection_errors: int = 0   # refused, reset, or closed without an answer
    server_errors: int = 0       # HTTP 5xx, 408, 429 and other unexpected statuses
    bad_responses: int = 0       # not a chat completion (malformed, too large, too deep, ...)
    parse_failures: int = 0      # a completion that did not parse (judge JSON, user message)

    def as_metrics(self):
        return {f"llm_{k}": v for k, v in asdict(self).items()}


class _Retryable(Exception):
    """One failed attempt that may succeed when retried; ``kind`` is a ``RequestStats`` field."""

    def __init__(self, message, kind, retry_after=None):
        super().__init__(message)
        self.kind = kind
        self.retry_after = retry_after


def split_credentials(url):
    """``(url, username, password)``: ``url`` without its ``user:password@`` part, and the
    percent-decoded credentials (None when absent). Raises ``ValueError`` on a URL that
    cannot be split."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, None, None
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, sep, password = userinfo.partition(":")
    return (urlunsplit(parts._replace(netloc=host)), unquote(user),
            unquote(password) if sep else None)


# ------------------------------------------------------------------ deadlines and abort
# httpx applies its timeout to each connect, read and write, so a server that sends one byte
# at a time keeps a request alive for ever, and a socket blocked in a worker thread cannot be
# interrupted. The client therefore gives httpcore a network backend whose streams cut every
# operation's timeout to what is left of the attempt's deadline (a per-thread value: one
# request runs in one thread), and which can shut every socket down at once (``abort``).
#
# An abort ends the calls begun before it (each holds the event that was current when it
# began, and the abort sets it), not the client: after an interrupted step_episodes the
# environment still works.
class _Deadlines:
    def __init__(self):
        self._local = threading.local()
        self._lock = threading.Lock()
        self._streams = weakref.WeakSet()
        self._abort = threading.Event()

    def current(self):
        """The abort event of a call beginning now."""
        with self._lock:
            return self._abort

    def start(self, seconds, aborted):
        self._local.deadline = time.monotonic() + seconds
        self._local.aborted = aborted

    def clear(self):
        self._local.deadline = self._local.aborted = None

    def limit(self, timeout, exc_type):
        """``timeout`` cut to the time left before this thread's deadline; ``exc_type`` (an
        httpcore timeout) when none is left or the call was aborted."""
        aborted = getattr(self._local, "aborted", None)
        if aborted is not None and aborted.is_set():
            raise exc_type("the call was aborted")
        deadline = getattr(self._local, "deadline", None)
        if deadline is None:
            return timeout
        left = deadline - time.monotonic()
        if left <= 0:
            raise exc_type("the request's deadline passed")
        return left if timeout is None else min(timeout, left)

    def track(self, stream):
        with self._lock:
            self._streams.add(stream)
        return stream

    def abort(self):
        with self._lock:
            aborted, self._abort = self._abort, threading.Event()
        # Set before the streams are listed: a read that checked the event before this line
        # uses a stream made before it, so listed and shut down below.
        aborted.set()
        with self._lock:
            streams = list(self._streams)
        for stream in streams:
            stream.shutdown()


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, inner, deadlines):
        self._inner = inner
        self._deadlines = deadlines

    def read(self, max_bytes, timeout=None):
        return self._inner.read(max_bytes, self._deadlines.limit(timeout, httpcore.ReadTimeout))

    def write(self, buffer, timeout=None):
        self._inner.write(buffer, self._deadlines.limit(timeout, httpcore.WriteTimeout))

    def close(self):
        self._inner.close()

    def start_tls(self, ssl_context, server_hostname=None, timeout=None):
        inner = self._inner.start_tls(ssl_context, server_hostname,
                                      self._deadlines.limit(timeout, httpcore.ConnectTimeout))
        return self._deadlines.track(_DeadlineStream(inner, self._deadlines))

    def get_extra_info(self, info):
        return self._inner.get_extra_info(info)

    def shutdown(self):
        """Wake a thread blocked on this socket (its read returns at once)."""
        sock = self._inner.get_extra_info("socket")
        if sock is not None:
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:  # already closed
                pass


class _DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self, inner, deadlines):
        self._inner = inner
        self._deadlines = deadlines

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        timeout = self._deadlines.limit(timeout, httpcore.ConnectTimeout)
        stream = self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return self._deadlines.track(_DeadlineStream(stream, self._deadlines))

    def connect_unix_socket(self, path, timeout=None, socket_options=None):
        timeout = self._deadlines.limit(timeout, httpcore.ConnectTimeout)
        stream = self._inner.connect_unix_socket(path, timeout, socket_options)
        return self._deadlines.track(_DeadlineStream(stream, self._deadlines))

    def sleep(self, seconds):
        self._inner.sleep(seconds)


def _install_deadlines(client, deadlines):
    """Put ``_DeadlineBackend`` under every transport of ``client`` (the default one and the
    proxies httpx mounted from the environment)."""
    transports = [client._transport, *client._mounts.values()]
    for transport in transports:
        pool = getattr(transport, "_pool", None)
        if transport is not None and not hasattr(pool, "_network_backend"):
            raise RuntimeError(f"mica's LLM client does not support this httpx/httpcore version "
                               f"(httpx {httpx.__version__}: no connection pool backend)")
        if pool is not None:
            pool._network_backend = _DeadlineBackend(pool._network_backend, deadlines)


class ChatClient:
    """A chat-completions client with a keep-alive connection pool, retries and jittered
    exponential backoff. Thread-safe: share one client between concurrent episodes.

    Args:
      base_url: e.g. ``http://127.0.0.1:8000/v1``; requests go to ``{base_url}/chat/completions``.
        A ``user:password@`` in it is sent as HTTP Basic authentication; never logged.
      model: the model name sent in each request.
      api_key: sent as ``Authorization: Bearer <key>`` when given; never logged.
      timeout: seconds of one attempt in all, from connecting to the last byte of the answer.
      retries: retries after the first attempt.
      backoff, backoff_max, jitter: retry ``k`` (from 0) waits
        ``min(backoff * 2**k, backoff_max) * (1 - jitter * u)``, ``u`` uniform in [0, 1).
      max_connections: size of the connection pool (the environment's ``max_concurrency``).
      max_response_bytes: largest response body read; a longer one is a failed attempt.
      sleep: the function that waits between attempts (tests may pass a recorder; the
        default wait ends early when the call is aborted).
    """

    def __init__(self, base_url, model, api_key=None, *, timeout=60.0, retries=3, backoff=0.5,
                 backoff_max=8.0, jitter=0.25, max_connections=64,
                 max_response_bytes=DEFAULT_MAX_RESPONSE_BYTES, sleep=None):
        if not base_url:
            raise MicaInputError("no LLM endpoint: set EnvConfig.base_url or $MICA_LLM_BASE_URL",
                                 column="base_url", rule="required")
        if not model:
            raise MicaInputError("no LLM model: set EnvConfig.model or $MICA_LLM_MODEL",
                                 column="model", rule="required")
        if not re.match(r"^https?://", base_url):
            raise MicaInputError(f"base_url must start with http:// or https://, got "
                                 f"{public_url(base_url)!r}", column="base_url", rule="url")
        try:
            url, user, password = split_credentials(base_url)
        except ValueError as e:
            raise MicaInputError(f"base_url {public_url(base_url)!r} is not a valid URL ({e})",
                                 column="base_url", rule="url") from None
        self.url = url.rstrip("/") + "/chat/completions"
        self.model = model
        # Surrounding white space (a key file's newline) is no part of a key; a control or
        # non-ASCII character cannot go in a header, and the header error would show the key.
        self._api_key = str(api_key).strip() if api_key else None
        if self._api_key and not (self._api_key.isascii() and self._api_key.isprintable()):
            raise MicaInputError("the API key has a character that cannot go in an HTTP header "
                                 "(control, non-ASCII)", column="api_key", rule="header")
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.backoff_max = float(backoff_max)
        self.jitter = float(jitter)
        self.max_response_bytes = int(max_response_bytes)
        self._deadlines = _Deadlines()
        self._sleep = sleep
        # Jitter only spreads retries in time; its own generator keeps the seeded global
        # generators (and so the run) untouched.
        self._jitter_rng = random.Random()
        self._lock = threading.Lock()
        self._requests = 0
        headers = {"Content-Type": "application/json", "Accept": "application/json",
                   "Accept-Encoding": "identity"}
        secrets = []
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
            secrets.append(self._api_key)
        auth = None
        if user or password:
            auth = httpx.BasicAuth(user or "", password or "")
            # The Basic header's token, the URL's user:password as written, and the password
            # (a user name alone, a token used as user name, is a secret too).
            secrets += [base64.b64encode(f"{user or ''}:{password or ''}".encode()).decode(),
                        urlsplit(base_url).netloc.rsplit("@", 1)[0],
                        password if password else user]
        # Longest first, so that a secret inside another is not left half shown.
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)
        n = max(1, int(max_connections))
        self._http = httpx.Client(
            headers=headers, auth=auth, timeout=httpx.Timeout(self.timeout),
            limits=httpx.Limits(max_connections=n, max_keepalive_connections=n))
        _install_deadlines(self._http, self._deadlines)

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
                   max_connections=config.max_concurrency,
                   max_response_bytes=config.max_response_bytes)

    def abort(self):
        """End every call in flight at once: its socket is shut down, its retries dropped, and
        ``complete`` raises ``EndpointError``. Later calls are served as usual."""
        self._deadlines.abort()

    def close(self):
        """Close the pooled connections; requests still in flight end at once."""
        self.abort()
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _redact(self, text):
        text = str(text)
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _post(self, body, aborted):
        with self._lock:
            self._requests += 1
        self._deadlines.start(self.timeout, aborted)
        try:
            with self._http.stream("POST", self.url, content=body) as resp:
                if resp.status_code in _CONFIG_STATUSES:
                    raise EndpointConfigError(f"{self.url} answered HTTP {resp.status_code}: "
                                              f"check base_url, model and the API key")
                if resp.status_code != 200:
                    raise _Retryable(f"HTTP {resp.status_code}", "server_errors",
                                     retry_after=resp.headers.get("Retry-After"))
                raw = self._read_body(resp)
        except httpx.TimeoutException as e:
            raise _Retryable(f"timeout ({type(e).__name__})", "timeouts") from None
        except httpx.TransportError as e:
            raise _Retryable(f"{type(e).__name__}: {e}", "connection_errors") from None
        except httpx.RequestError as e:  # a body that cannot be decoded
            raise _Retryable(f"{type(e).__name__}: {e}", "bad_responses") from None
        finally:
            self._deadlines.clear()
        try:
            data = json.loads(raw)
            content = data["choices"][0]["message"]["content"]
        except RecursionError:
            raise _Retryable("the response is nested too deeply to read as JSON",
                             "bad_responses") from None
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Retryable("the response is not a chat completion "
                             "(no choices[0].message.content)", "bad_responses") from None
        if not isinstance(content, str):
            raise _Retryable("choices[0].message.content is not a string", "bad_responses")
        return content

    def _read_body(self, resp):
        """The body of ``resp``, read as it arrives and abandoned past ``max_response_bytes``.

        The client asks for no compression (``Accept-Encoding: identity``) and refuses a
        compressed body: decompressing one network read can take a thousand times its size
        before any cap could be checked."""
        encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise _Retryable(f"the response is compressed ({encoding}) although the client "
                             f"asked for none", "bad_responses")
        cap = self.max_response_bytes
        too_large = _Retryable(f"the response is larger than max_response_bytes={cap}",
                               "bad_responses")
        declared = resp.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > cap:
            raise too_large
        body = bytearray()
        for chunk in resp.iter_raw():
            body += chunk
            if len(body) > cap:
                raise too_large
        return bytes(body)

    def retry_delay(self, attempt, retry_after=None):
        """Seconds to wait before retry ``attempt`` (1-based)."""
        # The exponent is capped: 2 ** 1100 does not fit a float, and the cap wins long before.
        delay = min(self.backoff * 2.0 ** min(attempt - 1, 60), self.backoff_max)
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
        after the last retry, or at once when ``abort`` or ``close`` ends the call;
        ``EndpointConfigError`` at once.
        """
        payload = {"model": self.model, "messages": messages, "temperature": temperature,
                   "max_tokens": max_tokens}
        if response_format is not None:
            payload["response_format"] = response_format
        body = json.dumps(payload).encode("utf-8")
        stats = RequestStats() if stats is None else stats
        aborted = self._deadlines.current()
        sleep = aborted.wait if self._sleep is None else self._sleep
        stopped = EndpointError(f"{what} to {self.url}: aborted (the client was closed or the "
                                f"call interrupted)")
        last = None
        for attempt in range(self.retries + 1):
            if attempt:
                stats.retries += 1
                sleep(self.retry_delay(attempt, getattr(last, "retry_after", None)))
            if aborted.is_set():
                raise stopped
            stats.requests += 1
            try:
                content = self._post(body, aborted)
            except _Retryable as e:
                last = e
                setattr(stats, e.kind, getattr(stats, e.kind) + 1)
            else:
                try:
                    return parse(content) if parse is not None else content
                except ValueError as e:  # MicaInputError included
                    last = e
                    stats.parse_failures += 1
            if aborted.is_set():
                raise stopped
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
    -2..0; other keys ignored). Anything else, JSON nested too deeply included, raises
    ``ValueError``.
    """
    text = content.strip()
    m = _FENCE.match(text)
    if m:
        text = m.group(1).strip()
    try:
        obj = json.loads(text)
        # Inside the try: a value nested almost to the recursion limit can still overflow
        # when an error message shows it.
        return parse_progress_rubric(obj, where="judge reply: ")
    except json.JSONDecodeError as e:
        raise ValueError(f"judge reply is not a JSON object ({e.msg}): {content[:80]!r}") from None
    except RecursionError:
        raise ValueError(f"judge reply is nested too deeply to read as JSON: "
                         f"{content[:80]!r}") from None


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
