"""Build hook: the wheel ships omk_llm.py as the package omk_llm/__init__.py (with
__main__.py and py.typed beside it, from this folder). An editable install gets none of
it: its .pth puts the project folder on sys.path, so `import omk_llm` is the very file."""

from typing import Any, Dict

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class OneFileAsPackage(BuildHookInterface):  # type: ignore[misc]
    def initialize(self, version: str, build_data: Dict[str, Any]) -> None:
        if version == "standard":
            build_data["force_include"].update(
                {
                    "omk_llm.py": "omk_llm/__init__.py",
                    "packaging/__main__.py": "omk_llm/__main__.py",
                    "packaging/py.typed": "omk_llm/py.typed",
                }
            )
