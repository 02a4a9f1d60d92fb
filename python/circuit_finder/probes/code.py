"""code probe: small Python functions written by the model, scored by running unit tests.

60 tasks written for this project (``data/code_tasks.json``: signature, description, 4-6 assert
tests and a reference solution each). The model is asked for the function in a ```python block;
``extract_code`` takes the block that defines the function (or, without fences, the text from the
first ``def``/``import``). The score is the share of the task's tests that pass (0-100), run by
``sandbox.run_tests`` in a separate locked-down process with a timeout — never in the sweep's own
process. ``parsed`` is true when the extracted code compiles and defines the function.

Splits: of the first 30 tasks, 20 are searched and 10 held out (every third); tasks 31-60 are held
out too, so validation has 40 tasks. Generate mode only (there are no choices to rank).

Limits: each completion costs one child Python process (~20 ms plus the tests' time).
"""

from __future__ import annotations

import ast
import json
import re
from importlib import resources

from .base import Item, ItemProbe
from .sandbox import run_tests
from .scoring import strip_thinking

__all__ = ["CodeProbe", "extract_code", "load_code_items"]

DATA_FILE = "data/code_tasks.json"
# a fenced block with its info string ("python", "bash", none...); an unclosed fence runs to the end
_FENCE = re.compile(r"```[ \t]*([^\n`]*)\n(.*?)(?:```|\Z)", re.DOTALL)
_PYTHON = ("", "python", "python3", "py")


def extract_code(completion: str, entry_point: str = "") -> str:
    """The code in a completion: the last fenced block defining ``entry_point`` (else the last fenced
    block; an unclosed fence runs to the end), or without fences the text from the first line that
    starts with ``def``/``import``/``from``/``class``. Thinking blocks are stripped first."""
    text = strip_thinking(completion) if isinstance(completion, str) else ""
    fenced = _FENCE.findall(text)
    blocks = [b for lang, b in fenced if lang.strip().split(" ")[0].lower() in _PYTHON]  # not ```bash / ```text
    if blocks:
        defining = [b for b in blocks if re.search(rf"^\s*def\s+{re.escape(entry_point)}\b", b, re.MULTILINE)]
        return (defining or blocks)[-1].strip("\n")
    text = _FENCE.sub("", text)  # (only other languages' blocks: the code, if any, is outside them)
    m = re.search(r"^(?:def|import|from|class)\b", text, re.MULTILINE)
    return _without_trailing_prose(text[m.start():].strip("\n")) if m else ""


def _without_trailing_prose(code: str) -> str:
    """Unfenced code followed by prose ("def f(): ...\n\nThis adds two numbers."): the longest run
    of its first lines that parses as Python (all of it when none does: the syntax error then shows)."""
    lines = code.split("\n")
    for end in range(len(lines), 0, -1):
        try:
            ast.parse("\n".join(lines[:end]))
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            continue
        return "\n".join(lines[:end]).rstrip("\n")
    return code


def defines(code: str, entry_point: str) -> bool:
    """Whether code parses and defines a function named entry_point at top level (not run)."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == entry_point for n in tree.body)


def _prompt(task: dict) -> str:
    return (f"Write a Python function with this signature:\n\n{task['signature']}\n\n{task['description']}\n"
            f"Reply with only the complete function in a ```python code block.")


def load_code_items() -> list[Item]:
    text = resources.files(__package__).joinpath(DATA_FILE).read_text(encoding="utf-8")
    items = []
    for n, task in enumerate(json.loads(text)):
        missing = [k for k in ("id", "entry_point", "signature", "description", "tests") if k not in task]
        if missing:
            raise ValueError(f"{DATA_FILE}: task {n} lacks {', '.join(missing)}")
        items.append(Item(id=task["id"], prompt=_prompt(task), answer=task.get("reference", ""), scorer="code",
                          data={"entry_point": task["entry_point"], "tests": tuple(task["tests"])}))
    return items


class CodeProbe(ItemProbe):
    """Python functions scored by the share of unit tests passed in a sandboxed process."""

    modes = ("generate",)

    def __init__(self, timeout: float = 5.0, search_pool: int = 30):
        items = load_code_items()
        super().__init__("code", items[:search_pool], max_new_tokens=256, extra_validation=items[search_pool:])
        self.timeout = timeout

    def score(self, item: Item, completion: str) -> float:
        code = extract_code(completion, item.data["entry_point"])
        if not defines(code, item.data["entry_point"]):
            return 0.0
        return 100.0 * run_tests(code, list(item.data["tests"]), timeout=self.timeout).fraction

    def parsed(self, item: Item, completion: str) -> bool:
        return defines(extract_code(completion, item.data["entry_point"]), item.data["entry_point"])
