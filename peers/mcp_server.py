#!/usr/bin/env python3
"""A small stdio MCP server for omk_llm's tests: the tools a user would give an agent.

It speaks the Model Context Protocol over stdin/stdout (JSON-RPC, one message a line) and
offers two tools: ``add`` (``a`` + ``b``) and ``note`` (writes ``text`` to the file named by
``$MCP_NOTE_FILE``, so a test can see that the agent really called it). Standard library
only.
"""

from __future__ import annotations

import json
import os
import sys

TOOLS = [
    {
        "name": "add",
        "description": "Add two numbers",
        "inputSchema": {
            "type": "object",
            "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
            "required": ["a", "b"],
        },
    },
    {
        "name": "note",
        "description": "Write a note to the note file",
        "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
    },
]


def call(name: str, arguments: dict) -> str:
    if name == "add":
        total = arguments["a"] + arguments["b"]
        return str(int(total) if float(total).is_integer() else total)
    if name == "note":
        with open(os.environ["MCP_NOTE_FILE"], "a", encoding="utf-8") as file:
            file.write(arguments["text"] + "\n")
        return "noted"
    raise KeyError(name)


def answer(message: dict) -> dict | None:
    method, request_id = message.get("method"), message.get("id")
    if request_id is None:
        return None  # a notification (notifications/initialized, ...)
    if method == "initialize":
        version = (message.get("params") or {}).get("protocolVersion", "2024-11-05")
        result = {
            "protocolVersion": version,
            "capabilities": {"tools": {}},
            "serverInfo": {"name": "omk-test-tools", "version": "1"},
        }
    elif method == "tools/list":
        result = {"tools": TOOLS}
    elif method == "tools/call":
        params = message.get("params") or {}
        try:
            text, failed = call(params.get("name", ""), params.get("arguments") or {}), False
        except Exception as err:  # the tool's error, as a tool result
            text, failed = f"{type(err).__name__}: {err}", True
        result = {"content": [{"type": "text", "text": text}], "isError": failed}
    elif method == "ping":
        result = {}
    else:
        error = {"code": -32601, "message": f"no method {method}"}
        return {"jsonrpc": "2.0", "id": request_id, "error": error}
    return {"jsonrpc": "2.0", "id": request_id, "result": result}


def main() -> None:
    for line in sys.stdin:
        if not line.strip():
            continue
        reply = answer(json.loads(line))
        if reply is not None:
            sys.stdout.write(json.dumps(reply) + "\n")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
