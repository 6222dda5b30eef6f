"""Tiny Hugging Face models made on the spot: a BPE tokenizer trained locally with a tool-calling
chat template, and a random-init model of a real architecture (Llama, Mistral, Qwen2, Qwen3,
Qwen3-MoE, Mixtral). No model hub is reachable from CI, so every test and demo uses these.

The chat template is ChatML with Hermes-style tool calls (the Qwen2.5 convention):
    <|im_start|>assistant\n...<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call><|im_end|>
    <|im_start|>user\n<tool_response>\n...\n</tool_response><|im_end|>
The tool tags are special tokens, so a tool call is recognisable token by token.
"""

from __future__ import annotations

import glob
import json
import os
import random

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>",
                  "<tool_response>", "</tool_response>"]
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral")

CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions. Function signatures:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each call, return a JSON object with the function name and arguments "
    "within <tool_call></tool_call> tags.<|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' and loop.first %}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' + (message.content or '') }}"
    "{%- for call in (message.tool_calls or []) %}"
    "{%- set fn = call.function if call.function is defined else call %}"
    "{%- if (message.content or '') or not loop.first %}{{- '\\n' }}{%- endif %}"
    "{{- '<tool_call>\\n{\"name\": \"' + fn.name + '\", \"arguments\": ' }}"
    "{%- if fn.arguments is string %}{{- fn.arguments }}{%- else %}{{- fn.arguments | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _corpus(seed: int = 0) -> list[str]:
    """Local training text: Python stdlib sources plus synthetic chat/tool-call/arithmetic lines."""
    import email

    files = sorted(glob.glob(os.path.join(os.path.dirname(email.__file__), "*.py")))[:30]
    texts = [open(f, encoding="utf-8", errors="ignore").read() for f in files]
    rng = random.Random(seed)
    lines = []
    for _ in range(3000):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        op = rng.choice("+-*")
        lines.append(f'What is {a} {op} {b}? {{"name": "calculator", "arguments": {{"expression": "{a} {op} {b}"}}}} '
                     f"The answer is {eval(f'{a}{op}{b}')}.")
    texts.append("\n".join(lines))
    return texts


def train_tokenizer(vocab_size: int = 1024, seed: int = 0):
    """A byte-level BPE tokenizer (digits split one per token) with the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                 bos_token=None, unk_token=None, additional_special_tokens=SPECIAL_TOKENS[3:])
    hf.chat_template = CHAT_TEMPLATE
    return hf


def hf_config(arch: str, vocab_size: int, eos_id: int, pad_id: int, hidden: int = 128, layers: int = 4,
              heads: int = 4, kv_heads: int = 2, ffn: int = 256, experts: int = 4, tie: bool = False):
    """A transformers config of `arch` with the given (tiny) shape."""
    import transformers as tf

    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
                  tie_word_embeddings=tie, bos_token_id=None, eos_token_id=eos_id, pad_token_id=pad_id,
                  rms_norm_eps=1e-6)
    if arch == "llama":
        return tf.LlamaConfig(**common)
    if arch == "mistral":
        return tf.MistralConfig(**common, sliding_window=None)
    if arch == "qwen2":
        return tf.Qwen2Config(**common)
    if arch == "qwen3":
        return tf.Qwen3Config(**common, head_dim=hidden // heads)
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(**common, head_dim=hidden // heads, num_experts=experts, num_experts_per_tok=2,
                                 moe_intermediate_size=ffn // 2, norm_topk_prob=True, decoder_sparse_step=1,
                                 mlp_only_layers=[])
    if arch == "mixtral":
        return tf.MixtralConfig(**common, num_local_experts=experts, num_experts_per_tok=2, sliding_window=None)
    raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}")


def make_tiny_model(out_dir: str, arch: str = "qwen2", seed: int = 0, tokenizer_dir: str | None = None,
                    logit_scale: float = 1.0, dtype: str = "float32", **shape) -> dict:
    """Write tokenizer + random-init model to `out_dir`; returns a summary dict.

    `tokenizer_dir` reuses an existing tokenizer (so several tiny models share one vocabulary).
    `logit_scale` multiplies the output head so that sampling from the random model is peaky.
    """
    import torch
    import transformers as tf

    os.makedirs(out_dir, exist_ok=True)
    tok = tf.AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else train_tokenizer(seed=seed)
    tok.save_pretrained(out_dir)
    vocab = len(tok)
    vocab = (vocab + 63) // 64 * 64  # a multiple of 64 so any small TP divides it
    cfg = hf_config(arch, vocab, tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id, **shape)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    if logit_scale != 1.0:
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(logit_scale)
    model = model.to(getattr(torch, dtype))
    tf.utils.logging.disable_progress_bar()
    model.save_pretrained(out_dir, safe_serialization=True)
    summary = {"dir": out_dir, "arch": arch, "params": sum(p.numel() for p in model.parameters()),
               "vocab_size": vocab, "tokenizer_size": len(tok)}
    with open(os.path.join(out_dir, "megarl_tiny.json"), "w") as f:
        json.dump(summary, f)
    return summary
