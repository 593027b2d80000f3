"""Problem text -> prompt token ids, through the model's own chat template."""

from __future__ import annotations

DEFAULT_INSTRUCTION = "Reason briefly, step by step, then put your final answer in \\boxed{}."


def user_message(problem: str, instruction: str = DEFAULT_INSTRUCTION, hint: str | None = None) -> str:
    """The user turn: the problem, then a hint (replay.hints), then the answer-format instruction."""
    return "\n\n".join(part for part in (problem.strip(), hint, instruction) if part)


def chat_prompt_ids(tokenizer, problem: str, instruction: str = DEFAULT_INSTRUCTION,
                    system: str | None = None, hint: str | None = None) -> list[int]:
    """Token ids of the prompt that ends where the assistant's answer starts.

    With no chat template (a base model) the prompt is plain text ending in "Answer:".
    system=None keeps the template's own default system turn, if it has one.
    """
    content = user_message(problem, instruction, hint)
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": content}]
        # The rendered template already holds the special tokens: do not add them twice.
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = (f"{system}\n\n" if system else "") + f"{content}\n\nAnswer:"
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])
