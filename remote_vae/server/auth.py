"""API keys: with keys set, every POST must carry one; GETs (health, metrics) stay open.

A key comes as `Authorization: Bearer <key>` or, for clients that can only
take a URL (ComfyUI nodes), as the password of `https://user:<key>@host/`,
which `requests` sends as HTTP Basic. Keys are compared through their
SHA-256 digests with `hmac.compare_digest`, so neither a key's content nor
its length shows in the time an answer takes. The check runs before the body
is read: an unauthorised client cannot make the server read or hold its body.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

from starlette.datastructures import Headers
from starlette.responses import Response

from ..errors import ERROR_MEDIA_TYPE, error_body
from ..settings.api_keys import ApiKeyError, load_api_keys

__all__ = ["ApiKeyError", "ApiKeyMiddleware", "load_api_keys", "presented_key"]

OPEN_METHODS = ("GET", "HEAD", "OPTIONS")


def _digest(value: str | bytes) -> bytes:
    return hashlib.sha256(value.encode() if isinstance(value, str) else value).digest()


def presented_key(authorization: bytes) -> bytes | None:
    """The key in an Authorization header: a Bearer token, or the password of Basic credentials."""
    scheme, _, credentials = authorization.strip().partition(b" ")
    scheme, credentials = scheme.lower(), credentials.strip()
    if scheme == b"bearer" and credentials:
        return credentials
    if scheme == b"basic" and credentials:
        try:
            _, sep, password = base64.b64decode(credentials, validate=True).partition(b":")
        except (binascii.Error, ValueError):
            return None
        return password if sep else None
    return None


class ApiKeyMiddleware:
    """Pure ASGI: refuses POSTs (and anything but GET/HEAD/OPTIONS) without a valid key with 401 JSON."""

    def __init__(self, app, keys: tuple[str, ...]):
        self.app = app
        self._digests = tuple(_digest(key) for key in keys)

    def authorised(self, headers: Headers) -> bool:
        given = headers.get("authorization")
        key = presented_key(given.encode("latin-1")) if given is not None else None
        if key is None:
            return False
        digest = _digest(key)
        # Every key is compared, so the time taken does not say which one (if any) matched.
        matches = [hmac.compare_digest(digest, known) for known in self._digests]
        return any(matches)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in OPEN_METHODS or self.authorised(Headers(scope=scope)):
            await self.app(scope, receive, send)
            return
        missing = "authorization" not in Headers(scope=scope)
        message = (
            "this server needs an API key: send the header 'Authorization: Bearer <key>'"
            if missing
            else "the API key is not valid; send 'Authorization: Bearer <key>' with a key this server was given"
        )
        challenge = {"WWW-Authenticate": 'Bearer realm="remote-vae"'}
        await Response(error_body(message), 401, challenge, media_type=ERROR_MEDIA_TYPE)(scope, receive, send)
