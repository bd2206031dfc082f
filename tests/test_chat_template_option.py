"""`--chat-template`: on every command that formats messages; a Jinja file or a model folder; a bad value is
one line."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from sera_cli.backends.chat_templates import ENV, read_chat_template, use_chat_template
from sera_cli.commands.app import app
from sera_cli.data.errors import InputError
from trainers.encode import TemplateError, fold_system


@pytest.mark.parametrize("command", ["score", "generate", "train", "run", "eval"])
def test_every_command_that_formats_messages_takes_it(command):
    r = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "--chat-template" in r.output


def test_a_template_from_a_file_a_folder_or_a_list_of_named_templates(tmp_path):
    (tmp_path / "t.jinja").write_text("{{ messages }}")
    assert read_chat_template(str(tmp_path / "t.jinja")) == "{{ messages }}"
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}))
    assert read_chat_template(str(folder)) == "D"
    (folder / "chat_template.jinja").write_text("J")
    assert read_chat_template(str(folder)) == "J"


def test_a_missing_template_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    with pytest.raises(InputError) as err:
        use_chat_template(str(tmp_path / "nope.jinja"))
    assert str(err.value) == (f"{tmp_path / 'nope.jinja'}: --chat-template: no such file or folder (give a Jinja "
                              "file, or a model folder whose tokenizer has a chat template)")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="the folder holds no chat template"):
        use_chat_template(str(empty))
    assert ENV not in __import__("os").environ


def test_fold_system_puts_the_system_text_before_the_first_user_turn():
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello"}]
    assert fold_system(convo) == [{"role": "user", "content": "Be brief.\n\nHi"},
                                  {"role": "assistant", "content": "Hello"}]
    assert fold_system(convo[1:]) is None
    assert issubclass(TemplateError, ValueError)
