"""The teacher client over real HTTP against the fake OpenAI-compatible server: retries on 429/500/
timeouts/garbage, giving up, fatal auth errors, the request cache, the concurrency limit, the API key
(never sent to another origin by a redirect)."""

from __future__ import annotations

import logging

import pytest

from megatron_avar.synth import prompts
from megatron_avar.synth.client import ChatClient, RequestCache, TeacherConfigError, TeacherRequestError
from megatron_avar.synth.config import ClientConfig, TeacherConfig
from synth_fake_teacher import FakeTeacher, Fault, RecordingServer

QUESTION = "How many pink shapes are in the image?"


def make_client(tmp_path, server, *, stage="reason", concurrency=2, timeout_s=5.0, max_retries=3, api_key_env=None,
                base_url=None):
    teacher = TeacherConfig(model="teacher-x", base_url=base_url or server.base_url, api_key_env=api_key_env)
    client = ClientConfig(concurrency=concurrency, timeout_s=timeout_s, max_retries=max_retries,
                          backoff_initial_s=0.01, backoff_max_s=0.05)
    return ChatClient(stage, teacher, client, RequestCache(tmp_path / "cache"), "v1")


def reason_messages(question=QUESTION, value="1"):
    description = f"## Elements\nThe element the question asks about shows the value {value}.\n"
    return prompts.reason_messages("v1", question, description)


@pytest.fixture
def server():
    with FakeTeacher({}) as fake:
        yield fake


def test_transient_errors_are_retried_then_answered_once(tmp_path, server):
    server.faults.append(Fault("reason", ["429", "500", "garbage"]))
    client = make_client(tmp_path, server)
    result = client.chat(reason_messages())
    assert result.content.endswith("Final answer: 1") and not result.cached
    assert [r["status"] for r in server.requests()] == ["429", "500", "garbage", "ok"]
    assert client.stats.retries == 3 and client.stats.requests == 4 and client.stats.answered == 1
    assert result.completion_tokens > 0 and client.stats.completion_tokens == result.completion_tokens


def test_timeout_is_retried(tmp_path, server):
    server.slow_s = 1.0
    server.faults.append(Fault("reason", ["timeout"]))
    client = make_client(tmp_path, server, timeout_s=0.3)
    assert client.chat(reason_messages()).content.endswith("Final answer: 1")
    assert sorted(r["status"] for r in server.settle()) == ["ok", "timeout"]
    assert client.stats.retries == 1


def test_gives_up_after_max_retries_and_caches_nothing(tmp_path, server):
    server.faults.append(Fault("reason", ["500"], always=True))
    client = make_client(tmp_path, server, max_retries=2)
    with pytest.raises(TeacherRequestError, match="gave up after 3 attempts"):
        client.chat(reason_messages())
    assert len(server.requests()) == 3 and len(client.cache) == 0
    server.faults.clear()
    assert client.chat(reason_messages()).content  # asked again, since the failure was not cached
    assert len(server.requests()) == 4


def test_a_reply_cut_at_max_tokens_names_the_setting_to_raise(tmp_path, server):
    server.faults.append(Fault("reason", ["cut"], always=True))
    client = make_client(tmp_path, server)
    with pytest.raises(TeacherRequestError, match=r"cut at max_tokens=\d+ \(raise reason.teacher.max_tokens\)"):
        client.chat(reason_messages())


def test_cache_answers_repeats_without_a_request(tmp_path, server):
    client = make_client(tmp_path, server)
    first = client.chat(reason_messages())
    again = make_client(tmp_path, server).chat(reason_messages())  # a new client: the cache is on disk
    assert again.cached and again.content == first.content and len(server.requests()) == 1
    # Another candidate (seed) or another attempt is another request.
    client.chat(reason_messages(), candidate=1)
    client.chat(reason_messages(), attempt=1)
    assert sorted(r["seed"] for r in server.requests()) == [0, 1, 1000]
    assert len(client.cache) == 3


def test_concurrency_limit(tmp_path, server):
    server.slow_s = 0.2
    server.faults.append(Fault("reason", ["timeout"], always=True))  # every answer takes 0.2 s
    client = make_client(tmp_path, server, concurrency=3)
    questions = [f"Question number {i}?" for i in range(9)]
    answers = client.map(lambda q: client.chat(reason_messages(q)).content, questions)
    assert [a.splitlines()[0] for a in answers] == [f"The question asks: {q}" for q in questions]
    assert server.max_in_flight == 3


def test_api_key_is_sent_but_never_written(tmp_path, monkeypatch, caplog):
    secret = "sk-test-DO-NOT-LEAK-1234"
    monkeypatch.setenv("SYNTH_TEST_KEY", secret)
    with FakeTeacher({}, api_key=secret) as server, caplog.at_level(logging.DEBUG):
        server.faults.append(Fault("reason", ["500"]))
        client = make_client(tmp_path, server, api_key_env="SYNTH_TEST_KEY")
        assert client.chat(reason_messages()).content
        assert secret not in repr(client)
        monkeypatch.setenv("SYNTH_TEST_KEY", "sk-wrong")
        with pytest.raises(TeacherConfigError, match="HTTP 401") as error:
            make_client(tmp_path, server, api_key_env="SYNTH_TEST_KEY").chat(reason_messages("Another?"))
    assert "sk-wrong" not in str(error.value) and "SYNTH_TEST_KEY" in str(error.value)
    assert secret not in caplog.text
    for path in (tmp_path / "cache").rglob("*"):
        if path.is_file():
            assert secret not in path.read_text()


def test_missing_api_key_env_is_a_config_error(tmp_path, server, monkeypatch):
    monkeypatch.delenv("SYNTH_ABSENT_KEY", raising=False)
    with pytest.raises(TeacherConfigError, match="SYNTH_ABSENT_KEY"):
        make_client(tmp_path, server, api_key_env="SYNTH_ABSENT_KEY")


def test_map_stops_on_a_fatal_error(tmp_path):
    with FakeTeacher({}, api_key="right") as server:
        client = make_client(tmp_path, server, concurrency=2)
        with pytest.raises(TeacherConfigError):
            client.map(lambda q: client.chat(reason_messages(q)), [f"q{i}?" for i in range(6)])
        assert {r["status"] for r in server.requests()} <= {"ok"} and client.stats.answered == 0


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_redirect_to_another_origin_is_refused_and_gets_no_key(tmp_path, monkeypatch, code):
    """Fault injection (issue 16): a 302 to another host:port received the Bearer key. Now a redirect that
    leaves the endpoint's origin is a config error naming both URLs, and the other server hears nothing."""
    secret = "sk-test-REDIRECT-5678"
    monkeypatch.setenv("SYNTH_TEST_KEY", secret)
    with RecordingServer() as target, RecordingServer(redirect=lambda path: target.origin + path, code=code) as source:
        client = make_client(tmp_path, source, api_key_env="SYNTH_TEST_KEY")
        with pytest.raises(TeacherConfigError) as error:
            client.chat(reason_messages())
        message = str(error.value)
        assert f"{source.base_url}/chat/completions" in message and f"{target.base_url}/chat/completions" in message
        assert "another origin" in message and "reason.teacher.base_url" in message and secret not in message
        assert [r["path"] for r in source.received] == ["/v1/chat/completions"]  # asked once: not retried
        assert source.received[0]["headers"]["Authorization"] == f"Bearer {secret}"
        assert target.received == []
        assert client.stats.requests == 1 and client.stats.failures == 0 and len(client.cache) == 0


def test_same_origin_redirect_keeps_the_post_and_the_key(tmp_path, monkeypatch):
    """A 307/308 within the endpoint's origin (e.g. a proxy moving the API path) is followed as the same
    POST, body and key included."""
    monkeypatch.setenv("SYNTH_TEST_KEY", "sk-same-origin")
    moved = lambda path: path.replace("/old", "", 1) if path.startswith("/old/") else None  # noqa: E731
    with RecordingServer(redirect=moved, code=307) as server:
        client = make_client(tmp_path, server, api_key_env="SYNTH_TEST_KEY", base_url=server.origin + "/old/v1")
        assert client.chat(reason_messages()).content == "Final answer: 1"
    assert [(r["method"], r["path"]) for r in server.received] == [("POST", "/old/v1/chat/completions"),
                                                                  ("POST", "/v1/chat/completions")]
    assert all(r["headers"]["Authorization"] == "Bearer sk-same-origin" for r in server.received)


class UsageServer(FakeTeacher):
    """The fake teacher, its replies' ``usage`` replaced by ``usage`` (absent when ``MISSING``)."""

    MISSING = object()
    usage = MISSING

    def respond(self, body: dict) -> tuple[int, str, str]:
        import json

        status, payload, label = super().respond(body)
        reply = json.loads(payload)
        reply.pop("usage")
        if self.usage is not self.MISSING:
            reply["usage"] = self.usage
        return status, json.dumps(reply), label


@pytest.mark.parametrize("usage", [[1], {"prompt_tokens": "lots", "completion_tokens": 3}, "12",
                                   {"prompt_tokens": -1, "completion_tokens": 3}, {"prompt_tokens": 2.5},
                                   {"prompt_tokens": True, "completion_tokens": 1}, None, UsageServer.MISSING])
def test_a_malformed_usage_counts_as_unknown_and_the_answer_is_used(tmp_path, usage, caplog):
    """Found in review: a 200 reply with ``"usage": [1]`` raised a raw AttributeError, and ``{"prompt_tokens":
    "lots"}`` "invalid literal for int()", out of `avar synth` (and `avar eval --judge`, which uses this client).
    Usage is bookkeeping: the answer is used (asking again would pay for it twice), its tokens count as 0, the
    reply as usage_unknown (also when it comes from the cache), and the client warns once."""
    with UsageServer({}) as server, caplog.at_level(logging.WARNING, logger="megatron_avar.synth"):
        server.usage = usage
        client = make_client(tmp_path, server)
        first, second = client.chat(reason_messages()), client.chat(reason_messages("Another?"))
        rerun = make_client(tmp_path, server)
        cached = rerun.chat(reason_messages())
    assert first.content.endswith("Final answer: 1") and second.content and cached.content == first.content
    assert (first.prompt_tokens, first.completion_tokens, cached.cached) == (0, 0, True)
    assert client.stats.answered == 2 and client.stats.failures == 0 and client.stats.usage_unknown == 2
    assert (client.stats.prompt_tokens, client.stats.completion_tokens) == (0, 0)
    assert rerun.stats.cache_hits == 1 and rerun.stats.usage_unknown == 1
    warnings = [r.getMessage() for r in caplog.records if "usage" in r.getMessage()]
    assert len(warnings) == 1 and "not token counts; its answer is used" in warnings[0]  # once per client


def test_a_well_formed_usage_is_counted(tmp_path, server):
    client = make_client(tmp_path, server)
    result = client.chat(reason_messages())
    assert result.prompt_tokens > 0 and result.completion_tokens > 0 and client.stats.usage_unknown == 0
    assert make_client(tmp_path, server).chat(reason_messages()).prompt_tokens == result.prompt_tokens


@pytest.mark.parametrize("kind, message", [
    ("cut_text", r"^reason: the reply was cut at max_tokens=4096 \(raise reason.teacher.max_tokens\)$"),
    ("filtered", r"^reason: the endpoint's content filter stopped the reply \(finish_reason content_filter\)$")])
def test_a_reply_with_text_stopped_short_is_a_failed_request_not_cached_nor_asked_again(tmp_path, server, kind,
                                                                                       message):
    """Found in review: finish_reason was read only when a reply had no content, so a reply cut at max_tokens with
    text (a description cut mid-section still has its four headings; a chain cut after an early "Final answer:"
    still parses) was used, counted usable and cached for every rerun. The same request (its seed) is cut the same
    way, so it is not retried either: the record is dropped, and the error names the setting to raise."""
    from megatron_avar.synth.records import new_row
    from megatron_avar.synth.teachers import _ask, parse_chain

    server.faults.append(Fault("reason", [kind], always=True))
    client = make_client(tmp_path, server)
    with pytest.raises(TeacherRequestError, match=message):
        _ask(client, new_row(id="x"), reason_messages(), parse_chain, format_retries=2)
    assert [r["status"] for r in server.requests()] == [kind]  # neither a network retry nor a format retry
    assert len(client.cache) == 0 and (client.stats.failures, client.stats.usable, client.stats.answered) == (1, 0, 0)
    server.faults.clear()
    assert client.chat(reason_messages()).content.endswith("Final answer: 1")  # a rerun asks again


def test_a_reply_that_drips_in_is_cut_off_at_timeout_s(tmp_path, server):
    """Found in review: client.timeout_s bounded each socket read, so a server sending a few bytes at a time held a
    request as long as it liked (timeout 1 s: 17 s). Now it bounds the whole attempt, which is retried."""
    import time

    server.slow_s = 3.0
    server.faults.append(Fault("reason", ["drip"]))
    client = make_client(tmp_path, server, timeout_s=0.5)
    started = time.monotonic()
    assert client.chat(reason_messages()).content.endswith("Final answer: 1")
    assert time.monotonic() - started < 2.0 and client.stats.retries == 1
    assert [r["status"] for r in server.requests()] == ["drip", "ok"]


@pytest.mark.parametrize("url, why", [("http://", "no host given"), ("http://localhost:80OO/v1", "nonnumeric port")])
def test_a_url_urllib_cannot_use_is_a_config_error_at_once(tmp_path, url, why):
    """Found in review: "http://" or a port "80OO" was retried like a server that does not answer (~45 s per record
    by default). TeacherConfig.validate refuses them; a client built from an unchecked config stops at once."""
    teacher = TeacherConfig(model="teacher-x", base_url=url)
    client = ChatClient("reason", teacher, ClientConfig(max_retries=3), RequestCache(tmp_path / "cache"), "v1")
    with pytest.raises(TeacherConfigError, match=rf"is not a usable URL \({why}.*\); fix reason.teacher.base_url$"):
        client.chat(reason_messages())
    assert client.stats.retries == 0
