"""A conversation, made ready for a model, without torch: validating it, loading its images
within the limits, joining neighbouring turns, and splitting reasoning from the answer.
Every engine (local, engine process, remote) goes through here.

Messages are the neutral chat format: a role ("system" | "user" | "assistant" | "tool")
and a list of parts, `{"type": "text", "text": ...}` or `{"type": "image", "image": <path or
PIL.Image>}` (`{"type": "file", "path": ...}` for an attachment that is not an image).
An assistant message may carry `tool_calls: [{"id", "name", "arguments": dict}]`; a tool
message carries `tool_call_id` and `name`, its result as a text part.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from PIL import Image

import attachments
import media
from config import Settings
from attachments import IMAGE_FORMATS
from engine_contract import ChatInputError, FileRefused, ImageRefused, Reply, ToolCall


LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # (a valid JSON escape, but no character: nothing can encode it)


def well_formed(text: str) -> str:
    """`text` with each lone UTF-16 surrogate, half an emoji cut by a paste or a script, as
    U+FFFD: it is no character, and UTF-8 (the store, the tokenizer, the page) can't hold it.
    (/v1 refuses one instead, naming where it is.)"""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace") if LONE_SURROGATE.search(text) else text


def with_well_formed_text(message: dict) -> dict:
    """A message whose text parts are well_formed."""
    return {**message, "content": [{**part, "text": well_formed(part["text"])} if part.get("type") == "text" else part
                                   for part in message.get("content") or []]}


def reads_files(messages: list[dict]) -> bool:
    """Whether preparing these messages reads documents, audio or video (reader processes:
    seconds for a long PDF or video, the first time)."""
    return any(isinstance(part, dict) and part.get("type") in ("document", "audio", "video")
               for message in messages if isinstance(message.get("content"), list) for part in message["content"])


def prepare_messages(messages: list[dict], *, sees_images: bool, model_name: str, settings: Settings,
                     notices: list[str] | None = None, audio_rate: int | None = None,
                     sees_video: bool = False) -> list[dict]:
    """Validate a conversation and read what its messages carry, within the limits: images
    (as RGB PIL images), documents (as text parts marked {"document": name}, which the
    engine may cut to fit its context; a scan's pages as images), audio (samples at
    `audio_rate`, for a model that hears; else the transcript it carries) and video (frames:
    natively with `sees_video`, else as images with their time stamps). Raises
    ChatInputError for what can't be sent: every engine goes through here. What the user
    should know about the new message (an image downscaled, a document without text, old
    images left out) is appended to `notices`. Messages keep their roles and order;
    `alternate_roles` joins neighbours of one role once the conversation has been fitted into
    the context."""
    notices = [] if notices is None else notices
    if not messages or messages[-1]["role"] not in ("user", "tool"):
        raise ChatInputError("The conversation must end with a user message (or a tool's result).")
    last = messages[-1]
    if last["role"] == "user" and not any(p.get("type") in ATTACHED or (p.get("text") or "").strip()
                                          for p in last["content"]):
        raise ChatInputError("The message is empty: type some text or attach a file.")
    if last["role"] == "user":  # (a tool's pictures go to a model that sees; others get its text)
        _refuse_what_the_model_cannot_take(last, sees_images=sees_images, model_name=model_name, settings=settings,
                                           audio_rate=audio_rate, sees_video=sees_video)
    # Keep the newest images (and audio clips) up to the conversation's caps; earlier ones
    # drop out of the prompt. A bad file in the new message is refused; one in the history
    # was refused when it was sent, so it is left out rather than blocking every later turn.
    budget = Budget(images=settings.max_images_per_conversation if sees_images else 0,
                    audio=MAX_AUDIO_PER_CONVERSATION if audio_rate else 0)
    prepared = []
    for message in reversed(messages):
        is_new = message is last
        # what a video's frames and a scan's pages may take of the message's images
        budget.room = settings.max_images_per_message - sum(p.get("type") == "image" for p in message["content"])
        parts, told = [], []
        for part in message["content"]:
            try:
                parts += _prepared_part(part, budget, settings=settings, sees_images=sees_images,
                                        audio_rate=audio_rate, sees_video=sees_video, notices=told, is_new=is_new)
            except ChatInputError:
                if is_new:
                    raise
        if is_new:
            notices += told
            if not parts and message["role"] == "user":  # (a scan for a text-only model, a video with no room)
                raise ImageRefused("Nothing in this message reaches the model: " + " ".join(told))
        if parts or message.get("tool_calls") or message["role"] == "tool":
            extras = {key: message[key] for key in TOOL_KEYS if key in message}
            prepared.append({"role": message["role"], "content": parts, **extras})
    prepared.reverse()
    if budget.images_left_out:
        notices.append(f"The model sees the latest {settings.max_images_per_conversation} images of this chat; "
                       f"{budget.images_left_out} older image{'s' * (budget.images_left_out > 1)} were left out.")
    if budget.audio_left_out:
        notices.append(f"The model hears the latest {MAX_AUDIO_PER_CONVERSATION} audio clips of this chat; "
                       f"{budget.audio_left_out} older one{'s' * (budget.audio_left_out > 1)} were left out.")
    return prepared


ATTACHED = ("image", "document", "audio", "video", "file")  # a part that is a file sent with the message
MAX_AUDIO_PER_CONVERSATION = 4  # audio clips a model that hears is given, the newest first
AUDIO_CLIP_SECONDS = 30  # longer audio goes in parts: audio encoders (Whisper's) hear 30 s at a time
LISTENING_MODELS = "Qwen2-Audio, Gemma 3n, Gemma 4 E2B/E4B or Phi-4-multimodal"


@dataclass
class Budget:
    """What is left of a conversation's images and audio clips, counted from the newest
    message back (the parts of one message are taken in order, within it)."""
    images: int
    audio: int
    room: int = 0  # of the message's images, for frames and pages
    images_left_out: int = 0
    audio_left_out: int = 0

    def take_images(self, wanted: int, sees_images: bool) -> int:
        taken = max(0, min(wanted, self.images))
        self.images -= taken
        if sees_images:
            self.images_left_out += wanted - taken
        return taken

    def take_room(self, wanted: int) -> int:
        """Frames or pages within the message's images and the conversation's, taken."""
        taken = max(0, min(wanted, self.room, self.images))
        self.room -= taken
        self.images -= taken
        return taken


def _refuse_what_the_model_cannot_take(message: dict, *, sees_images: bool, model_name: str, settings: Settings,
                                       audio_rate: int | None, sees_video: bool) -> None:
    """The new message's attachments this model can't be given: a clear line for each kind."""
    kinds = [part.get("type") for part in message["content"]]
    if "image" in kinds and not sees_images:
        raise ImageRefused(
            f"This model ({model_name}) is text-only and can't see images. Send the message "
            f"without the image, or start the app with a vision model (--model).")
    if kinds.count("image") > settings.max_images_per_message:
        raise ImageRefused(f"Too many images in one message: {kinds.count('image')} "
                           f"(the limit is {settings.max_images_per_message}).")
    if "video" in kinds and not (sees_images or sees_video):
        raise FileRefused(f"This model ({model_name}) is text-only and can't watch a video. Send the message "
                          f"without it, or start the app with a vision model (--model).")
    if any(part.get("type") == "audio" and not audio_rate and part.get("transcript") is None
           for part in message["content"]):
        raise FileRefused(
            f"This model ({model_name}) can't listen to audio. Start the app with a model that can "
            f"({LISTENING_MODELS}), or with --asr-model (e.g. openai/whisper-large-v3-turbo) to have "
            f"speech written out for any model.")
    for part in message["content"]:
        if part.get("type") == "file":
            raise FileRefused(part.get("refused") or f"{os.path.basename(part['path'])} is not a file this app "
                                                     f"reads; it takes {attachments.WHAT_IS_READ}.")


def _prepared_part(part: dict, budget: Budget, *, settings: Settings, sees_images: bool,
                   audio_rate: int | None, sees_video: bool, notices: list[str], is_new: bool) -> list[dict]:
    """One part of a message as the model gets it: none, one or several parts. A file the
    readers failed on for want of time or memory is tried again only in the new message."""
    kind = part.get("type")
    if kind == "text":
        return [{"type": "text", "text": part["text"]}] if part.get("text") else []
    if kind == "image":
        if not budget.take_images(1, sees_images):
            return []
        image = load_image(part["image"], settings, part.get("name"))
        if "downscaled_from" in image.info:
            width, height = image.info["downscaled_from"]
            notices.append(f"An image of {width}×{height} pixels was downscaled to {image.width}×{image.height} "
                           f"(the limit is {settings.max_image_side} pixels a side).")
        return [{"type": "image", "image": image}]
    if kind == "document":
        document = attachments.document_of(part, again=is_new)
        notices += document.notes
        if not document.text and document.page_images and sees_images:
            pages = document.page_images[:budget.take_room(len(document.page_images))]
            return [piece for number, picture in pages for piece in (
                {"type": "text", "text": f"[{document.name}, page {number}]"},
                {"type": "image", "image": load_image(picture, settings)})]
        return [{"type": "text", "text": document.text + "\n", "document": document.name}] if document.text else []
    if kind == "audio":
        if audio_rate:
            if budget.audio <= 0:
                budget.audio_left_out += 1
                return []
            budget.audio -= 1
            samples, clip = attachments.audio_of(part, audio_rate, is_new).samples, AUDIO_CLIP_SECONDS * audio_rate
            return [{"type": "audio", "audio": samples[start:start + clip]} for start in range(0, len(samples), clip)]
        return [{"type": "text", "text": part["transcript"]}] if part.get("transcript") else []
    if kind == "video":
        if sees_video:
            video = attachments.video_of(part, settings.video_frames, is_new)
            fps = video.fps or len(video.frames) / max(video.duration, 1e-3)
            metadata = {"fps": fps, "duration": video.duration, "total_num_frames": max(1, round(video.duration * fps)),
                        "frames_indices": [round(seconds * fps) for seconds, _ in video.frames]}
            return [{"type": "text", "text": f"[{video.name}, {media.timestamp(video.duration)} long]"},
                    {"type": "video", "video": [frame for _, frame in video.frames], "metadata": metadata}]
        wanted = min(settings.video_frames, budget.room, budget.images)
        if wanted <= 0:
            notices.append(f"{part['name']} was left out: the message (or the chat) already has as many images as "
                           f"the model is given ({settings.max_images_per_message} a message, "
                           f"{settings.max_images_per_conversation} a chat).")
            return []
        video = attachments.video_of(part, wanted, is_new)
        budget.take_room(len(video.frames))
        if len(video.frames) == wanted < settings.video_frames:  # (the limits, not a short video, gave fewer)
            frames = f"{wanted} frame" + ("s" if wanted != 1 else "")
            notices.append(f"The model sees {frames} of {video.name} (not "
                           f"{settings.video_frames}: a message is given at most {settings.max_images_per_message} "
                           f"images, a chat {settings.max_images_per_conversation}).")
        return [piece for seconds, frame in video.frames for piece in (
            {"type": "text", "text": f"[{video.name} at {media.timestamp(seconds)}]"},
            {"type": "image", "image": load_image(frame, settings)})]
    return []  # ("file": an unknown attachment in the history, refused when it was sent)


TOOL_KEYS = ("tool_calls", "tool_call_id", "name")
MODEL_KEYS = ("role", "content", *TOOL_KEYS)  # what a stored message gives the model; the rest is for the reader


def for_the_model(conversation: list[dict], system_prompt: str = "") -> list[dict]:
    """The one place where a conversation as the chat keeps it (neutral messages that also
    carry what the reader saw: reasoning, notes, errors, durations, figures) becomes the
    messages the model is sent. Only MODEL_KEYS go; an assistant message with neither text
    nor tool calls (an error, a note) is left out, and so is a user message that got no
    answer (refused, failed, or stopped before any text): the model never sees a refused
    turn, and one can't block the turns after it. The last message stays whatever it is."""
    kept = []
    for message in conversation:
        message = with_well_formed_text({key: message[key] for key in MODEL_KEYS if key in message})
        message["content"] = [part for part in message.get("content") or []
                              if part.get("type") != "text" or part.get("text", "").strip()]
        if message["role"] == "assistant" and not message["content"] and not message.get("tool_calls"):
            continue
        kept.append(message)
    answered = [message for message, after in zip(kept, [*kept[1:], None])
                if message["role"] != "user" or after is None or after["role"] != "user"]
    system = [{"role": "system", "content": [{"type": "text", "text": well_formed(system_prompt.strip())}]}] \
        if system_prompt and system_prompt.strip() else []
    return system + answered


def tool_pictures_after_results(messages: list[dict]) -> list[dict]:
    """Tools' results as text, their pictures moved into one user message after the results
    (chat templates and OpenAI's API take a tool's result as text only)."""
    moved, pictures = [], []
    for message in [*messages, None]:
        if pictures and (message is None or message["role"] != "tool"):
            moved.append({"role": "user", "content": [{"type": "text", "text": "The pictures the tools returned:"},
                                                      *pictures]})
            pictures = []
        if message is None:
            break
        if message["role"] == "tool":
            pictures += [part for part in message["content"] if part.get("type") == "image"]
            message = {**message, "content": [part for part in message["content"] if part.get("type") != "image"]}
        moved.append(message)
    return moved


def alternate_roles(messages: list[dict]) -> list[dict]:
    """Join neighbouring messages of one role (e.g. two user messages sent through the API
    in a row): many chat templates need user and assistant to alternate. Tool results stay
    one message each; an assistant's text and its tool calls join into one message."""
    joined: list[dict] = []
    for message in messages:
        if joined and joined[-1]["role"] == message["role"] != "tool" \
                and not joined[-1].get("tool_calls"):
            merged = {**joined[-1], "content": joined[-1]["content"] + message["content"]}
            if message.get("tool_calls"):
                merged["tool_calls"] = list(message["tool_calls"])
            joined[-1] = merged
        else:
            joined.append({**message, "content": list(message["content"])})
    return joined


# ---------------------------------------------------------------- tool calls in generated text

TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"  # Hermes: Qwen2.5/3, Hermes, SmolLM3, ...


def split_tool_calls(text: str, final: bool = False, names: set[str] | None = None) -> tuple[str, list[dict], bool]:
    """Generated text → (the answer without its tool calls, the calls as {"name",
    "arguments": dict}, a call still being written?). The Hermes format most chat templates
    use: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`. While streaming (not
    `final`) a partial "<tool_call" at the end is held back and every tagged block hidden; a
    call cut off by the end of the answer is left out; at the end, a closed block that isn't
    a valid call stays in the answer as text (the engine's response_template parse, where
    there is one, reads such formats: ReplyParser). With `names`, a call naming another function stays
    in the answer as text, as it was written."""
    answer, calls, position = [], [], 0
    while True:
        start = text.find(TOOL_CALL_START, position)
        if start < 0:
            tail = text[position:]
            if not final:
                held = max((k for k in range(1, len(TOOL_CALL_START)) if tail.endswith(TOOL_CALL_START[:k])),
                           default=0)
                tail = tail[:len(tail) - held]
            answer.append(tail)
            return _joined(answer), calls, False
        answer.append(text[position:start])
        end = text.find(TOOL_CALL_END, start)
        if end < 0:  # a call still being written; at the end, one cut off (max tokens): left out
            return _joined(answer), calls, not final
        call = parse_tool_call(text[start + len(TOOL_CALL_START):end])
        if call is not None and names is not None and call["name"] not in names:
            answer.append(text[start:end + len(TOOL_CALL_END)])
        elif call is not None:
            calls.append(call)
        elif final:  # not JSON (another format inside the tags): shown once the answer ends
            answer.append(text[start:end + len(TOOL_CALL_END)])
        position = end + len(TOOL_CALL_END)


def _joined(pieces: list[str]) -> str:
    """The text around the calls that were cut out, a paragraph each."""
    return "\n\n".join(piece.strip() for piece in pieces if piece.strip())


def parse_tool_call(body: str) -> dict | None:
    """`{"name": ..., "arguments": {...} or "json"}` → {"name", "arguments": dict}, or None."""
    try:
        call = json.loads(body.strip())
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return {"name": call["name"], "arguments": arguments}


REASONING_START, REASONING_END = "<think>", "</think>"  # Qwen3, DeepSeek-R1, SmolLM3, ...


def split_reasoning(text: str, starts_in_reasoning: bool = False) -> tuple[str | None, str, bool]:
    """Generated text → (reasoning or None, answer, reasoning finished?).

    A reasoning model writes `<think>…</think>` before its answer; many chat templates
    already open the block in the prompt, so the output starts inside it."""
    if not starts_in_reasoning:
        head = text.lstrip()
        if not head.startswith(REASONING_START):
            if head and REASONING_START.startswith(head):  # "<thi" may still become "<think>"
                return "", "", False
            return None, text, True
        text = head[len(REASONING_START):]
    end = text.find(REASONING_END)
    if end < 0:
        for k in range(len(REASONING_END) - 1, 0, -1):  # hold back a partial closing tag
            if text.endswith(REASONING_END[:k]):
                text = text[:-k]
                break
        return text.strip(), "", False
    return text[:end].strip(), text[end + len(REASONING_END):].lstrip(), True


def reasoning_and_answer(text: str) -> tuple[str | None, str]:
    """An earlier assistant turn's text as (its reasoning or None, its answer), split where
    templates that take reasoning split it (Qwen3's: at the last `</think>`). For those
    templates only: a /v1 client may send the reasoning back inside the content, and once
    control tokens in messages are text (sanitized, or broken by a zero-width space) the
    template can no longer find the tag itself."""
    if REASONING_END not in text:
        return None, text
    reasoning, _, answer = text.rpartition(REASONING_END)
    return reasoning.split(REASONING_START)[-1].strip("\n"), answer.lstrip("\n")


class ReplyParser:
    """Generated text → Reply: the one place an answer is split into reasoning, answer and
    tool calls (in the engine, as it generates; consumers only render the parts). A call
    keeps its id from the update where it is first complete to the end."""

    def __init__(self, starts_in_reasoning: bool = False, tools: bool = False, names: set[str] | None = None):
        """`names`: the functions whose calls are calls (others stay in the answer as text);
        None: any."""
        self.starts_in_reasoning, self.tools, self.names = starts_in_reasoning, tools, names
        self._calls: list[ToolCall] = []

    def parse(self, text: str, final: bool = False, parsed: dict | None = None) -> Reply:
        """`parsed`: at the end, the model's own response_template reading of the answer
        ({"content", "tool_calls": [{"name", "arguments"}]}), which replaces the Hermes one."""
        reasoning, answer, reasoning_done = split_reasoning(text, self.starts_in_reasoning)
        calls, calling = [], False
        if parsed is not None:
            answer, calls = parsed["content"], parsed["tool_calls"]
            if self.names is not None:
                unknown = [call for call in calls if call["name"] not in self.names]
                calls = [call for call in calls if call["name"] in self.names]
                answer = _joined([answer, *(f"{TOOL_CALL_START}{json.dumps(call, ensure_ascii=False)}{TOOL_CALL_END}"
                                            for call in unknown)])
        elif self.tools:
            answer, calls, calling = split_tool_calls(answer, final=final, names=self.names)
        return Reply(answer=answer, reasoning=reasoning, reasoning_done=reasoning_done or final,
                     tool_calls=self._with_ids(calls), calling=calling)

    def _with_ids(self, calls: list[dict]) -> tuple[ToolCall, ...]:
        kept = []
        for i, call in enumerate(calls):
            known = self._calls[i] if i < len(self._calls) else None
            if known is None or (known.name, known.arguments) != (call["name"], call["arguments"]):
                known = ToolCall(call["name"], call["arguments"])
            kept.append(known)
        self._calls = kept
        return tuple(kept)


def last_user_text(messages: list[dict]) -> str:
    return " ".join(p.get("text", "") for p in messages[-1]["content"] if p.get("type") == "text")


def load_image(source, settings: Settings, name: str | None = None) -> Image.Image:
    """A path or PIL image → RGB PIL image no larger than settings.max_image_side. Raises
    ImageRefused for anything that is not a readable image, naming it `name` (the name the
    user gave it; else the file's)."""
    if isinstance(source, Image.Image):
        image = source
    else:
        is_path = isinstance(source, (str, os.PathLike))
        name = name or (os.path.basename(str(source)) if is_path else "") or "The image"
        # PIL refuses past its own bomb limit (2x Image.MAX_IMAGE_PIXELS): never below ours.
        Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, settings.max_image_pixels)
        try:
            image = Image.open(source, formats=IMAGE_FORMATS)
            if image.width * image.height > settings.max_image_pixels:
                raise ImageRefused(
                    f"{name} is too large ({image.width}×{image.height} pixels; the limit is "
                    f"{settings.max_image_pixels // 1_000_000} megapixels).")
            image.load()
        except ChatInputError:
            raise
        except Image.DecompressionBombError:
            raise ImageRefused(f"{name} has too many pixels to open safely.") from None
        except FileNotFoundError:
            raise ImageRefused(f"{name} could not be found (was the upload removed?).") from None
        except Exception:
            raise ImageRefused(f"{name} is not a readable image (corrupt, truncated, or not a PNG, "
                                 f"JPEG, WebP, GIF or BMP file).") from None
    if image.mode != "RGB":
        image = image.convert("RGB")
    if max(image.size) > settings.max_image_side:
        original = image.size
        image = image.copy()
        image.thumbnail((settings.max_image_side, settings.max_image_side))
        image.info["downscaled_from"] = original
    return image
