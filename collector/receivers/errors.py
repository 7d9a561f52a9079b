"""The one table that turns a refusal into an HTTP status and a gRPC code.

Both receivers raise `ExportError` and translate it here, so the transports cannot drift apart
on what is permanent and what an exporter should retry. Retryable answers follow the OTLP
specification: HTTP 429/502/503/504 and gRPC UNAVAILABLE (with RetryInfo) are retried by the
standard exporters; 400/413/415 and INVALID_ARGUMENT are not.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import grpc

Code = grpc.StatusCode

# How long an exporter is asked to wait before retrying a retryable refusal.
RETRY_AFTER_S = 1


@dataclass(frozen=True, slots=True)
class Answer:
    reason: str  # a stable label for logs and metrics
    http_status: int
    grpc_code: grpc.StatusCode
    retryable: bool


_PERMANENT = False
_RETRYABLE = True


class Refusal(enum.Enum):
    INVALID = Answer("invalid", 400, Code.INVALID_ARGUMENT, _PERMANENT)
    UNAUTHENTICATED = Answer("unauthenticated", 401, Code.UNAUTHENTICATED, _PERMANENT)
    # A valid token without the role the service needs (a read token on an OTLP service).
    PERMISSION_DENIED = Answer("permission_denied", 403, Code.PERMISSION_DENIED, _PERMANENT)
    # A Host header naming none of the listener's names (DNS rebinding); HTTP only.
    HOST_NOT_ALLOWED = Answer("host_not_allowed", 403, Code.PERMISSION_DENIED, _PERMANENT)
    NOT_FOUND = Answer("not_found", 404, Code.UNIMPLEMENTED, _PERMANENT)
    METHOD_NOT_ALLOWED = Answer("method_not_allowed", 405, Code.UNIMPLEMENTED, _PERMANENT)
    TOO_LARGE = Answer("too_large", 413, Code.RESOURCE_EXHAUSTED, _PERMANENT)
    UNSUPPORTED_MEDIA = Answer("unsupported_media_type", 415, Code.INVALID_ARGUMENT, _PERMANENT)
    OVERLOADED = Answer("overloaded", 503, Code.UNAVAILABLE, _RETRYABLE)
    STORAGE_UNAVAILABLE = Answer("storage_unavailable", 503, Code.UNAVAILABLE, _RETRYABLE)
    SHUTTING_DOWN = Answer("shutting_down", 503, Code.UNAVAILABLE, _RETRYABLE)

    @property
    def answer(self) -> Answer:
        value: Answer = self.value
        return value


class ExportError(Exception):
    """A request refused as a whole; nothing of it was accounted."""

    def __init__(self, refusal: Refusal, message: str) -> None:
        super().__init__(message)
        self.refusal = refusal
        self.message = message

    @property
    def answer(self) -> Answer:
        return self.refusal.answer
