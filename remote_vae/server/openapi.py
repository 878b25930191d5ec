"""The API's own description: an OpenAPI 3.0 document of the routes a server has, and the page at /docs.

The document is built from the app's routes (each named for what it does) and
the query parameters the wire declares (wire/parameters.py), the table its parser reads too. /docs is Swagger UI, served
from the swagger-ui-bundle package
(no CDN at run time).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import __version__
from ..families import Family
from ..vocabulary import AUDIO_FORMATS, SAFETENSORS_TYPE
from ..wire.parameters import BOTH, DECODE, ENCODE, PARAMETERS

ERROR = {
    "type": "object",
    "properties": {"error": {"type": "string", "description": "what was wrong and what was expected"}},
    "required": ["error"],
}
ERRORS = {
    "400": "Malformed request: wrong body size for shape and dtype, bad shape for the family, bad parameter, NaN in "
    "the tensor.",
    "401": "A POST without a valid `Authorization: Bearer KEY` (when the server has API keys).",
    "408": "The body did not arrive within the body timeout, or slower than the minimum transfer rate.",
    "413": "Body, pixels, frames, batch, decode work or host memory over the server's limits; refused before anything "
    "is allocated.",
    "503": "Queue full, memory budget full, the model still loading, or the device out of memory: retry after "
    "`Retry-After` seconds.",
    "500": "An internal error; the server log has it under the request's X-Request-Id.",
}
TENSOR_HEADERS = {
    "shape": {"description": "the tensor's shape, a JSON list", "schema": {"type": "string"}},
    "dtype": {"description": "float16, bfloat16, float32 or uint8", "schema": {"type": "string"}},
}
BINARY = {"schema": {"type": "string", "format": "binary"}}
JSON_FORM = {
    "schema": {
        "type": "object",
        "properties": {
            "inputs": {"type": "string", "description": "base64 of the raw tensor bytes"},
            "parameters": {"type": "object", "description": "query parameters, shape and dtype among them"},
        },
    }
}
# A video with its sound (LTX-2): a safetensors file of `latents` and `audio_latents` in, of `video` and `audio` out
NAMED_TENSORS = {
    "schema": {"type": "string", "format": "binary", "description": "a safetensors file of named tensors (§2.2)"}
}
DECODE_BODIES = {
    "tensor/binary": BINARY,
    "tensor/base64": JSON_FORM,
    "application/json": JSON_FORM,
    SAFETENSORS_TYPE: NAMED_TENSORS,
}
ENCODE_BODIES = {
    "tensor/binary": BINARY,
    **{kind: BINARY for kind in ("image/png", "image/jpeg", "image/webp", "video/mp4", "video/webm", "image/gif")},
    **{kind: BINARY for kind in AUDIO_FORMATS.values()},
}
DECODE_REPLIES = {
    "image/jpeg": BINARY,
    "image/png": BINARY,
    "image/webp": BINARY,
    "video/mp4": BINARY,
    **{kind: BINARY for kind in AUDIO_FORMATS.values()},
    "tensor/binary": BINARY,
    "application/json": JSON_FORM,
    SAFETENSORS_TYPE: NAMED_TENSORS,
}


def document(routes: list[tuple[str, str, str]], families: dict[str, Family], api_keys: bool) -> dict[str, Any]:
    """The OpenAPI document for routes (path, method, what: health | families | predict | decode | encode | metrics |
    openapi | docs)."""
    paths: dict[str, dict[str, Any]] = {}
    for path, method, what in routes:
        family = next((families[name] for name in families if path.startswith(f"/{name}/") or path == f"/{name}"), None)
        if family is None and len(families) == 1 and what in ("predict", "decode", "encode", "health"):
            family = next(iter(families.values()))
        paths.setdefault(path, {})[method.lower()] = _operation(what, family, api_keys and method == "POST")
    components: dict[str, Any] = {"schemas": {"Error": ERROR}}
    if api_keys:
        components["securitySchemes"] = {
            "apiKey": {"type": "http", "scheme": "bearer", "description": "a key given to the server with --api-key"}
        }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "remote-vae",
            "version": __version__,
            "description": "Decode diffusion latents to images, videos or tensors, and encode images and videos to "
            "latents, "
            "with the same pixels diffusers computes locally. Served families: " + ", ".join(families) + ".",
        },
        "paths": paths,
        "components": components,
    }


def _json(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {"type": "object"}}}}


# The routes that say how the server is, by what they do: (summary, responses).
STATUS_ROUTES: dict[str, tuple[str, dict[str, Any]]] = {
    "health": (
        "Health",
        {"200": _json("loaded: {status: ok, families: {name: ready}}"), "503": _json("still loading")},
    ),
    "families": (
        "The families served, with each one's path, latent forms and the scaling a client sends",
        {"200": _json("{families: {name: {path, status, video, latents, scaling, ...}}}")},
    ),
    "metrics": ("Prometheus metrics", {"200": {"description": "Prometheus text", "content": {"text/plain": {}}}}),
    "openapi": ("This document", {"200": _json("OpenAPI 3.0")}),
    "docs": ("This page", {"200": {"description": "HTML", "content": {"text/html": {}}}}),
}


def _operation(what: str, family: Family | None, secured: bool) -> dict[str, Any]:
    name = f" ({family.name})" if family else ""
    if what in STATUS_ROUTES:
        summary, responses = STATUS_ROUTES[what]
        return {"summary": summary + (name if what == "health" else ""), "tags": ["status"], "responses": responses}
    operations = {"predict": BOTH, "decode": DECODE, "encode": ENCODE}[what]
    summary = {
        "predict": "Decode or encode, told apart by the request: a tensor/* or JSON body with a latent shape decodes, "
        "an image or a 3-channel tensor encodes",
        "decode": "Decode latents to an image, video or tensor",
        "encode": "Encode images or a video to latents",
    }[what]
    bodies = {**(DECODE_BODIES if "decode" in operations else {}), **(ENCODE_BODIES if "encode" in operations else {})}
    replies = DECODE_REPLIES if "decode" in operations else {"tensor/binary": BINARY}
    operation: dict[str, Any] = {
        "summary": summary + name,
        "tags": [family.name if family else "vae"],
        "description": _family_note(family),
        "parameters": [
            _parameter(key, *spec[:2]) for key, spec in PARAMETERS.items() if set(spec[2]) & set(operations)
        ],
        "requestBody": {"required": True, "content": bodies},
        "responses": {
            "200": {
                "description": "the result; tensors as raw bytes with shape and dtype headers",
                "headers": TENSOR_HEADERS,
                "content": replies,
            },
            **{
                status: {
                    "description": text,
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                }
                for status, text in ERRORS.items()
                if status != "401" or secured
            },
        },
    }
    if secured:
        operation["security"] = [{"apiKey": []}]
    return operation


def _family_note(family: Family | None) -> str:
    if family is None:
        return ""
    scaling = ", ".join(f"{key}={value}" for key, value in family.client_scaling().items())
    return f"{family.description} Latents: {family.layout.describe()}. A pipeline's latents need {scaling}."


def _parameter(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    parameter = {"name": name, "in": "query", "required": False, "schema": schema, "description": description}
    if schema.get("type") == "array":
        parameter.update(style="form", explode=True)
    return parameter


def swagger_ui_files() -> Path:
    """The folder of Swagger UI's bundled files."""
    import swagger_ui_bundle

    return Path(swagger_ui_bundle.swagger_ui_path)


DOCS_PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>remote-vae API</title>
  <link rel="stylesheet" href="docs/swagger-ui.css">
</head>
<body>
  <div id="api"></div>
  <script src="docs/swagger-ui-bundle.js"></script>
  <script>
    // Relative addresses: the page works behind a proxy that serves the server under a path.
    window.ui = SwaggerUIBundle({url: new URL("openapi.json", document.baseURI).href, dom_id: "#api", deepLinking:
    true});
  </script>
</body>
</html>
"""
