"""A scripted expert for the synthetic shop: the actions that buy the best product a search shows for a goal.

The expert searches the instruction's request and wanted option values (what the agent can read), looks through
the results the search shows (all pages), picks the product whose purchase, with the goal's option values that the
product offers, earns the highest reward (ties: the earliest result), pages to it, clicks it, clicks the options and
buys. Its actions use the texts as the pages show them (ASINs upper case, `Buy Now`), which the environment
lower-cases. It knows the goal (an oracle): its trajectories are imitation data for small agent models.

Example:
    >>> from hf_m2n2.demo.shop.engine import Shop, ShopEnv
    >>> from hf_m2n2.demo.shop.catalogue import ShopConfig
    >>> shop = Shop(ShopConfig(num_products=24))
    >>> env = ShopEnv(shop)
    >>> _ = env.reset(0)
    >>> [env.step(action)[1] for action in expert_actions(shop, env.goal)][-1]
    1.0
"""

from __future__ import annotations

from hf_m2n2.demo.shop import pages
from hf_m2n2.demo.shop.catalogue import Goal, Product
from hf_m2n2.demo.shop.engine import Shop
from hf_m2n2.demo.shop.reward import get_reward


def search_keywords(goal: Goal) -> str:
    """The expert's search: the instruction's request without "Find me" and commas, then the wanted option values.

    Example:
        >>> from hf_m2n2.demo.shop.catalogue import build_catalogue, ShopConfig
        >>> goal = build_catalogue(ShopConfig(num_products=24)).goal(0)
        >>> goal.instruction_text
        'Find me shirts for daily wear with color: blue, and size: large, and price lower than 60.00 dollars'
        >>> search_keywords(goal)
        'shirts for daily wear blue large'
    """
    request = goal.instruction_text.split(", and price lower than")[0]
    if goal.goal_options:
        first = next(iter(goal.goal_options))
        request = request.split(f" with {first}: ")[0]
    request = request.removeprefix("Find me ").replace(",", "")
    return " ".join([request, *goal.goal_options.values()])


def _options_to_click(product: Product, goal: Goal) -> dict[str, str]:
    return {
        name: value for name, value in goal.goal_options.items() if value in product.options.get(name, ())
    }


def expert_actions(shop: Shop, goal: Goal) -> list[str]:
    """The expert's actions for `goal`, from the start page to Buy Now.

    Args:
        shop: the shop the goal belongs to.
        goal: the session's goal (e.g. `shop.catalogue.goal(session_id)`).

    Returns:
        `search[...]`, `click[Next >]` as often as needed, `click[<ASIN>]`, a click per option, `click[Buy Now]`;
        only the search when it finds nothing.
    """
    keywords = search_keywords(goal)
    hits = shop.search(keywords)
    actions = [f"search[{keywords}]"]
    if not hits:
        return actions

    def value(rank: int) -> float:
        product = hits[rank]
        return get_reward(product, goal, product.price, _options_to_click(product, goal)).total

    best = max(range(len(hits)), key=lambda rank: (value(rank), -rank))
    product = hits[best]
    actions += [f"click[{pages.NEXT_PAGE}]"] * (best // shop.config.results_per_page)
    actions.append(f"click[{product.asin}]")
    actions += [f"click[{value}]" for value in _options_to_click(product, goal).values()]
    actions.append(f"click[{pages.BUY_NOW}]")
    return actions
