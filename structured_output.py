"""Structured outputs, the request's side (no torch: the web server validates with it): the
JSON schema an OpenAI response_format asks for, its llguidance grammar (a schema the grammar
engine can't follow is a ValueError saying why: the API's 400), and the line that shows the
schema to the model. The engine keeps the answer to the grammar (decoding.GrammarConstraint).

    grammar_for({"type": "json_schema", "json_schema": {"schema": {...}}})   # None for "text"
"""

from __future__ import annotations

import json

import llguidance

# How the model is told (besides being constrained): a system line with the schema.
SCHEMA_INSTRUCTION = "Answer with JSON only, a value that matches this JSON schema:\n{schema}"
ANY_OBJECT = {"type": "object"}
MAX_CALLS = 4  # tool calls in one constrained answer (a weak model would otherwise call until its tokens run out)
SAFE_INTEGERS = (-(2 ** 53 - 1), 2 ** 53 - 1)  # JavaScript's safe integers: what every JSON reader keeps exact
# The fields of OpenAI's json_schema format (chat: under response_format.json_schema; the
# Responses API: beside text.format's type)
JSON_SCHEMA_FIELDS = frozenset({"name", "schema", "strict", "description"})
NO_PARAMETERS = {"type": "object", "properties": {}}  # a function without parameters takes none (closed: {})
# JSON as OpenAI writes it: ", " and ": " between items, no other whitespace. (The grammar's
# default lets the model put any whitespace anywhere, and a weak model spends its tokens so.)
COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def schema_of(response_format: dict) -> dict | None:
    """The JSON schema a response_format asks for (json_object: any object); None for text."""
    kind = response_format.get("type")
    if kind == "json_object":
        return ANY_OBJECT
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        return schema if isinstance(schema, dict) else ANY_OBJECT
    return None


def grammar_for(response_format: dict | None, tools: list[dict] | None = None,
                require_call: bool = False, call_marks: tuple[str, str] | None = None) -> str | None:
    """The llguidance grammar of a response_format (None: free text). With `tools` (OpenAI
    function schemas), the model may instead call them, written as Hermes tool calls
    (<tool_call>{"name", "arguments"}</tool_call>, what conversation.ReplyParser reads);
    with `require_call`, it must (tool_choice "required" or a named function). `call_marks`:
    the model's own tokens for the tags, as llguidance token references ("<[151657]>"), so
    that it writes them as it learnt to (the text tags otherwise). ValueError
    saying why a schema can't be followed (an unknown type, a regex with look-around, ...)."""
    schema = schema_of(response_format or {})
    if schema is None and not (tools and require_call):
        return None
    schema = bounded_numbers(schema)
    try:
        if not tools:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=COMPACT_JSON)
        else:
            start, end = call_marks or ('"<tool_call>"', '"</tool_call>"')
            call = call_schema(tools)
            grammar = llguidance.LLMatcher.grammar_from_lark("\n".join([
                "start: calls" if require_call else "start: answer | calls",
                f"answer: %json {json.dumps({**(schema or ANY_OBJECT), 'x-guidance': COMPACT_JSON})}",
                f"calls: call{{1,{MAX_CALLS}}}",
                f'call: {start} "\\n" %json {json.dumps({**call, "x-guidance": COMPACT_JSON})} "\\n" {end} "\\n"?',
            ]))
    except Exception as error:  # (the library's own error types)
        raise ValueError(str(error)) from None
    problem = llguidance.LLMatcher.validate_grammar(grammar)
    if problem:
        raise ValueError(" ".join(problem.split()))  # (one line: it is an API error's message)
    return grammar


def call_schema(tools: list[dict]) -> dict:
    """One call's JSON schema: each tool's name with its own parameters (closed, numbers
    bounded). A tool's definitions ($defs, definitions) move to this schema's root, renamed
    per tool, and its $refs follow them: its parameters sit under anyOf/i/properties/arguments
    here, where its own "#/$defs/..." would not resolve."""
    definitions, branches = {}, []
    for i, tool in enumerate(tools):
        arguments = closed(bounded_numbers(tool["function"].get("parameters") or NO_PARAMETERS))
        arguments, moved = _hoisted(arguments, f"/anyOf/{i}/properties/arguments", f"tool{i}.")
        definitions.update(moved)
        branches.append({"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                         "properties": {"name": {"const": tool["function"]["name"]}, "arguments": arguments}})
    return {"anyOf": branches, **({"$defs": definitions} if definitions else {})}


def _hoisted(schema: dict, at: str, prefix: str) -> tuple[dict, dict]:
    """A schema that will sit at the JSON pointer `at` of another: (it without its root
    definitions, those definitions named `prefix` + their name), every local $ref rewritten
    to resolve there."""
    if not isinstance(schema, dict):
        return schema, {}
    names = {(key, name): f"{prefix}{'' if key == '$defs' else key + '.'}{name}"
             for key in ("$defs", "definitions") if isinstance(schema.get(key), dict) for name in schema[key]}

    def pointer(ref: str) -> str:
        if ref != "#" and not ref.startswith("#/"):
            return ref  # (not a pointer into this document)
        parts = ref[2:].split("/")
        if len(parts) >= 2 and (parts[0], _unescaped(parts[1])) in names:
            return "/".join(["#/$defs", _escaped(names[parts[0], _unescaped(parts[1])]), *parts[2:]])
        return "#" + at + ref[1:]

    def rewritten(value):
        if isinstance(value, list):
            return [rewritten(item) for item in value]
        if not isinstance(value, dict):
            return value
        return {key: pointer(item) if key == "$ref" and isinstance(item, str) else rewritten(item)
                for key, item in value.items()}
    moved = {new: rewritten(schema[key][name]) for (key, name), new in names.items()}
    return rewritten({key: value for key, value in schema.items() if key not in ("$defs", "definitions")}), moved


def _unescaped(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def _escaped(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")


def bounded_numbers(schema):
    """The schema with every integer or number that has no bound given JavaScript's
    safe-integer bounds (±2^53-1, what every JSON reader keeps exact): a model can't then write
    digits or an exponent until its tokens run out, and every number it writes is a finite
    double (a bounded number is written without an exponent)."""
    if isinstance(schema, list):
        return [bounded_numbers(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    bounded = {key: bounded_numbers(value) for key, value in schema.items()}
    kinds = schema.get("type")
    if kinds in ("integer", "number") or (isinstance(kinds, list) and {"integer", "number"} & set(kinds)):
        if "minimum" not in schema and "exclusiveMinimum" not in schema:
            bounded["minimum"] = SAFE_INTEGERS[0]
        if "maximum" not in schema and "exclusiveMaximum" not in schema:
            bounded["maximum"] = SAFE_INTEGERS[1]
    return bounded


def closed(schema):
    """The schema with objects that list their properties taking only those (unless it says
    otherwise): a call's arguments are the tool's parameters, not whatever else a weak model
    would go on inventing."""
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {key: closed(value) for key, value in schema.items()}
    if isinstance(schema.get("properties"), dict) and "additionalProperties" not in schema:
        result["additionalProperties"] = False
    return result


def instruction_for(response_format: dict) -> str | None:
    schema = schema_of(response_format)
    return None if schema is None else SCHEMA_INSTRUCTION.format(schema=json.dumps(schema, ensure_ascii=False))


