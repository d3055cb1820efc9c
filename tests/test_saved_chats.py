"""Conversations kept by the server (issue 21), driven through the chat's own events as a
browser sends them (gradio_client, by event index): per user, crafted requests included;
the prompt of a saved conversation; export → import; limits; a killed app; bad databases;
where the chats live. The browser's side is in test_browser.py."""

import contextlib
import inspect
import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from gradio_client import Client

import app
import users
from config import Settings
from conversation_store import ConversationStore, open_store
from tests.conftest import free_port, wait_for, wait_until_loaded

ROOT = Path(__file__).resolve().parent.parent


def event(chats, name: str) -> int:
    """The index of the chat's event that runs Chats.<name> (what a browser's request names)."""
    demo = chats.demo
    method = getattr(chats, name)
    return next(index for index, fn in demo.fns.items() if inspect.unwrap(fn.fn) == method)  # (UnqueuedRefusals wraps it)


class Browser:
    """One browser's session with the chat, speaking its events as the page does."""

    def __init__(self, url, chats, auth=None, kept=None):
        self.client, self.chats = Client(url, auth=auth, verbose=False), chats
        self.kept, self.conversation_list, self.shown = self.start(kept or {})

    def call(self, name, *args):
        return self.client.predict(*args, fn_index=event(self.chats, name))

    def start(self, kept):
        kept, shown, chat_list = self.call("start_session", kept)
        return kept, chat_list, shown

    def begin(self, text, max_new_tokens=8):
        """A message sent, as the page sends it: the job of its answer (respond), under way."""
        self.call("begin_turn", {"text": text, "files": []}, self.kept, "")
        return self.client.submit("", max_new_tokens, 0.0, 1.0, fn_index=event(self.chats, "respond"))

    def send(self, text, max_new_tokens=8):
        """A message and its whole answer: (what the chat showed at the end, the list)."""
        shown = self.begin(text, max_new_tokens).result()
        _, chat_list, _, _ = self.call("end_turn", "")
        return shown, chat_list

    def refused(self, name, *args):
        """An action the server refuses: (its message, what the page then shows: the outputs
        of the refusal's follow-up, as UnqueuedRefusals gives them to the page)."""
        with pytest.raises(Exception) as refusal:
            self.call(name, *args)
        index = event(self.chats, name)
        (follow_up,) = [i for i, fn in self.chats.demo.fns.items()
                        if fn.trigger_after == index and fn.trigger_only_on_failure]
        return str(refusal.value), self.client.predict(fn_index=follow_up)

    def close(self):
        self.client.close()


def titles(chat_list) -> list[str]:
    return [choice[0] for choice in chat_list["choices"]]


def test_two_users_see_only_their_own_chats_even_with_crafted_requests(serve, llama_runner):
    url, spy = serve(llama_runner, auth=("ann:pa55", "bob:b0b"))
    ann = Browser(url, spy.chats, auth=("ann", "pa55"))
    shown, chat_list = ann.send("ann's private question")
    assert titles(chat_list) == ["ann's private question"]
    ann_chat = chat_list["value"]
    assert any("ann's private question" in json.dumps(bubble) for bubble in shown)

    bob = Browser(url, spy.chats, auth=("bob", "b0b"))
    assert titles(bob.conversation_list) == [], "bob's list is his own"
    # replaying ann's id in bob's session: refused (by the list, which holds only bob's; the
    # store would say it does not exist)
    with pytest.raises(Exception, match="not in the list of choices|does not exist"):
        bob.call("open_chat", ann_chat, bob.kept, "")
    replayed = Browser(url, spy.chats, auth=("bob", "b0b"), kept={**bob.kept, "open": ann_chat})
    assert replayed.shown == [] and "open" not in replayed.kept, "a page load can't open it either"
    with pytest.raises(Exception, match="Open a saved chat"):
        bob.call("export")  # (no chat of his open: nothing to export)
    _, bob_list = bob.send("bob's question")
    assert titles(bob_list) == ["bob's question"]
    assert [s.title for s in spy.chats.store.conversations("login:ann")] == ["ann's private question"]
    assert spy.chats.store.messages("login:ann", ann_chat)[0]["content"][0]["text"] == "ann's private question"
    ann.close(), bob.close(), replayed.close()


def test_a_browser_keeps_its_id_and_a_forged_one_is_replaced(serve, llama_runner):
    url, spy = serve(llama_runner)
    first = Browser(url, spy.chats)
    _, chat_list = first.send("kept by this browser")
    again = Browser(url, spy.chats, kept={"id": first.kept["id"]})  # the same browser, a new page
    assert titles(again.conversation_list) == ["kept by this browser"]
    for forged in ("anyone", first.kept["id"].split(".")[0] + ".0000", "x.é", {"id": None}, {"id": 7, "open": []}):
        stranger = Browser(url, spy.chats, kept={"id": forged} if isinstance(forged, str) else forged)
        assert titles(stranger.conversation_list) == [] and stranger.kept["id"] != first.kept["id"]
        stranger.close()
    reopened = Browser(url, spy.chats, kept={"id": first.kept["id"], "open": chat_list["value"]})
    assert any("kept by this browser" in json.dumps(bubble) for bubble in reopened.shown), \
        "a reload reopens the chat that was open"
    first.close(), again.close(), reopened.close()


def test_keys_come_from_the_strongest_identity():
    ids = users.BrowserIds(b"secret")
    token = ids.issue()
    assert ids.check(token) and users.BrowserIds(b"other").check(token) is None
    assert users.user_key(login="ann", hf_user="ann-hf", browser_id="b") == "login:ann"
    assert users.user_key(hf_user="ann-hf", browser_id="b") == "hf:ann-hf"
    assert users.user_key(browser_id="b") == "browser:b"
    assert users.oauth_on_space({"SPACE_ID": "me/chat", "OAUTH_CLIENT_ID": "x"})
    assert not users.oauth_on_space({"SPACE_ID": "me/chat"})


def test_signed_in_with_hugging_face_the_chats_follow_the_account(llama_runner):
    chats = app.build_demo(llama_runner).chats
    conversation = chats.store.create("hf:ann")
    chats.store.append("hf:ann", conversation, [{"role": "user", "content": [{"type": "text", "text": "from hf"}]}])
    page = SimpleNamespace(username=None)
    user, *_, chat_list = chats.start_session_with_hf({}, page, SimpleNamespace(username="ann"))
    assert user == "hf:ann" and chat_list.constructor_args["choices"] == [("from hf", conversation)]
    user, *_ = chats.start_session_with_hf({}, page, None)  # not signed in: this browser
    assert user.startswith("browser:")



def test_saved_chats_that_fail_while_the_app_runs_are_told_and_the_page_still_loads(llama_runner, monkeypatch):
    """The database damaged after the start: a page load says so (not "Something went wrong")
    and the session starts, so the chat can say why a message can't be saved."""
    from tests.test_conversation_store import a_store_with_chats, damage
    chats = app.build_demo(llama_runner).chats
    a_store_with_chats(chats.store.directory)
    chats.store = ConversationStore(chats.store.directory)
    damage(chats.store.path)
    told = []
    monkeypatch.setattr(app.gr, "Warning", told.append)
    user, conversation, _seen, kept, shown, chat_list = chats.start_session({}, SimpleNamespace(username=None))
    assert user and kept["id"], "a session: sending a message won't say the page lost it"
    assert chat_list.label == "Saved chats can't be read now" and chat_list.constructor_args["choices"] == []
    assert told == ["The saved chats can't be read: their database is damaged (database disk image is "
                    "malformed). The server's admin can restore it from a backup."]


def test_on_a_space_with_hf_oauth_the_page_offers_sign_in(llama_runner, monkeypatch):
    import gradio as gr
    monkeypatch.setenv("SYSTEM", "spaces")  # (what a Space sets, with these)
    monkeypatch.setenv("SPACE_ID", "me/chat")
    monkeypatch.setenv("OAUTH_CLIENT_ID", "client")
    import gradio.oauth  # (which reads what the Space sets at import)
    for name, value in (("OAUTH_CLIENT_ID", "client"), ("OAUTH_CLIENT_SECRET", "secret"), ("OAUTH_SCOPES", "openid"),
                        ("OPENID_PROVIDER_URL", "https://huggingface.co")):
        monkeypatch.setattr(gradio.oauth, name, value)
    demo = app.build_demo(llama_runner)
    assert any(isinstance(block, gr.LoginButton) for block in demo.blocks.values())
    assert any(inspect.unwrap(fn.fn) == demo.chats.start_session_with_hf for fn in demo.fns.values()), \
        "the page load asks who signed in"
    monkeypatch.delenv("OAUTH_CLIENT_ID")
    assert not any(isinstance(block, gr.LoginButton) for block in app.build_demo(llama_runner).blocks.values())


def test_logins_from_the_options_and_a_file(tmp_path):
    logins = tmp_path / "logins.txt"
    logins.write_text("# the team\nann:pa55\n\nbob:with:colons\n")
    assert users.read_logins(("cy:x",), str(logins)) == {"cy": "x", "ann": "pa55", "bob": "with:colons"}
    logins.write_text("ann\n")
    with pytest.raises(ValueError, match="line 1: a login is USER:PASS"):
        users.read_logins((), str(logins))
    with pytest.raises(ValueError, match="no-such-file"):
        users.read_logins((), str(tmp_path / "no-such-file"))


def test_a_saved_conversation_gives_the_model_the_same_prompt_again(serve, tiny_model_paths, tmp_path):
    """A turn with a tool call, saved; the next turn is built from the store: the model sees
    the first turn exactly as it did while it was answering it (call, result and all)."""
    from model_runner import ModelRunner
    from tests.test_tools import WEATHER, write_tools
    from tools import Toolbox
    runner = ModelRunner.load(str(tiny_model_paths["tools"]), device="cpu")
    toolbox = Toolbox.load([write_tools(tmp_path, WEATHER)])
    url, spy = serve(runner, toolbox=toolbox, max_new_tokens=20)
    browser = Browser(url, spy.chats)
    browser.send("What's the weather in Paris?", max_new_tokens=20)
    assert len(spy.calls) == 2, "a call, then the answer with its result"
    answering = spy.calls[-1][0]  # what the model read to write the final answer
    before = len(spy.calls)
    browser.send("And tomorrow?", max_new_tokens=20)
    later = spy.calls[before][0]  # the next turn's first generation
    assert [m["role"] for m in later] == ["user", "assistant", "tool", "assistant", "user"]

    def prompt(messages):
        inputs = runner.build_inputs(messages, tools=toolbox.schemas)
        return runner.tokenizer.decode(inputs["input_ids"][0])
    assert prompt(later[:3]) == prompt(answering), "the same prompt from the saved conversation"
    assert "<tool_response>\n12 °C and sunny in Paris\n</tool_response>" in prompt(later)
    browser.close()


def test_retry_and_undo_change_the_saved_conversation_too(serve, llama_runner):
    url, spy = serve(llama_runner)
    browser = Browser(url, spy.chats)
    browser.send("first")
    _, chat_list = browser.send("second")
    conversation = chat_list["value"]
    store = spy.chats.store

    def saved():
        return [(m["role"], app.text_of(m)) for m in store.messages(_user(spy), conversation)]
    first_answer, second_answer = saved()[1][1], saved()[3][1]
    assert saved() == [("user", "first"), ("assistant", first_answer), ("user", "second"), ("assistant", second_answer)]
    browser.call("begin_retry", browser.kept, "")
    retried = browser.client.predict("", 8, 1.5, 1.0, fn_index=event(spy.chats, "respond"))
    new_answer = next(b["content"] for b in reversed(retried) if b["role"] == "assistant" and not b["metadata"])
    shown = new_answer[0]["text"] if isinstance(new_answer, list) else new_answer
    def words(text):  # (the chat shows a sampled answer's spaces and tabs its own way)
        return " ".join(text.split())
    assert words(spy.streams[-1].text).startswith(words(shown)), "what was shown is the new answer"
    assert saved() == [("user", "first"), ("assistant", first_answer), ("user", "second"),
                       ("assistant", spy.streams[-1].text)], "retry replaces the answer with the new one"
    _, textbox = browser.call("undo")
    assert textbox["value"]["text"] == "second"
    assert saved() == [("user", "first"), ("assistant", first_answer)], "undo takes the message and its answer out"
    browser.close()


def test_an_edit_refused_while_the_chat_answers_elsewhere_is_undone_on_screen(llama_runner, monkeypatch):
    """(The refusal said "Wait for the answer to end", and the bubble kept the edited text as
    if it were saved.)"""
    import asyncio
    import gradio as gr
    chats = app.build_demo(llama_runner).chats
    user = "browser:ann"
    conversation = chats.store.create(user, "a chat")
    chats.store.append(user, conversation, [{"role": "user", "content": [{"type": "text", "text": "m1 alpha"}]},
                                            {"role": "assistant", "content": [{"type": "text", "text": "a1"}]}])
    stored = chats.store.messages(user, conversation)
    monkeypatch.setattr(app, "BUSY_WAIT_S", 0.1)

    async def edit_while_another_tab_answers():
        await chats.turns.acquire(conversation)
        try:
            return await chats.begin_edit(SimpleNamespace(index=0, value="m1 EDITED"), conversation, user, {}, "",
                                          app.version_of(stored))
        finally:
            chats.turns.release(conversation)
    with pytest.raises(gr.Error) as refusal:
        asyncio.run(edit_while_another_tab_answers())
    assert refusal.value.message.startswith("Wait for the answer to end")
    shown = json.dumps(refusal.value.outputs[1])
    assert "m1 alpha" in shown and "EDITED" not in shown, "the tab shows the chat as saved"
    assert chats.store.messages(user, conversation) == stored


def test_a_tab_that_shows_an_old_chat_changes_nothing_it_did_not_show(serve, llama_runner):
    """One user, two tabs: the other tabs opened the chat at m1, a1, m2, a2; then the first undid
    m2 and sent m3. An undo, a retry or an edit in a tab still showing m2 would change turns it
    never showed: each is refused with a message, the saved chat stays as it is, nothing runs,
    and the tab then shows the chat as it is (and may go on from there)."""
    import asyncio
    import gradio as gr
    url, spy = serve(llama_runner)
    first = Browser(url, spy.chats)
    first.send("m1 alpha")
    _, chat_list = first.send("m2 beta")
    conversation, user = chat_list["value"], _user(spy)
    undoing, retrying = (Browser(url, spy.chats, kept={**first.kept, "open": conversation})  # (tabs on this chat)
                         for _ in range(2))
    assert "m2 beta" in json.dumps(undoing.shown) and "m2 beta" in json.dumps(retrying.shown)
    shown_there = spy.chats.store.messages(user, conversation)  # (what those tabs show)
    m2_bubble = next(i for i, b in enumerate(undoing.shown) if b["role"] == "user" and "m2 beta" in json.dumps(b))
    first.call("undo")
    first.send("m3 gamma")

    def saved():
        return spy.chats.store.messages(user, conversation)
    now, answers = saved(), len(spy.streams)
    assert [app.text_of(m) for m in now if m["role"] == "user"] == ["m1 alpha", "m3 gamma"]

    message, (shown, textbox) = undoing.refused("undo")
    assert message == app.CHANGED_MEANWHILE
    assert "m3 gamma" in json.dumps(shown) and "m2 beta" not in json.dumps(shown), "the tab shows the chat as it is"
    assert "m3 gamma" not in json.dumps(textbox), "nothing lands in the input box"
    assert saved() == now, "m3 and its answer are kept"

    message, (shown, *_) = retrying.refused("begin_retry", retrying.kept, "")
    assert message == app.CHANGED_MEANWHILE and "m3 gamma" in json.dumps(shown)

    edited = SimpleNamespace(index=m2_bubble, value="m2 beta, edited")  # (an edit's event data: as the page sends it)
    with pytest.raises(gr.Error) as refusal:
        asyncio.run(spy.chats.begin_edit(edited, conversation, user, first.kept, "", app.version_of(shown_there)))
    assert refusal.value.message == app.CHANGED_MEANWHILE and "m3 gamma" in json.dumps(refusal.value.outputs[1]), \
        "a Refusal: the page then shows the chat as it is"
    assert saved() == now and len(spy.streams) == answers, "nothing changed, nothing ran"

    _, textbox = undoing.call("undo")  # the tab now shows m3: its undo is m3's
    assert textbox["value"]["text"] == "m3 gamma" and saved() == now[:2]
    first.close(), undoing.close(), retrying.close()


def _user(spy) -> str:
    (user,) = {row[0] for row in spy.chats.store._db.execute("SELECT user FROM conversations")}
    return user


def test_export_then_import_gives_the_same_conversation(serve, idefics3_runner, images):
    url, spy = serve(idefics3_runner)
    browser = Browser(url, spy.chats)
    from gradio_client import handle_file
    browser.call("begin_turn", {"text": "What is this?", "files": [handle_file(str(images["red"]))]}, browser.kept, "")
    browser.client.predict("", 8, 0.0, 1.0, fn_index=event(spy.chats, "respond"))
    exported = browser.call("export")
    paths = {Path(item["value"] if isinstance(item, dict) else item).suffix: item for item in exported["value"]} \
        if isinstance(exported, dict) else {Path(p).suffix: p for p in exported}
    markdown = Path(paths[".md"]).read_text()
    assert "# What is this?" in markdown and "*(an image)*" in markdown
    original = json.loads(Path(paths[".json"]).read_text())
    assert original["messages"][0]["content"][0]["data"], "the image is inside the JSON"
    from gradio_client import handle_file as file
    shown, _, chat_list, *_ = browser.call("import_chat", file(paths[".json"]), browser.kept, "")
    conversation = chat_list["value"]
    user = _user(spy)
    assert len(spy.chats.store.conversations(user)) == 2
    assert spy.chats.store.export_json(user, conversation)["messages"] == original["messages"]
    assert any(b.get("role") == "user" and "What is this?" in json.dumps(b) for b in shown)
    bad = Path(paths[".json"]).with_name("not-a-chat.json")
    bad.write_text(json.dumps({"hello": 1}))
    with pytest.raises(Exception, match="not a conversation exported by this app"):
        browser.call("import_chat", file(str(bad)), browser.kept, "")
    browser.close()


@pytest.mark.parametrize("content, message", [
    ("[" * 200_000, r"not a conversation exported by this app \(its JSON is nested too deeply to read\)"),
    ("\ufeff{not json", r"not a conversation exported by this app \(not JSON\)"),
    (json.dumps({"format": "local-model-chat/conversation", "version": 1.5, "messages": []}),
     r"version \(1.5\) is not one this app knows"),
    (json.dumps({"format": "local-model-chat/conversation", "version": 1, "title": "empty", "messages": []}),
     r"This conversation file holds no messages"),  # (it added an empty chat to the list)
])
def test_an_import_that_cant_be_read_says_why(llama_runner, tmp_path, content, message):
    """(Deeply nested JSON gave only "Something went wrong on the server".)"""
    import gradio as gr
    chats = app.build_demo(llama_runner).chats
    upload = tmp_path / "chat.json"
    upload.write_text(content, encoding="utf-8")
    with pytest.raises(gr.Error, match=message):
        chats.import_chat(str(upload), "browser:ann", {}, "")
    assert chats.store.conversations("browser:ann") == []


def test_limits_per_user_are_told_when_reached(serve, llama_runner):
    url, spy = serve(llama_runner, max_saved_chats_per_user=1, max_saved_bytes_per_user=3000)
    browser = Browser(url, spy.chats)
    browser.send("one")
    browser.call("new_chat", browser.kept, "")
    with pytest.raises(Exception, match="1 saved conversations, the most this server keeps"):
        browser.call("begin_turn", {"text": "two", "files": []}, browser.kept, "")
    conversation = spy.chats.store.conversations(_user(spy))[0].id
    browser.call("open_chat", conversation, browser.kept, "")
    with pytest.raises(Exception, match=r"This message takes \d+\.\d KB to save, and the most this server keeps for "
                                        r"one user is 2.9 KB: send a smaller one"):
        browser.send("x" * 4000)  # (refused before the model runs)
    with pytest.raises(Exception, match=r"This message takes 2\.\d KB to save, and your saved conversations hold "
                                        r"\d+\.\d KB; the most this server keeps for one user is 2.9 KB: delete some, "
                                        r"or send a smaller one"):
        browser.send("x" * 1400)


def test_an_answer_past_the_byte_limit_is_kept_and_the_next_message_refused_before_it_runs(serve, llama_runner):
    """(The model wrote the whole answer, then it was thrown away: "This answer was not saved";
    each try left a new chat holding only its message.)"""
    url, spy = serve(llama_runner, max_saved_bytes_per_user=400)
    browser = Browser(url, spy.chats)
    shown, _ = browser.send("one", max_new_tokens=40)
    store, user = spy.chats.store, _user(spy)
    (chat,) = store.conversations(user)
    saved = store.messages(user, chat.id)
    assert [m["role"] for m in saved] == ["user", "assistant"] and app.text_of(saved[1])
    assert "not saved" not in json.dumps(shown)
    answers = len(spy.streams)
    browser.call("new_chat", browser.kept, "")
    with pytest.raises(Exception, match="the most this server keeps for one user"):
        browser.call("begin_turn", {"text": "two", "files": []}, browser.kept, "")
    assert len(store.conversations(user)) == 1 and len(spy.streams) == answers, "no chat made, nothing generated"
    store.delete(user, chat.id)  # (room again, for a message that alone is over the limit)
    with pytest.raises(Exception, match=r"This message takes \d+\.\d KB to save, and the most this server keeps for "
                                        r"one user is 0.4 KB: send a smaller one"):
        browser.call("begin_turn", {"text": "x" * 500, "files": []}, browser.kept, "")
    assert store.conversations(user) == [] and len(spy.streams) == answers


@contextlib.contextmanager
def running_app(data: Path, model: Path):
    """`python app.py` on `model` (a bench-llama: long answers), its chats kept in `data`, with
    a session begun: (the process, a client, its events' indexes, the browser's kept state).
    Killed at the end if it still runs."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_SERVER_PORT": str(port), "DATA_DIR": str(data)}
    command = [sys.executable, str(ROOT / "app.py"), "--model", str(model), "--device", "cpu"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True)  # (a group of its own, as a service has)
    try:
        assert wait_until_loaded(port, process), "the app did not start"
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        indexes = _event_indexes_of_running_app(client)
        kept, _, _ = client.predict({}, fn_index=indexes["start_session"])
        yield process, client, indexes, kept
    finally:
        if process.poll() is None:
            process.kill()


def the_one_saved_chat(data: Path) -> list[dict]:
    """The messages of the one conversation saved in `data` (by the one user there)."""
    store = ConversationStore(data)
    (user,) = {row[0] for row in store._db.execute("SELECT user FROM conversations")}
    (summary,) = store.conversations(user)
    return store.messages(user, summary.id)


def test_a_killed_app_loses_at_most_the_answer_it_was_writing(tmp_path):
    """SIGKILL mid-answer: the finished turn before it is whole, and the message being
    answered is kept; the app starts again on the same data and lists it."""
    from tests.tiny_models import build_bench_llama
    data = tmp_path / "data"
    with running_app(data, build_bench_llama(tmp_path / "bench-llama")) as (process, client, indexes, kept):
        client.predict({"text": "a finished turn", "files": []}, kept, "", fn_index=indexes["begin_turn"])
        client.predict("", 5, 0.0, 1.0, fn_index=indexes["respond"])
        client.predict("", fn_index=indexes["end_turn"])
        client.predict({"text": "tell me a very long story", "files": []}, kept, "", fn_index=indexes["begin_turn"])
        job = client.submit("", 4000, 0.0, 1.0, fn_index=indexes["respond"])
        wait_for(lambda: len(job.outputs()) >= 3, 60, "the answer to stream")
        os.kill(process.pid, signal.SIGKILL)
        process.wait(10)
    saved = the_one_saved_chat(data)
    assert [(m["role"], app.text_of(m)) for m in saved][:3] == [
        ("user", "a finished turn"), ("assistant", app.text_of(saved[1])), ("user", "tell me a very long story")]
    assert app.text_of(saved[1]) and len(saved) == 3, "the finished turn is whole; only the answer being written is lost"
    # opened again, the message shows a note saying it got no answer
    assert app.chat_bubbles(saved)[-1] == app.bubble(app.NO_ANSWER, title=app.NOTE_TITLE)
    # the next message sent there gets a bubble of its own, the one before it keeps its note
    shown = app.chat_bubbles([*saved, {"role": "user", "content": [{"type": "text", "text": "are you back?"}]}],
                             answering=True)
    assert [(b["role"], (b.get("metadata") or {}).get("title")) for b in shown][-3:] == [
        ("user", None), ("assistant", app.NOTE_TITLE), ("user", None)]
    assert shown[-2]["content"] == app.NO_ANSWER


@pytest.mark.parametrize("signalled", ["the app", "its whole group"])
def test_an_app_stopped_mid_answer_keeps_what_was_streamed(tmp_path, signalled):
    """SIGTERM mid-answer, to the app alone (docker stop) or to its whole process group, engine
    included (systemd): the app stops the answer and saves what was streamed, with a note that
    the app was stopped, before it exits; started again, the chat shows it."""
    from tests.tiny_models import build_bench_llama
    data = tmp_path / "data"
    with running_app(data, build_bench_llama(tmp_path / "bench-llama")) as (process, client, indexes, kept):
        client.predict({"text": "tell me a very long story", "files": []}, kept, "", fn_index=indexes["begin_turn"])
        job = client.submit("", 4000, 0.0, 1.0, fn_index=indexes["respond"])
        wait_for(lambda: len(job.outputs()) >= 5, 60, "the answer to stream")
        answer = next(b["content"] for b in reversed(job.outputs()[-1]) if b["role"] == "assistant" and not b["metadata"])
        shown = answer[0]["text"] if isinstance(answer, list) else answer
        if signalled == "the app":
            process.send_signal(signal.SIGTERM)
        else:
            os.killpg(process.pid, signal.SIGTERM)
        assert process.wait(30) == 0, process.stderr.read().decode()
    saved = the_one_saved_chat(data)
    assert [m["role"] for m in saved] == ["user", "assistant"]
    assert app.text_of(saved[1]).strip().startswith(shown.strip()) and len(shown.strip()) > 10, \
        "what was streamed is kept"
    assert saved[1]["notes"] == [app.APP_STOPPED] and not saved[1].get("error"), \
        "the app's note alone: the engine, signalled too, is not said to have failed"
    assert app.APP_STOPPED in json.dumps(app.chat_bubbles(saved)) and app.NO_ANSWER not in json.dumps(app.chat_bubbles(saved))


def test_the_last_message_left_without_an_answer_says_so_and_retry_answers_it(serve, llama_runner):
    """The app stopped (killed) while answering the last message: opened again, the chat shows
    a note under it, and retry answers it. A message being answered in this tab gets no note."""
    url, spy = serve(llama_runner)
    browser = Browser(url, spy.chats)
    shown = browser.call("begin_turn", {"text": "a finished turn", "files": []}, browser.kept, "")[0]
    answered = browser.client.predict("", 8, 0.0, 1.0, fn_index=event(spy.chats, "respond"))
    _, chat_list, _, _ = browser.call("end_turn", "")
    assert app.NO_ANSWER not in json.dumps([shown, answered]), "no note while (and after) it is answered"
    conversation, user = chat_list["value"], _user(spy)
    left = {"role": "user", "content": [{"type": "text", "text": "left without an answer"}]}
    spy.chats.store.append(user, conversation, [left])  # (what a killed app leaves)
    reopened = Browser(url, spy.chats, kept={**browser.kept, "open": conversation})
    assert [b["content"] for b in reopened.shown[-2:]] == [[{"text": "left without an answer", "type": "text"}],
                                                           [{"text": app.NO_ANSWER, "type": "text"}]]
    retried = reopened.call("begin_retry", reopened.kept, "")[0]
    assert app.NO_ANSWER not in json.dumps(retried), "retried: it is being answered"
    reopened.client.predict("", 8, 0.0, 1.0, fn_index=event(spy.chats, "respond"))
    saved = spy.chats.store.messages(user, conversation)
    assert [(m["role"], app.text_of(m)) for m in saved] == [
        ("user", "a finished turn"), ("assistant", app.text_of(saved[1])),
        ("user", "left without an answer"), ("assistant", spy.streams[-1].text)]
    assert app.NO_ANSWER not in json.dumps(reopened.call("end_turn", "")[0])
    browser.close(), reopened.close()


def test_an_edit_after_a_message_left_without_an_answer_edits_the_message_it_shows():
    """The note drawn after a message that got no answer is a bubble too: an edit of a later
    message still finds that message (not the one after it)."""
    def user(text):
        return {"role": "user", "content": [{"type": "text", "text": text}]}

    def answer(text):
        return {"role": "assistant", "content": [{"type": "text", "text": text}]}

    for stored in ([user("A"), user("B"), answer("b"), user("C"), answer("c")],
                   [user("A"), user("B"), user("C"), answer("c")]):
        shown = app.chat_bubbles(stored)
        for index, bubble in enumerate(shown):
            if bubble["role"] == "user":
                assert app.text_of(stored[app.Chats._message_of_bubble(stored, index)]) == bubble["content"][-1]
        assert [b["content"] for b in shown].count(app.NO_ANSWER) == (1 if len(stored) == 5 else 2)


def _event_indexes_of_running_app(client) -> dict[str, int]:
    """The Chats events of an app in another process, by their function names in its config."""
    names = {}
    for index, dependency in enumerate(client.config["dependencies"]):
        fn = dependency.get("fn_name") or dependency.get("api_name")
        names.setdefault(fn, dependency.get("id", index))
    return names


@pytest.mark.parametrize("damage, expected", [
    ("corrupt", "is not a chat database this app can read"),
    ("damaged", "is damaged"),
    ("newer", "was written by a newer version of this app"),
    ("foreign", "it holds other tables"),
])
def test_a_database_it_cannot_read_is_one_line_at_start_and_kept(tmp_path, damage, expected):
    data = tmp_path / "data"
    data.mkdir()
    database = data / "chats.sqlite3"
    if damage == "corrupt":
        database.write_bytes(b"this is not sqlite" * 100)
    elif damage == "damaged":  # (a SQLite database whose later pages are garbage: it opened, then every page load failed)
        from tests.test_conversation_store import a_store_with_chats, damage as overwrite
        a_store_with_chats(data)
        overwrite(database)
    else:
        db = sqlite3.connect(database)
        db.execute("CREATE TABLE notes (x)" if damage == "foreign" else "PRAGMA user_version=99")
        db.commit(), db.close()
    before = database.read_bytes()
    result = subprocess.run([sys.executable, str(ROOT / "app.py"), "--data-dir", str(data), "--model", "x"],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_SERVER_PORT": str(free_port())})
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert database.read_bytes() == before, "never a silent wipe"


def test_where_the_chats_live(tmp_path, monkeypatch):
    import conversation_store
    store, where = open_store(Settings(data_dir=str(tmp_path / "mine")), environ={})
    assert store.directory == tmp_path / "mine" and "saved on this server" in where
    assert str(tmp_path) not in where, "the page never shows the server's paths"
    store, where = open_store(Settings(save=False), environ={})
    assert "not saved" in where and store.directory != tmp_path
    monkeypatch.setattr(conversation_store, "SPACE_STORAGE", tmp_path / "data")
    store, where = open_store(Settings(), environ={"SPACE_ID": "me/chat"})
    assert "until it restarts" in where, "a Space without storage says so"
    (tmp_path / "data").mkdir()
    store, where = open_store(Settings(), environ={"SPACE_ID": "me/chat"})
    assert store.directory == tmp_path / "data" / "local-model-chat" and "persistent storage" in where
    asked = []
    monkeypatch.setattr(conversation_store.platformdirs, "user_data_dir",
                        lambda name, appauthor: asked.append((name, appauthor)) or str(tmp_path / "os-folder"))
    store, _ = open_store(Settings(), environ={})
    assert asked == [("local-model-chat", False)] and store.directory == tmp_path / "os-folder", \
        "elsewhere: the OS's per-user data folder"


def test_rename_and_search_the_list(serve, llama_runner):
    url, spy = serve(llama_runner)
    browser = Browser(url, spy.chats)
    browser.send("a question about cats")
    browser.call("new_chat", browser.kept, "")
    _, chat_list = browser.send("something else entirely")
    assert titles(chat_list) == ["something else entirely", "a question about cats"], "newest first"
    found, title = browser.call("rename", "  Feline matters ", "")  # the open chat: the second one
    assert titles(found) == ["Feline matters", "a question about cats"] and title == "Feline matters"
    assert titles(browser.call("rename", "Feline matters", "cats")[0]) == ["a question about cats"], \
        "search looks at titles and text"
    assert titles(browser.call("rename", "Feline matters", "Feline")[0]) == ["Feline matters"]
    for blank in ("", "   "):  # (ignored without a word, the Title box left blank)
        message, (found, title) = browser.refused("rename", blank, "")
        assert message == app.EMPTY_TITLE and title == "Feline matters", "the box shows the title it keeps"
        assert titles(found) == ["Feline matters", "a question about cats"]
    browser.close()


def test_the_apis_keep_nothing_in_the_saved_chats(serve, llama_runner):
    import httpx
    url, spy = serve(llama_runner)
    response = httpx.post(url + "v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5})
    assert response.status_code == 200
    client = Client(url, verbose=False)
    client.submit({"text": "hello", "files": []}, "", 5, 0.0, 1.0, api_name="/chat").result(timeout=60)
    assert spy.chats.store._db.execute("SELECT COUNT(*) FROM conversations").fetchone()[0] == 0
    client.close()


def test_one_turn_at_a_time_in_a_conversation(serve, llama_runner):
    """A second message while the answer streams (a second Enter, another tab) is refused
    with a message, not queued behind it, and the first answer is saved whole."""
    from tests.conftest import hold_generation
    url, spy = serve(llama_runner, max_new_tokens=60)
    browser = Browser(url, spy.chats)
    with pytest.MonkeyPatch.context() as patch:
        release = hold_generation(patch, llama_runner.model, after_calls=5)
        job = browser.begin("first", 60)
        wait_for(lambda: spy.streams, 30, "the answer to start")
        with pytest.raises(Exception, match="Wait for the answer to end"):
            browser.call("begin_turn", {"text": "second", "files": []}, browser.kept, "")
        release.set()
        job.result(timeout=60)
    conversation = spy.chats.store.conversations(_user(spy))[0].id
    assert [(m["role"], app.text_of(m)) for m in spy.chats.store.messages(_user(spy), conversation)] == [
        ("user", "first"), ("assistant", spy.streams[-1].text)]
    browser.send("second")
    browser.close()


def test_deleting_a_chat_in_another_tab_stops_its_answer_and_that_tab_says_so(serve, llama_runner):
    """Tab 1 streams an answer; tab 2 (the same user) deletes that chat: the answer stops (not
    run to its end), and tab 1 says the chat was deleted, not "This answer was not saved"."""
    from tests.conftest import hold_generation
    url, spy = serve(llama_runner, max_new_tokens=300)
    streaming = Browser(url, spy.chats)
    with pytest.MonkeyPatch.context() as patch:
        release = hold_generation(patch, llama_runner.model, after_calls=5)
        job = streaming.begin("a long answer, please", 300)
        wait_for(lambda: spy.streams, 30, "the answer to start")
        user = _user(spy)
        conversation = spy.chats.store.conversations(user)[0].id
        deleting = Browser(url, spy.chats, kept={**streaming.kept, "open": conversation})
        deleting.call("delete", deleting.kept, "")
        release.set()
        shown = job.result(timeout=60)
    stream = spy.streams[-1]
    assert stream.join(10) and stream.finish_reason == "cancelled" and stream.new_tokens < 300, \
        "the answer stops when its chat is deleted"
    assert (shown[-1]["content"], shown[-1]["metadata"]["title"]) == (
        [{"text": app.DELETED_ELSEWHERE, "type": "text"}], app.NOTE_TITLE), "tab 1 says why its chat is gone"
    assert "not saved" not in json.dumps(shown)
    assert spy.chats.store.conversations(user) == [] and not spy.chats.halts
    for action, arguments in [("begin_retry", (streaming.kept, "")), ("undo", ())]:
        message, (shown, *_) = streaming.refused(action, *arguments)  # (Retry, Undo: still on the page)
        assert message == app.DELETED_BEFORE and shown == [], f"{action}: says the chat was deleted, and clears it"
    shown, _ = streaming.send("go on")  # (from the tab still showing the deleted chat)
    (new,) = spy.chats.store.conversations(user)
    assert [app.text_of(m) for m in spy.chats.store.messages(user, new.id)][0] == "go on", "a new chat, not an error"
    streaming.close(), deleting.close()


def test_a_message_stopped_before_its_answer_began_keeps_a_note_and_the_model_never_sees_it(serve, llama_runner):
    """Stop while the message waits in line (or before the first word): the message stays,
    with a note saying so (the next message gets a bubble of its own), and the model is
    never shown it."""
    from tests.conftest import hold_generation
    url, spy = serve(llama_runner, max_new_tokens=60)
    browser = Browser(url, spy.chats)
    with pytest.MonkeyPatch.context() as patch:
        release = hold_generation(patch, llama_runner.model, after_calls=0)
        job = browser.begin("never mind", 60)
        wait_for(lambda: spy.streams, 30, "the answer to start")
        job.cancel()
        wait_for(lambda: spy.streams[-1].closed_at is not None, 10, "Stop to reach the engine")
        release.set()
    shown, _, _, _ = browser.call("end_turn", "")
    assert [(b["role"], json.dumps(b["content"]), (b.get("metadata") or {}).get("title")) for b in shown] == [
        ("user", json.dumps([{"text": "never mind", "type": "text"}]), None),
        ("assistant", json.dumps([{"text": app.STOPPED_BEFORE_TEXT, "type": "text"}]), app.NOTE_TITLE)]
    browser.send("and now?")
    assert [m["role"] for m in spy.calls[-1][0]] == ["user"] and app.text_of(spy.calls[-1][0][0]) == "and now?"
    browser.close()


def test_a_stopped_tool_step_keeps_each_result_after_its_call():
    from engine_contract import ToolCall
    first, second = ToolCall("a", {}, "call-1"), ToolCall("b", {}, "call-2")
    answer = [{"role": "assistant", "content": [], "tool_calls": [first, second]},
              {"role": "tool", "tool_call_id": "call-1", "name": "a", "content": [{"type": "text", "text": "1"}]}]
    kept = app.settled(answer)
    assert [(m["role"], m.get("tool_call_id")) for m in kept] == [
        ("assistant", None), ("tool", "call-1"), ("tool", "call-2")], "results in the order of the calls"
    assert "stopped before it returned" in app.text_of(kept[-1])


def test_image_files_do_not_tell_which_pictures_the_server_has(tmp_path, images):
    import hashlib
    store = ConversationStore(tmp_path / "data")
    conversation = store.create("ann")
    store.append("ann", conversation, [{"role": "user", "content": [{"type": "image", "image": str(images["red"])}]}])
    (stored,) = [path for path in (tmp_path / "data" / "images").rglob("*") if path.is_file()]
    assert hashlib.sha256(images["red"].read_bytes()).hexdigest() not in stored.name, \
        "named by a keyed hash: holding the picture does not give its URL"
    assert ConversationStore(tmp_path / "data").messages("ann", conversation)[0]["content"][0]["image"] == str(stored)


def test_search_folds_case_beyond_ascii(tmp_path):
    store = ConversationStore(tmp_path / "data")
    conversation = store.create("ann")
    store.append("ann", conversation, [{"role": "user", "content": [{"type": "text", "text": "Über den Sommer"}]}])
    assert [c.id for c in store.conversations("ann", "über")] == [conversation]
    assert [c.id for c in store.conversations("ann", "SOMMER")] == [conversation]


@pytest.mark.parametrize("move_on", ["open another chat", "New chat"])
def test_a_tab_that_moves_on_mid_answer_shows_the_chat_its_next_message_goes_to(serve, llama_runner, move_on):
    """Opening another chat, or New chat, while an answer streams stops it; the turn's end
    waits for the stopped answer's save, and then drew the stopped chat over the one chosen,
    while the next message went to the chosen one (and the screen then jumped there)."""
    from tests.conftest import hold_generation
    url, spy = serve(llama_runner, max_new_tokens=300)
    browser = Browser(url, spy.chats)
    _, chat_list = browser.send("older chat")
    older = chat_list["value"]
    browser.call("new_chat", browser.kept, "")
    waiting, acquire = [], spy.chats.turns.acquire

    async def acquire_seen(key, timeout=None):
        waiting.append(key)
        return await acquire(key, timeout)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(spy.chats.turns, "acquire", acquire_seen)
        release = hold_generation(patch, llama_runner.model, after_calls=3)
        job = browser.begin("a long answer, please", 300)
        wait_for(lambda: len(waiting) == 1 and len(spy.streams) == 2, 30, "the answer to start")
        stopped = waiting[0]
        ending = browser.client.submit("", fn_index=event(spy.chats, "end_turn"))  # (as the page: after the cancel)
        wait_for(lambda: len(waiting) == 2, 30, "the turn's end to wait for the save")
        if move_on == "New chat":
            browser.call("new_chat", browser.kept, "")
        else:
            browser.call("open_chat", older, browser.kept, "")
        job.cancel()
        release.set()
        shown, chat_list, _, _ = ending.result(timeout=30)
    chosen = older if move_on != "New chat" else None
    assert "a long answer" not in json.dumps(shown), "the stopped chat is not drawn over the one chosen"
    assert chat_list["value"] == chosen, "the list marks the chat on screen"
    browser.send("where does this go?")
    user = _user(spy)
    sent_to = [c.id for c in spy.chats.store.conversations(user, "where does this go")]
    assert stopped not in sent_to and (sent_to == [older] if chosen else len(sent_to) == 1)
    assert app.text_of(spy.chats.store.messages(user, stopped)[0]) == "a long answer, please", "the stopped chat is kept"
    browser.close()


def test_an_edit_that_empties_a_message_is_refused_and_the_chat_kept(serve, llama_runner):
    """(Every message from the edited one on was deleted, and an empty message saved with
    "The message is empty" under it.)"""
    import asyncio
    import gradio as gr
    url, spy = serve(llama_runner)
    browser = Browser(url, spy.chats)
    for text in ("one", "two", "three"):
        _, chat_list = browser.send(text)
    conversation, user = chat_list["value"], _user(spy)
    saved = spy.chats.store.messages(user, conversation)
    for emptied in ("", "   ", [{"text": "", "type": "text"}]):
        with pytest.raises(gr.Error) as refusal:
            asyncio.run(spy.chats.begin_edit(SimpleNamespace(index=0, value=emptied), conversation, user,
                                             browser.kept, "", app.version_of(saved)))
        assert refusal.value.message == app.EMPTY_EDIT
        assert [b["content"] for b in refusal.value.outputs[1] if b["role"] == "user"] == [["one"], ["two"], ["three"]], \
            "the tab shows the chat as saved (the bubble's edit undone)"
        assert spy.chats.store.messages(user, conversation) == saved
    browser.close()


def test_a_title_never_renamed_follows_the_first_message_and_a_renamed_one_stays(llama_runner):
    """(An edit or an undo of the first message left the chat titled by text it no longer
    held; undoing the only message left an empty chat that search still found by it.)"""
    import asyncio
    chats, user = app.build_demo(llama_runner).chats, "browser:ann"

    async def answered(begun):  # a turn begun, run to its end: (its conversation, the list after it)
        conversation, _, turn, *_ = await begun
        async for _ in chats.respond(turn, conversation, user, "", 4):
            pass
        _, chat_list, _, _, _ = await chats.end_turn(conversation, user, "")
        return conversation, chat_list.constructor_args["choices"]

    def edited(conversation, text):
        stored = chats.store.messages(user, conversation)
        return chats.begin_edit(SimpleNamespace(index=0, value=text), conversation, user, {}, "", app.version_of(stored))

    async def story():
        chat, _ = await answered(chats.begin_turn({"text": "one", "files": []}, None, user, {}, ""))
        await answered(chats.begin_turn({"text": "two", "files": []}, chat, user, {}, ""))
        _, listed = await answered(edited(chat, "one, edited"))
        assert listed == [("one, edited", chat)] and chat not in chats.retitled, "the title follows the edit"
        stored = chats.store.messages(user, chat)
        await chats.undo(chat, user, app.version_of(stored))  # (the only message left: "one, edited")
        assert chats.store.messages(user, chat) == [] and chats.store.title(user, chat) == ""
        assert chats.list_and_title(chat, user, "")[1] == "", "the Title box: a new chat's (none yet)"
        assert chats.store.conversations(user, "one") == [], "search finds no text the chat no longer holds"
        assert [c.id for c in chats.store.conversations(user)] == [chat], "the empty chat is kept"
        _, listed = await answered(chats.begin_turn({"text": "three\nlines", "files": []}, chat, user, {}, ""))
        assert listed == [("three\nlines", chat)], "its next message titles it, as a new chat's first does"
        chats.rename("Mine", chat, user, "")
        _, listed = await answered(edited(chat, "three, edited"))
        assert listed == [("Mine", chat)], "a title the user chose stays"
        await chats.undo(chat, user, app.version_of(chats.store.messages(user, chat)))
        assert chats.store.title(user, chat) == "Mine"
    asyncio.run(story())


def test_stop_during_a_tool_run_shows_what_is_kept(serve, tiny_model_paths, tmp_path):
    """README: what you see is what is kept. Stopped while its tool ran, a turn's end draws the
    call as saved: done, with the result saying it was stopped (as the chat shows after a reload)."""
    import textwrap
    from model_runner import ModelRunner
    from tools import Toolbox
    started = tmp_path / "started"
    tools = tmp_path / "slow_tools.py"
    tools.write_text(textwrap.dedent(f'''
        import time
        from pathlib import Path

        def get_weather(city: str) -> str:
            """The weather in a city now.

            Args:
                city: The city's name.
            """
            Path({str(started)!r}).touch()
            time.sleep(10)
            return "late"
    '''))
    runner = ModelRunner.load(str(tiny_model_paths["tools"]), device="cpu")
    url, spy = serve(runner, toolbox=Toolbox.load([str(tools)]), max_new_tokens=20)
    browser = Browser(url, spy.chats)
    job = browser.begin("What's the weather in Paris?", 20)
    wait_for(started.exists, 30, "the tool to start")
    job.cancel()
    shown, chat_list, _, _ = browser.call("end_turn", "")
    saved = spy.chats.store.messages(_user(spy), chat_list["value"])
    assert "stopped before it returned" in app.text_of(saved[-1])
    assert json.loads(json.dumps(shown)) == json.loads(json.dumps(
        app.gr.Chatbot().postprocess(app.chat_bubbles(saved)).model_dump())), "the tab shows what is kept"
    browser.close()


def test_a_half_emoji_in_a_message_or_a_title_is_kept_as_a_replacement_character(serve, llama_runner, monkeypatch):
    """A lone UTF-16 surrogate (half an emoji, cut by a paste or a script) is no character:
    the message is still sent, answered and saved, the half shown as U+FFFD; a title too."""
    import httpx._content  # a page's JSON.stringify sends it as "\ud83d": httpx would refuse to encode it
    monkeypatch.setattr(httpx._content, "json_dumps", lambda value, **options: json.dumps(
        value, **{**options, "ensure_ascii": True}))
    url, spy = serve(llama_runner)
    browser = Browser(url, spy.chats)
    shown, chat_list = browser.send("look \ud83d here")
    assert "look \ufffd here" in json.dumps(shown, ensure_ascii=False) and titles(chat_list) == ["look \ufffd here"]
    assert app.text_of(spy.calls[-1][0][-1]) == "look \ufffd here", "the model reads it so"
    found, title = browser.call("rename", "cats \udc00", "")
    assert titles(found) == ["cats \ufffd"] and title == "cats \ufffd"
    found = browser.call("chat_list", "cats \ud83d")  # (a search: the list's label says what it matched)
    assert titles(found) == ["cats \ufffd"] and found["label"].endswith("matching “cats \ufffd”"), found
    browser.call("rename", "cats", "")
    shown = browser.call("begin_turn", {"text": "and now?", "files": []}, browser.kept, "")[0]
    answered = browser.client.predict("Be brief \ud83d", 8, 0.0, 1.0, fn_index=event(spy.chats, "respond"))
    assert "Error" not in json.dumps(answered) and app.text_of(spy.calls[-1][0][0]) == "Be brief \ufffd", \
        "a half emoji in the system prompt (kept in the browser) is no error either"
    (conversation,) = spy.chats.store.conversations(_user(spy))
    assert [app.text_of(m) for m in spy.chats.store.messages(_user(spy), conversation.id)][0] == "look \ufffd here"
    browser.close()
