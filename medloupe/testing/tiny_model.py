"""Build a tiny, randomly initialised Qwen2.5-VL checkpoint on disk, with no hub access.

The checkpoint has the real architecture (vision tower with window attention, M-RoPE text
decoder), a real byte-level BPE tokenizer with Qwen's special tokens and chat template, and a
real Qwen2-VL image processor, all a few megabytes. Its weights are random, so its text is
noise: it exists to exercise the plumbing (chat templates, image processing, generation,
constrained decoding, the OpenAI-compatible server, vLLM's CPU engine) in tests and
benchmarks, not to answer.

    >>> from medloupe.testing.tiny_model import build_tiny_qwen2_5_vl
    >>> path = build_tiny_qwen2_5_vl("/tmp/tiny-qwen")  # doctest: +SKIP
    >>> # medloupe serve-vlm hf:/tmp/tiny-qwen
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2-VL's chat template, reduced to what medloupe sends (text and image parts).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


MAX_POSITIONS = 32768  # context of the model and its tokenizer (vLLM reads both)


def _byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with the 256 byte symbols and no merges: every UTF-8 byte is a token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=MAX_POSITIONS,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_qwen2_5_vl(path: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny random Qwen2.5-VL model, tokenizer and processor to ``path``.

    Args:
        path: target folder (created; existing files are overwritten).
        seed: torch seed for the random weights (the same seed gives the same model).

    Returns:
        ``path``, loadable with ``AutoProcessor`` / ``AutoModelForImageTextToText``.
    """
    import torch
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = _byte_tokenizer()
    ids: dict[str, int] = {t: int(tokenizer.convert_tokens_to_ids(t)) for t in SPECIAL_TOKENS}  # type: ignore[arg-type]
    vocab_size = 64 * ((len(tokenizer) + 63) // 64)

    patch, merge = 14, 2
    unit = patch * merge
    image_processor = Qwen2VLImageProcessor(
        patch_size=patch,
        merge_size=merge,
        temporal_patch_size=2,
        min_pixels=4 * unit * unit,
        max_pixels=64 * unit * unit,
    )
    video_processor = Qwen2VLVideoProcessor(patch_size=patch, merge_size=merge)
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )

    # Text head_dim 64 (hidden 128 / 2 heads, 1 KV head): vLLM's CPU attention supports
    # head_dim 32, 64, 80, 96, 112, 128, ... (not 16); mrope_section sums to head_dim / 2.
    hidden, heads = 128, 2
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": hidden,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": heads,
            "num_key_value_heads": 1,
            "max_position_embeddings": MAX_POSITIONS,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1_000_000.0,
                "mrope_section": [8, 12, 12],  # sums to head_dim / 2 = 32
            },
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 2,
            "patch_size": patch,
            "spatial_merge_size": merge,
            "temporal_patch_size": 2,
            "window_size": 2 * unit,
            "out_hidden_size": hidden,
            "fullatt_block_indexes": [1],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "medloupe-tiny-model.json").write_text(
        json.dumps({"note": "random weights, built by medloupe.testing.tiny_model", "seed": seed})
    )
    return out
