"""The one error type a request can raise on purpose, and the one body every error reply carries.

Everything a client can get wrong is a RequestError: it carries the HTTP
status and a message that says what was wrong and what was expected. Any
other exception is a bug and is answered with a 500 that hides its details.
Every error reply, from the wire, the server, the API-key check or the
connection layer, is `error_body`: {"error": "<what was wrong and what was expected>"}.
"""

import json

ERROR_MEDIA_TYPE = "application/json"


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


class RequestError(Exception):
    def __init__(self, message: str, status: int = 400, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.headers = headers or {}  # e.g. Retry-After on a 503


class FamilyError(ValueError):
    """A family name or config file that cannot be used (not a request's fault: it is raised at start-up)."""
