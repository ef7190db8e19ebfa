"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with a status.

Every failure a client can see goes through `APIError`, so the body always has that shape and
the status code says who is at fault: 4xx the request, 5xx the service behind the gateway.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from jobs.errors import OrcdError

# OpenAI's error types, by status.
TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout",
}


@dataclass
class APIError(OrcdError):
    """A request refused or failed: `status`, one-line `message`, the offending `param`."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "server_error"),
                      "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code or "invalid_value")
