"""The README and docs/*.md name only commands that exist, and document every setting.

Every line of a shell block (```sh, ```bash, ```console or a bare ```) in README.md and
docs/*.md that starts with ``.venv/bin/notify`` or ``make`` must name a real ``notify``
command (through the click group, options included) or a real Makefile target. Every field of
``Settings`` must appear as its ``NOTIFY_*`` variable in docs/settings.md and .env.example.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from tests.harness import ROOT
from worker.front.cli import main
from worker.settings import ENV_PREFIX, Settings

SHELL_BLOCKS = {"", "sh", "bash", "shell", "console"}
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def command_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, command) for each ``.venv/bin/notify`` / ``make`` line of a shell block."""
    found: list[tuple[int, str]] = []
    language: str | None = None  # None: outside a block
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fence = re.match(r"\s*```(\S*)", line)
        if fence:
            language = fence.group(1) if language is None else None
            continue
        if language not in SHELL_BLOCKS:
            continue
        text = line.strip().removeprefix("$ ")
        if re.match(r"(\.venv/bin/notify|make)(\s|$)", text):
            found.append((number, text))
    return found


def _words(command: str) -> list[str]:
    lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    words = list(lexer)
    # One command only: stop at a pipe, `;` or `&&`.
    for index, word in enumerate(words):
        if word and set(word) <= set(";&|"):
            return words[:index]
    return words


def notify_problem(args: list[str]) -> str | None:
    """Why ``notify ARGS`` is not a real command line, or None when it is."""
    command: click.Command = main
    path = ["notify"]
    while isinstance(command, click.Group):
        if not args:
            return None if command is not main else "no command"
        name, args = args[0], args[1:]
        # get_command: also the commands the dev tooling adds (entry points, worker/front/cli.py)
        sub = command.get_command(click.Context(command), name)
        if sub is None:
            return f"{' '.join(path)} has no command {name!r}"
        command, path = sub, [*path, name]
    if command.context_settings.get("ignore_unknown_options"):
        return None  # hands its arguments on (notify sandbox)
    try:
        command.make_context(" ".join(path), list(args))
    except click.UsageError as error:
        return f"{' '.join(path)}: {error.format_message()}"
    return None


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, re.M))


def make_problem(args: list[str]) -> str | None:
    targets = [word for word in args if "=" not in word and not word.startswith("-")]
    missing = [target for target in targets if target not in make_targets()]
    return f"no Makefile target {', '.join(missing)}" if missing else None


def _cases() -> list[tuple[str, int, str]]:
    return [
        (str(path.relative_to(ROOT)), number, text)
        for path in DOCS
        for number, text in command_lines(path)
    ]


def test_the_docs_show_commands_at_all() -> None:
    cases = _cases()
    files = {file for file, _, _ in cases}
    assert "README.md" in files
    assert any(text.startswith("make ") for _, _, text in cases)
    assert sum(text.startswith(".venv/bin/notify ") for _, _, text in cases) >= 3


@pytest.mark.parametrize(("file", "line", "command"), _cases())
def test_every_documented_command_exists(file: str, line: int, command: str) -> None:
    program, *args = _words(command)
    problem = notify_problem(args) if program.endswith("notify") else make_problem(args)
    assert problem is None, f"{file}:{line}: {command}: {problem}"


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (".venv/bin/notify status <id>", None),
        (".venv/bin/notify failed list --json --limit 5  # a comment", None),
        (".venv/bin/notify failed replay --all --reason retries_exhausted", None),
        (".venv/bin/notify sandbox --port 8099 --latency-ms 0", None),
        (".venv/bin/notify stauts <id>", "notify has no command 'stauts'"),
        (".venv/bin/notify failed lst", "notify failed has no command 'lst'"),
        (".venv/bin/notify failed list --colour", "No such option"),
        ("make run", None),
        ("make pins UPGRADE=1", None),
        ("make deploy", "no Makefile target deploy"),
    ],
)
def test_the_check_itself_tells_real_commands_from_made_up_ones(
    command: str, expected: str | None
) -> None:
    program, *args = _words(command)
    problem = notify_problem(args) if program.endswith("notify") else make_problem(args)
    if expected is None:
        assert problem is None, problem
    else:
        assert problem is not None and expected in problem, problem


def test_a_command_in_a_json_or_python_block_is_not_checked(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "```json\n.venv/bin/notify nothing\n```\n"
        "```sh\n$ .venv/bin/notify status x\nmake test\n```\n"
        "text: make nothing\n"
    )
    assert command_lines(page) == [(5, ".venv/bin/notify status x"), (6, "make test")]


@pytest.mark.parametrize(
    "variable", sorted(ENV_PREFIX + name.upper() for name in Settings.model_fields)
)
def test_every_setting_is_documented(variable: str) -> None:
    table = (ROOT / "docs" / "settings.md").read_text()
    assert f"`{variable}`" in table, f"{variable} is missing from docs/settings.md"
    example = (ROOT / ".env.example").read_text()
    assert re.search(rf"^#?\s*{variable}=", example, re.M), f"{variable} not in .env.example"


def test_the_readme_stays_a_first_page_and_links_every_docs_page() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 220
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"(docs/{page.name})" in readme, f"README.md does not link docs/{page.name}"
    for target in re.findall(r"\]\(((?:docs/)?[\w./-]+\.md)(?:#[\w-]+)?\)", readme):
        assert (ROOT / target).is_file(), target
