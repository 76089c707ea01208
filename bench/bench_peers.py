#!/usr/bin/env python3
"""omk_llm against the other ways to drive Kimi CLI from a script, on the same real Kimi
CLI (peers/kimi_echo.py: kimi-cli 1.52.0, offline echo provider) in the same run.

    python bench/bench_peers.py            # the full run: 10 alternating runs (about 5 minutes)
    python bench/bench_peers.py --quick    # one small run: only checks that it all runs

The clients, each installed into a temporary folder, never into the project:
- bare Python: raw pipes, os.read, split lines, json.loads each line (the least a client
  can do; bench_omk_llm.ReferenceClient);
- omk_llm, with tiktoken and its vocabulary, and without tiktoken (its import blocked);
- the official Node SDK, @moonshot-ai/kimi-agent-sdk (npm), when node and npm are here (it
  starts its agent with its first prompt, so its "first prompt" is its second);
- the Python SDK, kimi-agent-sdk (PyPI), which runs the agent inside the caller's process
  and asyncio loop. Its pins ask for kimi-cli 1.12 and its Session.create() fails on 1.52,
  so it is installed without its dependencies, and its Session is built from
  KimiCLI.create() by hand.

Each run of each client is a new process with a new agent: the agent is started before
the clock, then one prompt (the first round trip), PROMPTS prompts one after another
(each its own wall time and the client's CPU), and one answer streamed in EVENTS events.
Every prompt carries a usage line, as a real model's answer does (the echo provider
reports none otherwise), and the client's own limits are set wide (max_tokens 10**7).
Figures are medians over the runs with min and max; the runs alternate the clients, so
a slow moment of the machine falls on all of them. The agent's CPU and peak memory come
from /proc; for the in-process SDK they are part of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "peers"))
import kimi_echo  # noqa: E402

NODE_SDK = "@moonshot-ai/kimi-agent-sdk@0.1.8"
PYTHON_SDK = "kimi-agent-sdk==0.0.5"
USAGE = 'usage: {"input_other": 10, "output": 2}'

# What every probe shares: the agent's CPU seconds and peak memory, read from /proc by the
# pid its wrapper script wrote.
PYTHON_COMMON = r"""
import json, os, resource, sys, time
def agent_cpu(pid):
    if pid is None:
        return 0.0
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
def agent_peak_mib(pid):
    if pid is None:
        return 0.0
    status = open(f"/proc/{pid}/status").read()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024
def agent_pid():
    path = os.environ.get("BENCH_PIDFILE")
    if not path:
        return None
    for _ in range(500):
        if os.path.exists(path) and open(path).read().strip():
            return int(open(path).read())
        time.sleep(0.01)
    return None
def measure(ask, prompts, events, usage):
    started = time.perf_counter()
    assert ask(f"text: first\n{usage}") == "first"
    first = time.perf_counter() - started
    pid = agent_pid()
    agent0, cpu0 = agent_cpu(pid), time.process_time()
    walls = []
    for i in range(prompts):
        started = time.perf_counter()
        assert ask(f"text: pong {i}\n{usage}") == f"pong {i}"
        walls.append(time.perf_counter() - started)
    cpu1, agent1 = time.process_time(), agent_cpu(pid)
    stream = "\n".join(f"text: {i:06d}xxxxxxxxxx" for i in range(events)) + "\n" + usage
    assert len(ask(stream)) == events * 16
    cpu2, agent2 = time.process_time(), agent_cpu(pid)
    return {
        "first_ms": first * 1e3,
        "prompt_ms": sorted(walls)[len(walls) // 2] * 1e3,
        "cpu_prompt_ms": (cpu1 - cpu0) / prompts * 1e3,
        "cpu_event_us": (cpu2 - cpu1) / events * 1e6,
        "agent_cpu_prompt_ms": (agent1 - agent0) / prompts * 1e3,
        "agent_cpu_event_us": (agent2 - agent1) / events * 1e6,
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "agent_peak_mib": agent_peak_mib(pid),
    }
"""

BARE = PYTHON_COMMON + r"""
sys.path.insert(0, sys.argv[1])
from bench_omk_llm import ReferenceClient
argv, env, prompts, events = json.loads(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
client = ReferenceClient(argv, env)
print(json.dumps(measure(client.prompt, prompts, events, sys.argv[6])))
client.close()
"""

OMK_LLM = PYTHON_COMMON + r"""
if sys.argv[7] == "no-tiktoken":
    sys.modules["tiktoken"] = None  # as if it were not installed
sys.path.insert(0, sys.argv[1])
import omk_llm
argv, env, prompts, events = json.loads(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
config = omk_llm.LlmClientConfig(model="kimi-k2", timeout=600, max_tokens=10**7)
if sys.argv[8] == "acp":
    client = omk_llm.AcpLlmClient(omk_llm.AcpStdio(argv, env=env, startup_timeout=60), config)
else:
    client = omk_llm.WireLlmClient(omk_llm.StdioWire(argv, env=env, startup_timeout=60), config)
client.transport.start()
chat = client.conversation()  # history kept, as every other client here keeps it
if sys.argv[8] == "acp":  # its session is opened with the agent, before the clock (Kimi's first takes ~0.9 s)
    chat._context.session, chat._context.generation = client.transport.new_session(), client.transport.generation
budget = omk_llm.TokenBudget(10**12)
print(json.dumps(measure(lambda prompt: chat.complete(prompt, budget).content, prompts, events, sys.argv[6])))
client.close()
"""

PYTHON_SDK_PROBE = PYTHON_COMMON + r"""
import asyncio
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import kimi_agent_sdk
from kaos.path import KaosPath
from kimi_cli.app import KimiCLI
from kimi_cli.session import Session as CliSession
config_file, work_dir, prompts, events = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
loop = asyncio.new_event_loop()
async def start():
    cli_session = await CliSession.create(KaosPath(work_dir))
    return kimi_agent_sdk.Session(await KimiCLI.create(cli_session, config=Path(config_file)))
session = loop.run_until_complete(start())
async def answer(prompt):
    parts = []
    async for message in session.prompt(prompt):
        if type(message).__name__ == "TextPart":
            parts.append(message.text)
    return "".join(parts)
print(json.dumps(measure(lambda prompt: loop.run_until_complete(answer(prompt)), prompts, events, sys.argv[6])))
"""

NODE_PROBE = r"""
import { createSession } from '@moonshot-ai/kimi-agent-sdk';
import fs from 'node:fs';
const [executable, envJson, workDir, promptsArg, eventsArg, usage] = process.argv.slice(2);
const prompts = Number(promptsArg), events = Number(eventsArg);
const session = createSession({ workDir, executable, env: JSON.parse(envJson), thinking: false });
const cpu = () => { const u = process.cpuUsage(); return (u.user + u.system) / 1e6; };
const tick = 100;  // USER_HZ, as sysconf(_SC_CLK_TCK) gives on Linux
const agentPid = () => Number(fs.readFileSync(process.env.BENCH_PIDFILE, 'utf8'));
const agentCpu = (pid) => {
  const fields = fs.readFileSync(`/proc/${pid}/stat`, 'utf8').split(')').pop().trim().split(/\s+/);
  return (Number(fields[11]) + Number(fields[12])) / tick;
};
const agentPeak = (pid) => Number(fs.readFileSync(`/proc/${pid}/status`, 'utf8').split('VmHWM:')[1].trim().split(/\s+/)[0]) / 1024;
async function ask(prompt) {
  const turn = session.prompt(prompt);
  let text = '';
  for await (const event of turn) {
    if (event.type === 'ContentPart' && event.payload.type === 'text') text += event.payload.text;
  }
  return text;
}
await ask(`text: start\n${usage}`);  // the SDK starts its agent with the first prompt
let started = performance.now();
if (await ask(`text: first\n${usage}`) !== 'first') throw new Error('first');
const first = performance.now() - started;
const pid = agentPid();
const agent0 = agentCpu(pid), cpu0 = cpu();
const walls = [];
for (let i = 0; i < prompts; i++) {
  started = performance.now();
  if (await ask(`text: pong ${i}\n${usage}`) !== `pong ${i}`) throw new Error('pong');
  walls.push(performance.now() - started);
}
const cpu1 = cpu(), agent1 = agentCpu(pid);
const lines = [];
for (let i = 0; i < events; i++) lines.push(`text: ${String(i).padStart(6, '0')}xxxxxxxxxx`);
if ((await ask(lines.join('\n') + '\n' + usage)).length !== events * 16) throw new Error('stream');
const cpu2 = cpu(), agent2 = agentCpu(pid);
walls.sort((a, b) => a - b);
console.log(JSON.stringify({
  first_ms: first, prompt_ms: walls[Math.floor(walls.length / 2)],
  cpu_prompt_ms: (cpu1 - cpu0) / prompts * 1e3, cpu_event_us: (cpu2 - cpu1) / events * 1e6,
  agent_cpu_prompt_ms: (agent1 - agent0) / prompts * 1e3, agent_cpu_event_us: (agent2 - agent1) / events * 1e6,
  peak_mib: process.resourceUsage().maxRSS / 1024, agent_peak_mib: agentPeak(pid),
}));
await session.close();
"""

WRAPPER = """#!/bin/sh
# The agent, started as the Node SDK starts its `kimi`: it writes its pid for the probe.
echo $$ > "$BENCH_PIDFILE"
exec {python} -m kimi_cli.cli --config-file {config} "$@"
"""


def install_node_sdk(folder: Path) -> Optional[Path]:
    if not (shutil.which("node") and shutil.which("npm")):
        return None
    node = folder / "node"
    node.mkdir()
    (node / "package.json").write_text('{"type": "module", "private": true}')
    subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund", NODE_SDK], cwd=node, check=True,
                   stdout=subprocess.DEVNULL)
    (node / "probe.mjs").write_text(NODE_PROBE)
    return node


def install_python_sdk(folder: Path, python: Path) -> Path:
    target = folder / "kimi-agent-sdk"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
                    "--target", str(target), PYTHON_SDK], check=True, stdout=subprocess.DEVNULL)
    return target


def run_probe(argv: List[str], env: Dict[str, str], pidfile: Path) -> Dict[str, float]:
    pidfile.write_text("")
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{argv[:3]} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def spread(values: List[float], digits: int) -> str:
    median = statistics.median(values)
    if len(values) == 1:
        return f"{median:.{digits}f}"
    return f"{median:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one small run, to check that it runs")
    quick = parser.parse_args().quick
    runs, prompts, events = (1, 10, 1000) if quick else (10, 200, 20_000)
    python = kimi_echo.ensure_installed(quiet=True)  # kimi-cli 1.52.0 on Python 3.12+, with tiktoken
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        argv, env = kimi_echo.peer_command("wire", folder / "home")
        config_file, work_dir = argv[argv.index("--config-file") + 1], argv[argv.index("--work-dir") + 1]
        config = Path(config_file)  # room for the long answer's prompt (Kimi would compact it away)
        config.write_text(config.read_text().replace("max_context_size = 100000", "max_context_size = 10000000"))
        wrapper = folder / "kimi"
        wrapper.write_text(WRAPPER.format(python=python, config=config_file))
        wrapper.chmod(0o755)
        agent = [str(wrapper), "--wire", "--work-dir", work_dir]
        wrapper_acp = folder / "kimi-acp"
        wrapper_acp.write_text(WRAPPER.format(python=python, config=config_file).replace(
            f'--config-file {config_file} "$@"', "acp"))
        wrapper_acp.chmod(0o755)
        agent_acp = [str(wrapper_acp)]
        pidfile = folder / "agent.pid"
        env = {**os.environ, **env, "BENCH_PIDFILE": str(pidfile)}
        common = [json.dumps(agent), json.dumps(env), str(prompts), str(events), USAGE]
        probes: Dict[str, List[str]] = {
            "bare Python": [str(python), "-c", BARE, str(ROOT / "bench"), *common],
            "omk_llm, tiktoken": [str(python), "-c", OMK_LLM, str(ROOT), *common, "tiktoken", "wire"],
            "omk_llm, no tiktoken": [str(python), "-c", OMK_LLM, str(ROOT), *common, "no-tiktoken", "wire"],
            # ACP carries no usage here: every prompt and answer is counted, the vocabulary
            # loaded while the agent starts
            "omk_llm over ACP, tiktoken": [str(python), "-c", OMK_LLM, str(ROOT), json.dumps(agent_acp),
                                           *common[1:], "tiktoken", "acp"],
        }
        node = install_node_sdk(folder)
        if node is not None:
            probes["Node SDK 0.1.8"] = ["node", str(node / "probe.mjs"), str(wrapper), json.dumps(env), work_dir,
                                        str(prompts), str(events), USAGE]
        sdk = install_python_sdk(folder, python)
        probes["kimi-agent-sdk 0.0.5 (in-process)"] = [str(python), "-c", PYTHON_SDK_PROBE, str(sdk), config_file,
                                                        work_dir, str(prompts), str(events), USAGE]
        results: Dict[str, List[Dict[str, float]]] = {name: [] for name in probes}
        for _ in range(runs):
            for name, probe in probes.items():
                results[name].append(run_probe(probe, env, pidfile))
    report(results, runs, prompts, events, node is not None)


def report(results: Dict[str, List[Dict[str, float]]], runs: int, prompts: int, events: int, node: bool) -> None:
    print(f"omk_llm against the other clients of Kimi CLI {kimi_echo.PINNED} (wire, echo provider): "
          f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_implementation()} "
          f"{kimi_echo.venv_python().resolve().name}; medians of {runs} alternating run(s) (min-max), "
          f"{prompts} prompts and one {events:,}-event answer a run")
    if not node:
        print("(no node and npm here: the Node SDK is left out)")
    bare = results["bare Python"]

    def ratio(rows: List[Dict[str, float]], key: str) -> str:
        return f"{statistics.median(r[key] for r in rows) / statistics.median(b[key] for b in bare):.2f}x"

    def whole(row: Dict[str, float], cpu: str, agent: str) -> float:
        return row[cpu] + row[agent]

    columns = [
        ("client CPU/prompt, ms", "cpu_prompt_ms", 3),
        ("client CPU/event, us", "cpu_event_us", 2),
        ("client peak MiB", "peak_mib", 1),
        ("first prompt, ms", "first_ms", 1),
        ("per prompt, ms", "prompt_ms", 2),
    ]
    header = ["client"] + [title for title, _, _ in columns]
    header += ["first ÷ per prompt", "whole stack CPU/prompt, ms", "whole stack MiB"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, rows in results.items():
        cells = [name]
        for _, key, digits in columns:
            cells.append(f"{spread([r[key] for r in rows], digits)} [{ratio(rows, key)}]")
        cells.append(spread([r["first_ms"] / r["prompt_ms"] for r in rows], 2))
        stack_cpu = [whole(r, "cpu_prompt_ms", "agent_cpu_prompt_ms") for r in rows]
        stack_mem = [r["peak_mib"] + r["agent_peak_mib"] for r in rows]
        bare_cpu = statistics.median(whole(r, "cpu_prompt_ms", "agent_cpu_prompt_ms") for r in bare)
        bare_mem = statistics.median(r["peak_mib"] + r["agent_peak_mib"] for r in bare)
        cells.append(f"{spread(stack_cpu, 3)} [{statistics.median(stack_cpu) / bare_cpu:.2f}x]")
        cells.append(f"{spread(stack_mem, 1)} [{statistics.median(stack_mem) / bare_mem:.2f}x]")
        print("| " + " | ".join(cells) + " |")
    agent = [r["agent_cpu_prompt_ms"] for r in bare]
    print(f"The agent's own process (beside the bare reader): {spread(agent, 3)} ms CPU a prompt, "
          f"{spread([r['agent_cpu_event_us'] for r in bare], 2)} us an event, "
          f"{spread([r['agent_peak_mib'] for r in bare], 1)} MiB at peak. [x] is the ratio to bare Python.")


if __name__ == "__main__":
    main()
