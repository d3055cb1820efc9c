"""The benchmark's client: Gradio's queue API over raw HTTP, and the client process.

Why not gradio_client: its reader thread sleeps 50 ms whenever its message queue is
empty (gradio_client/utils.py, stream_sse_v1plus), so the arrival times it shows are
late by up to 50 ms. Here each event is timestamped when its bytes arrive:

    POST /gradio_api/queue/join   {"data", "fn_index", "session_hash", ...}  -> event_id
    GET  /gradio_api/queue/data?session_hash=...   (SSE: estimation, process_starts,
         process_generating (first the full outputs, then diffs), process_completed,
         close_stream)
    POST /gradio_api/cancel        {"fn_index", "session_hash", "event_id"}  (= job.cancel())
    POST /gradio_api/run/predict   non-queued events (ChatInterface's chatbot -> state sync)
    POST /gradio_api/upload        files, before the clock starts (a browser uploads an
                                   attachment when it is picked, before Send)

`python bench/sse_client.py --worker SERVER_PID` is the client process benchmark.py
drives: one JSON request per stdin line, one JSON answer per stdout line. A separate
process keeps the client's CPU out of the server's figures (and out of its GIL). Times
are time.perf_counter(): CLOCK_MONOTONIC on Linux, comparable across processes.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx

_configs: dict[str, dict] = {}


def config(url: str) -> dict:
    if url not in _configs:
        _configs[url] = httpx.get(url + "config", timeout=30).json()
    return _configs[url]


def dependency(url: str, api_name: str) -> dict:
    for dep in config(url)["dependencies"]:
        if dep.get("api_name") == api_name:
            return dep
    raise KeyError(f"{url} has no event named {api_name!r}")


def chat_events(url: str) -> dict[str, int]:
    """fn indices of the chat's events. The app's: the API endpoint /chat, and the browser's
    page load (start_session), textbox submit (begin_turn) and answer (respond). A plain
    ChatInterface's (the benchmark's floor): /chat, the browser's generation event, the
    textbox -> saved_input step, and the chatbot -> chatbot_state sync."""
    names = {dep.get("api_name") for dep in config(url)["dependencies"]}
    if "_submit_fn" not in names:
        return {"api": dependency(url, "chat")["id"], "start": dependency(url, "start_session")["id"],
                "begin": dependency(url, "begin_turn")["id"], "browser": dependency(url, "respond")["id"]}
    browser = dependency(url, "_submit_fn")
    saved_input, chatbot_state = browser["inputs"][:2]
    chatbot = browser["outputs"][1]
    sync = next(d for d in config(url)["dependencies"]
                if d["inputs"] == [chatbot] and d["outputs"][:1] == [chatbot_state])
    save = next(d for d in config(url)["dependencies"] if saved_input in d["outputs"]
                and d.get("api_name", "").startswith("_clear_and_save_textbox"))
    return {"api": dependency(url, "chat")["id"], "browser": browser["id"],
            "sync": sync["id"], "save": save["id"]}


def apply_diff(obj, diff):
    """Gradio's streaming diff format (gradio.utils.diff), applied in place."""
    for action, path, value in diff:
        if not path:
            obj = value if action == "replace" else obj + value
            continue
        target = obj
        for key in path[:-1]:
            target = target[key]
        key = path[-1]
        if action == "replace":
            target[key] = value
        elif action == "append":
            target[key] += value
        elif action == "add":
            if isinstance(target, list):
                target.insert(int(key), value)
            else:
                target[key] = value
        elif action == "delete":
            del target[int(key) if isinstance(target, list) else key]
    return obj


def answer_text(value) -> str:
    """The answer's text in an output: the API's growing string or message(s) of this
    turn, or the chatbot (browser event): the last assistant message after the last user
    message. Annotations (the "Thinking…" indicator, notes, stats, errors: messages with a
    metadata title) are not answer text."""
    if isinstance(value, str):
        return value
    messages = value if isinstance(value, list) else [value]
    for message in reversed(messages):
        if isinstance(message, str):
            return message
        if not isinstance(message, dict) or message.get("role") == "user":
            return ""
        if (message.get("metadata") or {}).get("title"):
            continue
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if isinstance(content, str) and content:
            return content
    return ""


class Session:
    """One Gradio session (a browser tab, or one gradio_client Client)."""

    def __init__(self, url: str, http: httpx.Client | None = None):
        self.url = url
        self.api = url + "gradio_api/"
        self.http = http or httpx.Client(timeout=httpx.Timeout(120.0))
        self.session_hash = uuid.uuid4().hex[:11]

    def upload(self, path: str) -> dict:
        with open(path, "rb") as f:
            response = self.http.post(self.api + "upload", files=[("files", (Path(path).name, f))])
        response.raise_for_status()
        server_path = response.json()[0]
        return {"path": server_path, "orig_name": Path(path).name, "meta": {"_type": "gradio.FileData"}}

    def predict(self, fn_index: int, data: list) -> list:
        response = self.http.post(self.api + "run/predict", json={
            "data": data, "fn_index": fn_index, "session_hash": self.session_hash,
            "event_data": None, "trigger_id": None})
        response.raise_for_status()
        return response.json()["data"]

    def submit(self, fn_index: int, data: list, *, answer_output: int = 0,
               cancel_after_updates: int | None = None, cpu_pids: list[int] | None = None) -> dict:
        """Join the queue and read the event's stream to the end. Returns arrival times:
        t_join (just before the POST), t_first_text (first non-empty answer text),
        t_done (process_completed), updates [(t, chars)], and with cancel_after_updates
        the time the cancel was sent; with cpu_pids, those processes' CPU seconds at the
        first text and at the end (one number per process)."""
        cpu = _cpu_reader(cpu_pids)
        result = {"t_first_text": None, "t_done": None, "updates": [], "t_cancel_sent": None,
                  "cpu_first_text": None, "cpu_done": None, "success": None, "text": ""}
        result["t_join"] = time.perf_counter()
        response = self.http.post(self.api + "queue/join", json={
            "data": data, "fn_index": fn_index, "session_hash": self.session_hash,
            "event_data": None, "trigger_id": None})
        response.raise_for_status()
        event_id = response.json()["event_id"]
        outputs = None
        with self.http.stream("GET", self.api + "queue/data",
                              params={"session_hash": self.session_hash}) as stream:
            for line in stream.iter_lines():
                if not line.startswith("data:"):
                    continue
                now = time.perf_counter()
                message = json.loads(line[5:])
                kind = message.get("msg")
                result.setdefault("t_" + kind, now)  # the first of each kind
                if kind == "process_generating":
                    data_out = message["output"]["data"]
                    outputs = data_out if outputs is None else [
                        apply_diff(old, new) for old, new in zip(outputs, data_out)]
                    text = answer_text(outputs[answer_output])
                    if text and result["t_first_text"] is None:
                        result["t_first_text"] = now
                        result["cpu_first_text"] = cpu()
                    if text:
                        result["updates"].append((now, len(text)))
                        result["text"] = text
                    if (cancel_after_updates and result["t_cancel_sent"] is None
                            and len(result["updates"]) >= cancel_after_updates):
                        result["t_cancel_sent"] = time.perf_counter()
                        self.http.post(self.api + "cancel", json={
                            "fn_index": fn_index, "session_hash": self.session_hash,
                            "event_id": event_id})
                elif kind == "process_completed":
                    result["t_done"] = now
                    result["cpu_done"] = cpu()
                    result["success"] = message.get("success")
                    if not message.get("success"):
                        result["error"] = str(message.get("output"))[:300]
                elif kind in ("close_stream", "unexpected_error"):
                    if kind == "unexpected_error":
                        result["error"] = message.get("message")
                    break
        return result


def _cpu_reader(pids):
    if not pids:
        return lambda: None
    import psutil
    processes = [psutil.Process(pid) for pid in pids]

    def read():
        return [t.user + t.system for t in (p.cpu_times() for p in processes)]
    return read


# ---------------------------------------------------------------- requests the worker serves

def _message(session: Session, text: str, files: list[str]) -> dict:
    return {"text": text, "files": [session.upload(p) for p in files]}


def chat(url, text, files=(), extra=(), *, history=None, browser=False, kept=None,
         cancel_after_updates=None, cpu_pids=None, http=None) -> dict:
    """One chat turn in a new session, through the /chat API (default) or the browser's
    generation event (browser=True). The app's browser events: the page load with `kept`
    (what the browser keeps: its signed id, and the saved conversation open, whose history
    the turn continues), the textbox submit, the answer. A plain ChatInterface's: history
    preloaded into the session's chatbot_state through its own chatbot -> state sync event."""
    session = Session(url, http)
    events = chat_events(url)
    message = _message(session, text, list(files))
    if "start" in events:
        if not browser:
            return session.submit(events["api"], [message, None, *extra],
                                  cancel_after_updates=cancel_after_updates, cpu_pids=cpu_pids)
        user, conversation, kept, _, _ = session.predict(events["start"], [kept or {}])
        session.predict(events["begin"], [message, None, None, kept, ""])
        return session.submit(events["browser"], [None, None, None, *extra], answer_output=0,
                              cancel_after_updates=cancel_after_updates, cpu_pids=cpu_pids)
    if history is not None:
        session.predict(events["sync"], [history])
    if browser:
        session.predict(events["save"], [message])  # the browser's textbox.submit step
        return session.submit(events["browser"], [None, None, *extra], answer_output=1,
                              cancel_after_updates=cancel_after_updates, cpu_pids=cpu_pids)
    return session.submit(events["api"], [message, None, *extra],
                          cancel_after_updates=cancel_after_updates, cpu_pids=cpu_pids)


def concurrent(url, clients, text, files=(), extra=()) -> list[dict]:
    """`clients` chat turns started at once, each in its own session and connection."""
    barrier = threading.Barrier(clients)
    results: list = [None] * clients

    def one(i):
        with httpx.Client(timeout=httpx.Timeout(300.0)) as http:
            session = Session(url, http)
            message = _message(session, text, list(files))
            events = chat_events(url)
            barrier.wait()
            results[i] = session.submit(events["api"], [message, None, *extra])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def conversations(url, count, turns, text, files=(), extra=()) -> dict:
    """`count` conversations of `turns` turns each, one after another; every turn sends
    the files again (a new upload each time, as a user attaching a picture)."""
    events = chat_events(url)
    started, failures = time.perf_counter(), 0
    with httpx.Client(timeout=httpx.Timeout(120.0)) as http:
        for _ in range(count):
            session = Session(url, http)
            for _ in range(turns):
                result = session.submit(events["api"], [_message(session, text, list(files)), None, *extra])
                failures += not result["success"] or not result["text"]
    return {"seconds": time.perf_counter() - started, "failures": failures}


_gradio_clients: dict = {}


def gradio_client_chat(url, text, files=(), extra=()) -> dict:
    """The same turn through gradio_client, as the README shows it (for comparison):
    the clock starts before submit(), so it includes gradio_client's upload of the files."""
    from gradio_client import Client, handle_file
    if url not in _gradio_clients:
        _gradio_clients[url] = Client(url, verbose=False)
    client = _gradio_clients[url]
    client.reset_session()
    t_join = time.perf_counter()
    job = client.submit({"text": text, "files": [handle_file(p) for p in files]}, *extra, api_name="/chat")
    first = None
    for output in job:
        if first is None and answer_text(output):
            first = time.perf_counter()
    return {"t_join": t_join, "t_first_text": first, "t_done": time.perf_counter()}


REQUESTS = {"chat": chat, "concurrent": concurrent, "conversations": conversations,
            "gradio_client_chat": gradio_client_chat, "config": lambda url: chat_events(url),
            "ping": lambda: {"t": time.perf_counter()}}


def worker(server_pid: int) -> None:
    http = httpx.Client(timeout=httpx.Timeout(300.0))  # kept alive across requests
    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        if op in ("chat",):
            request.setdefault("http", http)
        if request.get("cpu_pids") == "server":
            request["cpu_pids"] = [server_pid]
        try:
            answer = {"ok": REQUESTS[op](**request)}
        except Exception as error:  # reported to the benchmark, which raises it
            answer = {"error": f"{type(error).__name__}: {error}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--worker":
        sys.exit(f"usage: python {sys.argv[0]} --worker SERVER_PID (driven by benchmark.py)")
    worker(int(sys.argv[2]))
