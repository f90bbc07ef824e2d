"""The shop's search engine: BM25 (rank_bm25) over each product's indexed text, top N with a fixed tie order.

WebShop searches a Lucene index (pyserini) of each product's title, description, first bullet point and options,
lower-cased, and keeps the top 50 hits; Lucene returns only documents that share a term with the query. Here the
same text is scored by `rank_bm25.BM25Okapi` with pyserini's default parameters (k1=0.9, b=0.4); a product that
shares no term with the query is not a hit; equal scores keep catalogue order.

Deviation: Lucene's English analyzer stems with Porter's algorithm; here tokens are lower-case letter/digit runs,
a possessive "'s" dropped, Lucene's English stop words removed, and plurals folded by the minimal "S" stemmer, which
is what the shop's vocabulary needs ("jackets" finds "jacket").

Example:
    >>> tokenize("Men's waterproof jackets, with zip pockets")
    ['men', 'waterproof', 'jacket', 'zip', 'pocket']
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from hf_m2n2.demo.shop.catalogue import Product

try:
    from rank_bm25 import BM25Okapi
except ModuleNotFoundError as exc:  # the `agent` extra
    raise ModuleNotFoundError("the synthetic shop needs rank-bm25: pip install 'hf-m2n2[agent]'") from exc

# Lucene's default English stop words (EnglishAnalyzer.ENGLISH_STOP_WORDS_SET).
STOP_WORDS = frozenset(
    [
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "but",
        "by",
        "for",
        "if",
        "in",
        "into",
        "is",
        "it",
        "no",
        "not",
        "of",
        "on",
        "or",
        "such",
        "that",
        "the",
        "their",
        "then",
        "there",
        "these",
        "they",
        "this",
        "to",
        "was",
        "will",
        "with",
    ]
)
_TOKEN = re.compile(r"[a-z0-9]+")
BM25_K1 = 0.9  # pyserini's defaults
BM25_B = 0.4


def stem(word: str) -> str:
    """Harman's "S" stemmer (hand-written: rank_bm25 has no analyzer): ies -> y, es -> e, s -> "" with its
    exceptions.

    Example:
        >>> [stem(w) for w in ["batteries", "shoes", "jackets", "glass", "bus"]]
        ['battery', 'shoe', 'jacket', 'glass', 'bus']
    """
    if len(word) < 3 or not word.endswith("s"):
        return word
    if word.endswith("ies") and not word.endswith(("eies", "aies")):
        return word[:-3] + "y"
    if word.endswith("es") and not word.endswith(("aes", "ees", "oes")):
        return word[:-1]
    if word.endswith(("us", "ss")):
        return word
    return word[:-1]


def tokenize(text: str) -> list[str]:
    """Lower-case letter/digit runs of `text`, possessives dropped, stop words removed, plurals folded."""
    text = text.lower().replace("'s", " ")
    return [stem(token) for token in _TOKEN.findall(text) if token not in STOP_WORDS]


class SearchIndex:
    """BM25 over the products' `search_text()`.

    Args:
        products: the catalogue, in its order (ties keep it).

    Example:
        >>> from hf_m2n2.demo.shop.catalogue import build_catalogue, ShopConfig
        >>> index = SearchIndex(build_catalogue(ShopConfig(num_products=24)).products)
        >>> all(p.query == "mugs" for p in index.search("coffee mugs", 3))
        True
    """

    def __init__(self, products: Sequence[Product]):
        self.products = tuple(products)
        self._documents = [tokenize(product.search_text()) for product in self.products]
        self._bm25 = BM25Okapi(self._documents, k1=BM25_K1, b=BM25_B)
        self._terms = [set(document) for document in self._documents]

    def search(self, query: str, limit: int) -> list[Product]:
        """The best `limit` products for `query`, best first; products sharing no term with it are left out.

        Args:
            query: the keywords, as typed.
            limit: most products returned.

        Returns:
            The hits (possibly none).
        """
        terms = tokenize(query)
        if not terms:
            return []
        scores = self._bm25.get_scores(terms)
        wanted = set(terms)
        hits = [i for i, document in enumerate(self._terms) if document & wanted]
        hits.sort(key=lambda i: (-float(scores[i]), i))
        return [self.products[i] for i in hits[:limit]]
