r"""Tiny random-weight models for offline tests and demos.

Builds five small models with random (but seeded, hence reproducible) weights and
saves them with ``save_pretrained``, so that the app loads them through exactly the
same code path as a hub checkpoint (``AutoConfig`` -> ``AutoProcessor`` +
``AutoModelForImageTextToText`` for VLMs, ``AutoTokenizer`` + ``AutoModelForCausalLM``
for text-only models):

* ``idefics3`` - Idefics3ForConditionalGeneration (the SmolVLM v1 family), PIL image
  processor, no image splitting, 32 px images -> 7 tokens per image.
* ``llava``    - LlavaForConditionalGeneration (CLIP vision + Llama text), 32 px images
  -> 16 ``<image>`` tokens per image.
* ``llama``    - text-only LlamaForCausalLM.
* ``tools`` - text-only LlamaForCausalLM with a Hermes tool-calling template: greedy, it
  answers a user message with one fixed ``get_weather`` call, a tool result with text.
* ``reasoning`` - text-only LlamaForCausalLM that "thinks" like Qwen3 / DeepSeek-R1: the
  generation prompt ends with ``<think>\n`` and greedy output closes it with one ``</think>``
  (a non-special added token) ~14 tokens in (see ``build_reasoning_llama``).
* ``audio``   - Qwen2AudioForConditionalGeneration (Whisper-style audio encoder + Qwen2 text),
  Qwen2AudioProcessor (WhisperFeatureExtractor with 16 mel bins): audio content parts, a
  float32 numpy array at 16 kHz each, become 25 ``<|AUDIO|>`` tokens per second, at most 30 s
  (750 tokens); longer audio is cut at 30 s by the feature extractor. Loads with AutoProcessor
  + AutoModelForMultimodalLM (see ``build_audio_llm``).
* ``whisper`` - WhisperForConditionalGeneration + WhisperProcessor for the speech-to-text
  pipeline (``--asr-model``); greedy, it transcribes any audio as random text that never ends
  on its own (EOS is silenced): bound it with max_length / max_new_tokens (see ``build_whisper``).

Each gets a byte-level BPE tokenizer (512 tokens) trained here on the embedded text,
so any Unicode is encodable (emoji/CJK split into several byte tokens) and decodes
back exactly. Chat format (image parts become ``<image>`` for the VLMs; llama drops them)::

    <s><|system|>\n...<end_of_utterance>\n<|user|>\n...<end_of_utterance>\n<|assistant|>\n

Weights are drawn with a large std (0.3) so images visibly change greedy output, and
the lm_head rows of all special tokens (EOS, pad, image placeholders, role markers)
and of ASCII control bytes are zero: their logits are exactly 0 and practically never
the argmax, so greedy generation runs to ``max_new_tokens`` and decodes to non-empty,
mostly-ASCII nonsense. Building is seeded: the same files every time.

Usage::

    python tests/tiny_models.py OUT_DIR      # builds all five, prints their paths
    python app.py --model OUT_DIR/idefics3   # offline demo
"""

from __future__ import annotations

import functools
import json
import pathlib
import sys

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    GenerationConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2AudioConfig,
    Qwen2AudioForConditionalGeneration,
    Qwen2AudioProcessor,
    Qwen2Config,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizer,
)
from transformers.utils import logging as hf_logging

SEED = 1234
VOCAB_SIZE = 512
IMAGE_SIZE = 32  # px, square; patch size 8 -> 4x4 patches
PATCH_SIZE = 8
INIT_STD = 0.3  # usual is 0.02; with that the tiny VLMs ignore the image

BOS, EOS, PAD = "<s>", "<end_of_utterance>", "<pad>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
IMAGE = "<image>"
IDEFICS3_IMAGE_TOKENS = [IMAGE, "<fake_token_around_image>", "<global-img>"]

CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model can still say many things,
even when it has never seen a picture before. The weather was warm and bright, so we
walked along the river to the old stone bridge and watched the boats go by. She asked
what was in the image, and he answered that it showed a red square on a white table.
Numbers like 1, 2, 3, 42 and 2024 appear in text, as do questions: why? how? where?
Please describe the photo in one sentence. It is a cat sitting on a chair near a window.
Testing streaming output means the answer must be long enough to stop it halfway.
Hello, world! This is a tiny language model with random weights; it speaks nonsense.
"""

# Jinja chat template; {image} is replaced by the architecture's image placeholder.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|' + message['role'] + '|>\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- elif part['type'] == 'image' -%}{{- '{image}' -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<end_of_utterance>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)


def chat_template(image_placeholder: str) -> str:
    return CHAT_TEMPLATE.replace("{image}", image_placeholder)


def _corpus() -> list[str]:
    """A few KB of varied English: the paragraph, its lines reversed, lower/upper case."""
    lines = CORPUS.splitlines()
    variants = [CORPUS, "\n".join(reversed(lines)), CORPUS.lower(), CORPUS.upper()]
    return [v for v in variants for _ in range(3)]


def build_tokenizer(extra_special: list[str], image_placeholder: str) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained from scratch; special tokens get the lowest ids."""
    special = [PAD, BOS, EOS, *ROLE_TOKENS, *extra_special]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    kwargs = {"image_token": IMAGE} if IMAGE in extra_special else {}  # read by the processors
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=ROLE_TOKENS + extra_special,
        chat_template=chat_template(image_placeholder),
        **kwargs,
    )


def _text_config(tokenizer, **sizes) -> LlamaConfig:
    """The tiny Llama text config; `sizes` overrides its dimensions (bench model)."""
    dims = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=2048)
    dims.update(sizes)
    return LlamaConfig(
        vocab_size=len(tokenizer),
        **dims,
        initializer_range=INIT_STD,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _silenced_ids(tokenizer) -> list[int]:
    """Special tokens and ASCII control bytes (except newline/tab): never to be generated."""
    special = [i for i, t in tokenizer.added_tokens_decoder.items() if t.special]
    control = [
        i for i in range(len(tokenizer))
        if i not in special and all(ord(c) < 32 and c not in "\n\t" or ord(c) == 127 for c in tokenizer.decode([i]))
    ]
    return special + control


def _finish(model, tokenizer, path: pathlib.Path, processor=None, circuit=None) -> pathlib.Path:
    """Silence unwanted tokens in lm_head, set the generation config, save everything.
    `circuit(model, tokenizer)` then hand-sets weights (it may un-silence a row)."""
    with torch.no_grad():
        # Zero rows -> logit exactly 0 while the other logits are random with a large std,
        # so EOS / placeholders / control bytes are practically never the argmax.
        model.get_output_embeddings().weight[_silenced_ids(tokenizer)] = 0.0
    if circuit:
        circuit(model, tokenizer)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    path.mkdir(parents=True, exist_ok=True)
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar in test output
    try:
        model.save_pretrained(path)
        (processor or tokenizer).save_pretrained(path)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    return path


def _seeded(build):
    """Run a builder under SEED (same weights every time) without touching the caller's RNG."""

    @functools.wraps(build)
    def wrapper(path) -> pathlib.Path:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            return build(pathlib.Path(path))

    return wrapper


@_seeded
def build_idefics3(path) -> pathlib.Path:
    """SmolVLM v1 family: Idefics3 (SigLIP-like vision, pixel shuffle, Llama text)."""
    tokenizer = build_tokenizer(IDEFICS3_IMAGE_TOKENS, IMAGE)
    scale = 2  # pixel shuffle: (32/8)^2 / 2^2 = 4 <image> tokens per image
    image_seq_len = (IMAGE_SIZE // PATCH_SIZE) ** 2 // scale**2
    config = Idefics3Config(
        text_config=_text_config(tokenizer).to_dict(),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, initializer_range=INIT_STD,
        ),
        scale_factor=scale,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=INIT_STD,
    )
    model = Idefics3ForConditionalGeneration(config)
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": IMAGE_SIZE},
        max_image_size={"longest_edge": IMAGE_SIZE},
        do_image_splitting=False,
    )
    processor = Idefics3Processor(
        image_processor, tokenizer, image_seq_len=image_seq_len, chat_template=chat_template(IMAGE)
    )
    # The processor replaced the tokenizer's extra special tokens with its own three; put
    # ours back so AutoTokenizer on the saved dir lists all of them (decode skips them anyway).
    tokenizer.add_special_tokens(
        {"extra_special_tokens": ROLE_TOKENS + IDEFICS3_IMAGE_TOKENS}, replace_extra_special_tokens=False
    )
    return _finish(model, tokenizer, path, processor)


@_seeded
def build_llava(path) -> pathlib.Path:
    """LLaVA: CLIP vision tower + MLP projector + Llama text."""
    tokenizer = build_tokenizer([IMAGE], IMAGE)
    config = LlavaConfig(
        text_config=_text_config(tokenizer).to_dict(),
        vision_config=CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=32, initializer_range=INIT_STD,
        ).to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        vision_feature_select_strategy="default",  # drop CLS: 16 tokens per image
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    model = LlavaForConditionalGeneration(config)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = LlavaProcessor(
        image_processor, tokenizer, patch_size=PATCH_SIZE, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=chat_template(IMAGE),
    )
    return _finish(model, tokenizer, path, processor)


@_seeded
def build_llama(path) -> pathlib.Path:
    """Text-only Llama; its chat template drops image parts."""
    tokenizer = build_tokenizer([], "")
    model = LlamaForCausalLM(_text_config(tokenizer))
    return _finish(model, tokenizer, path)


@_seeded
def build_bench_llama(path) -> pathlib.Path:
    """Text-only Llama sized for benchmarks (bench/benchmark.py): ~3.3M parameters, so
    that greedy decoding costs real compute (~100-250 tokens/s on a 2-core CPU) instead
    of being all per-step overhead like the tiny models; 8192 positions for long chats."""
    tokenizer = build_tokenizer([], "")
    config = _text_config(tokenizer, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                          num_attention_heads=8, num_key_value_heads=8,
                          max_position_embeddings=8192)
    return _finish(LlamaForCausalLM(config), tokenizer, path)


THINK, END_THINK = "<think>", "</think>"

# Like Qwen3's / DeepSeek-R1's: earlier assistant turns lose their "<think>...</think>" part
# (only the answer goes back into the context) and the generation prompt opens the reasoning
# block, so the model's output is "reasoning</think>answer". Image parts are dropped.
REASONING_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- set ns = namespace(text='') -%}"
    "{%- if message['content'] is string -%}{%- set ns.text = message['content'] -%}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{%- set ns.text = ns.text + part['text'] -%}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' and '</think>' in ns.text -%}"
    "{%- set ns.text = ns.text.split('</think>')[-1].lstrip('\\n') -%}{%- endif -%}"
    "{{- '<|' + message['role'] + '|>\\n' + ns.text + '<end_of_utterance>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n<think>\\n' -}}{%- endif -%}"
)


def _install_think_circuit(model, tokenizer) -> None:
    """Hand-set weights so that greedy decoding after the template's "<think>\\n" emits
    "</think>" exactly once, ~14 tokens in, whatever the prompt; the rest stays random.

    Five residual coordinates are reserved: three embedding features (a constant c in every
    token; 1 in "<think>"; 1 in "</think>") and two residual slots that only heads 2 and 3 of
    layer 0 write to (the rows of every other o_proj/down_proj are zero there), that no layer
    reads (zero columns) and that only the "</think>" lm_head row looks at:

    * EARLY (head 2): query = the constant feature, key = the "<think>" feature, both on the
      rotary pair with frequency 0.1 rad/token, so the score on the "<think>" token is
      ~30*cos(0.1*distance). Values are -M for "<think>", ~+M for every other token. Up to
      ~13 tokens after "<think>" the head attends to it (EARLY ~ -M); then cos drops below
      ~log(context)/30, attention spreads over the other tokens and EARLY flips to ~+M.
    * SEEN (head 3): the same with the "</think>" feature on the slowest rotary pair (cos
      stays > 0.79 over 2048 positions): +M from "</think>" on, exactly 0 before (every
      other token has zero key and value there).

    The "</think>" lm_head row is K*EARLY - 3K*SEEN: its logit is ~ -25 until EARLY flips,
    then ~ +25 (way above the other logits, ~6-10), so it is emitted at the flip (13 or 14
    tokens in), and from then on SEEN keeps it at ~ -45. The flip point hardly depends on the
    prompt (log(context) only moves it by ~1 token from 10 to 2000 context tokens).
    """
    const, start, end, early, seen = range(5)  # reserved hidden coordinates
    c, M, K, score = INIT_STD, 5.0, 100.0, 30.0
    think_id, end_id = tokenizer.convert_tokens_to_ids([THINK, END_THINK])
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    inv_freq = model.model.rotary_emb.inv_freq
    slow_pair = int(inv_freq.argmin())
    early_pair = int((inv_freq - 0.1).abs().argmin())

    def normed(row):  # RMSNorm with unit weight (the init), as layer 0 sees an embedding
        return row / row.pow(2).mean().sqrt()

    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[:, [start, end, early, seen]] = 0.0
        emb[:, const] = c
        emb[think_id, start] = 1.0
        emb[end_id, end] = 1.0
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            attn.o_proj.weight[[early, seen]] = 0.0
            mlp.down_proj.weight[[early, seen]] = 0.0
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                proj.weight[:, [early, seen]] = 0.0
        const_in = float(torch.stack([normed(r) for r in emb])[:, const].mean())  # ~1
        x_think, x_end = normed(emb[think_id]), normed(emb[end_id])
        attn = model.model.layers[0].self_attn

        def head(h, key_feature, pair, key_in, values, out):
            rows = slice(h * head_dim, (h + 1) * head_dim)
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                proj.weight[rows] = 0.0
            attn.o_proj.weight[:, rows] = 0.0
            attn.q_proj.weight[h * head_dim + pair, const] = 1.0
            attn.k_proj.weight[h * head_dim + pair, key_feature] = score * head_dim**0.5 / (const_in * key_in)
            for feature, weight in values.items():
                attn.v_proj.weight[h * head_dim, feature] = weight
            attn.o_proj.weight[out, h * head_dim] = 1.0

        neg = (float(x_think[const]) + 1.0) / float(x_think[start])  # "<think>"'s value: -M
        head(2, start, early_pair, float(x_think[start]), {const: M, start: -neg * M}, early)
        head(3, end, slow_pair, float(x_end[end]), {end: M / float(x_end[end])}, seen)
        lm_head = model.get_output_embeddings().weight
        lm_head[:, [early, seen]] = 0.0
        lm_head[[think_id, end_id]] = 0.0  # "<think>" is never generated
        lm_head[end_id, early] = K
        lm_head[end_id, seen] = -3 * K


@_seeded
def build_reasoning_llama(path) -> pathlib.Path:
    """Text-only Llama that "reasons" like Qwen3 / DeepSeek-R1 distills: "<think>" and
    "</think>" are single, non-special added tokens (kept by skip_special_tokens decoding),
    the generation prompt ends with "<think>\\n", and greedy output is ~14 random tokens,
    "</think>" once, then random text (the answer) up to max_new_tokens."""
    tokenizer = build_tokenizer([], "")
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in (THINK, END_THINK)])
    tokenizer.chat_template = REASONING_CHAT_TEMPLATE
    model = LlamaForCausalLM(_text_config(tokenizer))
    _install_think_circuit(model, tokenizer)
    return _finish(model, tokenizer, path)


# Hermes-style tool calls (Qwen2.5, Qwen3, Hermes, ...): the template lists the tools in a
# system turn, renders an assistant's calls as <tool_call>{json}</tool_call> and a tool's
# result as a user turn in <tool_response>. Its generation prompt ends with "<|assistant|>"
# after a user turn but with "<|assistant|>\n" after a tool result: that last token is what
# the tool model's circuit keys on.
TOOL_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- if tools -%}{{- '<|system|>\nYou may call these tools:\n' -}}"
    "{%- for tool in tools -%}{{- (tool | tojson) + '\n' -}}{%- endfor -%}"
    "{{- '<end_of_utterance>\n' -}}{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- set ns = namespace(text='') -%}"
    "{%- if message['content'] is string -%}{%- set ns.text = message['content'] -%}"
    "{%- elif message['content'] -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{%- set ns.text = ns.text + part['text'] -%}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'tool' -%}"
    "{{- '<|user|>\n<tool_response>\n' + ns.text + '\n</tool_response><end_of_utterance>\n' -}}"
    "{%- else -%}"
    "{{- '<|' + message['role'] + '|>\n' + ns.text -}}"
    "{%- for call in message.get('tool_calls') or [] -%}"
    "{{- '<tool_call>\n' + ({'name': call['function']['name'], 'arguments': call['function']['arguments']}"
    " | tojson) + '\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{{- '<end_of_utterance>\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{%- if messages[-1]['role'] == 'tool' -%}{{- '<|assistant|>\n' -}}"
    "{%- else -%}{{- '<|assistant|>' -}}{%- endif -%}"
    "{%- endif -%}"
)
# The one call the tool model makes, in three added tokens.
TOOL_CALL_PIECES = ["<tool_call>\n", '{"name": "get_weather", "arguments": {"city": "Paris"}}', "\n</tool_call>"]


def _install_tool_call_circuit(model, tokenizer) -> None:
    """A bigram chain: "<|assistant|>" -> the three call pieces -> EOS, whatever came before.
    Four residual coordinates, one per link, are zero in every embedding but the link's
    source (1 there), read and written by no layer, and looked at only by the link's target
    row of lm_head (K); the targets' other lm_head columns are zero, so they are never
    generated otherwise. After "<|assistant|>\n" (a tool result came) the output is random text."""
    sources = tokenizer.convert_tokens_to_ids(["<|assistant|>", *TOOL_CALL_PIECES])
    targets = [*sources[1:], tokenizer.eos_token_id]
    reserved = list(range(len(sources)))
    K = 400.0
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[:, reserved] = 0.0
        for r, source in zip(reserved, sources):
            emb[source, r] = 1.0
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                proj.weight[:, reserved] = 0.0
            attn.o_proj.weight[reserved] = 0.0
            mlp.down_proj.weight[reserved] = 0.0
        lm_head = model.get_output_embeddings().weight
        lm_head[:, reserved] = 0.0
        lm_head[targets] = 0.0
        for r, target in zip(reserved, targets):
            lm_head[target, r] = K


@_seeded
def build_tool_llama(path) -> pathlib.Path:
    """Text-only Llama whose template takes tools (Hermes format) and which, greedy, answers
    a user message with exactly one call, <tool_call>\n{"name": "get_weather", "arguments":
    {"city": "Paris"}}\n</tool_call>, then EOS; and a tool result with random text."""
    tokenizer = build_tokenizer([], "")
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOOL_CALL_PIECES])
    tokenizer.chat_template = TOOL_CHAT_TEMPLATE
    model = LlamaForCausalLM(_text_config(tokenizer))
    return _finish(model, tokenizer, path, circuit=_install_tool_call_circuit)


# ---------------------------------------------------------------- audio

AUDIO, AUDIO_BOS, AUDIO_EOS = "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"  # Qwen2-Audio's
MEL_BINS = 16  # real Whisper-style encoders use 80 or 128; any count works with random weights

# The chat template of the other tiny models with audio parts instead of image parts: each
# becomes <|audio_bos|><|AUDIO|><|audio_eos|>, and the processor repeats <|AUDIO|> once per
# audio token (25 per second of audio). Image parts are dropped.
AUDIO_CHAT_TEMPLATE = CHAT_TEMPLATE.replace(
    "{%- elif part['type'] == 'image' -%}{{- '{image}' -}}",
    "{%- elif part['type'] == 'audio' -%}{{- '" + AUDIO_BOS + AUDIO + AUDIO_EOS + "' -}}",
)
assert AUDIO_CHAT_TEMPLATE != CHAT_TEMPLATE


@_seeded
def build_audio_llm(path) -> pathlib.Path:
    """Qwen2-Audio: a Whisper-style audio encoder (2 layers, d_model 32) + linear projector +
    Qwen2 text model (2 layers, hidden 32), with Qwen2AudioProcessor = WhisperFeatureExtractor
    (16 kHz, 16 mel bins, 30 s window) + the byte-level BPE tokenizer.

    ``processor.apply_chat_template`` takes ``{"type": "audio", "audio": <1-D float numpy
    array at 16 kHz>}`` parts and returns input_ids (with ``(((frames - 1) // 2 + 1) - 2) // 2 + 1``
    ``<|AUDIO|>`` tokens per part, frames = 100 per second: 50 for 2 s, 750 for 30 s),
    attention_mask, input_features (1, 16, 3000) and feature_attention_mask (1, 3000). Audio
    longer than 30 s is cut to 30 s (the feature extractor truncates, without a warning).
    Load with AutoProcessor + AutoModelForMultimodalLM (AutoModelForSeq2SeqLM works too;
    AutoModelForImageTextToText and AutoModelForCausalLM don't)."""
    tokenizer = build_tokenizer([AUDIO, AUDIO_BOS, AUDIO_EOS], "")
    tokenizer.chat_template = AUDIO_CHAT_TEMPLATE
    text_config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
        initializer_range=INIT_STD, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    config = Qwen2AudioConfig(
        audio_config=dict(
            num_mel_bins=MEL_BINS, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
            d_model=32, max_source_positions=1500, initializer_range=INIT_STD,  # 1500 = 30 s
        ),
        text_config=text_config.to_dict(),
        audio_token_index=tokenizer.convert_tokens_to_ids(AUDIO),
    )
    model = Qwen2AudioForConditionalGeneration(config)
    feature_extractor = WhisperFeatureExtractor(feature_size=MEL_BINS)  # 16 kHz, 30 s chunks
    processor = Qwen2AudioProcessor(
        feature_extractor, tokenizer, chat_template=AUDIO_CHAT_TEMPLATE,
        audio_token=AUDIO, audio_bos_token=AUDIO_BOS, audio_eos_token=AUDIO_EOS,
    )
    return _finish(model, tokenizer, path, processor)


# Whisper's special tokens, in Whisper's order, after the text tokens: the tokenizer and the
# ASR pipeline read every id above "<|notimestamps|>" as a timestamp, so text tokens must come
# first. No timestamp tokens (<|0.00|> ...): this model can't return timestamps.
WHISPER_SPECIAL = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|translate|>", "<|transcribe|>",
                   "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>"]


def build_whisper_tokenizer() -> WhisperTokenizer:
    """A WhisperTokenizer over a byte-level BPE trained here (503 text tokens), then Whisper's
    special tokens (ids 503-511; <|endoftext|> is BOS, EOS, UNK and pad)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(WHISPER_SPECIAL),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    trained = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tokenizer = WhisperTokenizer(vocab=trained["vocab"], merges=merges, pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"extra_special_tokens": WHISPER_SPECIAL[1:]})
    tokenizer.set_prefix_tokens()  # again, now that <|startoftranscript|> etc. exist
    return tokenizer


@_seeded
def build_whisper(path) -> pathlib.Path:
    """Whisper for transcription (speech.py): WhisperForConditionalGeneration with 2+2 layers,
    d_model 32, 16 mel bins, the real 30 s window (1500 encoder positions) and 448 decoder
    positions; WhisperProcessor = WhisperFeatureExtractor (16 kHz) + build_whisper_tokenizer().
    Multilingual with one language (<|en|>; detection always picks it). The generation config
    has what WhisperForConditionalGeneration.generate reads (decoder_start_token_id,
    no_timestamps_token_id, lang_to_id, task_to_id, is_multilingual, forced_decoder_ids=None, ...).

    Greedy, it writes random text for any audio: EOS and the other special tokens are silenced
    like in _finish, so a transcription runs to its token limit (bound it: max_length or
    max_new_tokens), the same for the same audio."""
    tokenizer = build_whisper_tokenizer()
    ids = dict(zip(WHISPER_SPECIAL, tokenizer.convert_tokens_to_ids(WHISPER_SPECIAL)))
    end = ids["<|endoftext|>"]
    config = WhisperConfig(
        vocab_size=len(tokenizer), num_mel_bins=MEL_BINS, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_source_positions=1500, max_target_positions=448, init_std=INIT_STD,
        tie_word_embeddings=False,  # _finish zeroes lm_head rows: keep the decoder's embeddings
        bos_token_id=end, eos_token_id=end, pad_token_id=end,
        decoder_start_token_id=ids["<|startoftranscript|>"],
    )
    model = WhisperForConditionalGeneration(config)
    processor = WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=MEL_BINS),
                                 tokenizer=tokenizer)
    _finish(model, tokenizer, path, processor)
    # _finish saved a plain generation config; Whisper's generate needs its own fields.
    GenerationConfig(
        bos_token_id=end, eos_token_id=end, pad_token_id=end, decoder_start_token_id=ids["<|startoftranscript|>"],
        max_length=448, do_sample=False, forced_decoder_ids=None, begin_suppress_tokens=[end], suppress_tokens=[],
        is_multilingual=True, lang_to_id={"<|en|>": ids["<|en|>"]},
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
        no_timestamps_token_id=ids["<|notimestamps|>"], prev_sot_token_id=ids["<|startofprev|>"],
        max_initial_timestamp_index=50, return_timestamps=False,
    ).save_pretrained(path)
    return path


BUILDERS = {"idefics3": build_idefics3, "llava": build_llava, "llama": build_llama,
            "reasoning": build_reasoning_llama, "tools": build_tool_llama,
            "audio": build_audio_llm, "whisper": build_whisper}


def build_all(root) -> dict[str, pathlib.Path]:
    """Build every model in a subdirectory of ``root``; existing builds are reused."""
    root = pathlib.Path(root)
    out = {}
    for name, build in BUILDERS.items():
        path = root / name
        out[name] = path if (path / "config.json").exists() else build(path)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: python {sys.argv[0]} OUT_DIR")
    for name, path in build_all(sys.argv[1]).items():
        print(f"{name}: {path}")
