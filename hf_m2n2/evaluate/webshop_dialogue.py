"""A WebShop episode's conversation as AgentGym builds it, so that an agent trained there sees what it was trained on.

The conversation is AgentGym's (`agentenv.envs.webshop` in ReAct format): the WebShop instruction turn (the user),
"Ok." (the agent), then the env's observation (user) and the agent's reply (Thought + Action) in turn. The action
is the text after the last `Action:`; a reply with no `search[...]` or `click[...]` there is not sent to the server:
the client answers `Invalid Action.` and the current observation itself, reward 0, and the episode goes on.

Two templates turn it into token ids:
- `llama2` (AgentGym's `Llama2Template`, what AgentEvol-7B was trained with): a user turn is
  `<s>[INST] {text} [/INST]`, an agent turn `{text}</s>`, each tokenized on its own without added special tokens
  and concatenated; during an episode the model's generated ids are kept as they are (plus EOS when it stopped
  without one), not re-tokenized;
- `tokenizer`: the tokenizer's own chat template (`apply_chat_template`), the whole conversation rendered afresh
  each round, user/assistant roles.

`training_ids` gives the same ids for a finished conversation with the agent's tokens marked (imitation learning
of an agent that this evaluator then scores: the demo's `shop` specialist).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal

# AgentGym's ReAct instruction turn for WebShop (agentenv/envs/webshop.py), verbatim: the text AgentEvol saw.
WEBSHOP_PROMPT = (
    "You are web shopping.\nI will give you instructions about what to do.\nYou have to follow the instructions.\n"
    "Every round I will give you an observation and a list of available actions, you have to respond an action "
    "based on the state and instruction.\nYou can use search action if search is available.\nYou can click one of "
    "the buttons in clickables.\nAn action should be of the following structure:\nsearch[keywords]\nclick[value]\n"
    "If the action is not valid, perform nothing.\nKeywords in search are up to you, but the value in click must "
    "be a value in the list of available actions.\nRemember that your keywords in search should be carefully "
    "designed.\nYour response should use the following format:\n\nThought:\nI think ... \n\nAction: \n"
    "click[something]"
)
ACKNOWLEDGEMENT = "Ok."
INVALID_ACTION = "Invalid Action.\n\n"
TEMPLATES = ("llama2", "tokenizer")
Template = Literal["llama2", "tokenizer"]
Role = Literal["user", "assistant"]

_ACTION = re.compile(r"(search|click)\[(.+)\]", re.DOTALL)


def parse_action(text: str) -> str | None:
    """The action of a ReAct reply: the text after its last `Action:` (the whole reply without one), stripped;
    None when that is not `search[...]` or `click[...]` (what the client answers `Invalid Action.` to).

    Example:
        >>> parse_action("Thought:\\nI think I should search.\\n\\nAction:\\nsearch[red shirt]")
        'search[red shirt]'
        >>> parse_action("I do not know") is None
        True
    """
    action = text.rsplit("Action:", 1)[-1].strip()
    return action if _ACTION.match(action) else None


def check_template(name: str, tokenizer: Any) -> None:
    """Raise ValueError when `name` is not a template, or is `tokenizer` and the tokenizer has no chat template."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r} (known: {', '.join(TEMPLATES)})")
    if name == "tokenizer" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat_template: tokenizer, but the tokenizer has no chat template")


class Conversation:
    """One episode's conversation and the token ids the model continues from.

    Args:
        tokenizer: the agent's tokenizer.
        template: `llama2` or `tokenizer`.
        prompt: the instruction turn (AgentGym's WebShop prompt by default).
        observation: the env's first observation.

    Example:
        >>> talk = Conversation(tokenizer, "llama2", WEBSHOP_PROMPT, first_page)  # doctest: +SKIP
        >>> reply = talk.add_reply(model_output_ids)  # doctest: +SKIP
        >>> talk.add_observation(next_page)  # doctest: +SKIP
    """

    def __init__(self, tokenizer: Any, template: Template, prompt: str, observation: str):
        check_template(template, tokenizer)
        self.tokenizer = tokenizer
        self.template = template
        self.messages: list[tuple[Role, str]] = [("user", prompt), ("assistant", ACKNOWLEDGEMENT)]
        self.ids: list[int] = []
        if template == "llama2":
            self.ids = _turn_ids(tokenizer, "user", prompt) + _turn_ids(
                tokenizer, "assistant", ACKNOWLEDGEMENT
            )
        self.add_observation(observation)

    def add_observation(self, text: str) -> None:
        """The env's turn; the ids end with the generation prompt."""
        self.messages.append(("user", text))
        if self.template == "llama2":
            self.ids += _turn_ids(self.tokenizer, "user", text)
        else:
            self.ids = _render(self.tokenizer, self.messages)

    def add_reply(self, generated: Sequence[int]) -> str:
        """The agent's turn from its generated ids; returns its text (without the end-of-turn token)."""
        eos = self.tokenizer.eos_token_id
        generated = [int(i) for i in generated]
        ended = bool(generated) and generated[-1] == eos
        text = self.tokenizer.decode(generated[:-1] if ended else generated, skip_special_tokens=True)
        self.messages.append(("assistant", text))
        if self.template == "llama2":
            self.ids += generated if ended else generated + [eos]
        return text


def training_ids(
    tokenizer: Any, template: Template, prompt: str, turns: Sequence[tuple[str, str]]
) -> tuple[list[int], list[bool]]:
    """The ids of a whole episode (observation, reply) x n and, per position, whether it is the agent's.

    The ids are what `Conversation` holds after the same episode (with each reply ending in EOS), so that a model
    trained on them meets the same text when scored.
    """
    check_template(template, tokenizer)
    if template == "llama2":
        ids = _turn_ids(tokenizer, "user", prompt) + _turn_ids(tokenizer, "assistant", ACKNOWLEDGEMENT)
        mask = [False] * len(ids)
        for observation, reply in turns:
            user = _turn_ids(tokenizer, "user", observation)
            agent = _turn_ids(tokenizer, "assistant", reply)
            ids += user + agent
            mask += [False] * len(user) + [True] * len(agent)
        return ids, mask
    messages: list[tuple[Role, str]] = [("user", prompt), ("assistant", ACKNOWLEDGEMENT)]
    ids, mask = [], []
    for observation, reply in turns:
        messages.append(("user", observation))
        before = _render(tokenizer, messages)
        messages.append(("assistant", reply))
        after = _render(tokenizer, messages, generation_prompt=False)
        if after[: len(before)] != before:
            raise ValueError("the chat template renders an earlier turn differently once a reply follows it")
        mask += [False] * (len(before) - len(ids)) + [True] * (len(after) - len(before))
        ids = after
    return ids, mask


def _turn_ids(tokenizer: Any, role: Role, text: str) -> list[int]:
    """AgentGym's Llama-2 template, one turn."""
    wrapped = f"<s>[INST] {text} [/INST]" if role == "user" else f"{text}</s>"
    return list(tokenizer.encode(wrapped, add_special_tokens=False))


def _render(tokenizer: Any, messages: list[tuple[Role, str]], generation_prompt: bool = True) -> list[int]:
    chat = [{"role": role, "content": text} for role, text in messages]
    rendered = tokenizer.apply_chat_template(chat, add_generation_prompt=generation_prompt, tokenize=True)
    if isinstance(rendered, dict) or hasattr(rendered, "input_ids"):  # transformers 5 returns a BatchEncoding
        rendered = rendered["input_ids"]
    return [int(i) for i in rendered]
