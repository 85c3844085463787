"""Every command and option the README shows exists: each `emolens ...` line of its code blocks and inline
code is checked against that command's `--help`."""

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from emolens.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"
COMMAND_NAMES = {c.name or c.callback.__name__ for c in app.registered_commands} | {"datasets"}
runner = CliRunner(env={"COLUMNS": "250"})


def readme_commands() -> list[str]:
    """The emolens command lines of the README: shell code-block lines (continuations joined) and inline
    code spans that start with ``emolens``."""
    lines, fence, prose = [], None, []
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            fence = None if fence is not None else line[3:].strip()
        elif fence in ("bash", "sh", ""):
            lines.append(line)
        elif fence is None:
            prose.append(line)
    lines = re.sub(r"\\\n\s*", " ", "\n".join(lines)).splitlines()
    spans = [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", "\n".join(prose))]  # may wrap a line
    commands = []
    for line in lines + [span for span in spans if span.startswith("emolens ")]:
        found = re.search(r"(?:^|\s|-m )emolens (.*)", line.split(" #", 1)[0])  # not a comment after it
        if found:
            commands.append(found.group(1).strip())
    # prose names options after a bare command too: `search --valence LOW:HIGH`, `datasets info --check-images`
    return commands + [span for span in spans if span.split(" ", 1)[0] in COMMAND_NAMES and " --" in span]


def command_and_options(line: str) -> tuple[list[str], list[str]]:
    """(subcommand words, the --options named) of one README command line."""
    words = shlex.split(line.replace("[", " ").replace("]", " ").replace("|", " "))
    command = []
    for word in words:
        if word.startswith("-"):
            break
        command.append(word)
        if word != "datasets":  # the only group: its subcommand follows
            break
    options = [w.split("=", 1)[0] for w in words if w.startswith("--") and len(w) > 2]
    return command, options


COMMANDS = readme_commands()


def test_the_readme_shows_commands():
    assert len(COMMANDS) > 20  # the parser still finds the README's examples


@pytest.mark.parametrize("line", COMMANDS)
def test_each_readme_command_and_option_exists(line):
    command, options = command_and_options(line)
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, f"emolens {' '.join(command)}: {result.output}"
    for option in options:
        assert option in result.output, f"`emolens {line}`: {option} is not an option of `emolens {' '.join(command)}`"
