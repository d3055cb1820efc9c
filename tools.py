"""Tools the app runs for the model (`--tools PATH.py`, `--tools builtin`).

Every public top-level function of a tools file, with type hints and a Google-style
docstring, becomes a tool: its JSON schema (transformers' get_json_schema) goes to the
model through its chat template. `builtin` adds a calculator (arithmetic parsed, never
eval'd) and the current date and time. A tool runs in a thread of its own with a time limit;
an exception or a timeout becomes its result text ("error: ..."), never a crash.

    toolbox = Toolbox.load(["my_tools.py", "builtin"])    # ToolsError: one line
    toolbox.schemas                                       # GenerationSettings.tools
    result = toolbox.run("get_weather", {"city": "Paris"}, cancelled=event)
    result.text, result.seconds, result.failed
"""

from __future__ import annotations

import ast
import datetime
import importlib.util
import inspect
import json
import math
import operator
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers.utils import get_json_schema

from engine_contract import Signal, wait_for_either

MAX_RESULT_CHARS = 4000  # a longer result is cut: it goes into the model's context
MAX_ABANDONED_CALLS = 8  # tools that outlived their time limit and still run; beyond: refused
CALCULATOR_MAX_EXPONENT = 1000
CALCULATOR_MAX_DIGITS = 400     # integers stay below 10**this (big-int work holds the GIL)


class ToolsError(Exception):
    """A tools file can't be used. The message is one line, for the log."""


@dataclass
class ToolResult:
    text: str          # what the model reads (and the chat shows)
    seconds: float
    failed: bool       # an error, a timeout, an unknown tool
    images: list[bytes] = field(default_factory=list)  # pictures in an MCP tool's result


class Toolbox:
    def __init__(self, functions: dict, mcp=None):
        self.functions = dict(functions)
        self.mcp = mcp  # mcp_tools.McpServers (--mcp-config): their tools beside these
        self._abandoned: list[threading.Thread] = []  # calls past their limit, still running
        self._abandoned_lock = threading.Lock()
        self.schemas = []
        for name, function in self.functions.items():
            try:
                self.schemas.append(get_json_schema(function))
            except Exception as error:
                raise ToolsError(f"The tool {name}() needs type hints and a Google-style docstring "
                                 f"(with an Args: section for its parameters): {error}") from None

    @classmethod
    def load(cls, specs: list[str], mcp_config: str | None = None) -> "Toolbox":
        """`specs`: paths of tools files, or "builtin"; `mcp_config`: an mcpServers file
        (mcp_tools.McpConfigError: one line), whose servers start in the background: each
        one's tools join when it has listed them (`starting` until every one has)."""
        functions: dict = {}
        for spec in specs:
            found = builtin_tools() if spec == "builtin" else _functions_of(Path(spec).expanduser())
            for name, function in found.items():
                if name in functions:
                    raise ToolsError(f"Two tools are named {name} ({spec} and an earlier one).")
                functions[name] = function
        toolbox = cls(functions)
        if mcp_config:
            import mcp_tools
            toolbox.mcp = mcp_tools.McpServers.start(mcp_tools.read_config(mcp_config), reserved=set(functions))
        return toolbox

    @property
    def all_schemas(self) -> list[dict]:
        """What the model is shown: these tools', then the MCP servers'."""
        return self.schemas + (self.mcp.schemas() if self.mcp is not None else [])

    @property
    def starting(self) -> bool:
        """Is an MCP server still on its first start?"""
        return self.mcp is not None and self.mcp.starting

    @property
    def names(self) -> list[str]:
        return list(self.functions) + (list(self.mcp.names()) if self.mcp is not None else [])

    def where(self) -> list[str]:
        """The tools and where they came from, for the header and the log: the names of the
        file's and built-in tools, then "3 from MCP files", "MCP search is down (why)"."""
        lines = [", ".join(self.functions)] if self.functions else []
        for name, count, down in (self.mcp.status() if self.mcp is not None else []):
            lines.append(f"{count} from MCP {name}" if not down else f"MCP {name} is starting" if down == "starting"
                         else f"MCP {name} is down ({down})")
        return lines

    def close(self) -> None:
        if self.mcp is not None:
            self.mcp.close()

    def run(self, name: str, arguments: dict, timeout: float = 30.0,
            cancelled: Signal | None = None) -> ToolResult:
        """Call a tool in a thread of its own. Stop (`cancelled`) or the time limit stop the
        waiting; a tool's own thread can't be killed, so one that hangs is abandoned."""
        started = time.perf_counter()
        function = self.functions.get(name)
        if function is None and self.mcp is not None and name in self.mcp.names():
            result = self.mcp.call(name, arguments, timeout, cancelled)
            return ToolResult(_cut(result.text), time.perf_counter() - started, result.failed, result.images)
        if function is None:
            return ToolResult(f"error: there is no tool named {name!r} (the tools are: "
                              f"{', '.join(self.names) or 'none'})", 0.0, True)
        with self._abandoned_lock:
            self._abandoned = [thread for thread in self._abandoned if thread.is_alive()]
            if len(self._abandoned) >= MAX_ABANDONED_CALLS:
                return ToolResult(f"error: {len(self._abandoned)} earlier tool calls outlived their time limit "
                                  f"and still run; no new call starts until they end", 0.0, True)
        outcome: dict = {}

        def call():
            try:
                outcome["value"] = function(**arguments)
            except BaseException as error:  # the model reads it; the app goes on
                outcome["error"] = error
            finally:
                returned.set()
        returned = Signal()
        thread = threading.Thread(target=call, name=f"tool-{name}", daemon=True)
        thread.start()
        wait_for_either(returned, cancelled, timeout)  # no polling: whichever comes first
        if not returned.is_set() and cancelled is not None and cancelled.is_set():
            with self._abandoned_lock:
                self._abandoned.append(thread)
            return ToolResult("error: stopped by the user", time.perf_counter() - started, True)
        seconds = time.perf_counter() - started
        if not returned.is_set():
            with self._abandoned_lock:
                self._abandoned.append(thread)
            return ToolResult(f"error: {name} took longer than {timeout:g} s and was abandoned", seconds, True)
        if "error" in outcome:
            error = outcome["error"]
            return ToolResult(f"error: {type(error).__name__}: {error}", seconds, True)
        return ToolResult(_as_text(outcome.get("value")), seconds, False)


def _functions_of(path: Path) -> dict:
    if not path.is_file():
        raise ToolsError(f"--tools {path}: no such file (give a .py file, or 'builtin').")
    name = f"tools_file_{path.stem}_{abs(hash(str(path.resolve()))):x}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # (dataclasses and string annotations look their module up)
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[name]
        raise ToolsError(f"--tools {path}: the file fails to import: {type(error).__name__}: {error}") from None
    functions = {name: function for name, function in inspect.getmembers(module, inspect.isfunction)
                 if not name.startswith("_") and function.__module__ == module.__name__}
    if not functions:
        raise ToolsError(f"--tools {path}: no public function defined in it.")
    return functions


def _as_text(value) -> str:
    if isinstance(value, str):
        text = value
    else:
        try:
            text = json.dumps(value, ensure_ascii=False, default=str)
        except (TypeError, ValueError):
            text = str(value)
    return _cut(text)


def _cut(text: str) -> str:
    if len(text) > MAX_RESULT_CHARS:
        text = text[:MAX_RESULT_CHARS] + f"… (cut at {MAX_RESULT_CHARS} characters)"
    return text


# ---------------------------------------------------------------- the built-in tools

_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
              ast.USub: operator.neg, ast.UAdd: operator.pos}
_FUNCTIONS = {"sqrt": math.sqrt, "log": math.log, "log10": math.log10, "exp": math.exp, "sin": math.sin,
              "cos": math.cos, "tan": math.tan, "abs": abs, "round": round, "floor": math.floor, "ceil": math.ceil}
_CONSTANTS = {"pi": math.pi, "e": math.e}


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression exactly as written, e.g. "(2 + 3) * 4 ** 2 / 7".

    Args:
        expression: Numbers, + - * / // % ** and parentheses; sqrt, log, log10, exp, sin, cos,
            tan, abs, round, floor, ceil; pi and e.
    """
    try:
        tree = ast.parse(expression.replace("^", "**"), mode="eval")
    except SyntaxError:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from None
    value = _evaluate(tree.body)
    return str(int(value) if isinstance(value, float) and value.is_integer() and abs(value) < 1e15 else value)


def _evaluate(node):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and (abs(right) > CALCULATOR_MAX_EXPONENT or
                                             (isinstance(left, int) and isinstance(right, int) and right > 0 and
                                              abs(left) > 1 and right * math.log10(abs(left)) > CALCULATOR_MAX_DIGITS)):
            raise ValueError("the result would be too large")
        return _small(_OPERATORS[type(node.op)](left, right))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS \
            and not node.keywords:
        arguments = [_evaluate(arg) for arg in node.args]
        if node.func.id == "round" and len(arguments) > 1 and abs(arguments[1]) > 100:
            raise ValueError("round() keeps at most 100 digits")
        return _small(_FUNCTIONS[node.func.id](*arguments))
    raise ValueError(f"not allowed in a calculation: {ast.unparse(node)!r}")


def _small(value):
    """Every intermediate integer stays below 10**CALCULATOR_MAX_DIGITS: big-int arithmetic
    holds the interpreter lock, and the tools run in the web server's process."""
    if isinstance(value, int) and value.bit_length() > CALCULATOR_MAX_DIGITS * 3.33:
        raise ValueError("the result would be too large")
    return value


def current_time() -> str:
    """The current date and time on the server, with its time zone and the UTC time."""
    now = datetime.datetime.now().astimezone()
    return f"{now:%A %Y-%m-%d %H:%M:%S %Z (UTC%z)}; UTC: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M:%S}"


def builtin_tools() -> dict:
    return {"calculate": calculate, "current_time": current_time}
