"""WebShop evaluator throughput: sessions per second with every active session generated in one batch (`concurrency`
envs) against one session at a time, on the same model, the same sessions and the same local server.

The model is a causal LM directory (default: the math + agent demo's `shop` specialist, `make demo-agent` builds
it); the shop is the local WebShop-protocol server started on a free port with the build's `shop/shop.json` (the shop the
model was trained on). The evaluator settings (prompt, max_rounds, max_length, gen_kwargs) are the webshop part of
`--spec`. Both runs must give the same rewards (greedy decoding: a batch changes nothing but the speed); the table
says whether they did.

Usage:
    python bench/webshop_bench.py [--model DIR] [--shop-config JSON] [--spec YAML] [--sessions 0-31]
        [--concurrency 1 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "math_agent"


def webshop_part(spec_file: Path) -> dict:
    """The spec's webshop section (the first part of kind webshop)."""
    spec = yaml.safe_load(spec_file.read_text())
    parts = spec["evaluate"] if isinstance(spec["evaluate"], list) else [spec["evaluate"]]
    for part in parts:
        if part.get("kind") == "webshop":
            return dict(part)
    raise SystemExit(f"{spec_file}: no webshop part in evaluate")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEMO / "build" / "shop")
    parser.add_argument("--shop-config", type=Path, default=DEMO / "build" / "shop" / "shop.json")
    parser.add_argument("--spec", type=Path, default=DEMO / "spec.yaml")
    parser.add_argument("--sessions", default="0-31", help="ids or inclusive ranges, comma-separated")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_m2n2.demo.shop.catalogue import ShopConfig
    from hf_m2n2.demo.shop.server import serve
    from hf_m2n2.evaluate.webshop import WebshopConfig, WebshopEvaluator, expand_sessions

    torch.set_num_threads(args.threads)
    if not args.model.is_dir() or not args.shop_config.is_file():
        print(f"{args.model} or {args.shop_config} is missing: run `make demo-agent` first", file=sys.stderr)
        return 2
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    sessions = expand_sessions([s.strip() for s in args.sessions.split(",")])
    settings = webshop_part(args.spec)
    for key in ("kind", "server", "sessions", "test_sessions", "concurrency", "weight"):
        settings.pop(key, None)
    rows, rewards = [], {}
    with serve(ShopConfig.read(args.shop_config)) as shop:
        for concurrency in args.concurrency:
            config = WebshopConfig(
                kind="webshop", server=shop.url, sessions=sessions, concurrency=concurrency, **settings
            )
            evaluator = WebshopEvaluator(config, model, tokenizer, base_dir=args.spec.parent)
            start = time.perf_counter()
            episodes = evaluator.play(sessions, model)
            seconds = time.perf_counter() - start
            rewards[concurrency] = [e.reward for e in episodes]
            rows.append(
                {
                    "concurrency": concurrency,
                    "sessions": len(sessions),
                    "actions": sum(e.rounds for e in episodes),
                    "seconds": round(seconds, 2),
                    "sessions_per_s": round(len(sessions) / seconds, 3),
                    "mean_reward": round(sum(rewards[concurrency]) / len(sessions), 4),
                }
            )
    base = rows[0]["sessions_per_s"]
    same = len({tuple(r) for r in rewards.values()}) == 1
    print(f"model {args.model}, {len(sessions)} sessions, {args.threads} torch thread(s)")
    print("| concurrency | sessions/s | speed-up | seconds | actions | mean reward |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['concurrency']} | {row['sessions_per_s']} | {row['sessions_per_s'] / base:.2f}x | "
            f"{row['seconds']} | {row['actions']} | {row['mean_reward']} |"
        )
    print(f"same rewards at every concurrency: {same}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "same_rewards": same}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
