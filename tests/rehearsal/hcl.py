"""Just enough of HCL's lexical structure to lift blocks and attributes out of .tf files.

The rehearsal renders user_data with Terraform itself, from the very expressions in
`terraform/*.tf`; it only has to *find* them (a `locals` entry, a droplet's `user_data`),
never to understand them. python-hcl2 parses, but re-emits expressions in a form Terraform
does not read, so this scanner keeps the source text verbatim: it skips strings (with
`${...}` templates nested in them), heredocs and comments, and balances brackets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_HEREDOC = re.compile(r"<<-?([A-Za-z_][A-Za-z0-9_]*)[ \t]*\n")
_OPEN = "([{"
_CLOSE = ")]}"


class HCLScanError(ValueError):
    """The text is not what the scanner can walk (an unterminated string, bracket ...)."""


def _skip_string(text: str, i: int) -> int:
    """From the opening quote at `i`, the index just past the closing quote."""
    i += 1
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == '"':
            return i + 1
        if char in "$%" and text.startswith("{", i + 1) and not text.startswith(char * 2, i - 1):
            i = _skip_balanced(text, i + 1)
            continue
        if char == "\n":
            raise HCLScanError(f"newline inside a string at offset {i}")
        i += 1
    raise HCLScanError("unterminated string")


def _skip_heredoc(text: str, i: int) -> int | None:
    match = _HEREDOC.match(text, i)
    if match is None:
        return None
    end = re.compile(rf"^[ \t]*{re.escape(match[1])}[ \t]*$", re.MULTILINE).search(
        text, match.end()
    )
    if end is None:
        raise HCLScanError(f"unterminated heredoc {match[1]}")
    return end.end()


def _skip_comment(text: str, i: int) -> int | None:
    if text.startswith("#", i) or text.startswith("//", i):
        end = text.find("\n", i)
        return len(text) if end < 0 else end
    if text.startswith("/*", i):
        end = text.find("*/", i + 2)
        if end < 0:
            raise HCLScanError("unterminated comment")
        return end + 2
    return None


def _skip_balanced(text: str, i: int) -> int:
    """From the opening bracket at `i`, the index just past its partner."""
    stack = [text[i]]
    i += 1
    while i < len(text):
        skipped = _skip_atom(text, i)
        if skipped is not None:
            i = skipped
            continue
        char = text[i]
        if char in _OPEN:
            stack.append(char)
        elif char in _CLOSE:
            if _OPEN[_CLOSE.index(char)] != stack.pop():
                raise HCLScanError(f"mismatched {char!r} at offset {i}")
            if not stack:
                return i + 1
        i += 1
    raise HCLScanError("unbalanced brackets")


def _skip_atom(text: str, i: int) -> int | None:
    """Past a string, heredoc or comment starting at `i`; None when none starts there."""
    if text[i] == '"':
        return _skip_string(text, i)
    if text.startswith("<<", i):
        return _skip_heredoc(text, i)
    return _skip_comment(text, i)


def _expression_end(text: str, i: int) -> int:
    """An attribute's expression runs to the first newline outside brackets and strings."""
    while i < len(text):
        if text.startswith(("#", "//"), i):
            return i  # a line comment ends the expression and is not part of it
        skipped = _skip_atom(text, i)
        if skipped is not None:
            i = skipped
            continue
        char = text[i]
        if char == "\n" or char == "}":
            return i
        if char in _OPEN:
            i = _skip_balanced(text, i)
            continue
        i += 1
    return i


@dataclass(frozen=True)
class Block:
    """A block: its type, its labels and its body's text (between the braces)."""

    type: str
    labels: tuple[str, ...]
    body: str


def parse_body(text: str) -> tuple[dict[str, str], list[Block]]:
    """The attributes (name -> expression text) and nested blocks of a body."""
    attributes: dict[str, str] = {}
    blocks: list[Block] = []
    i = 0
    while i < len(text):
        skipped = _skip_comment(text, i)
        if skipped is not None:
            i = skipped
            continue
        if text[i].isspace():
            i += 1
            continue
        name = _IDENT.match(text, i)
        if name is None:
            raise HCLScanError(f"expected a name at offset {i}: {text[i : i + 40]!r}")
        i = name.end()
        labels: list[str] = []
        while True:
            while i < len(text) and text[i] in " \t":
                i += 1
            if text.startswith('"', i):
                end = _skip_string(text, i)
                labels.append(text[i + 1 : end - 1])
                i = end
                continue
            label = _IDENT.match(text, i)
            if label is not None and text[i] != "=":
                labels.append(label[0])
                i = label.end()
                continue
            break
        if text.startswith("=", i) and not labels:
            end = _expression_end(text, i + 1)
            attributes[name[0]] = text[i + 1 : end].strip()
            i = end
        elif text.startswith("{", i):
            end = _skip_balanced(text, i)
            blocks.append(Block(name[0], tuple(labels), text[i + 1 : end - 1]))
            i = end
        else:
            raise HCLScanError(f"expected '=' or '{{' after {name[0]!r} at offset {i}")
    return attributes, blocks
