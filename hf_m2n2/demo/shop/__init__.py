"""A synthetic shop speaking AgentGym's WebShop environment protocol: the tests' and the offline demo's stand-in for
the real `agentenv-webshop` server (which needs Python 3.8, a JDK and spaCy models).

- `catalogue`: `ShopConfig` (every setting, one frozen dataclass) and `build_catalogue` (products, goals = sessions);
- `search`: BM25 over the products (rank_bm25);
- `reward`: WebShop's purchase reward;
- `pages`: each page's HTML, text observation and clickables;
- `engine`: `Shop` (catalogue + search, shared) and `ShopEnv` (one environment: reset / step / observation);
- `expert`: scripted expert actions for a goal (imitation data for small agent models);
- `faults`: fault injection for the server;
- `server`: the HTTP server (`ShopServer`, `serve(...)`, `python -m hf_m2n2.demo.shop.server`).

Needs the `agent` extra (rank-bm25, rapidfuzz).
"""
