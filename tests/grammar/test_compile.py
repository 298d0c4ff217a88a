"""What llguidance cannot enforce is one ValueError line naming the problem (the server's 400), and
a grammar repeated across requests compiles once."""

import pytest

from llama_jax.grammar import GrammarCompiler

BAD_SCHEMAS = {
    "unimplemented keyword": ({"type": "array", "uniqueItems": True}, r"json_schema: Unimplemented keys: \[\"uniqueItems\"\]"),
    "two unimplemented": ({"if": {"type": "string"}, "then": {"minLength": 2}}, r"\"if\", \"then\""),
    "not": ({"not": {"type": "string"}}, r"Unimplemented keys: \[\"not\"\]"),
    "not an object": ([1, 2], r"json_schema: a schema is a JSON object \(or true / false\), got list"),
    "JSON text not an object": ('"hello"', r"json_schema: a schema is a JSON object .* got str"),
    "not JSON": ("{'type': 'object'}", r"json_schema: not JSON"),
    "not JSON values": ({"enum": [float("nan")]}, r"json_schema: not JSON \(Out of range float values"),
    "false": (False, "json_schema: false matches no value"),
    "ref to nothing": ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}},
                       r"json_schema: Pointer '/\$defs/missing' does not exist"),
    "remote ref": ({"$ref": "https://example.com/s.json"}, r"json_schema: Resource 'https://example.com/s.json'"),
    "unknown type": ({"type": "strin"}, "json_schema: Invalid type: strin"),
    "unknown format": ({"type": "string", "format": "phone"}, "json_schema: Unknown format: phone"),
    "lookaround pattern": ({"type": "string", "pattern": "(?<=a)b"},
                           r"json_schema: regex parse error: \(\?<=a\)b error: look-around"),
    "unsatisfiable": ({"type": "integer", "minimum": 5, "maximum": 2},
                      r"Unsatisfiable schema: minimum \(5\) is greater than maximum \(2\)"),
}


@pytest.fixture(scope="module")
def compiler(grammar_tokenizers):
    from llama_jax.grammar import grammar_vocabulary

    return GrammarCompiler(grammar_vocabulary(grammar_tokenizers["bytes"]))


@pytest.mark.parametrize("case", BAD_SCHEMAS)
def test_bad_schema_is_one_line_value_error(compiler, case):
    schema, message = BAD_SCHEMAS[case]
    with pytest.raises(ValueError, match=message) as raised:
        compiler.json_schema(schema)
    assert "\n" not in str(raised.value)


def test_lenient_schema_ignores_what_strict_refuses(compiler):
    schema = {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}
    with pytest.raises(ValueError, match="uniqueItems"):
        compiler.response_format({"type": "json_schema", "json_schema": {"name": "s", "schema": schema, "strict": True}})
    lenient = compiler.response_format({"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
    matcher = lenient.matcher()
    assert all(matcher.accept(b) for b in b"[1,1]") and matcher.is_finished()  # duplicates: not enforced


@pytest.mark.parametrize("kind, source, message", [
    ("lark", 'start: "a" undefined_rule', "lark: .*undefined_rule"),
    ("lark", "start: <|no_such_token|>", r'lark: at 1\(8\): unknown special token: "<\|no_such_token\|>"'),
    ("regex", "[a-", "regex: .*unclosed character class"),
])
def test_bad_lark_or_regex(compiler, kind, source, message):
    with pytest.raises(ValueError, match=message) as raised:
        getattr(compiler, kind)(source)
    assert "\n" not in str(raised.value) and len(str(raised.value)) <= 320  # the token error lists 256 names


def test_response_format_errors(compiler):
    assert compiler.response_format({"type": "text"}) is None
    with pytest.raises(ValueError, match="response_format.type: expected .* got 'xml'"):
        compiler.response_format({"type": "xml"})
    with pytest.raises(ValueError, match="response_format.json_schema: an object with a 'schema' field"):
        compiler.response_format({"type": "json_schema", "json_schema": {"name": "x"}})


def test_repeated_grammar_compiles_once(grammar_tokenizers):
    from llama_jax.grammar import grammar_vocabulary

    compiler = GrammarCompiler(grammar_vocabulary(grammar_tokenizers["bytes"]), cache_size=2)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}}
    schema_text = '{"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}}'
    reordered = {"type": "object", "properties": {"b": {"type": "string"}, "a": {"type": "integer"}}}
    first = compiler.json_schema(schema)
    assert compiler.json_schema(dict(schema)) is first and compiler.json_schema(schema_text) is first
    assert (compiler.hits, compiler.misses) == (2, 1)
    # Property order is part of the grammar (llguidance emits properties in schema order): another key.
    second = compiler.json_schema(reordered)
    assert second is not first and compiler.misses == 2
    compiler.json_schema(schema)  # first is now the most recently used ...
    compiler.json_object()  # ... so the reordered one is evicted
    assert len(compiler) == 2 and compiler.json_schema(schema) is first
    assert compiler.json_schema(reordered) is not second and compiler.misses == 4
    a, b = first.matcher(), first.matcher()  # each request its own state
    assert a.accept(ord("{")) and b.accepted == 0 and b.valid_prefix([ord("[")]) == 0


def test_package_import_loads_nothing_heavy():
    import subprocess
    import sys

    code = ("import sys, llama_jax.grammar as g; assert 'llguidance' not in sys.modules and 'jax' not in sys.modules; "
            "g.GrammarCompiler; assert 'llguidance' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
