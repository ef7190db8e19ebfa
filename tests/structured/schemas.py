"""Thirty small JSON Schemas for the structured-output tests: nested objects, arrays with
minItems/maxItems, enums, numbers with ranges, strings with patterns and lengths, anyOf,
optional fields and additionalProperties false. Every string is bounded (maxLength, a pattern or
an enum), every array has maxItems and every non-integer number a multipleOf (at temperature 1 a
small model writes fraction digits without end), so every output can end well within the
tests' max_tokens.
"""

from __future__ import annotations

NAME = {"type": "string", "minLength": 1, "maxLength": 8}
SMALL_INT = {"type": "integer", "minimum": 0, "maximum": 99}


def obj(properties: dict, required: list[str] | None = None, closed: bool = True) -> dict:
    schema = {"type": "object", "properties": properties,
              "required": list(properties) if required is None else required}
    if closed:
        schema["additionalProperties"] = False
    return schema


SCHEMAS: list[dict] = [
    # flat objects
    obj({"name": NAME, "age": SMALL_INT}),
    obj({"ok": {"type": "boolean"}}),
    obj({"id": {"type": "integer", "minimum": 1000, "maximum": 9999}, "label": NAME}),
    obj({"city": NAME, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}),
    obj({"score": {"type": "number", "minimum": 0, "maximum": 100, "multipleOf": 0.5}}),
    # enums and consts
    obj({"color": {"enum": ["red", "green", "blue"]}}),
    obj({"level": {"enum": [1, 2, 3]}, "kind": {"const": "alert"}}),
    {"enum": ["yes", "no", "maybe"]},
    obj({"status": {"enum": ["open", "closed"]}, "count": SMALL_INT}),
    # arrays with minItems / maxItems
    {"type": "array", "items": SMALL_INT, "minItems": 1, "maxItems": 3},
    {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 2, "maxItems": 2},
    obj({"tags": {"type": "array", "items": NAME, "minItems": 0, "maxItems": 2}}),
    obj({"points": {"type": "array", "maxItems": 2, "minItems": 1,
                    "items": obj({"x": SMALL_INT, "y": SMALL_INT})}}),
    # nested objects
    obj({"user": obj({"name": NAME, "admin": {"type": "boolean"}})}),
    obj({"a": obj({"b": obj({"c": SMALL_INT})})}),
    obj({"order": obj({"id": SMALL_INT, "items": {"type": "array", "items": NAME,
                                                  "minItems": 1, "maxItems": 2}}),
         "paid": {"type": "boolean"}}),
    # numbers with ranges
    obj({"temp": {"type": "integer", "minimum": -40, "maximum": 50}}),
    obj({"ratio": {"type": "number", "minimum": -50, "maximum": 50, "multipleOf": 0.25},
         "n": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10}}),
    obj({"year": {"type": "integer", "minimum": 1900, "maximum": 2100}}),
    # strings with patterns and lengths
    obj({"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}}),
    obj({"hex": {"type": "string", "pattern": "^#[0-9a-f]{6}$"}}),
    obj({"initials": {"type": "string", "minLength": 2, "maxLength": 3}}),
    obj({"date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"}}),
    # anyOf
    obj({"value": {"anyOf": [SMALL_INT, {"type": "null"}]}}),
    obj({"id": {"anyOf": [SMALL_INT, {"type": "string", "pattern": "^id[0-9]{2}$"}]}}),
    {"anyOf": [obj({"cat": NAME}), obj({"dog": NAME})]},
    # optional fields
    obj({"name": NAME, "nick": NAME}, required=["name"]),
    obj({"x": SMALL_INT, "y": SMALL_INT, "z": SMALL_INT}, required=["x"]),
    obj({"title": NAME, "done": {"type": "boolean"}, "due": SMALL_INT}, required=["title"]),
    # additionalProperties false at two levels, with an optional nested object
    obj({"meta": obj({"v": {"const": 1}}), "data": {"type": "array", "items": {"type": "boolean"},
                                                  "minItems": 1, "maxItems": 3}},
        required=["data"]),
]
