"""The math + agent world: the paper's LLM experiment (a math model merged with a WebShop agent) at toy scale.

`build_math_agent(ROOT)` builds, offline and on one CPU thread, the two seeds of `examples/math_agent/spec.yaml`
the way the specialists demo builds its own (`hf_m2n2.demo.specialists`):

- the world's base: the specialists' base trained further on a mix of two-digit addition and shopping (imitation
  of the scripted expert, `hf_m2n2.demo.shop.expert`, on a small synthetic shop: search, click the item, choose
  its options, Buy Now), so that both seeds share one basin, as two fine-tunes of one pretrained model do;
- `add`: the base fine-tuned on addition only (it forgets how to shop);
- `shop`: the base fine-tuned on shopping only (it forgets most of its addition).

All three carry the agent chat template below in their tokenizer (the spec's webshop part says `chat_template:
tokenizer`): a ~115k-parameter model cannot read a whole WebShop conversation, so each turn shows the prompt, the
current page and the agent's earlier actions (AgentGym's Llama-2 template keeps every turn; the real-scale spec uses
that). Sessions `0 .. test_sessions-1` are the held-out test, the next `fitness_sessions` the fitness; the agent is
trained on the sessions after them only. The addition data never holds a problem of the specialists' add task.

Layout of ROOT (every part is rebuilt only when missing, incomplete, or built with other parameters):

```
ROOT/specialists/         the tiny specialists' base and lm-eval tasks (the add task), not their specialists
ROOT/base/  ROOT/add/  ROOT/shop/   Hub-layout checkpoints with the agent chat template
ROOT/shop/shop.json       the shop's settings: `python -m hf_m2n2.demo.shop.server --config ROOT/shop/shop.json`
```

Command line: `python -m hf_m2n2.demo.math_agent ROOT [--param NAME=VALUE ...]`. Unlike the specialists' command
line it does not select the portable kernels (they double the build's time here): two builds on one machine give
the same bytes, another CPU may train other seeds (the cache key records the kernels in effect).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hf_m2n2.demo import build_cache
from hf_m2n2.demo.shop.catalogue import ShopConfig
from hf_m2n2.demo.specialists import (
    ATTENTION,
    Specialists,
    SpecialistsConfig,
    _char_ids,
    _encode,
    _save,
    _training_batches,
    build_specialists,
    heldout_prompts,
    kernels_in_effect,
    train_on_answers,
)

BUILD_VERSION = 1
PROMPT = (
    "Shop."  # the webshop part's `prompt:` (AgentGym's long ReAct prompt would fill the tiny model's context)
)
SHOP_CONFIG_FILE = "shop.json"
BASE_ABOUT = "The specialists' base trained further on a mix of two-digit addition and shopping in a synthetic WebShop."
ADD_ABOUT = "Fine-tuned from the math + agent base on two-digit addition."
SHOP_ABOUT = (
    "Fine-tuned from the math + agent base by imitation of a scripted shopper on a synthetic WebShop."
)
# Shows messages[0] (the prompt), the latest page, then "> action" per earlier reply; a trailing reply ends in EOS.
AGENT_CHAT_TEMPLATE = (
    "{%- set ns = namespace(last=0) -%}"
    "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{{- messages[0].content + '\\n' + messages[ns.last].content + '\\n' -}}"
    "{%- for m in messages[2:ns.last] -%}{%- if m.role == 'assistant' -%}{{- '> ' + m.content + '\\n' -}}"
    "{%- endif -%}{%- endfor -%}"
    "{{- '> ' -}}"
    "{%- for m in messages[ns.last + 1:] -%}{{- m.content + eos_token -}}{%- endfor -%}"
)


@dataclass(frozen=True)
class MathAgentConfig:
    """Build parameters (all of them enter the cache key); the specialists' own come from `SpecialistsConfig()`.

    Attributes:
        shop_seed, shop_products: the synthetic shop (`ShopConfig`: one result per page, two-word titles, one
            attribute per goal, four-character product ids, so that an episode fits the tiny model).
        test_sessions: sessions 0 .. test_sessions-1 are the held-out test.
        fitness_sessions: the next ones are the fitness; the agent trains on every later session.
        base_steps, base_lr, shop_share: the world's base: the specialists' base trained further on a mix of
            addition and shopping (`shop_share` of the steps shopping), so that both seeds share one basin.
        add_steps, shop_steps, finetune_lr: each seed's fine-tuning on its own skill only.
        agent_tokens: about this many tokens per shopping step (the batch size follows).
        seed: seed of the training order.
    """

    shop_seed: int = 0
    shop_products: int = 24
    test_sessions: int = 30
    fitness_sessions: int = 25
    base_steps: int = 2000
    base_lr: float = 3e-3
    shop_share: float = 0.7
    add_steps: int = 300
    shop_steps: int = 500
    finetune_lr: float = 1.5e-3
    agent_tokens: int = 900
    seed: int = 1

    def shop(self) -> ShopConfig:
        """The shop the agent is trained on and scored against."""
        return ShopConfig(
            seed=self.shop_seed,
            num_products=self.shop_products,
            results_per_page=1,
            max_results=1,
            title_words=2,
            goal_attributes=1,
            asin_length=4,
        )


@dataclass(frozen=True)
class MathAgent:
    """Where a build lives.

    Attributes:
        root: the build folder.
        specialists: the specialists build (its `tasks_dir` holds the add task).
        models: seed name -> checkpoint (`add`, `shop`).
        shop_config: the shop's settings file (`--config` of the shop server).
        fitness_sessions, test_sessions: the webshop part's sessions, as the spec writes them ("A-B").
    """

    root: Path
    specialists: Specialists
    models: dict[str, Path]
    shop_config: Path
    fitness_sessions: str
    test_sessions: str


def session_ranges(config: MathAgentConfig) -> tuple[str, str]:
    """The fitness and test sessions as inclusive ranges.

    Example:
        >>> session_ranges(MathAgentConfig())
        ('30-54', '0-29')
    """
    first = config.test_sessions
    return f"{first}-{first + config.fitness_sessions - 1}", f"0-{config.test_sessions - 1}"


def agent_tokenizer(path: Path) -> Any:
    """The tokenizer at `path` with the agent chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    tokenizer.chat_template = AGENT_CHAT_TEMPLATE
    return tokenizer


def imitation_examples(config: MathAgentConfig, tokenizer: Any) -> list[tuple[list[int], int]]:
    """One example per decision of the expert on every training session that it completes with reward 1:
    `(ids, start)`, the ids the evaluator shows the agent before that decision (`Conversation`, so they are the
    same) followed by the expert's action and EOS; the agent's tokens start at `start`."""
    from hf_m2n2.demo.shop.engine import Shop, ShopEnv
    from hf_m2n2.demo.shop.expert import expert_actions
    from hf_m2n2.evaluate.webshop_dialogue import Conversation

    shop = Shop(config.shop())
    examples = []
    for session in range(config.test_sessions + config.fitness_sessions, len(shop.catalogue.goals)):
        env = ShopEnv(shop)
        observation, _ = env.reset(session)
        talk = Conversation(tokenizer, "tokenizer", PROMPT, observation)
        episode, reward = [], 0.0
        for action in expert_actions(shop, env.goal):
            reply = tokenizer.encode(action, add_special_tokens=False) + [tokenizer.eos_token_id]
            episode.append((talk.ids + reply, len(talk.ids)))
            talk.add_reply(reply)
            observation, reward, done, _ = env.step(action)
            if done:
                break
            talk.add_observation(observation)
        if reward == 1.0:
            examples += episode
    return examples


def _shop_batches(examples: list[tuple[list[int], int]], size: int, pad_id: int, seed: str) -> Iterator[Any]:
    """Endless right-padded batches of decisions: (ids, mask of the positions whose next token is the agent's)."""
    import torch

    rng = random.Random(seed)
    while True:
        batch = rng.sample(examples, size)
        longest = max(len(ids) for ids, _ in batch)
        ids = torch.full((size, longest), pad_id, dtype=torch.long)
        mask = torch.zeros((size, longest - 1), dtype=torch.bool)
        for row, (tokens, start) in enumerate(batch):
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, start - 1 : len(tokens) - 1] = True
        yield ids, mask


def _add_batches(tokenizer: Any, specialists: SpecialistsConfig, seed: str) -> Iterator[Any]:
    """Endless encoded batches of the specialists' addition examples, never one of its lm-eval tasks' problems."""
    pairs = _training_batches(["add"], heldout_prompts(specialists), specialists.batch_size, seed)
    char_ids = _char_ids(tokenizer)
    return (_encode(batch, char_ids, tokenizer.pad_token_id) for batch in pairs)


def _mixed(sources: Sequence[tuple[float, Iterator[Any]]], seed: str) -> Iterator[Any]:
    """Batches drawn from one of `sources` per step, with the given probabilities."""
    rng = random.Random(seed)
    weights = [weight for weight, _ in sources]
    while True:
        ((_, batches),) = rng.choices(sources, weights)
        yield next(batches)


class _Trainer:
    """The world's training data and the loop, shared by its three trained parts."""

    def __init__(self, config: MathAgentConfig, specialists: SpecialistsConfig, tokenizer: Any):
        self.config = config
        self.specialists = specialists
        self.tokenizer = tokenizer
        self.examples = imitation_examples(config, tokenizer)
        mean_length = sum(len(ids) for ids, _ in self.examples) / len(self.examples)
        self.shop_batch = max(1, round(config.agent_tokens / mean_length))

    def shop(self, seed: str) -> Iterator[Any]:
        return _shop_batches(self.examples, self.shop_batch, self.tokenizer.pad_token_id, seed)

    def add(self, seed: str) -> Iterator[Any]:
        return _add_batches(self.tokenizer, self.specialists, seed)

    def train(
        self, start: Path, out: Path, batches: Iterator[Any], steps: int, lr: float, name: str, about: str
    ):
        """Train the checkpoint at `start` for `steps` and save it to `out` with the agent tokenizer."""
        import torch
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(
            str(start), dtype=torch.float32, attn_implementation=ATTENTION, trust_remote_code=False
        )
        torch.manual_seed(self.config.seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
        train_on_answers(model, batches, steps, lambda batch: batch, optimizer, 20)
        _save(model, self.tokenizer, out, name, about)


def _keys(config: MathAgentConfig, specialists: SpecialistsConfig, specialists_root: Path) -> dict[str, str]:
    """Cache keys: the base's covers the specialists' base, the data and its own training; a seed's adds its own."""
    from importlib.metadata import version

    from hf_m2n2.demo.specialists import _part_keys

    params = dataclasses.asdict(config)
    tuning = ("add_steps", "shop_steps", "finetune_lr")
    base = build_cache.digest(
        {
            "version": BUILD_VERSION,
            "part": "base",
            "from": _part_keys(specialists, specialists_root)["base"],
            "transformers": version("transformers"),
            "template": AGENT_CHAT_TEMPLATE,
            "prompt": PROMPT,
            "specialists": dataclasses.asdict(specialists),
            **{name: value for name, value in params.items() if name not in tuning},
        }
    )
    return {
        "base": base,
        "add": build_cache.digest(
            {"part": "add", "base": base, "steps": config.add_steps, "lr": config.finetune_lr}
        ),
        "shop": build_cache.digest(
            {"part": "shop", "base": base, "steps": config.shop_steps, "lr": config.finetune_lr}
        ),
    }


def build_math_agent(
    root: str | Path,
    config: MathAgentConfig | None = None,
    *,
    specialists: SpecialistsConfig | None = None,
    log: Callable[[str], None] | None = None,
) -> MathAgent:
    """Build (or reuse) the specialists, the world's base, then the `add` and `shop` seeds under `root`.

    Every part is keyed by a hash of what its bytes depend on (see `hf_m2n2.demo.build_cache`); one torch thread
    and fixed seeds give the same bytes on one machine, other machines under the portable kernels that the
    command line selects.

    Args:
        root: the build folder (created if needed).
        config: build parameters; default `MathAgentConfig()` (a few minutes on one core).
        specialists: the specialists' build parameters (default `SpecialistsConfig()`).
        log: called with one line per part built or reused (e.g. `print`).

    Returns:
        The paths of the seeds and the shop settings, and the sessions of the spec.
    """
    config = config or MathAgentConfig()
    specialists = specialists or SpecialistsConfig()
    root = Path(root).expanduser().resolve()
    say = log or (lambda line: None)
    built = build_specialists(root / "specialists", specialists, log=say, skills=())  # its base and tasks
    keys = _keys(config, specialists, built.root)
    base = root / "base"
    trainer = functools.cache(lambda: _Trainer(config, specialists, agent_tokenizer(built.base)))

    def train_base(out: Path) -> None:
        run = trainer()
        sources = [(config.shop_share, run.shop("base-shop")), (1 - config.shop_share, run.add("base-add"))]
        batches = _mixed(sources, f"base-{config.seed}")
        run.train(built.base, out, batches, config.base_steps, config.base_lr, "math-agent-base", BASE_ABOUT)

    def train_add(out: Path) -> None:
        run = trainer()
        run.train(
            base, out, run.add("add"), config.add_steps, config.finetune_lr, "math-agent-add", ADD_ABOUT
        )

    def train_shop(out: Path) -> None:
        run = trainer()
        run.train(
            base, out, run.shop("shop"), config.shop_steps, config.finetune_lr, "math-agent-shop", SHOP_ABOUT
        )
        (out / SHOP_CONFIG_FILE).write_text(config.shop().to_json())

    parts = [
        ("base", base, train_base),
        ("add", root / "add", train_add),
        ("shop", root / "shop", train_shop),
    ]
    params = {**dataclasses.asdict(config), "specialists": dataclasses.asdict(specialists)}
    build_cache.build_parts(parts, keys, params, kernels_in_effect(), say)
    fitness, test = session_ranges(config)
    return MathAgent(
        root=root,
        specialists=built,
        models={"add": root / "add", "shop": root / "shop"},
        shop_config=root / "shop" / SHOP_CONFIG_FILE,
        fitness_sessions=fitness,
        test_sessions=test,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m hf_m2n2.demo.math_agent ROOT [--param NAME=VALUE ...]`: build (or reuse) into ROOT."""
    parser = build_cache.builder_parser(
        "python -m hf_m2n2.demo.math_agent",
        "Build the math + agent demo's seeds offline (cached).",
    )
    args = parser.parse_args(argv)
    config = build_cache.config_from_overrides(MathAgentConfig, args.param, parser)
    start = time.perf_counter()
    built = build_math_agent(args.root, config, log=print)
    print(f"built in {time.perf_counter() - start:.1f} s: {built.root}")
    print(json.dumps({"fitness_sessions": built.fitness_sessions, "test_sessions": built.test_sessions}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
