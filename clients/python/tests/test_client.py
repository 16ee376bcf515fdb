"""The client against a scripted gateway over real gRPC on loopback: the token
on every call, retries of UNAVAILABLE with one request id, the wait
(WaitEnvironment, and polling when it is UNIMPLEMENTED), a non-interactive
exec, and the watch resuming from its last token."""

from __future__ import annotations

import threading
import time
import unittest
from collections import deque
from concurrent import futures
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

import vibebox
from vibebox import environment_pb2 as pb
from vibebox import environment_pb2_grpc

TOKEN = "test-token"
QUICK = vibebox.RetryPolicy(max_attempts=5, min_delay=0.005, max_delay=0.04)


def env(env_id: str, state: int) -> pb.Environment:
    return pb.Environment(id=env_id, name=env_id, state=state)


def abort_with_details(context: grpc.ServicerContext, code: grpc.StatusCode, message: str,
                       detail: Any) -> None:
    packed = any_pb2.Any()
    packed.Pack(detail)
    status = status_pb2.Status(code=code.value[0], message=message, details=[packed])
    context.abort_with_status(_RichStatus(code, message, status.SerializeToString()))


class _RichStatus(grpc.Status):
    def __init__(self, code: grpc.StatusCode, details: str, raw: bytes) -> None:
        self.code = code
        self.details = details
        self.trailing_metadata = (("grpc-status-details-bin", raw),)


class Fake(environment_pb2_grpc.EnvironmentServiceServicer):
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.create_unavailable = 0
        self.create_request_ids: list[str] = []
        self.wait_implemented = False
        self.creating_gets = 0
        self.gets = 0
        self.waits = 0
        self.exec_requests: list[pb.ExecRequest] = []
        self.watch_tokens: list[str] = []
        # Each leg: (changes to send after the token, how it ends).
        self.watch_plan: deque[tuple[int, Any]] = deque()
        self.refused = 0

    def _authorize(self, context: grpc.ServicerContext) -> None:
        if dict(context.invocation_metadata()).get("authorization") != f"Bearer {TOKEN}":
            with self.lock:
                self.refused += 1
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token")

    def CreateEnvironment(self, request, context):  # noqa: N802
        self._authorize(context)
        with self.lock:
            self.create_request_ids.append(request.request_id)
            if self.create_unavailable > 0:
                self.create_unavailable -= 1
                context.abort(grpc.StatusCode.UNAVAILABLE, "gateway restarting")
        assert request.spec.image == "vibebox/devbox:1"
        return pb.CreateEnvironmentResponse(environment=env("env-1", pb.ENVIRONMENT_STATE_CREATING))

    def GetEnvironment(self, request, context):  # noqa: N802
        self._authorize(context)
        with self.lock:
            self.gets += 1
            state = pb.ENVIRONMENT_STATE_RUNNING
            if self.creating_gets > 0:
                self.creating_gets -= 1
                state = pb.ENVIRONMENT_STATE_CREATING
        return pb.GetEnvironmentResponse(environment=env(request.environment_id, state))

    def DeleteEnvironment(self, request, context):  # noqa: N802
        self._authorize(context)
        return pb.DeleteEnvironmentResponse(
            environment=env(request.environment_id, pb.ENVIRONMENT_STATE_DELETING))

    def WaitEnvironment(self, request, context):  # noqa: N802
        self._authorize(context)
        if not self.wait_implemented:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "not implemented yet")
        assert request.HasField("timeout")
        with self.lock:
            self.waits += 1
        time.sleep(0.05)
        return pb.WaitEnvironmentResponse(
            environment=env(request.environment_id, pb.ENVIRONMENT_STATE_RUNNING))

    def Exec(self, request_iterator, context):  # noqa: N802
        self._authorize(context)
        stdin = b""
        for message in request_iterator:
            self.exec_requests.append(message)
            if message.WhichOneof("message") == "stdin":
                stdin += message.stdin
            if message.WhichOneof("message") == "close_stdin":
                break
        yield pb.ExecResponse(stdout=b"hel")
        yield pb.ExecResponse(stderr=b"warning\n")
        yield pb.ExecResponse(stdout=b"lo\n" + stdin)
        yield pb.ExecResponse(exit=pb.ExecExit(exit_code=3))

    def WatchEnvironments(self, request, context):  # noqa: N802
        self._authorize(context)
        with self.lock:
            self.watch_tokens.append(request.resume_token)
            send, end = self.watch_plan.popleft()
        after = int(request.resume_token or 0)
        for n in range(after + 1, min(after + send, 5) + 1):
            yield pb.WatchEnvironmentsResponse(
                environment=env(f"env-{n}", pb.ENVIRONMENT_STATE_RUNNING),
                resume_token=str(n))
        if end is not None:
            end(context)


class ClientTest(unittest.TestCase):
    def setUp(self) -> None:
        self.fake = Fake()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        environment_pb2_grpc.add_EnvironmentServiceServicer_to_server(self.fake, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.client = vibebox.Client(f"http://127.0.0.1:{self.port}", f"  {TOKEN}\n",
                                     retry=QUICK, watch_retry=QUICK)

    def tearDown(self) -> None:
        self.client.close()
        self.server.stop(None)

    def test_a_create_retried_after_unavailable_keeps_its_request_id(self) -> None:
        self.fake.create_unavailable = 2
        self.fake.wait_implemented = True
        created = self.client.create_environment("team", "demo", "vibebox/devbox:1")
        self.assertEqual(created.state, pb.ENVIRONMENT_STATE_CREATING)
        ids = self.fake.create_request_ids
        self.assertEqual(len(ids), 3)
        self.assertTrue(ids[0])
        self.assertEqual(set(ids), {ids[0]}, "one request id for every attempt")
        settled = self.client.wait(created.id, timeout=30)
        self.assertEqual(settled.state, pb.ENVIRONMENT_STATE_RUNNING)
        self.assertEqual((self.fake.waits, self.fake.gets), (1, 0), "no polling")

    def test_unavailable_gives_up_after_the_budget_and_other_codes_at_once(self) -> None:
        self.fake.create_unavailable = 100
        with self.assertRaises(vibebox.VibeBoxError) as caught:
            self.client.create_environment("team", "demo", "vibebox/devbox:1", request_id="mine-1")
        self.assertEqual(caught.exception.code, grpc.StatusCode.UNAVAILABLE)
        self.assertEqual(self.fake.create_request_ids, ["mine-1"] * 5)

        wrong = vibebox.Client(f"http://127.0.0.1:{self.port}", "someone else", retry=QUICK)
        before = len(self.fake.create_request_ids)
        with self.assertRaises(vibebox.VibeBoxError) as caught:
            wrong.create_environment("team", "demo", "vibebox/devbox:1")
        self.assertEqual(caught.exception.code, grpc.StatusCode.UNAUTHENTICATED)
        self.assertEqual(len(self.fake.create_request_ids), before, "refused before the handler")
        self.assertEqual(self.fake.refused, 1, "UNAUTHENTICATED is not retried")
        wrong.close()

    def test_without_wait_environment_the_client_polls_until_settled_or_times_out(self) -> None:
        self.fake.creating_gets = 3
        settled = self.client.wait("env-1", timeout=30)
        self.assertEqual(settled.state, pb.ENVIRONMENT_STATE_RUNNING)
        self.assertEqual(self.fake.gets, 4, "three CREATING, then RUNNING")

        self.fake.creating_gets = 1000
        started = time.monotonic()
        with self.assertRaises(vibebox.WaitTimeout) as caught:
            self.client.wait("env-1", timeout=0.7)
        took = time.monotonic() - started
        self.assertEqual(caught.exception.environment.state, pb.ENVIRONMENT_STATE_CREATING)
        self.assertTrue(0.7 <= took < 5, took)

    def test_exec_sends_start_then_end_of_input_and_collects_the_output(self) -> None:
        result = self.client.exec("env-1", ["echo", "hello"])
        self.assertEqual(result, vibebox.ExecResult(3, b"hello\n", b"warning\n"))
        first, last = self.fake.exec_requests[0], self.fake.exec_requests[-1]
        self.assertEqual(first.WhichOneof("message"), "start")
        self.assertEqual(list(first.start.command), ["echo", "hello"])
        self.assertFalse(first.start.stdin)
        self.assertEqual(last.WhichOneof("message"), "close_stdin")

        result = self.client.exec("env-1", ["cat"], stdin=b"from stdin")
        self.assertEqual(result.stdout_text, "hello\nfrom stdin")
        self.assertFalse(result.ok)

    def test_the_watch_resumes_from_its_last_token_and_raises_an_expired_one(self) -> None:
        def unavailable(context: grpc.ServicerContext) -> None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "gateway restarting")

        def aborted(context: grpc.ServicerContext) -> None:
            context.abort(grpc.StatusCode.ABORTED, "moved")

        def expired(context: grpc.ServicerContext) -> None:
            abort_with_details(context, grpc.StatusCode.FAILED_PRECONDITION, "too old",
                               error_details_pb2.ErrorInfo(reason=vibebox.RESUME_TOKEN_EXPIRED,
                                                           domain="vibebox"))

        self.fake.watch_plan.extend([(2, unavailable), (1, None), (10, aborted), (0, expired)])
        seen: list[str] = []
        with self.assertRaises(vibebox.ResumeTokenExpired) as caught:
            for changed in self.client.watch_environments("team"):
                seen.append(changed.id)
        self.assertEqual(seen, ["env-1", "env-2", "env-3", "env-4", "env-5"])
        self.assertEqual(self.fake.watch_tokens, ["", "2", "3", "5"])
        self.assertEqual(caught.exception.reason, vibebox.RESUME_TOKEN_EXPIRED)
        self.assertEqual(caught.exception.code, grpc.StatusCode.FAILED_PRECONDITION)

    def test_a_refused_watch_ends_at_once_and_a_saved_token_is_where_it_starts(self) -> None:
        def denied(context: grpc.ServicerContext) -> None:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "removed from the team")

        self.fake.watch_plan.append((1, denied))
        events = self.client.watch_environment_events("team", resume_token="3")
        first = next(events)
        self.assertEqual((first.resume_token, first.environment.id), ("4", "env-4"))
        with self.assertRaises(vibebox.VibeBoxError) as caught:
            next(events)
        self.assertEqual(caught.exception.code, grpc.StatusCode.PERMISSION_DENIED)
        self.assertEqual(self.fake.watch_tokens, ["3"], "no reconnect")

    def test_quota_and_retry_details_are_readable(self) -> None:
        class Limited(Fake):
            def GetEnvironment(self, request, context):  # noqa: N802
                abort_with_details(context, grpc.StatusCode.RESOURCE_EXHAUSTED, "quota",
                                   error_details_pb2.QuotaFailure(violations=[
                                       error_details_pb2.QuotaFailure.Violation(
                                           subject="user:u1", description="16 open streams")]))

        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        environment_pb2_grpc.add_EnvironmentServiceServicer_to_server(Limited(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        try:
            with vibebox.Client(f"127.0.0.1:{port}", TOKEN, retry=QUICK) as client:
                with self.assertRaises(vibebox.VibeBoxError) as caught:
                    client.get_environment("env-1")
            self.assertEqual(caught.exception.code, grpc.StatusCode.RESOURCE_EXHAUSTED)
            self.assertEqual(caught.exception.details.quota_violations,
                             (("user:u1", "16 open streams"),))
        finally:
            server.stop(None)


class UrlTest(unittest.TestCase):
    def test_bare_addresses_are_tls_but_on_loopback(self) -> None:
        from vibebox._client import _target
        for loopback in ("127.0.0.1:7700", "127.8.9.10:1", "localhost:7700", "LocalHost",
                         "[::1]:7700", "[::ffff:127.0.0.1]:7700"):
            self.assertEqual(_target(loopback, False), (loopback, False), loopback)
        for remote in ("vibebox.example.com:7700", "vibebox.example.com", "10.0.0.5:7700",
                       "128.0.0.1:7700", "[2001:db8::1]:443", "localhost.example.com:7700"):
            self.assertEqual(_target(remote, False), (remote, True), remote)

    def test_plaintext_to_another_host_needs_the_opt_in(self) -> None:
        from vibebox._client import _target
        for url in ("http://127.0.0.1:7700", "http://[::1]:1", "HTTP://localhost:7700"):
            self.assertEqual(_target(url, False), (url.partition("://")[2], False), url)
        for url in ("http://10.0.0.5:7700", "http://vibebox.example.com"):
            with self.assertRaisesRegex(ValueError, "in clear.*insecure=True"):
                _target(url, False)
            self.assertEqual(_target(url, True), (url.partition("://")[2], False), url)
            with self.assertRaises(ValueError):
                vibebox.Client(url, TOKEN)
            vibebox.Client(url, TOKEN, insecure=True).close()
        self.assertEqual(_target("https://10.0.0.5:7700", False), ("10.0.0.5:7700", True))
        with self.assertRaises(ValueError):
            _target("ftp://127.0.0.1", False)
        # A remote bare address gets a TLS channel (no connection yet).
        vibebox.Client("10.0.0.5:7700", TOKEN).close()


class RetryPolicyTest(unittest.TestCase):
    def test_only_unavailable_is_retried_and_the_watch_also_reconnects_on_aborted(self) -> None:
        for code in grpc.StatusCode:
            self.assertEqual(vibebox.is_retryable(code), code == grpc.StatusCode.UNAVAILABLE, code)
            self.assertEqual(vibebox.watch_reconnects(code),
                             code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED), code)

    def test_waits_grow_stay_within_bounds_are_jittered_and_hear_the_server(self) -> None:
        policy = vibebox.RetryPolicy(max_attempts=5, min_delay=0.1, max_delay=5.0)
        waits = [policy.delay(n) for n in range(1, 60)]
        self.assertTrue(all(0.1 <= w <= 5.0 for w in waits), waits)
        self.assertLess(waits[0], 0.2)
        self.assertGreaterEqual(waits[-1], 2.5)
        self.assertGreater(len(set(waits[20:])), 1, "jittered")
        self.assertEqual(policy.delay(1, asked=7.0), 7.0)
        self.assertEqual(policy.delay(1, asked=3600.0), 30.0)

    def test_settled_states(self) -> None:
        for state in (pb.ENVIRONMENT_STATE_CREATING, pb.ENVIRONMENT_STATE_STARTING,
                      pb.ENVIRONMENT_STATE_STOPPING, pb.ENVIRONMENT_STATE_DELETING):
            self.assertFalse(vibebox.is_settled(state))
        for state in (pb.ENVIRONMENT_STATE_RUNNING, pb.ENVIRONMENT_STATE_FAILED,
                      pb.ENVIRONMENT_STATE_STOPPED, pb.ENVIRONMENT_STATE_DELETED):
            self.assertTrue(vibebox.is_settled(state))
        self.assertEqual(vibebox.state_name(pb.ENVIRONMENT_STATE_RUNNING), "RUNNING")
        self.assertEqual(vibebox.state_name(99), "UNKNOWN")


if __name__ == "__main__":
    unittest.main()
