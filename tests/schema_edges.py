"""Requests on and just past every bound an OpenAPI (JSON Schema 2020-12) request schema states, one field at a time,
each with whether the schema accepts it: what a server that agrees with its schema must accept (2xx) or refuse (4xx
naming that field). Used by the serving tests against the schema the app itself publishes."""
from __future__ import annotations

from jsonschema import Draft202012Validator

NOT_JSON_TYPE = {"an": "object"}  # a value of the wrong type for every field of CompletionRequest


def _resolve(node: dict, components: dict) -> dict:
    ref = node.get("$ref")
    return components["schemas"][ref.rsplit("/", 1)[1]] if ref else node


def _values(node: dict, components: dict) -> list:
    """Values on and just past each bound of one schema node (a member of a union, or a plain field)."""
    node = _resolve(node, components)
    if "anyOf" in node:
        return [v for member in node["anyOf"] for v in _values(member, components)]
    if "enum" in node:
        return [*node["enum"], f"not-{node['enum'][0]}"]
    if "const" in node:
        return [node["const"], f"not-{node['const']}"]
    kind = node.get("type")
    if kind in ("integer", "number"):
        step = 1 if kind == "integer" else 1e-3
        out = [1 if kind == "integer" else 0.5]
        for key, sign in (("minimum", -1), ("maximum", 1), ("exclusiveMinimum", 1), ("exclusiveMaximum", -1)):
            if key in node:
                bound = node[key]
                out += [bound, bound + sign * step]
        return out
    if kind == "string":
        lengths = {0, 1, node.get("minLength", 0), max(node.get("minLength", 0) - 1, 0)}
        lengths |= {node["maxLength"], node["maxLength"] + 1} if "maxLength" in node else set()
        return ["x" * n for n in sorted(lengths)]
    if kind == "array":
        items = node.get("items", {})
        item = next(v for v in _values(items, components) if Draft202012Validator(
            {**items, "components": components}).is_valid(v))
        counts = {0, 1, node.get("minItems", 0), max(node.get("minItems", 0) - 1, 0)}
        counts |= {node["maxItems"], node["maxItems"] + 1} if "maxItems" in node else set()
        return [[item] * n for n in sorted(counts)] + [[v] for v in _values(items, components)]
    if kind == "object" and "properties" in node:  # a valid object, then each property's edges in it
        valid = {}
        for key in node.get("required", []):
            sub = {**node["properties"][key], "components": components}
            valid[key] = next(v for v in _values(node["properties"][key], components)
                              if Draft202012Validator(sub).is_valid(v))
        return [valid] + [{**valid, key: v} for key, prop in node["properties"].items()
                          for v in _values(prop, components)]
    if kind == "boolean":
        return [True, False]
    if kind == "null":
        return [None]
    raise ValueError(f"no edge values for schema node {node}")


def edge_requests(spec: dict, schema_name: str, base: dict) -> list[tuple[str, dict, bool]]:
    """(field, request body, schema-valid) for each edge value of each field of ``schema_name``, the other fields as in
    ``base`` (itself schema-valid). Duplicates are dropped. An object inside a field (a chat message) gets its own
    properties' edges, so a refusal may name ``field.property``."""
    components = spec["components"]
    schema = components["schemas"][schema_name]
    validator = Draft202012Validator({"$ref": f"#/components/schemas/{schema_name}", "components": components})
    assert validator.is_valid(base), list(validator.iter_errors(base))
    out, seen = [], set()
    for name, prop in schema["properties"].items():
        for value in [*_values(prop, components), NOT_JSON_TYPE]:
            body = {**base, name: value}
            key = (name, repr(value))
            if key not in seen:
                seen.add(key)
                out.append((name, body, validator.is_valid(body)))
    return out
