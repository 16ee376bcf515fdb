"""VibeBox's public gRPC API: a thin, typed client and the generated code.

>>> import vibebox
>>> client = vibebox.Client("http://127.0.0.1:7700", token)          # doctest: +SKIP
>>> env = client.create_environment(team_id, "demo", "vibebox/devbox:1")  # doctest: +SKIP
>>> env = client.wait(env.id)                                         # doctest: +SKIP
>>> client.exec(env.id, ["echo", "hello"]).stdout                     # doctest: +SKIP
b'hello\\n'

The messages and stubs generated from the protos (buf module
``buf.build/vibebox/api``) are here too: ``environment_pb2`` (and its
``spec_pb2``), ``identity_pb2``, ``audit_pb2``, ``policy_pb2`` and their
``*_pb2_grpc`` stubs.
"""

from vibebox._client import (
    Client,
    ExecResult,
    RetryPolicy,
    is_retryable,
    is_settled,
    new_request_id,
    state_name,
    watch_reconnects,
)
from vibebox._errors import (
    RESUME_TOKEN_EXPIRED,
    Details,
    EnvironmentFailed,
    ExecIncomplete,
    ResumeTokenExpired,
    VibeBoxError,
    WaitTimeout,
)
from vibebox._proto.audit.v1 import audit_pb2, audit_pb2_grpc
from vibebox._proto.environment.v1 import (
    environment_pb2,
    environment_pb2_grpc,
    spec_pb2,
)
from vibebox._proto.identity.v1 import identity_pb2, identity_pb2_grpc
from vibebox._proto.policy.v1 import policy_pb2, policy_pb2_grpc

__all__ = [
    "RESUME_TOKEN_EXPIRED",
    "Client",
    "Details",
    "EnvironmentFailed",
    "ExecIncomplete",
    "ExecResult",
    "ResumeTokenExpired",
    "RetryPolicy",
    "VibeBoxError",
    "WaitTimeout",
    "audit_pb2",
    "audit_pb2_grpc",
    "environment_pb2",
    "environment_pb2_grpc",
    "identity_pb2",
    "identity_pb2_grpc",
    "is_retryable",
    "is_settled",
    "new_request_id",
    "policy_pb2",
    "policy_pb2_grpc",
    "spec_pb2",
    "state_name",
    "watch_reconnects",
]
