"""Client and worker SDKs over real ZMQ sockets, with the test playing the controller."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
import typing

import msgpack
import pytest
import zmq
import zmq.asyncio

from dpcore import wire
from dpcore.hashing import block_hashes
from dpcore.sdk import AsyncClient, Client, ControllerUnavailableError, RequestFields, Worker
from dpcore.sdk import endpoints

TIMEOUT_MS = 5000


class FakeController:
    """Just the controller's sockets: ingress PULL, one dispatch PUSH, report PULL."""

    def __init__(self, ctx: zmq.Context, scheme: str, tmp_path) -> None:
        self.ingress = ctx.socket(zmq.PULL)
        self.dispatch = ctx.socket(zmq.PUSH)
        self.reports = ctx.socket(zmq.PULL)
        socks = (self.ingress, self.dispatch, self.reports)
        names = ("ingress", "dispatch", "report")
        eps = []
        for s, name in zip(socks, names):
            s.linger = 0
            s.rcvtimeo = TIMEOUT_MS
            ep = f"ipc://{tmp_path}/{name}" if scheme == "ipc" else "tcp://127.0.0.1:*"
            eps.append(endpoints.bind(s, ep))
        self.ingress_ep, self.dispatch_ep, self.report_ep = eps

    def forward(self, rank: int, seq: int):
        frames = self.ingress.recv_multipart()
        self.dispatch.send_multipart(wire.dispatch_frames(rank, seq, frames[0], frames[1]))
        return frames

    def report(self):
        return wire.decode_load(self.reports.recv())

    def close(self) -> None:
        for s in (self.ingress, self.dispatch, self.reports):
            s.close(linger=0)


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.term()


@pytest.fixture(params=["ipc", "tcp"])
def fake(request, ctx, tmp_path):
    f = FakeController(ctx, request.param, tmp_path)
    yield f
    f.close()


def test_request_reaches_worker_and_output_reaches_client(ctx, fake):
    ids = list(range(200))
    with Client(fake.ingress_ep, zmq_ctx=ctx, block_size=64) as client, Worker(
        1, dispatch_endpoint=fake.dispatch_ep, report_endpoint=fake.report_ep, zmq_ctx=ctx, epoch=42
    ) as worker:
        hello, done, lo, _ = fake.report()
        assert (hello.rank, hello.epoch, hello.acked_seq, done, lo) == (1, 42, -1, (), None)

        client.submit("a", token_ids=ids, payload=b"P", bootstrap_room=5, max_new_tokens=8)
        frames = fake.forward(1, 17)
        req, reply = wire.decode_request(frames[0])
        assert req.block_hashes == block_hashes(ids, 64) and len(req.block_hashes) == 3
        assert (req.num_tokens, req.bootstrap_room, req.max_new_tokens) == (200, 5, 8)
        assert reply == client.reply_endpoint

        items = []
        deadline = time.monotonic() + 5
        while not items and time.monotonic() < deadline:
            items = worker.recv(0.5)
        (work,) = items
        assert (work.rid, work.seq, work.payload, work.reply) == ("a", 17, b"P", client.reply_endpoint)
        assert work.request.num_tokens == 200 and work.header["room"] == 5

        worker.admit(work)
        assert worker.report(1, 0, 200)
        rep, done, lo, out = fake.report()
        assert (rep.acked_seq, rep.num_running, rep.num_tokens, done, lo, out) == (17, 1, 200, (), 17, None)

        assert worker.send(work, {"completion_tokens": 2}, b"partial", final=False)
        assert worker.send(work, {"completion_tokens": 4}, b"done")
        got = []
        while len(got) < 2:
            got += client.poll(5)
        assert [(r.kind, r.final, r.payload) for r in got] == [("out", False, b"partial"), ("out", True, b"done")]
        assert got[1].meta == {"completion_tokens": 4} and got[1].rank == 1
        assert client.pending == set()

        worker.heartbeat()
        rep, done, _, out = fake.report()
        assert done == (17,) and rep.num_running == 1  # heartbeat repeats the last load
        assert out is None  # the engine did not count its output


def test_worker_reports_the_output_tokens_of_finished_requests(ctx, fake):
    """``send(..., output_tokens=N)`` and ``finish(work, N)`` travel beside ``done``; a request
    whose count the engine did not give is ``-1``, and a report with no count leaves the field out."""
    with Client(fake.ingress_ep, zmq_ctx=ctx) as client, Worker(
        0, dispatch_endpoint=fake.dispatch_ep, report_endpoint=fake.report_ep, zmq_ctx=ctx
    ) as worker:
        fake.report()  # the hello
        for i, rid in enumerate("abc"):
            client.submit(rid, num_tokens=10, max_new_tokens=50)
            fake.forward(0, i)
        items: list = []
        deadline = time.monotonic() + 5
        while len(items) < 3 and time.monotonic() < deadline:
            items += worker.recv(0.5)
        a, b, c = items
        worker.send(a, {}, b"x", output_tokens=17)
        worker.finish(b)
        worker.send(c, {}, b"y", output_tokens=1 << 40)  # past the wire's range: clamped, never refused
        worker.report(0, 0, 0)
        _, done, _, out = fake.report()
        assert done == (0, 1, 2) and out == (17, -1, wire.MAX_OUTPUT_TOKENS)
        worker.finish(a)  # done again, nothing counted
        worker.report(0, 0, 0)
        _, done, _, out = fake.report()
        assert done == (0,) and out is None


def test_client_counts_and_hashes_without_token_ids(ctx, fake):
    with Client(fake.ingress_ep, zmq_ctx=ctx) as client:
        client.submit("n", num_tokens=77, block_hashes=[5, 6], routed_dp_rank=2, data_parallel_rank=1)
        req, _ = wire.decode_request(fake.ingress.recv_multipart()[0])
        assert (req.num_tokens, req.block_hashes, req.routed_dp_rank, req.data_parallel_rank) == (77, (5, 6), 2, 1)
        with pytest.raises(ValueError, match="token_ids or num_tokens"):
            client.submit("x")
        with pytest.raises(TypeError, match="max_new_token"):
            client.submit("typo", num_tokens=1, max_new_token=4)  # type: ignore[call-arg]
        assert client.pending == {"n"}


def test_request_fields_are_the_wire_request_fields():
    """One definition of submit's keywords: every request field the wire encodes, plus the
    token ids the client hashes (and not the reply address, which the client owns)."""
    wire_fields = set(inspect.signature(wire.encode_request).parameters) - {"rid", "reply"}
    assert set(RequestFields.__annotations__) == wire_fields | {"token_ids"}
    hints = typing.get_type_hints(Client.submit, include_extras=True)
    assert hints["fields"] == typing.Unpack[RequestFields]


def test_client_rejection_fail_stale_and_garbage(ctx, fake):
    with Client(fake.ingress_ep, zmq_ctx=ctx) as client:
        client.submit("a", num_tokens=1)
        client.submit("b", num_tokens=1)
        push = ctx.socket(zmq.PUSH)
        push.linger = 0
        push.connect(client.reply_endpoint)
        push.send(b"garbage")
        push.send(wire.encode_rej("a", "invalid_rank", "routed_dp_rank=7 out of range [0, 4)"))
        push.send(wire.encode_fail("b", 3, "rank_died", "rank 3 died"))
        push.send(wire.encode_fail("a", 3, "rank_died", "late duplicate"))
        got = client.wait_all(5)
        push.close()
        assert [(r.kind, r.rid, r.code) for r in got] == [("rej", "a", "invalid_rank"), ("fail", "b", "rank_died")]
        deadline = time.monotonic() + 5
        while client.stale < 1 and time.monotonic() < deadline:
            client.poll(0.1)
        assert client.bad_replies == 1 and client.stale == 1


def test_control_messages_reach_worker(ctx, fake):
    seen = []
    with Client(fake.ingress_ep, zmq_ctx=ctx) as client, Worker(
        0, dispatch_endpoint=fake.dispatch_ep, report_endpoint=fake.report_ep, zmq_ctx=ctx, on_control=seen.append
    ) as worker:
        client.control("flush_cache", {"why": "test"})
        (frame,) = fake.ingress.recv_multipart()
        fake.dispatch.send(frame)  # the controller broadcasts the header as is
        fake.dispatch.send(b"junk")
        fake.dispatch.send_multipart(wire.dispatch_frames(5, 0, wire.encode_request("x", num_tokens=1, reply="ipc:///r"), b""))
        deadline = time.monotonic() + 5
        while (not seen or worker.bad_frames + worker.misaddressed < 2) and time.monotonic() < deadline:
            assert worker.recv(0.2) == []
        assert seen == [wire.Control("flush_cache", {"why": "test"})]
        assert worker.bad_frames == 1  # garbage
        assert worker.misaddressed == 1  # a dispatch meant for rank 5, said out loud


def test_worker_heartbeats_while_idle(ctx, fake):
    with Worker(0, dispatch_endpoint=fake.dispatch_ep, report_endpoint=fake.report_ep, zmq_ctx=ctx, heartbeat_interval_s=0.05) as worker:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 0.4:
            worker.recv(1.0)  # returns early to send heartbeats
        seqs = []
        while True:
            try:
                seqs.append(wire.decode_load(fake.reports.recv(zmq.NOBLOCK))[0].seq)
            except zmq.Again:
                break
        assert len(seqs) >= 4 and seqs == sorted(seqs)


def test_submit_times_out_without_controller(ctx, tmp_path):
    with Client(f"ipc://{tmp_path}/nobody", zmq_ctx=ctx, send_timeout_s=0.2) as client:
        client._tx.sndhwm = 1  # make the queue fill at once
        with pytest.raises(ControllerUnavailableError, match="took no request"):
            for i in range(10_000):
                client.submit(f"r{i}", num_tokens=1)


def test_async_client_streams(tmp_path):
    async def main():
        actx = zmq.asyncio.Context()
        ingress = actx.socket(zmq.PULL)
        ingress.linger = 0
        ep = endpoints.bind(ingress, f"ipc://{tmp_path}/ingress")
        client = AsyncClient(ep, zmq_ctx=actx)
        try:
            s1 = await client.submit("s1", token_ids=[1] * 70)
            s2 = await client.submit("s2", num_tokens=3)
            with pytest.raises(ValueError, match="already pending"):
                await client.submit("s1", num_tokens=1)
            h1 = msgpack.unpackb((await ingress.recv_multipart())[0])
            await ingress.recv_multipart()
            assert h1["n"] == 70 and len(h1["bh"]) == 1
            push = actx.socket(zmq.PUSH)
            push.linger = 0
            push.connect(client.reply_endpoint)
            await push.send_multipart([wire.encode_out("s1", 0, False), b"a"])
            await push.send(wire.encode_rej("s2", "no_active_rank", "all ranks inactive"))
            await push.send_multipart([wire.encode_out("s1", 0, True), b"b"])
            await push.send_multipart([wire.encode_out("zz", 0, True), b"?"])
            got = [r async for r in s1]
            assert [r.payload for r in got] == [b"a", b"b"]
            (rej,) = await s2.collect(timeout_s=5)
            assert rej.code == "no_active_rank"
            unclaimed = await client.poll(5)
            assert [r.rid for r in unclaimed] == ["zz"]
            assert client.pending == set()
            push.close()
        finally:
            await client.close()
            ingress.close()
            actx.term()

    asyncio.run(main())


@contextlib.asynccontextmanager
async def async_client_rig(tmp_path, **client_kwargs):
    """An AsyncClient on a PULL ingress it sends to, and a PUSH socket for fake replies."""
    actx = zmq.asyncio.Context()
    ingress = actx.socket(zmq.PULL)
    ingress.linger = 0
    ep = endpoints.bind(ingress, f"ipc://{tmp_path}/ingress")
    client = AsyncClient(ep, zmq_ctx=actx, **client_kwargs)
    push = actx.socket(zmq.PUSH)
    push.linger = 0
    try:
        yield actx, ingress, client, push
    finally:
        push.close()
        await client.close()
        ingress.close()
        actx.term()


def test_async_client_counts_replies_of_forgotten_requests_as_stale(tmp_path):
    """Replies for a request given up with forget() or abort() are dropped and counted in
    ``stale``; they never show up in poll(), which is for requests another tool sent."""

    async def main():
        async with async_client_rig(tmp_path) as (actx, ingress, client, push):
            f = await client.submit("f", num_tokens=1)
            a = await client.submit("a", num_tokens=1)
            client.forget("f")
            client.abort("a")
            assert f.done and a.done  # no reply is routed to them any more
            await ingress.recv_multipart()
            await ingress.recv_multipart()
            abort = wire.decode_ctl((await asyncio.wait_for(ingress.recv_multipart(), 5))[0])
            assert wire.abort_target(abort) == ("a", client.reply_endpoint)
            assert wire.abort_reason(abort) == wire.ABORT_CALLER
            push.connect(client.reply_endpoint)
            await push.send_multipart([wire.encode_out("f", 0, False), b"late"])
            await push.send(wire.encode_fail("a", 0, "aborted", "stopped on request"))
            await push.send_multipart([wire.encode_out("f", 0, True), b"last"])
            await push.send_multipart([wire.encode_out("other", 0, True), b"?"])
            assert [r.rid for r in await client.poll(5)] == ["other"]
            assert client.stale == 3
            # A final reply ends what the client remembers: a later reply of that id is unclaimed.
            await push.send_multipart([wire.encode_out("f", 0, True), b"reused elsewhere"])
            assert [r.rid for r in await client.poll(5)] == ["f"]

    asyncio.run(main())


def test_async_client_bounds_the_replies_a_stream_holds_unread(tmp_path):
    """A stream left unread ends ``client_too_slow`` at its bound: the replies it held are
    dropped, its request is aborted and counted; a stream that is read is not touched."""

    async def main():
        async with async_client_rig(tmp_path, max_unread_replies=3) as (actx, ingress, client, push):
            unread = await client.submit("u", num_tokens=1)
            read = await client.submit("r", num_tokens=1)
            await ingress.recv_multipart()
            await ingress.recv_multipart()
            push.connect(client.reply_endpoint)
            for i in range(5):
                await push.send_multipart([wire.encode_out("u", 0, False), b"%d" % i])
                await push.send_multipart([wire.encode_out("r", 0, i == 4), b"%d" % i])
                assert (await read.next(5)).payload == b"%d" % i
            abort = wire.decode_ctl((await asyncio.wait_for(ingress.recv_multipart(), 5))[0])
            assert wire.abort_target(abort) == ("u", client.reply_endpoint)
            assert wire.abort_reason(abort) == wire.ABORT_TOO_SLOW
            assert [(r.kind, r.code) for r in await unread.collect(5)] == [("fail", "client_too_slow")]
            assert (client.too_slow, client.unread_peak, client.pending) == (1, 3, set())
            with pytest.raises(ValueError, match="max_unread_replies"):
                AsyncClient(client.ingress, zmq_ctx=actx, max_unread_replies=0)

    asyncio.run(main())


def test_endpoint_checks(tmp_path):
    from dpcore.errors import ConfigError

    with pytest.raises(ConfigError, match="expected ipc"):
        endpoints.check("http://x")
    with pytest.raises(ConfigError, match="ipc path longer"):
        endpoints.check("ipc:///" + "a" * 200)
    ep, d = endpoints.reply_endpoint_like("ipc:///tmp/x")
    assert ep.startswith("ipc://") and d is not None
    endpoints.remove_run_dir(d)
    assert endpoints.reply_endpoint_like("tcp://127.0.0.1:5")[0] == "tcp://127.0.0.1:*"


def _drain_reports(fake, worker, until):
    """Reports until *until(report, done)* holds (the worker heartbeats every 50 ms)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        worker.recv(0.05)
        try:
            report, done, *_ = wire.decode_load(fake.reports.recv(zmq.NOBLOCK))
        except zmq.Again:
            continue
        if until(report, done):
            return report, done
    raise AssertionError("no such report within 5 s")


def test_abort_drops_a_dispatch_not_yet_handed_out_and_closes_its_books(ctx, fake):
    with Client(fake.ingress_ep, zmq_ctx=ctx) as client, Worker(
        0, dispatch_endpoint=fake.dispatch_ep, report_endpoint=fake.report_ep, zmq_ctx=ctx, heartbeat_interval_s=0.05
    ) as worker:
        client.submit("gone", token_ids=[1, 2, 3])
        client.submit("kept", token_ids=[1, 2, 3])
        gone = fake.ingress.recv_multipart()
        kept = fake.ingress.recv_multipart()
        # The abort comes before the dispatch (the controller forwards both in order of arrival).
        fake.dispatch.send(wire.encode_abort("gone", client.reply_endpoint))
        fake.dispatch.send_multipart(wire.dispatch_frames(0, 0, gone[0], gone[1]))
        fake.dispatch.send_multipart(wire.dispatch_frames(0, 1, kept[0], kept[1]))
        works = []
        deadline = time.monotonic() + 5
        while not works and time.monotonic() < deadline:
            works = worker.recv(0.1)
        assert [w.rid for w in works] == ["kept"]
        assert worker.aborted == 1
        # The aborted dispatch is acknowledged and done: the controller stops counting it.
        _drain_reports(fake, worker, lambda r, done: 0 in done and r.acked_seq >= 0)


def test_abort_of_a_running_request_reaches_the_engine(ctx, fake):
    stopped = []
    with Client(fake.ingress_ep, zmq_ctx=ctx) as client, Worker(
        0, dispatch_endpoint=fake.dispatch_ep, report_endpoint=fake.report_ep, zmq_ctx=ctx, on_abort=stopped.append
    ) as worker:
        client.submit("r", token_ids=[1, 2, 3])
        fake.forward(0, 0)
        works = []
        deadline = time.monotonic() + 5
        while not works and time.monotonic() < deadline:
            works = worker.recv(0.1)
        (work,) = works
        # Another sender's request of the same id is not this one.
        fake.dispatch.send(wire.encode_abort("r", "ipc:///tmp/someone-else"))
        fake.dispatch.send(wire.encode_abort("r", client.reply_endpoint))
        while not stopped and time.monotonic() < deadline:
            worker.recv(0.1)
        assert stopped == [work]
        assert worker.aborted == 1


def test_worker_reports_stay_inside_the_wire_ranges(ctx, fake):
    with Worker(0, dispatch_endpoint=fake.dispatch_ep, report_endpoint=fake.report_ep, zmq_ctx=ctx) as worker:
        fake.report()  # the hello
        # An engine whose token sum went past 2**64 must not take the worker (or the rank) down.
        assert worker.report(3, 1, 1 << 70, kv_used=-5, kv_capacity=float("nan"))
        report, *_ = fake.report()
        assert (report.num_running, report.num_waiting) == (3, 1)
        assert (report.num_tokens, report.kv_used) == (wire.MAX_REPORT_TOKENS, 0)
        assert report.kv_capacity == 0
        assert worker.clamped_reports == 1
