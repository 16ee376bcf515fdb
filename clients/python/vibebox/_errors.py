"""Errors of the VibeBox client, with the google.rpc details of the answer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]

if TYPE_CHECKING:
    from vibebox._proto.environment.v1.environment_pb2 import Environment

#: ``ErrorInfo.reason`` (FAILED_PRECONDITION) of a ``WatchEnvironments``
#: resume token older than the changes the platform keeps.
RESUME_TOKEN_EXPIRED = "watch.resume_token_expired"

_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True)
class Details:
    """The google.rpc details of an error answer."""

    #: ``ErrorInfo.reason`` (for example ``update.requires_recreate``).
    reason: str | None = None
    #: ``RetryInfo.retry_delay`` in seconds (rate limits, load shedding).
    retry_delay: float | None = None
    #: ``QuotaFailure`` violations: (subject, description) pairs.
    quota_violations: tuple[tuple[str, str], ...] = ()
    #: ``PreconditionFailure`` violations: (type, subject, description);
    #: the type of a policy refusal is the rule id (``mount.docker_socket``).
    precondition_violations: tuple[tuple[str, str, str], ...] = ()
    #: ``BadRequest`` field violations: (field, description).
    field_violations: tuple[tuple[str, str], ...] = ()


def details_of(error: grpc.RpcError) -> Details:
    """Reads the google.rpc details from an error's trailers."""
    trailers = error.trailing_metadata() if isinstance(error, grpc.Call) else None
    raw: object = None
    key: str
    value: object
    for key, value in trailers or ():
        if key == _DETAILS_KEY:
            raw = value
    if not isinstance(raw, bytes):
        return Details()
    status = status_pb2.Status.FromString(raw)
    reason = None
    retry_delay = None
    quota: list[tuple[str, str]] = []
    precondition: list[tuple[str, str, str]] = []
    fields: list[tuple[str, str]] = []
    for any_detail in status.details:
        if any_detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            any_detail.Unpack(info)
            reason = info.reason or reason
        elif any_detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            any_detail.Unpack(retry)
            retry_delay = retry.retry_delay.ToTimedelta().total_seconds()
        elif any_detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            failure = error_details_pb2.QuotaFailure()
            any_detail.Unpack(failure)
            quota += [(v.subject, v.description) for v in failure.violations]
        elif any_detail.Is(error_details_pb2.PreconditionFailure.DESCRIPTOR):
            pf = error_details_pb2.PreconditionFailure()
            any_detail.Unpack(pf)
            precondition += [(v.type, v.subject, v.description) for v in pf.violations]
        elif any_detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            br = error_details_pb2.BadRequest()
            any_detail.Unpack(br)
            fields += [(v.field, v.description) for v in br.field_violations]
    return Details(reason, retry_delay, tuple(quota), tuple(precondition), tuple(fields))


class VibeBoxError(Exception):
    """An error of the client: the platform's answer to a call (``code`` set),
    or a wait that did not end well."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None,
                 details: Details | None = None) -> None:
        super().__init__(message)
        #: The gRPC status code, when the platform answered with an error.
        self.code = code
        #: The google.rpc details of that answer.
        self.details = details or Details()

    @property
    def reason(self) -> str | None:
        """``ErrorInfo.reason``, else the first violated rule id."""
        if self.details.reason:
            return self.details.reason
        if self.details.precondition_violations:
            return self.details.precondition_violations[0][0] or None
        return None

    @property
    def retry_delay(self) -> float | None:
        """Seconds the platform asks to wait before trying again."""
        return self.details.retry_delay

    @classmethod
    def from_rpc(cls, error: grpc.RpcError) -> VibeBoxError:
        """The error for a failed call (``ResumeTokenExpired`` for that refusal)."""
        code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
        message = error.details() if isinstance(error, grpc.Call) else str(error)
        details = details_of(error)
        name = code.name if code is not None else "UNKNOWN"
        text = f"{name}: {message}"
        if code == grpc.StatusCode.FAILED_PRECONDITION and details.reason == RESUME_TOKEN_EXPIRED:
            return ResumeTokenExpired(text, code, details)
        return cls(text, code, details)


class ResumeTokenExpired(VibeBoxError):
    """The watch's resume token is older than the changes the platform keeps:
    list the environments again and watch without a token."""


class WaitTimeout(VibeBoxError, TimeoutError):
    """The environment still had an operation in progress when the wait ended."""

    def __init__(self, message: str, environment: Environment) -> None:
        super().__init__(message)
        #: The environment as last seen.
        self.environment = environment


class EnvironmentFailed(VibeBoxError):
    """The environment settled in the FAILED state (see ``failure_reason``)."""

    def __init__(self, message: str, environment: Environment) -> None:
        super().__init__(message)
        #: The failed environment.
        self.environment = environment


class ExecIncomplete(VibeBoxError):
    """An Exec stream ended without its exit message."""
