"""WebShop's reward for a purchase, paid on "Buy Now": `r_type x (attribute matches + option matches + price
match) / (asked attributes + asked options + 1)`.

- type factor `r_type`: 1.0 when the bought product is of the goal's kind (same query, or two shared elements of
  the category path, or more than a fifth of the goal title's nouns in the bought title); 0.5 when none of these
  holds; but 0.1 when under a tenth of the goal title's nouns are in the bought title, and 0.0 when none is;
- an asked attribute matches when one of the product's attributes scores above 85 in fuzzy token-set matching,
  or else when the phrase occurs in the title, the bullet points or the description (lower case);
- an asked option matches when one of the bought option values scores above 85 against it, after WebShop's colour
  normalization; WebShop's synthetic goals hold options as a dict and it compares each `(name, value)` pair, so a
  value that is not itself a colour word is compared as the text "name value" (buying "large" satisfies
  "size: x-large", and not the reverse: WebShop's quirk, kept);
- the price matches when the product's price is at most the bound.

Fuzzy matching is `rapidfuzz`'s token-set ratio on thefuzz's preprocessing (ASCII only, letters and digits, lower
case), rounded to an integer as thefuzz does.

Deviation: WebShop finds a title's nouns with spaCy (`en_core_web_lg`, not installable here); the synthetic
catalogue knows them by construction (`Product.title_nouns`, `Goal.title_nouns`: brand, material, product-type
word).

Example:
    >>> from hf_m2n2.demo.shop.catalogue import build_catalogue, ShopConfig
    >>> catalogue = build_catalogue(ShopConfig(num_products=20))
    >>> goal = catalogue.goal(0)
    >>> product = catalogue.product(goal.asin)
    >>> get_reward(product, goal, product.price, dict(goal.goal_options)).total
    1.0
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from hf_m2n2.demo.shop.catalogue import Goal, Product

try:
    from rapidfuzz import fuzz, utils
except ModuleNotFoundError as exc:  # the `agent` extra
    raise ModuleNotFoundError("the synthetic shop needs rapidfuzz: pip install 'hf-m2n2[agent]'") from exc

FUZZY_THRESHOLD = 85  # a match scores strictly above it
# WebShop's colour words (web_agent_site/engine/normalize.py, MIT licence): an option value holding one is
# compared as the first of them it holds, in this order.
COLOR_SET = [
    "alabaster",
    "apricot",
    "aqua",
    "ash",
    "asphalt",
    "azure",
    "banana",
    "beige",
    "black",
    "blue",
    "blush",
    "bordeaux",
    "bronze",
    "brown",
    "burgundy",
    "camel",
    "camo",
    "caramel",
    "champagne",
    "charcoal",
    "cheetah",
    "chestnut",
    "chocolate",
    "christmas",
    "coffee",
    "cognac",
    "copper",
    "coral",
    "cranberry",
    "cream",
    "crystal",
    "dark",
    "denim",
    "eggplant",
    "elephant",
    "espresso",
    "fuchsia",
    "gold",
    "granite",
    "grape",
    "graphite",
    "grass",
    "gray",
    "green",
    "grey",
    "heather",
    "indigo",
    "ivory",
    "ivy",
    "khaki",
    "lavender",
    "lemon",
    "leopard",
    "light",
    "lilac",
    "lime",
    "magenta",
    "maroon",
    "mauve",
    "merlot",
    "midnight",
    "mint",
    "mocha",
    "multicolor",
    "mushroom",
    "mustard",
    "natural",
    "navy",
    "nude",
    "olive",
    "orange",
    "peach",
    "pewter",
    "pink",
    "plum",
    "purple",
    "rainbow",
    "red",
    "rose",
    "royal",
    "rust",
    "sand",
    "sapphire",
    "seashell",
    "silver",
    "skull",
    "slate",
    "steel",
    "stone",
    "stonewash",
    "sunflower",
    "tan",
    "taupe",
    "teal",
    "tiger",
    "turquoise",
    "violet",
    "walnut",
    "wheat",
    "white",
    "wine",
    "yellow",
]


@dataclass(frozen=True)
class TypeReward:
    """The type factor and what decided it."""

    r_type: float
    query_match: bool
    category_match: bool
    title_score: float


@dataclass(frozen=True)
class Reward:
    """A purchase's reward and its parts.

    Attributes:
        total: the reward (0 to 1).
        r_type: the type factor.
        attribute_matches / option_matches: how many asked attributes / options matched.
        price_match: whether the price is within the bound.
        type_detail: how `r_type` was decided.
    """

    total: float
    r_type: float
    attribute_matches: int
    option_matches: int
    price_match: bool
    type_detail: TypeReward


def fuzzy_score(a: str, b: str) -> int:
    """thefuzz's `token_set_ratio(a, b)`: 0-100, an integer.

    Example:
        >>> fuzzy_score("essential oil", "essential oils"), fuzzy_score("grey", "size grey")
        (96, 100)
    """
    return round(fuzz.token_set_ratio(_ascii(a), _ascii(b), processor=utils.default_process))


def _ascii(text: str) -> str:
    return text.encode("ascii", "ignore").decode()


def type_reward(purchased: Product, goal: Goal) -> TypeReward:
    """How well the bought product's kind matches the goal's (see the module docstring).

    Example:
        >>> from hf_m2n2.demo.shop.catalogue import build_catalogue, ShopConfig
        >>> catalogue = build_catalogue(ShopConfig(num_products=20))
        >>> goal = catalogue.goal(0)
        >>> type_reward(catalogue.product(goal.asin), goal).r_type
        1.0
    """
    query_match = purchased.query == goal.query
    bought_path = {part.strip() for part in purchased.product_category.split("›")}
    goal_path = {part.strip() for part in goal.product_category.split("›")}
    category_match = len(bought_path & goal_path) >= 2
    wanted = goal.title_nouns
    # WebShop divides the distinct shared nouns by the goal title's noun count (repeats included)
    title_score = len(set(purchased.title_nouns) & set(wanted)) / len(wanted) if wanted else 0.2
    r_type = 1.0 if (query_match or category_match or title_score > 0.2) else 0.5
    if title_score < 0.1:
        r_type = 0.1
    if title_score == 0.0:
        r_type = 0.0
    return TypeReward(r_type, query_match, category_match, title_score)


def attribute_matches(purchased: Product, asked: Sequence[str]) -> int:
    """How many of the asked attributes the bought product has (fuzzy), or mentions (substring)."""
    mentioned = [
        purchased.title.lower(),
        " ".join(purchased.bullet_points).lower(),
        purchased.description.lower(),
    ]
    count = 0
    for attribute in asked:
        if any(fuzzy_score(have, attribute) > FUZZY_THRESHOLD for have in purchased.attributes) or any(
            attribute in text for text in mentioned
        ):
            count += 1
    return count


def _normalize_bought(value: str) -> str:
    """The first colour word the value holds, else the value."""
    return next((color for color in COLOR_SET if color in value), value)


def _normalize_asked(name: str, value: str) -> str:
    """A `(name, value)` pair as WebShop compares it: the colour word equal to the name or the value, else the
    text of the pair (which its fuzzy matcher reads as "name value")."""
    return next((color for color in COLOR_SET if color in (name, value)), f"{name} {value}")


def option_matches(bought: Mapping[str, str], asked: Mapping[str, str]) -> int:
    """How many asked options (name -> value) one of the bought option values satisfies."""
    bought_values = [_normalize_bought(value) for value in bought.values()]
    count = 0
    for name, value in asked.items():
        wanted = _normalize_asked(name, value)
        if any(fuzzy_score(have, wanted) > FUZZY_THRESHOLD for have in bought_values):
            count += 1
    return count


def get_reward(purchased: Product, goal: Goal, price: float, options: Mapping[str, str]) -> Reward:
    """The reward of buying `purchased` with the chosen `options` at `price`, for `goal`.

    Args:
        purchased: the product bought.
        goal: the session's goal.
        price: the price paid.
        options: option name -> the value clicked on the item page (unclicked options absent).

    Returns:
        The reward and its parts.
    """
    kind = type_reward(purchased, goal)
    price_match = price <= goal.price_upper
    attributes = attribute_matches(purchased, goal.attributes)
    option_count = option_matches(options, goal.goal_options)
    total = (attributes + option_count + int(price_match)) / (
        len(goal.attributes) + len(goal.goal_options) + 1
    )
    return Reward(total * kind.r_type, kind.r_type, attributes, option_count, price_match, kind)
