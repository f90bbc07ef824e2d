"""One shopping environment, as WebShop's text environment (`WebAgentTextEnv`, observation mode "text") behaves.

`Shop` is the shared, read-only part (catalogue and search index); `ShopEnv` is one environment's state (what an
env id holds on the server): its session, the page it shows and what was chosen on it.

Page flow (WebShop's `SimServer.receive`):
- `reset(session_id)` -> the start page of goal `session_id` (None: a random goal and session name);
- `search[keywords]` -> results page 1, from any page (WebShop does not check for the search bar);
- on results: `click[next >]` / `click[< prev]` -> the next / previous page, `click[<asin>]` -> its item page;
- on an item page: `click[<option value>]` -> the same page with that option chosen, `click[description]` /
  `features` / `reviews` -> that sub page, `click[< prev]` -> the results page again (the search is rerun and the
  options forgotten), `click[buy now]` -> the done page, the reward, done=True;
- on a sub page: `click[< prev]` -> the item page (options kept);
- `click[back to search]` -> the start page of the same session.

An action is `search[...]` or `click[...]` (the argument is lower-cased); anything else, a click on a text that is
not a clickable of the page, or `click[search]` changes nothing and gives reward 0, done False. The reward is paid
on Buy Now only; after it the done page has no clickables, and a search still works (as in WebShop).

Example:
    >>> env = ShopEnv(Shop(ShopConfig(num_products=24)))
    >>> observation, _ = env.reset(0)
    >>> observation.startswith("WebShop [SEP] Instruction: [SEP] Find me ")
    True
    >>> env.available_actions()
    {'has_search_bar': True, 'clickables': ['search']}
"""

from __future__ import annotations

import json
import random
import re
import string
from dataclasses import dataclass, field

from hf_m2n2.demo.shop import pages
from hf_m2n2.demo.shop.catalogue import Catalogue, Goal, Product, ShopConfig, build_catalogue
from hf_m2n2.demo.shop.reward import Reward, get_reward
from hf_m2n2.demo.shop.search import SearchIndex

BASE_URL = "http://127.0.0.1:3000"  # WebShop's simulated site
_ACTION = re.compile(r"(.+)\[(.+)\]")
_SUB_PAGE_NAMES = {name.lower(): name for name in pages.SUB_PAGES}


class NoInstructionError(LookupError):
    """The page shows no instruction (the done page): WebShop's `get_instruction_text` fails there."""


def parse_action(action: str) -> tuple[str, str | None]:
    """Split `name[argument]` as WebShop does (a greedy regex match at the start); no match: `(action, None)`.

    Example:
        >>> parse_action("click[< Prev]"), parse_action("search[]")
        (('click', '< Prev'), ('search[]', None))
    """
    match = _ACTION.match(action)
    if match is None:
        return action, None
    return match.group(1), match.group(2)


class Shop:
    """The catalogue and its search engine, shared by every environment (read-only).

    Args:
        config: the shop's configuration (default `ShopConfig()`).
        catalogue: a catalogue already built from `config` (built here when None).
    """

    def __init__(self, config: ShopConfig | None = None, catalogue: Catalogue | None = None):
        self.config = config or (catalogue.config if catalogue else ShopConfig())
        self.catalogue = catalogue or build_catalogue(self.config)
        self.index = SearchIndex(self.catalogue.products)

    def search(self, keywords: str) -> list[Product]:
        """The products a search shows, best first (at most `config.max_results`)."""
        return self.index.search(keywords, self.config.max_results)


@dataclass
class _Session:
    name: str
    goal: Goal
    keywords: list[str] | None = None
    page_number: int = 1
    asin: str | None = None
    options: dict[str, str] = field(default_factory=dict)


class ShopEnv:
    """One environment: a session on the shop and the page it shows.

    Args:
        shop: the shared shop.
        rng: draws the session name and goal of a reset without a session id (default: seeded by the shop's
            seed). Construction resets to such a random session, as WebShop's environment does.

    Attributes:
        instruction_text: the instruction heading read at the last reset (`Instruction: ...`), as WebShop keeps it
            for `state`.
        last_reward: the parts of the last purchase's reward (None before one).
    """

    def __init__(self, shop: Shop, rng: random.Random | None = None):
        self.shop = shop
        self.rng = rng or random.Random(f"shop-env-{shop.config.seed}")
        self.last_reward: Reward | None = None
        self.reset()

    # ---------------------------------------------------------------- WebShop's interface

    def reset(self, session_id: int | None = None) -> tuple[str, None]:
        """Start session `session_id` (goal `session_id`; None: a random one) on the start page.

        Returns:
            `(observation, None)`.

        Raises:
            IndexError: the session id is out of range (the environment is left as it was).
        """
        if session_id is None:
            name = "".join(self.rng.choices(string.ascii_lowercase, k=10))
            goal = self.shop.catalogue.goals[self.rng.randrange(len(self.shop.catalogue.goals))]
        else:
            name, goal = str(session_id), self.shop.catalogue.goal(session_id)
        self._session = _Session(name, goal)
        self._show_start()
        self.instruction_text = self.get_instruction_text()
        return self.observation, None

    def step(self, action: str) -> tuple[str, float, bool, None]:
        """Apply `search[keywords]` or `click[text]`.

        Returns:
            `(observation, reward, done, None)`: the reward is paid on Buy Now only.
        """
        name, argument = parse_action(action)
        if argument is not None:
            argument = argument.lower()
        reward, done = 0.0, False
        if name == "search" and argument:
            self._show_results(argument.split(" "), 1)
        elif name == "click" and argument in self._page.clickables and argument != "search":
            reward, done = self._click(argument)
        return self.observation, reward, done, None

    @property
    def observation(self) -> str:
        """The page's visible texts joined by " [SEP] "."""
        return self._page.observation

    def available_actions(self) -> dict:
        """`{"has_search_bar": bool, "clickables": [lower-case button texts, ASINs, option values]}`."""
        return {"has_search_bar": self._page.has_search_bar, "clickables": list(self._page.clickables)}

    def get_instruction_text(self) -> str:
        """The page's instruction heading (`Instruction: ...` on the start page, `Instruction:...` elsewhere).

        Raises:
            NoInstructionError: on the done page.
        """
        if self._page.instruction_heading is None:
            raise NoInstructionError("the done page shows no instruction")
        return self._page.instruction_heading

    @property
    def state(self) -> dict:
        """`{"url", "html", "instruction_text"}` of the current page (the instruction as read at reset)."""
        return {"url": self._page.url, "html": self._page.html, "instruction_text": self.instruction_text}

    # ---------------------------------------------------------------- for in-process users (trainers, tests)

    @property
    def goal(self) -> Goal:
        """The session's goal."""
        return self._session.goal

    @property
    def page(self) -> pages.Page:
        """The page shown."""
        return self._page

    @property
    def chosen_options(self) -> dict[str, str]:
        """The options chosen on the current item (a copy)."""
        return dict(self._session.options)

    # ---------------------------------------------------------------- pages

    def _click(self, text: str) -> tuple[float, bool]:
        session, kind = self._session, self._page.kind
        if text == pages.BUY_NOW.lower():
            return self._buy(), True
        if text == pages.BACK_TO_SEARCH.lower():
            self._show_start()
        elif text == pages.NEXT_PAGE.lower() and kind == "results":
            self._show_results(session.keywords, session.page_number + 1)
        elif text == pages.PREV_PAGE.lower() and kind == "results":
            self._show_results(session.keywords, session.page_number - 1)
        elif text == pages.PREV_PAGE.lower() and kind == "sub":
            self._show_item()
        elif text == pages.PREV_PAGE.lower() and kind == "item":
            self._show_results(session.keywords, session.page_number)
        elif text in _SUB_PAGE_NAMES:
            self._show_sub(_SUB_PAGE_NAMES[text])
        else:
            clickable = self._page.clickables[text]
            if clickable.kind == "product":
                session.asin = text.upper()
            elif clickable.kind == "option":
                session.options[clickable.option_name.lower()] = text
            self._show_item()
        return 0.0, False

    def _show_start(self) -> None:
        session = self._session
        session.keywords, session.page_number, session.asin, session.options = None, 1, None, {}
        self._page = pages.start_page(f"{BASE_URL}/{session.name}", session.goal.instruction_text)

    def _show_results(self, keywords: list[str], page_number: int) -> None:
        session = self._session
        session.keywords, session.page_number, session.asin, session.options = keywords, page_number, None, {}
        hits = self.shop.search(" ".join(keywords))
        per_page = self.shop.config.results_per_page
        shown = hits[(page_number - 1) * per_page : page_number * per_page] if page_number >= 1 else []
        url = f"{BASE_URL}/search_results/{session.name}/{'+'.join(keywords)}/{page_number}"
        self._page = pages.results_page(url, session.goal.instruction_text, shown, page_number, len(hits))

    def _item_path(self) -> str:
        session = self._session
        return f"{session.name}/{session.asin}/{'+'.join(session.keywords or [])}/{session.page_number}"

    def _show_item(self) -> None:
        session = self._session
        url = f"{BASE_URL}/item_page/{self._item_path()}/{json.dumps(session.options)}"
        product = self.shop.catalogue.product(session.asin)
        self._page = pages.item_page(url, session.goal.instruction_text, product)

    def _show_sub(self, which: str) -> None:
        session = self._session
        url = f"{BASE_URL}/item_sub_page/{self._item_path()}/{which}/{session.options}"
        product = self.shop.catalogue.product(session.asin)
        self._page = pages.sub_page(url, session.goal.instruction_text, product, which)

    def _buy(self) -> float:
        session = self._session
        product = self.shop.catalogue.product(session.asin)
        self.last_reward = get_reward(product, session.goal, product.price, session.options)
        url = f"{BASE_URL}/done/{session.name}/{session.asin}/{session.options}"
        self._page = pages.done_page(url, session.asin, session.options, self.last_reward.total)
        return self.last_reward.total
