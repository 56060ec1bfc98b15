"""Structured output: the JSON grammar against json.loads, each schema keyword, the token masks against a
token-by-token check, and the engine's answers, which must parse and fit."""

import json
import math
import random
import re

import pytest
import torch

from serving import structured
from serving.structured import (
    SchemaError,
    TokenTrie,
    cfg_grammar,
    choice_grammar,
    json_grammar,
    regex_grammar,
    tool_call_grammar,
    tool_text_grammar,
)

BYTES = TokenTrie([bytes([b]) for b in range(256)])  # a vocabulary of single bytes: every text is one way


def fits(grammar, text: str | bytes) -> bool:
    data = text.encode() if isinstance(text, str) else text
    state = grammar.advance(grammar.start, data)
    return state is not None and grammar.done(state)


def random_value(rng: random.Random, depth: int = 0):
    if depth > 3 or rng.random() < 0.4:
        return rng.choice([0, -1, 12, 3.5, -0.25, 1e21, True, False, None, "", 'a"b', "中文\n", "\\", "é😀", "\x7f"])
    if rng.random() < 0.5:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(["k", "键", "a b", ""]) + str(i): random_value(rng, depth + 1) for i in range(rng.randint(0, 3))}


def test_json_object_takes_what_json_loads_takes(monkeypatch):
    """Valid objects, and the same with a byte changed, inserted or deleted: the grammar takes a text exactly when
    json.loads reads an object from it (whitespace unbounded here; the bound has its own test)."""
    monkeypatch.setattr(structured, "FREE_WHITESPACE", True)
    grammar = json_grammar({"type": "object"}, BYTES)
    rng = random.Random(0)
    taken = 0
    for _ in range(6000):
        text = json.dumps({"x": random_value(rng)}, ensure_ascii=rng.random() < 0.5,
                          indent=rng.choice([None, 1, 2])).encode()
        if rng.random() < 0.7:
            text = bytearray(text)
            for _ in range(rng.randint(1, 2)):
                i = rng.randrange(len(text))
                byte = rng.choice(b'{}[]":,.-+eE019tfnu\\ ab\x01\n') if rng.random() < 0.9 else rng.randrange(256)
                op = rng.random()
                if op < 0.4:
                    text[i] = byte
                elif op < 0.7:
                    text.insert(i, byte)
                else:
                    del text[i]
            text = bytes(text)
        try:
            parsed = json.loads(text.decode("utf-8"))
            valid = isinstance(parsed, dict) and text == text.rstrip() and b"NaN" not in text \
                and b"Infinity" not in text  # Python reads NaN and Infinity, and trailing whitespace; JSON does not
        except ValueError:
            valid = False
        assert fits(grammar, text) == valid, text
        taken += valid
    assert 1500 < taken < 4500  # both kinds were tried


def test_whitespace_is_as_json_dumps_writes_it():
    """One space after a colon or a comma, none elsewhere: a small model would pad with runs of it."""
    grammar = json_grammar({"type": "object"}, BYTES)
    for text in ['{"a": [1, 2], "b": {}}', '{"a":[1,2],"b":{}}', json.dumps({"键": [1, {"x": None}]})]:
        assert fits(grammar, text), text
    for text in ['{"a":  1}', '{ "a": 1}', '{"a" : 1}', '{"a": 1 }', '{"a":\n1}', '{"a": [ 1]}', '{"a": 1}\n',
                 ' {"a": 1}']:
        assert not fits(grammar, text), text
    assert fits(grammar, '{"a": "  many   spaces\\n  "}')  # inside a string whitespace is text


PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 4},
    "age": {"type": "integer"},
    "mood": {"enum": ["好", "坏", 3, None]},
    "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 2},
    "score": {"anyOf": [{"type": "number"}, {"type": "null"}]},
    "kind": {"const": "人"}}, "required": ["name", "age"]}
TREE = {"$defs": {"node": {"type": "object", "properties": {
    "v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}}, "required": ["v"]}},
    "$ref": "#/$defs/node"}

CASES = [
    (PERSON, '{"name": "李四", "age": 30}', True),
    (PERSON, '{"age": 30, "name": "李四"}', True),  # any order
    (PERSON, '{"name": "李四"}', False),  # a required key missing
    (PERSON, '{"name": "李四", "age": 30, "x": 1}', False),  # a key the schema does not have
    (PERSON, '{"name": "李四", "age": 30, "age": 31}', False),  # a key twice
    (PERSON, '{"name": "李四", "age": 30.5}', False),  # an integer
    (PERSON, '{"name": "李四", "age": -0}', True),
    (PERSON, '{"name": "张三丰大", "age": 1}', True),  # maxLength counts characters, not bytes
    (PERSON, '{"name": "张三丰大侠", "age": 1}', False),
    (PERSON, '{"name": "a\\"bc", "age": 1}', True),  # an escape is one character
    (PERSON, '{"name": "", "age": 1, "mood": "好"}', True),
    (PERSON, '{"name": "", "age": 1, "mood": 3}', True),
    (PERSON, '{"name": "", "age": 1, "mood": null}', True),
    (PERSON, '{"name": "", "age": 1, "mood": 30}', False),
    (PERSON, '{"name": "", "age": 1, "mood": "中"}', False),
    (PERSON, '{"name": "", "age": 1, "tags": []}', False),  # minItems
    (PERSON, '{"name": "", "age": 1, "tags": ["a", "b"]}', True),
    (PERSON, '{"name": "", "age": 1, "tags": ["a", "b", "c"]}', False),  # maxItems
    (PERSON, '{"name": "", "age": 1, "tags": [1]}', False),
    (PERSON, '{"name": "", "age": 1, "score": 1.5e3}', True),
    (PERSON, '{"name": "", "age": 1, "score": null}', True),
    (PERSON, '{"name": "", "age": 1, "score": "1"}', False),
    (PERSON, '{"name": "", "age": 1, "kind": "人"}', True),
    (PERSON, '{"name": "", "age": 1, "kind": "兽"}', False),
    (TREE, '{"v": 1, "kids": [{"v": 2}, {"v": 3, "kids": []}]}', True),
    (TREE, '{"v": 1, "kids": [{"kids": []}]}', False),
    ({"type": "array", "items": {"type": "boolean"}}, "[true, false]", True),
    ({"type": "array", "items": {"type": "boolean"}}, "[true, 0]", False),
    ({"type": "integer"}, "42", True),  # a number at the top ends where the text ends
    ({"type": "integer"}, "4.2", False),
    ({"type": ["string", "null"]}, "null", True),
    ({"type": ["string", "null"]}, "1", False),
    ({"type": "object", "additionalProperties": {"type": "integer"}}, '{"a": 1, "b": 2}', True),
    ({"type": "object", "additionalProperties": {"type": "integer"}}, '{"a": "1"}', False),
    ({"type": "object", "additionalProperties": False}, "{}", True),
    ({"type": "object", "additionalProperties": False}, '{"a": 1}', False),
    ({"type": "string", "minLength": 2}, '"a"', False),
    ({"type": "string", "minLength": 2}, '"ab"', True),
    ({}, '[1, {"a": null}, "x"]', True),
]


@pytest.mark.parametrize("schema,text,ok", CASES, ids=[f"{i}-{c[1][:30]}" for i, c in enumerate(CASES)])
def test_schema_keywords(schema, text, ok):
    assert fits(json_grammar(schema, BYTES), text) == ok


@pytest.mark.parametrize("schema,message", [
    ({"type": "string", "multipleOf": 2}, "schema.properties.x: the keyword 'multipleOf' is not supported"),
    ({"type": "number", "minimum": 0}, "minimum is supported on integers only"),
    ({"type": "integer", "minimum": 3, "exclusiveMaximum": 3}, "no integer lies between"),
    ({"type": "integer", "maximum": "9"}, "must be numbers"),
    ({"type": "string", "pattern": "(a)\\1"}, r"schema.properties.x.pattern: '\\1' at position"),
    ({"type": "string", "pattern": "^a|b$"}, "anchored pattern with '|' outside a group"),
    ({"type": "string", "format": "hostname"}, 'schema.format: "hostname" is not supported'),
    ({"type": "string", "format": "date", "pattern": "^2"}, "pattern and format together"),
    ({"anyOf": [{"type": "string"}, {"enum": ["a"]}]}, "two branches start with"),
    ({"$ref": "#/$defs/missing"}, "#/$defs/missing is not in the schema"),
    ({"type": "object", "properties": {"a": {}}, "additionalProperties": True}, "takes those keys only"),
    ({"type": "date"}, "type must be one of"),
    ({"enum": []}, "enum must be a non-empty array"),
    ({"type": "object", "properties": {"a": {}}, "required": ["b"]}, "required must list keys"),
])
def test_schemas_it_cannot_enforce_are_refused_with_their_path(schema, message):
    wrapped = {"type": "object", "properties": {"x": schema}} if "pattern" in schema or "multipleOf" in schema \
        else schema
    with pytest.raises(SchemaError, match=message.replace("(", r"\(").replace("$", r"\$")):
        json_grammar(wrapped, BYTES)


def test_tool_call_grammar_picks_the_function_by_its_name():
    functions = [{"name": "get", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                "required": ["city"]}},
                 {"name": "get_time", "parameters": {"properties": {"zone": {"type": "integer"}}}}]
    grammar = tool_call_grammar(functions, BYTES, "<tool_call>", "</tool_call>")
    call = '<tool_call>\n{"name": "%s", "arguments": %s}\n</tool_call>'
    assert fits(grammar, call % ("get", '{"city": "北京"}'))
    assert fits(grammar, call % ("get_time", '{"zone": 8}'))
    assert fits(grammar, call % ("get_time", "{}"))  # parameters without a type are still an object
    assert not fits(grammar, call % ("get", '{"zone": 8}'))  # the other function's arguments
    assert not fits(grammar, call % ("get", "{}"))  # its required argument
    assert not fits(grammar, call % ("put", '{"city": "北京"}'))
    assert not fits(grammar, call % ("get_time", "8"))


def test_tool_text_grammar_holds_the_calls_the_model_opens():
    """tool_choice "auto": text is free, and each <tool_call> opened in it is a whole call of one function; a
    function whose parameters cannot be enforced takes any object."""
    functions = [{"name": "get", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                "required": ["city"]}},
                 {"name": "day", "parameters": {"properties": {"d": {"type": "integer", "multipleOf": 7}}}}]
    grammar = tool_text_grammar(functions, BYTES, "<tool_call>", "</tool_call>")

    def call(name, arguments):
        return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'

    for text in ["", "你好", "<tool", "<<tool_call", "a " + call("get", '{"city": "x"}'),
                 call("get", '{"city": "x"}') + "\n" + call("day", '{"d": "x"}') + "好", "<tool_<tool_call" + call(
                     "day", "{}")[len("<tool_call"):]]:
        assert fits(grammar, text), text
    for text in [call("get", "{}"), call("x", "{}"), "<tool_call>\nhello", call("get", '{"city": "x"}')[:-3],
                 "ok <tool_call>" + call("get", '{"city": "x"}')]:
        assert not fits(grammar, text), text
    one = tool_text_grammar(functions, BYTES, "<tool_call>", "</tool_call>", parallel=False)  # ends at the call
    assert fits(one, "好 " + call("day", "{}")) and not fits(one, call("day", "{}") + "好")
    assert not fits(one, call("day", "{}") + call("day", "{}"))


def test_choice_grammar_takes_exactly_its_texts():
    grammar = choice_grammar(["好评", "好评价", "差评"], BYTES)
    assert all(fits(grammar, text) for text in ["好评", "好评价", "差评"])
    assert not any(fits(grammar, text) for text in ["好", "好评价格", "差", "中评", ""])
    # after 好评 the answer may end or go on to 好评价
    assert grammar.done(grammar.advance(grammar.start, "好评".encode()))
    with pytest.raises(SchemaError):
        choice_grammar(["好评", ""], BYTES)


PATTERNS = {  # pattern: texts it matches, which the test mutates into near misses
    r"\d{3}-\d{4}": ["123-4567"], r"(正面|负面)": ["正面", "负面"], r"[a-c]+x?": ["abcx", "a"],
    r"^(?:ab){2,3}$": ["abab", "ababab"], r"\w+@\w+\.com": ["a_1@b.com", "中@文.com"], r"[^,]*,\s*\S+": ["a, b", ",x"],
    r".{0,3}": ["", "a😀"], r"a{,2}b": ["b", "aab"], r"x{2,}": ["xx", "xxxxx"], r"[\u4e00-\u9fa5]{1,2}": ["中", "正面"],
    r"a{b": ["a{b"], r"(?P<n>[1-9]\d*)(\.\d+)?": ["10.05", "9"], r"答：.*": ["答：", "答：12个"], r"[^\d\s]+": ["é😀-"],
    r"(a|ab)(c|bcd)(d*)": ["abcd", "abcdd", "ac"], r"[-+]?[0-9]*\.?[0-9]+": ["-1.5", ".5", "3"], r"\W": ["-", "\n"],
    r"[\]\-]+|é\t": ["]-]", "é\t"],
}


def test_regex_grammar_takes_what_re_fullmatch_takes():
    """Each pattern against re.fullmatch, fed as UTF-8 one byte at a time: on its matches, on the matches with a
    character changed, added or dropped, and on random texts over ASCII, CJK, an accent and an emoji; a prefix the
    grammar calls whole is one re.fullmatch takes (a text cut inside a character never is)."""
    rng = random.Random(0)
    alphabet = list("abcdx019-+.,@ \t\n_:{}]") + ["正", "面", "负", "答", "：", "é", "😀", "中"]
    for pattern, matches in PATTERNS.items():
        grammar = regex_grammar(pattern, BYTES)
        compiled = re.compile(pattern)
        texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8))) for _ in range(200)]
        for match in matches * 50:
            i = rng.randint(0, len(match))
            texts.append(rng.choice([match, match[:i] + rng.choice(alphabet) + match[i + 1:],
                                     match[:i] + rng.choice(alphabet) + match[i:], match[:i] + match[i + 1:]]))
        assert sum(bool(compiled.fullmatch(t)) for t in texts) >= 10, pattern  # both sides are tried
        for text in texts:
            assert fits(grammar, text) == bool(compiled.fullmatch(text)), (pattern, text)
            data = text.encode()
            for cut in range(1, len(data)):
                state = grammar.advance(grammar.start, data[:cut])
                if state is not None and grammar.done(state):
                    assert compiled.fullmatch(data[:cut].decode()), (pattern, data[:cut])


STRING_PATTERNS = {  # JSON Schema's pattern (found anywhere unless anchored) -> strings it matches
    "^[a-z]+$": ["abc"], r"\d{3}": ["a123b", "123"], "^(好评|差评)": ["好评：质量好"], "元$": ["12元"],
    r"^\S+@\S+\.com$": ["a@b.com"], "^$": [""], r"^a\nb$": ["a\nb"], "[é😀]": ["x😀"], r"^[^\x00-\x1f]*$": ["ok"],
}


def test_string_pattern_takes_what_re_search_takes():
    """A string with `pattern` (and length bounds) against re.search on the decoded text: its matches and near
    misses, written by json.dumps both with and without \\u escapes, and strings that break the JSON."""
    rng = random.Random(1)
    alphabet = list("abz19@.c \n\t\"\\") + ["好", "评", "差", "元", "é", "😀", "：", "\x01"]
    for pattern, matches in STRING_PATTERNS.items():
        for bounds in ({}, {"minLength": 2, "maxLength": 5}):
            grammar = json_grammar({"type": "string", "pattern": pattern, **bounds}, BYTES)
            texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 7))) for _ in range(150)]
            for match in matches * 40:
                i = rng.randint(0, len(match))
                texts.append(rng.choice([match, match[:i] + rng.choice(alphabet) + match[i:],
                                         match[:i] + match[i + 1:]]))
            searched = re.compile(pattern[:-1] + r"\Z" if pattern.endswith("$") else pattern)  # $: the end, as
            for text in texts:  # ECMA-262's (JSON Schema's), not also before a last newline, as Python's
                expected = searched.search(text) is not None and \
                    bounds.get("minLength", 0) <= len(text) <= bounds.get("maxLength", 99)
                for ascii_only in (False, True):
                    assert fits(grammar, json.dumps(text, ensure_ascii=ascii_only)) == expected, (pattern, bounds, text)
            assert not fits(grammar, '"a\x01"') and not fits(grammar, '"\\q"')


FORMAT_CASES = {  # format: (texts of its form, texts that are not)
    "date": (["2026-12-07", "0001-01-31"], ["2026-13-01", "2026-1-07", "2026-12-32", "26-12-07", "2026-12-07T"]),
    "time": (["23:59:60Z", "08:05:00.123+08:00"], ["24:00:00Z", "08:05:00", "8:05:00Z", "08:05Z"]),
    "date-time": (["2026-12-07T08:05:00Z", "2026-12-07T08:05:00.5-05:30"], ["2026-12-07 08:05:00Z", "2026-12-07"]),
    "uuid": (["123e4567-e89b-12d3-a456-426614174000"], ["123e4567e89b12d3a456426614174000", "123e4567-e89b-12d3"]),
    "ipv4": (["192.168.0.1", "255.255.255.255", "0.0.0.0"], ["256.1.1.1", "1.2.3", "01.2.3.4", "1.2.3.4.5"]),
    "email": (["a.b+c@example.com", "x@y.cn"], ["a@b", "@b.com", "a b@c.com", "a@.com"]),
}


@pytest.mark.parametrize("form", FORMAT_CASES)
def test_string_formats_are_their_form(form):
    grammar = json_grammar({"type": "string", "format": form}, BYTES)
    good, bad = FORMAT_CASES[form]
    assert all(fits(grammar, json.dumps(text)) for text in good), form
    assert not any(fits(grammar, json.dumps(text)) for text in bad), form


@pytest.mark.parametrize("bounds", [
    {"minimum": 0}, {"minimum": 1, "maximum": 5}, {"minimum": 10, "maximum": 255}, {"minimum": -5, "maximum": 5},
    {"maximum": -3}, {"exclusiveMinimum": -121, "exclusiveMaximum": -7}, {"minimum": 0.5, "maximum": 99.9},
    {"minimum": 37, "maximum": 37}, {"minimum": -1000}, {"minimum": 5, "maximum": 1234567, "exclusiveMaximum": 900}])
def test_integer_bounds(bounds):
    """minimum / maximum / exclusive bounds on an integer: exactly the integers between, as json.dumps writes them,
    alone and as an object's value followed by more."""
    alone = json_grammar({"type": "integer", **bounds}, BYTES)
    inside = json_grammar({"type": "object", "required": ["n", "ok"],
                           "properties": {"n": {"type": "integer", **bounds}, "ok": {"type": "boolean"}}}, BYTES)
    rng = random.Random(2)
    for n in list(range(-130, 300)) + [rng.randint(-10**7, 10**7) for _ in range(500)]:
        ok = (n >= bounds.get("minimum", -math.inf) and n <= bounds.get("maximum", math.inf)
              and n > bounds.get("exclusiveMinimum", -math.inf) and n < bounds.get("exclusiveMaximum", math.inf))
        assert fits(alone, json.dumps(n)) == ok, (bounds, n)
        assert fits(inside, json.dumps({"n": n, "ok": True})) == ok, (bounds, n)
    assert not any(fits(alone, text) for text in ["-0", "05", "5.0", "5e0", ""])


@pytest.mark.parametrize("pattern,message", [
    (r"(a)\1", r"'\\1' at position 3"), (r"(?=a)b", "lookarounds"), (r"\bword", r"'\\b'"), (r"(?i)a", "flags"),
    (r"a++", "possessive"), (r"a$b", "'\\$' other than at the pattern's end"), (r"*a", "nothing to repeat"),
    (r"[a", "missing ']'"), (r"(a", "missing '\\)'"), (r"a)", "unbalanced"), (r"a{3,2}", "repeat"),
    (r"(\d{100}){300}", "automaton states")])
def test_regex_it_cannot_enforce_is_refused(pattern, message):
    with pytest.raises(SchemaError, match=message):
        regex_grammar(pattern, BYTES)


GBNF_PATTERNS = {  # a GBNF grammar: the regular expression it writes (its PATTERNS entry's texts are tried)
    'root ::= [0-9]{3} "-" [0-9]{4}': (r"[0-9]{3}-[0-9]{4}", ["123-4567"]),
    'root ::= "正面" | "负面"': (r"(正面|负面)", ["正面", "负面"]),
    'root ::= [a-c]+ "x"?': (r"[a-c]+x?", ["abcx", "a"]),
    'root ::= "ab"{2,3}  # a literal repeats whole': (r"(?:ab){2,3}", ["abab", "ababab"]),
    'root ::= [^\\n]{0,3}': (r".{0,3}", ["", "a😀"]),
    'root ::= "a"{0,2} "b"\n': (r"a{,2}b", ["b", "aab"]),
    'root ::= x x+\nx ::= "x"': (r"x{2,}", ["xx", "xxxxx"]),
    'root ::= [\\u4e00-\\u9fa5]{1,2}': (r"[\u4e00-\u9fa5]{1,2}", ["中", "正面"]),
    'root ::= "答：" rest\nrest ::= [^\\n] rest |': (r"答：.*", ["答：", "答：12个"]),
    'root ::= (\n  ("a" | "ab")\n  ("c" | "bcd")\n) "d"*': (r"(a|ab)(c|bcd)(d*)", ["abcd", "abcdd", "ac"]),
    'root ::= sign? digits ("." digits)?\nsign ::= [-+]\ndigits ::= [0-9]+': (r"[-+]?[0-9]+(\.[0-9]+)?",
                                                                             ["-1.5", "3", "+20"]),
    'root ::= [\\]\\-]+ | "é\\t"': (r"[\]\-]+|é\t", ["]-]", "é\t"]),
    'root ::= .{2}': (r"(?s:..)", ["ab", "\n😀"]),
}


def agrees_with(grammar, accepts, texts) -> None:
    """`grammar` (fed as UTF-8 one byte at a time) takes exactly the texts `accepts` takes, and a prefix it calls
    whole is one `accepts` takes (a text cut inside a character never is)."""
    for text in texts:
        assert fits(grammar, text) == accepts(text), text
        data = text.encode()
        for cut in range(1, len(data)):
            state = grammar.advance(grammar.start, data[:cut])
            if state is not None and grammar.done(state):
                assert accepts(data[:cut].decode()), data[:cut]


def mutated(rng: random.Random, alphabet: list[str], matches: list[str], count: int = 200) -> list[str]:
    """Random texts over `alphabet`, and `matches` with a character changed, added or dropped."""
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8))) for _ in range(count)]
    for match in matches * 50:
        i = rng.randint(0, len(match))
        texts.append(rng.choice([match, match[:i] + rng.choice(alphabet) + match[i + 1:],
                                 match[:i] + rng.choice(alphabet) + match[i:], match[:i] + match[i + 1:]]))
    return texts


def test_gbnf_grammar_takes_what_its_regular_expression_takes():
    """A GBNF grammar that writes a regular language (rules, groups, repeats, classes, literals, comments, a rule
    over two lines, an empty alternative) against re.fullmatch of the same language, on the regex test's texts."""
    rng = random.Random(1)
    alphabet = list("abcdx019-+.,@ \t\n_:{}]") + ["正", "面", "负", "答", "：", "é", "😀", "中"]
    for text, (pattern, matches) in GBNF_PATTERNS.items():
        compiled = re.compile(pattern)
        texts = mutated(rng, alphabet, matches)
        assert sum(bool(compiled.fullmatch(t)) for t in texts) >= 10, pattern  # both sides are tried
        agrees_with(cfg_grammar(text, BYTES), lambda t, compiled=compiled: bool(compiled.fullmatch(t)), texts)


def test_gbnf_grammar_takes_nested_text_as_json_loads_does():
    """What no regular expression can write: nested arrays of integers, against json.loads, on random texts and
    near misses of nested arrays; and brackets nested deeper than a regex could count."""
    grammar = cfg_grammar('''
        root  ::= value
        value ::= "[" (value ("," value)*)? "]" | int    # an array of values, or an integer
        int   ::= "-"? ("0" | [1-9] [0-9]*)
    ''', BYTES)

    def loads(text: str) -> bool:
        try:
            value = json.loads(text)
        except ValueError:
            return False
        return not isinstance(value, float)

    rng = random.Random(2)

    def nested(depth: int) -> str:
        if depth > 3 or rng.random() < 0.3:
            return str(rng.choice([0, 7, -3, 12, 105]))
        return "[" + ",".join(nested(depth + 1) for _ in range(rng.randint(0, 3))) + "]"

    texts = mutated(rng, list("[],0123-"), [nested(0) for _ in range(20)], count=400)
    assert sum(map(loads, texts)) >= 100 and sum(not loads(t) for t in texts) >= 100
    agrees_with(grammar, loads, texts)
    deep = "[" * 300 + "]" * 300
    assert fits(grammar, deep) and not fits(grammar, deep[:-1]) and not fits(grammar, deep + "]")


@pytest.mark.parametrize("text,message", [
    ('answer ::= "a"', "no `root` rule"), ('root ::= root "a" | "b"', "left-recursive: rule `root`"),
    ('root ::= a\na ::= b "x"\nb ::= "y"? a', "left-recursive"), ('root ::= ("a"?)*', "left-recursive"),
    ('root ::= x', r"rule `x`, which is not defined, at position 9"), ('root ::= "a', "closing '\"' at position 9"),
    ('root ::= "a" )', "unbalanced"), ('root ::= <[12]>', "token reference"), ('root ::= "a"\nroot ::= "b"',
                                                                                "second definition of rule `root`"),
    ('root ::= [a-', "missing ']'"), ('root := "a"', "'::=' missing"), ('', "empty"), ('root ::= "a"{3,1}', "repeat"),
    ('root ::= "a\nb"', "line break inside a literal"), ('root ::= "\\q"', r"'\\q' at position 10 of the grammar")])
def test_gbnf_it_cannot_enforce_is_refused(text, message):
    with pytest.raises(SchemaError, match=message):
        cfg_grammar(text, BYTES)


def test_regex_masks_take_no_token_that_leads_nowhere(tokenizer_dir):
    """With a real byte-level vocabulary the trie walk equals feeding each token alone (for a whole-answer pattern
    and for a JSON string's, halfway through a \\u escape too), and a token that ends halfway through a
    character is taken only where some character it begins fits the pattern: for [a-z]+ no byte of a CJK
    character, for [\u4e00-\u9fa5]+ the first bytes of CJK characters but no other."""
    from dataset.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    trie = TokenTrie.from_tokenizer(tokenizer)
    by_prefix = {}  # the first one or two bytes of a character's UTF-8 -> the characters that begin so
    for code in range(0x80, 0x110000):
        if not 0xD800 <= code <= 0xDFFF:
            data = chr(code).encode()
            for length in (1, 2):
                by_prefix.setdefault(data[:length], []).append(data)
    in_json = {"type": "string", "pattern": r"^[\u4e00-\u9fa5]{2,}$"}  # JSON Schema's pattern, inside a string
    gbnf = 'root ::= "答：" words ("，" words)*\nwords ::= [\\u4e00-\\u9fa5]+ | "(" words ")"'  # nested too
    for pattern, prefix in [(r"[a-z]+", "ab"), (r"[\u4e00-\u9fa5]+", "中"), (r"\d{3}-\d{4}", "12"), (r"答：.*", "答"),
                            (in_json, '"中'), (in_json, '"中\\u4e'), (gbnf, "答：(中"), (gbnf, "答：((中文")]:
        grammar = json_grammar(pattern, trie) if isinstance(pattern, dict) else \
            cfg_grammar(pattern, trie) if "::=" in pattern else regex_grammar(pattern, trie)
        state = grammar.advance(grammar.start, prefix.encode())
        mask = grammar.allowed(state, len(tokenizer), "cpu")
        expected = torch.tensor([grammar.advance(state, trie.bytes_of(t)) is not None for t in range(len(tokenizer))])
        assert torch.equal(mask, expected) and mask.any(), pattern
        for token in mask.nonzero()[:, 0].tolist():  # a token cut inside a character: some character fits
            data = trie.bytes_of(token)
            cut = next((i for i in range(max(0, len(data) - 3), len(data)) if data[i] >= 0xC0
                        and len(data) - i < (2 if data[i] < 0xE0 else 3 if data[i] < 0xF0 else 4)), None)
            if cut is not None:
                head = grammar.advance(state, data[:cut])
                assert any(grammar.advance(head, char) for char in by_prefix[data[cut:]]), (pattern, data)
    ascii_only = regex_grammar(r"[a-z]+", trie)
    assert not any(b >= 0x80 for t in ascii_only.allowed(ascii_only.start, len(tokenizer), "cpu").nonzero()[:, 0]
                   for b in trie.bytes_of(int(t)))


def test_token_masks_equal_checking_every_token(tokenizer_dir):
    """The trie walk finds the same tokens as feeding each token's bytes on its own, in states inside a key, a
    string, a number and between values, with a real byte-level vocabulary."""
    from dataset.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    trie = TokenTrie.from_tokenizer(tokenizer)
    grammar = json_grammar(PERSON, trie)
    assert all(trie.bytes_of(t) is None for t in tokenizer.all_special_ids)
    for prefix in ["", "{", '{"na', '{"name": "李', '{"name": "ab", "age": 1', '{"name": "ab", "age": 1, "tags": [',
                   '{"name": "\\u00', '{"name": "ab", "age": 1, "score": 1.']:
        state = grammar.advance(grammar.start, prefix.encode())
        assert state is not None, prefix
        mask = grammar.allowed(state, len(tokenizer) + 3, "cpu")
        expected = torch.zeros_like(mask)
        for token in range(len(tokenizer)):
            expected[token] = grammar.advance(state, trie.bytes_of(token)) is not None
        assert torch.equal(mask, expected), prefix
        assert mask.any() and not mask[len(tokenizer):].any()
        assert grammar.allowed(state, len(tokenizer) + 3, "cpu") is mask  # cached


@pytest.fixture(scope="module")
def engine(chat_checkpoint):
    from serving.engine import Engine
    from serving.loading import load

    loaded = load(str(chat_checkpoint["model"]), None, "cpu", None)
    engine = Engine(loaded.model).start()
    yield loaded, engine
    engine.close()


def test_a_random_model_answers_in_the_schema(engine):
    """An untrained model writes what the schema allows, sampled, on several seeds: every answer parses, fits and
    ends on its own (the stop token is the only token left once the object closes)."""
    from serving.engine import SamplingParams, complete

    loaded, engine = engine
    trie = TokenTrie.from_tokenizer(loaded.tokenizer)
    schema = {"type": "object", "properties": {"label": {"enum": ["好评", "差评"]}, "stars": {"type": "integer"},
                                               "ok": {"type": "boolean"}, "why": {"type": "string", "maxLength": 3}},
              "required": ["label", "stars", "ok", "why"]}
    grammar = json_grammar(schema, trie)
    prompt = loaded.tokenizer("这条评论是好评还是差评？", add_special_tokens=False)["input_ids"]
    seen = set()
    for seed in range(6):
        params = SamplingParams(max_new_tokens=200, temperature=1.0, seed=seed, grammar=grammar,
                                stop_token_ids=tuple(loaded.stop_token_ids))
        answer = complete(engine, prompt, params)
        text = loaded.tokenizer.decode(answer.tokens, skip_special_tokens=True)
        assert answer.finish_reason == "stop", text
        value = json.loads(text)
        assert set(value) == {"label", "stars", "ok", "why"} and value["label"] in ("好评", "差评")
        assert isinstance(value["stars"], int) and isinstance(value["ok"], bool) and len(value["why"]) <= 3
        seen.add(text)
    assert len(seen) > 1  # sampled, not forced to one answer
    # without a stop token the engine ends the answer itself once it is whole and nothing may follow, but text
    # that may go on (free text around tool calls) goes on
    answer = complete(engine, prompt, SamplingParams(max_new_tokens=200, temperature=1.0, seed=0, grammar=grammar))
    assert answer.finish_reason == "stop" and json.loads(loaded.tokenizer.decode(answer.tokens))["label"]
    text = tool_text_grammar([{"name": "f"}], trie, "<tool_call>", "</tool_call>")
    answer = complete(engine, prompt, SamplingParams(max_new_tokens=20, temperature=1.0, seed=0, grammar=text))
    assert answer.finish_reason == "length" and len(answer.tokens) == 20
