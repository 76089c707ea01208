#!/usr/bin/env python3
"""A scripted agent peer for omk_llm's tests and benchmarks.

It speaks the Kimi wire protocol (default) or ACP (``--acp``) on stdin/stdout, like the
real Kimi CLI does, and plays back each prompt as a small script, one command a line:

    text: X          a text chunk            think: X       a reasoning chunk
    usage: {...}     a wire token_usage      sleep: S       wait S seconds (cancel ends it)
    stall            wait until cancelled    deaf           ignore everything, forever
    flood            text until cancelled    flood-deaf     text forever, cancel or not
    events: N SIZE   N text chunks of SIZE bytes (words, then a newline), written fast
    die: CODE        exit at once            garbage        junk and unrelated lines
    split: X         a text chunk written a few bytes at a time
    longline: N      one line of N bytes     stderr: N      N bytes on stderr
    request: TYPE    ask the client, wait for the answer, then say it as text (wire:
                     "request: ToolCallRequest NAME {ARGS}" calls the client's tool NAME)
    error: CODE MSG  end with that JSON-RPC error
    status: S        end with that status (wire) or stopReason (ACP)
    grandchild       start a long sleep in the background and say its pid
    pid              say the peer's own process id
    pids             say " pid=P ppid=Q": its own and its parent's process ids
    nothing          end without a single update (ACP: a hidden provider error)
    forget           (ACP) lose the session, as an agent restarted behind a proxy would
    history          say (as JSON) the earlier prompts this context holds, as the model got them
    tool: NAME       start a tool call (wire ToolCall, ACP tool_call)
    tool-done: X     end that tool call with output X (wire ToolResult, ACP tool_call_update)
    plan: A=S;B=S    the to-do list, Kimi's way (wire: a ToolResult's todo display; ACP: plan);
                     S is pending, in_progress or done
    late: X          a text chunk sent just after the prompt's answer (as opencode does)
    acp-usage: {...} (ACP) the prompt answer's usage
    context: N       N tokens in the context, of 100000 (ACP usage_update, wire StatusUpdate)
    pause-input: S   stop reading input for S seconds once this prompt is read
    linger: S X      wait until cancelled, then S seconds more, then say X and end cancelled
    delayed-longline: S N   after S seconds (in the background) one line of N bytes
    nested: N        a line of JSON nested N levels deep
    raw-text: JSON   a text chunk whose JSON string is written as given (bad escapes too)
    unterminated     end the turn with an answer line without its newline, then exit
    close-stdin      close standard input and go on
    error-json: {...}  end with this JSON-RPC error object (data included)

Like Kimi, it keeps a history per context (the process over wire, each session over ACP)
and runs a prompt as a slash command when its text parts, joined with a space and
trimmed, start with /name and then white space or the end: /clear empties the history,
/yolo approves every later request itself, others are unknown. The model gets the parts
joined as they are.

Options: --acp, --old (wire: answer -32601 to initialize), --banner TEXT (print it and
exit 0, like kimi-cli 1.52.0's ``kimi`` script), --silent (answer nothing at all, a hung
agent), --legacy (wire: drop initialize unanswered and a cancel that carries params, as
kimi-cli 0.59-0.78 do),
--exit-after N (exit after N prompts), --startup-delay S, --auth-required (ACP),
--agent-name NAME (what initialize says the agent is; "Kimi Code CLI" acts as Kimi),
--persistent-always (ACP: name the allow_always option "Always allow", as agents that
save it do), --fail-first N (the first N prompts play, then fail with a provider error),
--ignore-eof (keep running after standard input closes, as a hung agent would),
--session-delay S (ACP: answer session/new after S seconds), --images (ACP: offer
promptCapabilities.image; images are said back as "saw MIME, N bytes"). Like Kimi's wire server, a
wire request whose id is not a string gets an invalid-request error naming no id.
"""

from __future__ import annotations

import json
import os
import queue
import re
import sys
import threading
import time

TYPE_CHECKING = False  # typing, uuid and subprocess are not imported: every test starts this
if TYPE_CHECKING:
    from typing import Any, Optional

OUT = sys.stdout.buffer
OUT_LOCK = threading.Lock()


def write_raw(data: bytes) -> None:
    with OUT_LOCK:
        OUT.write(data)
        OUT.flush()


def emit(obj: Any) -> None:
    write_raw(json.dumps(obj, ensure_ascii=False).encode() + b"\n")


class Peer:
    def __init__(self, opts: Options) -> None:
        self.acp = opts.acp
        self.opts = opts
        self.turn: Optional[threading.Thread] = None
        self.cancelled = threading.Event()
        self.answers: queue.Queue[Any] = queue.Queue()
        self.prompts = 0
        self.request_ids = iter(range(10**9))
        self.sessions = 0
        self.session: Optional[str] = None  # the session of the running turn
        self.known_sessions: set = set()
        self.failures_left = opts.fail_first
        self.histories: dict = {}  # context (session id, or None over wire) -> earlier prompts
        self.yolo = False

    # -- output in the protocol's shape --

    def event(self, kind: str, payload: Any) -> dict:
        if self.acp:
            return {
                "jsonrpc": "2.0",
                "method": "session/update",
                "params": {"sessionId": self.session, "update": payload},
            }
        return {"jsonrpc": "2.0", "method": "event", "params": {"type": kind, "payload": payload}}

    def text_event(self, text: str) -> dict:
        if self.acp:
            return self.event(
                "", {"sessionUpdate": "agent_message_chunk", "content": {"type": "text", "text": text}}
            )
        return self.event("ContentPart", {"type": "text", "text": text})

    def think_event(self, text: str) -> dict:
        if self.acp:
            return self.event(
                "", {"sessionUpdate": "agent_thought_chunk", "content": {"type": "text", "text": text}}
            )
        return self.event("ContentPart", {"type": "think", "think": text})

    def request(self, kind: str) -> Any:
        if self.acp:
            request_id: Any = next(self.request_ids)
            if kind == "permission":
                always = "Always allow" if self.opts.persistent_always else "Approve for this session"
                options = [
                    {"kind": "allow_once", "name": "Approve once", "optionId": "approve"},
                    {"kind": "allow_always", "name": always, "optionId": "approve_for_session"},
                    {"kind": "reject_once", "name": "Reject", "optionId": "reject"},
                ]
                params = {"sessionId": self.session, "options": options, "toolCall": {"toolCallId": "tc-1"}}
                emit(
                    {
                        "jsonrpc": "2.0",
                        "id": request_id,
                        "method": "session/request_permission",
                        "params": params,
                    }
                )
            else:
                emit(
                    {
                        "jsonrpc": "2.0",
                        "id": request_id,
                        "method": kind,
                        "params": {"sessionId": self.session},
                    }
                )
        else:
            import uuid

            request_id = str(uuid.uuid4())
            kind, _, call = kind.partition(" ")  # ToolCallRequest NAME ARGUMENTS: an external tool's call
            payload = {"id": request_id, "tool_call_id": "tc-1", "sender": "Shell", "action": "run command"}
            if call:
                name, _, arguments = call.partition(" ")
                payload.update(name=name, arguments=arguments)
            emit(
                {
                    "jsonrpc": "2.0",
                    "method": "request",
                    "id": request_id,
                    "params": {"type": kind, "payload": payload},
                }
            )
        return request_id

    def respond(self, request_id: Any, result: Any) -> None:
        emit({"jsonrpc": "2.0", "id": request_id, "result": result})

    def fail(self, request_id: Any, code: int, message: str) -> None:
        emit({"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message, "data": None}})

    def end(self, request_id: Any, status: str) -> None:
        late = [self.text_event(text) for text in self.late]
        if self.acp:
            acp_status = {"finished": "end_turn"}.get(status, status)
            result: dict = {"stopReason": acp_status}
            if self.acp_usage is not None:
                result["usage"] = self.acp_usage
            answer = {"jsonrpc": "2.0", "id": request_id, "result": result}
        else:
            emit(self.event("TurnEnd", {}))
            answer = {"jsonrpc": "2.0", "id": request_id, "result": {"status": status}}
        if self.unterminated:
            write_raw(json.dumps(answer).encode())
            os._exit(0)
        # the answer and what comes late after it in one write, as a fast agent would
        write_raw(b"".join(json.dumps(m, ensure_ascii=False).encode() + b"\n" for m in [answer, *late]))

    # -- the turn --

    def run_turn(self, request_id: Any, parts: list) -> None:
        self.late: list = []
        self.acp_usage: Any = None
        self.unterminated = False
        try:
            status = self.dispatch(parts)
        except Exception as err:  # a broken script is a test bug: say so loudly
            sys.stderr.write(f"fake peer: {err!r}\n")
            status = "error: -32603 fake peer broke"
        self.prompts += 1
        self.turn = None  # before the answer: the client may send its next prompt at once
        if status.startswith("error-json: "):
            emit({"jsonrpc": "2.0", "id": request_id, "error": json.loads(status[len("error-json: ") :])})
        elif status.startswith("error: "):
            code, _, message = status[len("error: ") :].partition(" ")
            self.fail(request_id, int(code), message)
        else:
            self.end(request_id, status)
        if self.opts.exit_after and self.prompts >= self.opts.exit_after:
            os._exit(0)

    def dispatch(self, parts: list) -> str:
        """A slash command, as Kimi finds one, or a prompt for the model."""
        if not self.acp:
            emit(self.event("TurnBegin", {"user_input": parts}))
        history = self.histories.setdefault(self.session if self.acp else None, [])
        command = re.match(r"^/([a-zA-Z0-9_-]+)(\s|$)", " ".join(parts).strip())
        if command:
            name = command.group(1)
            if name == "clear":
                history.clear()
                emit(self.text_event("The context has been cleared."))
            elif name == "yolo":
                self.yolo = True
                emit(self.text_event("You only live once! All actions will be auto-approved."))
            else:
                emit(self.text_event(f'Unknown slash command "/{name}".'))
            return "finished"
        script = "".join(parts)
        earlier = list(history)
        history.append(script)  # kept even when the turn fails, as Kimi does
        status = self.play(script, earlier)
        if self.failures_left and status == "finished":
            self.failures_left -= 1
            return f"error: {-32603 if self.acp else -32003} upstream 502"
        return status

    def play(self, script: str, history: list) -> str:
        if not self.acp:
            emit(self.event("StepBegin", {"n": 1}))
        for line in script.splitlines():
            command, _, arg = line.partition(":")
            command, arg = command.strip(), arg.strip()
            if command == "text":
                emit(self.text_event(arg))
            elif command == "think":
                emit(self.think_event(arg))
            elif command == "usage":
                emit(self.event("StatusUpdate", {"token_usage": json.loads(arg), "context_usage": None}))
            elif command == "sleep":
                if self.cancelled.wait(float(arg)):
                    return "cancelled"
            elif command == "stall":
                self.cancelled.wait()
                return "cancelled"
            elif command == "deaf":
                time.sleep(3600)
            elif command == "flood":
                while not self.cancelled.is_set():
                    emit(self.text_event("flood text " * 9))
                return "cancelled"
            elif command == "flood-deaf":
                while True:
                    emit(self.text_event("flood text " * 9))
            elif command == "events":
                count, size = (int(word) for word in arg.split())
                lorem = "lorem ipsum dolor sit amet, consectetur adipiscing elit "
                words = (lorem * (size // len(lorem) + 1))[: size - 1]
                line_bytes = json.dumps(self.text_event(words + "\n")).encode() + b"\n"
                batch = 4096
                for start in range(0, count, batch):
                    write_raw(line_bytes * min(batch, count - start))
            elif command == "die":
                os._exit(int(arg or 1))
            elif command == "garbage":
                for junk in (
                    b"not json at all",
                    b"{}",
                    b"[1, 2]",
                    b"   ",
                    b'{"jsonrpc": "2.0", "id": "zzz", "result": {}}',
                    b'{"jsonrpc": "2.0", "id": null, "error": {"code": -32700, "message": "Invalid JSON"}}',
                    b'{"jsonrpc": "2.0", "method": "event", "params": {"type": "Mystery", "payload": {}}}',
                    b'{"jsonrpc": "2.0", "method": "session/update", '
                    b'"params": {"sessionId": "other", "update": {}}}',
                ):
                    write_raw(junk + b"\n")
            elif command == "split":
                data = json.dumps(self.text_event(arg), ensure_ascii=False).encode() + b"\n"
                for start in range(0, len(data), 3):
                    write_raw(data[start : start + 3])
                    time.sleep(0.001)
            elif command == "longline":
                size = int(arg)
                chunk = b"a" * 65536
                for _ in range(size // len(chunk)):
                    write_raw(chunk)
                write_raw(b"a" * (size % len(chunk)) + b"\n")
            elif command == "stderr":
                size = int(arg)
                line_bytes = b"e" * 99 + b"\n"
                err = sys.stderr.buffer
                for _ in range(size // 100):
                    err.write(line_bytes)
                err.write(b"the last stderr line\n")
                err.flush()
            elif command == "history":
                emit(self.text_event(json.dumps(history)))
            elif command == "tool":
                if self.acp:
                    emit(self.event("", {"sessionUpdate": "tool_call", "toolCallId": "tc-1", "title": arg}))
                else:
                    function = {"name": arg, "arguments": "{}"}
                    emit(self.event("ToolCall", {"type": "function", "id": "tc-1", "function": function}))
            elif command == "late":
                self.late.append(arg)
            elif command == "acp-usage":
                self.acp_usage = json.loads(arg)
            elif command == "context" and self.acp:
                emit(self.event("", {"sessionUpdate": "usage_update", "used": int(arg), "size": 100000}))
            elif command == "context":
                emit(self.event("StatusUpdate", {"context_tokens": int(arg), "max_context_tokens": 100000}))
            elif command == "tool-done" and self.acp:
                content = [{"type": "content", "content": {"type": "text", "text": arg}}]
                update = {"sessionUpdate": "tool_call_update", "toolCallId": "tc-1", "status": "completed"}
                emit(self.event("", {**update, "content": content}))
            elif command == "tool-done":
                result = {"is_error": False, "output": arg, "message": "", "display": []}
                emit(self.event("ToolResult", {"tool_call_id": "tc-1", "return_value": result}))
            elif command == "plan":  # as Kimi does: its SetTodoList tool, then (ACP) the plan
                todos = [item.split("=", 1) for item in arg.split(";")]
                if self.acp:
                    call = {"toolCallId": "tc-todo", "title": "SetTodoList", "status": "in_progress"}
                    emit(self.event("", {"sessionUpdate": "tool_call", **call}))
                    text = [{"type": "content", "content": {"type": "text", "text": "Todo updated"}}]
                    update = {"toolCallId": "tc-todo", "status": "completed", "content": text}
                    emit(self.event("", {"sessionUpdate": "tool_call_update", **update}))
                    acp_status = {"done": "completed"}
                    entries = [
                        {"content": title, "priority": "medium", "status": acp_status.get(state, state)}
                        for title, state in todos
                    ]
                    emit(self.event("", {"sessionUpdate": "plan", "entries": entries}))
                else:
                    function = {"name": "SetTodoList", "arguments": "{}"}
                    emit(self.event("ToolCall", {"type": "function", "id": "tc-todo", "function": function}))
                    display = [{"type": "todo", "items": [{"title": t, "status": s} for t, s in todos]}]
                    result = {"is_error": False, "output": "", "message": "Todo updated", "display": display}
                    emit(self.event("ToolResult", {"tool_call_id": "tc-todo", "return_value": result}))
            elif command == "request" and self.yolo:
                emit(self.text_event(f"answered {arg}: yolo"))
            elif command == "request":
                request_id = self.request(arg)
                while True:
                    try:
                        answer = self.answers.get(timeout=0.05)
                    except queue.Empty:
                        if self.cancelled.is_set():
                            return "cancelled"
                        continue
                    if answer.get("id") == request_id:
                        break
                shown = answer.get("result", answer.get("error"))
                emit(self.text_event(f"answered {arg}: {json.dumps(shown, sort_keys=True)}"))
                if self.cancelled.is_set():
                    return "cancelled"
            elif command == "error":
                return "error: " + arg
            elif command == "error-json":
                return "error-json: " + arg
            elif command == "linger":
                delay, _, text = arg.partition(" ")
                self.cancelled.wait()
                time.sleep(float(delay))
                emit(self.text_event(text))
                return "cancelled"
            elif command == "delayed-longline":
                delay, size = arg.split()

                def later(delay: float = float(delay), size: int = int(size)) -> None:
                    time.sleep(delay)
                    write_raw(b"a" * size + b"\n")

                threading.Thread(target=later, daemon=True).start()
            elif command == "nested":
                depth = int(arg)
                write_raw(b"[" * depth + b"]" * depth + b"\n")
            elif command == "raw-text":
                line = json.dumps(self.text_event("@@"), ensure_ascii=False).replace('"@@"', arg)
                write_raw(line.encode() + b"\n")
            elif command == "unterminated":
                self.unterminated = True
            elif command == "close-stdin":
                pass  # done by the dispatcher, which reads the input
            elif command == "status":
                return arg
            elif command == "grandchild":
                import subprocess

                child = subprocess.Popen(["sleep", "300"])
                emit(self.text_event(str(child.pid)))
            elif command == "pid":
                emit(self.text_event(str(os.getpid())))
            elif command == "pids":
                emit(self.text_event(f" pid={os.getpid()} ppid={os.getppid()}"))
            elif command == "nothing":
                return "finished"
            elif command == "forget":
                self.known_sessions.discard(self.session)  # its next prompt meets "Session not found"
        return "finished"

    # -- the dispatcher --

    def handle(self, message: Any) -> None:
        method = message.get("method")
        request_id = message.get("id")
        params = message.get("params") or {}
        if self.opts.silent:
            return
        if self.opts.legacy and (method == "initialize" or (method == "cancel" and "params" in message)):
            return
        if not self.acp and method is not None and request_id is not None and not isinstance(request_id, str):
            invalid = {"code": -32600, "message": "Invalid request", "data": None}
            emit({"jsonrpc": "2.0", "id": None, "error": invalid})
            return
        if method is None:
            self.answers.put(message)
        elif method == "initialize":
            if self.opts.old:
                self.fail(request_id, -32601, "Unexpected method received: initialize")
            elif self.acp:
                self.respond(
                    request_id,
                    {
                        "protocolVersion": 1,
                        "agentInfo": {"name": self.opts.agent_name, "version": "0"},
                        "authMethods": [{"id": "login", "name": "Login", "description": "run fake login"}],
                        "agentCapabilities": {"promptCapabilities": {"image": self.opts.images}},
                    },
                )
            else:
                commands = [{"name": "clear", "description": "Clear the context", "aliases": ["reset"]}]
                self.respond(
                    request_id,
                    {
                        "protocol_version": "1.10",
                        "server": {"name": self.opts.agent_name, "version": "0"},
                        "slash_commands": commands,
                    },
                )
        elif method == "session/new":
            time.sleep(self.opts.session_delay)
            if self.opts.auth_required:
                self.fail(request_id, -32000, "Authentication required")
            else:
                self.sessions += 1
                self.session = f"s-{self.sessions}"
                self.known_sessions.add(self.session)
                self.respond(request_id, {"sessionId": self.session})
                # Kimi announces its slash commands just after answering session/new
                emit(self.event("", {"sessionUpdate": "available_commands_update", "availableCommands": []}))
        elif method in ("prompt", "session/prompt"):
            if self.turn is not None:
                self.fail(request_id, -32000, "An agent turn is already in progress")
                return
            if self.acp:
                if params.get("sessionId") not in self.known_sessions:
                    emit(
                        {
                            "jsonrpc": "2.0",
                            "id": request_id,
                            "error": {
                                "code": -32602,
                                "message": "Invalid params",
                                "data": {"session_id": "Session not found"},
                            },
                        }
                    )
                    return
                self.session = params["sessionId"]
                parts = [image_line(block) for block in params["prompt"]]
            else:
                user_input = params["user_input"]
                parts = [user_input] if isinstance(user_input, str) else [image_line(p) for p in user_input]
            self.cancelled.clear()
            self.turn = threading.Thread(target=self.run_turn, args=(request_id, parts), daemon=True)
            self.turn.start()
            pause = re.search(r"^pause-input: ([0-9.]+)$", "\n".join(parts), re.M)
            if pause:
                time.sleep(float(pause.group(1)))
            if re.search(r"^close-stdin$", "\n".join(parts), re.M):
                os.close(0)  # here, where the input is read: no read may hold it open
        elif method == "cancel":
            if self.turn is None:
                self.fail(request_id, -32000, "No agent turn is in progress")
            else:
                self.respond(request_id, {})
                self.cancelled.set()
        elif method == "session/cancel":
            self.cancelled.set()
        elif request_id is not None:
            self.fail(request_id, -32601, f"Unexpected method received: {method}")


def image_line(part: dict) -> str:
    """A prompt part's text; an image (ACP image block, wire image_url) becomes a line that
    says it back: "text: saw image/png, 67 bytes"."""
    if part.get("type") == "text":
        return part["text"]
    if part.get("type") == "image":
        mime, data = part["mimeType"], part["data"]
    else:
        mime, _, data = part["image_url"]["url"][len("data:") :].partition(";base64,")
    import base64

    return f"\ntext: saw {mime}, {len(base64.b64decode(data))} bytes\n"


# The options and their defaults (argparse is not imported: every test starts this peer)
FLAGS = ("acp", "old", "silent", "legacy", "ignore_eof", "auth_required", "persistent_always", "images")
VALUES = {"session_delay": 0.0, "banner": None, "exit_after": 0, "startup_delay": 0.0,
          "agent_name": "fake", "fail_first": 0}


class Options:
    def __init__(self, argv: list) -> None:
        for flag in FLAGS:
            setattr(self, flag, False)
        for name, default in VALUES.items():
            setattr(self, name, default)
        args = iter(argv)
        for arg in args:
            name = arg[2:].replace("-", "_")
            if not arg.startswith("--") or (name not in FLAGS and name not in VALUES):
                sys.exit(f"fake_peer: unknown option {arg!r}")
            if name in FLAGS:
                setattr(self, name, True)
                continue
            value = next(args, None)
            if value is None:
                sys.exit(f"fake_peer: {arg} needs a value")
            default = VALUES[name]
            typed = value if default is None or isinstance(default, str) else type(default)(value)
            setattr(self, name, typed)


def main() -> None:
    opts = Options(sys.argv[1:])
    if opts.banner:
        print(opts.banner)
        return
    time.sleep(opts.startup_delay)
    peer = Peer(opts)
    try:
        for raw in sys.stdin.buffer:
            try:
                message = json.loads(raw)
            except ValueError:
                if raw.strip() and not peer.acp:
                    peer.fail(None, -32700, "Invalid JSON format")
                continue
            peer.handle(message)
    except OSError:  # close-stdin: the turn goes on without input
        time.sleep(3600)
    if opts.ignore_eof:
        time.sleep(3600)
    os._exit(0)  # stdin closed: drop any pending answer, as the real peer does


if __name__ == "__main__":
    main()
