"""A synthetic WebShop catalogue: products and goals (sessions), built deterministically from a seed.

WebShop's products are scraped Amazon listings; each carries a title, a category path, the search query it was
scraped for, attributes (mined phrases such as "machine wash"), buying options (color, size...) and a price. Its
synthetic goals (the ones AgentGym's server loads) are one per product and option combination, shuffled: an
instruction such as "Find me slim fit, machine wash shirts with short sleeve with color: navy, and size: large,
and price lower than 40.00 dollars", the wanted attributes, the wanted options and a price bound.

This module draws the same kinds of records from a small made-up vocabulary (twelve product types in five
departments, invented brand names), short enough for a tiny byte-level model to learn the shop by imitation.
Goal i is session id i. Where WebShop has a number (10 results a page, 50 results a search, 10-character ASINs,
8,000 environments), `ShopConfig` defaults to it.

Deviations from WebShop, all deliberate:
- one price per product, drawn from the seed (WebShop draws a price inside a product's range per environment,
  unseeded); the price text is WebShop's `f"${price}"` of that float;
- no reviews and no rating (WebShop's loader has them commented out: every item shows "Rating: N.A." and an
  empty Reviews page), so here too;
- the nouns of a title (what WebShop's type reward compares, through spaCy) are known by construction: the
  brand, the material and the product-type word (`Product.title_nouns`).

Example:
    >>> catalogue = build_catalogue(ShopConfig(seed=0, num_products=20))
    >>> goal = catalogue.goal(0)
    >>> catalogue.product(goal.asin).title == goal.name
    True
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import os
import random
import string
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from hf_m2n2.errors import SpecError

# WebShop's goal price bounds: the tens above the product's price ([10, 20, ..., 990]).
PRICE_STEPS = tuple(10.0 * i for i in range(1, 100))
NO_PRICE_BOUND = 1_000_000.0  # WebShop's bound when a product costs more than the last step allows
CATEGORY_SEPARATOR = " › "  # WebShop's product_category separator


@dataclass(frozen=True)
class ShopConfig:
    """Everything that shapes the shop; the same config gives the same catalogue, goals and env ids.

    Attributes:
        seed: the seed of every random choice (catalogue, goal order, env ids, unseeded resets).
        num_products: products in the catalogue.
        results_per_page: products on a search results page (WebShop: 10).
        max_results: results a search returns at most (WebShop: 50).
        title_words: most words in a product title (the product-type word always stays).
        goal_attributes: most attributes an instruction asks for.
        asin_length: characters of a product id ("B0" and upper-case letters or digits; WebShop: 10).
        max_envs: environments the server creates; past it, /create hands out existing ids round-robin
            (AgentGym's server: 8000).
    """

    seed: int = 0
    num_products: int = 300
    results_per_page: int = 10
    max_results: int = 50
    title_words: int = 5
    goal_attributes: int = 2
    asin_length: int = 10
    max_envs: int = 8000

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise SpecError(f"shop.{field.name}", f"must be an integer, got {value!r}")
            if field.name != "seed" and value < 1:
                raise SpecError(f"shop.{field.name}", f"must be at least 1, got {value}")
        if self.asin_length < 4:
            raise SpecError("shop.asin_length", f"must be at least 4, got {self.asin_length}")
        if 36 ** (self.asin_length - 2) < 2 * self.num_products:
            raise SpecError(
                "shop.asin_length", f"{self.asin_length} characters cannot name {self.num_products} products"
            )

    def to_json(self) -> str:
        """The config as a JSON object (keys sorted), e.g. a demo build's `shop.json`, read back by `read`.

        Example:
            >>> ShopConfig.from_json(ShopConfig(seed=2).to_json()) == ShopConfig(seed=2)
            True
        """
        return json.dumps(dataclasses.asdict(self), sort_keys=True, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "shop") -> ShopConfig:
        """A config from a JSON object of its fields (missing fields keep their defaults).

        Args:
            text: the JSON text.
            source: what to name in errors (a file path).

        Raises:
            SpecError: not a JSON object, an unknown field, or a bad value (naming `source`, then the field).
        """
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError(source, f"not JSON ({exc.msg}, line {exc.lineno})") from None
        if not isinstance(values, dict):
            raise SpecError(source, "expected a JSON object of shop settings")
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SpecError(
                source, f"unknown shop setting {unknown[0]!r} (known: {', '.join(sorted(known))})"
            )
        try:
            return cls(**values)
        except SpecError as exc:
            raise SpecError(source, f"{exc.path.removeprefix('shop.')}: {exc.message}") from None

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> ShopConfig:
        """`from_json` of a file (e.g. `BUILD/shop.json`).

        Raises:
            SpecError: the file cannot be read, or does not hold a shop config.
        """
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise SpecError(str(path), f"cannot read it ({exc.strerror or exc})") from None
        return cls.from_json(text, str(path))


@dataclass(frozen=True)
class Product:
    """One product, with WebShop's fields under snake_case names.

    Attributes:
        asin: the product id shown on result pages (upper case).
        title: WebShop's `Title` (and `name`).
        query: the search query WebShop scraped it for (its type, e.g. "jackets"); the type reward compares it.
        category: WebShop's top-level `category` (e.g. "fashion").
        product_category: the category path, joined by " › ".
        attributes: WebShop's mined `Attributes`.
        bullet_points: the Features page's lines.
        description: the Description page's text.
        options: option name -> its values, in display order (empty: a product without options).
        price: the price paid.
        title_nouns: the nouns of the title, lower case, in order (what the type reward compares).
    """

    asin: str
    title: str
    query: str
    category: str
    product_category: str
    attributes: tuple[str, ...]
    bullet_points: tuple[str, ...]
    description: str
    options: dict[str, tuple[str, ...]]
    price: float
    title_nouns: tuple[str, ...]

    @property
    def price_text(self) -> str:
        """The price as WebShop prints it: `$` and the float (e.g. `$23.5`)."""
        return f"${self.price}"

    def search_text(self) -> str:
        """The text the search engine indexes, as WebShop's index builds it: title, description, first bullet
        point and the options (`color: black, navy, and size: small, large`), lower case."""
        option_text = ", and ".join(f"{name}: {', '.join(values)}" for name, values in self.options.items())
        first_bullet = self.bullet_points[0] if self.bullet_points else ""
        return " ".join([self.title, self.description, first_bullet, option_text]).lower()


@dataclass(frozen=True)
class Goal:
    """One session: what to buy, as WebShop's synthetic goals describe it.

    Attributes:
        asin: the target product.
        name: the target product's title.
        query: the target's query (its type).
        category: the target's top-level category.
        product_category: the target's category path.
        title_nouns: the nouns of the target's title.
        attributes: the attributes the instruction asks for (a subset of the target's).
        goal_options: option name -> wanted value, names sorted (empty for a product without options).
        price_upper: the price bound (NO_PRICE_BOUND: none).
        instruction_text: what the agent reads.
    """

    asin: str
    name: str
    query: str
    category: str
    product_category: str
    title_nouns: tuple[str, ...]
    attributes: tuple[str, ...]
    goal_options: dict[str, str]
    price_upper: float
    instruction_text: str


@dataclass(frozen=True)
class Catalogue:
    """The products and the goals of one `ShopConfig`.

    Attributes:
        config: what built it.
        products: in catalogue order (the search engine's tie order).
        goals: goal i is session id i.
    """

    config: ShopConfig
    products: tuple[Product, ...]
    goals: tuple[Goal, ...]

    @cached_property
    def _by_asin(self) -> dict[str, Product]:
        return {product.asin: product for product in self.products}

    def product(self, asin: str) -> Product:
        """The product of `asin` (upper case); raises KeyError when there is none."""
        return self._by_asin[asin]

    def goal(self, session_id: int) -> Goal:
        """The goal of a session id; negative ids count from the end, as WebShop's list indexing does.

        Raises:
            IndexError: the session id is out of range.
        """
        return self.goals[session_id]

    def to_json(self) -> str:
        """The whole catalogue (config, products, goals) as canonical JSON: the same config gives the same
        bytes."""
        payload = {
            "config": dataclasses.asdict(self.config),
            "products": [dataclasses.asdict(product) for product in self.products],
            "goals": [dataclasses.asdict(goal) for goal in self.goals],
        }
        return json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))

    def fingerprint(self) -> str:
        """sha256 of `to_json()` (hex), to tell catalogues apart in logs and caches."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()


# ---------------------------------------------------------------- the vocabulary


@dataclass(frozen=True)
class _Attribute:
    phrase: str
    slot: str  # where an instruction puts it: "pre" (before the type), "with" or "for"


@dataclass(frozen=True)
class _ProductType:
    category: str
    path: tuple[str, ...]
    query: str
    noun: str
    materials: tuple[str, ...]
    attributes: tuple[_Attribute, ...]
    options: tuple[tuple[str, tuple[str, ...]], ...]
    options_share: float  # the share of products of this type that have options
    price_range: tuple[float, float]


def _attrs(*spec: str) -> tuple[_Attribute, ...]:
    """`"waterproof:pre"` ... -> attributes."""
    return tuple(_Attribute(*item.split(":")) for item in spec)


_SIZES = ("small", "medium", "large", "x-large")
# Option values are chosen so that buying the asked value always counts under WebShop's option matching (no
# value contains a colour word of WebShop's list unless it is one, e.g. no "standard", which holds "tan").
_TYPES = (
    _ProductType(
        "fashion", ("Clothing", "Men", "Jackets"), "jackets", "jacket", ("nylon", "denim", "fleece", "leather"),
        _attrs("waterproof:pre", "lightweight:pre", "hooded:pre", "zip pockets:with", "hiking:for"),
        (("color", ("black", "navy", "grey", "olive", "khaki")), ("size", _SIZES)), 1.0, (25.0, 90.0),
    ),
    _ProductType(
        "fashion", ("Clothing", "Men", "Shirts"), "shirts", "shirt", ("cotton", "linen", "polyester"),
        _attrs("slim fit:pre", "machine wash:pre", "button down:pre", "short sleeve:with", "daily wear:for"),
        (("color", ("white", "black", "blue", "pink", "green")), ("size", _SIZES)), 1.0, (10.0, 40.0),
    ),
    _ProductType(
        "fashion", ("Clothing", "Shoes", "Sneakers"), "sneakers", "sneakers", ("mesh", "canvas", "suede"),
        _attrs("non slip:pre", "breathable:pre", "rubber sole:with", "memory foam:with", "running:for"),
        (("color", ("black", "white", "grey", "red")), ("size", ("7", "8", "9", "10", "11"))), 1.0, (30.0, 95.0),
    ),
    _ProductType(
        "electronics", ("Electronics", "Accessories", "Headphones"), "headphones", "headphones",
        ("plastic", "aluminum"),
        _attrs("wireless:pre", "noise cancelling:pre", "foldable:pre", "built in microphone:with", "travel:for"),
        (("color", ("black", "white", "blue", "silver")),), 0.7, (20.0, 150.0),
    ),
    _ProductType(
        "electronics", ("Electronics", "Accessories", "Chargers"), "chargers", "charger", ("plastic", "aluminum"),
        _attrs("fast charging:pre", "compact:pre", "usb c:with", "dual port:with", "laptops:for"),
        (), 0.0, (8.0, 45.0),
    ),
    _ProductType(
        "beauty", ("Beauty", "Hair Care", "Shampoo"), "shampoo", "shampoo", ("argan", "coconut", "lavender", "mint"),
        _attrs("sulfate free:pre", "paraben free:pre", "natural ingredients:with", "tea tree:with", "dry hair:for"),
        (("size", ("8 ounce", "16 ounce", "32 ounce")),), 0.6, (6.0, 30.0),
    ),
    _ProductType(
        "beauty", ("Beauty", "Makeup", "Lipstick"), "lipstick", "lipstick", ("cream", "gloss", "velvet"),
        _attrs("long lasting:pre", "cruelty free:pre", "waterproof:pre", "vitamin e:with", "dry lips:for"),
        (("color", ("red", "pink", "nude", "coral", "plum")),), 1.0, (5.0, 25.0),
    ),
    _ProductType(
        "grocery", ("Grocery", "Pantry", "Tea"), "tea", "tea", ("ginger", "chamomile", "jasmine", "peppermint"),
        _attrs("organic:pre", "caffeine free:pre", "gluten free:pre", "individually wrapped:pre", "honey:with"),
        (("size", ("20 count", "40 count", "100 count")),), 0.7, (4.0, 25.0),
    ),
    _ProductType(
        "grocery", ("Grocery", "Pantry", "Nuts"), "nuts", "nuts", ("almond", "cashew", "pistachio", "pecan"),
        _attrs("low sodium:pre", "high protein:pre", "non gmo:pre", "resealable bag:with", "keto diet:for"),
        (("flavor", ("salted", "unsalted", "honey roasted", "smoked")), ("size", ("8 ounce", "16 ounce"))),
        0.8, (5.0, 30.0),
    ),
    _ProductType(
        "home", ("Home & Kitchen", "Decor", "Lamps"), "lamps", "lamp", ("wood", "metal", "glass", "ceramic"),
        _attrs("dimmable:pre", "touch control:pre", "usb port:with", "living room:for", "bedroom:for"),
        (("color", ("white", "black", "gold", "brown")),), 0.5, (18.0, 80.0),
    ),
    _ProductType(
        "home", ("Home & Kitchen", "Bedding", "Pillows"), "pillows", "pillow", ("bamboo", "cotton", "latex"),
        _attrs("hypoallergenic:pre", "cooling:pre", "machine washable:pre", "removable cover:with",
               "side sleepers:for"),
        (("size", ("queen", "king")),), 0.8, (15.0, 60.0),
    ),
    _ProductType(
        "home", ("Home & Kitchen", "Kitchen", "Mugs"), "mugs", "mug", ("ceramic", "glass", "steel"),
        _attrs("dishwasher safe:pre", "microwave safe:pre", "insulated:pre", "lid:with", "gift:for"),
        (("size", ("12 ounce", "16 ounce", "20 ounce")),), 0.5, (8.0, 35.0),
    ),
)  # fmt: skip
_BRANDS = ("Arvo", "Belko", "Corvi", "Dalto", "Elvin", "Fenzo", "Gorma", "Halvo", "Ikana", "Juvel")
_ASIN_ALPHABET = string.ascii_uppercase + string.digits


@functools.cache
def noun_lexicon() -> frozenset[str]:
    """Every word a title uses as a noun (brands, materials, product-type words), lower case."""
    words = {brand.lower() for brand in _BRANDS}
    for kind in _TYPES:
        words.update(kind.materials)
        words.add(kind.noun)
    return frozenset(words)


# ---------------------------------------------------------------- building


def build_catalogue(config: ShopConfig | None = None) -> Catalogue:
    """Draw the products and goals of `config` (default: `ShopConfig()`).

    Args:
        config: the shop's configuration.

    Returns:
        The catalogue; the same config gives the same catalogue (see `Catalogue.to_json`).

    Example:
        >>> len(build_catalogue(ShopConfig(num_products=12)).products)
        12
    """
    config = config or ShopConfig()
    # one stream per purpose: a new kind of draw in one does not shift the others
    rng_products = random.Random(f"shop-products-{config.seed}")
    rng_goals = random.Random(f"shop-goals-{config.seed}")
    asins: set[str] = set()
    products = []
    for index in range(config.num_products):
        kind = _TYPES[index % len(_TYPES)] if index < len(_TYPES) else rng_products.choice(_TYPES)
        products.append(_draw_product(kind, config, rng_products, asins))
    rng_products.shuffle(products)  # catalogue order is the search engine's tie order: not grouped by type
    goals = [goal for product in products for goal in _goals_of(product, config, rng_goals)]
    rng_goals.shuffle(goals)
    return Catalogue(config, tuple(products), tuple(goals))


def _draw_product(kind: _ProductType, config: ShopConfig, rng: random.Random, asins: set[str]) -> Product:
    brand = rng.choice(_BRANDS)
    material = rng.choice(kind.materials)
    chosen_attributes = rng.sample(kind.attributes, rng.randint(2, 4))
    attributes = tuple(a for a in kind.attributes if a in chosen_attributes)  # in the type's order
    pre = [a.phrase for a in attributes if a.slot == "pre"]
    title_parts = _fit_title([brand], pre[:1], [material], [kind.noun], config.title_words)
    options: dict[str, tuple[str, ...]] = {}
    if rng.random() < kind.options_share:
        for name, values in kind.options:
            chosen = set(rng.sample(values, rng.randint(2, len(values))))
            options[name] = tuple(value for value in values if value in chosen)
    lexicon = noun_lexicon()
    title = " ".join(title_parts)
    low, high = kind.price_range
    return Product(
        asin=_draw_asin(config.asin_length, rng, asins),
        title=title,
        query=kind.query,
        category=kind.category,
        product_category=CATEGORY_SEPARATOR.join(kind.path),
        attributes=tuple(a.phrase for a in attributes),
        bullet_points=tuple(a.phrase for a in attributes),
        description=f"{brand} {kind.noun} made of {material}.",
        options=options,
        price=round(rng.uniform(low, high), 2),
        title_nouns=tuple(word for word in title.lower().split() if word in lexicon),
    )


def _fit_title(
    brand: list[str], attribute: list[str], material: list[str], noun: list[str], limit: int
) -> list:
    """Title words `brand attribute material noun`, dropping the attribute, then the material, then the brand
    while over `limit` words."""
    parts = [brand, attribute, material, noun]
    for drop in (1, 2, 0):
        if sum(len(" ".join(part).split()) for part in parts) <= limit:
            break
        parts[drop] = []
    return [word for part in parts for phrase in part for word in phrase.split()]


def _draw_asin(length: int, rng: random.Random, taken: set[str]) -> str:
    while True:
        asin = "B0" + "".join(rng.choice(_ASIN_ALPHABET) for _ in range(length - 2))
        if asin not in taken:
            taken.add(asin)
            return asin


def _goals_of(product: Product, config: ShopConfig, rng: random.Random) -> list[Goal]:
    """One goal per combination of the product's option values, as WebShop's synthetic goals: the asked
    attributes and the price bound are drawn once per product."""
    kind = next(k for k in _TYPES if k.query == product.query)
    slots = {a.phrase: a.slot for a in kind.attributes}
    count = rng.randint(1, min(config.goal_attributes, len(product.attributes)))
    chosen = rng.sample(product.attributes, count)
    asked = [a for a in product.attributes if a in chosen]
    price_upper, price_text = _price_bound(product.price, rng)
    request = _request_text(kind.query, [(a, slots[a]) for a in asked])
    names = sorted(product.options)
    goals = []
    for combination in itertools.product(*(product.options[name] for name in names)):
        goal_options = dict(zip(names, combination))
        option_text = ", and ".join(f"{name}: {value}" for name, value in goal_options.items())
        option_text = f" with {option_text}" if option_text else ""
        goals.append(
            Goal(
                asin=product.asin,
                name=product.title,
                query=product.query,
                category=product.category,
                product_category=product.product_category,
                title_nouns=product.title_nouns,
                attributes=tuple(asked),
                goal_options=goal_options,
                price_upper=price_upper,
                instruction_text=f"{request}{option_text}{price_text}",
            )
        )
    return goals


def _price_bound(price: float, rng: random.Random) -> tuple[float, str]:
    """WebShop's bound: the larger of two of the four price steps above the price (none past the last step)."""
    steps = [step for step in PRICE_STEPS if step > price][:4]
    if len(steps) < 2:
        return NO_PRICE_BOUND, ""
    bound = max(rng.sample(steps, 2))
    return bound, f", and price lower than {bound:.2f} dollars"


def _request_text(query: str, asked: list[tuple[str, str]]) -> str:
    """`Find me {pre attributes} {query} with {with attributes} for {for attributes}`, WebShop's shape."""
    pre = [phrase for phrase, slot in asked if slot == "pre"]
    text = "Find me " + (", ".join(pre) + " " if pre else "") + query
    for slot in ("with", "for"):
        phrases = [phrase for phrase, where in asked if where == slot]
        if phrases:
            text += f" {slot} " + ", ".join(phrases)
    return text
