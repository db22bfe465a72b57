from __future__ import annotations

import re

import pytest

from airflow_provider_llmbatch.emulator.cli import build_parser, main
from airflow_provider_llmbatch.emulator.config import EmulatorConfig
from airflow_provider_llmbatch.emulator.results import fake_body


def _chat(text: str) -> dict[str, object]:
    return {
        "model": "m",
        "messages": [{"role": "system", "content": "label it"}, {"role": "user", "content": text}],
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("I love it", "POS"),
        ("it broke on day two", "NEG"),
        ("fine, I guess", "echo: fine, I guess"),
    ],
)
def test_canned_replies_first_match_wins_else_echo(text: str, expected: str) -> None:
    config = EmulatorConfig(replies=(("(?i)love", "POS"), ("broke|love", "NEG")))
    body = fake_body("chat", "c1", _chat(text), 0, config.reply_to)
    message = body["choices"][0]["message"]["content"]
    assert message == expected
    assert body["usage"]["completion_tokens"] == len(expected.split())


def test_bad_reply_pattern_is_refused_at_configuration() -> None:
    with pytest.raises(re.error, match=r"missing \)"):
        EmulatorConfig(replies=(("(unclosed", "x"),))


def test_cli_rejects_a_reply_without_text(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--reply", "no-equals-sign"])
    assert exit_info.value.code == 2
    assert "REGEX=TEXT" in capsys.readouterr().err
    assert build_parser().parse_args(["--reply", "a=b", "--reply", "c=d"]).reply == ["a=b", "c=d"]
