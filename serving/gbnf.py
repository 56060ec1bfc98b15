"""Context-free grammars for structured output (vLLM's `structured_outputs.grammar`, llama.cpp's `grammar`): a GBNF
text compiled into a pushdown recognizer over characters, which serving/structured.py runs over the answer's bytes as
it runs a regular expression (the same `start`, `move`, `viable` and `accepts`). The whole answer must be `root`.

The notation is llama.cpp's GBNF, which vLLM's EBNF (xgrammar's) shares:

    root   ::= answer ("，" answer)*      # a rule: a name, ::=, alternatives separated by |
    answer ::= "好评" | "差评" | [0-9]{1,3} | item
    item   ::= "[" [^\\]\\n]+ "]"          # "literals", [classes], [^negated], . (any character)

Literals and classes take the escapes `\\n \\t \\r \\\\ \\" \\] \\xHH \\uHHHH \\UHHHHHHHH`; a rule name is letters,
digits, `-` and `_`; `(...)` groups; `* + ? {m} {m,} {m,n}` repeat; `#` starts a comment. A rule may refer to any
rule, itself included, except at its own beginning: a left-recursive grammar (`expr ::= expr "+" term`, or a repeat
of something that may be empty) raises GrammarError, as llama.cpp refuses it, with the rule named; so do an
undefined rule, a missing `root`, and anything else the notation does not have, with its position.

What the answer has matched so far is a frozenset of stacks. A stack is a tuple of positions (rule, alternative,
element), the innermost last; each stack's top is a class of characters the answer may go on with, and the empty
stack means the answer may end here. A character moves every stack whose top takes it to the next element, and
a stack whose rule is done returns to the rule that referred to it (a reference at the end of an alternative leaves
no return position behind, so a right-recursive list does not deepen its stack).
"""

from serving.patterns import PatternError, Ranges, _complement, _Parser, intersects

MAX_STACKS = 4096  # stacks one state may hold (an ambiguous grammar multiplies them); beyond: the character fails
MAX_DEPTH = 1024  # references one stack may hold (brackets nested some hundreds deep); deeper: the stack fails
MAX_RULES = 20_000
ANY = _complement(())  # `.`: any character, a newline too, as llama.cpp has it

Element = tuple[str, object]  # ("chars", Ranges) or ("rule", rule id)


class GrammarError(ValueError):
    """A grammar this module cannot enforce; the message says what and where."""


def _in_name(char: str) -> bool:
    """A character a rule name may hold: an ASCII letter or digit, `-` or `_`."""
    return char.isascii() and char.isalnum() or char in "-_"


class _Reader(_Parser):
    """GBNF text -> rules. Classes and escapes are read as patterns.py reads them in a regular expression."""

    def __init__(self, text: str):
        super().__init__(text)
        self.names: dict[str, int] = {}  # rule name -> id
        self.rules: list[list[list[Element]]] = []  # id -> alternatives -> elements
        self.labels: list[str] = []  # id -> the name a message uses (a helper rule: its rule's, with a number)
        self.defined: set[int] = set()
        self.used: dict[int, int] = {}  # rule id -> a position that refers to it
        self.current = ""

    def fail(self, what: str):
        raise GrammarError(f"{what} at position {self.pos} of the grammar")

    def space(self) -> None:
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char == "#":
                end = self.text.find("\n", self.pos)
                self.pos = len(self.text) if end < 0 else end
            elif char.isspace():
                self.pos += 1
            else:
                return

    def name(self) -> str:
        start = self.pos
        while self.pos < len(self.text) and _in_name(self.text[self.pos]):
            self.pos += 1
        if self.pos == start:
            self.fail(f"{self.text[self.pos]!r} where a rule name belongs" if self.pos < len(self.text)
                      else "the end of the text where a rule name belongs")
        return self.text[start:self.pos]

    def rule_id(self, name: str) -> int:
        if name not in self.names:
            self.names[name] = self._new(name)
        return self.names[name]

    def _new(self, label: str) -> int:
        if len(self.rules) >= MAX_RULES:
            raise GrammarError(f"the grammar needs more than {MAX_RULES} rules (large repeats)")
        self.rules.append([])
        self.labels.append(label)
        return len(self.rules) - 1

    def helper(self, alternatives: list[list[Element]]) -> int:
        """A rule for a group or a repeat, named after the rule it is written in."""
        rule = self._new(f"{self.current} (its part at position {self.pos})")
        self.rules[rule] = alternatives
        return rule

    def read(self) -> list[list[list[Element]]]:
        self.space()
        if self.pos == len(self.text):
            raise GrammarError("the grammar is empty: it needs at least `root ::= ...`")
        while self.pos < len(self.text):
            self.current = self.name()
            rule = self.rule_id(self.current)
            if rule in self.defined:
                self.fail(f"a second definition of rule `{self.current}`")
            self.space()
            if not self.text.startswith("::=", self.pos):
                self.fail("'::=' missing after a rule name")
            self.pos += 3
            self.rules[rule] = self.alternatives(nested=False)
            self.defined.add(rule)
        for rule, at in self.used.items():
            if rule not in self.defined:
                self.pos = at
                self.fail(f"rule `{self.labels[rule]}`, which is not defined,")
        if "root" not in self.names or self.names["root"] not in self.defined:
            raise GrammarError("the grammar has no `root` rule: the whole answer is `root`")
        return self.rules

    def alternatives(self, nested: bool) -> list[list[Element]]:
        branches = [self.sequence(nested)]
        while self.peek() == "|":
            self.pos += 1
            branches.append(self.sequence(nested))
        return branches

    def _rule_starts_here(self) -> bool:
        """A name followed by ::= : the next rule begins (a rule's alternatives may span lines)."""
        at = self.pos
        try:
            self.name()
            self.space()
            return self.text.startswith("::=", self.pos)
        except GrammarError:
            return False
        finally:
            self.pos = at

    def sequence(self, nested: bool) -> list[Element]:
        items: list[Element] = []
        self.space()
        while self.pos < len(self.text) and self.peek() not in ("|", ")"):
            if not nested and self._rule_starts_here():
                break
            items += self.repeated(self.element())
            self.space()
        if self.peek() == ")" and not nested:
            self.fail("an unbalanced ')'")
        return items

    def element(self) -> list[Element]:
        char = self.peek()
        start = self.pos
        if char == '"':
            self.pos += 1
            items = []
            while self.peek() != '"':
                if self.peek() is None:
                    self.pos = start
                    self.fail("a literal without its closing '\"'")
                if self.peek() == "\n":
                    self.fail("a line break inside a literal (write \\n)")
                self.pos += 1
                char = self.text[self.pos - 1]
                items.append(("chars", self.escape(in_class=False) if char == "\\" else ((ord(char),) * 2,)))
            self.pos += 1
            return items
        if char == "[":
            self.pos += 1
            return [("chars", self.char_class())]
        if char == ".":
            self.pos += 1
            return [("chars", ANY)]
        if char == "(":
            self.pos += 1
            alternatives = self.alternatives(nested=True)
            if self.peek() != ")":
                self.pos = start
                self.fail("a '(' without its ')'")
            self.pos += 1
            return [("rule", self.helper(alternatives))]
        if char == "<":
            self.fail("a token reference '<...>'")
        if char is not None and _in_name(char):
            name = self.name()
            rule = self.rule_id(name)
            self.used.setdefault(rule, start)
            return [("rule", rule)]
        self.fail(f"{char!r}" if char is not None else "the end of the text")

    def repeated(self, items: list[Element]) -> list[Element]:
        """`items` with the repeats written after them, each a helper rule (x* is R ::= x R | nothing)."""
        while True:
            self.space()
            char = self.peek()
            if char in ("*", "+", "?"):
                self.pos += 1
                least, most = {"*": (0, None), "+": (1, None), "?": (0, 1)}[char]
            elif char == "{":
                if (bounds := self.braces()) is None:
                    self.fail("a repeat that is not {m}, {m,} or {m,n}")
                least, most = bounds
            else:
                return items
            if len(items) != 1:  # a literal of several characters repeats whole
                items = [("rule", self.helper([items]))]
            if most is None:
                loop = self.helper([])
                self.rules[loop] = [items + [("rule", loop)], []]
                tail = [("rule", loop)]
            else:
                tail = []
                for _ in range(most - least):  # nested optional copies: x (x (x)?)?)? is unambiguous
                    tail = [("rule", self.helper([items + tail, []]))]
            items = items * least + tail


class Cfg:
    """A compiled GBNF grammar. `start`: the stacks before any character; `move(state, code)`: after one (empty:
    the grammar cannot take it); `viable(state, lo, hi)`: whether some character from lo to hi may come next;
    `accepts(state)`: whether the answer may end here."""

    def __init__(self, text: str):
        if not isinstance(text, str):
            raise GrammarError("the grammar must be a string")
        self.text = text
        reader = _Reader(text)
        try:
            self.rules = reader.read()
        except PatternError as exc:  # a class or an escape
            raise GrammarError(str(exc).replace("of the pattern", "of the grammar")) from exc
        self.labels = reader.labels
        self._refuse_left_recursion()
        self.root = reader.names["root"]
        self._moves: dict[tuple[frozenset, int], frozenset] = {}
        self._viable: dict[tuple[frozenset, int, int], bool] = {}
        self.start = frozenset().union(*(self._expand(((self.root, alt, 0),))
                                         for alt in range(len(self.rules[self.root]))))

    def __repr__(self) -> str:
        return f"Cfg({self.text[:40]!r})"

    def _refuse_left_recursion(self) -> None:
        """A rule that can begin with itself (through rules that may match nothing) would expand forever."""
        nullable: set[int] = set()
        changed = True
        while changed:
            changed = False
            for rule, alternatives in enumerate(self.rules):
                if rule not in nullable and any(all(kind == "rule" and value in nullable for kind, value in alt)
                                                for alt in alternatives):
                    nullable.add(rule)
                    changed = True
        begins = [set() for _ in self.rules]  # rule -> the rules it may begin with
        for rule, alternatives in enumerate(self.rules):
            for alt in alternatives:
                for kind, value in alt:
                    if kind == "chars":
                        break
                    begins[rule].add(value)
                    if value not in nullable:
                        break
        state = [0] * len(self.rules)  # 0 unseen, 1 on the path, 2 done

        def visit(rule: int) -> None:
            state[rule] = 1
            for nxt in begins[rule]:
                if state[nxt] == 1:
                    raise GrammarError(f"the grammar is left-recursive: rule `{self.labels[nxt]}` can begin with "
                                       "itself (directly, through other rules, or as a repeat of something that "
                                       "may be empty); write the repeat on the right (a ::= b (\"+\" b)*)")
                if state[nxt] == 0:
                    visit(nxt)
            state[rule] = 2

        for rule in range(len(self.rules)):
            if state[rule] == 0:
                visit(rule)

    def _expand(self, stack: tuple) -> set:
        """The stacks `stack` stands for once every reference on its top is followed: each top a class of
        characters, or the empty stack (the answer may end). A stack deeper than MAX_DEPTH is dropped."""
        out, todo, seen = set(), [stack], set()
        while todo:
            stack = todo.pop()
            if stack in seen:
                continue
            seen.add(stack)
            if not stack:
                out.add(())
                continue
            rule, alt, i = stack[-1]
            elements = self.rules[rule][alt]
            if i == len(elements):  # this alternative is done: back to the rule that referred to it
                todo.append(stack[:-1])
            elif elements[i][0] == "chars":
                out.add(stack)
            elif len(stack) < MAX_DEPTH:
                target = elements[i][1]
                rest = stack[:-1] + ((rule, alt, i + 1),) if i + 1 < len(elements) else stack[:-1]
                todo += [rest + ((target, a, 0),) for a in range(len(self.rules[target]))]
        return out

    def _top(self, stack: tuple) -> Ranges:
        rule, alt, i = stack[-1]
        return self.rules[rule][alt][i][1]

    def move(self, state: frozenset, code: int) -> frozenset:
        key = (state, code)
        after = self._moves.get(key)
        if after is None:
            reached = set()
            for stack in state:
                if stack and intersects(self._top(stack), code, code):
                    rule, alt, i = stack[-1]
                    reached |= self._expand(stack[:-1] + ((rule, alt, i + 1),))
            after = frozenset(reached) if len(reached) <= MAX_STACKS else frozenset()
            if len(self._moves) > 100_000:
                self._moves.clear()
            self._moves[key] = after
        return after

    def viable(self, state: frozenset, lo: int, hi: int) -> bool:
        key = (state, lo, hi)
        known = self._viable.get(key)
        if known is None:
            known = any(stack and intersects(self._top(stack), lo, hi) for stack in state)
            if len(self._viable) > 100_000:
                self._viable.clear()
            self._viable[key] = known
        return known

    def accepts(self, state: frozenset) -> bool:
        return () in state

