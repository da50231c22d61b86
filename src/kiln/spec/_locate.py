"""Where each key of a TOML document sits, so every error can name its line.

``tomllib`` gives values but no positions, so this scans the (already valid)
text once and records the first line of every key path, array elements
included: ``("images", "web", "steps", 1, "copy") → 7``.
"""

from __future__ import annotations

import tomllib

KeyPath = tuple[str | int, ...]

_BARE = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.line = 1
        self.lines: dict[KeyPath, int] = {}
        self.array_tables: dict[KeyPath, int] = {}

    def peek(self, n: int = 1) -> str:
        return self.text[self.pos : self.pos + n]

    def advance(self, n: int = 1) -> None:
        self.line += self.text.count("\n", self.pos, self.pos + n)
        self.pos += n

    def skip(self, newlines: bool) -> None:
        while self.pos < len(self.text):
            c = self.text[self.pos]
            if c in " \t\r" or (newlines and c == "\n"):
                self.advance()
            elif c == "#":
                end = self.text.find("\n", self.pos)
                self.advance((len(self.text) if end < 0 else end) - self.pos)
            else:
                return

    def string(self) -> str:
        for quote in ('"""', "'''"):
            if self.peek(3) == quote:
                end = self.text.find(quote, self.pos + 3)
                end = len(self.text) if end < 0 else end
                while self.text[end + 3 : end + 4] == quote[0]:
                    end += 1
                value = self.text[self.pos + 3 : end]
                self.advance(end + 3 - self.pos)
                return value
        quote = self.peek()
        i = self.pos + 1
        while i < len(self.text) and self.text[i] != quote and self.text[i] != "\n":
            i += 2 if quote == '"' and self.text[i] == "\\" else 1
        value = self.text[self.pos + 1 : i]
        self.advance(i + 1 - self.pos)
        return value

    def key(self) -> tuple[str, ...]:
        parts: list[str] = []
        while True:
            self.skip(newlines=False)
            if self.peek() == '"':
                parts.append(_unescape(self.string()))
            elif self.peek() == "'":
                parts.append(self.string())
            else:
                start = self.pos
                while self.pos < len(self.text) and self.text[self.pos] in _BARE:
                    self.advance()
                parts.append(self.text[start : self.pos])
            self.skip(newlines=False)
            if self.peek() != ".":
                return tuple(parts)
            self.advance()

    def value(self, path: KeyPath) -> None:
        self.skip(newlines=False)
        self.lines.setdefault(path, self.line)
        c = self.peek()
        if c == "{":
            self.advance()
            while True:
                self.skip(newlines=True)
                if self.peek() in ("}", ""):
                    self.advance()
                    return
                if self.peek() == ",":
                    self.advance()
                    continue
                key = self.key()
                self.lines.setdefault(path + key, self.line)
                self.advance()  # '='
                self.value(path + key)
        elif c == "[":
            self.advance()
            index = 0
            while True:
                self.skip(newlines=True)
                if self.peek() in ("]", ""):
                    self.advance()
                    return
                if self.peek() == ",":
                    self.advance()
                    continue
                self.value((*path, index))
                index += 1
        elif c in ('"', "'"):
            self.string()
        else:
            while self.pos < len(self.text) and self.text[self.pos] not in ",]}\n#":
                self.advance()

    def document(self) -> dict[KeyPath, int]:
        table: KeyPath = ()
        while True:
            self.skip(newlines=True)
            if self.pos >= len(self.text):
                return self.lines
            if self.peek(2) == "[[":
                self.advance(2)
                name = self.key()
                index = self.array_tables.get(name, 0)
                self.array_tables[name] = index + 1
                table = (*name, index)
                self.lines.setdefault(name, self.line)
                self.lines.setdefault(table, self.line)
                self.advance(2)
            elif self.peek() == "[":
                self.advance()
                table = self.key()
                self.lines.setdefault(table, self.line)
                self.advance()
            else:
                key = self.key()
                self.lines.setdefault(table + key, self.line)
                self.advance()  # '='
                self.value(table + key)


def _unescape(raw: str) -> str:
    """A basic-string key as tomllib reads it (``"a\\nb"`` holds a newline)."""
    if "\\" not in raw:
        return raw
    try:
        return str(tomllib.loads(f'k = "{raw}"')["k"])
    except tomllib.TOMLDecodeError:
        return raw


def key_lines(text: str) -> dict[KeyPath, int]:
    try:
        return _Scanner(text).document()
    except (IndexError, RecursionError):
        return {}


def line_of(lines: dict[KeyPath, int], path: KeyPath) -> int | None:
    """The line of ``path`` or of its nearest written ancestor (a missing key → its table)."""
    for end in range(len(path), 0, -1):
        found = lines.get(path[:end])
        if found is not None:
            return found
    return None
