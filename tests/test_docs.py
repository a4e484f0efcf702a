"""The documentation points at things that exist: files, section anchors, commands, flags and Python names.

README.md, docs/*.md and bench/README.md are read as text; nothing they show is run except each
command's `--help`, once per script or module, at the first test that needs one. A command is any line
of a fenced code block (other than a Python block) or any inline code span that starts with `python` or
`torchrun`; its long flags (`--name`) must appear in that command's own help text, so a renamed or
removed flag fails here. Python blocks must parse, and every name they import from tinylllite must be
defined at the top of that module's source (read with `ast`, nothing imported).
"""
import ast
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]
IDS = [str(p.relative_to(ROOT)) for p in DOC_FILES]

FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)
INLINE_CODE = re.compile(r"(`+)(.+?)\1", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_TARGET = re.compile(r"<(?:img|a)\s[^>]*?(?:src|href)=\"([^\"]+)\"")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # https:, mailto:, ...
PYTHON_FENCES = ("python", "py", "python3")
LAUNCHERS = ("python", "python3", "torchrun")


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def prose(text: str) -> str:
    """The text without fenced blocks and inline code, where a link is a link and not an example."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def link_targets(text: str) -> list[str]:
    targets = LINK.findall(prose(text)) + HTML_TARGET.findall(prose(text))
    return [t for t in targets if not EXTERNAL.match(t)]


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors for a Markdown file's headings: lower case, punctuation dropped, spaces to hyphens."""
    anchors, seen = set(), {}
    for line in FENCE.sub("", text).splitlines():
        if match := re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line):
            slug = re.sub(r"[^\w\- ]", "", match[1].lower()).replace(" ", "-")
            anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


def command_lines(text: str) -> list[str]:
    """Every shell line (continuations joined) of non-Python fenced blocks, and every inline code span,
    that starts with python or torchrun."""
    lines = []
    for lang, body in FENCE.findall(text):
        if lang.strip().lower() in PYTHON_FENCES:
            continue
        lines += body.replace("\\\n", " ").splitlines()
    lines += [span for _, span in INLINE_CODE.findall(FENCE.sub("", text))]
    lines = [line.strip().removeprefix("$ ") for line in lines]
    return [line for line in lines if line.split(" ", 1)[0] in LAUNCHERS and " " in line]


def parse_command(line: str):
    """`python -m pkg.mod --a 1 -- --b` -> (("python", "-m", "pkg.mod"), ["--a"], None): the program and its
    long flags (those after a bare `--` belong to another program). For torchrun, its own flags, and the
    script it starts with that script's flags as the third item."""
    words = shlex.split(line, comments=True)
    if words[0] == "torchrun":
        script = next((i for i, w in enumerate(words) if w.endswith(".py")), None)
        if script is None:
            return ("torchrun",), flags(words[1:]), None
        return ("torchrun",), flags(words[1:script]), (("python", words[script]), flags(words[script + 1:]))
    program = tuple(words[:3]) if words[1:2] == ["-m"] else tuple(words[:2])
    return program, flags(words[len(program):]), None


def flags(words: list[str]) -> list[str]:
    if "--" in words:
        words = words[:words.index("--")]
    return [w.split("=", 1)[0] for w in words if w.startswith("--") and len(w) > 2]


def commands(path: Path) -> list[tuple[str, tuple[str, ...], list[str]]]:
    """(line, program, flags) for every program a doc's command lines start, torchrun's script included."""
    found = []
    for line in command_lines(read(path)):
        program, its_flags, inner = parse_command(line)
        found.append((line, program, its_flags))
        if inner:
            found.append((line, *inner))
    return found


def program_exists(program: tuple[str, ...]) -> bool:
    if program == ("torchrun",):
        return importlib.util.find_spec("torch.distributed.run") is not None
    if program[1] == "-m":
        parts = program[2].split(".")
        local = ROOT.joinpath(*parts)
        if (ROOT / parts[0]).is_dir():
            return local.with_suffix(".py").is_file() or (local / "__main__.py").is_file()
        return importlib.util.find_spec(program[2]) is not None
    return (ROOT / program[1]).is_file()


# Run in one subprocess: the heavy libraries are imported once, then each program's `--help` runs in a
# forked child (its own process, so one program cannot change another's state) as `python X --help` would
# run it. Importing torch, diffusers and transformers takes seconds; a separate interpreter per program
# made this test take minutes on a small machine.
HELP_RUNNER = r"""
import contextlib, io, json, os, runpy, sys, warnings
programs, preload = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for name in preload:
    try:
        __import__(name)
    except Exception:
        pass  # the program's own import will report it
texts = {}
for program in programs:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        out, status = io.StringIO(), 0
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                if program[0] == "torchrun":
                    sys.argv = ["torchrun", "--help"]
                    runpy.run_module("torch.distributed.run", run_name="__main__")
                elif program[1] == "-m":
                    sys.argv = [program[2], "--help"]
                    runpy.run_module(program[2], run_name="__main__", alter_sys=True)
                else:
                    sys.argv = [program[1], "--help"]
                    sys.path.insert(0, os.path.dirname(os.path.abspath(program[1])))
                    runpy.run_path(program[1], run_name="__main__")
            except SystemExit as exit:
                status = exit.code if isinstance(exit.code, int) else (exit.code is not None)
            except BaseException as error:
                status, _ = 1, print(f"{type(error).__name__}: {error}", file=out)
        with os.fdopen(write, "w") as pipe:
            pipe.write(out.getvalue() if status == 0 else f"exit {status}: {out.getvalue()}")
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        texts[json.dumps(program)] = pipe.read()
    os.waitpid(pid, 0)
print(json.dumps(texts))
"""
PRELOAD = ["torch", "diffusers", "transformers", "tinylllite.sample", "tinylllite.files.control_io",
           "tinylllite.run.image_log"]


@cache
def help_texts() -> dict[tuple[str, ...], str]:
    """`--help` of every existing program whose flags the docs use, once per test session."""
    wanted = sorted({program for path in DOC_FILES for _, program, its_flags in commands(path)
                     if its_flags and program_exists(program)})
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", HELP_RUNNER, json.dumps(wanted), json.dumps(PRELOAD)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return {tuple(json.loads(program)): text for program, text in json.loads(result.stdout).items()}


def python_blocks(text: str) -> list[str]:
    return [body for lang, body in FENCE.findall(text) if lang.strip().lower() in PYTHON_FENCES]


def defined_names(module: str) -> set[str] | None:
    """Top-level names of a tinylllite module's source (functions, classes, assignments, imports), or None."""
    path = ROOT.joinpath(*module.split("."))
    source = path.with_suffix(".py") if path.with_suffix(".py").is_file() else path / "__init__.py"
    if not source.is_file():
        return None
    names = set()
    for node in ast.parse(source.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    if source.name == "__init__.py":
        names |= {p.stem for p in source.parent.iterdir() if p.suffix == ".py" or p.is_dir()}
    return names


@pytest.mark.parametrize("doc", DOC_FILES, ids=IDS)
def test_every_relative_link_in_the_docs_points_at_a_file(doc):
    """Each Markdown link or image target without a scheme names a file or folder that exists."""
    missing = [t for t in link_targets(read(doc)) if t.split("#")[0]
               and not (doc.parent / t.split("#")[0]).exists()]
    assert not missing, f"{doc.relative_to(ROOT)} links to files that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOC_FILES, ids=IDS)
def test_every_section_link_in_the_docs_names_a_heading(doc):
    """A link `file.md#anchor` (or `#anchor`) names a heading of that Markdown file."""
    wrong = []
    for target in link_targets(read(doc)):
        file, _, anchor = target.partition("#")
        linked = (doc.parent / file) if file else doc
        if anchor and linked.suffix == ".md" and linked.is_file() and anchor not in heading_anchors(read(linked)):
            wrong.append(target)
    assert not wrong, f"{doc.relative_to(ROOT)} links to headings that do not exist: {wrong}"


@pytest.mark.parametrize("doc", DOC_FILES, ids=IDS)
def test_every_command_in_the_docs_names_a_script_or_module_that_exists(doc):
    """`python X.py`, `python -m X` and `torchrun ... X.py` name a file of the repository or an installed module."""
    missing = [line for line, program, _ in commands(doc) if not program_exists(program)]
    assert not missing, f"{doc.relative_to(ROOT)} shows commands whose script or module does not exist: {missing}"


@pytest.mark.parametrize("doc", DOC_FILES, ids=IDS)
def test_every_flag_in_the_docs_is_one_its_command_accepts(doc):
    """Each `--flag` of a documented command appears in that script's or module's own `--help`."""
    wrong = []
    for line, program, its_flags in commands(doc):
        if its_flags and program_exists(program):
            text = help_texts()[program]
            assert not text.startswith("exit "), f"{' '.join(program)} --help failed: {text[-2000:]}"
            wrong += [f"{flag} ({' '.join(program)})" for flag in its_flags
                      if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text)]
    assert not wrong, f"{doc.relative_to(ROOT)} uses flags its commands do not accept: {sorted(set(wrong))}"


@pytest.mark.parametrize("doc", DOC_FILES, ids=IDS)
def test_every_python_example_parses_and_imports_names_tinylllite_defines(doc):
    """Python blocks are valid Python, and `from tinylllite.x import y` finds y at the top of tinylllite/x.py."""
    wrong = []
    for block in python_blocks(read(doc)):
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "tinylllite":
                names = defined_names(node.module)
                if names is None:
                    wrong.append(f"{node.module} (no such module)")
                wrong += [f"{node.module}.{a.name}" for a in node.names if names is not None and a.name not in names]
    assert not wrong, f"{doc.relative_to(ROOT)} imports names tinylllite does not define: {wrong}"


def test_the_readme_stays_a_short_front_page():
    """README.md is at most about 200 lines and 16 KB; the manual lives in docs/, the measurements in bench/."""
    text = read(ROOT / "README.md")
    assert len(text.splitlines()) <= 200 and len(text.encode("utf-8")) <= 16 * 1024
