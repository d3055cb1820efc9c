"""Beyond images (issue 23): documents, video and audio sent in the chat (through its own
events, as the browser sends them) and on /v1 (the openai client), on the tiny models.
What the model is given is read back from the prompt the engine builds; what the user sees
from the chat's bubbles. The readers themselves: test_documents.py and test_media.py."""

import base64
import io
import json
import re
import zipfile

import httpx
import openai
import pytest
from gradio_client import handle_file

import app
from attachments import attachment_part
from tests.test_documents import pdf_with_text
from tests.test_media import audio_file, video_file
from tests.test_saved_chats import Browser, event

LONG_LINES = 3000  # far more than the tiny models' 2048-token context


def send(browser: Browser, text: str, *files, max_new_tokens: int = 8) -> list[dict]:
    """A message with files, and its whole answer: what the chat showed at the end."""
    browser.call("begin_turn", {"text": text, "files": [handle_file(str(f)) for f in files]}, browser.kept, "")
    shown = browser.client.predict("", max_new_tokens, 0.0, 1.0, fn_index=event(browser.chats, "respond"))
    browser.ended = browser.call("end_turn", "")  # (chatbot, chat list, textbox, title)
    browser.conversation = browser.ended[1]["value"]
    return shown


def prompt_of(runner, messages) -> str:
    """The prompt the engine builds for these messages, as text (with what it was told)."""
    notices = []
    inputs = runner.build_inputs(messages, reserve_tokens=64, notices=notices)
    return runner.tokenizer.decode(inputs["input_ids"][0]), notices


def text(bubble) -> str:
    content = bubble["content"]
    return content if isinstance(content, str) else " ".join(item.get("text") or "" for item in content)


def notes_of(shown) -> str:
    return " ".join(text(b) for b in shown if (b.get("metadata") or {}).get("title") == app.NOTE_TITLE)


def errors_of(shown) -> str:
    return " ".join(text(b) for b in shown if (b.get("metadata") or {}).get("title") == app.ERROR_TITLE)


def answers_of(shown) -> list[str]:
    return [text(b) for b in shown if b["role"] == "assistant" and not (b.get("metadata") or {}).get("title")]


def files_shown(shown) -> list[str]:
    """The files drawn in the user's bubbles, as gradio_client gives them (downloaded: paths)."""
    return [item["file"] for b in shown if b["role"] == "user" for item in b["content"] if item["type"] == "file"]


def chips(bubbles) -> list[tuple[str, str]]:
    """(name, mime type) of each attachment the chat sends the page for these bubbles, after
    the Chatbot's own postprocessing (what the browser draws a chip or a player from)."""
    import gradio as gr
    return [(item.file.orig_name, item.file.mime_type) for message in gr.Chatbot().postprocess(bubbles).root
            if message.role == "user" for item in message.content if hasattr(item, "file")]


def long_document(tmp_path):
    path = tmp_path / "minutes.txt"
    path.write_text("\n".join(f"Line {i}: the committee discussed item {i} at length." for i in range(LONG_LINES)))
    return path


# ---------------------------------------------------------------- documents in the chat

def test_a_document_far_past_the_context_says_how_many_tokens_it_kept(llama_runner, tmp_path):
    """Under 1% kept: the note gives the tokens, not "its first 0%"."""
    path = tmp_path / "minutes.txt"
    path.write_text("\n".join(f"Line {i}: the committee discussed item {i} at length." for i in range(40_000)))
    _, notices = prompt_of(llama_runner, [{"role": "user", "content": [attachment_part(path),
                                                                       {"type": "text", "text": "Sum it up"}]}])
    [note] = [notice for notice in notices if "minutes.txt is too long" in notice]
    assert re.search(r"got its first [\d,]+ tokens \(less than 1%\)", note), note


def test_a_pdf_in_the_chat_is_text_for_the_model_and_a_chip_on_screen(serve, llama_runner, tmp_path):
    url, spy = serve(llama_runner)
    pdf = tmp_path / "report.pdf"
    pdf.write_bytes(pdf_with_text("Quarterly revenue rose", "Costs fell"))
    browser = Browser(url, spy.chats)
    shown = send(browser, "Summarise it", pdf)

    assert [path[-4:] for path in files_shown(shown)] == [".pdf"]
    assert "Quarterly revenue rose" not in json.dumps(shown), "the chat shows the file, not its text"
    assert answers_of(shown) and not errors_of(shown)
    prompt, _ = prompt_of(llama_runner, spy.calls[-1][0])
    assert "[report.pdf, page 1]\nQuarterly revenue rose" in prompt and "[report.pdf, page 2]\nCosts fell" in prompt
    assert prompt.index("Costs fell") < prompt.index("Summarise it")

    # saved: the chat reopened shows the chip again, and the next turn still gives the model the text
    conversation = browser.conversation
    assert len(files_shown(browser.call("open_chat", conversation, browser.kept, "")[0])) == 1
    assert chips(app.chat_bubbles(spy.chats.store.messages(_user(spy), conversation))) == [
        ("report.pdf", "application/pdf")], "a chip with the file's own name"
    send(browser, "And the costs?")
    prompt, _ = prompt_of(llama_runner, spy.calls[-1][0])
    assert "Costs fell" in prompt and "And the costs?" in prompt
    browser.close()


def test_a_document_too_long_for_the_context_is_cut_and_the_chat_says_how_much(serve, llama_runner, tmp_path):
    url, spy = serve(llama_runner)
    browser = Browser(url, spy.chats)
    send(browser, "Hello there")
    shown = send(browser, "What was decided?", long_document(tmp_path))
    note = notes_of(shown)
    assert "minutes.txt is too long" in note and "got its first" in note, note
    assert answers_of(shown) and not errors_of(shown)
    prompt, notices = prompt_of(llama_runner, spy.calls[-1][0])
    assert "Line 0: the committee" in prompt and f"Line {LONG_LINES - 1}:" not in prompt
    assert "cut here to fit the context" in prompt and "What was decided?" in prompt
    assert "Hello there" in prompt, "a short conversation before stays: the document gets what it leaves"
    shown = send(browser, "Thanks")
    assert answers_of(shown)[-1] and not errors_of(shown), "the next message is answered normally"
    browser.close()


def test_a_document_past_the_context_goes_straight_to_the_cut(llama_runner, tmp_path, monkeypatch):
    """A document whose tokens alone overflow the context is cut without the whole prompt
    being tokenized with all of it first (a 500-page PDF's prompt: 1,756 -> 748 ms, README),
    and the cut is the one the whole prompt's overflow led to before."""
    message = [{"role": "user", "content": [attachment_part(long_document(tmp_path)),
                                            {"type": "text", "text": "What was decided?"}]}]
    whole, apply = [], llama_runner._apply_chat_template

    def counted(messages, *args):
        whole.extend(part for m in messages for part in m["content"] if f"Line {LONG_LINES - 1}:" in part.get("text", ""))
        return apply(messages, *args)
    monkeypatch.setattr(llama_runner, "_apply_chat_template", counted)
    prompt, notices = prompt_of(llama_runner, message)
    assert not whole, "the prompt with the whole document was tokenized"
    monkeypatch.setattr(llama_runner, "_apply_chat_template", apply)
    before_notices, room = [], llama_runner.context_length - 64  # (the way before: the whole prompt, then the cut)
    overflowing = llama_runner._apply_chat_template(llama_runner.prepare_messages(message, before_notices))
    assert overflowing["input_ids"].shape[-1] > room
    cut, before = llama_runner._fit_documents(llama_runner.prepare_messages(message, []), room, before_notices, None)
    assert llama_runner.tokenizer.decode(before["input_ids"][0]) == prompt and before_notices == notices
    assert "Line 0: the committee" in prompt and "cut here to fit the context" in prompt and "What was decided?" in prompt
    assert any("minutes.txt is too long" in notice for notice in notices)
    tokens = len(llama_runner.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert 0.95 * (llama_runner.context_length - 64) <= tokens <= llama_runner.context_length - 64, "it fills what is left"


def test_documents_fill_half_the_context_before_old_turns_give_way(llama_runner, tmp_path):
    old_turns = []
    for i in range(12):
        old_turns += [{"role": "user", "content": [{"type": "text", "text": f"Old question {i} " + "word " * 40}]},
                      {"role": "assistant", "content": [{"type": "text", "text": f"Old answer {i} " + "word " * 40}]}]
    document = attachment_part(long_document(tmp_path), "minutes.txt")
    prompt, notices = prompt_of(llama_runner, [*old_turns, {"role": "user", "content": [
        document, {"type": "text", "text": "What was decided?"}]}])
    tokens = len(llama_runner.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert tokens <= llama_runner.context_length - 64
    kept = prompt[prompt.index("Line 0"):prompt.index("cut here")]
    assert len(llama_runner.tokenizer(kept)["input_ids"]) >= llama_runner.context_length // 2 - 64
    assert "Old question 0 " not in prompt and "Old question 11" in prompt, "the oldest turns made way"
    assert any("oldest" in notice for notice in notices) and any("got its first" in notice for notice in notices)


def test_a_new_document_is_read_whole_after_a_long_one_earlier_in_the_chat(llama_runner, tmp_path):
    """The earlier turn's long document gives way (it was read then): the new message's
    short one is sent whole, and the long one keeps what is left."""
    notes = tmp_path / "notes.txt"
    notes.write_text("Decision: the budget for item seven was approved by everyone.")
    prompt, notices = prompt_of(llama_runner, [
        {"role": "user", "content": [attachment_part(long_document(tmp_path), "minutes.txt"),
                                     {"type": "text", "text": "Summarize."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A long meeting."}]},
        {"role": "user", "content": [attachment_part(notes, "notes.txt"), {"type": "text", "text": "And this?"}]}])
    assert "the budget for item seven was approved by everyone" in prompt and "And this?" in prompt
    assert not any("notes.txt" in notice for notice in notices), notices
    assert "Line 0: the committee" in prompt and "[minutes.txt: cut here to fit the context" in prompt
    assert len(llama_runner.tokenizer(prompt, add_special_tokens=False)["input_ids"]) <= \
        llama_runner.context_length - 64


def test_two_long_documents_the_new_one_gets_the_room_and_the_old_one_what_it_leaves(llama_runner, tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    old, new = long_document(tmp_path / "old"), long_document(tmp_path / "new")
    new.write_text(new.read_text().replace("the committee", "the board"))
    prompt, notices = prompt_of(llama_runner, [
        {"role": "user", "content": [attachment_part(old, "minutes.txt"), {"type": "text", "text": "Summarize."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A long meeting."}]},
        {"role": "user", "content": [attachment_part(new, "board.txt"), {"type": "text", "text": "And this?"}]}])
    kept = prompt[prompt.index("Line 0: the board"):prompt.index("[board.txt: cut here")]
    assert len(llama_runner.tokenizer(kept)["input_ids"]) >= 0.9 * (llama_runner.context_length - 64) - 200
    assert "the committee" not in prompt and "[minutes.txt: left out to fit the context]" in prompt
    assert any("board.txt is too long" in notice for notice in notices) and "And this?" in prompt


def zip_bomb_docx(path):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("word/document.xml", "<w:document/>" + " " * (300 * 2**20))
    return path


def holding(data: bytes):
    def write(path):
        path.write_bytes(data)
        return path
    return write


BAD_FILES = {
    "empty.txt": (holding(b""), "empty.txt is empty"),
    "song.mp3": (holding(b"just some words, not a song"), "song.mp3 is not what its name says"),
    "data.csv": (holding(bytes(range(256)) * 64), "data.csv is not a document this app reads"),
    "bomb.docx": (zip_bomb_docx, "bomb.docx unpacks to"),
    "thick.pdf": (holding(pdf_with_text(*["page"] * 501)), "thick.pdf has 501 pages"),
    "broken.pdf": (holding(pdf_with_text("Hello")[:200]), "broken.pdf is not a readable PDF"),
    "noise.mp4": (holding(video_file("noise.mp4")[:1500]), "noise.mp4"),
}


@pytest.mark.parametrize("name", BAD_FILES)
def test_a_bad_file_is_one_line_in_the_chat_and_the_conversation_goes_on(serve, idefics3_runner, tmp_path, name):
    url, spy = serve(idefics3_runner)
    make, expected = BAD_FILES[name]
    browser = Browser(url, spy.chats)
    shown = send(browser, "Look at this", make(tmp_path / name))
    assert expected in errors_of(shown), errors_of(shown)
    assert "Traceback" not in json.dumps(shown)
    shown = send(browser, "Describe a dog.")
    assert answers_of(shown) and errors_of(shown).count(name) == 1, "the next message is answered normally"
    conversation = browser.conversation
    saved = spy.chats.store.messages(_user(spy), conversation)
    assert "Look at this" in json.dumps(saved) and "Describe a dog." in json.dumps(saved), "nothing typed is lost"
    browser.close()


def test_a_refused_file_shows_as_a_chip_with_its_name_not_an_empty_player():
    shown = app.file_bubble({"type": "file", "path": "/uploads/song.mp3", "name": "song.mp3",
                             "refused": "song.mp3 is not what its name says"})
    assert shown["file"]["orig_name"] == "song.mp3" and shown["file"]["mime_type"] == "application/octet-stream"
    played = app.file_bubble({"type": "audio", "audio": "/uploads/song.mp3", "name": "song.mp3"})
    assert played["file"]["mime_type"] == "audio/mpeg", "a file that was read keeps its player"


def _user(spy) -> str:
    (user,) = {row[0] for row in spy.chats.store._db.execute("SELECT user FROM conversations")}
    return user


def test_a_scanned_pdf_is_its_pages_as_pictures_for_a_vision_model_and_a_note_for_others(
        idefics3_runner, llama_runner, tmp_path):
    from PIL import Image
    scan = tmp_path / "scan.pdf"
    pages = [Image.new("RGB", (120, 160), colour) for colour in ((200, 10, 10), (10, 200, 10))]
    pages[0].save(scan, save_all=True, append_images=pages[1:])
    message = [{"role": "user", "content": [attachment_part(scan), {"type": "text", "text": "Read it"}]}]
    prompt, notices = prompt_of(idefics3_runner, message)
    assert "[scan.pdf, page 1]" in prompt and "[scan.pdf, page 2]" in prompt and "<image>" in prompt
    assert any("no text layer" in notice and "2 pages as pictures" in notice for notice in notices)
    prompt, notices = prompt_of(llama_runner, message)
    assert "scan.pdf" not in prompt and any("no text layer" in notice for notice in notices)


# ---------------------------------------------------------------- video

def test_a_video_is_frames_with_their_time_stamps_for_an_image_model(serve, idefics3_engine, idefics3_runner, tmp_path):
    url, spy = serve(idefics3_engine)  # (in this process, and in an engine process of its own)
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(video_file("clip.mp4", seconds=4.0))
    browser = Browser(url, spy.chats)
    shown = send(browser, "What happens?", clip)
    assert answers_of(shown) and not errors_of(shown)
    assert chips(app.chat_bubbles(spy.calls[-1][0]))[0] == ("clip.mp4", "video/mp4"), "a player, not frames"
    prompt, _ = prompt_of(idefics3_runner, spy.calls[-1][0])
    stamps = re.findall(r"\[clip\.mp4 at (\d+:\d\d)\]", prompt)
    assert len(stamps) == idefics3_runner.settings.video_frames == 8
    assert stamps[0] == "0:00" and stamps[-1] == "0:03" and stamps == sorted(stamps)
    assert prompt.count("<image>") >= 8
    browser.close()


def test_a_video_within_the_images_of_one_message(idefics3_runner, images, tmp_path):
    clip = tmp_path / "clip.webm"
    clip.write_bytes(video_file("clip.webm"))
    limit = idefics3_runner.settings.max_images_per_message
    message = [{"role": "user", "content": [*[attachment_part(images["red"])] * (limit - 3), attachment_part(clip),
                                            {"type": "text", "text": "Compare"}]}]
    prompt, notices = prompt_of(idefics3_runner, message)
    assert prompt.count("[clip.webm at ") == 3
    assert any("3 frames of clip.webm" in notice for notice in notices)


def test_a_short_video_is_not_said_to_be_cut_by_the_image_limits(idefics3_runner, images, tmp_path, monkeypatch):
    short = tmp_path / "short.webm"
    short.write_bytes(video_file("short.webm", seconds=0.3))  # (3 frames)
    with monkeypatch.context() as patch:  # (32 frames asked, 16 images a message allowed)
        patch.setattr(idefics3_runner, "settings", idefics3_runner.settings.replace(
            video_frames=32, max_images_per_message=16))
        prompt, notices = prompt_of(idefics3_runner, [{"role": "user", "content": [
            attachment_part(short), {"type": "text", "text": "What happens?"}]}])
    assert 1 <= prompt.count("[short.webm at ") <= 3
    assert not any("frame" in notice for notice in notices), notices
    clip = tmp_path / "clip.webm"
    clip.write_bytes(video_file("clip.webm"))
    limit = idefics3_runner.settings.max_images_per_message
    _, notices = prompt_of(idefics3_runner, [{"role": "user", "content": [
        *[attachment_part(images["red"])] * (limit - 1), attachment_part(clip), {"type": "text", "text": "Compare"}]}])
    assert any("The model sees 1 frame of clip.webm (not 8:" in notice for notice in notices), notices


def test_a_video_to_a_text_only_model_is_refused_saying_why(llama_runner, tmp_path):
    from engine_contract import ImageRefused
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(video_file("clip.mp4"))
    with pytest.raises(ImageRefused, match="text-only and can't watch a video"):
        prompt_of(llama_runner, [{"role": "user", "content": [attachment_part(clip)]}])


# ---------------------------------------------------------------- audio, without a model that listens

def test_audio_to_a_model_that_cannot_listen_says_what_would(serve, llama_runner, tmp_path):
    url, spy = serve(llama_runner)
    voice = tmp_path / "voice.wav"
    voice.write_bytes(audio_file(".wav"))
    browser = Browser(url, spy.chats)
    shown = send(browser, "", voice)
    assert "can't listen to audio" in errors_of(shown) and "--asr-model" in errors_of(shown)
    assert [mime.split("/")[0] for _, mime in chips(app.chat_bubbles(spy.chats.store.messages(
        _user(spy), browser.conversation)))] == ["audio"], "a player on screen"
    shown = send(browser, "Describe a dog.")
    assert answers_of(shown), "the next message is answered normally"
    browser.close()


# ---------------------------------------------------------------- /v1

@pytest.fixture
def api(serve, llama_runner):
    url, spy = serve(llama_runner)
    return openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0), llama_runner, spy


def data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def test_a_file_part_on_v1_is_read_as_in_the_chat(api, tmp_path):
    client, runner, spy = api
    pdf = pdf_with_text("Quarterly revenue rose")
    answer = client.chat.completions.create(model=runner.name, max_tokens=5, messages=[{"role": "user", "content": [
        {"type": "file", "file": {"file_data": data_url("application/pdf", pdf), "filename": "report.pdf"}},
        {"type": "text", "text": "Summarise it"}]}])
    assert answer.choices[0].message.content is not None
    prompt, _ = prompt_of(runner, spy.calls[-1][0])
    assert "[report.pdf, page 1]\nQuarterly revenue rose" in prompt
    assert not (answer.model_extra or {}).get("notices")

    long = long_document(tmp_path).read_bytes()
    for stream in (False, True):
        created = client.chat.completions.create(
            model=runner.name, max_tokens=5, stream=stream, messages=[{"role": "user", "content": [
                {"type": "file", "file": {"file_data": base64.b64encode(long).decode(), "filename": "minutes.txt"}},
                {"type": "text", "text": "What was decided?"}]}])
        first = next(iter(created)) if stream else created
        assert any("minutes.txt is too long" in notice and "got its first" in notice
                   for notice in first.model_extra["notices"]), "the answer says how much was kept"
        if stream:
            list(created)


def test_the_same_file_sent_under_another_name_is_named_by_its_own(api):
    """Reads are remembered by content, but what is read names the file: another client's
    request with the same bytes must not see the first one's file name."""
    client, runner, spy = api
    pdf = pdf_with_text("Quarterly revenue rose")
    for name in ("q3_plan.pdf", "notes.pdf"):
        client.chat.completions.create(model=runner.name, max_tokens=3, messages=[{"role": "user", "content": [
            {"type": "file", "file": {"file_data": data_url("application/pdf", pdf), "filename": name}},
            {"type": "text", "text": "Summarise it"}]}])
    prompt, _ = prompt_of(runner, spy.calls[-1][0])
    assert "[notes.pdf, page 1]" in prompt and "q3_plan" not in prompt
    broken = data_url("application/pdf", b"%PDF-1.4 broken twice")
    for name in ("first.pdf", "second.pdf"):
        with pytest.raises(openai.BadRequestError, match=f"{name} is not a readable PDF"):
            client.chat.completions.create(model=runner.name, max_tokens=3, messages=[{"role": "user", "content": [
                {"type": "file", "file": {"file_data": broken, "filename": name}}]}])


BAD_PARTS = [
    ({"type": "file", "file": {"file_id": "file-abc"}}, "file_id_not_supported", "inline as file.file_data"),
    ({"type": "file", "file": {"file_data": data_url("application/pdf", b"%PDF-1.4 broken"), "filename": "a.pdf"}},
     "invalid_file", "a.pdf is not a readable PDF"),
    ({"type": "file", "file": {"file_data": "not base64!", "filename": "a.txt"}}, "invalid_file", "base64"),
    ({"type": "input_audio", "input_audio": {"data": base64.b64encode(b"hello words").decode(), "format": "mp3"}},
     "invalid_file", "audio.mp3 is not what its name says"),
    ({"type": "video_url", "video_url": {"url": "https://example.com/clip.mp4"}}, "video_url_not_supported",
     "not fetched"),
    ({"type": "input_audio", "input_audio": {"data": base64.b64encode(audio_file(".wav")).decode(),
                                             "format": "wav"}}, "invalid_file", "can't listen to audio"),
]


@pytest.mark.parametrize("part, code, message", BAD_PARTS)
def test_a_bad_part_on_v1_is_a_400_naming_it(api, part, code, message):
    client, runner, _ = api
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=runner.name, max_tokens=5, messages=[
            {"role": "user", "content": [{"type": "text", "text": "Look"}, part]}])
    error = raised.value.body
    assert message in error["message"], error
    assert error["code"] == code, error
    if "listen" not in message:  # (the model's refusal names the messages, not the part)
        assert error["param"].startswith("messages[0].content[1]"), error


def test_a_video_url_part_on_v1_is_frames_for_an_image_model(serve, idefics3_runner):
    url, spy = serve(idefics3_runner)
    client = openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0)
    answer = client.chat.completions.create(model=idefics3_runner.name, max_tokens=5, messages=[
        {"role": "user", "content": [{"type": "video_url", "video_url": {"url": data_url(
            "video/mp4", video_file("clip.mp4"))}}, {"type": "text", "text": "What happens?"}]}])
    assert answer.choices[0].message.content is not None
    prompt, _ = prompt_of(idefics3_runner, spy.calls[-1][0])
    assert prompt.count("[video.mp4 at ") == 8


def test_each_kind_of_file_is_known_by_its_content(images, tmp_path):
    (tmp_path / "notes.md").write_text("# Notes\nbuy milk")
    (tmp_path / "clip.mov").write_bytes(video_file("clip.mov"))
    (tmp_path / "voice.ogg").write_bytes(audio_file(".ogg"))
    (tmp_path / "report.pdf").write_bytes(pdf_with_text("x"))
    assert [attachment_part(tmp_path / name)["type"] for name in ("notes.md", "clip.mov", "voice.ogg", "report.pdf")] \
        == ["document", "video", "audio", "document"]
    assert attachment_part(images["red"])["type"] == "image"
    renamed = tmp_path / "recording"  # no suffix: the content says
    renamed.write_bytes(audio_file(".wav"))
    assert attachment_part(renamed)["type"] == "audio"
    assert attachment_part(io.BytesIO(b"%PDF").getvalue(), "x.pdf")["type"] == "document"


# ---------------------------------------------------------------- audio: a model that listens, or --asr-model

@pytest.fixture(scope="module")
def audio_runner(tiny_model_paths):
    from model_runner import ModelRunner
    runner = ModelRunner.load(str(tiny_model_paths["audio"]), device="cpu")
    yield runner
    runner.close()


def audio_tokens(runner, prompt_ids) -> int:
    return sum(1 for i in prompt_ids if i == runner.tokenizer.convert_tokens_to_ids(runner.processor.audio_token))


def test_a_model_that_listens_is_given_the_audio_itself(serve, audio_runner, tmp_path):
    url, spy = serve(audio_runner)
    voice = tmp_path / "voice.ogg"
    voice.write_bytes(audio_file(".ogg", seconds=2.0))
    browser = Browser(url, spy.chats)
    shown = send(browser, "What is said?", voice)
    assert answers_of(shown) and not errors_of(shown)
    messages = spy.calls[-1][0]
    inputs = audio_runner.build_inputs(messages)
    assert inputs["input_features"].shape[0] == 1 and audio_tokens(audio_runner, inputs["input_ids"][0]) == 50
    without = audio_runner.build_inputs([{"role": "user", "content": [{"type": "text", "text": "What is said?"}]}])
    assert spy.streams[-1].prompt_tokens - without["input_ids"].shape[-1] >= 50, "the prompt's tokens count the audio"
    assert audio_runner.info.hears_audio and "audio-language" in app.header_markdown(audio_runner)
    browser.close()


def test_audio_longer_than_the_encoder_hears_goes_in_30_second_parts(audio_runner, tmp_path):
    voice = tmp_path / "talk.wav"
    voice.write_bytes(audio_file(".wav", seconds=40.0))
    inputs = audio_runner.build_inputs([{"role": "user", "content": [attachment_part(voice)]}])
    assert inputs["input_features"].shape[0] == 2, "30 s + 10 s"
    assert audio_tokens(audio_runner, inputs["input_ids"][0]) == 750 + 250


@pytest.fixture(params=["in-process", "engine-process"])
def audio_engine(request, audio_runner, tiny_model_paths):
    if request.param == "in-process":
        yield audio_runner
        return
    from engine_process import EngineProcess
    engine = EngineProcess.start(str(tiny_model_paths["audio"]), device="cpu")
    yield engine
    engine.close()


def test_input_audio_on_v1_reaches_a_model_that_listens(serve, audio_engine, audio_runner):
    url, spy = serve(audio_engine)  # (in this process, and through the engine process's pipe)
    assert audio_engine.info.hears_audio
    client = openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0)
    answer = client.chat.completions.create(model=audio_runner.name, max_tokens=5, messages=[
        {"role": "user", "content": [{"type": "text", "text": "What is said?"}, {"type": "input_audio", "input_audio": {
            "data": base64.b64encode(audio_file(".mp3")).decode(), "format": "mp3"}}]}])
    assert answer.choices[0].message.content is not None
    assert answer.usage.prompt_tokens >= 50 + 3
    assert "input_features" in audio_runner.build_inputs(spy.calls[-1][0])


@pytest.fixture(scope="module")
def transcriber(tiny_model_paths):
    from speech import Transcriber
    return Transcriber.load(str(tiny_model_paths["whisper"]))


def test_with_asr_model_speech_is_written_out_and_shown_as_the_users_words(
        serve, llama_runner, tiny_model_paths, transcriber, tmp_path):
    from media import read_audio
    url, spy = serve(llama_runner, asr_model=str(tiny_model_paths["whisper"]))
    voice = tmp_path / "voice.wav"
    voice.write_bytes(audio_file(".wav"))
    heard = transcriber.transcribe(read_audio(voice.read_bytes(), "voice.wav").samples, 16000)
    assert heard
    browser = Browser(url, spy.chats)
    shown = send(browser, "", voice)
    assert not errors_of(shown) and answers_of(shown)
    (asked,) = [b for b in shown if b["role"] == "user"]
    assert f"🎤 {heard}" in text(asked), "the transcript is shown as the user's words"
    prompt, _ = prompt_of(llama_runner, spy.calls[-1][0])
    assert heard in prompt
    saved = spy.chats.store.messages(_user(spy), browser.conversation)
    assert saved[0]["content"][0]["type"] == "audio" and saved[0]["content"][0]["transcript"] == heard
    title = f"🎤 {heard}"[:80].strip()
    assert spy.chats.store.title(_user(spy), browser.conversation) == title, "titled by what was said"
    assert browser.ended[3]["value"] == title, "and the title box shows it"
    assert "speech written out by" in app.header_markdown(llama_runner, speech=spy.chats.speech)

    # /v1: the same audio as input_audio is written out too
    client = openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0)
    client.chat.completions.create(model=llama_runner.name, max_tokens=3, messages=[{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(voice.read_bytes()).decode(),
                                                "format": "wav"}}]}])
    prompt, _ = prompt_of(llama_runner, spy.calls[-1][0])
    assert heard in prompt
    damaged = base64.b64encode(audio_file(".wav")[:60]).decode()
    refused = httpx.post(url + "v1/chat/completions", timeout=60, json={"messages": [{"role": "user", "content": [
        {"type": "text", "text": "Listen"}, {"type": "input_audio", "input_audio": {"data": damaged, "format": "wav"}}]}]})
    assert refused.status_code == 400, refused.text
    assert (refused.json()["error"]["param"], refused.json()["error"]["code"]) == ("messages[0].content[1]", "invalid_file")
    browser.close()


def test_a_damaged_video_on_v1_is_a_400_naming_its_part(serve, idefics3_runner):
    url, _ = serve(idefics3_runner)
    damaged = "data:video/mp4;base64," + base64.b64encode(video_file("clip.mp4")[:1000]).decode()
    refused = httpx.post(url + "v1/chat/completions", timeout=60, json={"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What happens?"}, {"type": "video_url", "video_url": {"url": damaged}}]}]})
    assert refused.status_code == 400 and "video.mp4" in refused.json()["error"]["message"], refused.text
    assert (refused.json()["error"]["param"], refused.json()["error"]["code"]) == ("messages[0].content[1]", "invalid_file")
    good = "data:video/mp4;base64," + base64.b64encode(video_file("clip.mp4")).decode()
    refused = httpx.post(url + "v1/chat/completions", timeout=60, json={"messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": damaged}}, {"type": "video_url", "video_url": {"url": good}}]}]})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "messages", \
        "two parts named video.mp4: not a guess that may name the good one"


def test_an_asr_model_that_cannot_load_is_one_line_in_the_chat(serve, llama_runner, tmp_path):
    url, spy = serve(llama_runner, asr_model=str(tmp_path / "no-such-model"))
    voice = tmp_path / "voice.wav"
    voice.write_bytes(audio_file(".wav"))
    browser = Browser(url, spy.chats)
    shown = send(browser, "Listen", voice)
    assert "Can't load the speech recognition model" in errors_of(shown)
    assert answers_of(send(browser, "Describe a dog.")), "the chat goes on"
    browser.close()


# ---------------------------------------------------------------- from the review: edges

def test_a_message_that_is_only_a_scan_for_a_text_only_model_is_refused_saying_why(llama_runner, tmp_path):
    from PIL import Image

    from engine_contract import ImageRefused
    scan = tmp_path / "scan.pdf"
    Image.new("RGB", (120, 160), (200, 10, 10)).save(scan)
    before = [{"role": "user", "content": [{"type": "text", "text": "Hello"}]},
              {"role": "assistant", "content": [{"type": "text", "text": "Hi"}]}]
    with pytest.raises(ImageRefused, match="Nothing in this message reaches the model: scan.pdf has no text layer"):
        prompt_of(llama_runner, [*before, {"role": "user", "content": [attachment_part(scan)]}])


def test_two_videos_share_the_images_of_one_message(idefics3_runner, tmp_path):
    clips = []
    for name in ("a.mp4", "b.webm"):
        (tmp_path / name).write_bytes(video_file(name))
        clips.append(attachment_part(tmp_path / name))
    prompt, notices = prompt_of(idefics3_runner, [{"role": "user", "content": [*clips, {"type": "text", "text": "?"}]}])
    limit = idefics3_runner.settings.max_images_per_message
    assert prompt.count("[a.mp4 at ") == 8 and prompt.count("[b.webm at ") == 0, (limit, notices)
    assert any("b.webm was left out" in notice for notice in notices)


def test_stop_while_the_audio_is_written_out_keeps_the_message(serve, llama_runner, tiny_model_paths, tmp_path):
    import asyncio
    url, spy = serve(llama_runner, asr_model=str(tiny_model_paths["whisper"]))
    writing = []

    async def slow(part, again=True):
        writing.append(part)
        await asyncio.sleep(60)

    spy.chats.speech.transcribe = slow
    voice = tmp_path / "voice.wav"
    voice.write_bytes(audio_file(".wav"))
    browser = Browser(url, spy.chats)
    browser.call("begin_turn", {"text": "Call me back", "files": [handle_file(str(voice))]}, browser.kept, "")
    job = browser.client.submit("", 8, 0.0, 1.0, fn_index=event(spy.chats, "respond"))
    from tests.conftest import wait_for
    wait_for(lambda: writing, 20, "the transcription to start")
    job.cancel()
    conversation = browser.call("end_turn", "")[1]["value"]
    saved, note = spy.chats.store.messages(_user(spy), conversation)
    assert [part["type"] for part in saved["content"]] == ["audio", "text"] and "Call me back" in json.dumps(saved)
    assert note["notes"] == [app.STOPPED_BEFORE_TEXT], "the message says it was stopped before its answer"
    browser.close()


def test_one_v1_request_carries_at_most_200_mb_of_attachments(api, monkeypatch):
    import openai_api
    client, runner, _ = api
    monkeypatch.setattr(openai_api, "MAX_REQUEST_ATTACHMENT_BYTES", 3000)
    part = {"type": "file", "file": {"file_data": base64.b64encode(b"words " * 300).decode(), "filename": "a.txt"}}
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=runner.name, max_tokens=3, messages=[
            {"role": "user", "content": [part, part, {"type": "text", "text": "Compare"}]}])
    assert raised.value.body["code"] == "request_too_large" and "in all" in raised.value.body["message"]
    answer = client.chat.completions.create(model=runner.name, max_tokens=3, messages=[
        {"role": "user", "content": [part, {"type": "text", "text": "Read"}]}])
    assert answer.choices[0].finish_reason == "length"


def test_a_file_that_cannot_be_read_is_not_read_again_each_turn(llama_runner, tmp_path, monkeypatch):
    import reader_process
    from engine_contract import ImageRefused
    reads, run = [], reader_process.run

    def counted(read, source, name, *arguments):
        reads.append(name)
        return run(read, source, name, *arguments)
    monkeypatch.setattr(reader_process, "run", counted)
    path = tmp_path / "broken.pdf"
    path.write_bytes(b"%PDF-1.7\n" + b"\x00garbage" * 100)
    message = {"role": "user", "content": [attachment_part(path, "broken.pdf"), {"type": "text", "text": "Read it"}]}
    for _ in range(2):
        with pytest.raises(ImageRefused, match="broken.pdf"):
            llama_runner.build_inputs([message])
    assert reads == ["broken.pdf"]


def test_a_v1_body_over_the_limit_is_a_413_before_it_is_read(serve, llama_runner, monkeypatch):
    """Declared (Content-Length) or streamed in chunks, a body past MAX_REQUEST_BODY_BYTES is
    refused in OpenAI's error shape, and the server goes on answering."""
    import httpx

    import openai_api
    monkeypatch.setattr(openai_api, "MAX_REQUEST_BODY_BYTES", 64 * 1024)
    url, _ = serve(llama_runner)
    body = json.dumps({"model": llama_runner.name, "max_tokens": 2, "messages": [
        {"role": "user", "content": "word " * 40_000}]}).encode()

    def chunks():
        for start in range(0, len(body), 8192):
            yield body[start:start + 8192]
    for content in (body, chunks()):
        refused = httpx.post(url + "v1/chat/completions", content=content, timeout=30,
                             headers={"Content-Type": "application/json"})
        assert refused.status_code == 413, refused.text
        error = refused.json()["error"]
        assert error["code"] == "request_too_large" and "MB" in error["message"]
    client = openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0)
    answer = client.chat.completions.create(model=llama_runner.name, max_tokens=2,
                                            messages=[{"role": "user", "content": "Hello"}])
    assert answer.choices[0].finish_reason == "length"


def test_a_file_refused_by_a_time_limit_is_read_again_next_time(tmp_path, monkeypatch):
    """A busy machine can push a long video past the decode time limit: sent again, the same
    file is read again (a damaged file's refusal is remembered); in the history it stays
    refused, so later turns don't wait for it."""
    import attachments
    import media
    from engine_contract import ImageRefused
    path = tmp_path / "voice.wav"
    path.write_bytes(audio_file(".wav"))
    import reader_process
    calls, run = [], reader_process.run

    def busy_then_fine(read, source, name, rate):
        calls.append(name)
        if len(calls) == 1:
            raise media.MediaError(f"{name} takes too long to decode (over 30 s).", lasting=False)
        return run(read, source, name, rate)
    monkeypatch.setattr(reader_process, "run", busy_then_fine)
    part = attachment_part(path, "voice.wav")
    with pytest.raises(ImageRefused, match="too long to decode"):
        attachments.audio_of(part, 16000)
    with pytest.raises(ImageRefused, match="too long to decode"):
        attachments.audio_of(part, 16000, again=False)  # (in the history: a turn doesn't wait for it)
    assert calls == ["voice.wav"]
    assert attachments.audio_of(part, 16000).seconds > 1 and calls == ["voice.wav", "voice.wav"]
    assert attachments.audio_of(part, 16000).seconds > 1 and len(calls) == 2, "then remembered"


# ---------------------------------------------------------------- reading in processes of its own

def test_a_question_sent_while_a_document_is_read_is_answered_meanwhile(serve, llama_runner, tmp_path, monkeypatch):
    """One answer at a time, yet a long read holds nobody up: while one user's document is
    read (in a reader process, before the request joins the generation loop), the waiting
    line lets the next user's question through and it is answered; then the document's
    answer comes, with the document read."""
    import threading
    import uuid

    import documents
    from tests import misbehaving_readers
    from tests.conftest import wait_for
    monkeypatch.setattr(documents, "read_document", misbehaving_readers.held)
    url, spy = serve(llama_runner)
    name = f"held-{uuid.uuid4().hex}.pdf"
    hold = misbehaving_readers.hold_file(name)
    began, released = hold.with_suffix(".reading"), hold.with_suffix(".released")
    (tmp_path / name).write_bytes(pdf_with_text("Quarterly revenue rose"))
    hold.touch()
    reader, asker = Browser(url, spy.chats), Browser(url, spy.chats)
    shown = {}
    try:
        reading = threading.Thread(target=lambda: shown.update(document=send(reader, "Sum it up", tmp_path / name)),
                                   daemon=True)
        reading.start()
        wait_for(began.exists, what="the document's read to begin")
        shown["question"] = send(asker, "Describe a dog.")
        assert answers_of(shown["question"]) and not errors_of(shown["question"])
        assert not released.exists(), "answered while the document was still being read"
    finally:
        hold.unlink(missing_ok=True)
    reading.join(30)
    began.unlink(missing_ok=True)
    released.unlink(missing_ok=True)
    assert answers_of(shown["document"]) and not errors_of(shown["document"]), "then the document's answer"
    reader.close()
    asker.close()


@pytest.mark.parametrize("misbehaviour, expected, remembered", [
    ("stuck", "report.pdf took too long to read (over 2 s)", False),
    ("crash", "report.pdf can't be read: reading it stopped the reader (SIGABRT)", True),
    ("killed", "report.pdf can't be read now: its reader was stopped (SIGKILL; out of memory?)", False),
])
def test_a_reader_that_hangs_or_dies_is_one_line_in_the_chat_and_the_next_read_works(
        serve, llama_runner, tmp_path, monkeypatch, misbehaviour, expected, remembered):
    """A parser caught in a loop is stopped at the time limit; one that crashes (or is killed
    for memory) takes only its reader process down. The chat says so in one line, the next
    message is answered, and the same file is read again unless it crashed the reader."""
    import documents
    import reader_process
    from tests import misbehaving_readers
    read = documents.read_document
    monkeypatch.setattr(reader_process, "READ_TIMEOUT_SECONDS", 2)
    monkeypatch.setattr(documents, "read_document", getattr(misbehaving_readers, misbehaviour))
    url, spy = serve(llama_runner)
    browser = Browser(url, spy.chats)
    report = tmp_path / "report.pdf"
    report.write_bytes(pdf_with_text(f"Quarterly revenue rose ({misbehaviour})"))
    shown = send(browser, "Read this", report)
    assert expected in errors_of(shown) and "Traceback" not in json.dumps(shown), errors_of(shown)
    monkeypatch.setattr(documents, "read_document", read)
    shown = send(browser, "Describe a dog.")
    assert answers_of(shown) and errors_of(shown).count("report.pdf") == 1, "the next message is answered"
    answered = len(answers_of(shown))
    shown = send(browser, "Read it again", report)
    if remembered:  # (a file that crashed its reader is not given another one)
        assert errors_of(shown).count(expected) == 2 and len(answers_of(shown)) == answered, errors_of(shown)
    else:
        assert errors_of(shown).count("report.pdf") == 1 and len(answers_of(shown)) == answered + 1, "read this time"
    browser.close()


def test_a_document_v1_has_read_is_not_read_again_in_the_engine_process(llama_engine_process):
    """/v1 reads a document where the request comes in (to name a bad part with a 400): the
    part carries what was read, and the engine's process takes it as it is."""
    import uuid

    from config import Settings
    from model_runner import GenerationSettings
    from openai_api import ContentPart, decode_part
    said = f"Quarterly revenue rose {uuid.uuid4().hex}"  # (a document no process has read before)
    part = decode_part(ContentPart(type="file", file={"file_data": data_url("application/pdf", pdf_with_text(said)),
                                                      "filename": "report.pdf"}), "messages[0].content[0]", Settings())
    assert said in part["read"].text
    prompts, told = [], []
    for content in ([{"type": "text", "text": "Sum it up"}], [part, {"type": "text", "text": "Sum it up"}]):
        with llama_engine_process.stream([{"role": "user", "content": content}], GenerationSettings(max_new_tokens=2),
                                         on_reading=lambda: told.append(True)) as stream:
            list(stream)
        prompts.append(stream.prompt_tokens)
    assert stream.finish_reason == "length" and prompts[1] > prompts[0] + 10, "the document is in the prompt"
    assert told == [], "nothing was read in the engine's process"


def test_the_engine_says_when_a_request_waits_for_its_files_to_be_read(llama_engine_or_runner, tmp_path):
    """The waiting line lets the next request through only while files are really read:
    a document not read before (told once, in this process or from the engine process);
    the same document again, remembered, is not told."""
    import uuid

    from model_runner import GenerationSettings
    report = tmp_path / f"report-{uuid.uuid4().hex}.pdf"
    report.write_bytes(pdf_with_text(f"Quarterly revenue rose {uuid.uuid4().hex}"))
    message = [{"role": "user", "content": [attachment_part(report), {"type": "text", "text": "Sum it up"}]}]
    for expected in (1, 0):
        told = []
        with llama_engine_or_runner.stream(message, GenerationSettings(max_new_tokens=2),
                                           on_reading=lambda: told.append(True)) as stream:
            list(stream)
        assert len(told) == expected and stream.finish_reason == "length"
