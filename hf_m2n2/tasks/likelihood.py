"""Old path of `hf_m2n2.demo.tasks.likelihood`, kept for specs naming `hf_m2n2.tasks.likelihood:...`."""

from hf_m2n2.demo.tasks.likelihood import mean_likelihood, token_likelihood

__all__ = ["mean_likelihood", "token_likelihood"]
