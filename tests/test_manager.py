from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from dpcore import hookimpl
from dpcore.errors import (
    InactiveRankError,
    InvalidRankError,
    NoActiveRankError,
    NoRankSelectedError,
    PolicyDefinitionError,
    PolicyFailedError,
    PolicyOptionError,
)
from dpcore.testing import FakePolicy, PolicyHarness, make_request


class Recorder:
    """Answers a fixed rank and records every hook call."""

    name = "recorder"

    def __init__(self, ctx, rank=None):
        self.rank = rank
        self.calls: list[tuple] = []

    @hookimpl
    def select_rank(self, request, ctx):
        self.calls.append(("select", request.rid))
        return self.rank

    @hookimpl
    def on_dispatch(self, request, rank, ctx):
        self.calls.append(("dispatch", request.rid, rank))

    @hookimpl
    def on_load_report(self, report, ctx):
        self.calls.append(("report", report.rank))


def test_hook_select_rank_first_policy_in_chain_answers():
    class Two(Recorder):
        name = "two"

    h = PolicyHarness([("recorder", Recorder), ("two", Two)], dp_size=4, options={"two": {"rank": 3}})
    first, second = h.manager.policies["recorder"], h.manager.policies["two"]
    assert h.select(rid="a") == 3  # first returns None: falls through to the second
    assert first.calls[0] == ("select", "a") and second.calls[0] == ("select", "a")
    first.rank = 1
    assert h.select(rid="b") == 1
    assert ("select", "b") not in second.calls


def test_hook_on_dispatch_sees_router_assigned_requests():
    h = PolicyHarness(Recorder, dp_size=4, options={"rank": 0})
    h.select(rid="x", routed_dp_rank=2)
    rec = h.policy
    assert ("select", "x") not in rec.calls  # the core answered first
    assert ("dispatch", "x", 2) in rec.calls
    assert h.ledger.requests[2] == 1


def test_hook_on_load_report_only_for_applied_reports():
    h = PolicyHarness(Recorder, dp_size=2, options={"rank": 0})
    assert h.report(1, seq=3, num_running=2)
    assert not h.report(1, seq=2, num_running=5)  # older: dropped before the hook
    assert h.policy.calls == [("report", 1)]
    assert h.ledger.requests[1] == 2


def test_nobody_answers_is_a_clear_rejection():
    h = PolicyHarness(Recorder, dp_size=2)
    with pytest.raises(NoRankSelectedError, match="end the chain with a policy that always answers"):
        h.select(rid="r1")


def test_all_inactive_rejects_instead_of_looping():
    h = PolicyHarness(Recorder, dp_size=2)
    h.kill(0)
    h.kill(1)
    with pytest.raises(NoActiveRankError, match="all 2 ranks are inactive"):
        h.select()


@pytest.mark.parametrize(
    ("value", "error", "text"),
    [
        (4, InvalidRankError, r"routed_dp_rank=4 out of range \[0, 4\)"),
        (-1, InvalidRankError, "out of range"),
        ("1", InvalidRankError, "not an integer"),
        (1.0, InvalidRankError, "not an integer"),
        (True, InvalidRankError, "not an integer"),
        (2**70, InvalidRankError, "out of range"),
    ],
)
def test_bad_routed_rank_rejects_only_that_request(value, error, text):
    h = PolicyHarness(FakePolicy, dp_size=4, options={"rank": 1})
    with pytest.raises(error, match=text) as exc:
        h.select(rid="bad", routed_dp_rank=value)
    assert exc.value.rid == "bad"
    assert exc.value.code == "invalid_rank"
    assert h.select(rid="good") == 1


def test_routed_rank_to_inactive_rank():
    h = PolicyHarness(FakePolicy, dp_size=4)
    h.kill(3)
    with pytest.raises(InactiveRankError, match="inactive") as exc:
        h.select(routed_dp_rank=3)
    assert exc.value.http_status == 503


def test_deprecated_data_parallel_rank_is_honoured_with_a_warning():
    h = PolicyHarness(FakePolicy, dp_size=4, options={"rank": 0})
    with capture_logs() as logs:
        assert h.select(data_parallel_rank=3) == 3
        assert h.select(data_parallel_rank=2) == 2
    warnings = [e for e in logs if e["event"] == "deprecated_field"]
    assert len(warnings) == 1 and warnings[0]["use"] == "routed_dp_rank"
    # routed_dp_rank wins over the deprecated field
    assert h.select(routed_dp_rank=1, data_parallel_rank=2) == 1
    assert h.manager.last_decision.reason == "routed_dp_rank"


def test_policy_exception_fails_only_that_request():
    class Broken:
        name = "broken"

        def __init__(self, ctx):
            self.n = 0

        @hookimpl
        def select_rank(self, request):
            self.n += 1
            if self.n == 1:
                raise ZeroDivisionError("boom")
            return 0

    h = PolicyHarness(Broken, dp_size=2)
    with pytest.raises(PolicyFailedError, match="ZeroDivisionError"):
        h.select()
    assert h.select() == 0


@pytest.mark.parametrize("answer", [7, -1, "0", 0.0])
def test_policy_returning_a_non_rank_is_caught(answer):
    class Wrong:
        name = "wrong"

        def __init__(self, ctx):
            pass

        @hookimpl
        def select_rank(self):
            return answer

    h = PolicyHarness(Wrong, dp_size=2)
    with pytest.raises(PolicyFailedError, match="not an active rank"):
        h.select()


def test_policy_returning_inactive_rank_is_caught():
    h = PolicyHarness(FakePolicy, dp_size=2, options={"rank": 1})
    h.kill(1)
    with pytest.raises(PolicyFailedError):
        h.select()


def test_policy_without_hookimpl_is_a_definition_error():
    class Forgot:
        name = "forgot"

        def __init__(self, ctx):
            pass

        def select_rank(self, request, ctx):
            return 0

    with pytest.raises(PolicyDefinitionError, match="forget @dpcore.hookimpl"):
        PolicyHarness(Forgot)


def test_misspelled_hook_is_a_definition_error():
    class Typo:
        name = "typo"

        def __init__(self, ctx):
            pass

        @hookimpl
        def select_rank(self):
            return 0

        @hookimpl
        def on_dispach(self, request):
            pass

    with pytest.raises(PolicyDefinitionError, match="on_dispach"):
        PolicyHarness(Typo)


def test_unknown_option_names_what_the_policy_takes():
    with pytest.raises(PolicyOptionError, match="it takes: rank"):
        PolicyHarness(FakePolicy, options={"rnak": 1})


def test_on_dispatch_failure_does_not_lose_the_request():
    class BadObserver(FakePolicy):
        @hookimpl
        def on_dispatch(self, request):
            raise RuntimeError("observer bug")

    h = PolicyHarness(BadObserver, dp_size=2)
    with capture_logs() as logs:
        assert h.select() == 0
    assert h.ledger.requests[0] == 1
    assert any(e["event"] == "on_dispatch_failed" for e in logs)


def test_explain_records_policy_and_reason():
    h = PolicyHarness("round_robin", dp_size=2)
    h.select()
    assert (h.manager.last_decision.policy, h.manager.last_decision.reason) == ("round_robin", "next")
    h2 = PolicyHarness(FakePolicy, dp_size=2)  # a policy that does not explain itself
    h2.select()
    assert (h2.manager.last_decision.policy, h2.manager.last_decision.reason) == ("fake", "selected")
    h.select(routed_dp_rank=0)
    assert h.manager.last_decision.policy == "router"


def test_describe_lists_the_chain():
    h = PolicyHarness("auto", dp_size=2, disaggregation_mode="prefill")
    d = h.manager.describe()
    assert d["chain"] == ["follow_bootstrap_room"]
    assert d["policies"][0]["dist"] == "dp-bootstrap-room"
    assert "bootstrap_room % dp_size" in d["reason"]


def test_request_is_frozen():
    req = make_request(num_tokens=3)
    with pytest.raises(AttributeError):
        req.num_tokens = 5  # type: ignore[misc]


@pytest.fixture(params=[False, True], ids=["direct", "traced"])
def traced(request, monkeypatch):
    """Hooks called directly (the fast path), or through pluggy with hook tracing on."""
    if request.param:
        monkeypatch.setenv("DPCORE_TRACE_HOOKS", "1")
    else:
        monkeypatch.delenv("DPCORE_TRACE_HOOKS", raising=False)
    return request.param


def test_direct_calls_keep_pluggy_order_and_opt_in_arguments(traced):
    seen = []

    class First:
        name = "first"

        def __init__(self, ctx):
            pass

        @hookimpl
        def select_rank(self, ctx):  # opt-in: only ctx
            seen.append(("first", ctx.dp_size))
            return None

    class Last:
        name = "last"

        def __init__(self, ctx):
            pass

        @hookimpl(trylast=True)
        def select_rank(self):
            seen.append(("last",))
            return 1

        @hookimpl
        def on_dispatch(self, rank, request):  # any order of opt-in arguments
            seen.append(("dispatch", rank, request.rid))

    class Middle:
        name = "middle"

        def __init__(self, ctx):
            pass

        @hookimpl
        def select_rank(self, request, ctx):
            seen.append(("middle", request.rid))
            return None

    h = PolicyHarness([("last", Last), ("first", First), ("middle", Middle)], dp_size=3)
    assert (h.manager._select_calls is None) == traced
    assert h.select(rid="q") == 1
    # trylast runs last even though it is first in the chain; the others in chain order
    assert seen == [("first", 3), ("middle", "q"), ("last",), ("dispatch", 1, "q")]


class StateRecorder:
    name = "recorder"

    def __init__(self, ctx):
        self.events = []

    @hookimpl
    def select_rank(self, request, ctx):
        return ctx.active_ranks[0]

    @hookimpl
    def on_rank_state(self, rank, active, epoch, new_life, ctx):
        self.events.append((rank, active, epoch, new_life))


def test_hook_on_rank_state_fires_on_inactive_back_and_new_life():
    h = PolicyHarness(StateRecorder, dp_size=2)
    h.report(0, epoch=7)
    h.report(0, epoch=7)
    assert h.policy.events == []  # the first life and its reports are not changes
    h.kill(0)
    h.kill(0)  # already inactive: nothing new
    assert h.policy.events == [(0, False, 7, False)]
    h.report(0, epoch=7)  # same life, back
    assert h.policy.events[-1] == (0, True, 7, False)
    h.report(0, epoch=8)  # restarted while active
    assert h.policy.events[-1] == (0, True, 8, True)
    h.kill(0)
    h.report(0, epoch=9)  # restarted after it was missed: one event, a new life
    assert h.policy.events[-2:] == [(0, False, 8, False), (0, True, 9, True)]
    assert len(h.policy.events) == 5


def test_hook_on_rank_state_failure_is_logged_not_raised():
    class Broken(StateRecorder):
        @hookimpl
        def on_rank_state(self, rank, ctx):
            raise RuntimeError("boom")

    h = PolicyHarness(Broken, dp_size=2)
    h.kill(1)
    assert not h.ctx.is_active(1)
    assert h.select(num_tokens=1) == 0


# --------------------------------------------------------------------------- the policy contract


class SeqRecorder(FakePolicy):
    @hookimpl
    def on_dispatch(self, request, rank, seq):
        self.seen.append((request.rid, rank, seq))


def test_hook_on_dispatch_receives_the_dispatch_seq(traced):
    h = PolicyHarness(SeqRecorder, dp_size=2, options={"rank": 1})
    h.select(rid="a")
    h.select(rid="b", routed_dp_rank=0)
    h.select(rid="c")
    dispatched = [s for s in h.policy.seen if isinstance(s, tuple)]
    # per-rank sequences, the same numbers load reports acknowledge
    assert dispatched == [("a", 1, 0), ("b", 0, 0), ("c", 1, 1)]
    assert h.ledger.next_dispatch_seq(1) == 2


def test_policies_are_asked_only_when_a_rank_is_active():
    h = PolicyHarness(Recorder, dp_size=2, options={"rank": 0})
    h.kill(0)
    h.kill(1)
    with pytest.raises(NoActiveRankError, match="all 2 ranks are inactive"):
        h.select(rid="nobody")
    assert h.policy.calls == []  # the manager's one guard answered; the policy was not asked
    with pytest.raises(InactiveRankError):  # a routed request still gets the precise error
        h.select(routed_dp_rank=1)


def test_ctx_ledger_is_a_read_only_view():
    h = PolicyHarness(FakePolicy, dp_size=2)
    view = h.ctx.ledger
    assert view.requests == (0, 0)
    h.select()
    assert view.requests == (1, 0) and view.tokens == (0, 0)  # a fresh copy after each change
    with pytest.raises(TypeError):
        view.requests[0] = 5  # type: ignore[index]
    with pytest.raises(AttributeError):
        view.requests = (9, 9)  # type: ignore[misc]
    for mutator in ("record_dispatch", "apply_report", "set_active", "forget", "heard_from", "begin_life"):
        assert not hasattr(view, mutator)
    assert h.manager.ledger.requests == [1, 0]  # the manager keeps the ledger itself


def _policy(**hooks):
    """A policy class named 'bad' with *hooks* as its @hookimpl methods."""
    body = {"name": "bad", "__init__": lambda self, ctx: None}
    body.update({name: hookimpl(fn) for name, fn in hooks.items()})
    return type("Bad", (), body)


def _answer(self, request, ctx):
    return 0


@pytest.mark.parametrize(
    ("hooks", "text"),
    [
        (
            {"select_rank": lambda self, req, ctx: 0},
            "hook select_rank takes argument 'req', which dpcore does not pass; its arguments are: request, ctx",
        ),
        ({"select_rank": _answer, "on_dispatch": lambda self, request, rnak: None}, "hook on_dispatch takes argument 'rnak'"),
        ({"select_rank": lambda self, *args: 0}, "hook select_rank takes *args"),
        ({"select_rank": _answer, "select_rnk": _answer}, "dpcore has no hook 'select_rnk'"),
    ],
)
def test_bad_hook_signature_is_one_line_naming_hook_and_argument(hooks, text):
    with pytest.raises(PolicyDefinitionError) as exc:
        PolicyHarness(_policy(**hooks))
    msg = str(exc.value)
    assert text in msg and "\n" not in msg and "policy 'bad'" in msg


def test_pluggy_fast_path_is_checked_and_falls_back(monkeypatch):
    from dpcore import hookcalls, manager

    assert hookcalls.fast_path_ok()  # the pinned pluggy works as the fast path assumes
    assert PolicyHarness(SeqRecorder, dp_size=2).manager.fast_path
    monkeypatch.setattr(hookcalls, "fast_path_ok", lambda: False)
    monkeypatch.setattr(manager, "fast_path_ok", lambda: False)
    with capture_logs() as logs:
        h = PolicyHarness(SeqRecorder, dp_size=2, options={"rank": 1})
    assert not h.manager.fast_path
    assert any(e["event"] == "pluggy_fast_path_off" for e in logs)
    h.select(rid="a")
    assert h.policy.seen[-1] == ("a", 1, 0)  # same answers through pluggy's own path


def test_pluggy_fast_path_check_notices_a_pluggy_that_orders_differently(monkeypatch):
    """The start-up check itself, not a stand-in: a pluggy whose ``get_hookimpls`` lists
    implementations in another order than it calls them turns the fast path off."""
    import pluggy

    from dpcore import hookcalls

    listed = pluggy.HookCaller.get_hookimpls
    monkeypatch.setattr(pluggy.HookCaller, "get_hookimpls", lambda self: list(reversed(listed(self))))
    hookcalls.fast_path_ok.cache_clear()
    try:
        assert not hookcalls.fast_path_ok()
        assert not PolicyHarness(SeqRecorder, dp_size=2).manager.fast_path
    finally:
        monkeypatch.undo()
        hookcalls.fast_path_ok.cache_clear()
    assert hookcalls.fast_path_ok()


def test_policy_declarations_options_and_capabilities():
    from dpcore.policy import NEEDS_BLOCK_HASHES, Option, capabilities, options

    assert options(FakePolicy) == (Option("rank", "int | None", 0),)
    assert capabilities(FakePolicy) == frozenset()

    class Hashes(FakePolicy):
        capabilities = frozenset({NEEDS_BLOCK_HASHES})

    class Unknown(FakePolicy):
        capabilities = frozenset({"reads_minds"})

    assert PolicyHarness(Hashes).manager.needs_block_hashes
    assert not PolicyHarness(FakePolicy).manager.needs_block_hashes
    with pytest.raises(PolicyDefinitionError, match="unknown capabilities \\['reads_minds'\\]"):
        PolicyHarness(Unknown)
