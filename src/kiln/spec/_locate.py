"""Where each key of a TOML document sits, so every error can name its line.

``tomllib`` gives values but no positions, so this scans the (already valid)
text once and records the first line of every key path, array elements
included: ``("images", "web", "steps", 1, "copy") → 7``. Every prefix of a
table header or dotted key is recorded too (``[image.web]`` puts ``image`` on
its line), so a mistake in any part of a key has a line.
"""

from __future__ import annotations

import tomllib

KeyPath = tuple[str | int, ...]

_BARE = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


class _Scanner:
    def __init__(self, text: str, max_depth: int | None = None) -> None:
        self.text = text
        self.pos = 0
        self.line = 1
        self.lines: dict[KeyPath, int] = {}
        self.array_tables: dict[KeyPath, int] = {}
        self.max_depth = max_depth

    def record(self, path: KeyPath, start: int = 1) -> None:
        """The line of ``path`` and of its prefixes at least ``start`` parts long."""
        for end in range(start, len(path) + 1):
            self.lines.setdefault(path[:end], self.line)

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
                end = self.pos + 3
                while end < len(self.text) and self.text[end : end + 3] != quote:
                    # A basic string may escape a quote: \""" does not end it.
                    end += 2 if quote == '"""' and self.text[end] == "\\" else 1
                end = min(end, len(self.text))
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
        if self.max_depth is not None and len(path) > self.max_depth:
            raise _TooDeep(self.line)
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
                self.record(path + key, len(path) + 1)
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
                self.record(table)
                self.advance(2)
            elif self.peek() == "[":
                self.advance()
                table = self.key()
                self.record(table)
                self.advance()
            else:
                key = self.key()
                self.record(table + key, len(table) + 1)
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


class _TooDeep(Exception):
    def __init__(self, line: int) -> None:
        self.line = line


def key_lines(text: str) -> dict[KeyPath, int]:
    """Key path → line; for text the scanner cannot follow, the lines found so far."""
    scanner = _Scanner(text)
    try:
        return scanner.document()
    except (IndexError, RecursionError):
        return scanner.lines


def nesting_line(text: str, max_depth: int) -> int | None:
    """The line where values first nest deeper than ``max_depth``: for a file too deep
    for ``tomllib`` itself to read."""
    try:
        _Scanner(text, max_depth).document()
    except _TooDeep as e:
        return e.line
    except (IndexError, RecursionError):
        return None
    return None


def line_of(lines: dict[KeyPath, int], path: KeyPath, env: str | None = None) -> int | None:
    """The line of ``path`` or of its nearest written ancestor (a missing key → its table);
    with ``env``, where ``[environments.ENV]`` overlays the key when it does."""
    for end in range(len(path), 0, -1):
        key = path[:end]
        overlaid = lines.get(("environments", env, *key)) if env is not None else None
        found = overlaid if overlaid is not None else lines.get(key)
        if found is not None:
            return found
    return None
