"""Built-in chat templates, chosen by name in a recipe (`model.chat_template: chatml`).

Each template is a Jinja string usable as a tokenizer's `chat_template`. All of them are prefix-consistent (an
earlier turn renders the same whatever follows), which assistant-only masking relies on, and wrap what the assistant
says, with the marker that ends its turn, in `{% generation %}` so transformers' own assistant masks agree with ours.
BOS is written by the template where the format has one, from the tokenizer's `bos_token`, so it is never doubled.
The chatml, qwen and llama-3 templates render tool-calling conversations (a `tools` list, assistant `tool_calls`,
`tool` turns). Pure Python: importing this module loads no ML library.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltinTemplate:
    name: str
    source: str  # the Jinja text
    stop: str | None  # the marker that ends an assistant turn; None = the tokenizer's eos_token
    markers: tuple[str, ...]  # special strings the template writes; each should be one token of the vocabulary
    description: str


_BOS = "{% if bos_token %}{{ bos_token }}{% endif %}"

# Tool definitions and calls in Qwen2.5's (Hermes) form: tools listed in the system turn, calls as JSON inside
# <tool_call> tags, results as user turns wrapped in <tool_response>.
_HERMES_TOOLS = (
    "{% if tools %}{{ '\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{% for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{% endfor %}"
    "{{ '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": <function-name>, "arguments": <args-json-object>}'
    "\\n</tool_call>' }}{% endif %}"
)
_HERMES_CALLS = (
    "{% for call in message.get('tool_calls') or [] %}{% set f = call.get('function', call) %}"
    "{% if loop.first and message.get('content') %}{{ '\\n' }}{% elif not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ '<tool_call>\\n{\"name\": \"' + f['name'] + '\", \"arguments\": ' }}"
    "{{ f['arguments'] if f['arguments'] is string else f['arguments'] | tojson }}{{ '}\\n</tool_call>' }}"
    "{% endfor %}"
)


def _chatml(default_system: str | None) -> str:
    """ChatML turns; `default_system` is written when the conversation has no system turn (Qwen does)."""
    system = "{% set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else none %}"
    if default_system is None:
        tools_text = _HERMES_TOOLS.replace("{{ '\\n\\n# Tools", "{{ '\\n\\n' if system else '' }}{{ '# Tools", 1)
        head = "{% if system is not none or tools %}<|im_start|>system\n{{ system or '' }}" + tools_text
        head += "<|im_end|>\n{% endif %}"
    else:
        head = "<|im_start|>system\n{{ system if system is not none else '" + default_system + "' }}"
        head += _HERMES_TOOLS + "<|im_end|>\n"
    body = (
        "{% for message in messages %}{% if message['role'] == 'assistant' %}"
        "<|im_start|>assistant\n{% generation %}{{ message.get('content') or '' }}" + _HERMES_CALLS + "<|im_end|>"
        "{% endgeneration %}{{ '\\n' }}"
        "{% elif message['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message['content'] }}"
        "\n</tool_response><|im_end|>\n"
        "{% elif message['role'] != 'system' or not loop.first %}"
        "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return system + head + body


_LLAMA3 = (
    _BOS + "{% set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else none %}"
    "{% if system is not none or tools %}<|start_header_id|>system<|end_header_id|>\n\n{{ (system or '') | trim }}"
    "{% if tools %}{{ '\\n\\n' if system else '' }}"
    "{{ 'You have access to these functions. To call one, reply with JSON in the form "
    '{"name": function name, "parameters": dictionary of argument name and value}.\\n\' }}'
    "{% for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{% endfor %}{% endif %}<|eot_id|>{% endif %}"
    "{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% generation %}{{ (message.get('content') or '') | trim }}"
    "{% for call in message.get('tool_calls') or [] %}{% set f = call.get('function', call) %}"
    "{{ '{\"name\": \"' + f['name'] + '\", \"parameters\": ' }}"
    "{{ f['arguments'] if f['arguments'] is string else f['arguments'] | tojson }}{{ '}' }}{% endfor %}"
    "<|eot_id|>{% endgeneration %}"
    "{% elif message['role'] == 'tool' %}<|start_header_id|>ipython<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>"
    "{% elif message['role'] != 'system' or not loop.first %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

# [INST] formats have no system role: the system text goes in front of the first user turn.
_MISTRAL = (
    _BOS + "{% set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else none %}"
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' }}{% if system is not none and loop.index0 == 1 %}{{ system + '\\n\\n' }}{% endif %}"
    "{{ message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% elif message['role'] != 'system' or not loop.first %}"
    "{{ raise_exception('the mistral template has roles system (first), user and assistant only') }}"
    "{% endif %}{% endfor %}"
)

_LLAMA2 = (
    "{% set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else none %}"
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    + _BOS
    + "{{ '[INST] ' }}{% if system is not none and loop.index0 == 1 %}"
    "{{ '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' }}{% endif %}{{ message['content'] | trim + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% generation %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endgeneration %}"
    "{% elif message['role'] != 'system' or not loop.first %}"
    "{{ raise_exception('the llama-2 template has roles system (first), user and assistant only') }}"
    "{% endif %}{% endfor %}"
)

_ALPACA = (
    _BOS + "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}"
    "{% else %}{{ 'Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\\n\\n' }}{% endif %}"
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' }}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\\n\\n' }}"
    "{% elif message['role'] != 'system' or not loop.first %}"
    "{{ raise_exception('the alpaca template has roles system (first), user and assistant only') }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
)

# Gemma: roles user and model; the system text opens the first user turn (as Gemma 2 and 3 templates do).
_GEMMA = (
    _BOS + "{% set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else none %}"
    "{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "<start_of_turn>model\n{% generation %}{{ message['content'] | trim }}<end_of_turn>{% endgeneration %}{{ '\\n' }}"
    "{% elif message['role'] == 'user' %}<start_of_turn>user\n"
    "{% if system is not none and loop.index0 == 1 %}{{ system | trim + '\\n\\n' }}{% endif %}"
    "{{ message['content'] | trim }}<end_of_turn>\n"
    "{% elif message['role'] != 'system' or not loop.first %}"
    "{{ raise_exception('the gemma template has roles system (first), user and assistant only') }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

_CHATML_MARKERS = ("<|im_start|>", "<|im_end|>")
BUILTIN_TEMPLATES: dict[str, BuiltinTemplate] = {
    t.name: t
    for t in (
        BuiltinTemplate("chatml", _chatml(None), "<|im_end|>", _CHATML_MARKERS, "<|im_start|>role ... <|im_end|>"),
        BuiltinTemplate(
            "qwen", _chatml("You are a helpful assistant."), "<|im_end|>", _CHATML_MARKERS, "Qwen2.5: ChatML + tools"
        ),
        BuiltinTemplate(
            "llama-3",
            _LLAMA3,
            "<|eot_id|>",
            ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
            "Llama 3 headers, <|eot_id|>",
        ),
        BuiltinTemplate("mistral", _MISTRAL, None, (), "[INST] ... [/INST] answer</s>"),
        BuiltinTemplate("llama-2", _LLAMA2, None, (), "[INST] <<SYS>> ... [/INST] answer </s>"),
        BuiltinTemplate("alpaca", _ALPACA, None, (), "### Instruction: / ### Response: ... </s>"),
        BuiltinTemplate(
            "gemma", _GEMMA, "<end_of_turn>", ("<start_of_turn>", "<end_of_turn>"), "<start_of_turn>model ..."
        ),
    )
}


def builtin_template(name: str) -> BuiltinTemplate | None:
    """The built-in template called `name` (case-insensitive; llama3 = llama-3), or None."""
    key = name.strip().lower().replace("_", "-")
    key = {"llama3": "llama-3", "llama2": "llama-2", "qwen2": "qwen", "qwen2.5": "qwen"}.get(key, key)
    return BUILTIN_TEMPLATES.get(key)


# The turn markers of the formats that have a built-in, in the order to test them: a real template that writes them
# (a model's own, which lora-tune may fail to mask) is named to the built-in that renders the same turns maskably.
_FORMAT_MARKERS = (
    ("<|start_header_id|>", "llama-3"),
    ("You are Qwen, created by Alibaba Cloud", "qwen"),
    ("<|im_start|>", "chatml"),
    ("<start_of_turn>", "gemma"),
    ("<<SYS>>", "llama-2"),
    ("[INST]", "mistral"),
    ("### Instruction:", "alpaca"),
)


def builtin_for(template: str | None) -> BuiltinTemplate | None:
    """The built-in that writes the same turn format as `template` (a model's own Jinja text), or None.

    None too when `template` is a built-in itself: a built-in refuses only shapes its format has no place for.
    """
    if not template or any(t.source == template for t in BUILTIN_TEMPLATES.values()):
        return None
    name = next((name for marker, name in _FORMAT_MARKERS if marker in template), None)
    return BUILTIN_TEMPLATES.get(name) if name else None


def looks_like_template_name(value: str) -> bool:
    """A recipe value that is a name rather than Jinja text or a .jinja path (used for 'unknown template' errors)."""
    return "{" not in value and not value.endswith(".jinja") and " " not in value.strip() and "\n" not in value
