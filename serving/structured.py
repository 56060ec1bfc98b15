"""Structured output: an answer made to fit a JSON schema (OpenAI's `response_format`), a tool call made to fit
its function (`tool_choice` "required" or a named function), one of a few texts (vLLM's `choice`), or a regular
expression (vLLM's `regex`: serving/patterns.py compiles it).

A small model writes JSON that parses now and then; constrained decoding makes every answer parse. The grammar is
a pushdown automaton over bytes: its state is a stack of frames, plain tuples, so a state can key a cache, and
`advance` feeds it a token's bytes. Which tokens may come next is found by walking the vocabulary as a trie of
token bytes from the current state: a prefix the automaton refuses prunes every token under it. The answer is
cached per state, so inside a string, where the state barely changes, a token costs a dictionary lookup.

The schema subset: `type` (one or a list), `properties`, `required`, `additionalProperties` (false, or a schema
for an object without properties), `items`, `minItems`, `maxItems`, `minLength`, `maxLength`, `pattern` (found
anywhere in the string unless `^` / `$` anchor it; serving/patterns.py's subset), `format` (date, time, date-time,
uuid, ipv4, email: their form, FORMATS), `minimum`, `maximum`, `exclusiveMinimum`, `exclusiveMaximum` (on integers:
a pattern of their digits), `enum`, `const`, `anyOf` (branches that start with different characters: a string or
null, an object or an array), `$ref` into `$defs` or `definitions`, and the annotations (`title`, `description`,
`default`, `examples`, ...). An object with `properties` takes only those keys, in any order, the `required` ones
before it closes, as OpenAI's strict mode does. Any other keyword (`multipleOf`, bounds on numbers that may have a
fraction, ...) is refused with its path: a 400 is better than an answer that does not fit. Whitespace between the
JSON's tokens is as json.dumps writes it: one space after a colon or a comma, none elsewhere (`{"a": 1, "b": [1,
2]}`).
"""

import json
import math
from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerFast

from serving.chat_format import token_bytes
from serving.gbnf import Cfg, GrammarError
from serving.patterns import PatternError, Regex, integer_range_pattern

FREE_WHITESPACE = False  # True: up to 64 whitespace bytes anywhere between the JSON's tokens (the tests' check)
MAX_CACHED_STATES = 4096  # allowed-token masks kept per grammar

ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "strict", "name",
               "deprecated", "readOnly", "writeOnly"}
KEYWORDS = {"type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems", "minLength",
            "maxLength", "pattern", "format", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "enum",
            "const", "anyOf", "$ref", "$defs", "definitions"}
KINDS = ("object", "array", "string", "number", "integer", "boolean", "null")
_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_DATE, _TIME = r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])", \
    r"([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])"
FORMATS = {  # a string `format` as the pattern its whole text must match: the form (RFC 3339's for times), not the
    "date": _DATE, "time": _TIME, "date-time": f"{_DATE}T{_TIME}",  # calendar (a 31st of February passes)
    "uuid": "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
    "ipv4": rf"{_OCTET}(\.{_OCTET}){{3}}", "email": r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+",
}
WHITESPACE = frozenset(b" \t\n\r")
HEX = frozenset(b"0123456789abcdefABCDEF")


def _room(where: str) -> int:
    """How many whitespace bytes may come at `where`: one space after a colon or a comma (where a value or the next
    key or item begins), as json.dumps writes JSON, and none elsewhere. Left free, a small model pads its answer
    with runs of spaces and newlines."""
    return 64 if FREE_WHITESPACE else int(where in ("value", "next"))


def _is_space(byte: int) -> bool:
    return byte in WHITESPACE if FREE_WHITESPACE else byte == ord(" ")


class SchemaError(ValueError):
    """A schema this module cannot enforce; the message names where."""


class Node:
    """One compiled schema: what each first byte of its value starts (`start`), and the object's or array's
    rules."""

    def __init__(self):
        self.start: dict[int, tuple] = {}  # first byte -> the frame it opens
        self.properties: dict[str, int] = {}  # key -> node id, in the schema's order
        self.required: frozenset[str] = frozenset()
        self.extra: int | None = None  # node id of the values of any other key (an object without properties)
        self.keys: tuple[bytes, ...] = ()  # the properties' keys as JSON strings without the opening quote
        self.items = 0  # node id of the array's values
        self.min_items, self.max_items = 0, None


class Grammar:
    """What an answer may be: one of `alternatives`, each a list of parts, a literal (bytes), a JSON schema
    (dict), a regular expression (a patterns.Regex) or a context-free grammar (a gbnf.Cfg, run as a regular
    expression is: the "re" frame reads either). Alternatives that are one literal each are a choice among
    texts. Otherwise several alternatives must each start with a literal, and no literal may be another's
    beginning: the literal picks the alternative (a tool call's `{"name": "f", "arguments": ` picks f's
    parameters). With a `trigger`, the answer is free text in which the trigger, each time it comes, opens one of
    the alternatives, after which the text is free again."""

    def __init__(self, alternatives: list[list[bytes | dict]], trie: "TokenTrie", where: list[str] | None = None,
                 trigger: bytes | None = None, once: bool = False):
        """`where`: what to call each alternative's schema in an error (a request's parameter); `once`: after the
        trigger's alternative the answer ends (free text before it, none after)."""
        self.trie = trie
        self.nodes: list[Node] = []
        self._refs: dict[tuple[int, str], int] = {}
        self._any_node: int | None = None
        routes = []
        for i, parts in enumerate(alternatives):
            frames = []
            for part in parts:
                if isinstance(part, bytes):
                    frames.append(("lit", part, 0))
                elif isinstance(part, (Regex, Cfg)):
                    frames.append(("re", part, part.start, 0, 0, 0, 0))
                else:
                    frames.append(("val", self._compile(part, part, where[i] if where else "schema"),
                                   _room("part")))
            routes.append(frames[::-1])  # a stack: its top, the first part, last
        if trigger is None and all(len(parts) == 1 and isinstance(parts[0], bytes) for parts in alternatives):
            self.start: tuple = (("lits", tuple(sorted({parts[0] for parts in alternatives})), b""),)
        elif trigger is None and len(routes) == 1:
            self.start = tuple(routes[0])
        else:
            heads = [route[-1][1] if route and route[-1][0] == "lit" else None for route in routes]
            if None in heads or any(a != b and b.startswith(a) for a in heads for b in heads):
                raise SchemaError("each alternative must start with its own literal, none another's beginning")
            self.routes = {head: tuple(route[:-1]) for head, route in zip(heads, routes)}
            self.start = (("alt", b""),) if trigger is None else (("free", 0),)
        self.once = once
        if trigger is not None:  # where to fall back to in the trigger when a byte breaks a partial match (KMP)
            self.trigger, self._fallback = trigger, [0] * (len(trigger) + 1)
            for i in range(1, len(trigger)):
                k = self._fallback[i]
                while k and trigger[k] != trigger[i]:
                    k = self._fallback[k]
                self._fallback[i + 1] = k + 1 if trigger[k] == trigger[i] else 0
        self._masks: dict[tuple, torch.Tensor] = {}

    # -- compiling a schema -------------------------------------------------------------------------------------

    def _compile(self, schema, root: dict, path: str) -> int:
        if schema is True:
            schema = {}
        if not isinstance(schema, dict):
            raise SchemaError(f"{path} must be a schema (an object), got {json.dumps(schema)[:60]}")
        unknown = sorted(set(schema) - KEYWORDS - ANNOTATIONS)
        if unknown:
            raise SchemaError(f"{path}: the keyword '{unknown[0]}' is not supported (supported: "
                              f"{', '.join(sorted(KEYWORDS - {'$defs', 'definitions'}))})")
        if "$ref" in schema:
            return self._ref(schema["$ref"], root, path)
        anything = not set(schema) - ANNOTATIONS
        if anything and self._any_node is not None:
            return self._any_node
        sid = len(self.nodes)
        node = Node()
        self.nodes.append(node)
        if anything:  # any JSON value: one node, which its own objects' and arrays' values refer back to
            self._any_node = sid
        if "const" in schema or "enum" in schema:
            values = [schema["const"]] if "const" in schema else schema["enum"]
            if not isinstance(values, list) or not values:
                raise SchemaError(f"{path}.enum must be a non-empty array")
            self._literals(node, [json.dumps(v, ensure_ascii=False).encode() for v in values], path)
            return sid
        if "anyOf" in schema:
            branches = schema["anyOf"]
            if not isinstance(branches, list) or not branches:
                raise SchemaError(f"{path}.anyOf must be a non-empty array")
            for i, branch in enumerate(branches):
                starts = self.nodes[self._compile(branch, root, f"{path}.anyOf[{i}]")].start
                if not starts:  # a $ref to a schema still being compiled: one that contains this anyOf
                    raise SchemaError(f"{path}.anyOf[{i}]: a branch that refers back to its own schema is not "
                                      "supported")
                for byte, frame in starts.items():
                    if frame[0] == "lits" and node.start.get(byte, frame)[0] == "lits":  # enums: one set
                        frame = ("lits", tuple(sorted(set(frame[1]) | set(node.start.get(byte, frame)[1]))))
                    elif byte in node.start and node.start[byte] != frame:
                        raise SchemaError(f"{path}.anyOf: two branches start with {chr(byte)!r}; the branches "
                                          "must start differently (an object, an array, a string, a number, ...)")
                    node.start[byte] = frame
            return sid
        kinds = schema.get("type", list(KINDS))
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not isinstance(kinds, list) or not kinds or any(k not in KINDS for k in kinds):
            raise SchemaError(f"{path}.type must be one of {', '.join(KINDS)} or a list of them")
        for kind in kinds:
            if kind == "object":
                self._object(node, schema, root, path)
                node.start[ord("{")] = ("obj", sid)
            elif kind == "array":
                node.items = self._compile(schema.get("items", {}), root, f"{path}.items")
                node.min_items, node.max_items = schema.get("minItems", 0), schema.get("maxItems")
                if not isinstance(node.min_items, int) or not isinstance(node.max_items, int | None) \
                        or node.min_items < 0 or (node.max_items is not None and node.max_items < node.min_items):
                    raise SchemaError(f"{path}: minItems and maxItems must be counts, min <= max")
                node.start[ord("[")] = ("arr", sid)
            elif kind == "string":
                least, most = schema.get("minLength", 0), schema.get("maxLength")
                if not isinstance(least, int) or not isinstance(most, int | None) or least < 0 \
                        or (most is not None and most < least):
                    raise SchemaError(f"{path}: minLength and maxLength must be counts, min <= max")
                pattern, form = schema.get("pattern"), schema.get("format")
                if pattern is not None and form is not None:
                    raise SchemaError(f"{path}: pattern and format together are not supported")
                if form is not None and form not in FORMATS:
                    raise SchemaError(f"{path}.format: {json.dumps(form)} is not supported (supported: "
                                      f"{', '.join(FORMATS)})")
                regex = self._search_regex(pattern, f"{path}.pattern") if pattern is not None else \
                    Regex(FORMATS[form]) if form is not None else None
                node.start[ord('"')] = ("str", least, most) if regex is None else ("pstr", least, most, regex)
            elif kind in ("number", "integer"):
                integer = kind == "integer" and "number" not in kinds
                bounds = self._integer_bounds(schema, integer, path)
                for byte in b"-0123456789":
                    node.start[byte] = ("num", integer) if bounds is None else \
                        ("rnum", Regex(integer_range_pattern(*bounds)))
            elif kind == "boolean":
                self._literals(node, [b"true", b"false"], path)
            else:
                self._literals(node, [b"null"], path)
        return sid

    @staticmethod
    def _integer_bounds(schema: dict, integer: bool, path: str) -> tuple[int | None, int | None] | None:
        """The least and most integer that minimum / maximum / exclusiveMinimum / exclusiveMaximum leave (None: no
        bound); None where none is given. Bounds on numbers that may have a fraction are refused."""
        given = {key: schema[key] for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
                 if key in schema}
        if not given:
            return None
        if not integer:
            raise SchemaError(f"{path}: {next(iter(given))} is supported on integers only (\"type\": \"integer\")")
        if any(isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) for v in given.values()):
            raise SchemaError(f"{path}: minimum, maximum and their exclusive forms must be numbers")
        lows = [math.ceil(given["minimum"])] if "minimum" in given else []
        lows += [math.floor(given["exclusiveMinimum"]) + 1] if "exclusiveMinimum" in given else []
        highs = [math.floor(given["maximum"])] if "maximum" in given else []
        highs += [math.ceil(given["exclusiveMaximum"]) - 1] if "exclusiveMaximum" in given else []
        least, most = max(lows, default=None), min(highs, default=None)
        if least is not None and most is not None and least > most:
            raise SchemaError(f"{path}: no integer lies between its minimum and maximum")
        return least, most

    @staticmethod
    def _search_regex(pattern, path: str) -> Regex:
        """JSON Schema's `pattern`, which may match anywhere in the string unless `^` / `$` anchor it, as a Regex
        that the whole string must match."""
        if not isinstance(pattern, str):
            raise SchemaError(f"{path} must be a string")
        body, start, end = pattern, "[\\s\\S]*", "[\\s\\S]*"
        if body.startswith("^"):
            body, start = body[1:], ""
        if body.endswith("$") and (len(body) - len(body.rstrip("\\$")) - 1) % 2 == 0:  # a $ not escaped
            body, end = body[:-1], ""
        if (start == "" or end == "") and _has_top_level_bar(body):
            raise SchemaError(f"{path}: an anchored pattern with '|' outside a group is not supported (group it)")
        try:
            return Regex(f"{start}(?:{body}){end}")
        except PatternError as exc:
            raise SchemaError(f"{path}: {exc}") from exc

    def _ref(self, ref, root: dict, path: str) -> int:
        if not isinstance(ref, str) or not ref.startswith("#/"):
            raise SchemaError(f"{path}.$ref must point into this schema (#/$defs/...), got {json.dumps(ref)}")
        key = (id(root), ref)
        if key not in self._refs:
            target = root
            for part in ref[2:].split("/"):
                part = part.replace("~1", "/").replace("~0", "~")
                if not isinstance(target, dict) or part not in target:
                    raise SchemaError(f"{path}.$ref: {ref} is not in the schema")
                target = target[part]
            forward = len(self.nodes)  # a node that becomes the target, so a schema may refer to itself
            self._refs[key] = forward
            self.nodes.append(Node())
            self.nodes[forward] = self.nodes[self._compile(target, root, ref)]
        return self._refs[key]

    def _object(self, node: Node, schema: dict, root: dict, path: str) -> None:
        properties = schema.get("properties") or {}
        if not isinstance(properties, dict):
            raise SchemaError(f"{path}.properties must be an object")
        node.properties = {key: self._compile(value, root, f"{path}.properties.{key}")
                           for key, value in properties.items()}
        node.keys = tuple(json.dumps(key, ensure_ascii=False).encode()[1:] for key in properties)
        required = schema.get("required", [])
        if not isinstance(required, list) or any(key not in properties for key in required):
            raise SchemaError(f"{path}.required must list keys of its properties")
        node.required = frozenset(required)
        extra = schema.get("additionalProperties", not properties)
        if properties and extra is not False:
            raise SchemaError(f"{path}: an object with properties takes those keys only (additionalProperties "
                              "other than false is not supported with properties)")
        if not properties:
            node.extra = None if extra is False else self._compile({} if extra is True else extra, root,
                                                                   f"{path}.additionalProperties")

    @staticmethod
    def _literals(node: Node, literals: list[bytes], path: str) -> None:
        for literal in literals:
            first = literal[0]
            old = node.start.get(first, ("lits", ()))
            if old[0] != "lits":
                raise SchemaError(f"{path}: the value {literal.decode()} starts like another kind the schema allows")
            node.start[first] = ("lits", tuple(sorted(set(old[1]) | {literal})))

    # -- running ------------------------------------------------------------------------------------------------

    def advance(self, state: tuple, data: bytes | None) -> tuple | None:
        """The state after `data`, or None where the grammar refuses it (None: a token outside the grammar)."""
        if data is None:
            return None
        for byte in data:
            state = self.step(state, byte)
            if state is None:
                return None
        return state

    def done(self, state: tuple) -> bool:
        """The answer is whole: nothing left to write, or a number or literal that may end here."""
        return not state or (len(state) == 1 and self._may_end(state[0]))

    def allowed(self, state: tuple, vocab: int, device) -> torch.Tensor:
        """The tokens that may come next from `state`, as a (vocab,) bool mask (cached per state)."""
        mask = self._masks.get(state)
        if mask is None:
            if len(self._masks) >= MAX_CACHED_STATES:
                self._masks.clear()
            mask = torch.zeros(vocab, dtype=torch.bool)
            tokens = self.trie.walk(self, state)
            if tokens:
                mask[torch.tensor(tokens)] = True
            self._masks[state] = mask = mask.to(device)
        return mask

    def step(self, state: tuple, byte: int) -> tuple | None:
        """The state after one byte, or None."""
        while state:
            frame = state[-1]
            below = state[:-1]
            result = getattr(self, "_" + frame[0])(frame, below, byte)
            if result is None:
                return None
            state, consumed = result
            if consumed:
                return state
        return None  # the answer is whole: nothing more may follow

    # The frames, a stack's top last: ("lit", bytes, pos) a literal; ("alt", typed) the head that picks an
    # alternative; ("free", matched) free text watching for the trigger; ("val", node, room) a value not begun;
    # ("obj", node, phase, keys used, key, room); ("key", node, keys used, typed) a property's name; ("arr", node,
    # phase, count, room); ("str", escape, left, lo, hi, count, least, most); ("pstr", escape, left, lo, hi, code,
    # count, least, most, regex, states) a string with a pattern; ("num", integer only, phase); ("lits",
    # literals, typed) one of a few texts; ("re", regex, states, left, lo, hi, code) text matching a regular
    # expression. Each frame's reader: (frame, the stack below it, a byte) -> (new stack,
    # whether the byte was used) or None.

    def _lit(self, frame, below, byte):
        _, data, pos = frame
        if data[pos] != byte:
            return None
        return (below if pos + 1 == len(data) else below + (("lit", data, pos + 1),)), True

    def _free(self, frame, below, byte):
        """Free text, watching for the trigger (`matched`: how much of it the text ends with)."""
        matched = frame[1]
        while matched and self.trigger[matched] != byte:
            matched = self._fallback[matched]
        matched += self.trigger[matched] == byte
        if matched == len(self.trigger):  # opened: one of the alternatives, then free text again (or the end)
            return below + ((("alt", b""),) if self.once else (("free", 0), ("alt", b""))), True
        return below + (("free", matched),), True

    def _alt(self, frame, below, byte):
        typed = frame[1] + bytes([byte])
        if typed in self.routes:
            return below + self.routes[typed], True
        if any(head.startswith(typed) for head in self.routes):
            return below + (("alt", typed),), True
        return None

    def _val(self, frame, below, byte):
        _, sid, room = frame
        if _is_space(byte):
            return (below + (("val", sid, room - 1),), True) if room else None
        opened = self.nodes[sid].start.get(byte)
        if opened is None:
            return None
        kind = opened[0]
        if kind == "obj":
            return below + (("obj", opened[1], "open", frozenset(), None, _room("open")),), True
        if kind == "arr":
            return below + (("arr", opened[1], "open", 0, _room("open")),), True
        if kind == "str":
            return below + (("str", 0, 0, 0, 0, 0, *opened[1:]),), True
        if kind == "pstr":
            return below + (("pstr", 0, 0, 0, 0, 0, 0, *opened[1:], opened[3].start),), True
        if kind == "num":
            return self._num(("num", opened[1], "start"), below, byte)
        if kind == "rnum":  # an integer between bounds: a pattern of its digits
            return self._re(("re", opened[1], opened[1].start, 0, 0, 0, 0), below, byte)
        return self._lits(("lits", opened[1], b""), below, byte)

    def _obj(self, frame, below, byte):
        _, sid, phase, used, key, room = frame
        node = self.nodes[sid]
        if _is_space(byte):
            return (below + (frame[:5] + (room - 1,),), True) if room else None
        left = [k for k in node.properties if k not in used]
        free = not node.properties and node.extra is not None
        if phase in ("open", "next") and byte == ord('"') and (left or free):
            after_key = ("obj", sid, "colon", used, None, _room("colon"))
            if free:
                return below + (after_key, ("str", 0, 0, 0, 0, 0, 0, None)), True
            return below + (after_key, ("key", sid, used, b"")), True
        if phase in ("open", "after") and byte == ord("}") and node.required <= used:
            return below, True
        if phase == "after" and byte == ord(",") and (left or free):
            return below + (("obj", sid, "next", used, None, _room("next")),), True
        if phase == "colon" and byte == ord(":"):
            value = node.extra if key is None else node.properties[key]
            return below + (("obj", sid, "after", used, None, _room("after")), ("val", value, _room("value"))), True
        return None

    def _key(self, frame, below, byte):
        """A key of an object with properties: one of those not written yet."""
        _, sid, used, typed = frame
        node = self.nodes[sid]
        typed += bytes([byte])
        for key, encoded in zip(node.properties, node.keys):
            if key in used or not encoded.startswith(typed):
                continue
            if encoded == typed:  # the key's closing quote: the object learns which key it was
                _, _, phase, _, _, room = below[-1]
                return below[:-1] + (("obj", sid, phase, used | {key}, key, room),), True
            return below + (("key", sid, used, typed),), True
        return None

    def _arr(self, frame, below, byte):
        _, sid, phase, count, room = frame
        node = self.nodes[sid]
        if _is_space(byte):
            return (below + (frame[:4] + (room - 1,),), True) if room else None
        if phase in ("open", "after") and byte == ord("]"):
            return (below, True) if count >= node.min_items else None
        if phase == "after" and byte == ord(","):
            return (below + (("arr", sid, "next", count, _room("next")),), True) if node.max_items is None \
                or count < node.max_items else None
        if phase in ("open", "next") and (node.max_items is None or count < node.max_items):
            # the count matters only up to the bounds: an unbounded array keeps one state, so its masks cache
            counted = count + 1 if node.max_items is not None or count < node.min_items else count
            return self._val(("val", node.items, 0), below + (("arr", sid, "after", counted, _room("after")),), byte)
        return None

    def _str(self, frame, below, byte):
        """A string's bytes after its opening quote: escapes, UTF-8 checked byte by byte (`left`: the continuation
        bytes still owed, the next one in lo..hi), and its length in characters where the schema bounds it
        (`count`, from `least` to `most`; an unbounded string keeps count 0, so its state does not change)."""
        _, escape, left, lo, hi, count, least, most = frame
        bounds = frame[5:]
        if left:
            if not lo <= byte <= hi:
                return None
            return below + (("str", 0, left - 1, 0x80, 0xBF, *bounds),), True
        if escape == 1:
            if byte == ord("u"):
                return below + (("str", 2, 0, 0, 0, *bounds),), True
            return (below + (("str", 0, 0, 0, 0, *bounds),), True) if byte in b'"\\/bfnrt' else None
        if escape >= 2:  # \u and its four hex digits
            if byte not in HEX:
                return None
            return below + (("str", 0 if escape == 5 else escape + 1, 0, 0, 0, *bounds),), True
        if byte == ord('"'):
            return (below, True) if count >= least else None
        if most is not None and count >= most:
            return None
        counted = (count + 1 if least or most is not None else 0, least, most)  # a new character starts here
        if byte == ord("\\"):
            return below + (("str", 1, 0, 0, 0, *counted),), True
        if byte < 0x20:  # control characters must be escaped
            return None
        if byte < 0x80:
            return below + (("str", 0, 0, 0, 0, *counted),), True
        lead = _UTF8_LEADS.get(byte)  # no overlong forms, no UTF-16 surrogates
        return (below + (("str", 0, *lead[:3], *counted),), True) if lead else None

    JSON_ESCAPES = {ord('"'): 0x22, ord("\\"): 0x5C, ord("/"): 0x2F, ord("b"): 8, ord("f"): 12, ord("n"): 10,
                    ord("r"): 13, ord("t"): 9}

    def _pstr(self, frame, below, byte):
        """A string whose text must match a pattern (the schema's `pattern`, made a whole match by _search_regex):
        as _str, with each character, once whole (its UTF-8 bytes or its escape), moving the pattern's automaton;
        the closing quote only where the pattern is matched. `code`: the character's bits or hex digits so far."""
        _, escape, left, lo, hi, code, count, least, most, regex, states = frame

        def partial(escape, left, lo, hi, code, first, last):  # a character begun: only if one that fits can follow
            if not regex.viable(states, first, last):
                return None
            return below + (("pstr", escape, left, lo, hi, code, count, least, most, regex, states),), True

        def whole(char):
            after = regex.move(states, char) if not 0xD800 <= char <= 0xDFFF else None
            if not after:
                return None
            counted = count + 1 if least or most is not None else 0
            return below + (("pstr", 0, 0, 0, 0, 0, counted, least, most, regex, after),), True

        if left:
            if not lo <= byte <= hi:
                return None
            code, left = code << 6 | byte & 0x3F, left - 1
            first = code << 6 * left
            return partial(0, left, 0x80, 0xBF, code, first, first | (1 << 6 * left) - 1) if left else whole(code)
        if escape == 1:
            if byte == ord("u"):
                return partial(2, 0, 0, 0, 0, 0, 0x10FFFF)
            return whole(self.JSON_ESCAPES[byte]) if byte in self.JSON_ESCAPES else None
        if escape in (6, 7):  # after a high surrogate's escape, the low one's \u (code: the pair's first character)
            if byte != b"\\u"[escape - 6]:
                return None
            return partial(escape + 1, 0, 0, 0, code, code, code + 0x3FF)
        if escape >= 8:  # the low surrogate's four hex digits, so far in lo
            if byte not in HEX:
                return None
            lo, digits_left = lo << 4 | int(chr(byte), 16), 11 - escape
            if not digits_left:
                return whole(code + lo - 0xDC00) if 0xDC00 <= lo <= 0xDFFF else None
            first, last = max(lo << 4 * digits_left, 0xDC00), min((lo + 1 << 4 * digits_left) - 1, 0xDFFF)
            if first > last:
                return None
            return partial(escape + 1, 0, lo, 0, code, code + first - 0xDC00, code + last - 0xDC00)
        if escape >= 2:  # \u and its four hex digits
            if byte not in HEX:
                return None
            code = code << 4 | int(chr(byte), 16)
            if escape == 5 and 0xD800 <= code <= 0xDBFF:  # a high surrogate: a character beyond 0xFFFF, in two
                pair = 0x10000 + (code - 0xD800 << 10)
                return partial(6, 0, 0, 0, pair, pair, pair + 0x3FF)
            if escape == 5:
                return whole(code)
            digits_left = 5 - escape
            first, last = code << 4 * digits_left, (code + 1 << 4 * digits_left) - 1
            return partial(escape + 1, 0, 0, 0, code, first, last if first > 0xDBFF or last < 0xD800 else 0x10FFFF)
        if byte == ord('"'):
            return (below, True) if count >= least and regex.accepts(states) else None
        if most is not None and count >= most:
            return None
        if byte == ord("\\"):  # an escape writes any character (one beyond 0xFFFF as a surrogate pair)
            return partial(1, 0, 0, 0, 0, 0, 0x10FFFF)
        if byte < 0x20:  # control characters must be escaped
            return None
        if byte < 0x80:
            return whole(byte)
        lead = _UTF8_LEADS.get(byte)
        return partial(0, *lead[:4], lead[4], lead[5]) if lead else None

    # A number's phases: after these, the next byte may end it.
    _NUMBER_ENDS = {"int", "zero", "frac", "exp"}
    _NUMBER_STEPS = {  # phase -> ((bytes, next phase), ...)
        "start": ((b"-", "minus"), (b"0", "zero"), (b"123456789", "int")),
        "minus": ((b"0", "zero"), (b"123456789", "int")),
        "int": ((b"0123456789", "int"), (b".", "dot"), (b"eE", "e")),
        "zero": ((b".", "dot"), (b"eE", "e")),
        "dot": ((b"0123456789", "frac"),),
        "frac": ((b"0123456789", "frac"), (b"eE", "e")),
        "e": ((b"+-", "sign"), (b"0123456789", "exp")),
        "sign": ((b"0123456789", "exp"),),
        "exp": ((b"0123456789", "exp"),),
    }

    def _num(self, frame, below, byte):
        _, integer, phase = frame
        for accepted, following in self._NUMBER_STEPS[phase]:
            if byte in accepted and not (integer and following in ("dot", "e")):
                return below + (("num", integer, following),), True
        return (below, False) if phase in self._NUMBER_ENDS else None  # ended: the frame below reads the byte

    def _lits(self, frame, below, byte):
        """One of a few literal values (an enum, true / false, null), as JSON text."""
        _, literals, typed = frame
        longer = typed + bytes([byte])
        if any(literal.startswith(longer) for literal in literals):
            return below + (("lits", literals, longer),), True
        return (below, False) if typed in literals else None

    def _re(self, frame, below, byte):
        """Text that a regular expression matches, read a UTF-8 character at a time: `left` continuation bytes
        still owed (the next one in lo..hi), `code` the character's bits so far. A character's first bytes are
        taken only where some character they may begin fits the pattern, so no token leads where none can follow."""
        _, regex, states, left, lo, hi, code = frame
        if left:
            if not lo <= byte <= hi:
                return None
            code, left = code << 6 | byte & 0x3F, left - 1
            if left:
                first = code << 6 * left
                if not regex.viable(states, first, first | (1 << 6 * left) - 1):
                    return None
                return below + (("re", regex, states, left, 0x80, 0xBF, code),), True
            after = regex.move(states, code)
            return (below + (("re", regex, after, 0, 0, 0, 0),), True) if after else None
        if byte < 0x80:
            after = regex.move(states, byte)
            if after:
                return below + (("re", regex, after, 0, 0, 0, 0),), True
        elif (lead := _UTF8_LEADS.get(byte)) and regex.viable(states, lead[4], lead[5]):
            return below + (("re", regex, states, *lead[:4]),), True
        return (below, False) if regex.accepts(states) else None  # whole: the frame below reads the byte

    def _may_end(self, frame) -> bool:
        return frame[0] == "free" or (frame[0] == "num" and frame[2] in self._NUMBER_ENDS) \
            or (frame[0] == "lits" and frame[2] in frame[1]) \
            or (frame[0] == "re" and not frame[3] and frame[1].accepts(frame[2]))


def _utf8_leads() -> dict[int, tuple[int, int, int, int, int, int]]:
    """Each byte that begins a multi-byte UTF-8 character: (continuation bytes, the range of the next byte, the
    code point's bits so far, the first and last code point it may begin). No overlong forms, no surrogates."""
    leads = {}
    for byte in range(0xC2, 0xF5):
        if byte < 0xE0:
            leads[byte] = (1, 0x80, 0xBF, byte & 0x1F, (byte & 0x1F) << 6, (byte & 0x1F) << 6 | 0x3F)
        elif byte < 0xF0:
            lo, hi = (0xA0, 0xBF) if byte == 0xE0 else (0x80, 0x9F) if byte == 0xED else (0x80, 0xBF)
            first = (byte & 0x0F) << 12 | (lo & 0x3F) << 6
            leads[byte] = (2, lo, hi, byte & 0x0F, first, (byte & 0x0F) << 12 | (hi & 0x3F) << 6 | 0x3F)
        else:
            lo, hi = (0x90, 0xBF) if byte == 0xF0 else (0x80, 0x8F) if byte == 0xF4 else (0x80, 0xBF)
            first = (byte & 0x07) << 18 | (lo & 0x3F) << 12
            leads[byte] = (3, lo, hi, byte & 0x07, first, (byte & 0x07) << 18 | (hi & 0x3F) << 12 | 0xFFF)
    return leads


_UTF8_LEADS = _utf8_leads()


def _has_top_level_bar(pattern: str) -> bool:
    """Whether a pattern has a `|` outside every group and class."""
    depth, in_class, i = 0, False, 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            i += 1
        elif in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
            if pattern[i + 1:i + 2] == "]" or pattern[i + 1:i + 3] == "^]":  # a ] first in a class is a character
                i += 1 + (pattern[i + 1] == "^")
        elif char in "()":
            depth += 1 if char == "(" else -1
        elif char == "|" and not depth:
            return True
        i += 1
    return False


class TokenTrie:
    """The vocabulary as a trie of token bytes, for finding every token a grammar state allows in one walk."""

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerFast) -> "TokenTrie":
        """Every token's bytes but the special tokens' (the end of the answer is the engine's to allow)."""
        special = set(tokenizer.all_special_ids)
        return cls([None if token in special else token_bytes(tokenizer, token) for token in range(len(tokenizer))])

    def __init__(self, token_bytes: Sequence[bytes | None]):
        """token_bytes[i]: token i's bytes, or None for a token a grammar never allows (a special token)."""
        self.token_bytes = token_bytes
        self.root: tuple[dict, list] = ({}, [])  # (children by byte, tokens that end here)
        for token, data in enumerate(token_bytes):
            if not data:
                continue
            node = self.root
            for byte in data:
                node = node[0].setdefault(byte, ({}, []))
            node[1].append(token)

    def bytes_of(self, token: int) -> bytes | None:
        """A token's bytes; None for one no grammar allows."""
        return self.token_bytes[token] or None if token < len(self.token_bytes) else None

    def walk(self, grammar: Grammar, state: tuple) -> list[int]:
        """Every token whose bytes the grammar takes from `state`."""
        tokens, todo = [], [(self.root, state)]
        while todo:
            node, at = todo.pop()
            for byte, child in node[0].items():
                after = grammar.step(at, byte)
                if after is not None:
                    tokens += child[1]
                    if child[0]:
                        todo.append((child, after))
        return tokens


def answer_grammar(kind: str, value, trie: TokenTrie, open_tag: str, close_tag: str, where: str = "schema") -> Grammar:
    """What a request asks its answer to be: JSON fitting a schema (kind "json"), one of a few texts ("choice"),
    text a regular expression matches ("regex"), text a GBNF grammar's root matches ("grammar"), a call of one of
    some functions ("call"), or text in which every call the model opens fits its function ("text_or_call";
    "text_or_one_call" ends the answer at its first call, for parallel_tool_calls false).
    `open_tag` / `close_tag` wrap a call; `where` names the schema in an error."""
    if kind == "json":
        return json_grammar(value, trie, where)
    if kind == "choice":
        return choice_grammar(value, trie)
    if kind == "regex":
        return regex_grammar(value, trie)
    if kind == "grammar":
        return cfg_grammar(value, trie)
    if kind == "call":
        return tool_call_grammar(value, trie, open_tag, close_tag, [f"function {f['name']}: parameters" for f in value])
    return tool_text_grammar(value, trie, open_tag, close_tag, parallel=kind == "text_or_call")


def json_grammar(schema: dict, trie: TokenTrie, where: str = "schema") -> Grammar:
    """An answer that is one JSON value fitting `schema` ({"type": "object"} for OpenAI's json_object)."""
    return Grammar([[schema]], trie, [where])


def choice_grammar(choices: list[str], trie: TokenTrie) -> Grammar:
    """An answer that is exactly one of `choices` (vLLM's structured_outputs.choice): a label, a yes or no."""
    if not choices or not all(choices):
        raise SchemaError("the choices must be non-empty texts")
    return Grammar([[choice.encode()] for choice in choices], trie)


def regex_grammar(pattern: str, trie: TokenTrie) -> Grammar:
    """An answer that the regular expression matches whole (vLLM's structured_outputs.regex)."""
    try:
        return Grammar([[Regex(pattern)]], trie)
    except PatternError as exc:
        raise SchemaError(str(exc)) from exc


def cfg_grammar(text: str, trie: TokenTrie) -> Grammar:
    """An answer that a GBNF grammar's `root` matches whole (vLLM's structured_outputs.grammar, llama.cpp's
    grammar)."""
    try:
        return Grammar([[Cfg(text)]], trie)
    except GrammarError as exc:
        raise SchemaError(str(exc)) from exc


def tool_text_grammar(functions: list[dict], trie: TokenTrie, open_tag: str, close_tag: str,
                      parallel: bool = True) -> Grammar:
    """Free text in which every call the model opens with `open_tag` is a call of one of `functions` (tool_choice
    "auto": the model decides whether to call, and a call it starts parses and fits); without `parallel`, the
    answer ends with its first call. A function whose parameters use a keyword this module cannot enforce takes
    any object as its arguments."""
    checked = []
    for function in functions:
        try:
            tool_call_grammar([function], trie, open_tag, close_tag)
            checked.append(function)
        except SchemaError:
            checked.append({"name": function["name"], "parameters": {"type": "object"}})
    alternatives = [[part[len(open_tag.encode()):] if i == 0 else part for i, part in enumerate(parts)]
                    for parts in _call_parts(checked, open_tag, close_tag)]
    return Grammar(alternatives, trie, trigger=open_tag.encode(), once=not parallel)


def tool_call_grammar(functions: list[dict], trie: TokenTrie, open_tag: str, close_tag: str,
                      where: list[str] | None = None) -> Grammar:
    """An answer that is one call of one of `functions` ({name, parameters}), written as the chat template writes
    a call: `<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>`."""
    return Grammar(_call_parts(functions, open_tag, close_tag), trie, where)


def _call_parts(functions: list[dict], open_tag: str, close_tag: str) -> list[list[bytes | dict]]:
    """Each function's call as the chat template writes it: the head up to the arguments, their schema, the tail."""
    alternatives = []
    for function in functions:
        head = f'{open_tag}\n{{"name": "{function["name"]}", "arguments": '.encode()
        parameters = function.get("parameters") or {}
        if not {"type", "$ref", "anyOf", "enum", "const"} & set(parameters):  # arguments are an object
            parameters = {**parameters, "type": "object"}
        alternatives.append([head, parameters, f"}}\n{close_tag}".encode()])
    return alternatives
