"""The shop's pages: what each WebShop template shows, as HTML, as the simple text observation and as clickables.

WebShop renders a Jinja template per page; its text environment then reads the page back: the observation is the
visible text nodes, stripped, joined by " [SEP] "; the clickables are the buttons' and product links' texts, lower
case, then the option radio buttons' values. Here a page is built once as a list of elements, from which come the
HTML (a simple one of our own, not WebShop's markup), the observation and the clickables, in WebShop's order.

The texts, in page order (from the templates):
- start: `WebShop`, `Instruction:`, the instruction, `Search` (the only button; a search bar);
- results: `Instruction:`, the instruction, `Back to Search`, `Page {n} (Total results: {N})`, `< Prev` (from page
  2), `Next >`, then per product its ASIN, title and price;
- item: `Instruction:`, the instruction, `Back to Search`, `< Prev`, per option its name and values, the title,
  `Price: $...`, `Rating: N.A.`, `Description`, `Features`, `Reviews`, `Buy Now`;
- Description / Features / Reviews: `Instruction:`, the instruction, `Back to Search`, `< Prev`, then the
  description, the bullet points, or nothing (no reviews);
- done: the thank-you page's texts, with the ASIN, the chosen options (JSON, keys sorted) and the reward.

Example:
    >>> page = start_page("http://127.0.0.1:3000/0", "Find me tea, and price lower than 20.00 dollars")
    >>> page.observation
    'WebShop [SEP] Instruction: [SEP] Find me tea, and price lower than 20.00 dollars [SEP] Search'
    >>> list(page.clickables)
    ['search']
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from hf_m2n2.demo.shop.catalogue import Product

BUY_NOW = "Buy Now"
NEXT_PAGE = "Next >"
PREV_PAGE = "< Prev"
BACK_TO_SEARCH = "Back to Search"
SUB_PAGES = ("Description", "Features", "Reviews")
SEPARATOR = " [SEP] "


@dataclass(frozen=True)
class Clickable:
    """What a clickable text stands for: a button, a product link (its ASIN) or an option (name and value)."""

    kind: str  # "button" | "product" | "option"
    value: str
    option_name: str | None = None


@dataclass(frozen=True)
class Page:
    """One rendered page.

    Attributes:
        kind: "start", "results", "item", "sub" or "done".
        url: the page's URL (WebShop's shapes).
        html: the page's HTML.
        texts: the visible texts, in page order.
        clickables: clickable text -> what it is, in WebShop's order (buttons and links, then options).
        has_search_bar: whether the page has the search input.
        instruction_heading: the instruction heading's text as WebShop reads it (`Instruction: ...` on the start
            page, `Instruction:...` elsewhere), None on the done page (which has none).
    """

    kind: str
    url: str
    html: str
    texts: tuple[str, ...]
    clickables: dict[str, Clickable]
    has_search_bar: bool
    instruction_heading: str | None

    @property
    def observation(self) -> str:
        """WebShop's simple text observation: the visible texts joined by " [SEP] "."""
        return SEPARATOR.join(self.texts)


@dataclass
class _Builder:
    """Collects a page's elements: HTML, visible texts and clickables in one pass."""

    parts: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    buttons: dict[str, Clickable] = field(default_factory=dict)
    options: dict[str, Clickable] = field(default_factory=dict)
    has_search_bar: bool = False

    def text(self, tag: str, text: str, css: str = "") -> None:
        self.parts.append(f"<{tag}{_class(css)}>{html.escape(text)}</{tag}>")
        if text.strip():  # an empty element has no text node
            self.texts.append(text.strip())

    def heading(self, instruction: str, spaced: bool) -> None:
        label = "Instruction: " if spaced else "Instruction:"
        self.parts.append(f'<div id="instruction-text"><h4>{label}<br>{html.escape(instruction)}</h4></div>')
        self.texts.extend(t for t in (label.strip(), instruction.strip()) if t)

    def button(self, text: str, css: str = "btn btn-primary") -> None:
        self.text("button", text, css)
        self.buttons[text.lower()] = Clickable("button", text)

    def product_link(self, asin: str) -> None:
        self.parts.append(f'<h4><a class="product-link" href="#">{html.escape(asin)}</a></h4>')
        self.texts.append(asin)
        self.buttons[asin.lower()] = Clickable("product", asin)

    def option(self, name: str, value: str, index: int) -> None:
        ident = html.escape(f"radio_{name}{index}", quote=True)
        self.parts.append(
            f'<input type="radio" id="{ident}" name="{html.escape(name, quote=True)}" '
            f'value="{html.escape(value, quote=True)}"><label for="{ident}">{html.escape(value)}</label>'
        )
        if value.strip():
            self.texts.append(value.strip())
        self.options[value] = Clickable("option", value, name)

    def search_bar(self) -> None:
        self.parts.append('<input id="search_input" type="text" name="search_query" placeholder="Search...">')
        self.has_search_bar = True

    def page(self, kind: str, url: str, heading: str | None) -> Page:
        clickables = dict(self.buttons)
        for (
            value,
            clickable,
        ) in self.options.items():  # a later radio with a button's text replaces it in place
            clickables[value] = clickable
        body = "\n".join(self.parts)
        document = (
            f"<!DOCTYPE html>\n<html>\n<head><title>WebShop</title></head>\n<body>\n{body}\n</body>\n</html>"
        )
        return Page(kind, url, document, tuple(self.texts), clickables, self.has_search_bar, heading)


def _class(css: str) -> str:
    return f' class="{css}"' if css else ""


def start_page(url: str, instruction: str) -> Page:
    """The search page a session starts on."""
    page = _Builder()
    page.text("h2", "WebShop")
    page.heading(instruction, spaced=True)
    page.search_bar()
    page.button("Search", "btn btn-success")
    return page.page("start", url, "Instruction: " + instruction)


def _top(instruction: str) -> _Builder:
    page = _Builder()
    page.heading(instruction, spaced=False)
    page.button(BACK_TO_SEARCH, "btn btn-success")
    return page


def results_page(
    url: str, instruction: str, products: Sequence[Product], page_number: int, total: int
) -> Page:
    """A page of search results: `products` are this page's, `total` the search's hit count."""
    page = _top(instruction)
    page.text("h3", f"Page {page_number} (Total results: {total})")
    if page_number > 1:
        page.button(PREV_PAGE)
    page.button(NEXT_PAGE)
    for product in products:
        page.product_link(product.asin)
        page.text("h4", product.title, "product-title")
        page.text("h5", product.price_text, "product-price")
    return page.page("results", url, "Instruction:" + instruction)


def item_page(url: str, instruction: str, product: Product) -> Page:
    """A product's page: its options, title, price, sub-page buttons and Buy Now."""
    page = _top(instruction)
    page.button(PREV_PAGE)
    for name, values in product.options.items():
        page.text("h4", name)
        for index, value in enumerate(values):
            page.option(name, value, index)
    page.text("h2", product.title)
    page.text("h4", f"Price: {product.price_text}")
    page.text("h4", "Rating: N.A.")
    for sub in SUB_PAGES:
        page.button(sub)
    page.button(BUY_NOW, "btn btn-lg purchase")
    return page.page("item", url, "Instruction:" + instruction)


def sub_page(url: str, instruction: str, product: Product, which: str) -> Page:
    """A product's Description, Features or Reviews page (the shop has no reviews: that page is empty)."""
    page = _top(instruction)
    page.button(PREV_PAGE)
    if which == "Description":
        page.text("p", product.description, "product-info")
    elif which == "Features":
        for bullet in product.bullet_points:
            page.text("p", bullet, "product-info")
    return page.page("sub", url, "Instruction:" + instruction)


def done_page(url: str, asin: str, options: Mapping[str, str], reward: float) -> Page:
    """The thank-you page after Buy Now, with the texts WebShop's shows (its MTurk code and goal details are
    rendered empty or `None` in the text environment)."""
    page = _Builder()
    page.text("h1", "Thank you for shopping with us!")
    page.text("h3", "Your code:")
    page.text("pre", "None")
    page.text("p", "(Paste it in your MTurk interface.)")
    page.text("h2", "Purchased")
    page.text("h4", "asin")
    page.text("pre", asin)
    page.text("h4", "options")
    page.text("pre", options_json(options))
    for label in ("attrs", "category", "query", "product category"):
        page.text("h4", label)
        page.text("pre", "None")
    page.text("h2", "Target")
    for label in (
        "asin",
        "options",
        "attrs",
        "price upper",
        "instuction text",
        "category",
        "product category",
        "query",
    ):
        page.text("h4", label)  # WebShop's spelling; the goal's values render empty
    page.text("h4", "Goal")
    page.text("pre", "None")
    page.text("h2", "Reward")
    page.text("h3", "Your score (min 0.0, max 1.0)")
    page.text("pre", str(reward))
    page.text("h4", "Reward Details")
    page.text("pre", "None")
    return page.page("done", url, None)


def options_json(options: Mapping[str, str]) -> str:
    """Options as Flask's `tojson` filter prints them: keys sorted, HTML-sensitive characters escaped."""
    text = json.dumps(dict(options), sort_keys=True)
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("'", "\\u0027")):
        text = text.replace(char, escaped)
    return text
