"""A deterministic OpenAI-compatible chat server on localhost, for the synthesis tests.

It answers the way the teachers are asked to, from what the request contains:
- describe (a request with an image): looks the image's bytes up in ``facts`` (sha256 -> answer), as a
  stand-in for seeing it, and writes the four-section description stating the value the question asks for;
- reason (text with "Question:"): reads that value back out of the description in the prompt and writes a
  reflective chain ending in "Final answer: <value>" (so a lost or wrong description gives a wrong chain);
- anchor (a request with <chain>): inserts 1 + (seed % 3) "<anchor>…</anchor>" sentences into the chain.

Faults make it misbehave for chosen requests: HTTP 429/500, a reply slower than the client's timeout (silent, or
dripping in), malformed content, replies cut short, non-JSON bodies, wrong answers, gutted anchor rewrites. Every
request is logged; ``ok_by_body`` counts the answers (200 with a completion, even a bad one) per request body: how
the tests prove that nothing paid for is asked twice.
A subclass answers other requests (tests/eval's fake answer judge) by overriding ``classify`` and ``answer``.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import http.server
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Callable


@dataclasses.dataclass
class Fault:
    """Misbehave for requests of ``stage`` whose question contains ``match`` (and, if given, whose seed is
    ``seed``): the n-th such request (per question) gets ``kinds[n]``; afterwards it is answered normally,
    unless ``always`` (then the last kind repeats forever). Kinds: "429", "500", "timeout", "drip" (the reply sent a
    few bytes at a time over slow_s), "cut" (no content, finish_reason length), "cut_text" (half the answer,
    finish_reason length), "filtered" (the answer, finish_reason content_filter), "malformed", "garbage" (a non-JSON
    body), "wrong" (reason: a wrong final answer), "gutted" (anchor: only anchors and the final-answer line), "ok"."""

    stage: str
    kinds: list[str]
    match: str = ""
    seed: int | None = None
    always: bool = False


def stage_of(body: dict) -> str:
    user = body["messages"][-1]["content"]
    if isinstance(user, list):
        return "describe"
    return "anchor" if "<chain>" in user else "reason"


def question_of(body: dict, stage: str) -> str:
    user = body["messages"][-1]["content"]
    if stage == "describe":
        text = next(item["text"] for item in user if item["type"] == "text")
        return text.rsplit("used for is:\n", 1)[-1].strip()
    return re.search(r"Question:\n(.*?)\n\n", user, re.DOTALL).group(1).strip()


def wrong(answer: str) -> str:
    return str(int(answer) + 1) if answer.isdigit() else f"not {answer}"


class FakeTeacher:
    def __init__(self, facts: dict[str, str], *, api_key: str | None = None, slow_s: float = 1.5):
        self.facts, self.api_key, self.slow_s = facts, api_key, slow_s
        self.faults: list[Fault] = []
        self.log: list[dict] = []
        self.ok_by_body: Counter = Counter()
        self.in_flight = self.max_in_flight = 0
        self.hold_after: int | None = None  # after this many normal answers, park new requests ...
        self.release = threading.Event()    # ... until this is set; they then get HTTP 503 (never paid for)
        self._fault_uses: Counter = Counter()
        self._lock = threading.Lock()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> FakeTeacher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()

    def requests(self, stage: str | None = None, status: str | None = None) -> list[dict]:
        with self._lock:
            return [r for r in self.log
                    if (stage is None or r["stage"] == stage) and (status is None or r["status"] == status)]

    def settle(self, timeout_s: float = 10.0) -> list[dict]:
        """The log once no request is being handled (a handler sleeping through a "timeout" logs late)."""
        deadline = time.time() + timeout_s
        while self.in_flight and time.time() < deadline:
            time.sleep(0.02)
        return self.requests()

    @property
    def num_ok(self) -> int:
        with self._lock:
            return sum(self.ok_by_body.values())

    def _fault_for(self, stage: str, question: str, seed: int) -> str | None:
        with self._lock:
            for index, fault in enumerate(self.faults):
                seed_differs = fault.seed is not None and fault.seed != seed
                if fault.stage != stage or fault.match not in question or seed_differs:
                    continue
                uses = self._fault_uses[(index, question)]
                self._fault_uses[(index, question)] += 1
                if uses < len(fault.kinds):
                    return fault.kinds[uses]
                if fault.always:
                    return fault.kinds[-1]
        return None

    def classify(self, body: dict) -> tuple[str, str]:
        """(stage, question) of a request: what faults match and the log records."""
        stage = stage_of(body)
        return stage, question_of(body, stage)

    def respond(self, body: dict) -> tuple[int, str, str]:
        """(HTTP status, response body, status label for the log) for one request."""
        stage, question = self.classify(body)
        seed = body.get("seed", 0)
        fault = self._fault_for(stage, question, seed)
        if fault in ("429", "500"):
            return int(fault), json.dumps({"error": {"message": "busy"}}), fault
        if fault == "garbage":
            return 200, "<html>proxy error</html>", "garbage"
        if fault == "cut":  # a reasoning model that spent max_tokens thinking: no content
            return 200, json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": None},
                                                 "finish_reason": "length"}]}), "cut"
        if fault == "timeout":
            time.sleep(self.slow_s)
        text = self.answer(body, stage, question, seed, fault)
        finish_reason = {"cut_text": "length", "filtered": "content_filter"}.get(fault or "", "stop")
        if fault == "cut_text":  # a reply that ran out of max_tokens halfway
            text = text[:len(text) // 2]
        completion = {"id": "chatcmpl-fake", "object": "chat.completion", "model": body["model"],
                      "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                   "finish_reason": finish_reason}],
                      "usage": {"prompt_tokens": len(json.dumps(body["messages"])) // 4,
                                "completion_tokens": len(text) // 4}}
        return 200, json.dumps(completion), fault or "ok"

    def answer(self, body: dict, stage: str, question: str, seed: int, fault: str | None) -> str:
        """The completion text of a request that gets one (``fault``: None or a kind that still answers)."""
        user = body["messages"][-1]["content"]
        if stage == "describe":
            image_url = next(item["image_url"]["url"] for item in user if item["type"] == "image_url")
            sha = hashlib.sha256(base64.b64decode(image_url.split(",", 1)[1])).hexdigest()
            value = self.facts.get(sha, "unknown")
            sections = [("Global scan", "A synthetic figure on a light background."),
                        ("Elements", f"The element the question asks about shows the value {value}."),
                        ("Relations", "The elements are laid out on a grid without overlaps."),
                        ("Scene", "A small visual puzzle.")]
            if fault == "malformed":
                sections = sections[:2]
            text = "\n".join(f"## {title}\n{content}" for title, content in sections)
        elif stage == "reason":
            found = re.search(r"shows the value (.+?)\.\n", user)
            value = found.group(1) if found else "unknown"
            answer = wrong(value) if fault == "wrong" else value
            lines = [f"The question asks: {question}", f"From the figure, the relevant element shows {value}.",
                     "Wait, let me double-check that I read the right element. Yes, that is the one asked about.",
                     f"So the answer is {answer}."]
            if fault != "malformed":
                lines.append(f"Final answer: {answer}")
            text = "\n".join(lines)
        else:
            chain = re.search(r"<chain>\n(.*)\n</chain>", user, re.DOTALL).group(1)
            lines = chain.split("\n")
            anchors = 1 + seed % 3
            inserted = [f"<anchor>Looking at the figure again (check {i + 1}), the element is where I said.</anchor>"
                        for i in range(anchors)]
            if fault == "malformed":
                inserted = ["<anchor>Looking at the figure again, it matches."]  # unclosed tag
            if fault == "gutted":  # the reasoning dropped: anchors and the answer line, which still parse
                lines = [lines[0], lines[-1]]
            text = "\n".join(lines[:1] + inserted + lines[1:])
        return text

    def _handler_class(self):
        teacher = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if not self.path.endswith("/chat/completions"):
                    return self._send(404, "{}")
                if teacher.api_key is not None and self.headers.get("Authorization") != f"Bearer {teacher.api_key}":
                    return self._send(401, json.dumps({"error": "bad key"}))
                body = json.loads(raw)
                digest = hashlib.sha256(raw).hexdigest()
                with teacher._lock:
                    teacher.in_flight += 1
                    teacher.max_in_flight = max(teacher.max_in_flight, teacher.in_flight)
                    parked = teacher.hold_after is not None and sum(teacher.ok_by_body.values()) >= teacher.hold_after
                try:
                    if parked:
                        teacher.release.wait()
                        status, payload, label = 503, "{}", "parked"
                    else:
                        status, payload, label = teacher.respond(body)
                    # Logged before the reply is sent, so a client that has its answer finds it counted.
                    with teacher._lock:
                        stage, question = teacher.classify(body)
                        teacher.log.append({"stage": stage, "question": question, "seed": body.get("seed"),
                                            "status": label, "body": digest, "time": time.time()})
                        if label in ("ok", "wrong", "malformed", "gutted", "cut_text", "filtered", "drip"):
                            teacher.ok_by_body[digest] += 1
                    self._send(status, payload, teacher.slow_s if label == "drip" else 0.0)
                finally:
                    with teacher._lock:
                        teacher.in_flight -= 1

            def _send(self, status: int, payload: str, drip_s: float = 0.0) -> None:
                """Send the reply; with ``drip_s`` its body in 20 pieces spread over drip_s seconds."""
                data = payload.encode("utf-8")
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if not drip_s:
                        self.wfile.write(data)
                        return
                    step = -(-len(data) // 20)
                    for start in range(0, len(data), step):
                        self.wfile.write(data[start:start + step])
                        self.wfile.flush()
                        time.sleep(drip_s / 20)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout) or was killed

        return Handler


class RecordingServer:
    """A bare HTTP server on localhost that records every request (method, path, headers) and answers it
    with HTTP ``code`` and a Location header when ``redirect(path)`` gives one, else with a fixed chat
    completion. Stands in for both ends of a redirect in the credential tests."""

    def __init__(self, *, redirect: Callable[[str], str | None] = lambda path: None, code: int = 302):
        self.redirect, self.code = redirect, code
        self.received: list[dict] = []
        self._lock = threading.Lock()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def base_url(self) -> str:
        return f"{self.origin}/v1"

    def __enter__(self) -> RecordingServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler_class(self):
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _answer(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with server._lock:
                    server.received.append({"method": self.command, "path": self.path, "headers": dict(self.headers)})
                location = server.redirect(self.path)
                if location is not None:
                    self.send_response(server.code)
                    self.send_header("Location", location)
                    data = b""
                else:
                    data = json.dumps({"choices": [{"message": {"role": "assistant", "content": "Final answer: 1"}}],
                                       "usage": {"prompt_tokens": 1, "completion_tokens": 1}}).encode("utf-8")
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer  # noqa: N815 (a 302 turns urllib's POST into a GET)

        return Handler
