"""Chat templates: `--chat-template` (a Jinja file, or a model folder to take the template from), the one-line
error for a row the template cannot format, and the warning for string prompts that carry a doubled BOS.

`--chat-template` holds for every tokenizer a command loads for its policy and reference (a judge keeps its own
template). The command puts it in $SERA_CHAT_TEMPLATE, so the processes of a launch and Ray actors on this
machine see the same template; `load_tokenizer` applies it, and the log-prob identity (its template hash)
records it in the output's provenance. Imports no torch.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from sera_cli.data.errors import InputError

ENV = "SERA_CHAT_TEMPLATE"
HINT = "pass --chat-template with a Jinja file, or a model folder whose tokenizer has the family's template"
FOLDED = "system turn folded into the first user turn (the chat template refuses a system role)"


def use_chat_template(value: str | None) -> None:
    """What a command's `--chat-template` says, for this process and its children; checked at once."""
    if value is None:
        os.environ.pop(ENV, None)
        return
    read_chat_template(value)
    os.environ[ENV] = str(Path(value).resolve())


def read_chat_template(value: str) -> str:
    """The template text of a Jinja file, or of a model folder (chat_template.jinja, chat_template.json or
    tokenizer_config.json's `chat_template`; of a list of named templates, 'default')."""
    path = Path(value)
    if path.is_file():
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(value, f"--chat-template cannot be read: {err}", hint="give a UTF-8 Jinja file") from None
        if not text.strip():
            raise InputError(value, "--chat-template is an empty file", hint="give the family's Jinja template")
        return text
    if not path.is_dir():
        raise InputError(value, "--chat-template: no such file or folder",
                         hint="give a Jinja file, or a model folder whose tokenizer has a chat template")
    if (path / "chat_template.jinja").is_file():
        return read_chat_template(str(path / "chat_template.jinja"))
    for name in ("chat_template.json", "tokenizer_config.json"):
        file = path / name
        if not file.is_file():
            continue
        try:
            template = json.loads(file.read_text()).get("chat_template")
        except (OSError, ValueError, AttributeError) as err:
            raise InputError(str(file), f"--chat-template: not readable JSON ({err})",
                             hint="give a Jinja file instead") from None
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if isinstance(template, str) and template.strip():
            return template
    raise InputError(value, "--chat-template: the folder holds no chat template (chat_template.jinja, or "
                            "chat_template in tokenizer_config.json)", hint="give a Jinja file")


def apply_override(tok) -> None:
    """Set the `--chat-template` of this run (if any) on a loaded tokenizer."""
    if value := os.environ.get(ENV):
        tok.chat_template = read_chat_template(value)


def template_problem(err: Exception, file: str, row: int) -> InputError:
    """The one-line error for a row the chat template cannot format."""
    return InputError(file, str(err), row=row, column="prompt", hint=HINT)


def warn_double_bos(tok, rows: Sequence[int], locate: Callable[[int], tuple[str, int]] | None) -> None:
    """One stderr line when string prompts start with the BOS token that the tokenizer adds again."""
    if not rows:
        return
    file, row = locate(rows[0]) if locate else ("<table>", rows[0])
    more = f" and {len(rows) - 1:,} more row(s)" if len(rows) > 1 else ""
    sys.stderr.write(f"warning: {file}, row {row}{more}: the prompt starts with {tok.bos_token!r}, which the "
                     "tokenizer adds again (two BOS tokens, as TRL gives too); drop it from the prompt text, or "
                     "give message rows\n")
    sys.stderr.flush()


def folded_rows(encoded) -> int:
    """How many encoded rows had their system turn folded (for the output's provenance)."""
    return sum(1 for e in encoded if getattr(e, "folded", False))


def folded_record(folded: int) -> dict:
    """The provenance entry for `folded` rows whose system turn was folded (none: no entry)."""
    return {"chat_template": {"system_folded_rows": folded, "note": FOLDED}} if folded else {}


def stop_ids(path: str, tok, chat: bool = False) -> list[int]:
    """End-of-sequence ids: the tokenizer's EOS, those of the model's generation_config.json, and for chat prompts
    the token that ends an assistant turn in the chat template (`<|im_end|>`, `<|eot_id|>`, ...)."""
    import json
    from pathlib import Path

    ids = [tok.eos_token_id]
    gen = Path(path) / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
    if chat:
        ids.append(turn_end_id(tok))
    return sorted({int(i) for i in ids if i is not None})


def turn_end_id(tok) -> int | None:
    """The special token that follows an assistant message in the chat template, if there is one."""
    mark = "SERA-END-OF-REPLY"
    try:
        text = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": mark}],
                                       tokenize=False)
    except Exception:  # no chat template, or one that rejects this conversation
        return None
    after = text.split(mark, 1)[1] if mark in text else ""
    ids = tok(after, add_special_tokens=False)["input_ids"] if after.strip() else []
    special = set(tok.all_special_ids) | set(getattr(tok, "added_tokens_decoder", {}))
    return ids[0] if ids and ids[0] in special else None
