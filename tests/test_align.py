"""Aligning models of different initializations: permutation spaces built for torch classifiers and decoder FFNs
(checked by permuting every space at random: outputs unchanged), merges carried through every tensor, the
matchers (identity = averaging; permute, weight matching and ZipIt! recover a model merged with a permuted copy of
itself; ZipIt!'s greedy choices on hand-made correlations), and calibration statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hf_m2n2.align.apply import as_numpy_state, merge_states, permute_state, validate_graph
from hf_m2n2.align.calibration import FeatureStats, collect, statistics_bytes
from hf_m2n2.align.graphs import classifier_graph, decoder_ffn_graph
from hf_m2n2.align.matchers import from_permutation, identity, permute, weight_matching, zipit
from hf_m2n2.align.spaces import Space, SpaceGraph
from hf_m2n2.errors import HfM2n2Error

torch.set_num_threads(1)
X = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4)).eval()


class _ResidualCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        y = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(x + self.bn2(self.conv2(y)))  # a residual block: its add joins two spaces
        return self.head(self.flat(self.pool(x)))


def _cnn() -> nn.Module:
    torch.manual_seed(1)
    model = _ResidualCNN()
    for bn in (
        model.bn,
        model.bn1,
        model.bn2,
    ):  # statistics that are not the defaults: permuting them matters
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- spaces, built and validated ----------------------------------------------------------------------------------


def test_an_mlp_has_one_space_per_hidden_layer_and_none_for_inputs_or_logits():
    graph = classifier_graph(_mlp())
    assert [(s.size, s.feature) for s in graph.spaces] == [(16, "2:input"), (12, "4:input")]
    assert {(u.tensor, u.axis, u.role) for u in graph.spaces[0].uses} == {
        ("0.weight", 0, "out"),
        ("0.bias", 0, "out"),
        ("2.weight", 1, "in"),
    }
    assert graph.space_of("4.weight", 0) is None and graph.space_of("0.weight", 1) is None
    validate_graph(_mlp(), graph, lambda m: m(X))


def test_a_cnn_with_batchnorm_and_a_residual_block():
    model = _cnn()
    graph = classifier_graph(model)
    images = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    sizes = [s.size for s in graph.spaces]
    assert sizes == [8, 8]  # stem + conv2 joined by the add; conv1's own
    joined = graph.spaces[0]
    assert {u.tensor for u in joined.uses} >= {
        "stem.weight",
        "conv2.weight",
        "bn.running_var",
        "bn2.running_mean",
    }
    assert graph.batchnorms == ("bn", "bn1", "bn2")
    validate_graph(model, graph, lambda m: m(images))


def test_a_wrong_graph_is_caught():
    graph = classifier_graph(_mlp())
    first = graph.spaces[0]
    broken = SpaceGraph(
        (Space(first.name, first.size, tuple(u for u in first.uses if u.tensor != "0.bias")), graph.spaces[1])
    )
    with pytest.raises(HfM2n2Error, match="permuting space 'space0' changes the model's outputs"):
        validate_graph(_mlp(), broken, lambda m: m(X))


def test_decoder_ffn_spaces_of_a_tiny_llama_and_a_tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2
        )
    ).eval()
    graph = decoder_ffn_graph(llama.config.to_dict(), llama.state_dict())
    assert [s.name for s in graph.spaces] == ["layers.0.mlp", "layers.1.mlp"] and graph.spaces[0].size == 24
    validate_graph(llama, graph, lambda m: m(ids).logits)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=2, n_head=2, n_positions=16)).eval()
    graph = decoder_ffn_graph(gpt2.config.to_dict(), gpt2.state_dict())
    assert graph.spaces[1].uses[0].axis == 1  # Conv1D keeps its outputs on axis 1
    validate_graph(gpt2, graph, lambda m: m(ids).logits)
    with pytest.raises(HfM2n2Error, match="model type 'bert': no FFN space data"):
        decoder_ffn_graph({"model_type": "bert"}, [])


def test_unsupported_layers_are_named():
    model = nn.Sequential(nn.Linear(8, 8), nn.Softmax(dim=-1), nn.Linear(8, 2))
    with pytest.raises(HfM2n2Error, match="1: Softmax is not supported"):
        classifier_graph(model)


# --- merges -------------------------------------------------------------------------------------------------------


def test_identity_equals_linear_averaging():
    a, b = _mlp(0), _mlp(1)
    graph = classifier_graph(a)
    merged = merge_states(
        graph, [_state(a), _state(b)], {s.name: identity(s.size).pair() for s in graph.spaces}
    )
    for name, tensor in merged.items():
        assert torch.allclose(tensor, (a.state_dict()[name] + b.state_dict()[name]) / 2, atol=1e-7)


def _permuted_copy(model, graph, seed):
    rng = np.random.default_rng(seed)
    perms = {s.name: rng.permutation(s.size) for s in graph.spaces}
    return permute_state(graph, _state(model), perms), perms


def test_every_matcher_recovers_a_model_merged_with_a_permuted_copy_of_itself():
    model = _mlp(3)
    graph = classifier_graph(model)
    state = _state(model)
    permuted, perms = _permuted_copy(model, graph, 5)
    copy = _mlp(3)
    copy.load_state_dict(permuted)
    assert torch.allclose(copy(X), model(X), atol=1e-6)  # a permutation does not change the function
    stats = collect([model, copy], graph, [X, X * 2])
    found = {
        "oracle": {n: from_permutation(np.argsort(p)) for n, p in perms.items()},
        "permute": {s.name: permute(stats[s.name].correlation(), s.size) for s in graph.spaces},
        "zipit": {s.name: zipit(stats[s.name].correlation(), s.size) for s in graph.spaces},
        "weight_matching": weight_matching(graph, [as_numpy_state(state), as_numpy_state(permuted)], seed=0),
    }
    for method, matches in found.items():
        merged = merge_states(graph, [state, permuted], {n: m.pair() for n, m in matches.items()})
        for name in state:
            assert torch.allclose(merged[name], state[name], atol=1e-6), (method, name)
    assert found["zipit"]["space0"].stats["within_model_merges"] == 0


def test_spaces_of_different_sizes_are_refused():
    a = _mlp()
    b = nn.Sequential(nn.Linear(8, 20), nn.ReLU(), nn.Linear(20, 12), nn.ReLU(), nn.Linear(12, 4))
    graph = classifier_graph(a)
    with pytest.raises(
        HfM2n2Error, match="tensor '0.weight' has shape \\[20, 8\\] in model 1.*the spaces differ"
    ):
        merge_states(graph, [_state(a), _state(b)], {})


# --- ZipIt! on hand-made correlations -----------------------------------------------------------------------------


def _corr(pairs: dict[tuple[int, int], float], size: int = 4) -> np.ndarray:
    corr = np.eye(size)
    for (i, j), value in pairs.items():
        corr[i, j] = corr[j, i] = value
    return corr


def _groups(match) -> list[list[int]]:
    return [sorted(np.flatnonzero(row).tolist()) for row in match.merge]


def test_zipit_merges_the_most_correlated_pairs_across_models():
    # features: A0 A1 (model A), B0 B1 (model B); A0~B1 0.9, A1~B0 0.5, A0~A1 0.4 (within A, under budget 0)
    corr = _corr({(0, 3): 0.9, (1, 2): 0.5, (0, 1): 0.4})
    match = zipit(corr, 2, alpha=0.3, beta=0.0)
    assert _groups(match) == [[0, 3], [1, 2]]
    assert np.allclose(match.merge.sum(axis=1), 1) and np.allclose(match.unmerge.sum(axis=1), 1)


def test_zipit_merges_within_a_model_when_beta_allows_and_not_when_beta_is_zero():
    corr = _corr({(0, 1): 0.95, (2, 3): 0.9, (0, 2): 0.3, (1, 3): 0.2})  # each model's two features alike
    within = zipit(corr, 2, alpha=0.5, beta=2.0)  # budget: 2 x (2 // 2) = 2 within-model merges per model
    assert _groups(within) == [[0, 1], [2, 3]] and within.stats["within_model_merges"] == 2
    across = zipit(corr, 2, alpha=0.5, beta=0.0)
    assert _groups(across) == [[0, 2], [1, 3]] and across.stats["within_model_merges"] == 0


def test_zipit_repeated_matching_scales_a_merged_feature_by_alpha():
    # 6 features (n = 3): A0~B0 merge first (0.9); the merged {A0, B0} then correlates with B1 at
    # alpha x min(A0~B1 0.8, B0~B1 0.7): with alpha 1 it takes B1 (0.7 > A2~B2 0.6 > A1~B1 0.3) ...
    corr = _corr({(0, 3): 0.9, (0, 4): 0.8, (3, 4): 0.7, (1, 4): 0.3, (2, 5): 0.6}, size=6)
    eager = zipit(corr, 3, alpha=1.0, beta=2.0)
    assert sorted(map(tuple, _groups(eager))) == [(0, 3, 4), (1,), (2, 5)]
    damped = zipit(corr, 3, alpha=0.3, beta=2.0)  # ... with alpha 0.3 it is 0.21 < 0.3: A1 takes B1
    assert sorted(map(tuple, _groups(damped))) == [(0, 3), (1, 4), (2, 5)]
    across = zipit(corr, 3, alpha=1.0, beta=0.0)  # no within-model merge: B0 and B1 never share a feature
    assert sorted(map(tuple, _groups(across))) == [(0, 3), (1, 4), (2, 5)]
    with pytest.raises(ValueError, match="alpha must lie in \\(0, 1\\]"):
        zipit(corr, 3, alpha=0.0)


# --- calibration --------------------------------------------------------------------------------------------------


def test_feature_statistics_equal_numpy():
    rows = np.random.default_rng(0).normal(size=(50, 5))
    stats = FeatureStats(5)
    stats.update(rows[:20])
    stats.update(rows[20:])
    assert np.allclose(stats.covariance(), np.cov(rows.T, bias=True))
    assert np.allclose(stats.correlation(), np.corrcoef(rows.T))


def test_collect_stacks_the_models_features_and_names_a_batch_that_does_not_fit():
    a, b = _mlp(0), _mlp(1)
    graph = classifier_graph(a)
    stats = collect([a, b], graph, [X])
    hidden = [torch.relu(m[0](X)).detach().numpy() for m in (a, b)]
    expected = np.concatenate(hidden, axis=1)
    assert stats["space0"].count == 32 and np.allclose(stats["space0"].means(), expected.mean(axis=0))
    with pytest.raises(HfM2n2Error, match="calibration batch 1 does not fit the model"):
        collect([a, b], graph, [X, torch.randn(4, 7)])
    assert statistics_bytes(graph, 2) == 8 * (32**2 + 32 + 24**2 + 24)
    with pytest.raises(HfM2n2Error, match="would take 0.0 MiB, over the budget"):
        collect([a, b], graph, [X], budget_bytes=100)


def _deep_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(8, 16),
        nn.ReLU(),
        nn.Linear(16, 12),
        nn.ReLU(),
        nn.Linear(12, 10),
        nn.ReLU(),
        nn.Linear(10, 4),
    ).eval()


def test_partial_zips_share_a_trunk_and_keep_each_model_s_head():
    from hf_m2n2.align.apply import partial_zip

    a, b = _deep_mlp(0), _deep_mlp(1)
    graph = classifier_graph(a)
    states = [_state(a), _state(b)]
    stats = collect([a, b], graph, [X])
    matches = {s.name: zipit(stats[s.name].correlation(), s.size).pair() for s in graph.spaces}
    ensemble = partial_zip(graph, states, matches, 0)
    assert all(torch.equal(ensemble[i][k], states[i][k]) for i in range(2) for k in states[0])
    full = partial_zip(graph, states, matches, graph.depth)
    merged = merge_states(graph, states, matches)
    assert all(torch.equal(full[i][k], merged[k]) for i in range(2) for k in merged)
    halfway = partial_zip(graph, states, matches, 2)  # layers 0 and 2 shared; 4 and 6 each model's own
    assert all(halfway[0][k] is halfway[1][k] for k in ("0.weight", "0.bias", "2.weight", "2.bias"))
    assert not torch.equal(halfway[0]["4.weight"], halfway[1]["4.weight"])
    assert (
        halfway[0]["4.weight"].shape == states[0]["4.weight"].shape
    )  # an ordinary checkpoint of the architecture


def test_a_partial_zip_with_a_permuted_copy_of_itself_keeps_the_function():
    from hf_m2n2.align.apply import partial_zip

    model = _deep_mlp(3)
    graph = classifier_graph(model)
    permuted, perms = _permuted_copy(model, graph, 7)
    oracle = {n: from_permutation(np.argsort(p)).pair() for n, p in perms.items()}
    for stop in range(graph.depth + 1):
        for state in partial_zip(graph, [_state(model), permuted], oracle, stop):
            copy = _deep_mlp(0)
            copy.load_state_dict(state)
            assert torch.allclose(copy(X), model(X), atol=1e-5), stop


def _plain_zipit(corr: np.ndarray, n: int, alpha: float, beta: float) -> list[list[int]]:
    """The greedy spelled out (a full scan per merge): the reference the fast `zipit` must equal."""
    corr = corr.copy()
    np.fill_diagonal(corr, -np.inf)
    groups = {f: ([f], {f // n}) for f in range(2 * n)}
    budget = [int(n // 2 * beta + 1e-9)] * 2
    while len(groups) > n:
        best = None
        for i in sorted(groups):
            for j in sorted(groups):
                if j <= i:
                    continue
                shared = groups[i][1] & groups[j][1]
                if any(budget[m] <= 0 for m in shared):
                    continue
                if best is None or corr[i, j] > best[0]:
                    best = (corr[i, j], i, j, shared)
        _, i, j, shared = best
        row = alpha * np.minimum(corr[i], corr[j])
        corr[i, :] = corr[:, i] = row
        corr[i, i] = -np.inf
        groups[i] = (groups[i][0] + groups[j][0], groups[i][1] | groups[j][1])
        del groups[j]
        for m in shared:
            budget[m] -= 1
    return [sorted(groups[k][0]) for k in sorted(groups)]


@pytest.mark.parametrize("seed, alpha, beta", [(0, 0.3, 0.125), (1, 1.0, 0.5), (2, 0.5, 0.0), (3, 0.3, 2.0)])
def test_zipit_equals_the_plain_greedy(seed, alpha, beta):
    n = 12
    features = np.random.default_rng(seed).normal(size=(200, 2 * n))
    features[:, n:] += 0.8 * features[:, :n][:, np.random.default_rng(seed + 10).permutation(n)]
    corr = np.corrcoef(features.T)
    fast = zipit(corr, n, alpha=alpha, beta=beta)
    assert _groups(fast) == _plain_zipit(corr, n, alpha, beta)
    if beta == 0:  # no within-model merge: every merged unit is one unit of A and one of B
        assert all(len(g) == 2 and g[0] < n <= g[1] for g in _groups(fast))


class _InputResidual(nn.Module):
    """`x + f(x)` with x the network's input: f's output units are tied to the input's order."""

    def __init__(self):
        super().__init__()
        self.f = nn.Linear(8, 8)
        self.hidden = nn.Linear(8, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.relu(self.hidden(x + self.f(x))))


def test_a_space_added_to_the_input_is_not_a_space():
    torch.manual_seed(0)
    model = _InputResidual().eval()
    graph = classifier_graph(model)
    assert [s.size for s in graph.spaces] == [
        16
    ]  # only the hidden layer's units; f's are pinned to the input
    validate_graph(model, graph, lambda m: m(X))


class _ResidualMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 12)
        self.f1 = nn.Linear(12, 6)
        self.f2 = nn.Linear(6, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.f2(torch.relu(self.f1(h)))
        return self.head(torch.relu(h))


def test_a_partial_zip_that_cuts_a_residual_stream_is_refused():
    from hf_m2n2.align.apply import partial_zip

    torch.manual_seed(0)
    a, b = _ResidualMLP().eval(), _ResidualMLP().eval()
    graph = classifier_graph(a)
    assert [(s.size, s.depth) for s in graph.spaces] == [
        (12, 0),
        (6, 1),
    ]  # the residual stream, then f1's units
    validate_graph(a, graph, lambda m: m(X))
    matches = {s.name: identity(s.size).pair() for s in graph.spaces}
    with pytest.raises(
        HfM2n2Error, match="stop 1 cuts through f2.weight: it writes a merged space but reads 'space1'"
    ):
        partial_zip(graph, [_state(a), _state(b)], matches, 1)
    assert len(partial_zip(graph, [_state(a), _state(b)], matches, 2)) == 2
