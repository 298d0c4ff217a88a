"""A JSON Schema validator for exactly the keywords tests/grammar's schemas use (draft 2020-12
semantics), so the tests check llguidance's outputs without adding a `jsonschema` dependency."""

from __future__ import annotations

import math
import re

HANDLED = {"type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems", "enum",
           "const", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength",
           "pattern", "anyOf", "$ref", "$defs", "title", "description", "default", "x-guidance"}
TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer()),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def errors(value, schema: dict, root: dict | None = None, where: str = "$") -> list[str]:
    """Every violation of `schema` by `value`, as 'path: what' strings; [] when valid."""
    root = schema if root is None else root
    unknown = set(schema) - HANDLED
    if unknown:
        raise NotImplementedError(f"the test validator does not know {sorted(unknown)}")
    out = []
    if "$ref" in schema:
        name = schema["$ref"].removeprefix("#/$defs/")
        out += errors(value, root["$defs"][name], root, where)
    if "anyOf" in schema and all(errors(value, s, root, where) for s in schema["anyOf"]):
        out.append(f"{where}: matches no anyOf branch")
    if "type" in schema:
        kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(TYPES[k](value) for k in kinds):
            return out + [f"{where}: {value!r} is not of type {kinds}"]
    if "const" in schema and value != schema["const"]:
        out.append(f"{where}: {value!r} != const {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        out.append(f"{where}: {value!r} not in enum")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        for key, ok in (("minimum", lambda b: value >= b), ("maximum", lambda b: value <= b),
                        ("exclusiveMinimum", lambda b: value > b), ("exclusiveMaximum", lambda b: value < b)):
            if key in schema and not ok(schema[key]):
                out.append(f"{where}: {value} violates {key} {schema[key]}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", math.inf):
            out.append(f"{where}: length {len(value)} outside [minLength, maxLength]")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            out.append(f"{where}: {value!r} does not match {schema['pattern']!r}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", math.inf):
            out.append(f"{where}: {len(value)} items outside [minItems, maxItems]")
        if "items" in schema:
            for i, item in enumerate(value):
                out += errors(item, schema["items"], root, f"{where}[{i}]")
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        out += [f"{where}: missing required {k!r}" for k in schema.get("required", []) if k not in value]
        for key, item in value.items():
            if key in properties:
                out += errors(item, properties[key], root, f"{where}.{key}")
            elif schema.get("additionalProperties", True) is False:
                out.append(f"{where}: additional property {key!r}")
    return out
