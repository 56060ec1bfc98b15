"""Regular expressions for structured output (vLLM's `structured_outputs.regex`): a pattern compiled into an automaton
over characters (Thompson's construction), which serving/structured.py runs over the answer's bytes. The whole
answer must match, as `re.fullmatch` has it.

Supported: literal characters and escapes (`\\.`, `\\n`, `\\t`, `\\x41`, `\\u4e00`, ...), `.` (any character but a
newline), classes (`[a-z0-9_]`, `[^,]`), `\\d \\w \\s` and `\\D \\W \\S` as Python's `re` reads them in a str pattern
(Unicode digits, word characters and whitespace), groups `(...)`, `(?:...)`, `(?P<name>...)`, alternation `|`,
the quantifiers `* + ? {m} {m,} {m,n}` (lazy ones too: they match the same texts), `^` at the start and `$` at the end.
Anything else (backreferences, lookarounds, `\\b`, inline flags, possessive quantifiers) raises PatternError, as
does a pattern whose automaton would exceed MAX_STATES.

A character class is a sorted tuple of disjoint code point ranges, so a test is a bisection, and so is the question
the byte-level walk asks halfway through a character: may any character from this range of code points come next?
"""

from bisect import bisect_right
from functools import cache

MAX_STATES = 20_000
MAX_CODE_POINT = 0x10FFFF
SURROGATES = (0xD800, 0xDFFF)  # not characters: UTF-8 cannot carry them

Ranges = tuple[tuple[int, int], ...]


class PatternError(ValueError):
    """A pattern this module cannot enforce; the message says what and where."""


def _union(ranges) -> Ranges:
    merged: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return tuple((lo, hi) for lo, hi in merged)


def _complement(ranges: Ranges) -> Ranges:
    """Every character not in `ranges` (surrogates are never characters)."""
    out, start = [], 0
    for lo, hi in _union([*ranges, SURROGATES]):
        if lo > start:
            out.append((start, lo - 1))
        start = hi + 1
    if start <= MAX_CODE_POINT:
        out.append((start, MAX_CODE_POINT))
    return tuple(out)


@cache
def _category(letter: str) -> Ranges:
    """\\d, \\w or \\s as Python's re has them for str patterns (decimal digits; str.isalnum() and the underscore;
    str.isspace()), as code point ranges: one scan of Unicode, the first time a pattern uses the class."""
    test = {"d": str.isdecimal, "w": lambda c: c.isalnum() or c == "_", "s": str.isspace}[letter]
    ranges, start = [], None
    for code in range(MAX_CODE_POINT + 2):
        inside = code <= MAX_CODE_POINT and test(chr(code))
        if inside and start is None:
            start = code
        elif not inside and start is not None:
            ranges.append((start, code - 1))
            start = None
    return tuple(ranges)


def intersects(ranges: Ranges, lo: int, hi: int) -> bool:
    """Whether a class holds any code point from lo to hi."""
    i = bisect_right(ranges, (hi, MAX_CODE_POINT + 1)) - 1
    return i >= 0 and ranges[i][1] >= lo


ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v", "a": "\a", "0": "\0"}
SPECIAL = set(".^$*+?{}[]()|\\/-")


class _Parser:
    """Pattern text -> a tree: ("chars", ranges), ("seq", [tree]), ("alt", [tree]), ("rep", tree, least, most)."""

    def __init__(self, pattern: str):
        self.text, self.pos, self.depth = pattern, 0, 0  # depth: the groups open here

    def fail(self, what: str):
        raise PatternError(f"{what} at position {self.pos} of the pattern is not supported")

    def peek(self, ahead: int = 0) -> str | None:
        return self.text[self.pos + ahead] if self.pos + ahead < len(self.text) else None

    def parse(self):
        if self.peek() == "^":  # at the very start it asks nothing more of a whole match
            self.pos += 1
        tree = self.alternation()
        if self.pos < len(self.text):
            raise PatternError(f"unbalanced ')' at position {self.pos} of the pattern")
        return tree

    def alternation(self):
        branches = [self.sequence()]
        while self.peek() == "|":
            self.pos += 1
            branches.append(self.sequence())
        return branches[0] if len(branches) == 1 else ("alt", branches)

    def sequence(self):
        items = []
        while self.peek() not in (None, "|", ")"):
            if self.peek() == "$":  # at the very end it asks nothing more of a whole match
                if self.pos + 1 < len(self.text) or self.depth:
                    self.fail("'$' other than at the pattern's end")
                self.pos += 1
                continue
            items.append(self.quantified(self.atom()))
        return ("seq", items)

    def quantified(self, tree):
        while True:
            char = self.peek()
            if char in ("*", "+", "?"):
                self.pos += 1
                bounds = {"*": (0, None), "+": (1, None), "?": (0, 1)}[char]
            elif char == "{" and (bounds := self.braces()) is not None:
                pass
            else:
                return tree
            if self.peek() == "?":  # lazy: the same texts match
                self.pos += 1
            elif self.peek() == "+":
                self.fail("a possessive quantifier")
            if tree[0] == "rep":
                self.fail("a quantifier on a quantifier")
            tree = ("rep", tree, *bounds)

    def braces(self) -> tuple[int, int | None] | None:
        """{m}, {m,}, {m,n} (or {,n}); None where the brace is a literal one, as re reads it."""
        end = self.text.find("}", self.pos)
        inside = self.text[self.pos + 1:end] if end > 0 else ""
        least, comma, most = inside.partition(",")
        if end < 0 or not (least.isdigit() or (comma and most.isdigit() and not least)) \
                or (most and not most.isdigit()):
            return None
        self.pos = end + 1
        low = int(least or 0)
        high = (None if comma and not most else int(most)) if comma else low
        if high is not None and high < low:
            self.fail(f"the repeat {{{inside}}}")
        return low, high

    def atom(self):
        char = self.peek()
        self.pos += 1
        if char == "(":
            if self.peek() == "?":
                if self.text.startswith("?:", self.pos):
                    self.pos += 2
                elif self.text.startswith("?P<", self.pos) and ">" in self.text[self.pos:]:
                    self.pos = self.text.index(">", self.pos) + 1
                else:
                    self.fail("'(?' (lookarounds, flags, named references)")
            self.depth += 1
            tree = self.alternation()
            if self.peek() != ")":
                raise PatternError("missing ')' at the end of the pattern")
            self.pos += 1
            self.depth -= 1
            return tree
        if char == "[":
            return ("chars", self.char_class())
        if char == ".":
            return ("chars", _complement(((10, 10),)))
        if char == "\\":
            return ("chars", self.escape(in_class=False))
        if char in ("*", "+", "?"):
            self.pos -= 1
            self.fail(f"'{char}' with nothing to repeat")
        if char == "^":
            self.pos -= 1
            self.fail("'^' other than at the pattern's start")
        return ("chars", ((ord(char), ord(char)),))

    def escape(self, in_class: bool) -> Ranges:
        char = self.peek()
        if char is None:
            raise PatternError("a '\\' at the end of the pattern")
        self.pos += 1
        if char in "dws":
            return _category(char)
        if char in "DWS":
            return _complement(_category(char.lower()))
        if char in ESCAPES and not (char == "0" and (self.peek() or "").isdigit()):
            return ((ord(ESCAPES[char]),) * 2,)
        if char in "xuU":
            digits = {"x": 2, "u": 4, "U": 8}[char]
            code = self.text[self.pos:self.pos + digits]
            if len(code) != digits or any(c not in "0123456789abcdefABCDEF" for c in code):
                self.pos -= 2
                self.fail(f"'\\{char}' without {digits} hex digits")
            self.pos += digits
            return ((int(code, 16),) * 2,)
        if char == "b" and in_class:
            return ((8, 8),)
        if char in SPECIAL or not (char.isalnum() or char == "_"):
            return ((ord(char),) * 2,)
        self.pos -= 2
        self.fail(f"'\\{char}'")

    def char_class(self) -> Ranges:
        negated = self.peek() == "^"
        self.pos += negated
        ranges, first = [], True
        while True:
            char = self.peek()
            if char is None:
                raise PatternError("missing ']' at the end of the pattern")
            if char == "]" and not first:
                self.pos += 1
                break
            first = False
            if char == "[" and self.peek(1) == ":":
                self.fail("a POSIX class '[:'")
            self.pos += 1
            item = self.escape(in_class=True) if char == "\\" else ((ord(char),) * 2,)
            if self.peek() == "-" and self.peek(1) not in (None, "]") and len(item) == 1 and item[0][0] == item[0][1]:
                self.pos += 1
                end_char = self.peek()
                self.pos += 1
                end = self.escape(in_class=True) if end_char == "\\" else ((ord(end_char),) * 2,)
                if len(end) != 1 or end[0][0] != end[0][1] or end[0][0] < item[0][0]:
                    self.fail("a bad range in a class")
                item = ((item[0][0], end[0][0]),)
            ranges += item
        return _complement(ranges) if negated else _complement(_complement(ranges))  # surrogates left out


class Regex:
    """A compiled pattern: a nondeterministic automaton whose states are numbers; what the answer has matched so far
    is a frozenset of them. `start`: the states before any character; `move(states, code)`: after one; `accepts`."""

    def __init__(self, pattern: str):
        if not isinstance(pattern, str):
            raise PatternError("the pattern must be a string")
        self.pattern = pattern
        self.empty: list[list[int]] = []  # state -> states reached without reading a character
        self.edges: list[list[tuple[Ranges, int]]] = []  # state -> (class, next state)
        start, self.accept = self._build(_Parser(pattern).parse())
        self.start = self._closure({start})
        self._moves: dict[tuple[frozenset, int], frozenset] = {}
        self._viable: dict[tuple[frozenset, int, int], bool] = {}

    def __repr__(self) -> str:
        return f"Regex({self.pattern!r})"

    def _new(self) -> int:
        if len(self.empty) >= MAX_STATES:
            raise PatternError(f"the pattern needs more than {MAX_STATES} automaton states (large repeats)")
        self.empty.append([])
        self.edges.append([])
        return len(self.empty) - 1

    def _build(self, tree) -> tuple[int, int]:
        """The fragment for a tree: (its entry state, its exit state)."""
        kind = tree[0]
        if kind == "chars":
            enter, leave = self._new(), self._new()
            self.edges[enter].append((tree[1], leave))
            return enter, leave
        if kind == "seq":
            enter = leave = self._new()
            for item in tree[1]:
                first, last = self._build(item)
                self.empty[leave].append(first)
                leave = last
            return enter, leave
        if kind == "alt":
            enter, leave = self._new(), self._new()
            for branch in tree[1]:
                first, last = self._build(branch)
                self.empty[enter].append(first)
                self.empty[last].append(leave)
            return enter, leave
        _, inner, least, most = tree
        enter = leave = self._new()
        for _ in range(least):  # the required copies, in a row
            first, last = self._build(inner)
            self.empty[leave].append(first)
            leave = last
        if most is None:  # then any number more: a loop
            first, last = self._build(inner)
            self.empty[leave].append(first)
            self.empty[last].append(first)
            end = self._new()
            self.empty[leave].append(end)
            self.empty[last].append(end)
            return enter, end
        end = self._new()
        for _ in range(most - least):  # then up to most - least optional ones, each a way out
            self.empty[leave].append(end)
            first, last = self._build(inner)
            self.empty[leave].append(first)
            leave = last
        self.empty[leave].append(end)
        return enter, end

    def _closure(self, states) -> frozenset:
        seen, todo = set(states), list(states)
        while todo:
            for nxt in self.empty[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return frozenset(seen)

    def move(self, states: frozenset, code: int) -> frozenset:
        """The states after the character `code` (empty: the pattern cannot take it)."""
        key = (states, code)
        after = self._moves.get(key)
        if after is None:
            reached = {nxt for state in states for ranges, nxt in self.edges[state] if intersects(ranges, code, code)}
            after = self._moves[key] = self._closure(reached) if reached else frozenset()
        return after

    def viable(self, states: frozenset, lo: int, hi: int) -> bool:
        """Whether some character from code point lo to hi may come next (a character's first bytes, read)."""
        key = (states, lo, hi)
        known = self._viable.get(key)
        if known is None:
            known = self._viable[key] = any(intersects(ranges, lo, hi) for state in states
                                            for ranges, _ in self.edges[state])
        return known

    def accepts(self, states: frozenset) -> bool:
        return self.accept in states


def integer_range_pattern(least: int | None, most: int | None) -> str:
    """A pattern for the integers from `least` to `most` (None: unbounded) as JSON writes them: no leading zeros,
    no "-0". Built digit by digit: 10-255 is 1[0-9]{1}|[2-9][0-9]|1[0-9][0-9]|2[0-4][0-9]|25[0-5], in effect."""
    parts = []
    if most is None or most >= 0:  # the ones from max(least, 0) up
        parts += _upward(max(least or 0, 0), most)
    if least is None or least < 0:  # the negative ones: "-" and their sizes, from -min(most, -1) up
        sizes = _upward(1 if most is None else max(-most, 1), None if least is None else -least)
        parts.append(f"-(?:{'|'.join(sizes)})")
    return "|".join(parts)


def _upward(low: int, high: int | None) -> list[str]:
    """Patterns for low..high (0 <= low; high None: no end)."""
    if high is not None and low > high:
        return []
    if high is None:  # up to the last number of low's length, then every longer one
        size = len(str(low))
        return _upward(low, 10 ** size - 1) + [f"[1-9][0-9]{{{size},}}"]
    parts = []
    while low <= high:  # by number of digits
        end = min(high, 10 ** len(str(low)) - 1)
        parts += _same_length(str(low), str(end))
        low = end + 1
    return parts


def _same_length(low: str, high: str) -> list[str]:
    """Patterns for the numbers from low to high, both written with the same number of digits."""
    if low == high:
        return [low]
    if set(low) == {"0"} and set(high) == {"9"}:
        return [f"[0-9]{{{len(low)}}}"]
    if len(low) == 1:
        return [f"[{low}-{high}]"]
    if low[0] == high[0]:
        return [low[0] + f"(?:{'|'.join(_same_length(low[1:], high[1:]))})"]
    rest = len(low) - 1
    parts = [low[0] + f"(?:{'|'.join(_same_length(low[1:], '9' * rest))})"]
    if int(high[0]) - int(low[0]) > 1:
        parts.append(f"[{int(low[0]) + 1}-{int(high[0]) - 1}][0-9]{{{rest}}}")
    parts.append(high[0] + f"(?:{'|'.join(_same_length('0' * rest, high[1:]))})")
    return parts
