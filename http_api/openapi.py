"""The OpenAPI 3 document, generated from the route table and the very pydantic
models that validate requests, so the document cannot drift from the code.
"""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue, models_json_schema
from pydantic_core import core_schema

from bridge import __version__
from bridge.models import Login
from http_api.routes import ENDPOINTS

_ERROR = {"$ref": "#/components/schemas/Error"}
_SECURITY: list[dict[str, list[str]]] = [
    {"apiKeyQuery": []}, {"apiKeyHeader": []}, {"bearer": []}, {"session": []},
]  # fmt: skip


class _DocumentSchema(GenerateJsonSchema):
    """Optional fields are documented as "may be absent", not as nullable: a query or form
    field cannot carry null, so offering null would allow what those bodies cannot say
    (JSON null is still accepted as absent)."""

    def nullable_schema(self, schema: core_schema.NullableSchema) -> JsonSchemaValue:
        return self.generate_inner(schema["schema"])

    def default_schema(self, schema: core_schema.WithDefaultSchema) -> JsonSchemaValue:
        json_schema = super().default_schema(schema)
        if json_schema.get("default", ...) is None:
            del json_schema["default"]
        return json_schema


def _success(schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "description": "success",
        "content": {"application/json": {"schema": {
            "type": "object", "required": ["success"],
            "properties": {"success": schema or {}},
        }}},
    }  # fmt: skip


def _errors(*codes: int) -> dict[str, Any]:
    text = {400: "invalid input", 401: "not authenticated", 403: "wrong batmon_token",
            404: "unknown batmon, alarm or bank", 405: "method not allowed",
            413: "body over 64 KiB", 429: "too many failed authentications"}  # fmt: skip
    return {
        str(c): {"description": text[c], "content": {"application/json": {"schema": _ERROR}}}
        for c in codes
    }


# Swagger UI's sections, in the order a reader meets them; `tag_for` puts each path in one.
TAGS: list[tuple[str, str]] = [
    ("Readings", "what devices send, and the history of it"),
    ("Batmons", "add, list, edit and delete battery monitors"),
    ("Banks", "batmons grouped into one battery bank"),
    ("Alarms", "thresholds on a batmon's or a bank's values"),
    ("Notices", "where notices go, and what was sent"),
    ("Account", "log in and out of the dashboard"),
    ("Service", "health and this document"),
]


def tag_for(path: str) -> str:
    """The one Swagger section a path belongs to, read from its words (one rule for all)."""
    words = set(path.strip("/").split("/"))
    if words & {"update", "history"}:
        return "Readings"
    if "alarm" in words:
        return "Alarms"
    if words & {"notifications"}:
        return "Notices"
    if "bank" in words:
        return "Banks"
    if "batmon" in words:
        return "Batmons"
    if words & {"login", "logout", "user"}:
        return "Account"
    return "Service"


def _operation(summary: str, name: str, model_name: str, properties: dict[str, Any],
               required: list[str], method: str, security: list[dict[str, list[str]]],
               form_model_name: str | None = None, path: str = "") -> dict[str, Any]:  # fmt: skip
    op: dict[str, Any] = {
        "summary": summary,
        "tags": [tag_for(path)],
        "operationId": f"{name}_{method}",
        "responses": {"200": _success(), **_errors(400, 401, 403, 404, 405, 413, 429)},
        "security": security,
    }
    if "format" in properties:  # history: format=csv (or Accept: text/csv) streams CSV
        op["responses"]["200"]["content"]["text/csv"] = {"schema": {"type": "string"}}
    if method == "get":
        op["parameters"] = [
            {"name": name, "in": "query", "required": name in required, "schema": schema}
            for name, schema in properties.items()
        ]
    else:
        ref = {"$ref": f"#/components/schemas/{model_name}"}
        form = {"$ref": f"#/components/schemas/{form_model_name or model_name}"}
        op["requestBody"] = {"required": bool(required), "content": {
            "application/json": {"schema": ref},
            "application/x-www-form-urlencoded": {"schema": form},
            "multipart/form-data": {"schema": form},
        }}  # fmt: skip
    return op


def _form_variant(schema: dict[str, Any]) -> dict[str, Any] | None:
    """The model's schema for form bodies, if it differs: a form carries flat text fields,
    so an object field (batmon_details) can only come as JSON text, which no schema can
    describe; the form variant leaves it out (sent anyway, it is accepted)."""
    properties = schema.get("properties", {})
    objects = {k for k, v in properties.items() if v.get("type") == "object"}
    if not objects:
        return None
    variant = {**schema, "properties": {k: v for k, v in properties.items() if k not in objects}}
    if "required" in schema:
        variant["required"] = [k for k in schema["required"] if k not in objects]
    if "anyOf" in schema:
        variant["anyOf"] = [c for c in schema["anyOf"] if not objects & set(c.get("required", ()))]
    return variant


def build_openapi() -> dict[str, Any]:
    """The whole document for every endpoint of the route table and the extras."""
    models = {e.model for e in ENDPOINTS} | {Login}
    _, top = models_json_schema(
        [(m, "validation") for m in models], ref_template="#/components/schemas/{model}",
        schema_generator=_DocumentSchema,
    )
    schemas: dict[str, Any] = top.get("$defs", {})
    schemas["Error"] = {"type": "object", "required": ["error"],
                        "properties": {"error": {"type": "string"}}}  # fmt: skip
    for model in models:
        if (variant := _form_variant(schemas[model.__name__])) is not None:
            schemas[f"{model.__name__}Form"] = variant
    paths: dict[str, Any] = {}
    for e in ENDPOINTS:
        schema = schemas[e.model.__name__]
        props, required = schema.get("properties", {}), schema.get("required", [])
        form_name = f"{e.model.__name__}Form" if f"{e.model.__name__}Form" in schemas else None
        # A device reaches its batmon with batmon_id + batmon_token, no key at all.
        security = [*_SECURITY, {}] if e.device_access else _SECURITY
        paths.setdefault(e.path, {}).update({
            m.lower(): _operation(e.summary, e.handler.__name__, e.model.__name__, props,
                                  required, m.lower(), security, form_name, e.path)
            for m in e.methods
        })  # fmt: skip
    login = schemas["Login"]
    paths["/interface/login"] = {"post": _operation(
        "Log in with an api_key (sets the session cookie)", "login", "Login",
        login["properties"], login["required"], "post", [{}], path="/interface/login")}  # fmt: skip
    paths["/interface/logout"] = {"post": {"summary": "Log out (clears the session cookie)",
                                           "tags": ["Account"],
                                           "operationId": "logout",
                                           "responses": {"200": _success()}}}  # fmt: skip
    paths["/healthz"] = {"get": {"summary": "Health: database and MQTT state", "tags": ["Service"],
                                 "operationId": "healthz",
                                 "responses": {"200": {"description": "healthy"},
                                               "503": {"description": "unhealthy"}}}}  # fmt: skip
    paths["/openapi.json"] = {"get": {"summary": "This document", "operationId": "openapi",
                                      "tags": ["Service"],
                                      "responses": {"200": {"description": "OpenAPI 3"}}}}  # fmt: skip
    return {
        # 3.1: pydantic writes JSON Schema 2020-12 ({"type": "null"} in anyOf).
        "openapi": "3.1.0",
        "info": {"title": "batmon bridge API", "version": __version__,
                 "description": "The documented Batmon API, self-hosted."},
        "tags": [{"name": name, "description": text} for name, text in TAGS
                 if any(op.get("tags") == [name] for ops in paths.values() for op in ops.values())],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "apiKeyQuery": {"type": "apiKey", "in": "query", "name": "api_key"},
                "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "bearer": {"type": "http", "scheme": "bearer"},
                "session": {"type": "apiKey", "in": "cookie", "name": "batmon_session"},
            },
        },
    }
