"""Old path of `hf_m2n2.demo.tasks.digits`, kept for specs naming `hf_m2n2.tasks.digits:...`."""

from hf_m2n2.demo.tasks.digits import (
    HIDDEN_DIM,
    INPUT_DIM,
    NUM_PARAMS,
    OUTPUT_DIM,
    TRAIN_FRACTION,
    DigitsData,
    load_data,
    logits_t,
    parity_groups,
    pretrained_seeds,
    test_accuracy,
    train_scores,
)

__all__ = [
    "HIDDEN_DIM",
    "INPUT_DIM",
    "NUM_PARAMS",
    "OUTPUT_DIM",
    "TRAIN_FRACTION",
    "DigitsData",
    "load_data",
    "logits_t",
    "parity_groups",
    "pretrained_seeds",
    "test_accuracy",
    "train_scores",
]
