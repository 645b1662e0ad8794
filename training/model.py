"""The character-level recurrent language model: embedding -> stacked LSTM/GRU/RNN -> linear.

Two regularisers of AWD-LSTM (Merity, Keskar and Socher, 2017) act in training
only, on top of (or instead of) plain dropout; in evaluation, and so in the
exported graph, the model is the plain ``nn.LSTM`` stack with the same
parameter names (``rnn.weight_ih_l0``, ...):

- weight-drop: DropConnect on each hidden-to-hidden matrix ``weight_hh_l{k}``,
  one mask per forward pass, shared by every lane and every step. Dropout on
  activations never touches the recurrence; this does.
- locked (variational) dropout: one mask per sequence, the same at every step,
  on the embeddings, between layers and before the output layer. A new mask at
  every step (plain dropout) is noise the recurrence learns to average away.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .config import ModelConfig

State = tuple[torch.Tensor, ...]  # (h,) or (h, c), each [layers, B, hidden]

RNN_CLASSES = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}  # one per name in charrnn.modelfile.CELLS
LAYER_WEIGHTS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")  # nn.LSTM/GRU/RNN's names, suffixed _l{k}


def locked_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout with one mask per sequence: x (B, T, C) times a mask (B, 1, C) that every step shares."""
    if not training or p == 0.0:
        return x
    mask = x.new_empty(x.shape[0], 1, x.shape[2]).bernoulli_(1.0 - p) / (1.0 - p)  # (B, 1, C)
    return x * mask


class CharRNN(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = self.config = config
        self.embed = nn.Embedding(c.vocab_size, c.embed_dim)
        self.embed_drop = nn.Dropout(c.embed_dropout)
        rnn_cls = RNN_CLASSES[c.cell]
        self.rnn = rnn_cls(c.embed_dim, c.hidden, num_layers=c.layers, batch_first=True,
                           dropout=c.dropout if c.layers > 1 else 0.0)
        self.out_drop = nn.Dropout(c.dropout)
        self.head = nn.Linear(c.hidden, c.vocab_size)
        if c.tie_weights:
            self.head.weight = self.embed.weight
        # Locked dropout between layers needs the layers run one at a time, yet the weights must stay
        # the parameters of the one multi-layer self.rnn (checkpoints and the exporter know those
        # names). So each layer runs through a one-layer twin of self.rnn, called with layer k's
        # weights by functional_call: nn.LSTM.forward itself, with its checks and its fused kernel
        # (oneDNN on the CPU, cuDNN on CUDA). The twins live on the meta device and outside the
        # module tree: no memory, no parameters, no state_dict keys. They stay in training mode,
        # which cuDNN needs for a backward pass; they run only in training.
        self._layer_twins: tuple[nn.Module, ...] = ()
        if c.locked_dropout_between:
            widths = (c.embed_dim, c.hidden)  # layer 0 reads the embedding, the others the layer below
            self._layer_twins = tuple(rnn_cls(w, c.hidden, num_layers=1, batch_first=True, device="meta") for w in widths)

    def init_state(self, batch: int, device: torch.device | str = "cpu") -> State:
        c = self.config
        zeros = lambda: torch.zeros(c.layers, batch, c.hidden, device=device)  # noqa: E731
        return (zeros(), zeros()) if c.cell == "lstm" else (zeros(),)

    def forward(self, tokens: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """tokens int64 [B, T] -> logits [B, T, V], new state."""
        c = self.config
        if state is None:
            state = self.init_state(tokens.shape[0], tokens.device)
        x = self.embed_drop(self.embed(tokens))  # (B, T, E)
        x = locked_dropout(x, c.locked_dropout_input, self.training)
        if self.training and (c.weight_drop or c.locked_dropout_between):
            y, new_state = self._regularised_recurrence(x, state)  # (B, T, H)
        else:
            y, new_state = self._call(self.rnn, None, x, state)  # (B, T, H)
        y = locked_dropout(self.out_drop(y), c.locked_dropout_output, self.training)
        return self.head(y), new_state  # (B, T, V)

    def _call(self, rnn: nn.Module, weights: dict | None, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """``rnn`` on x from state, with its own parameters or with ``weights`` in their place."""
        lstm = self.config.cell == "lstm"
        args = (x, state if lstm else state[0])  # nn.LSTM takes (h, c); GRU and RNN take h alone
        y, new = rnn(*args) if weights is None else functional_call(rnn, weights, args)
        return y, tuple(new) if lstm else (new,)

    def _regularised_recurrence(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """The recurrent stack in training, with weight-drop and locked dropout between layers."""
        c = self.config
        weights = dict(self.rnn.named_parameters())  # weight_ih_l0, weight_hh_l0, bias_ih_l0, bias_hh_l0, ..._l1
        if c.weight_drop:
            for k in range(c.layers):
                name = f"weight_hh_l{k}"  # [gates * H, H]
                weights[name] = F.dropout(weights[name], c.weight_drop)  # one mask for every lane and step
        if not c.locked_dropout_between:
            # All layers in one call. The module's forward sees weights other than the ones it last ran
            # with (_update_flat_weights), rebuilds its list of flat weights and hands it to the same
            # fused kernel as ever; on CUDA that rebuild copies the weights into a new cuDNN buffer.
            return self._call(self.rnn, weights, x, state)
        outputs = []
        for k in range(c.layers):
            if k:
                x = locked_dropout(x, c.locked_dropout_between, True)  # (B, T, H)
            twin = self._layer_twins[min(k, 1)]
            layer = {f"{name}_l0": weights[f"{name}_l{k}"] for name in LAYER_WEIGHTS}
            x, new = self._call(twin, layer, x, tuple(s[k:k + 1] for s in state))  # state [1, B, H] each
            outputs.append(new)
        return x, tuple(torch.cat(parts) for parts in zip(*outputs))  # each [layers, B, H]
