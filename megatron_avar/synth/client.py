"""Teacher requests: an OpenAI-compatible chat client with retries, timeouts, a concurrency limit and a
resumable on-disk cache.

Cache: one JSON file per answered request, ``<work_dir>/cache/<stage>/<key[:2]>/<key>.json``, where the key
is the SHA-256 of (prompt version, stage, model, messages, sampling parameters, candidate, attempt). A file
is written (fsync, then atomic rename) the moment its answer arrives, so a run killed at any point has
kept every answer it paid for, and a rerun asks only for the rest. Failed requests are not cached. The
endpoint URL is not in the key: per-node servers of the same model share the cache.

A reply's ``usage`` is bookkeeping: when it is missing or is not token counts (``[1]``, ``{"prompt_tokens":
"lots"}``) the answer is still used, its tokens count as 0 and the answer as ``usage_unknown`` (ClientStats),
and the client warns once; asking again would pay for the same answer, and a server that sends no usable usage
would send none again.

Only the standard library speaks HTTP here (urllib), so the client has no dependency to pin. The API key is
read from the environment variable named in the config when the client is built; it is sent as a Bearer
token and appears in no message, log line, cache file or repr. It never leaves the endpoint's origin
(scheme, host, port): urllib's default redirect handler copies every header, Authorization included, to
whatever a Location names, so redirects are followed only within the origin and a redirect elsewhere is a
TeacherConfigError naming both URLs (issue 16).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import http.client
import json
import logging
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from megatron_avar import atomic_files
from megatron_avar.synth.config import ClientConfig, TeacherConfig

logger = logging.getLogger("megatron_avar.synth")
T = TypeVar("T")
R = TypeVar("R")

FATAL_HTTP_CODES = (401, 403, 404)
CUT_FINISH_REASONS = ("length", "content_filter")  # a reply stopped before its end: a failed request (``chat``)
READ_CHUNK = 65536  # bytes per read of a reply's body, between which the request's deadline is checked
EXAMPLE_CHARS = 200  # of a malformed reply, kept to be quoted in the run's error


class TeacherRequestError(Exception):
    """One request failed for good (retries exhausted or a non-retryable 4xx): its record is dropped.
    ``reason`` is the cause without per-request detail (e.g. "HTTP 400"), so equal causes count together."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message


class TeacherConfigError(ValueError):
    """The endpoint rejects every request (bad key, unknown model or URL): the run stops."""


@dataclasses.dataclass(frozen=True)
class ChatResult:
    content: str
    prompt_tokens: int
    completion_tokens: int
    cached: bool
    """True when the answer came from the cache (no request, no tokens spent by this run)."""


@dataclasses.dataclass
class ClientStats:
    """Counters of one client (thread-safe through ``add`` and ``fail``)."""

    requests: int = 0
    """HTTP requests sent, retries included."""
    answered: int = 0
    cache_hits: int = 0
    retries: int = 0
    failures: int = 0
    """Chat calls that raised TeacherRequestError (their records are dropped)."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usage_unknown: int = 0
    """Answers (fresh or cached) whose reply had no readable ``usage`` (missing, or not token counts): their
    tokens count as 0, so the token totals are short by these answers' tokens."""
    errors: dict = dataclasses.field(default_factory=dict)
    """Failures by TeacherRequestError.reason: what the end-of-run check reports as the most common error."""
    usable: int = 0
    """Questions (one record's or candidate's request, with its format retries) answered in the form asked
    for. This and the malformed counters are kept by the caller that parses the answers (synth.teachers)."""
    malformed: int = 0
    """Questions whose every answer was malformed (after client.format_retries); their records are dropped."""
    malformed_reasons: dict = dataclasses.field(default_factory=dict)
    """Malformed questions by the parser's reason (e.g. "no 'Final answer:' line")."""
    malformed_examples: dict = dataclasses.field(default_factory=dict)
    """The first malformed reply per reason (its first EXAMPLE_CHARS characters): what the end-of-run check
    quotes."""
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    def fail(self, error: TeacherRequestError) -> TeacherRequestError:
        """Count one failure and its reason; returns ``error`` for ``raise stats.fail(...)``."""
        with self._lock:
            self.failures += 1
            self.errors[error.reason] = self.errors.get(error.reason, 0) + 1
        return error

    def malformed_answer(self, reason: str, reply: str) -> None:
        """Count one question whose last answer was malformed for ``reason`` (``reply``: that answer)."""
        with self._lock:
            self.malformed += 1
            self.malformed_reasons[reason] = self.malformed_reasons.get(reason, 0) + 1
            self.malformed_examples.setdefault(reason, reply[:EXAMPLE_CHARS])

    def as_dict(self) -> dict:
        with self._lock:
            return {f.name: dict(value) if isinstance(value := getattr(self, f.name), dict) else value
                    for f in dataclasses.fields(self) if not f.name.startswith("_")}


class RequestCache:
    """Content-addressed store of teacher answers (see module docstring)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    @staticmethod
    def key(**fields) -> str:
        blob = json.dumps(fields, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def _path(self, stage: str, key: str) -> Path:
        return self.root / stage / key[:2] / f"{key}.json"

    def get(self, stage: str, key: str) -> dict | None:
        path = self._path(stage, key)
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            # Cannot happen with the atomic write below unless the file was edited; ask again.
            logger.warning("request cache: ignoring unreadable entry %s", path)
            return None

    def put(self, stage: str, key: str, entry: dict) -> None:
        atomic_files.write_json(self._path(stage, key), entry, indent=None, ensure_ascii=False)

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob("*/*/*.json"))


def chat_url(teacher: TeacherConfig) -> str:
    """Where a teacher's chat requests go."""
    return teacher.base_url.rstrip("/") + "/chat/completions"


def _origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of ``url``, default ports filled in: two URLs may share credentials only if equal."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port or {"http": 80, "https": 443}.get(scheme)
    except ValueError:  # a malformed port: an origin equal to no other
        port = -1
    return scheme, (parts.hostname or "").lower(), port


def _without_userinfo(url: str) -> str:
    """``url`` for an error message: a Location may carry user:password@ and the message may be logged."""
    parts = urllib.parse.urlsplit(url)
    return parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]).geturl()


class _CrossOriginRedirect(Exception):
    def __init__(self, code: int, source: str, target: str):
        super().__init__(code, source, target)
        self.code, self.source, self.target = code, source, target


class _SameOriginRedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only within the request's origin (module docstring); anything else raises
    _CrossOriginRedirect before a byte goes to the other server."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if _origin(newurl) != _origin(req.full_url):
            fp.close()  # the base class reads and closes it only when it follows the redirect
            raise _CrossOriginRedirect(code, req.full_url, newurl)
        if code in (307, 308) and req.get_method() == "POST":
            # 307/308 mean "the same request again, there" (RFC 9110 §15.4.8/9); urllib refuses them for a POST,
            # and 301/302/303 become a bodiless GET, which no chat endpoint answers.
            return urllib.request.Request(newurl, data=req.data, headers=req.headers,
                                          origin_req_host=req.origin_req_host,
                                          unverifiable=True, method="POST")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class ChatClient:
    """Sends chat requests for one pipeline stage to one teacher.

    ``chat`` returns the answer text (cached or fresh) or raises TeacherRequestError after
    ``client.max_retries`` retries; ``map`` runs a function over items with at most
    ``client.concurrency`` requests in flight. ``config_key`` is the config section of the endpoint, named in
    error messages (default ``<stage>.teacher``; `avar eval --judge` uses this client too, with ``endpoint``).
    """

    def __init__(self, stage: str, teacher: TeacherConfig, client: ClientConfig, cache: RequestCache,
                 prompt_version: str, stats: ClientStats | None = None, *, config_key: str | None = None,
                 url_in_cache_key: bool = False):
        self.stage, self.teacher, self.client, self.cache = stage, teacher, client, cache
        # The synthesis leaves the URL out (per-node servers of one model share a cache); the answer judge keeps it
        # in, since its scores name the URL as part of the judge.
        self.url_in_cache_key = url_in_cache_key
        self.prompt_version = prompt_version
        self.config_key = config_key or f"{stage}.teacher"
        self.stats = stats if stats is not None else ClientStats()
        self._url = chat_url(teacher)
        self._opener = urllib.request.build_opener(_SameOriginRedirectHandler)
        self._api_key = os.environ.get(teacher.api_key_env) if teacher.api_key_env else None
        self._usage_warned = False
        if teacher.api_key_env and not self._api_key:
            raise TeacherConfigError(f"{stage} teacher: environment variable {teacher.api_key_env!r} (named by "
                                     f"{self.config_key}.api_key_env) is not set")

    def __repr__(self) -> str:  # never show the key
        return f"ChatClient(stage={self.stage!r}, model={self.teacher.model!r}, url={self._url!r})"

    def _body(self, messages: list[dict], candidate: int, attempt: int) -> dict:
        teacher = self.teacher
        return {**teacher.extra_body, "model": teacher.model, "messages": messages,
                "temperature": teacher.temperature, "top_p": teacher.top_p, "max_tokens": teacher.max_tokens,
                "seed": teacher.seed + candidate + 1000 * attempt}

    def chat(self, messages: list[dict], *, candidate: int = 0, attempt: int = 0) -> ChatResult:
        body = self._body(messages, candidate, attempt)
        fields = {"url": self._url} if self.url_in_cache_key else {}
        key = RequestCache.key(prompt_version=self.prompt_version, stage=self.stage, body=body, **fields)
        entry = self.cache.get(self.stage, key)
        if entry is not None:
            self.stats.add(cache_hits=1, usage_unknown=int(bool(entry.get("usage_unknown"))))
            return ChatResult(entry["content"], entry["prompt_tokens"], entry["completion_tokens"], cached=True)
        response = self._post_with_retries(body)
        try:
            content = response["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            content = None
        try:
            finish_reason = response["choices"][0].get("finish_reason")
        except (KeyError, IndexError, TypeError, AttributeError):
            finish_reason = None
        if finish_reason in CUT_FINISH_REASONS or not isinstance(content, str):
            # A reply cut short is no answer, even with text (a description cut mid-section still has its headings, a
            # chain cut after an early "Final answer:" still parses): not cached, and not asked again, since the same
            # request (its seed) is cut the same way. A reasoning model that spends max_tokens thinking has no content.
            if finish_reason == "length":
                reason = (f"{'' if isinstance(content, str) else 'no content: '}the reply was cut at max_tokens="
                          f"{self.teacher.max_tokens} (raise {self.config_key}.max_tokens)")
            elif finish_reason == "content_filter":
                reason = "the endpoint's content filter stopped the reply (finish_reason content_filter)"
            else:
                reason = "response without choices[0].message.content"
            raise self.stats.fail(TeacherRequestError(f"{self.stage}: {reason}", reason))
        tokens = _token_counts(response.get("usage"))
        if tokens is None:
            self._warn_usage_unknown(response.get("usage"))
        prompt_tokens, completion_tokens = tokens or (0, 0)
        result = ChatResult(content, prompt_tokens, completion_tokens, cached=False)
        stored = {"content": content, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "model": self.teacher.model, "prompt_version": self.prompt_version, "time": time.time()}
        self.cache.put(self.stage, key, stored if tokens is not None else {**stored, "usage_unknown": True})
        self.stats.add(answered=1, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                       usage_unknown=int(tokens is None))
        return result

    def _warn_usage_unknown(self, usage) -> None:
        """Say once per client that replies come without readable token counts (the run goes on: see
        ``_token_counts``)."""
        if not self._usage_warned:  # (two threads may both warn: harmless)
            self._usage_warned = True
            logger.warning("%s teacher %r at %s: a reply's usage is %s, not token counts; its answer is used, and the "
                           "tokens of such replies count as 0 (counted as usage_unknown; token totals are short by "
                           "them)", self.stage, self.teacher.model, self._url, _short_repr(usage))

    def _post_with_retries(self, body: dict) -> dict:
        data = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        for attempt in range(self.client.max_retries + 1):
            retry_after, unreachable = None, False
            self.stats.add(requests=1)
            try:
                return json.loads(self._post_once(data, headers).decode("utf-8"))
            except _CrossOriginRedirect as redirect:
                # Every request would be sent there, so the run stops rather than drop every record.
                target = _without_userinfo(redirect.target)
                raise TeacherConfigError(
                    f"{self.stage} teacher {self.teacher.model!r}: {self._url} answered HTTP {redirect.code}, "
                    f"a redirect to {target}, another origin (scheme, host, port); not followed, so the request and "
                    f"its API key stay with {self._url}. If {target} is the teacher, set {self.config_key}.base_url "
                    f"to it (without /chat/completions)") from None
            except http.client.InvalidURL as error:  # a port "80OO" (TeacherConfig.validate refuses it)
                raise TeacherConfigError(f"{self.stage} teacher: {self._url} is not a usable URL ({error}); fix "
                                         f"{self.config_key}.base_url") from None
            except urllib.error.HTTPError as error:
                if error.code in FATAL_HTTP_CODES:
                    hint = (f"check the key in ${self.teacher.api_key_env}" if self.teacher.api_key_env
                            else f"set {self.config_key}.api_key_env if the endpoint needs a key")
                    raise TeacherConfigError(
                        f"{self.stage} teacher {self.teacher.model!r} at {self._url}: HTTP {error.code} "
                        f"(wrong URL or model name, or {hint})") from None
                if error.code != 429 and error.code < 500:
                    raise self.stats.fail(TeacherRequestError(f"{self.stage}: HTTP {error.code} ({_short(error)})",
                                                              f"HTTP {error.code}")) from None
                reason = f"HTTP {error.code}"
                retry_after = _retry_after(error)
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException,
                    json.JSONDecodeError, UnicodeDecodeError) as error:
                if isinstance(error, urllib.error.URLError) and isinstance(error.reason, str):
                    # urllib's own refusals of the URL ("no host given", "unknown url type"), not network errors
                    raise TeacherConfigError(f"{self.stage} teacher: {self._url} is not a usable URL ({error.reason}); "
                                             f"fix {self.config_key}.base_url") from None
                reason = (f"URLError({error.reason})" if isinstance(error, urllib.error.URLError)
                          else type(error).__name__)
                unreachable = _nothing_listens(error)
            if attempt == self.client.max_retries:
                if unreachable and not self.stats.answered:
                    # Every request would give up the same way, each after its retries: minutes to hours for a
                    # dataset, before the end-of-run check would name the endpoint.
                    raise TeacherConfigError(
                        f"{self.stage} teacher {self.teacher.model!r}: nothing answers at {self._url} ({reason}, "
                        f"{attempt + 1} attempt{'s' * (attempt > 0)}, no request of this run answered); start the "
                        f"server, or fix {self.config_key}.base_url") from None
                reason = f"gave up after {attempt + 1} attempts (last: {reason})"
                raise self.stats.fail(TeacherRequestError(f"{self.stage}: {reason}", reason))
            delay = min(self.client.backoff_max_s, self.client.backoff_initial_s * 2 ** attempt)
            delay = retry_after if retry_after is not None else delay * random.uniform(0.5, 1.0)
            logger.debug("%s: %s, retry %d in %.2fs", self.stage, reason, attempt + 1, delay)
            self.stats.add(retries=1)
            time.sleep(min(delay, self.client.backoff_max_s))
        raise AssertionError("unreachable")

    def _post_once(self, data: bytes, headers: dict) -> bytes:
        """One attempt's reply body. TimeoutError once client.timeout_s has passed since the attempt began, however
        the server sends it: a server that sends a byte at a time never trips a socket's per-read timeout, so the body
        is read in chunks, each read waiting at most the time left."""
        deadline = time.monotonic() + self.client.timeout_s
        request = urllib.request.Request(self._url, data=data, headers=headers, method="POST")
        with self._opener.open(request, timeout=self.client.timeout_s) as response:
            # The reply's socket (http.client keeps it only in its reader), to bound each read by the time left.
            sock = getattr(getattr(response.fp, "raw", None), "_sock", None)
            chunks = []
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no whole reply within client.timeout_s={self.client.timeout_s}")
                if sock is not None:
                    sock.settimeout(left)
                chunk = response.read1(READ_CHUNK)
                if not chunk:
                    return b"".join(chunks)
                chunks.append(chunk)

    def map(self, function: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """``[function(item) for item in items]`` with at most ``concurrency`` calls running at once.
        The first TeacherConfigError stops the map and is raised."""
        items = list(items)
        if self.client.concurrency == 1 or len(items) <= 1:
            return [function(item) for item in items]
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.client.concurrency) as pool:
            futures = [pool.submit(function, item) for item in items]
            try:
                return [future.result() for future in futures]
            except BaseException:
                for future in futures:
                    future.cancel()
                raise


def _token_counts(usage) -> tuple[int, int] | None:
    """(prompt_tokens, completion_tokens) of a reply's ``usage``, or None when it is missing or is not a mapping of
    two non-negative integers. Usage is bookkeeping: an answer whose content is fine is used whatever its usage
    says (asking again would pay for the same answer, likely with the same usage), and its tokens count as
    unknown (ClientStats.usage_unknown) rather than as a guess."""
    if not isinstance(usage, dict):
        return None
    prompt, completion = _token_count(usage.get("prompt_tokens")), _token_count(usage.get("completion_tokens"))
    return None if prompt is None or completion is None else (prompt, completion)


def _token_count(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _short_repr(value, limit: int = 80) -> str:
    text = "missing" if value is None else repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _nothing_listens(error: BaseException) -> bool:
    """Whether a request failed because no server is there: the connection refused, or the host name unknown."""
    cause = error.reason if isinstance(error, urllib.error.URLError) else error
    return isinstance(cause, (ConnectionRefusedError, socket.gaierror))


def _retry_after(error: urllib.error.HTTPError) -> float | None:
    value = error.headers.get("Retry-After") if error.headers else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _short(error: urllib.error.HTTPError) -> str:
    try:
        return error.read(300).decode("utf-8", "replace").strip() or error.reason
    except Exception:  # noqa: BLE001 - only decorates an error message
        return str(error.reason)
