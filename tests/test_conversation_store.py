"""The conversation store (issue 21's first part: the store itself, not yet wired into the UI):
conversations kept on the server per user, structured, across restarts, never wiped."""

import base64
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from conversation_store import EXPORT_FORMAT, ConversationStore, LimitReached, NotFound, StoreError
from engine_contract import ToolCall

ROOT = Path(__file__).resolve().parent.parent


def user(text, *images):
    return {"role": "user", "content": [*({"type": "image", "image": str(p)} for p in images),
                                        {"type": "text", "text": text}]}


def assistant(text, **extra):
    return {"role": "assistant", "content": [{"type": "text", "text": text}] if text else [], **extra}


def a_tool_round(images):
    call = ToolCall("get_weather", {"city": "Paris"}, "call_1")
    return [user("What is in this picture, and the weather in Paris?", images["red"]),
            assistant("", tool_calls=[call], reasoning="I should look it up."),
            {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "duration": 0.25,
             "content": [{"type": "text", "text": "sunny, 21 °C"}]},
            assistant("A red square; Paris is sunny.", figures="9 tokens · 40.0 tokens/s")]


def test_a_conversation_survives_a_restart_with_its_images_and_tool_calls(tmp_path, images):
    store = ConversationStore(tmp_path)
    chat = store.create("ann")
    turn = a_tool_round(images)
    store.append("ann", chat, turn)
    store.close()
    reopened = ConversationStore(tmp_path)  # (the app restarted)
    [summary] = reopened.conversations("ann")
    assert summary.id == chat and summary.title == "What is in this picture, and the weather in Paris?"
    messages = reopened.messages("ann", chat)
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
    stored_image = Path(messages[0]["content"][0]["image"])
    assert stored_image.is_relative_to(tmp_path) and stored_image.read_bytes() == images["red"].read_bytes()
    assert messages[1]["tool_calls"] == [ToolCall("get_weather", {"city": "Paris"}, "call_1")]
    assert messages[1]["reasoning"] == "I should look it up." and messages[2]["duration"] == 0.25
    assert messages[3]["figures"] == "9 tokens · 40.0 tokens/s"


def test_a_saved_conversation_gives_the_model_exactly_the_prompt_it_gave_the_first_time(tmp_path, images,
                                                                                        idefics3_runner):
    first = [user("Describe this.", images["red"]), assistant("A red square."), user("And this one?", images["noise"])]
    store = ConversationStore(tmp_path)
    chat = store.create("ann")
    store.append("ann", chat, first)
    again = store.messages("ann", chat)
    original, restored = idefics3_runner.build_inputs(first), idefics3_runner.build_inputs(again)
    assert original["input_ids"].tolist() == restored["input_ids"].tolist()
    assert (original["pixel_values"] == restored["pixel_values"]).all(), "the same pictures, to the pixel"


def test_a_picture_sent_twice_is_stored_once_and_deleting_keeps_what_others_use(tmp_path, images):
    store = ConversationStore(tmp_path)
    one, two = store.create("ann"), store.create("ann")
    store.append("ann", one, [user("first", images["red"])])
    store.append("ann", two, [user("second", images["red"]), user("third", images["noise"])])
    files = lambda: sorted(p.name for p in (tmp_path / "images").rglob("*") if p.is_file())  # noqa: E731
    assert len(files()) == 2, "the red picture is kept once"
    store.delete("ann", two)
    assert len(files()) == 1, "the noise picture went with its conversation; the red one is still used"
    store.delete("ann", one)
    assert files() == [] and store.conversations("ann") == []


def test_nobody_opens_another_users_conversation(tmp_path, images):
    store = ConversationStore(tmp_path)
    anns = store.create("ann")
    store.append("ann", anns, [user("ann's secret", images["red"])])
    assert store.conversations("bob") == [] and store.conversations("bob", search="secret") == []
    for attempt in (lambda: store.messages("bob", anns), lambda: store.rename("bob", anns, "mine"),
                    lambda: store.delete("bob", anns), lambda: store.append("bob", anns, [user("hi")]),
                    lambda: store.export_json("bob", anns)):
        with pytest.raises(NotFound, match="does not exist"):
            attempt()
    with pytest.raises(NotFound):  # guessing ids: the same answer as someone else's
        store.messages("bob", "not-a-real-id")
    assert len(anns) >= 24, "ids are long random tokens, not counters"
    assert store.messages("ann", anns)[0]["content"][1]["text"] == "ann's secret"


def test_the_list_is_newest_first_searchable_and_renamable(tmp_path):
    store = ConversationStore(tmp_path)
    cats, dogs = store.create("ann"), store.create("ann")
    store.append("ann", cats, [user("Tell me about cats"), assistant("Cats purr.")])
    store.append("ann", dogs, [user("Tell me about dogs"), assistant("Dogs bark 100% of the time.")])
    assert [s.id for s in store.conversations("ann")] == [dogs, cats]
    store.append("ann", cats, [user("And kittens?")])
    assert [s.id for s in store.conversations("ann")] == [cats, dogs], "the one just used comes first"
    assert [s.id for s in store.conversations("ann", search="PURR")] == [cats], "answers are searched too"
    assert [s.id for s in store.conversations("ann", search="100%")] == [dogs], "a % is text, not a wildcard"
    store.rename("ann", dogs, "  Dogs  ")
    assert [s.title for s in store.conversations("ann", search="dogs")] == ["Dogs"]


def test_export_and_import_round_trip(tmp_path, images):
    store = ConversationStore(tmp_path / "one")
    chat = store.create("ann")
    store.append("ann", chat, a_tool_round(images))
    exported = json.loads(json.dumps(store.export_json("ann", chat)))  # (through a file)
    markdown = store.export_markdown("ann", chat)
    assert "What is in this picture" in markdown and "get_weather" in markdown and "sunny" in markdown
    other = ConversationStore(tmp_path / "two")
    imported = other.import_json("bob", exported)
    assert [m["role"] for m in other.messages("bob", imported)] == ["user", "assistant", "tool", "assistant"]
    assert other.export_json("bob", imported)["messages"] == exported["messages"], "the same conversation"
    picture = Path(other.messages("bob", imported)[0]["content"][0]["image"])
    assert picture.read_bytes() == images["red"].read_bytes(), "the picture, byte for byte"


@pytest.mark.parametrize("damage, message", [
    (lambda e: {"format": "something else"}, "not a conversation exported by this app"),
    (lambda e: {**e, "version": 99}, "newer version"),
    (lambda e: {**e, "messages": [{"role": "user", "content": [{"type": "image", "data": "bm90IGFuIGltYWdl"}]}]},
     "damaged.*not readable"),
    (lambda e: {**e, "messages": [{"role": "wizard", "content": []}]}, "damaged"),
])
def test_a_bad_import_is_refused_and_leaves_nothing(tmp_path, images, damage, message):
    store = ConversationStore(tmp_path)
    chat = store.create("ann")
    store.append("ann", chat, [user("hi", images["red"])])
    with pytest.raises(StoreError, match=message):
        store.import_json("ann", damage(store.export_json("ann", chat)))
    assert [s.id for s in store.conversations("ann")] == [chat]


def an_export(*messages) -> dict:
    return {"format": EXPORT_FORMAT, "version": 1, "title": "imported",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}, *messages]}


def answer(**extra) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": "yo"}], **extra}


@pytest.mark.parametrize("message, field", [
    (answer(figures=123), "figures"),
    (answer(notes=5), "notes"),
    (answer(notes=["fine", 7]), "notes"),
    (answer(reasoning={"text": "hmm"}), "reasoning"),
    (answer(error=["it failed"]), "error"),
    (answer(reasoning="hmm", reasoning_seconds="2.5"), "reasoning_seconds"),
    (answer(reasoning="hmm", reasoning_seconds=True), "reasoning_seconds"),
    ({"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "duration": "0.25",
      "content": [{"type": "text", "text": "sunny"}]}, "duration"),
    ({"role": "tool", "tool_call_id": 1, "content": [{"type": "text", "text": "sunny"}]}, "tool_call_id"),
    (answer(tool_calls=[{"id": "call_1", "name": "get_weather", "arguments": "Paris"}]), "tool_calls"),
    ({"role": "assistant", "content": [{"type": "text", "text": {"nested": 1}}]}, "part 1"),
    ({"role": "assistant", "content": "yo"}, "content"),
])
def test_an_import_whose_values_the_app_cant_show_is_refused_naming_the_message_and_field(tmp_path, message, field):
    """Such a file was imported, listed, and never opened (a pydantic error in the log)."""
    store = ConversationStore(tmp_path)
    with pytest.raises(StoreError, match=f"This conversation file is damaged: message 2: .*{field}"):
        store.import_json("ann", an_export(message))
    assert store.conversations("ann") == [], "nothing half-imported"


def test_what_an_import_accepts_the_chat_can_show(tmp_path):
    import app
    store = ConversationStore(tmp_path)
    chat = store.import_json("ann", an_export(
        answer(reasoning="hmm", reasoning_seconds=2, notes=["a note"], error="it failed", figures="9 tokens",
               tool_calls=[{"id": "call_1", "name": "get_weather", "arguments": {"city": "Paris"}}]),
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "duration": 0.25,
         "content": [{"type": "text", "text": "sunny"}]}))
    shown = app.chat_bubbles(store.messages("ann", chat))
    app.gr.Chatbot(value=shown)  # (the chat's own check of every bubble: what failed before)
    assert [b["metadata"].get("title") for b in shown if b["role"] == "assistant"] == [
        app.NOTE_TITLE, app.REASONING_TITLE, None, app.TOOL_TITLE.format("get_weather"), app.ERROR_TITLE, "9 tokens"]


def test_an_import_with_more_messages_than_a_browser_shows_is_refused(tmp_path, monkeypatch):
    """200,000 short messages were imported; opening the chat crashed the browser tab."""
    from conversation_store import MAX_IMPORT_MESSAGES
    assert 2_000 <= MAX_IMPORT_MESSAGES <= 10_000, "a long real chat fits"
    store = ConversationStore(tmp_path)
    turns = [{"role": role, "content": [{"type": "text", "text": "hi"}]} for role in ("user", "assistant")]
    fits = an_export(*turns * ((MAX_IMPORT_MESSAGES - 1) // 2))
    assert len(store.messages("ann", store.import_json("ann", fits))) <= MAX_IMPORT_MESSAGES
    with pytest.raises(StoreError, match=f"has 200,000 messages: this app imports at most {MAX_IMPORT_MESSAGES:,} messages in one chat"):
        store.import_json("ann", {**an_export(), "messages": turns * 100_000})
    assert len(store.conversations("ann")) == 1


def test_an_unknown_version_and_a_bad_image_are_told_plainly(tmp_path):
    store = ConversationStore(tmp_path)
    for version in (1.5, "1", None, 0, True):
        with pytest.raises(StoreError, match=r"version \(.*\) is not one this app knows") as refused:
            store.import_json("ann", {**an_export(), "version": version})
        assert "newer" not in str(refused.value)
    bad = an_export({"role": "assistant", "content": [
        {"type": "text", "text": "here"}, {"type": "image", "data": base64.b64encode(b"not a picture").decode()}]})
    with pytest.raises(StoreError) as refused:
        store.import_json("ann", bad)
    assert str(refused.value) == ("This conversation file is damaged: message 2: part 2 (an image) is not readable: "
                                  "it is not a whole picture of a kind this app reads (PNG, JPEG, WebP, GIF or BMP).")


def test_limits_per_user_are_told(tmp_path, images):
    store = ConversationStore(tmp_path, max_conversations=2, max_bytes=2000)
    first = store.create("ann")
    store.create("ann")
    with pytest.raises(LimitReached, match="2 saved conversations"):
        store.create("ann")
    store.create("bob")  # (another user's own count)
    with pytest.raises(LimitReached, match=r"This message takes \d+\.\d KB to save, and the most this server keeps "
                                           r"for one user is 2.0 KB: send a smaller one"):
        store.append("ann", first, [user("a picture", images["noise"])])  # larger than 2,000 bytes
    assert store.messages("ann", first) == [], "nothing half-saved"


def test_a_corrupt_or_newer_database_is_one_clear_line_and_is_kept(tmp_path):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "chats.sqlite3").write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="not a chat database this app can read; it was left as it is"):
        ConversationStore(corrupt)
    assert (corrupt / "chats.sqlite3").read_bytes() == b"this is not a database" * 100
    newer = tmp_path / "newer"
    ConversationStore(newer).close()
    with sqlite3.connect(newer / "chats.sqlite3") as db:
        db.execute("PRAGMA user_version=7")
    with pytest.raises(StoreError, match="newer version of this app.*left as it is"):
        ConversationStore(newer)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    with sqlite3.connect(foreign / "chats.sqlite3") as db:
        db.execute("CREATE TABLE accounts (id)")
    with pytest.raises(StoreError, match="other tables: accounts"):
        ConversationStore(foreign)


def damage(database: Path) -> None:
    """What a failing disk (or a bad copy) leaves: every page after the third overwritten."""
    data = bytearray(database.read_bytes())
    data[3 * 4096:] = b"\xab" * (len(data) - 3 * 4096)
    database.write_bytes(bytes(data))


def a_store_with_chats(directory: Path, count: int = 30) -> None:
    store = ConversationStore(directory)
    for i in range(count):
        store.append("ann", store.create("ann"), [user(f"question {i} " + "words " * 50)])
    store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # (all in the file, the WAL empty)
    store.close()


def test_a_damaged_database_stops_the_start_with_one_line_and_is_kept(tmp_path):
    """Its first pages whole, the rest garbage: it opened, and every page load then failed."""
    a_store_with_chats(tmp_path)
    damage(tmp_path / "chats.sqlite3")
    before = (tmp_path / "chats.sqlite3").read_bytes()
    with pytest.raises(StoreError, match=r"chats.sqlite3 is damaged \(.*malformed.*\); it was left as it is. "
                                         r"Restore it from a backup"):
        ConversationStore(tmp_path)
    assert (tmp_path / "chats.sqlite3").read_bytes() == before, "never touched"


def test_a_damaged_database_with_turns_in_its_wal_is_kept_as_it_is_too(tmp_path):
    """Killed with turns in the WAL, the database then damaged: the check writes nothing (a
    checkpoint would copy the WAL into the damaged file)."""
    a_store_with_chats(tmp_path)
    twenty_turns_then_killed(tmp_path)
    damage(tmp_path / "chats.sqlite3")
    files = {path.name: path.read_bytes() for path in tmp_path.glob("chats.sqlite3*")}
    assert files["chats.sqlite3-wal"], "turns in the WAL"
    with pytest.raises(StoreError, match="is damaged"):
        ConversationStore(tmp_path)
    assert {path.name: path.read_bytes() for path in tmp_path.glob("chats.sqlite3*")
            if not path.name.endswith("-shm")} == {k: v for k, v in files.items() if not k.endswith("-shm")}


def twenty_turns_then_killed(directory) -> str:
    """A process saves 20 turns of a new chat of ann's in `directory`, then is SIGKILLed (its
    turns in the WAL, not checkpointed): the chat's id."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        from conversation_store import ConversationStore
        store = ConversationStore({str(directory)!r})
        chat = store.create("ann")
        for i in range(20):
            store.append("ann", chat, [{{"role": "user", "content": [{{"type": "text", "text": f"turn {{i}}"}}]}}])
        print(chat, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == -signal.SIGKILL
    return result.stdout.strip()


def test_a_killed_app_loses_nothing_that_was_saved(tmp_path):
    """SIGKILL right after a turn was saved (WAL, not checkpointed): it is all there after."""
    chat = twenty_turns_then_killed(tmp_path)
    messages = ConversationStore(tmp_path).messages("ann", chat)
    assert [m["content"][0]["text"] for m in messages] == [f"turn {i}" for i in range(20)]
    assert os.path.exists(tmp_path / "chats.sqlite3")


def test_an_unwritable_data_directory_is_one_clear_line(tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    with pytest.raises(StoreError, match="Can't use .* for saved chats"):
        ConversationStore(blocked / "chats")


@pytest.mark.parametrize("what", ["file", "folder"])
def test_a_read_only_data_directory_is_told_as_such_and_left_alone(tmp_path, monkeypatch, what):
    """A healthy database that can't be written (a read-only bind mount, wrong permissions) was
    called 'not a chat database this app can read ... Move it away'."""
    store = ConversationStore(tmp_path)
    chat = store.create("ann")
    store.append("ann", chat, [user("kept")])
    store.close()
    before = (tmp_path / "chats.sqlite3").read_bytes()
    if os.geteuid() != 0:
        read_only = tmp_path / "chats.sqlite3" if what == "file" else tmp_path
        read_only.chmod(0o444 if what == "file" else 0o555)
    else:  # (root writes whatever the permissions say: what SQLite does with such a file, at its boundary)
        real_connect = sqlite3.connect

        def connect(database, *args, **kwargs):
            if what == "folder":  # a WAL database in a folder where its -shm file can't be made
                return real_connect(tmp_path / "no-such-folder" / "chats.sqlite3")  # (SQLite's own CANTOPEN)
            if not kwargs.get("uri"):  # a file it can't open for writing: SQLite opens it read-only
                database, kwargs = f"{Path(database).resolve().as_uri()}?mode=ro", {**kwargs, "uri": True}
            return real_connect(database, *args, **kwargs)
        monkeypatch.setattr(sqlite3, "connect", connect)
    try:
        with pytest.raises(StoreError) as refused:
            ConversationStore(tmp_path)
    finally:
        tmp_path.chmod(0o755)
        for path in tmp_path.glob("chats.sqlite3*"):  # (the -wal and -shm files SQLite made took the file's mode)
            path.chmod(0o644)
        monkeypatch.undo()
    assert "can't be written" in str(refused.value) and "read-only" in str(refused.value)
    assert "write access" in str(refused.value) and "--data-dir" in str(refused.value)
    assert "not a chat database" not in str(refused.value) and "Move it away" not in str(refused.value)
    assert (tmp_path / "chats.sqlite3").read_bytes() == before
    assert ConversationStore(tmp_path).messages("ann", chat)[0]["content"][0]["text"] == "kept"


def test_a_database_locked_by_another_process_is_told_as_such(tmp_path, monkeypatch):
    ConversationStore(tmp_path).close()
    holder = sqlite3.connect(tmp_path / "chats.sqlite3", isolation_level=None)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    monkeypatch.setattr("conversation_store.OPEN_WAIT_SECONDS", 0.3, raising=False)
    with pytest.raises(StoreError, match="is locked by another process .another instance of this app") as refused:
        ConversationStore(tmp_path)
    assert "not a chat database" not in str(refused.value)
    holder.close()
    ConversationStore(tmp_path).close()


def _open_at_the_same_time(directory, barrier, results):
    import users
    barrier.wait()
    try:
        store = ConversationStore(directory)
        secrets = (store._image_key, users.BrowserIds.kept_in(store)._secret)
        store.append("ann", store.create("ann"), [user(f"from {os.getpid()}")])
        results.put(secrets)
    except BaseException as error:
        results.put(f"{type(error).__name__}: {error}")


def all_at_once(target, argument, count: int) -> list:
    """`target(argument, barrier, results)` in `count` processes let go together (the barrier):
    what each put in `results`. Spawned: fork beside pytest's threads may deadlock."""
    import multiprocessing
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(count), context.Queue()
    processes = [context.Process(target=target, args=(argument, barrier, results)) for _ in range(count)]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(60)
    return outcomes


def test_two_instances_starting_at_once_on_a_new_data_directory_both_start_and_agree(tmp_path):
    """One of them died (the schema made twice, 'database is locked' on the way to WAL), or
    the two kept different secrets (images named by one key, browsers signed by another)."""
    for attempt in range(8):
        directory = tmp_path / f"data-{attempt}"
        outcomes = all_at_once(_open_at_the_same_time, directory, 2)
        assert all(isinstance(outcome, tuple) for outcome in outcomes), outcomes
        assert outcomes[0] == outcomes[1], "the same image key and browser-id secret"
        assert outcomes[0] == ((directory / "images.key").read_bytes(), (directory / "browser-ids.secret").read_bytes())
        assert len(ConversationStore(directory).conversations("ann")) == 2


def _keep_a_secret_at_the_same_time(path, barrier, results):
    from conversation_store import kept_secret
    barrier.wait()
    results.put(kept_secret(path))


def test_processes_drawing_a_kept_secret_at_once_all_keep_the_same(tmp_path):
    """(os.replace let the last one win, after the first had already used its own: 7 of 30.)"""
    for attempt in range(10):
        path = tmp_path / f"secret-{attempt}"
        kept = set(all_at_once(_keep_a_secret_at_the_same_time, path, 3))
        assert kept == {path.read_bytes()} and len(path.read_bytes()) == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"secret-{n}" for n in range(10)), "no .part left"


def test_a_secret_that_cannot_be_kept_is_one_line_naming_the_fix(tmp_path, monkeypatch):
    """(A read-only data folder with images.key but no browser-ids.secret: a traceback at start.)"""
    import users
    store = ConversationStore(tmp_path)
    (tmp_path / users.SECRET_FILE).mkdir()  # (a folder in the way)
    with pytest.raises(StoreError, match=f"Can't use {tmp_path / users.SECRET_FILE} for saved chats: Is a directory"):
        users.BrowserIds.kept_in(store)
    (tmp_path / users.SECRET_FILE).rmdir()

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(os, "open", refused)  # (as root, a read-only folder is writable)
    with pytest.raises(StoreError, match=r"can't be written \(Permission denied\).*Give the app's user write access"):
        users.BrowserIds.kept_in(store)


def test_pil_images_are_stored_as_png(tmp_path):
    store = ConversationStore(tmp_path)
    chat = store.create("ann")
    store.append("ann", chat, [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (4, 4))},
                                                            {"type": "text", "text": "drawn"}]}])
    path = Path(store.messages("ann", chat)[0]["content"][0]["image"])
    assert path.suffix == ".png" and Image.open(path).size == (4, 4)


def test_documents_audio_and_video_are_kept_exported_and_imported_as_they_came(tmp_path):
    from attachments import attachment_part
    from tests.test_documents import pdf_with_text
    from tests.test_media import audio_file, video_file
    files = {"report.pdf": pdf_with_text("Quarterly revenue rose"), "voice.wav": audio_file(".wav"),
             "clip.mp4": video_file("clip.mp4"), "notes.html": b"<script>alert(1)</script>"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    parts = [attachment_part(tmp_path / name) for name in files]
    parts[1]["transcript"] = "please call me back"
    store = ConversationStore(tmp_path / "one")
    chat = store.create("ann")
    store.append("ann", chat, [{"role": "user", "content": [*parts, {"type": "text", "text": "Look"}]},
                               assistant("Seen.")])
    saved = store.messages("ann", chat)[0]["content"]
    assert [(p["type"], p["name"]) for p in saved[:4]] == [("document", "report.pdf"), ("audio", "voice.wav"),
                                                         ("video", "clip.mp4"), ("document", "notes.html")]
    assert [Path(p[p["type"]]).read_bytes() for p in saved[:4]] == list(files.values()), "byte for byte"
    assert Path(saved[3]["document"]).suffix == ".txt", "an HTML file is never served as a page"
    assert saved[1]["transcript"] == "please call me back"
    assert [s.id for s in store.conversations("ann", search="voice.wav")] == [chat]
    assert [s.id for s in store.conversations("ann", search="call me back")] == [chat]
    markdown = store.export_markdown("ann", chat)
    assert "*(attached: report.pdf)*" in markdown and "> please call me back" in markdown

    exported = json.loads(json.dumps(store.export_json("ann", chat)))
    other = ConversationStore(tmp_path / "two")
    imported = other.import_json("bob", exported)
    assert other.export_json("bob", imported)["messages"] == exported["messages"], "the same conversation"
    lying = json.loads(json.dumps(exported))
    lying["messages"][0]["content"][1]["type"] = "video"  # (the audio said to be a video)
    with pytest.raises(StoreError, match="damaged"):
        other.import_json("bob", lying)

    store.delete("ann", chat)
    assert not any(Path(p[p["type"]]).exists() for p in saved[:4]), "deleting takes the files"
