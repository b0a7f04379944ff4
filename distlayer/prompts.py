"""What a request asks the model for: its prompt or chat messages checked, tokenized, and
measured against the context. One copy of each rule, for every way in: ``generate()``'s
CLI, job files, the server and Ray Data rows.
"""

from __future__ import annotations

MESSAGES_SHAPE = 'a non-empty list of {"role": ..., "content": "..."}'


class NoChatTemplate(ValueError):
    """The tokenizer has no chat template; each caller says what to send instead."""


def model_context(config) -> int | None:
    """The longest sequence the model was trained for (its text config's
    ``max_position_embeddings``), or None when its config does not say."""
    return getattr(config.get_text_config(), "max_position_embeddings", None)


def messages_error(messages) -> str | None:
    """Why chat ``messages`` cannot run, or None when they can."""
    ok = isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages)
    if not ok:
        return f"messages must be {MESSAGES_SHAPE}"
    if not any(m["content"].strip() for m in messages):
        return "empty prompt: every message content is empty"
    return None


def check_prompt(prompt, messages) -> tuple[str | None, list | None, str | None]:
    """``(prompt, messages, None)`` for a prompt text or chat messages (exactly one given),
    else ``(None, None, why it cannot run)``."""
    if (prompt is None) == (messages is None):
        return None, None, 'give exactly one of "prompt" or "messages"'
    if prompt is not None:
        if not isinstance(prompt, str) or not prompt.strip():
            return None, None, f"empty prompt ({prompt!r}): write the prompt text"
        return prompt, None, None
    error = messages_error(messages)
    return (None, None, error) if error else (None, messages, None)


def tokenize(prompt: str | None, messages: list | None, tokenizer, chat_template: bool) -> list[int]:
    """Token ids of a prompt text or chat ``messages``; messages (or a prompt with
    ``chat_template``) get the template.

    Raises:
        NoChatTemplate: chat asked of a tokenizer without a template.
        ValueError: the template rejects the messages.
    """
    messages = messages or ([{"role": "user", "content": prompt}] if chat_template else None)
    if messages is None:
        return list(tokenizer(prompt).input_ids)
    if not getattr(tokenizer, "chat_template", None):
        raise NoChatTemplate("the model's tokenizer has no chat template")
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # jinja errors: messages the template does not accept
        raise ValueError(f"the chat template rejects these messages ({e})") from None
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def context_error(prompt_tokens: int, max_new_tokens: int, context: int | None, flag: str) -> str | None:
    """Why a prompt of ``prompt_tokens`` and ``max_new_tokens`` more (named as the caller
    names that setting, ``flag``) do not fit ``context`` tokens, or None when they do."""
    need = prompt_tokens + max_new_tokens
    if context and need > context:
        return (f"the prompt is {prompt_tokens} tokens and {flag} is {max_new_tokens}, {need} in all, over the "
                f"context of {context} tokens: shorten the prompt or lower {flag}")
    return None
