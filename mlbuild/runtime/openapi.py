"""The service's API document: Swagger 2.0 (``/swagger.json``) and OpenAPI 3 (``?version=3``).

ServiceInput/ServiceOutput come from, in order: the ``inference_schema`` decorators on
``run``, the sample files (``MLBUILD_SCHEMA_INPUT``/``_OUTPUT``), else a bare object.
(A ``swagger.json`` the script ships itself is served as-is: see app.py.)
"""

from __future__ import annotations

import copy
import json

ERROR_RESPONSE = {
    "type": "object",
    "properties": {
        "status_code": {"type": "integer", "format": "int32"},
        "message": {"type": "string"},
    },
}


def schema_from_sample(sample) -> dict:
    """A JSON schema describing ``sample``, with the sample as its example."""
    schema = _infer(sample)
    schema["example"] = sample
    return schema


def _infer(value) -> dict:
    if isinstance(value, bool):
        return {"type": "boolean"}
    if isinstance(value, int):
        return {"type": "integer", "format": "int64"}
    if isinstance(value, float):
        return {"type": "number", "format": "double"}
    if isinstance(value, str):
        return {"type": "string"}
    if isinstance(value, list):
        return {"type": "array", "items": _infer(value[0]) if value else {}}
    if isinstance(value, dict):
        return {"type": "object", "properties": {k: _infer(v) for k, v in value.items()}}
    return {}


def load_sample_schema(path: str | None) -> dict | None:
    """Schema from a JSON sample file, or None when no file is configured.

    Raises:
        ValueError: The file is unreadable or not JSON.
    """
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            return schema_from_sample(json.load(fh))
    except (OSError, ValueError) as exc:
        raise ValueError(f"schema sample {path!r}: {exc}") from exc


def swagger2(title: str, input_schema: dict | None, output_schema: dict | None,
             auth: bool, version: str = "1.0") -> dict:
    """The Swagger 2.0 document, shaped like the one Azure ML services publish.

    Args:
        title: ``info.title`` (the service name).
        input_schema / output_schema: ServiceInput / ServiceOutput; None for an object.
        auth: Whether /score takes ``Authorization: Bearer <key>``.
        version: ``info.version`` (the service's version, azmlinfsrv's SERVICE_VERSION).
    """
    error = {"description": "The service failed to execute due to an error.",
             "schema": {"$ref": "#/definitions/ErrorResponse"}}
    score = {
        "operationId": "RunMLService",
        "description": "Run web service's model and get the prediction output",
        "parameters": [{
            "name": "serviceInputPayload", "in": "body",
            "description": "The input payload for executing the real-time machine learning service.",
            "schema": {"$ref": "#/definitions/ServiceInput"},
        }],
        "responses": {
            "200": {"description": "The service processed the input correctly and provided a"
                                   " result prediction, if applicable.",
                    "schema": {"$ref": "#/definitions/ServiceOutput"}},
            "default": error,
        },
    }
    doc = {
        "swagger": "2.0",
        "info": {"title": title, "description": f"API specification for {title}",
                 "version": version},
        "schemes": ["http", "https"],
        "consumes": ["application/json"],
        "produces": ["application/json"],
        "paths": {
            "/": {"get": {
                "operationId": "ServiceHealthCheck",
                "description": "Simple health check endpoint to ensure the service is up.",
                "responses": {"200": {"description": "The service is up: 'Healthy'.",
                                      "schema": {"type": "string"},
                                      "examples": {"application/json": "Healthy"}},
                              "default": error},
            }},
            "/score": {"post": score},
            "/swagger.json": {"get": {
                "operationId": "GetSwaggerSpec",
                "description": "Get the Swagger specification.",
                "parameters": [{"name": "version", "in": "query", "required": False,
                                "type": "string", "enum": ["2", "3", "3.1"]}],
                "responses": {"200": {"description": "The Swagger specification.",
                                      "schema": {"type": "object"}},
                              "default": error},
            }},
        },
        "definitions": {
            "ServiceInput": copy.deepcopy(input_schema) or {"type": "object"},
            "ServiceOutput": copy.deepcopy(output_schema) or {"type": "object"},
            "ErrorResponse": ERROR_RESPONSE,
        },
    }
    if auth:
        doc["securityDefinitions"] = {"Bearer": {
            "type": "apiKey", "name": "Authorization", "in": "header",
            "description": "For example: Bearer abc123"}}
        score["security"] = [{"Bearer": []}]
    return doc


def openapi3(doc2: dict, openapi_version: str = "3.0.3") -> dict:
    """The same API as OpenAPI 3 (``openapi_version``), converted from the Swagger 2.0 one."""
    text = json.dumps(doc2).replace("#/definitions/", "#/components/schemas/")
    d = json.loads(text)
    paths = d["paths"]
    for path in paths.values():
        for op in path.values():
            for resp in op.get("responses", {}).values():
                if "schema" in resp:
                    resp["content"] = {"application/json": {"schema": resp.pop("schema")}}
                resp.pop("examples", None)
            params = op.pop("parameters", [])
            body = [p for p in params if p.get("in") == "body"]
            if body:
                op["requestBody"] = {"description": body[0]["description"], "required": True,
                                     "content": {"application/json": {"schema": body[0]["schema"]}}}
            others = [p for p in params if p.get("in") != "body"]
            for param in others:  # 3.x: a parameter's type moves into its schema
                param["schema"] = {k: param.pop(k) for k in ("type", "enum") if k in param}
            if others:
                op["parameters"] = others
    out = {"openapi": openapi_version, "info": d["info"], "paths": paths,
           "components": {"schemas": d["definitions"]}}
    if "securityDefinitions" in d:
        out["components"]["securitySchemes"] = {"Bearer": {"type": "http", "scheme": "bearer"}}
    return out
