"""MCP (issue 24): tools from MCP servers in the chat — a stdio server written here with the
`mcp` package (tests/mcp_test_server.py), the same server over streamable HTTP, one that
crashes in the middle of a call, one whose command does not exist — called by the tiny tool
model (it always asks for get_weather(city="Paris"))."""

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from gradio_client import Client

import app
import mcp_tools
from mcp_tools import McpConfigError, McpServers, ServerConfig, read_config
from tests.conftest import free_port, wait_for
from tests.test_tools import submit, titled, tools_runner  # noqa: F401 (a fixture)
from tools import Toolbox

SERVER = str(Path(__file__).resolve().parent / "mcp_test_server.py")


def started(configs, reserved=frozenset()) -> McpServers:
    """The servers, once each has listed its tools or failed to start (start() doesn't wait)."""
    servers = McpServers.start(configs, reserved)
    servers.wait_started()
    return servers


def config_file(tmp_path, servers: dict) -> str:
    path = tmp_path / "mcp.json"
    path.write_text(json.dumps({"mcpServers": servers}))
    return str(path)


STDIO = {"command": sys.executable, "args": [SERVER], "env": {"WEATHER_SOURCE": "stdio, with its env"}}


@pytest.fixture
def toolboxes():
    made = []
    yield made
    for toolbox in made:
        toolbox.close()


def test_a_stdio_servers_tool_is_called_in_the_chat_like_any_tool(serve, tools_runner, tmp_path, toolboxes):
    toolbox = Toolbox.load([], config_file(tmp_path, {"weather": STDIO, "broken": {"command": "/no/such/program"}}))
    toolboxes.append(toolbox)
    toolbox.mcp.wait_started()
    url, spy = serve(tools_runner, toolbox=toolbox)
    client = Client(url, verbose=False)
    final = submit(client, "What's the weather in Paris?").result(timeout=60)
    [call] = titled(final, "🛠 get_weather")
    assert call["metadata"]["status"] == "done" and '"city": "Paris"' in call["content"]
    assert "18 °C and clear in Paris (from the MCP server over stdio, with its env)" in call["content"]
    assert spy.calls[1][0][-1]["content"][0]["text"] == \
        "18 °C and clear in Paris (from the MCP server over stdio, with its env)"
    header = app.header_markdown(tools_runner, toolbox)
    assert "🛠 tools: 4 from MCP weather" in header, header
    assert "MCP broken is down (its command was not found" in header, "a server that can't start is a note"
    client.close()


@pytest.fixture
def http_server():
    port = free_port()
    process = subprocess.Popen([sys.executable, SERVER, "http", str(port)], env={**os.environ, "WEATHER_SOURCE": "http"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def listening():
        try:
            return httpx.get(f"http://127.0.0.1:{port}/mcp", timeout=1).status_code > 0
        except httpx.HTTPError:
            return False
    wait_for(listening, 30, "the MCP server to listen")
    yield f"http://127.0.0.1:{port}/mcp"
    process.terminate()
    process.wait(10)


def test_a_remote_streamable_http_servers_tools_join_with_their_names(http_server):
    servers = started([ServerConfig("remote", url=http_server, headers={"Authorization": "Bearer x"}),
                                ServerConfig("local", command=sys.executable, args=[SERVER])])
    try:
        names = servers.names()
        assert {"remote_get_weather", "local_get_weather", "remote_red_square", "local_red_square"} <= set(names), \
            "two servers with the same tool: each prefixed by its server's name"
        result = servers.call("remote_get_weather", {"city": "Oslo"}, timeout=20)
        assert result.text == "18 °C and clear in Oslo (from the MCP server over http)" and not result.failed
        picture = servers.call("local_red_square", {}, timeout=20)
        assert picture.images and picture.images[0].startswith(b"\x89PNG") and "an image" in picture.text
    finally:
        servers.close()


def test_a_server_that_dies_mid_call_is_an_error_result_and_starts_again_later(monkeypatch, tmp_path):
    servers = started([ServerConfig("weather", command=sys.executable, args=[SERVER])],
                               reserved={"get_weather"})
    try:
        crashed = servers.call("crash", {}, timeout=20)
        assert crashed.failed and "stopped during the call" in crashed.text
        assert servers.status()[0][2] is not None, "it is down"
        soon = servers.call("weather_get_weather", {"city": "Paris"}, timeout=20)
        assert soon.failed and "started again in" in soon.text, "at most once a minute"
        monkeypatch.setattr(mcp_tools, "RESTART_AFTER_S", 0.0)
        again = servers.call("weather_get_weather", {"city": "Paris"}, timeout=20)
        assert not again.failed and "Paris" in again.text and servers.status()[0][2] is None
    finally:
        servers.close()


def test_a_server_that_prints_to_its_stdout_is_one_log_line_and_still_works(caplog):
    caplog.set_level(logging.INFO)
    noisy = ServerConfig("noisy", command=sys.executable, args=[SERVER], env={"NOT_MCP_LINES": "5000"})
    servers = started([noisy])
    try:
        assert servers.call("get_weather", {"city": "Oslo"}, timeout=20).text.startswith("18 °C and clear in Oslo")
    finally:
        servers.close()
    assert not [r for r in caplog.records if r.exc_info or "Failed to parse" in r.getMessage()], \
        "no traceback per line (the mcp package logged one for each: a flood filled the disk)"
    [line] = [r.getMessage() for r in caplog.records if "isn't MCP" in r.getMessage()]
    assert line.startswith("MCP server noisy writes output that isn't MCP to its stdout") and \
        "'Weather server ready (0)'" in line and "further lines like it are counted, not logged" in line


def test_a_server_that_floods_its_stdout_with_garbage_is_down_without_flooding_the_log_or_a_core(monkeypatch, caplog):
    monkeypatch.setattr(mcp_tools, "START_TIMEOUT_S", 3.0)
    caplog.set_level(logging.INFO)
    used = time.process_time()
    servers = started([ServerConfig("garb", command="sh", args=["-c", "yes garbage"])])
    try:
        [(_, tools, down)] = servers.status()
        assert time.process_time() - used < 1.5, "reading a flood takes little CPU (it took a core; the log grew 4 MB/s)"
        assert tools == 0 and down.startswith("it did not answer within 3 s; it wrote ") and \
            down.endswith("lines that aren't MCP to its stdout"), down
    finally:
        servers.close()
    logged = [r.getMessage() for r in caplog.records]
    assert not [r for r in caplog.records if r.exc_info or "Failed to parse" in r.getMessage()]
    assert logged == ["MCP server garb writes output that isn't MCP to its stdout (it belongs on stderr): 'garbage'; "
                      "further lines like it are counted, not logged.", f"MCP server garb is down: {down}"], logged


def test_a_server_that_exits_says_so_with_its_exit_status():
    servers = started([ServerConfig("quits", command=sys.executable, args=["-c", "import sys; sys.exit(3)"])])
    try:
        assert servers.status() == [("quits", 0, "it exited with status 3")]
    finally:
        servers.close()


def test_tools_from_files_keep_their_names_and_a_colliding_mcp_tool_is_prefixed(tmp_path, toolboxes):
    from tests.test_tools import WEATHER, write_tools
    toolbox = Toolbox.load([write_tools(tmp_path, WEATHER)], config_file(tmp_path, {"weather": STDIO}))
    toolboxes.append(toolbox)
    toolbox.mcp.wait_started()
    assert "get_weather" in toolbox.names and "weather_get_weather" in toolbox.names
    assert [schema["function"]["name"] for schema in toolbox.all_schemas].count("get_weather") == 1
    assert toolbox.where() == ["get_weather", "4 from MCP weather"]
    result = toolbox.run("weather_get_weather", {"city": "Rome"}, timeout=20)
    assert "Rome (from the MCP server over stdio, with its env)" in result.text and result.seconds > 0


def test_a_stdio_server_is_stopped_with_the_app(tmp_path):
    marker = f"mcp-marker-stopped-{os.getpid()}"

    def running():
        return subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
    servers = started([ServerConfig("weather", command=sys.executable, args=[SERVER, marker])])
    assert running(), "the server runs"
    servers.close()
    wait_for(lambda: not running(), 15, "the server to stop")


def hanging(marker: str) -> list[str]:
    """Args for sys.executable: a "server" that never answers (its stdin closed, it goes on)."""
    return ["-c", "import time; time.sleep(1000)", marker]


def pids_of(marker: str) -> list[int]:
    return [int(pid) for pid in subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()]


@pytest.mark.parametrize("stage", ["first", "again"])
def test_a_server_that_hangs_at_start_is_stopped_on_close(monkeypatch, tmp_path, stage):
    """Closed while a server is inside initialize (its first start, or its start again a minute
    after it failed): its process ends with close(); it was left running (reparented to PID 1)."""
    from tests.test_engine_process import running
    marker = f"mcp-marker-hang-{stage}-{os.getpid()}"
    if stage == "first":
        hang = ServerConfig("hang", command=sys.executable, args=hanging(marker))
    else:  # (a command that appears after the first start failed)
        monkeypatch.setattr(mcp_tools, "RESTART_AFTER_S", 0.5)
        late = tmp_path / f"{marker}.py"  # (its name in the process's command line)
        hang = ServerConfig("hang", command=str(late))
    servers = McpServers.start([hang])
    try:
        if stage == "again":
            wait_for(lambda: (servers.status()[0][2] or "starting") != "starting", 15, "the first start to fail")
            late.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(1000)\n")
            late.chmod(0o755)
        wait_for(lambda: pids_of(marker), 15, "the server to start")
        [pid] = pids_of(marker)
        assert servers.status()[0][2] == "starting" and Toolbox({}, servers).where() == ["MCP hang is starting"]
    finally:
        servers.close()
    wait_for(lambda: not running(pid), 3, "close() to end the server's process, whatever stage it is in")


def test_a_hanging_server_does_not_hold_up_the_ui_and_sigterm_stops_it(tmp_path, tiny_model_paths):
    """The UI answers (and the model loads) while a server is still starting, and the header
    says so; SIGTERM then (the app turns it into Ctrl+C) ends the server's process too."""
    import signal

    from tests.test_engine_process import running
    marker = f"mcp-marker-hang-app-{os.getpid()}"
    config = config_file(tmp_path, {"hang": {"command": sys.executable, "args": hanging(marker)}})
    port = free_port()
    process = subprocess.Popen([sys.executable, str(Path(app.__file__)), "--model", str(tiny_model_paths["tools"]),
                                "--port", str(port), "--mcp-config", config],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: pids_of(marker) or process.poll() is not None, 60, "the MCP server to start")
        [pid] = pids_of(marker)
        hung_at = time.monotonic()

        def answers():
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code in (200, 503)
            except httpx.HTTPError:
                return False
        wait_for(lambda: answers() or process.poll() is not None, 60, "the UI to answer")
        assert time.monotonic() - hung_at < mcp_tools.START_TIMEOUT_S - 10, \
            "the UI answers at once: it doesn't wait for the MCP server's start (30 s)"
        from tests.conftest import wait_until_loaded
        assert wait_until_loaded(port, process)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    log = process.stderr.read()
    assert "Tools for the chat: none yet (MCP hang is starting)." in log, log[-2000:]
    wait_for(lambda: not running(pid), 5, "the MCP server's process to end with the app")
    assert "Traceback" not in log


@pytest.mark.parametrize("content, why", [
    ("{not json", "is not JSON"),
    ('{"servers": {}}', 'no "mcpServers" object'),
    ('{"mcpServers": {"x": {"command": "a", "url": "http://b"}}}', 'either "command"'),
    ('{"mcpServers": {"x": {"command": "a", "args": "not a list"}}}', '"args" must be a list'),
    ('{"mcpServers": {"x": {"url": "ftp://b"}}}', "http(s) address"),
    ('{"mcpServers": {"x": {"command": ["python", "x.py"]}}}', '"command" is one program; put its arguments in "args"'),
])
def test_a_config_that_cannot_be_used_is_one_line(tmp_path, content, why):
    path = tmp_path / "mcp.json"
    path.write_text(content)
    with pytest.raises(McpConfigError, match=why.replace("(", r"\(").replace(")", r"\)")):
        read_config(path)
    result = subprocess.run([sys.executable, str(Path(app.__file__)), "--mcp-config", str(path)],
                            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0 and why.split()[0] in result.stderr


@pytest.mark.parametrize("entry, why", [
    ({"command": ["python", "x.py"], "args": ["-v"]},
     '"x" in MCP.json: "command" is one program; put its arguments in "args" ("command": "python", '
     '"args": ["x.py", "-v"]).'),
    ({"command": 5}, '"x" in MCP.json: "command" must be a program to start (a non-empty string), not 5.'),
    ({"command": " "}, '"x" in MCP.json: "command" must be a program to start (a non-empty string), not " ".'),
    ({"command": "a", "disabled": "yes"}, '"x" in MCP.json: "disabled" must be true or false, not "yes".'),
    ({"url": ["http://b"]}, '"x" in MCP.json: "url" must be a string (an http(s) address), not ["http://b"].'),
    ({"command": "a", "args": ["-p", 8080]}, '"x" in MCP.json: "args" must be a list of strings.'),
    ({"command": "a", "env": {"PORT": 8080}}, '"x" in MCP.json: "env" must be an object of strings.'),
])
def test_a_server_entry_with_a_value_of_the_wrong_kind_is_refused_naming_the_server_and_field(tmp_path, entry, why):
    """(Before, these started the app with "MCP x is down (ValidationError...)" and a retry every
    minute, and "disabled": "yes" was ignored.)"""
    path = tmp_path / "MCP.json"
    path.write_text(json.dumps({"mcpServers": {"x": entry}}))
    with pytest.raises(McpConfigError) as refused:
        read_config(path)
    assert str(refused.value) == f'The MCP server {why.replace("MCP.json", str(path))}'


def test_disabled_true_skips_a_server_whatever_else_it_holds(tmp_path):
    path = tmp_path / "mcp.json"
    path.write_text(json.dumps({"mcpServers": {"off": {"command": 5, "disabled": True}, "on": {"command": "a"}}}))
    assert [config.name for config in read_config(path)] == ["on"]


def test_a_tools_pictures_are_shown_and_given_to_a_model_that_sees(idefics3_runner):
    servers = started([ServerConfig("art", command=sys.executable, args=[SERVER])])
    try:
        result = servers.call("red_square", {}, timeout=20)
    finally:
        servers.close()
    parts = app.pictures(result.images)
    assert len(parts) == 1 and parts[0]["image"].endswith(".png"), "named by its format: the chat shows it"
    assert len(app.pictures(result.images * 12, most=8)) == 8
    from engine_contract import ToolCall
    call = ToolCall("red_square", {}, "call_1")
    answer = [{"role": "assistant", "content": [], "tool_calls": [call]},
              {"role": "tool", "tool_call_id": "call_1", "name": "red_square",
               "content": [{"type": "text", "text": result.text}, *parts]}]
    shown = app.chat_bubbles([{"role": "user", "content": [{"type": "text", "text": "Draw"}]}, *answer])
    assert any(isinstance(b["content"], dict) and b["content"].get("path") == parts[0]["image"] for b in shown)
    prompt = idefics3_runner.tokenizer.decode(idefics3_runner.build_inputs(
        [{"role": "user", "content": [{"type": "text", "text": "Draw"}]}, *answer])["input_ids"][0])
    assert "The pictures the tools returned:" in prompt and prompt.count("<image>") >= 4


# ---------------------------------------------------------------- the app as an MCP server

async def _mcp_session(url, headers=None, act=None):
    from mcp import ClientSession
    from mcp.client.streamable_http import streamablehttp_client
    async with streamablehttp_client(url + "gradio_api/mcp/", headers=headers) as (read, write, _):
        async with ClientSession(read, write) as session:
            await session.initialize()
            return await act(session)


def test_the_chat_is_one_mcp_tool_that_answers(serve, llama_runner):
    import asyncio
    url, spy = serve(llama_runner, mcp_server=True)

    async def act(session):
        tools = (await session.list_tools()).tools
        answer = await session.call_tool("ask", {"message": "Describe a dog.", "max_new_tokens": 8})
        empty = await session.call_tool("ask", {"message": " "})
        return tools, answer, empty

    tools, answer, empty = asyncio.run(_mcp_session(url, act=act))
    assert [tool.name for tool in tools] == ["ask"], "only the chat: none of the page's own events"
    assert set(tools[0].inputSchema["properties"]) == {"message", "images", "system_prompt", "max_new_tokens",
                                                       "temperature"}
    assert not answer.isError and answer.content[0].text == spy.streams[-1].reply.answer != ""
    assert spy.streams[-1].new_tokens == 8
    assert empty.isError and empty.content[0].text == "The message is empty."
    assert spy.chats.store._db.execute("SELECT COUNT(*) FROM conversations").fetchone()[0] == 0, "nothing saved"


def test_with_an_api_key_the_mcp_endpoint_needs_it(serve, llama_runner):
    import asyncio
    url, _ = serve(llama_runner, mcp_server=True, api_key="sesame")
    refused = httpx.post(url + "gradio_api/mcp/", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    assert refused.status_code == 401 and "Bearer" in refused.text

    async def act(session):
        return (await session.list_tools()).tools
    assert [t.name for t in asyncio.run(_mcp_session(url, {"Authorization": "Bearer sesame"}, act))] == ["ask"]


def test_on_a_network_address_without_a_key_the_mcp_server_stays_off():
    from config import Settings
    assert "--api-key" in app.mcp_server_refusal(Settings(host="0.0.0.0", mcp_server=True))
    assert "--api-key" in app.mcp_server_refusal(Settings(share=True, mcp_server=True))
    assert app.mcp_server_refusal(Settings(host="0.0.0.0", mcp_server=True, api_key="k")) is None
    assert app.mcp_server_refusal(Settings(mcp_server=True)) is None


def test_stop_or_the_time_limit_during_an_mcp_call_end_it_and_the_server_goes_on():
    import threading

    from engine_contract import Signal
    servers = started([ServerConfig("slow", command=sys.executable, args=[SERVER])])
    try:
        stop = Signal()
        threading.Timer(0.3, stop.set).start()
        stopped = servers.call("wait", {"seconds": 30}, timeout=60, cancelled=stop)
        assert stopped.failed and stopped.text == "error: stopped by the user"
        late = servers.call("wait", {"seconds": 30}, timeout=0.5)
        assert late.failed and "took longer than 0.5 s" in late.text
        assert servers.call("get_weather", {"city": "Lima"}, timeout=20).text.startswith("18 °C and clear in Lima")
    finally:
        servers.close()


def test_a_server_that_dies_while_idle_is_noticed_and_one_that_never_started_is_tried_again(monkeypatch, tmp_path):
    monkeypatch.setattr(mcp_tools, "PING_EVERY_S", 0.3)
    monkeypatch.setattr(mcp_tools, "RESTART_AFTER_S", 0.5)
    marker = f"mcp-marker-idle-{os.getpid()}"
    late = tmp_path / "late_server.py"  # (a command that appears after the app started)
    servers = started([ServerConfig("idle", command=sys.executable, args=[SERVER, marker]),
                                ServerConfig("late", command=str(late))])
    try:
        assert servers.status()[1][2] is not None
        late.write_text(f"#!{sys.executable}\nimport runpy, sys\nsys.argv = [{SERVER!r}]\n"
                        f"runpy.run_path({SERVER!r}, run_name='__main__')\n")
        late.chmod(0o755)
        wait_for(lambda: servers.status()[1][2] is None, 20, "the late server to be started again")
        assert servers.status()[1][1] == 4
        (pid,) = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
        os.kill(int(pid), 9)
        wait_for(lambda: servers.status()[0][2] is not None, 10, "the dead server to be noticed")
        assert servers.status()[0][2] == "it was killed by SIGKILL"
    finally:
        servers.close()


def test_with_logins_the_chat_tool_still_answers_on_this_machine(serve, llama_runner):
    import asyncio
    url, spy = serve(llama_runner, mcp_server=True, auth=("ann:pa55",))

    async def act(session):
        return await session.call_tool("ask", {"message": "Describe a dog.", "max_new_tokens": 5})
    answer = asyncio.run(_mcp_session(url, act=act))
    assert not answer.isError and answer.content[0].text == spy.streams[-1].reply.answer


def test_sigterm_stops_the_app_with_its_stdio_servers_and_engine(tmp_path, tiny_model_paths):
    """docker stop, systemd and a restarting Space send SIGTERM: the app ends as with Ctrl+C,
    and nothing it started is left running."""
    import signal

    from tests.conftest import wait_until_loaded
    from tests.test_engine_process import children_of, running
    marker = f"mcp-marker-sigterm-{os.getpid()}"
    config = config_file(tmp_path, {"weather": {"command": sys.executable, "args": [SERVER, marker]}})
    port = free_port()
    process = subprocess.Popen([sys.executable, str(Path(app.__file__)), "--model", str(tiny_model_paths["llama"]),
                                "--port", str(port), "--mcp-config", config],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        assert wait_until_loaded(port, process)
        wait_for(lambda: pids_of(marker), 15, "the MCP server to start")  # (servers start in the background)
        servers = pids_of(marker)
        engines = children_of(process.pid)
        assert servers and engines, "the MCP server and the engine run"
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, process.stderr.read()[-2000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    wait_for(lambda: not subprocess.run(["pgrep", "-f", marker], capture_output=True).stdout, 15,
             "the stdio MCP server to stop")
    wait_for(lambda: not running(engines[0]), 15, "the engine process to end")
    assert "Traceback" not in process.stderr.read()
