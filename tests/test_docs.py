"""The repository carries its own documentation: every Markdown file it names exists in it.

Scanned: the library, tests, examples, Slurm scripts, tools and docs, plus README.md, Makefile, setup.py and
pytest.ini (``tools/results/`` is skipped: it holds generated measurement reports, not documentation).
A reference is any ``*.md`` path in a scanned file, URLs excluded. It must name a file inside the repository,
relative to the repository root, to ``docs/``, or to the referring file. Not references: templates of
generated file names (``<stem>.md``, ``gpu_check_*.md``) and the outputs the commands write
(:data:`GENERATED_OUTPUTS`). A reference followed by a section, as a Markdown anchor (``docs/method.md#agto-objective``)
or a quoted heading (``docs/method.md, 'AGTO objective'``), must name a heading of that file.

No scanned file may point outside the repository for its documentation (:data:`FORBIDDEN`).
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCANNED_DIRS = ("megatron_avar", "tests", "examples", "slurm", "tools", "docs")
SCANNED_FILES = ("README.md", "Makefile", "setup.py", "pytest.ini")
SKIPPED = ("tools/results",)
BINARY_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".pyc", ".parquet", ".whl", ".sqsh"}

# Markdown files the commands write into their output folders (named in code, tests and docs, never in the repo).
GENERATED_OUTPUTS = {
    "results.md": "avar eval's results table (eval/report.py)",
    "compare.md": "avar vas compare's table (analysis/compare.py)",
}

# Documentation that lives outside the repository. Spelled in pieces so that this file does not match itself.
FORBIDDEN = ("../" + "shared", "AVAR_SPEC" + ".md", "EVAL_BENCHMARKS" + ".md", "ENVIRONMENT" + ".md")

_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://\S+", re.IGNORECASE)
_MD_TOKEN = re.compile(r"[\w./<>{}*$~-]*\.md\b")
_PLACEHOLDER = re.compile(r"[<>{}*$~]")
_ANCHOR_AFTER = re.compile(r"#([\w-]+)")
_HEADING_AFTER = re.compile(r",? '([^'\n]+)'")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def scanned_files() -> list[Path]:
    files = [REPO / name for name in SCANNED_FILES if (REPO / name).is_file()]
    for folder in SCANNED_DIRS:
        for path in sorted((REPO / folder).rglob("*")):
            relative = path.relative_to(REPO).as_posix()
            if (not path.is_file() or path.suffix in BINARY_SUFFIXES or "__pycache__" in path.parts
                    or any(relative.startswith(skip + "/") for skip in SKIPPED)):
                continue
            files.append(path)
    return files


def read_text(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None
    return None if "\x00" in text else text


def headings(path: Path) -> set[str]:
    """The headings of a Markdown file, as written and as GitHub anchors."""
    found = set()
    for title in _HEADING.findall(path.read_text(encoding="utf-8")):
        plain = title.replace("`", "")
        found.add(plain)
        found.add(re.sub(r"[^\w\- ]", "", plain.lower()).replace(" ", "-"))
    return found


def resolve(reference: str, referrer: Path) -> Path | None:
    """The repository file ``reference`` names from ``referrer``, or None."""
    if reference.startswith("/"):
        return None
    for base in (REPO, REPO / "docs", referrer.parent):
        candidate = (base / reference).resolve()
        if candidate.is_file() and candidate.is_relative_to(REPO):
            return candidate
    return None


def reference_problems(path: Path, text: str) -> list[str]:
    """Problems with the Markdown references of one file (``path`` names it; ``text`` is its content)."""
    problems = []
    where = path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else str(path)
    text = _URL.sub(lambda m: " " * len(m.group()), text)
    for match in _MD_TOKEN.finditer(text):
        token = match.group()
        line = text.count("\n", 0, match.start()) + 1
        if _PLACEHOLDER.search(token) or token.startswith(".md") or Path(token).name in GENERATED_OUTPUTS:
            continue
        target = resolve(token.removeprefix("./"), path)
        if target is None:
            problems.append(f"{where}:{line}: {token} is not a file of the repository")
            continue
        rest = text[match.end():match.end() + 200]
        section = _ANCHOR_AFTER.match(rest) or _HEADING_AFTER.match(rest)
        if section and target.suffix == ".md" and section.group(1) not in headings(target):
            problems.append(f"{where}:{line}: {token} has no heading {section.group(1)!r}")
    for needle in FORBIDDEN:
        for match in re.finditer(re.escape(needle), text):
            line = text.count("\n", 0, match.start()) + 1
            problems.append(f"{where}:{line}: names {needle}, which is not part of the repository")
    return problems


def test_every_markdown_reference_exists_in_the_repository():
    problems = []
    for path in scanned_files():
        text = read_text(path)
        if text is not None:
            problems += reference_problems(path, text)
    assert not problems, "documentation references that do not resolve:\n" + "\n".join(problems)


def test_the_checker_finds_bad_references():
    """The check above can fail: a missing file, a missing section and outside documentation are reported."""
    fake = REPO / "megatron_avar" / "example.py"
    good = ("see docs/method.md, 'AGTO objective', [eval](evaluation.md#mmmu), https://x.org/a.md, <stem>.md, "
            "out/results.md")
    assert reference_problems(fake, good) == []
    md = ".md"  # the bad references are assembled here so that this file itself holds none
    bad = {
        "see docs/missing" + md: "not a file",
        "see docs/method" + md + ", 'No such heading'": "no heading",
        "[x](docs/evaluation" + md + "#no-such-anchor)": "no heading",
        "see AVAR_SPEC" + md: "not a file",
        "see ../" + "shared/docs": "not part of the repository",
    }
    for text, expected in bad.items():
        problems = reference_problems(fake, text)
        assert problems and expected in problems[0], (text, problems)


def test_the_readme_links_every_docs_page():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    missing = [page.name for page in sorted((REPO / "docs").glob("*.md")) if f"(docs/{page.name})" not in readme]
    assert not missing, f"README.md's Documentation list does not link {missing}"
