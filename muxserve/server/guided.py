"""From a request's structured-output fields to the ``GuidedSpec`` its decoding must follow.

OpenAI's ``response_format`` (``text``, ``json_object``, ``json_schema``) and vLLM's spellings:
``guided_json``, ``guided_regex``, ``guided_choice``, ``guided_grammar`` and the newer ``structured_outputs`` object
(``json``, ``regex``, ``choice``). At most one of them may constrain a request. Every problem is a
``GrammarError`` (a ValueError) naming the field, which the server answers with a 400.

``strict`` of a ``json_schema`` does not change decoding: the output follows the schema either
way, never carrying properties the schema does not name (as vLLM decodes both).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from muxserve.engine.structured import GrammarError, GuidedSpec

_VLLM_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                "guided_grammar": "grammar"}
_UNSUPPORTED = ("guided_json_object",)


def guided_spec(response_format: Any = None, extra: Mapping[str, Any] | None = None) -> GuidedSpec | None:
    """The spec of a request: ``response_format`` and the vLLM fields found in ``extra`` (the body's
    other fields); None when nothing constrains the output."""
    extra = extra or {}
    found: list[GuidedSpec] = []
    if (spec := _response_format(response_format)) is not None:
        found.append(spec)
    for name in _UNSUPPORTED:
        if extra.get(name) is not None:
            raise GrammarError(f"{name} is not supported; use response_format json_object, guided_json, guided_regex, "
                               "guided_choice or guided_grammar", name)
    for name, kind in _VLLM_FIELDS.items():
        if extra.get(name) is not None:
            found.append(_of_kind(kind, extra[name], name))
    outputs = extra.get("structured_outputs")
    if outputs is not None:
        if not isinstance(outputs, Mapping):
            raise GrammarError(f"structured_outputs must be an object, got {outputs!r}", "structured_outputs")
        for key, value in outputs.items():
            if value is None:
                continue
            if key not in ("json", "regex", "choice", "grammar"):
                raise GrammarError(f"structured_outputs.{key} is not supported; use json, regex, choice or grammar",
                                   "structured_outputs")
            found.append(_of_kind(key, value, f"structured_outputs.{key}"))
    if len(found) > 1:
        names = ", ".join(s.param for s in found)
        raise GrammarError(f"only one structured-output constraint per request, got {names}", found[1].param)
    return found[0] if found else None


def _of_kind(kind: str, value: Any, param: str) -> GuidedSpec:
    if kind == "json":
        return GuidedSpec.json_schema(value, param)
    if kind == "regex":
        return GuidedSpec.regex(value, param)
    if kind == "grammar":
        return GuidedSpec.grammar(value, param)
    return GuidedSpec.choice(value, param)


def _response_format(value: Any) -> GuidedSpec | None:
    if value is None:
        return None
    if not isinstance(value, Mapping) or not isinstance(value.get("type"), str):
        raise GrammarError(f"response_format must be an object with a type, got {value!r}", "response_format")
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return GuidedSpec("json_object", "", "response_format")
    if kind != "json_schema":
        raise GrammarError(f"response_format.type must be text, json_object or json_schema, got {kind!r}",
                           "response_format")
    body = value.get("json_schema")
    if not isinstance(body, Mapping):
        raise GrammarError("response_format.json_schema must be an object with a schema, got "
                           f"{body!r}", "response_format")
    if body.get("strict") not in (None, True, False):
        raise GrammarError(f"response_format.json_schema.strict must be a boolean, got {body['strict']!r}",
                           "response_format")
    if "schema" not in body:
        raise GrammarError("response_format.json_schema.schema is required", "response_format")
    return GuidedSpec.json_schema(body["schema"], "response_format")
