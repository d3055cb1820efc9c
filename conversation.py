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

from PIL import Image

import config
from engine_contract import ChatInputError

Image.MAX_IMAGE_PIXELS = config.settings.max_image_pixels  # PIL raises DecompressionBombError at 2x this
# What is decoded, whatever a file's name or a data: URL says: Pillow can open dozens of
# formats, some through outside programs (EPS through Ghostscript); users send these.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


def prepare_messages(messages: list[dict], *, sees_images: bool, model_name: str,
                     notices: list[str] | None = None) -> list[dict]:
    """Validate a conversation and load its images (as RGB PIL images, within the limits).
    Raises ChatInputError for what can't be sent: every engine goes through here. What the
    user should know about the new message (an image downscaled, old images left out) is
    appended to `notices`. Messages keep their roles and order; `alternate_roles` joins
    neighbours of one role once the conversation has been fitted into the context."""
    notices = [] if notices is None else notices
    if not messages or messages[-1]["role"] not in ("user", "tool"):
        raise ChatInputError("The conversation must end with a user message (or a tool's result).")
    last = messages[-1]
    if last["role"] == "user" and not any(p.get("type") in ("image", "file") or (p.get("text") or "").strip()
                                          for p in last["content"]):
        raise ChatInputError("The message is empty: type some text or attach an image.")
    new_images = [p for p in last["content"] if _is_image(p)]
    if new_images and not sees_images:
        raise ChatInputError(
            f"This model ({model_name}) is text-only and can't see images. Send the message "
            f"without the image, or start the app with a vision model (--model).")
    if len(new_images) > config.settings.max_images_per_message:
        raise ChatInputError(f"Too many images in one message: {len(new_images)} "
                             f"(the limit is {config.settings.max_images_per_message}).")
    # Keep the newest images up to the conversation cap; earlier ones drop out of the prompt.
    # A bad file in the new message is refused; one in the history was refused when it was
    # sent, so it is left out rather than blocking every later turn.
    budget = config.settings.max_images_per_conversation if sees_images else 0
    left_out = 0
    prepared = []
    for message in reversed(messages):
        is_new = message is last
        parts = []
        for part in reversed(message["content"]):
            if part.get("type") == "file":
                if is_new:
                    raise ChatInputError(f"{os.path.basename(part['path'])} is not an image; "
                                         f"only image files can be attached.")
            elif _is_image(part):
                if budget > 0:
                    try:
                        image = load_image(part["image"])
                    except ChatInputError:
                        if is_new:
                            raise
                        continue
                    parts.append({"type": "image", "image": image})
                    budget -= 1
                    if is_new and "downscaled_from" in image.info:
                        width, height = image.info["downscaled_from"]
                        notices.append(f"An image of {width}×{height} pixels was downscaled to "
                                       f"{image.width}×{image.height} (the limit is {config.settings.max_image_side} "
                                       f"pixels a side).")
                elif sees_images:
                    left_out += 1
            elif part.get("text"):
                parts.append({"type": "text", "text": part["text"]})
        if parts or message.get("tool_calls") or message["role"] == "tool":
            extras = {key: message[key] for key in TOOL_KEYS if key in message}
            prepared.append({"role": message["role"], "content": parts[::-1], **extras})
    prepared.reverse()
    if left_out:
        notices.append(f"The model sees the latest {config.settings.max_images_per_conversation} images of this chat; "
                       f"{left_out} older image{'s' * (left_out > 1)} were left out.")
    return prepared


TOOL_KEYS = ("tool_calls", "tool_call_id", "name")


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


def split_tool_calls(text: str, final: bool = False) -> tuple[str, list[dict], bool]:
    """Generated text → (the answer without its tool calls, the calls as {"name",
    "arguments": dict}, a call still being written?). The Hermes format most chat templates
    use: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`. While streaming (not
    `final`) a partial "<tool_call" at the end is held back and every tagged block hidden; a
    call cut off by the end of the answer is left out; at the end, a closed block that isn't
    a valid call stays in the answer as text (the engine's response_template parse, where
    there is one, reads such formats: answer_and_tool_calls)."""
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
        if call is not None:
            calls.append(call)
        elif final:  # not JSON (another format inside the tags): shown once the answer ends
            answer.append(text[start:end + len(TOOL_CALL_END)])
        position = end + len(TOOL_CALL_END)


def _joined(pieces: list[str]) -> str:
    """The text around the calls that were cut out, a paragraph each."""
    return "\n\n".join(piece.strip() for piece in pieces if piece.strip())


def answer_and_tool_calls(stream, text: str, final: bool) -> tuple[str, list[dict], bool]:
    """A stream's answer without its tool calls, the calls, and whether one is being
    written: once the answer has ended, as the engine parsed it with the model's own
    response_template (stream.parsed_reply), else read from the text in the Hermes format."""
    if final and stream.parsed_reply is not None:
        return stream.parsed_reply["content"], stream.parsed_reply["tool_calls"], False
    _, answer, _ = stream.parts(text)
    return split_tool_calls(answer, final=final)


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


def last_user_text(messages: list[dict]) -> str:
    return " ".join(p.get("text", "") for p in messages[-1]["content"] if p.get("type") == "text")


def _is_image(part: dict) -> bool:
    return part.get("type") == "image"


def load_image(source) -> Image.Image:
    """A path or PIL image → RGB PIL image no larger than config.settings.max_image_side.
    Raises ChatInputError for anything that is not a readable image."""
    if isinstance(source, Image.Image):
        image = source
    else:
        is_path = isinstance(source, (str, os.PathLike))
        name = (os.path.basename(str(source)) if is_path else "") or "The image"
        try:
            image = Image.open(source, formats=IMAGE_FORMATS)
            if image.width * image.height > config.settings.max_image_pixels:
                raise ChatInputError(
                    f"{name} is too large ({image.width}×{image.height} pixels; the limit is "
                    f"{config.settings.max_image_pixels // 1_000_000} megapixels).")
            image.load()
        except ChatInputError:
            raise
        except Image.DecompressionBombError:
            raise ChatInputError(f"{name} has too many pixels to open safely.") from None
        except FileNotFoundError:
            raise ChatInputError(f"{name} could not be found (was the upload removed?).") from None
        except Exception:
            raise ChatInputError(f"{name} is not a readable image (corrupt, truncated, or not a PNG, "
                                 f"JPEG, WebP, GIF or BMP file).") from None
    if image.mode != "RGB":
        image = image.convert("RGB")
    if max(image.size) > config.settings.max_image_side:
        original = image.size
        image = image.copy()
        image.thumbnail((config.settings.max_image_side, config.settings.max_image_side))
        image.info["downscaled_from"] = original
    return image
