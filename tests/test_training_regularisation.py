"""Weight-drop and locked dropout: what they change in training, that evaluation and export never see them."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from charrnn.training.model import CharRNN, ModelConfig, locked_dropout

V = 20  # vocabulary of the models built here

# Every training-only regulariser at once, on a model small enough to train in seconds ...
REGULARISED = [
    "--layers", "2", "--dropout", "0", "--embed-dropout", "0", "--weight-drop", "0.4",
    "--locked-dropout-input", "0.1", "--locked-dropout-between", "0.2", "--locked-dropout-output", "0.3",
]
# ... and with them the moving average of the weights and varied windows.
EVERY_OPTION = [*REGULARISED, "--ema-decay", "0.9", "--epoch-offset", "--seq-len-sd", "3", "--seq-len-half-prob", "0.1"]


def model(**regularisers) -> CharRNN:
    torch.manual_seed(0)
    return CharRNN(ModelConfig(vocab_size=V, layers=2, hidden=16, embed_dim=8, **regularisers))


def tokens(batch: int = 4, steps: int = 12) -> torch.Tensor:
    return torch.randint(0, V, (batch, steps), generator=torch.Generator().manual_seed(1))


def plain_twin(m: CharRNN) -> CharRNN:
    """The same weights in a model without the training-only regularisers."""
    c = m.config
    twin = CharRNN(ModelConfig(vocab_size=V, cell=c.cell, layers=c.layers, hidden=c.hidden, embed_dim=c.embed_dim))
    twin.load_state_dict(m.state_dict())  # the parameter names are the same: checkpoints and export are unchanged
    return twin


def test_weight_drop_zeroes_a_share_of_w_hh_in_training_and_leaves_it_whole_in_evaluation():
    m = model(weight_drop=0.5).train()
    logits, _ = m(tokens())
    logits.sum().backward()
    for k in range(2):
        dropped = (m.rnn.get_parameter(f"weight_hh_l{k}").grad == 0).float().mean().item()
        assert 0.4 < dropped < 0.6, k  # DropConnect: a dropped weight takes part in nothing, so gets no gradient
        assert (m.rnn.get_parameter(f"weight_ih_l{k}").grad == 0).float().mean().item() < 0.01  # only W_hh is dropped
    with torch.no_grad():
        first, second = m(tokens())[0], m(tokens())[0]
        assert not torch.equal(first, second)  # a new mask for every forward pass
        m.eval()
        assert torch.equal(m(tokens())[0], plain_twin(m).eval()(tokens())[0])


def test_locked_dropout_uses_one_mask_for_every_step_of_a_sequence_and_is_identity_in_eval():
    x = torch.ones(8, 50, 32)  # (B, T, C)
    y = locked_dropout(x, 0.5, training=True)
    assert torch.equal(y, y[:, :1].expand_as(y))  # every step is step 0
    assert set(y.unique().tolist()) == {0.0, 2.0}  # kept units are scaled by 1 / (1 - p)
    assert 0.35 < (y[:, 0] == 0).float().mean().item() < 0.65
    assert len({tuple(row.tolist()) for row in y[:, 0]}) == 8  # one mask per sequence, not one per batch
    assert locked_dropout(x, 0.5, training=False) is x


def test_locked_dropout_on_the_embeddings_and_the_output_masks_the_same_units_at_every_step():
    m = model(locked_dropout_input=0.4, locked_dropout_output=0.4).train()
    seen = {}
    m.rnn.register_forward_pre_hook(lambda _, args: seen.__setitem__("input", args[0]))  # (B, T, E)
    m.head.register_forward_pre_hook(lambda _, args: seen.__setitem__("output", args[0]))  # (B, T, H)
    with torch.no_grad():
        m(tokens())
    for where, x in seen.items():
        zeros = x == 0
        assert zeros.any() and torch.equal(zeros, zeros[:, :1].expand_as(zeros)), where
    with torch.no_grad():
        m.eval()
        m(tokens())
        assert not any((x == 0).any() for x in seen.values())


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_the_layer_by_layer_training_pass_equals_the_stacked_one_when_nothing_is_dropped(cell):
    # Locked dropout between layers runs the layers one at a time; with a rate too small to drop
    # anything it must compute what the multi-layer nn.LSTM (GRU, RNN) computes in one call.
    torch.manual_seed(0)
    m = CharRNN(ModelConfig(vocab_size=V, cell=cell, layers=3, hidden=16, embed_dim=8, locked_dropout_between=1e-12))
    stacked = plain_twin(m)
    state = tuple(torch.randn(3, 4, 16) for _ in m.init_state(4))
    (y, s), (y_ref, s_ref) = m.train()(tokens(), state), stacked.train()(tokens(), state)
    assert torch.equal(y, y_ref) and all(torch.equal(a, b) for a, b in zip(s, s_ref))
    y.sum().backward()
    y_ref.sum().backward()
    for name, p in m.named_parameters():
        assert torch.allclose(p.grad, stacked.get_parameter(name).grad, atol=1e-6), name


def rnn_kernels(m: CharRNN) -> set[str]:
    """The recurrent aten ops a training step (forward and backward) of ``m`` runs."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        m(tokens())[0].sum().backward()
    return {e.name for e in prof.events() if "rnn" in e.name or "lstm" in e.name}


def test_weight_drop_and_locked_dropout_run_the_same_fused_kernel_as_the_plain_lstm():
    plain = rnn_kernels(model().train())
    assert any("backward" in name for name in plain)  # the fused op and its backward, e.g. aten::mkldnn_rnn_layer
    assert rnn_kernels(model(weight_drop=0.5).train()) == plain
    assert rnn_kernels(model(weight_drop=0.5, locked_dropout_between=0.3).train()) == plain


def test_a_model_trained_with_every_option_exports_as_the_plain_lstm_and_passes_parity(tmp_path):
    import onnx

    from charrnn.exporter.cli import main as export
    from charrnn.training.cli import main as train
    from tests.test_training_cli import TINY, make_corpus

    data = make_corpus(tmp_path / "c.txt", words=400)
    run = tmp_path / "run"
    assert train(["--data", str(data), "--out", str(run), *TINY, *EVERY_OPTION, "--max-steps", "20", "--eval-interval", "10"]) == 0
    assert export([str(run), "--name", "reg", "--repo", str(tmp_path / "models")]) == 0  # 0: parity within 1e-4
    graph = onnx.load(str(tmp_path / "models" / "reg" / "1" / "model.onnx")).graph
    ops = {node.op_type for node in graph.node}
    assert "LSTM" in ops and not ops & {"Dropout", "RandomUniform", "RandomUniformLike", "Bernoulli", "Mul"}

