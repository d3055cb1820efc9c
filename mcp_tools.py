"""Tools from MCP servers (`--mcp-config PATH`), in the file format LM Studio, Claude Desktop
and Cursor share:

    {"mcpServers": {
        "files": {"command": "npx", "args": ["-y", "@modelcontextprotocol/server-filesystem", "/tmp"],
                  "env": {"DEBUG": "0"}},
        "search": {"url": "https://example.com/mcp", "headers": {"Authorization": "Bearer ..."}}}}

A stdio server is started by the app (its `env` over the app's own; its stdout read here, a
line that isn't MCP logged once, then counted), a remote one reached over streamable HTTP;
both spoken to with the official `mcp` package's ClientSession, each kept open by one
background event loop. Their tools join the chat's tools (tools.Toolbox) under the names the servers give them,
prefixed by the server's name only where two collide.

    servers = McpServers.start(read_config("mcp.json"))  # McpConfigError: one line; starts them in the background
    servers.wait_started()   # (if you need them: until each has listed its tools or failed)
    servers.schemas()        # the tools, as the model is shown them
    servers.call("read_file", {"path": "/tmp/x"}, timeout=30, cancelled=signal)  # -> ToolCallResult
    servers.status()         # [(server, tools, why it is down or None)]
    servers.close()          # stdio servers stopped, whatever stage they are in (also at exit)

A server that fails to start or dies is one line in the log and a note in the header; its
tools answer with an error; the next call to one of them starts it again, at most once a
minute. A result's text goes to the model; its images too (a vision model sees them); other
kinds (audio, resources) are summarised as text.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import concurrent.futures
import contextlib
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from engine_contract import Signal, wait_for_either

log = logging.getLogger("mcp-tools")  # ("mcp" is the package's own loggers' parent)
PING_EVERY_S = 15.0         # an idle server is pinged this often: one that died is noticed, logged, shown

RESTART_AFTER_S = 60.0      # a server that is down is started again on a call, at most this often
START_TIMEOUT_S = 30.0      # to start (or reach) a server and list its tools
MAX_CONFIG_BYTES = 1 << 20
MAX_IMAGE_BYTES = 10 << 20  # an image in a tool's result larger than this is summarised, not shown
STOP_WAIT_S = 2.0           # a stdio server has this long to end once its stdin is closed, then SIGTERM, then SIGKILL
FLOOD_LINES = 1000          # past this many lines that aren't MCP, a stdio server's stdout is read slowly:
FLOOD_PAUSE_S = 0.05        # this long after each read that held no MCP message


class McpConfigError(ValueError):
    """The --mcp-config file can't be used: one line."""


@dataclass
class ServerConfig:
    name: str
    command: str | None = None
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    url: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class ToolCallResult:
    text: str
    images: list[bytes]   # PNG/JPEG/... bytes, as the server sent them
    failed: bool


def read_config(path: str | os.PathLike) -> list[ServerConfig]:
    """The servers of an `mcpServers` file. McpConfigError (one line) for anything else."""
    path = Path(path).expanduser()
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise McpConfigError(f"{path} is larger than {MAX_CONFIG_BYTES // 2**20} MB: not an MCP config.")
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise McpConfigError(f"Can't read the MCP config {path}: {error.strerror}.") from None
    except ValueError as error:
        raise McpConfigError(f"The MCP config {path} is not JSON: {error}.") from None
    servers = data.get("mcpServers") if isinstance(data, dict) else None
    if not isinstance(servers, dict):
        raise McpConfigError(f'The MCP config {path} has no "mcpServers" object.')
    configs = []
    for name, entry in servers.items():
        where = f'The MCP server "{name}" in {path}'
        if not isinstance(entry, dict):
            raise McpConfigError(f"{where} must be an object.")
        disabled = entry.get("disabled", False)
        if not isinstance(disabled, bool):
            raise McpConfigError(f'{where}: "disabled" must be true or false, not {_shown(disabled)}.')
        if disabled:
            continue
        command, url = entry.get("command"), entry.get("url", entry.get("serverUrl"))
        if isinstance(command, list):  # (a common mistake: the whole command line in "command")
            given = entry.get("args") if isinstance(entry.get("args"), list) else []
            raise McpConfigError(f'{where}: "command" is one program; put its arguments in "args" '
                                 f'("command": {_shown(command[0] if command else "")}, '
                                 f'"args": {_shown(command[1:] + given)}).')
        if command is not None and not (isinstance(command, str) and command.strip()):
            raise McpConfigError(f'{where}: "command" must be a program to start (a non-empty string), '
                                 f'not {_shown(command)}.')
        if url is not None and not isinstance(url, str):
            raise McpConfigError(f'{where}: "url" must be a string (an http(s) address), not {_shown(url)}.')
        if bool(command) == bool(url):
            raise McpConfigError(f'{where} needs either "command" (a program to start) or "url" (a server to reach).')
        args, env, headers = entry.get("args", []), entry.get("env", {}), entry.get("headers", {})
        if not (isinstance(args, list) and all(isinstance(a, str) for a in args)):
            raise McpConfigError(f'{where}: "args" must be a list of strings.')
        for key, value in (("env", env), ("headers", headers)):
            if not (isinstance(value, dict) and all(isinstance(v, str) for v in value.values())):
                raise McpConfigError(f'{where}: "{key}" must be an object of strings.')
        if url and not str(url).startswith(("http://", "https://")):
            raise McpConfigError(f'{where}: "url" must be an http(s) address.')
        configs.append(ServerConfig(str(name), command, args, env, url, headers))
    return configs


class _Server:
    """One server's connection, kept open by a task on the loop until it dies or is closed."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.session = None
        self.tools: list = []          # mcp.types.Tool, as listed
        self.error: str | None = None  # why it is down
        self.started_at = 0.0
        self.task: asyncio.Task | None = None
        self.ready: asyncio.Event | None = None
        self.closing: asyncio.Event | None = None
        self.restarting = threading.Lock()  # (one restart at a time; other servers' calls go on)
        self.process = None                 # a stdio server's process (anyio Process), until it has ended
        self.exit_status: int | None = None  # how this run's process ended, where it ended by itself
        self.not_mcp = 0                    # lines on this run's stdout that aren't MCP (logged: the first ever)
        self.not_mcp_logged = False

    @property
    def up(self) -> bool:
        return self.session is not None and self.error is None

    async def keep_open(self) -> None:
        from mcp import ClientSession
        ready, closing = self.ready, self.closing  # (this run's: a restart makes new ones)
        self.started_at, self.error, self.session = time.monotonic(), None, None
        self.exit_status, self.not_mcp = None, 0
        try:
            async with self._transport() as streams, ClientSession(streams[0], streams[1]) as session:
                await session.initialize()
                self.tools = (await session.list_tools()).tools
                self.session = session
                ready.set()
                log.info("MCP server %s is up: %d tool%s.", self.config.name, len(self.tools),
                         "s" * (len(self.tools) != 1))
                while not closing.is_set():  # (a server that dies while idle is noticed by its ping)
                    try:
                        await asyncio.wait_for(closing.wait(), PING_EVERY_S)
                    except asyncio.TimeoutError:
                        await asyncio.wait_for(session.send_ping(), PING_EVERY_S)
        except BaseException as error:  # (a failed start, a dead process, a cancelled task)
            if not closing.is_set():
                self.error = _exited(self.exit_status) if self.exit_status is not None and \
                    _lost_connection(_first(error)) else _reason(error)
                self.error += self.output_note()
                log.warning("MCP server %s is down: %s", self.config.name, self.error)
            if isinstance(error, asyncio.CancelledError):
                raise
        finally:
            if self.closing is closing:  # (still the current run)
                self.session = None
                if self.error is None and not closing.is_set():
                    self.error = "it stopped"
            ready.set()

    def output_note(self) -> str:
        """What a down server's reason adds when it wrote output that isn't MCP."""
        return f"; it wrote {self.not_mcp:,} line{'s' * (self.not_mcp != 1)} that aren't MCP to its stdout" \
            if self.not_mcp else ""

    def _transport(self):
        config = self.config
        if config.url:
            from mcp.client.streamable_http import streamablehttp_client
            return _first_two(streamablehttp_client(config.url, headers=config.headers or None))
        return self._stdio()

    @contextlib.asynccontextmanager
    async def _stdio(self):
        """The server's process, spoken to over its stdin and stdout: the mcp package's
        stdio_client, with the process in hand (McpServers.close kills one that is left,
        whatever it was doing; a down server says how it exited) and its stdout read here: a
        line that isn't MCP (a banner, a print) is one line in the log the first time, then
        only counted (the package logs a traceback for each, and a server that floods its
        stdout flooded the log), and a flood is read slowly, so it doesn't take a core."""
        import anyio
        from anyio.streams.text import TextReceiveStream
        from mcp.client.stdio import get_default_environment
        from mcp.shared.message import SessionMessage
        config = self.config
        errlog = _log_stream(config.name)
        try:
            process = await _spawn(config.command, config.args, {**get_default_environment(), **config.env}, errlog)
        finally:
            errlog.close()  # (the process has its own copy: the forwarding thread ends with it)
        self.process = process
        to_session, from_server = anyio.create_memory_object_stream(0)
        to_server, from_session = anyio.create_memory_object_stream(0)

        async def read():
            parts: list[str] = []
            try:
                async with to_session:
                    async for chunk in TextReceiveStream(process.stdout, errors="replace"):
                        if "\n" not in chunk:  # (a long message, in pieces)
                            parts.append(chunk)
                            continue
                        text = "".join(parts) + chunk
                        *lines, rest = text.split("\n")
                        parts, sent = [rest], False
                        if "{" not in text:  # (no message in it: only counted)
                            self._not_mcp([line for line in lines if line.strip()])
                        else:
                            for line in lines:
                                message = _message(line)
                                if message is not None:
                                    await to_session.send(SessionMessage(message))
                                    sent = True
                                elif line.strip():
                                    self._not_mcp([line])
                        if self.not_mcp > FLOOD_LINES and not sent:
                            await anyio.sleep(FLOOD_PAUSE_S)
                    with anyio.move_on_after(1):  # (stdout ended: the process did, or is about to)
                        self.exit_status = await process.wait()
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):  # (the session ended first)
                pass

        async def write():
            async with from_session:
                async for message in from_session:
                    data = message.message.model_dump_json(by_alias=True, exclude_none=True) + "\n"
                    try:
                        await process.stdin.send(data.encode())
                    except (anyio.ClosedResourceError, anyio.BrokenResourceError, OSError):
                        return  # (the process is gone: the session's next send fails)

        try:
            async with anyio.create_task_group() as group:
                group.start_soon(read)
                group.start_soon(write)
                try:
                    yield from_server, to_server
                finally:
                    with anyio.CancelScope(shield=True):
                        await _stop(process)
                    for stream in (to_session, from_server, to_server, from_session):
                        await stream.aclose()
        finally:
            if getattr(process, "returncode", None) is not None:
                self.process = None

    def _not_mcp(self, lines: list[str]) -> None:
        self.not_mcp += len(lines)
        if lines and not self.not_mcp_logged:  # (once per server: a restarted one counts, it doesn't log again)
            self.not_mcp_logged = True
            sample = lines[0].strip()
            log.warning("MCP server %s writes output that isn't MCP to its stdout (it belongs on stderr): %r; "
                        "further lines like it are counted, not logged.", self.config.name,
                        sample if len(sample) <= 200 else sample[:200] + "...")


class McpServers:
    def __init__(self, configs: list[ServerConfig]):
        self.servers = {config.name: _Server(config) for config in configs}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="mcp", daemon=True)
        self.closed = False
        self.reserved: set[str] = set()  # names of the chat's other tools (a colliding MCP tool is prefixed)
        self.first_start: concurrent.futures.Future | None = None

    @classmethod
    def start(cls, configs: list[ServerConfig], reserved: set[str] = frozenset()) -> "McpServers":
        """Start every server in the background and return at once (the app's UI doesn't wait
        for a slow one): a server's tools join when it has listed them; until then status()
        says "starting". wait_started() waits for every server's first start to end."""
        servers = cls(configs)
        servers.reserved = set(reserved)
        servers.thread.start()
        atexit.register(servers.close)  # (whatever stage they are in, the processes end with the app)

        async def open_all():  # (together: a slow one doesn't hold up the others)
            await asyncio.gather(*(servers._open(server) for server in servers.servers.values()))
        servers.first_start = asyncio.run_coroutine_threadsafe(open_all(), servers.loop)
        return servers

    def wait_started(self, timeout: float = START_TIMEOUT_S + 10) -> None:
        """Wait until every server has listed its tools or failed to start (at most `timeout`)."""
        if self.first_start is not None:
            concurrent.futures.wait([self.first_start], timeout)

    @property
    def starting(self) -> bool:
        """Is a server's first start still under way?"""
        return self.first_start is not None and not self.first_start.done()

    def _run(self, coroutine, timeout: float):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    async def _open(self, server: _Server) -> None:
        if server.task is not None and not server.task.done():  # (the run before, ending)
            server.closing.set()
            await asyncio.wait([server.task], timeout=5)
        if self.closed:  # (closed meanwhile: nothing new starts)
            return
        server.ready, server.closing = asyncio.Event(), asyncio.Event()
        server.task = asyncio.ensure_future(server.keep_open())
        try:
            await asyncio.wait_for(server.ready.wait(), START_TIMEOUT_S)
        except asyncio.TimeoutError:
            if not server.closing.is_set():  # (closed meanwhile: its process is being stopped, not interrupted)
                server.error = f"it did not answer within {START_TIMEOUT_S:g} s" + server.output_note()
                log.warning("MCP server %s is down: %s", server.config.name, server.error)
                server.closing.set()
                server.task.cancel()
        if not server.up and not server.tools and not self.closed:  # (never listed a tool: no call would
            self.loop.call_later(RESTART_AFTER_S, self._retry, server)   # start it; try again in a minute)

    def _retry(self, server: _Server) -> None:
        if not self.closed and not server.up and not server.restarting.locked():
            log.info("Starting the MCP server %s again.", server.config.name)
            asyncio.ensure_future(self._open(server))

    # -- the tools

    def names(self) -> dict[str, tuple[_Server, str]]:
        """Tool name as the model sees it → (server, the server's own name for it)."""
        listed = [(server, tool.name) for server in self.servers.values() for tool in server.tools]
        counts: dict[str, int] = {}
        for _, name in listed:
            counts[name] = counts.get(name, 0) + 1
        named = {}
        for server, name in listed:
            shown = name if counts[name] == 1 and name not in self.reserved else \
                f"{_safe(server.config.name)}_{name}"
            named[shown] = (server, name)
        return named

    def schemas(self) -> list[dict]:
        """The servers' tools, in OpenAI's function shape (a server that went down keeps its
        tools listed: a call to one starts it again)."""
        schemas = []
        for shown, (server, name) in self.names().items():
            tool = next(tool for tool in server.tools if tool.name == name)
            parameters = tool.inputSchema if isinstance(tool.inputSchema, dict) else {"type": "object"}
            schemas.append({"type": "function", "function": {
                "name": shown, "description": tool.description or f"{name} (from the MCP server {server.config.name})",
                "parameters": parameters}})
        return schemas

    def status(self) -> list[tuple[str, int, str | None]]:
        return [(name, len(server.tools), None if server.up else server.error or "starting")
                for name, server in self.servers.items()]

    def call(self, shown: str, arguments: dict, timeout: float, cancelled: Signal | None = None) -> ToolCallResult:
        """Call a tool; a server that is down is started again first (at most once a minute)."""
        found = self.names().get(shown)
        if found is None:
            return ToolCallResult(f"error: there is no MCP tool named {shown!r}", [], True)
        server, name = found
        started = time.monotonic()
        if not server.up:
            if not server.restarting.acquire(timeout=timeout):
                return ToolCallResult(f"error: the MCP server {server.config.name} is still starting", [], True)
            try:
                if not server.up and server.error is None:  # (a start under way in the background)
                    return ToolCallResult(f"error: the MCP server {server.config.name} is still starting", [], True)
                if not server.up:
                    waited = time.monotonic() - server.started_at
                    if waited < RESTART_AFTER_S:
                        return ToolCallResult(f"error: the MCP server {server.config.name} is down ({server.error}); "
                                              f"it is started again in {RESTART_AFTER_S - waited:.0f} s", [], True)
                    log.info("Starting the MCP server %s again.", server.config.name)
                    stopped = self._wait(self._open(server), cancelled, timeout, shown, timeout)
                    if stopped is not None:
                        return stopped
                    if not server.up:
                        return ToolCallResult(f"error: the MCP server {server.config.name} is down ({server.error})",
                                              [], True)
            finally:
                server.restarting.release()
        return self._wait(self._call(server, name, arguments), cancelled,
                          max(0.0, timeout - (time.monotonic() - started)), shown, timeout) or \
            ToolCallResult("error: no result", [], True)

    def _wait(self, coroutine, cancelled: Signal | None, timeout: float, shown: str, limit: float):
        """Run a coroutine on the loop until it ends, Stop, or the time limit: its result (a
        ToolCallResult, or None for one that returns nothing), or the error result saying why not."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        done = Signal()
        future.add_done_callback(lambda _: done.set())
        wait_for_either(done, cancelled, timeout)
        if not future.done():
            future.cancel()
            if cancelled is not None and cancelled.is_set():
                return ToolCallResult("error: stopped by the user", [], True)
            return ToolCallResult(f"error: {shown} took longer than {limit:g} s and was abandoned", [], True)
        try:
            return future.result()
        except Exception as error:
            return ToolCallResult(f"error: {_reason(error)}", [], True)

    async def _call(self, server: _Server, name: str, arguments: dict) -> ToolCallResult:
        call = asyncio.ensure_future(server.session.call_tool(name, arguments))
        await asyncio.wait([call, server.task], return_when=asyncio.FIRST_COMPLETED)
        if not call.done():  # (the connection ended first: the server is gone)
            call.cancel()
            error = ConnectionError(server.error or "the connection ended")
        else:
            error = call.exception()
        if error is not None:
            if not _lost_connection(error):
                raise error
            server.error, server.session = "it stopped during a call", None  # (down: restarted on a later call)
            server.closing.set()
            log.warning("MCP server %s is down: %s (%s)", server.config.name, server.error, _reason(error))
            return ToolCallResult(f"error: the MCP server {server.config.name} stopped during the call; it is "
                                  f"started again on a later call (at most once a minute)", [], True)
        return _result_of(call.result())

    def close(self) -> None:
        """Stop the servers, whatever stage each is in: a connected one as the MCP spec says
        (its stdin closed, then SIGTERM, then SIGKILL), one still starting (or starting again)
        cancelled, which ends its process the same way; a stdio process still running after
        that is killed."""
        if self.closed:
            return
        self.closed = True
        atexit.unregister(self.close)

        async def close_all():
            running = []
            for server in self.servers.values():
                if server.task is None or server.task.done():
                    continue
                ending = server.closing.is_set()  # (already stopping its process: not interrupted)
                server.closing.set()
                if not server.up and not ending:  # (inside initialize or list_tools: it never looks at closing)
                    server.task.cancel()
                running.append(server.task)
            if running:
                await asyncio.wait(running, timeout=2 * STOP_WAIT_S + 1)
        try:
            if self.thread.is_alive():
                try:
                    self._run(close_all(), 2 * STOP_WAIT_S + 3)
                except Exception:
                    pass
                self.loop.call_soon_threadsafe(self.loop.stop)
        finally:  # (a loop that is stuck, or Ctrl+C again while closing: killed all the same)
            for server in self.servers.values():
                if server.process is not None and getattr(server.process, "returncode", None) is None:
                    _kill(server.process)


def _result_of(result) -> ToolCallResult:
    """A CallToolResult → its text for the model, its images, and whether it is an error."""
    texts, images = [], []
    for item in result.content:
        kind = getattr(item, "type", "")
        if kind == "text":
            texts.append(item.text)
        elif kind == "image":
            data = base64.b64decode(item.data or "", validate=False)
            if len(data) <= MAX_IMAGE_BYTES:
                images.append(data)
                texts.append(f"[an image ({item.mimeType}), shown]")
            else:
                texts.append(f"[an image ({item.mimeType}) of {len(data) // 2**20} MB, not shown]")
        elif kind == "audio":
            texts.append(f"[audio ({item.mimeType}), not played]")
        elif kind == "resource":
            resource = item.resource
            text = getattr(resource, "text", None)
            texts.append(f"[{resource.uri}]\n{text}" if text is not None
                         else f"[a resource: {resource.uri} ({resource.mimeType or 'binary'})]")
        elif kind == "resource_link":
            texts.append(f"[a link to {item.uri}" + (f": {item.description}" if item.description else "") + "]")
        else:
            texts.append(f"[a result of kind {kind!r}]")
    if not texts and result.structuredContent is not None:
        texts.append(json.dumps(result.structuredContent, ensure_ascii=False))
    text = "\n".join(texts)
    return ToolCallResult(f"error: {text}" if result.isError else text, images, bool(result.isError))


def _lost_connection(error: BaseException) -> bool:
    """Did the call fail because the server is gone (its process ended, its stream closed)?"""
    import anyio
    from mcp.shared.exceptions import McpError
    if isinstance(error, (anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.EndOfStream,
                          ConnectionError, OSError)):
        return True
    import httpx
    if isinstance(error, httpx.TransportError):
        return True
    text = str(error).lower()  # (a remote server restarted: it no longer knows our session)
    return isinstance(error, McpError) and ("connection closed" in text or "session terminated" in text)


def _first(error: BaseException) -> BaseException:
    """The first error inside the task groups' exception groups."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return error


def _reason(error: BaseException) -> str:
    """One line for an error, through the task groups' exception groups."""
    error = _first(error)
    if isinstance(error, FileNotFoundError):
        return f"its command was not found ({error.filename or error})"
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _shown(value) -> str:
    """A config value as JSON, for a one-line message."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", name) or "server"


class _first_two:
    """streamablehttp_client yields (read, write, session id): the session takes the first two."""

    def __init__(self, context):
        self.context = context

    async def __aenter__(self):
        streams = await self.context.__aenter__()
        return streams[0], streams[1]

    async def __aexit__(self, *exc):
        return await self.context.__aexit__(*exc)


def _exited(status: int) -> str:
    """A process's exit status, for a down server's note."""
    if status < 0:
        try:
            return f"it was killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"it was killed by signal {-status}"
    return f"it exited with status {status}"


def _message(line: str):
    """A line of a stdio server's stdout as a JSON-RPC message; None for anything else."""
    from mcp.types import JSONRPCMessage
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        return JSONRPCMessage.model_validate_json(line)
    except ValueError:
        return None


async def _spawn(command: str, args: list[str], env: dict[str, str], errlog):
    """Start a stdio server as the mcp package does: on POSIX in a session of its own (so it
    and anything it starts are stopped together), on Windows in a job object."""
    if sys.platform == "win32":
        from mcp.os.win32.utilities import create_windows_process, get_windows_executable_command
        return await create_windows_process(get_windows_executable_command(command), args, env, errlog)
    import anyio
    return await anyio.open_process([command, *args], env=env, stderr=errlog, start_new_session=True)


async def _stop(process) -> None:
    """End a stdio server as the MCP spec says: its stdin closed, STOP_WAIT_S to end, then
    SIGTERM and SIGKILL (to its process group: what it started too)."""
    import anyio
    try:
        await process.stdin.aclose()
    except Exception:
        pass
    with anyio.move_on_after(STOP_WAIT_S):
        await process.wait()
    if getattr(process, "returncode", None) is not None:
        await _release(process)
        return
    if sys.platform == "win32":
        from mcp.os.win32.utilities import terminate_windows_process_tree
        await terminate_windows_process_tree(process, STOP_WAIT_S)
    else:
        from mcp.os.posix.utilities import terminate_posix_process_tree
        await terminate_posix_process_tree(process, STOP_WAIT_S)
    with anyio.move_on_after(STOP_WAIT_S):
        await process.wait()
    await _release(process)


async def _release(process) -> None:
    """Close an ended process's pipes (its transport, left open, complains when collected)."""
    import anyio
    with anyio.move_on_after(1):
        try:
            await process.aclose()
        except Exception:
            pass


def _kill(process) -> None:
    """Kill a stdio server (and, on POSIX, its process group) at once, from any thread."""
    try:
        if sys.platform == "win32":
            process.kill()
        else:
            os.killpg(process.pid, signal.SIGKILL)  # (its own session: the group's id is its pid)
    except (OSError, ProcessLookupError):
        pass


def _log_stream(name: str):
    """A stdio server's stderr, into the log (a file the subprocess can write to)."""
    read, write = os.pipe()

    def forward():
        with os.fdopen(read, "r", errors="replace") as lines:
            for line in lines:
                if line.strip():
                    log.info("[%s] %s", name, line.rstrip())
    threading.Thread(target=forward, name=f"mcp-{name}-stderr", daemon=True).start()
    return os.fdopen(write, "w")
