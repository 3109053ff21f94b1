"""The ``fictures-ai`` parser as a user meets it: help, version, and a missing command."""

from __future__ import annotations

import argparse

import pytest

from fictures_ai import __version__
from fictures_ai.cli import build_parser


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """Parse ``argv`` as the console command would; its exit code and what it printed."""
    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(list(argv))
    captured = capsys.readouterr()
    code = caught.value.code
    return code if isinstance(code, int) else 1, captured.out + captured.err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "--version") == (0, f"fictures-ai {__version__}\n")


def test_help_is_for_users(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, "--help")
    assert code == 0
    assert "text (vLLM) and image (diffusers) generation over HTTP" in out
    for developer_text in ("``", "Settings", "drift"):
        assert developer_text not in out
    assert "--version" in out


def test_keys_help_names_every_command_and_the_settings_it_reads(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out = run(capsys, "keys", "--help")
    assert code == 0
    text = " ".join(out.split())  # argparse wraps lines
    assert "Create, list and revoke the server's own API keys, and check any key" in text
    assert "{create,list,revoke,check}" in text
    assert "read DATABASE_URL and API_KEY_PEPPER" in text
    assert "give them the server's values" in text
    assert "Exit status: 0 done, 1 a key database failed, 2 bad input, 3" in text
    for command in ("create", "list", "revoke", "check"):
        _, sub = run(capsys, "keys", command, "--help")
        assert "API_KEY_PEPPER" in sub, command


@pytest.mark.parametrize(
    ("argv", "choices"),
    [
        ((), "{serve,keys,models,generate}"),
        (("keys",), "{create,list,revoke,check}"),
        (("models",), "{prepare,list,load,unload,add,remove}"),
        (("generate",), "{text,image}"),
    ],
)
def test_a_missing_command_names_the_choices(
    capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], choices: str
) -> None:
    code, out = run(capsys, *argv)
    assert code == 2
    assert f"error: the following arguments are required: {choices}" in out
    assert "_command" not in out


def subcommand(*names: str) -> argparse.ArgumentParser:
    """The parser of ``fictures-ai NAMES...``."""
    parser = build_parser()
    for name in names:
        (commands,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = commands.choices[name]
    return parser


@pytest.mark.parametrize("kind", ["text", "image"])
def test_every_generate_option_has_help(kind: str) -> None:
    for action in subcommand("generate", kind)._actions:
        if action.option_strings:
            assert action.help, f"generate {kind} {action.option_strings[-1]} has no help"


def test_generate_text_says_what_max_tokens_and_temperature_do(
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, out = run(capsys, "generate", "text", "--help")
    text = " ".join(out.split())
    assert "--max-tokens MAX_TOKENS Most tokens to generate (default: 256)." in text
    assert "--temperature TEMPERATURE Sampling temperature: 0 always picks" in text
