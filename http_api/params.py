"""Turn a request's query string and body (JSON, urlencoded or multipart form)
into one dict of fields; body fields override query fields.

The seed's clients send the same fields every which way (params, JSON body on a
GET, form-data), so every endpoint accepts all of them.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request

from bridge.errors import BatmonError, InvalidInput

MAX_BODY_BYTES = 64 * 1024


class BodyTooLarge(BatmonError):
    """The body exceeds the 64 KiB limit (413)."""

    status = 413


async def read_body(request: Request) -> bytes:
    """Read the body, refusing more than MAX_BODY_BYTES without reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise BodyTooLarge(f"The request body is over the limit of {MAX_BODY_BYTES} bytes.")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise BodyTooLarge(f"The request body is over the limit of {MAX_BODY_BYTES} bytes.")
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
        fields.update({k: v for k, v in form.items() if not isinstance(v, UploadFile)})
        return fields
    # JSON is the documented default, whatever Content-Type a client sends.
    try:
        # NaN/Infinity parse here and are refused by the models, naming the field.
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise InvalidInput("The request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise InvalidInput("The request body must be a JSON object.")
    fields.update(data)
    return fields
