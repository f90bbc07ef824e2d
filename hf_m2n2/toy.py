"""Old path of `hf_m2n2.demo.toy`, kept for `python -m hf_m2n2.toy DIR` and existing imports."""

import sys

from hf_m2n2.demo.toy import (
    SPECIAL_TOKENS,
    build_demo_seeds,
    build_tiny_llama,
    byte_tokenizer,
    main,
    tiny_llama_config,
)

__all__ = [
    "SPECIAL_TOKENS",
    "build_demo_seeds",
    "build_tiny_llama",
    "byte_tokenizer",
    "main",
    "tiny_llama_config",
]

if __name__ == "__main__":
    sys.exit(main())
