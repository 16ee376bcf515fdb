"""A thin, typed client of VibeBox's public gRPC API (the gateway)."""

from __future__ import annotations

import ipaddress
import logging
import random
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import grpc
from google.protobuf import duration_pb2

from vibebox._errors import (
    EnvironmentFailed,
    ExecIncomplete,
    ResumeTokenExpired,
    VibeBoxError,
    WaitTimeout,
)
from vibebox._proto.audit.v1 import audit_pb2_grpc
from vibebox._proto.environment.v1 import environment_pb2 as pb
from vibebox._proto.environment.v1 import environment_pb2_grpc, spec_pb2
from vibebox._proto.identity.v1 import identity_pb2_grpc
from vibebox._proto.policy.v1 import policy_pb2_grpc

_log = logging.getLogger("vibebox")

T = TypeVar("T")

_TRANSITIONAL = frozenset({
    pb.ENVIRONMENT_STATE_CREATING,
    pb.ENVIRONMENT_STATE_STARTING,
    pb.ENVIRONMENT_STATE_STOPPING,
    pb.ENVIRONMENT_STATE_DELETING,
})
# The longest single WaitEnvironment call; a longer wait is several.
_WAIT_CALL_MAX = 300.0
# Added to a WaitEnvironment call's timeout for its gRPC deadline.
_WAIT_CALL_SLACK = 10.0
# Polling bounds when the platform has no WaitEnvironment (UNIMPLEMENTED).
_POLL_MIN, _POLL_MAX = 0.2, 2.0
# The longest wait a server's RetryInfo can impose on an automatic retry.
_MAX_SERVER_DELAY = 30.0
_STDIN_CHUNK = 64 * 1024


def new_request_id() -> str:
    """A fresh idempotency key for a create."""
    return str(uuid.uuid4())


def is_settled(state: int) -> bool:
    """Whether no operation is in progress (not CREATING, STARTING, STOPPING
    or DELETING)."""
    return state not in _TRANSITIONAL


def state_name(state: int) -> str:
    """``RUNNING``, ``CREATING``, ... for an ``EnvironmentState`` value."""
    try:
        name = pb.EnvironmentState.Name(pb.EnvironmentState.ValueType(state))
        return name.removeprefix("ENVIRONMENT_STATE_")
    except ValueError:
        return "UNKNOWN"


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a call is tried again after UNAVAILABLE.

    ``max_attempts`` counts the first attempt (1: never retry); for the watch
    it counts consecutive failed reconnects (the count starts again with
    every message received). Waits double from ``min_delay`` toward
    ``max_delay`` (seconds), with jitter.
    """

    max_attempts: int = 5
    min_delay: float = 0.1
    max_delay: float = 3.0

    @staticmethod
    def never() -> RetryPolicy:
        """One attempt, no retry."""
        return RetryPolicy(max_attempts=1)

    @staticmethod
    def watch() -> RetryPolicy:
        """The watch's default: 10 reconnects in a row, 0.2 s toward 5 s."""
        return RetryPolicy(max_attempts=10, min_delay=0.2, max_delay=5.0)

    def delay(self, failures: int, asked: float | None = None) -> float:
        """The wait after the ``failures``-th failure in a row (from 1): the
        doubling is capped at half of ``max_delay`` and up to 100% jitter is
        added, so waits stay within ``[min_delay, max_delay]``; longer when
        the platform asked for longer (``RetryInfo``, at most 30 s)."""
        low = self.min_delay
        high = max(self.max_delay, low)
        base = min(low * 2.0 ** (failures - 1), max(high / 2, low))
        wait = min(max(base + random.uniform(0, base), low), high)
        if asked is not None:
            wait = max(wait, min(asked, _MAX_SERVER_DELAY))
        return wait


def is_retryable(code: grpc.StatusCode | None) -> bool:
    """Whether a call that failed with ``code`` is tried again (when it is
    safe to repeat): UNAVAILABLE only."""
    return code == grpc.StatusCode.UNAVAILABLE


def watch_reconnects(code: grpc.StatusCode | None) -> bool:
    """Whether a watch that ended with ``code`` reconnects with its last
    resume token: UNAVAILABLE (gateway restart, broken connection) and
    ABORTED."""
    return code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED)


@dataclass(frozen=True)
class ExecResult:
    """What a finished command left."""

    exit_code: int
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        """Whether the command exited with 0."""
        return self.exit_code == 0

    @property
    def stdout_text(self) -> str:
        """stdout as text (invalid UTF-8 replaced)."""
        return self.stdout.decode(errors="replace")

    @property
    def stderr_text(self) -> str:
        """stderr as text (invalid UTF-8 replaced)."""
        return self.stderr.decode(errors="replace")


def _exec_requests(start: pb.ExecStart, stdin: bytes | None) -> Iterator[pb.ExecRequest]:
    yield pb.ExecRequest(start=start)
    data = stdin or b""
    for offset in range(0, len(data), _STDIN_CHUNK):
        yield pb.ExecRequest(stdin=data[offset:offset + _STDIN_CHUNK])
    yield pb.ExecRequest(close_stdin=True)


def _host(target: str) -> str:
    """The host of ``host:port`` (IPv6 in brackets), lower-case."""
    return urllib.parse.urlsplit("//" + target).hostname or ""


def _is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine's loopback: ``localhost``,
    ``127.0.0.0/8`` or ``::1`` (also as an IPv4-mapped address)."""
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def _target(url: str, insecure: bool) -> tuple[str, bool]:
    """The gRPC target of ``url`` and whether it is TLS (see :class:`Client`);
    raises ``ValueError`` for a URL the client will not use."""
    scheme, sep, target = url.partition("://")
    if not sep:
        target = url
        scheme = "http" if _is_loopback(_host(url)) else "https"
    scheme = scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"invalid URL {url!r}: the scheme must be http:// or https://")
    if scheme == "http" and not insecure and not _is_loopback(_host(target)):
        raise ValueError(
            f"invalid URL {url!r}: plaintext http:// to {_host(target) or target} would send "
            "the token in clear: use https://, or opt in with insecure=True")
    return target, scheme == "https"


class _Resume:
    """The position of a watch and its reconnect budget."""

    def __init__(self, team_id: str, token: str, policy: RetryPolicy) -> None:
        self.team_id = team_id
        self.token = token
        self.policy = policy
        self.failures = 0

    def request(self) -> pb.WatchEnvironmentsRequest:
        return pb.WatchEnvironmentsRequest(team_id=self.team_id, resume_token=self.token)

    def received(self, message: pb.WatchEnvironmentsResponse) -> None:
        if message.resume_token:
            self.token = message.resume_token
        self.failures = 0

    def ended(self, error: VibeBoxError | None) -> float:
        """The wait before reconnecting; raises when the watch must end."""
        if isinstance(error, ResumeTokenExpired):
            raise error
        if error is not None and not watch_reconnects(error.code):
            raise error
        self.failures += 1
        if self.failures >= self.policy.max_attempts:
            raise error or VibeBoxError("the watch stream kept ending",
                                        grpc.StatusCode.UNAVAILABLE)
        return self.policy.delay(self.failures, error.retry_delay if error else None)


class Client:
    """A connection to one VibeBox gateway as one caller.

    ``url`` is ``https://host:port`` (TLS, verified against gRPC's default
    roots, or against ``ca_pem`` alone when given); ``host:port`` (TLS too,
    but plaintext on loopback: ``127.0.0.0/8``, ``::1``, ``localhost``); or
    ``http://host:port`` (plaintext, as ``vibebox up`` serves on loopback).
    ``token`` travels as ``authorization: Bearer <token>`` with every call,
    so plaintext to a host other than loopback raises ``ValueError`` unless
    ``insecure=True``: the token then travels in clear (only on a network
    you trust).
    Calls that are safe to repeat (reads, waits, deletes, creates, which
    carry a ``request_id``) are retried after UNAVAILABLE with ``retry``;
    every other error raises :class:`VibeBoxError` with the google.rpc
    details. ``timeout`` is the deadline of each unary call, in seconds.

    The generated stubs are there for every other call: ``environments``,
    ``identity``, ``audit`` and ``policy``; pass ``metadata=client.metadata``.
    """

    def __init__(self, url: str = "http://127.0.0.1:7700", token: str | None = None, *,
                 ca_pem: bytes | None = None, retry: RetryPolicy | None = None,
                 watch_retry: RetryPolicy | None = None, timeout: float = 30.0,
                 insecure: bool = False) -> None:
        target, tls = _target(url, insecure)
        options = [
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.primary_user_agent", "vibebox-python"),
        ]
        if tls:
            credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem)
            self._channel = grpc.secure_channel(target, credentials, options=options)
        else:
            if ca_pem is not None:
                raise ValueError("ca_pem was given for a plaintext URL: use https://")
            self._channel = grpc.insecure_channel(target, options=options)
        #: Metadata of every call: the bearer token.
        self.metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token.strip()}"),) if token else ()
        )
        self.retry_policy = retry or RetryPolicy()
        self.watch_retry_policy = watch_retry or RetryPolicy.watch()
        self.timeout = timeout
        #: ``EnvironmentService`` stub.
        self.environments = environment_pb2_grpc.EnvironmentServiceStub(self._channel)
        #: ``IdentityService`` stub.
        self.identity = identity_pb2_grpc.IdentityServiceStub(self._channel)
        #: ``AuditService`` stub.
        self.audit = audit_pb2_grpc.AuditServiceStub(self._channel)
        #: ``PolicyService`` stub.
        self.policy = policy_pb2_grpc.PolicyServiceStub(self._channel)

    def close(self) -> None:
        """Closes the connection."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def retry(self, call: Callable[[], T]) -> T:
        """Runs ``call`` with this client's retries: again after UNAVAILABLE,
        never after any other code (raised as :class:`VibeBoxError`). Only for
        calls that are safe to repeat."""
        failures = 0
        while True:
            try:
                return call()
            except grpc.RpcError as rpc_error:
                error = VibeBoxError.from_rpc(rpc_error)
                failures += 1
                if not is_retryable(error.code) or failures >= self.retry_policy.max_attempts:
                    raise error from None
                delay = self.retry_policy.delay(failures, error.retry_delay)
                _log.debug("unavailable (%s), retrying in %.2fs", error, delay)
                time.sleep(delay)

    def create_environment(self, team_id: str, name: str, image: str, *,
                           command: Sequence[str] = (), env: Mapping[str, str] | None = None,
                           labels: Mapping[str, str] | None = None, cpu: float | None = None,
                           memory_mb: int | None = None, spec: spec_pb2.ContainerSpec | None = None,
                           request_id: str | None = None) -> pb.Environment:
        """Creates an environment and returns it as accepted (CREATING while
        the platform pulls the image and starts it; :meth:`wait` waits for the
        end). ``spec`` is the whole ``ContainerSpec`` when the shortcuts are
        not enough (``image`` and the shortcuts are set on it). A
        ``request_id`` is made when none is given, so that a retry cannot
        create it twice."""
        container = spec_pb2.ContainerSpec()
        if spec is not None:
            container.CopyFrom(spec)
        container.image = image
        container.command.extend(command)
        container.env.update(env or {})
        if cpu is not None:
            container.cpu_limit = cpu
        if memory_mb is not None:
            container.memory_limit_mb = memory_mb
        request = pb.CreateEnvironmentRequest(
            request_id=request_id or new_request_id(), team_id=team_id, name=name,
            spec=container, labels=dict(labels or {}))
        response = self.retry(lambda: self.environments.CreateEnvironment(
            request, metadata=self.metadata, timeout=self.timeout))
        return response.environment

    def create_environment_and_wait(self, team_id: str, name: str, image: str, *,
                                    timeout: float = 300.0, **options: object) -> pb.Environment:
        """:meth:`create_environment` (same options), then :meth:`wait`;
        raises :class:`EnvironmentFailed` when it failed."""
        created = self.create_environment(team_id, name, image, **options)  # type: ignore[arg-type]
        settled = self.wait(created.id, timeout)
        if settled.state == pb.ENVIRONMENT_STATE_FAILED:
            raise EnvironmentFailed(
                f"environment {settled.id} failed: {settled.failure_reason}", settled)
        return settled

    def get_environment(self, environment_id: str) -> pb.Environment:
        """The environment as it is now."""
        request = pb.GetEnvironmentRequest(environment_id=environment_id)
        response = self.retry(lambda: self.environments.GetEnvironment(
            request, metadata=self.metadata, timeout=self.timeout))
        return response.environment

    def list_environments(self, team_id: str = "", filter: str = "",
                          order_by: str = "") -> list[pb.Environment]:
        """Every environment of ``team_id`` (empty: of every team the caller
        is in) that ``filter`` selects (AIP-160 subset, for example
        ``state = RUNNING AND labels.ci = "true"``), all pages."""
        found: list[pb.Environment] = []
        page_token = ""
        while True:
            request = pb.ListEnvironmentsRequest(team_id=team_id, filter=filter,
                                                 order_by=order_by, page_size=500,
                                                 page_token=page_token)
            page = self.retry(lambda: self.environments.ListEnvironments(
                request, metadata=self.metadata, timeout=self.timeout))
            found.extend(page.environments)
            if not page.next_page_token:
                return found
            page_token = page.next_page_token

    def delete_environment(self, environment_id: str) -> pb.Environment:
        """Deletes an environment; returns it as accepted (DELETING, then
        DELETED: :meth:`wait`)."""
        request = pb.DeleteEnvironmentRequest(environment_id=environment_id)
        response = self.retry(lambda: self.environments.DeleteEnvironment(
            request, metadata=self.metadata, timeout=self.timeout))
        return response.environment

    def wait(self, environment_id: str, timeout: float = 300.0) -> pb.Environment:
        """Waits until the environment has no operation in progress and
        returns it; raises :class:`WaitTimeout` (with the environment as last
        seen) when ``timeout`` seconds pass first.

        Uses ``WaitEnvironment`` (the platform answers when the state
        changes); a platform without it (UNIMPLEMENTED) is polled with
        ``GetEnvironment``, every 0.2 s growing to 2 s."""
        deadline = time.monotonic() + timeout
        server_waits = True
        poll = _POLL_MIN
        while True:
            remaining = deadline - time.monotonic()
            if server_waits and remaining > 0:
                chunk = min(remaining, _WAIT_CALL_MAX)
                request = pb.WaitEnvironmentRequest(
                    environment_id=environment_id,
                    timeout=duration_pb2.Duration(seconds=int(chunk),
                                                  nanos=int((chunk % 1) * 1e9)))
                try:
                    environment = self.retry(lambda: self.environments.WaitEnvironment(
                        request, metadata=self.metadata, timeout=chunk + _WAIT_CALL_SLACK)
                    ).environment
                except VibeBoxError as error:
                    if error.code == grpc.StatusCode.UNIMPLEMENTED:
                        _log.debug("WaitEnvironment is not implemented: polling")
                        server_waits = False
                        continue
                    if (error.code == grpc.StatusCode.DEADLINE_EXCEEDED
                            and time.monotonic() < deadline):
                        # A deadline cut by a proxy on the way: ask again.
                        time.sleep(min(_POLL_MIN, max(deadline - time.monotonic(), 0)))
                        continue
                    raise
            else:
                environment = self.get_environment(environment_id)
            if is_settled(environment.state):
                return environment
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WaitTimeout(
                    f"environment {environment_id} still {state_name(environment.state)} "
                    f"after {timeout:g}s", environment)
            if server_waits:
                # Answered before its timeout, the operation not over (a
                # shorter deadline on the way): never a tight loop.
                time.sleep(min(_POLL_MIN, remaining))
            else:
                time.sleep(min(poll, remaining))
                poll = min(poll * 2, _POLL_MAX)

    def exec(self, environment_id: str, argv: Sequence[str], *, stdin: bytes | None = None,
             env: Mapping[str, str] | None = None, working_dir: str = "",
             timeout: float | None = None) -> ExecResult:
        """Runs ``argv`` in the environment without a terminal and returns its
        exit code and output, stdout and stderr apart. ``stdin``, when given,
        is the command's input. Not retried (a command is not safe to run
        twice); the output is held in memory."""
        start = pb.ExecStart(environment_id=environment_id, command=list(argv),
                             env=dict(env or {}), working_dir=working_dir,
                             stdin=stdin is not None)
        stdout, stderr = bytearray(), bytearray()
        try:
            for response in self.environments.Exec(_exec_requests(start, stdin),
                                                   metadata=self.metadata, timeout=timeout):
                kind = response.WhichOneof("message")
                if kind == "stdout":
                    stdout += response.stdout
                elif kind == "stderr":
                    stderr += response.stderr
                elif kind == "exit":
                    return ExecResult(response.exit.exit_code, bytes(stdout), bytes(stderr))
        except grpc.RpcError as rpc_error:
            raise VibeBoxError.from_rpc(rpc_error) from None
        raise ExecIncomplete("the exec stream ended without an exit code")

    def watch_environments(self, team_id: str = "",
                           resume_token: str = "") -> Iterator[pb.Environment]:
        """Every change of the environments of ``team_id`` (empty: of every
        team the caller can see): first the current ones, then each change in
        order (a deleted one once more with state DELETED).

        When the stream breaks (UNAVAILABLE, ABORTED) the watch reconnects
        with the last resume token after a bounded backoff and misses
        nothing; it raises :class:`ResumeTokenExpired` when the platform no
        longer has the changes since that token (list again and watch anew),
        and :class:`VibeBoxError` on any refusal or after too many failed
        reconnects."""
        for message in self.watch_environment_events(team_id, resume_token):
            if message.HasField("environment"):
                yield message.environment

    def watch_environment_events(self, team_id: str = "",
                                 resume_token: str = "") -> Iterator[pb.WatchEnvironmentsResponse]:
        """The watch's messages themselves, from ``resume_token`` (empty: start
        with the current environments): changes, heartbeats (no environment)
        and the ``caught_up`` marker. Each carries the token to resume after
        it: keep the last one to continue later. Reconnects as
        :meth:`watch_environments` does."""
        resume = _Resume(team_id, resume_token, self.watch_retry_policy)
        while True:
            stream = self.environments.WatchEnvironments(resume.request(),
                                                         metadata=self.metadata)
            error: VibeBoxError | None = None
            try:
                for message in stream:
                    resume.received(message)
                    yield message
            except grpc.RpcError as rpc_error:
                error = VibeBoxError.from_rpc(rpc_error)
            finally:
                stream.cancel()  # type: ignore[no-untyped-call]
            delay = resume.ended(error)
            _log.debug("watch interrupted (%s), resuming in %.2fs", error, delay)
            time.sleep(delay)
