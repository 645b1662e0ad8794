"""The character-level recurrent language model: embedding -> stacked LSTM/GRU/RNN -> linear."""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig

State = tuple[torch.Tensor, ...]  # (h,) or (h, c), each [layers, B, hidden]


class CharRNN(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.embed_dim)
        self.embed_drop = nn.Dropout(config.embed_dropout)
        rnn_cls = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[config.cell]
        self.rnn = rnn_cls(
            config.embed_dim,
            config.hidden,
            num_layers=config.layers,
            batch_first=True,
            dropout=config.dropout if config.layers > 1 else 0.0,
        )
        self.out_drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden, config.vocab_size)
        if config.tie_weights:
            self.head.weight = self.embed.weight

    def init_state(self, batch: int, device: torch.device | str = "cpu") -> State:
        c = self.config
        zeros = lambda: torch.zeros(c.layers, batch, c.hidden, device=device)  # noqa: E731
        return (zeros(), zeros()) if c.cell == "lstm" else (zeros(),)

    def forward(self, tokens: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """tokens int64 [B, T] -> logits [B, T, V], new state."""
        if state is None:
            state = self.init_state(tokens.shape[0], tokens.device)
        x = self.embed_drop(self.embed(tokens))  # (B, T, E)
        rnn_state = state if self.config.cell == "lstm" else state[0]
        y, new = self.rnn(x, rnn_state)  # (B, T, H)
        logits = self.head(self.out_drop(y))  # (B, T, V)
        new_state = tuple(new) if self.config.cell == "lstm" else (new,)
        return logits, new_state
