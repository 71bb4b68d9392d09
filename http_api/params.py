"""Turn a request's query string and body (JSON, urlencoded or multipart form)
into one dict of fields; body fields override query fields.

The seed's clients send the same fields every which way (params, JSON body on a
GET, form-data), so every endpoint accepts all of them.
"""

from __future__ import annotations

import json
import re
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request

from bridge.errors import InvalidInput, PayloadTooLarge

MAX_BODY_BYTES = 64 * 1024


async def read_body(request: Request) -> bytes:
    """Read the body, refusing more than MAX_BODY_BYTES without reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise PayloadTooLarge(f"The request body is over the limit of {MAX_BODY_BYTES} bytes.")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise PayloadTooLarge(f"The request body is over the limit of {MAX_BODY_BYTES} bytes.")
        chunks.append(chunk)
    body = b"".join(chunks)
    # Let request.form() parse the bytes already read instead of the spent stream.
    request._body = body
    return body


async def request_fields(request: Request) -> dict[str, Any]:
    """Query fields overlaid with body fields, from whichever body form was sent."""
    fields: dict[str, Any] = dict(request.query_params)
    body = await read_body(request)
    if not body.strip():
        return fields
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        try:
            form = await request.form()
        except Exception:  # python-multipart raises several unrelated types
            raise InvalidInput("The form body could not be parsed.") from None
        for key, value in form.items():
            fields[key] = await _form_text(key, value) if isinstance(value, UploadFile) else value
        return fields
    # JSON is the documented default, whatever Content-Type a client sends.
    data = _json_object(body)
    fields.update(data)
    return fields


async def _form_text(key: str, part: UploadFile) -> str:
    """A part with a filename (`curl -F 'name=<file'`, requests' `files=`) is still the field:
    its content as text. The body limit already bounds its size."""
    try:
        return (await part.read()).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput(f"{key}: a form part must be UTF-8 text.") from None


# The seed's delete and enable/disable examples end their object with a comma:
# `{"batmon_id": 1, "batmon_token": "t",}`. Only that, at the very end, is forgiven.
_SEED_TRAILING_COMMA = re.compile(rb",\s*}\s*$")


def _json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object; NaN/Infinity parse and are refused by the models."""
    try:
        data = json.loads(body)
    except ValueError:
        try:
            data = json.loads(_SEED_TRAILING_COMMA.sub(b"}", body))
        except (ValueError, RecursionError):
            raise InvalidInput("The request body is not valid JSON.") from None
    except RecursionError:
        raise InvalidInput("The request body is not valid JSON: nested too deeply.") from None
    if not isinstance(data, dict):
        raise InvalidInput("The request body must be a JSON object.")
    return data
