"""The OpenAPI 3 document of the local API at /openapi.json; a test holds it to the router."""

from __future__ import annotations

from typing import Any

from loader import __version__
from loader.integrity import RECORD_SUFFIX
from loader.progress import UnlockState
from loader.resources import MAX_RESOURCE_NAME, NAME_MAX, name_pattern

_NAME = {"type": "string", "pattern": f"^{name_pattern(NAME_MAX)}$"}
# Room for the record's name, NAME.integrity, which no resource may take.
_RESOURCE_NAME = {
    "type": "string",
    "pattern": f"^{name_pattern(MAX_RESOURCE_NAME)}$",
    "description": f"A resource's name; it may not end in '{RECORD_SUFFIX}'",
}
_CREDENTIALS = {
    "type": "object",
    "required": ["email", "password"],
    "properties": {"email": {"type": "string"}, "password": {"type": "string"}},
}
_UNLOCK_STATES = [state.value for state in UnlockState]


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json({"$ref": "#/components/schemas/Error"}, description)


def _json_body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _ok() -> dict[str, Any]:
    return _json(
        {
            "type": "object",
            "required": ["status"],
            "properties": {"status": {"type": "string", "enum": ["ok"]}},
        }
    )


_FILENAME_PARAM = {
    "name": "filename",
    "in": "path",
    "required": True,
    "schema": _RESOURCE_NAME,
}


def openapi_document() -> dict[str, Any]:
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "azaion-loader local API",
            "version": __version__,
            "description": "HTTP/1.1 on the Unix socket /run/azaion-loader.sock.",
        },
        "paths": {
            "/health": {
                "get": {
                    "summary": "Liveness",
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "required": ["status"],
                                "properties": {"status": {"type": "string", "enum": ["healthy"]}},
                            }
                        )
                    },
                }
            },
            "/status": {
                "get": {
                    "summary": "Authentication state and the model cache folder",
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "required": ["status", "authenticated", "modelCacheDir"],
                                "properties": {
                                    "status": {"type": "string", "enum": ["healthy"]},
                                    "authenticated": {"type": "boolean"},
                                    "modelCacheDir": {"type": "string"},
                                },
                            }
                        )
                    },
                }
            },
            "/doctor": {
                "get": {
                    "summary": "Run the daemon's checks: engine, images, space, archive, remotes, "
                    "clock",
                    "description": "Always 200 once the checks ran: a failure is a check's "
                    "status, not the answer's. Each check is bounded by a timeout.",
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "required": ["checks"],
                                "properties": {
                                    "checks": {
                                        "type": "array",
                                        "items": {"$ref": "#/components/schemas/Check"},
                                    }
                                },
                            }
                        )
                    },
                }
            },
            "/login": {
                "post": {
                    "summary": "Log in to the Resource API; the credentials become the daemon's",
                    "requestBody": _json_body(_CREDENTIALS),
                    "responses": {
                        "200": _ok(),
                        "401": _error("Wrong credentials"),
                        "413": _error("Body too large"),
                        "422": _error("Body does not validate"),
                        "502": _error("The Resource API answered with an error"),
                        "503": _error("The Resource API could not be reached"),
                    },
                }
            },
            "/load/{filename}": {
                "post": {
                    "summary": "Fetch, join and decrypt a resource; streams the plaintext",
                    "parameters": [_FILENAME_PARAM],
                    "requestBody": _json_body(
                        {
                            "type": "object",
                            "required": ["filename", "folder"],
                            "properties": {"filename": _RESOURCE_NAME, "folder": _NAME},
                        }
                    ),
                    "responses": {
                        "200": {
                            "description": "The decrypted resource",
                            "content": {
                                "application/octet-stream": {
                                    "schema": {"type": "string", "format": "binary"}
                                }
                            },
                        },
                        "400": _error("Bad name, or path and body disagree"),
                        "401": _error("Not logged in"),
                        "404": _error("A part is missing on the API or the CDN"),
                        "413": _error("Body too large"),
                        "422": _error("Body does not validate"),
                        "502": _error(
                            "The remote answered with an error, the resource does not decrypt, "
                            "or it is not the blob the API's integrity record vouches for "
                            "(integrity-failed, integrity-missing)"
                        ),
                        "503": _error("The remote could not be reached"),
                        "507": _error("No space left for the cache"),
                    },
                }
            },
            "/upload/{filename}": {
                "post": {
                    "summary": "Encrypt, split, send both parts and cache the big one",
                    "parameters": [_FILENAME_PARAM],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "multipart/form-data": {
                                "schema": {
                                    "type": "object",
                                    "required": ["folder"],
                                    "properties": {
                                        "data": {"type": "string", "format": "binary"},
                                        "file": {"type": "string", "format": "binary"},
                                        "folder": _NAME,
                                    },
                                }
                            }
                        },
                    },
                    "responses": {
                        "200": _ok(),
                        "400": _error("Bad name"),
                        "401": _error("Not logged in"),
                        "413": _error("Upload larger than MAX_UPLOAD_BYTES"),
                        "422": _error("Body does not validate"),
                        "502": _error("The remote answered with an error"),
                        "503": _error("The remote could not be reached"),
                        "507": _error("No space left for the cache"),
                    },
                }
            },
            "/unlock": {
                "post": {
                    "summary": "Start unlocking the image archive in the background",
                    "requestBody": _json_body(_CREDENTIALS),
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "required": ["state"],
                                "properties": {"state": {"type": "string", "enum": _UNLOCK_STATES}},
                            }
                        ),
                        "404": _error("No archive on disk and the images are missing"),
                        "413": _error("Body too large"),
                        "422": _error("Body does not validate"),
                        "503": _error("Docker could not be reached"),
                    },
                }
            },
            "/unlock/status": {
                "get": {
                    "summary": "Where the unlock stands",
                    "responses": {"200": _json({"$ref": "#/components/schemas/UnlockStatus"})},
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Counters and gauges in Prometheus's text format",
                    "description": "Unlocks, loads, uploads and remote calls by outcome, the "
                    "unlock's state, the images and the model cache (azaion_loader_*).",
                    "responses": {
                        "200": {
                            "description": "OK",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "responses": {"200": _json({"type": "object"})},
                }
            },
        },
        "components": {
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["detail"],
                    "properties": {
                        "detail": {"type": "string"},
                        "code": {"type": "string"},
                    },
                },
                "Check": {
                    "type": "object",
                    "required": ["name", "status", "detail", "hint"],
                    "properties": {
                        "name": {"type": "string", "example": "engine"},
                        "status": {"type": "string", "enum": ["ok", "warning", "failed"]},
                        "detail": {"type": "string", "description": "The figure, or the cause"},
                        "hint": {"type": "string", "description": "What to do; empty when ok"},
                    },
                },
                "UnlockStatus": {
                    "type": "object",
                    "required": ["state", "error"],
                    "properties": {
                        "state": {"type": "string", "enum": _UNLOCK_STATES},
                        "error": {"type": "string", "nullable": True},
                        "bytesDone": {"type": "integer", "minimum": 0},
                        "bytesTotal": {"type": "integer", "minimum": 0},
                        "percent": {
                            "type": "number",
                            "minimum": 0,
                            "maximum": 100,
                            "description": "The engine's work done: a quarter of an image's "
                            "share while it is handed over, the rest as the engine registers "
                            "it (estimated from the rate it has shown, confirmed when it answers)",
                        },
                        "images": {
                            "type": "array",
                            "items": {"type": "string"},
                            "description": "The stack's images the engine has, loaded or kept",
                        },
                        "imagesDone": {"type": "integer", "minimum": 0},
                        "imagesTotal": {"type": "integer", "minimum": 0},
                        "image": {
                            "type": "string",
                            "nullable": True,
                            "description": "The image being loaded",
                        },
                    },
                },
            }
        },
    }
