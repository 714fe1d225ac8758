"""`avar synth` configuration: typed dataclasses, validated once.

Every field has a documented default; an example YAML (examples/synth/*.yaml) is a minimal diff over
them. Validation happens in ``__post_init__`` and raises ValueError naming the field (as a dotted path
such as ``reason.teacher.max_tokens``) and the allowed values. The project's one loader reads them
(``megatron_avar.config.load_config(SynthConfig, path, overrides)``): unknown keys are errors, a wrong type
names the key, the value and the file:line or override that set it, overrides index list items
(``sources.0.limit=100``), and a teacher section that sets some fields keeps its stage's defaults for the others.
"""

from __future__ import annotations

import dataclasses
import os
import urllib.parse
from pathlib import Path

from megatron_avar.config import refuse_unused_setting

EXECUTORS = ("xenna", "ray_data", "local")
SOURCE_FORMATS = ("conversations", "columns")
SELECT_RULES = ("most_anchors", "first")
# Request fields extra_body may not set: the client sets the first group itself (from the teacher's own fields), and
# the second changes the reply's shape (a stream of events, several or tool-call choices) or pays for generations
# the client never reads.
CLIENT_SET_FIELDS = ("model", "messages", "temperature", "top_p", "max_tokens", "seed")
REPLY_SHAPE_FIELDS = ("stream", "stream_options", "n", "best_of", "tools", "tool_choice", "functions", "function_call")


def _check(condition: bool, field: str, message: str) -> None:
    # No "synth config:" prefix: TeacherConfig and ClientConfig are also sections of `avar eval --judge`'s
    # config, and the field's dotted name already says where it is.
    if not condition:
        raise ValueError(f"{field} {message}")


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """One input dataset of (image, question, answer) records."""

    name: str
    """Source name: the key of this source's counts in the manifest, ``metadata.source`` of its records and the
    first part of their ids (``<name>/<record id>``), so it holds no "/" (and no ".")."""
    path: str
    """A .jsonl/.json/.parquet file, a folder of them, or a `datasets.save_to_disk` folder."""
    format: str = "conversations"
    """"conversations": the project's conversation format (first user turn = image + question, "answer"
    field = ground truth), e.g. `avar data generate` output. "columns": a flat table whose columns are
    named by image_column / question_column / answer_column (id_column optional); those four settings are
    refused away from their defaults with "conversations", which would ignore them."""
    image_column: str = "image"
    """Column with the image (path relative to the data file, or an HF Image struct); format "columns"."""
    question_column: str = "question"
    """Column with the question text; format "columns"."""
    answer_column: str = "answer"
    """Column with the ground-truth answer; format "columns"."""
    id_column: str | None = None
    """Column with a record id (default: "<name>-<row index>"); format "columns"."""
    limit: int | None = None
    """Read at most this many records (after nothing else; before dedup). None: all."""

    def __post_init__(self) -> None:
        _check(bool(self.name) and "." not in self.name, "sources[].name",
               f"must be a non-empty name without dots, got {self.name!r}")
        # "geo" with record "test/1" and "geo/test" with record "1" would both write the id "geo/test/1".
        _check("/" not in self.name, "sources[].name",
               f"{self.name!r} holds '/', which separates the source from the record id in the written ids "
               f"(<name>/<id>); rename the source, e.g. {self.name.replace('/', '_')!r}")
        _check(bool(self.path), f"sources[{self.name}].path", "must name a file or folder")
        _check(self.format in SOURCE_FORMATS, f"sources[{self.name}].format",
               f"must be one of {list(SOURCE_FORMATS)}, got {self.format!r}")
        _check(self.limit is None or self.limit >= 1, f"sources[{self.name}].limit",
               f"must be >= 1 or null, got {self.limit}")
        # A conversation record names its own image, question and answer: a column setting there would be
        # recorded in the run's config and manifest as if it had chosen them.
        for column in ("image_column", "question_column", "answer_column", "id_column"):
            refuse_unused_setting(self, f"sources[{self.name}].{column}", used=self.format == "columns",
                                  here=f"sources[{self.name}].format={self.format}",
                                  only_with=f"sources[{self.name}].format=columns",
                                  why="a conversations source takes the image, question, answer and id from each "
                                      "record's own fields")


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    """A teacher model behind an OpenAI-compatible chat endpoint (`vllm serve`, hosted APIs); also the answer
    judge's ``endpoint`` (`megatron_avar.eval.judge`)."""

    model: str = "Qwen/Qwen2.5-VL-72B-Instruct"
    """Model name sent in the request (part of the cache key)."""
    base_url: str = "http://localhost:8000/v1"
    """Endpoint root; requests go to ``{base_url}/chat/completions``. Not part of the cache key, so per-node
    servers of the same model share one cache: slurm/synth.sh serves every teacher on each node, so a localhost
    base_url sends each node's requests to its own server."""
    api_key_env: str | None = None
    """Name of the environment variable holding the API key (sent as a Bearer token), or null for none.
    Keys are never read from the config file and never logged."""
    temperature: float = 0.7
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling."""
    max_tokens: int = 4096
    """Completion token limit."""
    seed: int = 0
    """Sampling seed sent with the request; candidate i of a record uses seed + i."""
    extra_body: dict = dataclasses.field(default_factory=dict)
    """Extra request fields (e.g. vLLM's ``chat_template_kwargs``); part of the cache key. Not the fields the client
    sets (model, messages, temperature, top_p, max_tokens, seed: set this section's own) nor those that change the
    reply's shape or pay for unread generations (stream, stream_options, n, best_of, tools, tool_choice, functions,
    function_call)."""

    def validate(self, where: str) -> None:
        _check(bool(self.model), f"{where}.model", "must be a model name")
        _check_base_url(self.base_url, f"{where}.base_url")
        for key in self.extra_body:
            own = "the prompt" if key == "messages" else f"{where}.{key}"
            _check(key not in CLIENT_SET_FIELDS, f"{where}.extra_body.{key}",
                   f"is set by the client (from {own}); remove it from extra_body")
            _check(key not in REPLY_SHAPE_FIELDS, f"{where}.extra_body.{key}",
                   "is not allowed: the client reads one whole chat completion per request; remove it")
        _check(0.0 <= self.temperature <= 2.0, f"{where}.temperature", f"must be in [0, 2], got {self.temperature}")
        _check(0.0 < self.top_p <= 1.0, f"{where}.top_p", f"must be in (0, 1], got {self.top_p}")
        _check(self.max_tokens >= 1, f"{where}.max_tokens", f"must be >= 1, got {self.max_tokens}")
        if self.api_key_env is not None:
            _check(bool(os.environ.get(self.api_key_env)), f"{where}.api_key_env",
                   f"names the environment variable {self.api_key_env!r}, which is not set; export it (or set "
                   f"{where}.api_key_env=null for an endpoint without a key)")


def _check_base_url(url: str, field: str) -> None:
    """An http(s) URL with a host and, if given, a numeric port (urllib would take "http://" or a port "80OO" for
    a server that does not answer, and retry it like one)."""
    example = "e.g. http://localhost:8000/v1"
    parts = urllib.parse.urlsplit(url)
    _check(parts.scheme in ("http", "https") and url.startswith(f"{parts.scheme}://"), field,
           f"must start with http:// or https://, got {url!r} ({example})")
    _check(bool(parts.hostname), field, f"names no host: {url!r} ({example})")
    try:
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in 0-65535
    except ValueError:
        _check(False, field, f"has a port that is not a number from 0 to 65535: {url!r} ({example})")
    _check("?" not in url and "#" not in url, field,
           f"must not hold a query or fragment ('?', '#'): requests go to <base_url>/chat/completions; got {url!r}")


@dataclasses.dataclass(frozen=True)
class ClientConfig:
    """How teacher requests are sent (shared by all stages)."""

    concurrency: int = 8
    """Requests in flight per stage worker (total = workers x concurrency)."""
    timeout_s: float = 300.0
    """Longest time one attempt of a request may take, from connecting to the reply's last byte: a reply body sent
    slowly is cut off at it, not only a server that goes silent (the wait for the reply's headers is bounded per
    read only); a timeout is retried."""
    max_retries: int = 6
    """Retries after HTTP 429/5xx, timeouts and connection errors; then the record is dropped (not cached,
    so the next run asks again)."""
    backoff_initial_s: float = 1.0
    """First retry delay; doubles per retry (with jitter), at most backoff_max_s. A Retry-After header replaces
    it (still at most backoff_max_s)."""
    backoff_max_s: float = 60.0
    """Longest retry delay."""
    format_retries: int = 1
    """Extra attempts (new seed) when a teacher's answer is malformed; then the record is dropped. A resume may
    raise it: the attempts already answered come from the cache, only the new ones are asked."""
    max_failed_share: float = 0.05
    """Largest share of a teacher stage's requests (one record's or candidate's question, with its format
    retries: answered usably, answered malformed every time, or failed) that may end without a usable answer
    in a successful run: failed for good (retries exhausted, non-retryable 4xx) or malformed after
    format_retries. Above it, or when no request of a stage got a usable answer, the run ends with an error
    naming the stage, the counts, the most common error or malformation (with an example reply) and the
    endpoint, and writes no manifest.json: the shards written so far stay, and rerunning resumes (cached
    answers are reused, only the failed requests are asked again; malformed answers are cached too, so raise
    format_retries or fix the teacher). 0: any loss fails the run; 1: only a stage with no usable answer does.
    An endpoint where nothing listens (connection refused, unknown host) stops the run at once, when a stage's
    first request gives up before any request of the run was answered: not after every record has waited out
    its retries. Not part of a run's identity (synth.output_dir), like every client setting: a resume may
    change it."""

    def __post_init__(self) -> None:
        _check(self.concurrency >= 1, "client.concurrency", f"must be >= 1, got {self.concurrency}")
        _check(self.timeout_s > 0, "client.timeout_s", f"must be > 0, got {self.timeout_s}")
        _check(self.max_retries >= 0, "client.max_retries", f"must be >= 0, got {self.max_retries}")
        _check(0 <= self.backoff_initial_s <= self.backoff_max_s, "client.backoff_initial_s",
               f"must be in [0, backoff_max_s={self.backoff_max_s}], got {self.backoff_initial_s}")
        _check(self.format_retries >= 0, "client.format_retries", f"must be >= 0, got {self.format_retries}")
        _check(0.0 <= self.max_failed_share <= 1.0, "client.max_failed_share",
               f"must be in [0, 1] (a share of requests, e.g. 0.05 for 5%), got {self.max_failed_share}")


@dataclasses.dataclass(frozen=True)
class ReadConfig:
    dedup: bool = True
    """Drop records whose (image bytes, question) repeat an earlier record (counted as read.duplicate)."""


@dataclasses.dataclass(frozen=True)
class DescribeConfig:
    enabled: bool = True
    """False: no description; the reasoning prompt gets only the question."""
    teacher: TeacherConfig = dataclasses.field(default_factory=lambda: TeacherConfig(temperature=0.2))
    """The vision-language teacher (paper: Gemini 2.5 Pro)."""


@dataclasses.dataclass(frozen=True)
class ReasonConfig:
    teacher: TeacherConfig = dataclasses.field(default_factory=lambda: TeacherConfig(model="Qwen/Qwen3-235B-A22B"))
    """The text teacher that writes the reflective chain (paper: Qwen3-235B-A22B)."""
    num_candidates: int = 1
    """Chains sampled per record; verify keeps the best correct one."""

    def __post_init__(self) -> None:
        _check(1 <= self.num_candidates <= 64, "reason.num_candidates",
               f"must be in [1, 64], got {self.num_candidates}")


@dataclasses.dataclass(frozen=True)
class AnchorConfig:
    enabled: bool = True
    """False: chains are kept as the reasoning teacher wrote them."""
    teacher: TeacherConfig = dataclasses.field(default_factory=lambda: TeacherConfig(model="Qwen/Qwen3-32B",
                                                                                     temperature=0.3))
    """The LLM that inserts visual anchors (paper: Qwen3-32B)."""
    min_anchors: int = 1
    """A rewritten chain with fewer marked anchors is malformed."""
    only_correct: bool = True
    """Anchor only candidates whose answer is already correct (saves requests when verify.keep_only_correct)."""

    def __post_init__(self) -> None:
        _check(self.min_anchors >= 0, "anchor.min_anchors", f"must be >= 0, got {self.min_anchors}")


@dataclasses.dataclass(frozen=True)
class VerifyConfig:
    keep_only_correct: bool = True
    """Drop records whose final answer does not match the ground truth (math-verify or same text)."""
    select: str = "most_anchors"
    """Which correct candidate to keep: "most_anchors" (ties: lowest index) or "first"."""

    def __post_init__(self) -> None:
        _check(self.select in SELECT_RULES, "verify.select",
               f"must be one of {list(SELECT_RULES)}, got {self.select!r}")


@dataclasses.dataclass(frozen=True)
class OutputConfig:
    dir: str = "runs/synth"
    """Output folder: data/shard-*.parquet (images embedded) and manifest.json."""
    overwrite: bool = False
    """Replace what the folder holds: a finished run (one with a manifest.json), kept in <dir>/.replaced until
    the new run is finished, or an unfinished run of other settings, whose shards are deleted (its teacher
    answers stay in the request cache). Without it a finished run is refused, and an unfinished one is resumed
    by a run of its settings only (synth.output_dir: which settings count)."""
    system_prompt: str | None = None
    """System turn of the written conversations; null: none (Qwen2.5-VL's default is rendered). Checked as the
    dataset checks a system turn (no literal special token such as <|im_end|>)."""

    def __post_init__(self) -> None:
        if self.system_prompt is None:
            return
        from megatron_avar.roles import validate_messages  # (imports torch: only when there is a prompt to check)

        try:
            validate_messages([{"role": "system", "content": self.system_prompt}])
        except ValueError as error:  # the writer would refuse every record, after all teacher work
            raise ValueError(f"output.system_prompt {str(error).removeprefix('messages[0] ')}") from None


@dataclasses.dataclass(frozen=True)
class RunConfig:
    executor: str = "ray_data"
    """"ray_data" (Curator's Ray Data executor: stages stream, so the teacher stages overlap), "xenna"
    (Curator's Xenna executor in batch mode, stage after stage: streaming Xenna refuses 2-core machines) or
    "local" (the same stages one after the other in this process, no Ray: debugging and tests)."""
    batch_records: int = 64
    """Records per Curator task (and per output shard at most)."""
    work_dir: str | None = None
    """Request cache, image store and progress files; default "<output.dir>.work". Keep it to resume."""
    prompt_version: str = "v1"
    """Prompt set under megatron_avar/synth/prompts/ (part of the cache key)."""
    progress_interval_s: float = 30.0
    """Seconds between progress lines."""
    ray_num_cpus: int | None = None
    """CPUs for a local Ray start (no RAY_ADDRESS); default max(8, cpu count): Xenna needs a few slots."""

    def __post_init__(self) -> None:
        _check(self.executor in EXECUTORS, "run.executor", f"must be one of {list(EXECUTORS)}, got {self.executor!r}")
        _check(self.batch_records >= 1, "run.batch_records", f"must be >= 1, got {self.batch_records}")
        _check(self.progress_interval_s > 0, "run.progress_interval_s", f"must be > 0, got {self.progress_interval_s}")
        _check(self.ray_num_cpus is None or self.ray_num_cpus >= 1, "run.ray_num_cpus",
               f"must be >= 1 or null, got {self.ray_num_cpus}")
        prompt_dir = Path(__file__).parent / "prompts" / self.prompt_version
        _check(prompt_dir.is_dir(), "run.prompt_version",
               f"must name a folder of megatron_avar/synth/prompts/, got {self.prompt_version!r}")


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    """The whole `avar synth` run."""

    sources: tuple[SourceConfig, ...] = ()
    """Input datasets (at least one)."""
    read: ReadConfig = dataclasses.field(default_factory=ReadConfig)
    describe: DescribeConfig = dataclasses.field(default_factory=DescribeConfig)
    reason: ReasonConfig = dataclasses.field(default_factory=ReasonConfig)
    anchor: AnchorConfig = dataclasses.field(default_factory=AnchorConfig)
    verify: VerifyConfig = dataclasses.field(default_factory=VerifyConfig)
    client: ClientConfig = dataclasses.field(default_factory=ClientConfig)
    output: OutputConfig = dataclasses.field(default_factory=OutputConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sources", tuple(self.sources))  # the loader gives a list
        _check(len(self.sources) >= 1, "sources", "must list at least one source (name, path)")
        names = [source.name for source in self.sources]
        _check(len(set(names)) == len(names), "sources[].name", f"must be unique, got {names}")
        if self.describe.enabled:
            self.describe.teacher.validate("describe.teacher")
        self.reason.teacher.validate("reason.teacher")
        if self.anchor.enabled:
            self.anchor.teacher.validate("anchor.teacher")
        _check(self.verify.keep_only_correct or not self.anchor.enabled or not self.anchor.only_correct,
               "verify.keep_only_correct",
               "is false (keep records whose answer is wrong), but anchor.only_correct=true anchors only correct "
               "candidates, so a wrong one would have no anchored chain to keep: set anchor.only_correct=false too")
        work, out = self.work_dir.resolve(), Path(self.output.dir).resolve()
        _check(not work.is_relative_to(out), "run.work_dir",
               f"({work}) lies inside output.dir ({out}), which holds the dataset only (a rerun would refuse the "
               "folder as not written by avar synth): put it beside output.dir (the default is <output.dir>.work)")

    @property
    def work_dir(self) -> Path:
        return Path(self.run.work_dir) if self.run.work_dir else Path(f"{self.output.dir.rstrip('/')}.work")
