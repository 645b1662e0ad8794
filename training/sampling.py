"""Text sampled from a model while it trains, to show what it has learned."""

from __future__ import annotations

import torch

from .model import CharRNN


@torch.inference_mode()
def sample_text(model: CharRNN, vocab: list[str], prime: str, chars: int, temperature: float, seed: int) -> str:
    """``chars`` characters after ``prime`` (which must use only ``vocab``), drawn with their own generator.

    The generator is private so sampling never moves the training run's random state.
    """
    device = next(model.parameters()).device
    index = {ch: i for i, ch in enumerate(vocab)}
    gen = torch.Generator(device="cpu").manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        tokens = torch.tensor([[index[ch] for ch in prime]], device=device)  # [1, P]
        logits, state = model(tokens)
        out = []
        for _ in range(chars):
            last = logits[0, -1].float().cpu()  # [V]
            if temperature == 0:
                nxt = int(last.argmax())
            else:
                probs = torch.softmax(last / temperature, dim=-1)
                nxt = int(torch.multinomial(probs, 1, generator=gen))
            out.append(vocab[nxt])
            logits, state = model(torch.tensor([[nxt]], device=device), state)
        return "".join(out)
    finally:
        model.train(was_training)
