"""An independent replay of a model file: onnxruntime on the file itself, outside the service.

    replay = Replay(repo / "tiny" / "1" / "model.onnx")
    lp = replay.logprobs("ROMEO:", "text")        # float64 [len(text), V]: log-softmax of the raw logits
    nll = -replay.text_logprobs("ROMEO:", "text")  # float64 [len(text)]: of the text's own characters
    text = replay.greedy("ROMEO:", 50, adjust)     # argmax decoding with logits adjusted per step

It reads the prime and text as one sequence from a zero state (the model's
full-sequence graph, not the service's batched steps), so agreement with the
service checks its prefill, its steps and its bookkeeping at once. It shares
nothing with the service but the model file format (charrnn.modelfile).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort

from charrnn.modelfile import (INPUT_C, INPUT_H, INPUT_TOKENS, KEY_CELL, KEY_HIDDEN, KEY_LAYERS, KEY_VOCAB,
                               OUTPUT_C, OUTPUT_H, OUTPUT_LOGITS)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


class Replay:
    def __init__(self, path: str | Path):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        self.vocab = [chr(c) for c in json.loads(meta[KEY_VOCAB])]
        self.index = {c: i for i, c in enumerate(self.vocab)}
        self.layers, self.hidden = int(meta[KEY_LAYERS]), int(meta[KEY_HIDDEN])
        self.lstm = meta[KEY_CELL] == "lstm"

    @property
    def start(self) -> str:
        """What an empty prime reads: a newline, or the first vocabulary character without one."""
        return "\n" if "\n" in self.index else self.vocab[0]

    def _run(self, text: str, state: tuple | None = None) -> tuple[np.ndarray, tuple]:
        tokens = np.array([[self.index[c] for c in text]], np.int64)
        zeros = np.zeros((self.layers, 1, self.hidden), np.float32)
        h, c = state or (zeros, zeros)
        feed = {INPUT_TOKENS: tokens, INPUT_H: h}
        names = [OUTPUT_LOGITS, OUTPUT_H]
        if self.lstm:
            feed[INPUT_C] = c
            names.append(OUTPUT_C)
        out = self.session.run(names, feed)
        return out[0][0], (out[1], out[2] if self.lstm else zeros)

    def logprobs(self, prime: str, text: str) -> np.ndarray:
        """log p(text[i] | prime, text[:i]) for every i, and for every character: float64 [len(text), V]."""
        logits, _ = self._run((prime or self.start) + text[:-1])
        return log_softmax(logits[-len(text):])

    def text_logprobs(self, prime: str, text: str) -> np.ndarray:
        """log p(text[i] | prime, text[:i]) of the characters of ``text`` themselves: float64 [len(text)]."""
        return self.logprobs(prime, text)[np.arange(len(text)), [self.index[c] for c in text]]

    def greedy(self, prime: str, n: int,
               adjust: Callable[[np.ndarray, np.ndarray], np.ndarray] = lambda z, counts: z) -> str:
        """n characters by argmax of ``adjust(logits, counts)``, where counts [V] are the characters so far."""
        logits, state = self._run(prime or self.start)
        z = logits[-1]
        counts = np.zeros(len(self.vocab), np.float32)
        out = []
        for _ in range(n):
            i = int(np.argmax(adjust(z.astype(np.float32), counts)))
            out.append(self.vocab[i])
            counts[i] += 1
            logits, state = self._run(self.vocab[i], state)
            z = logits[-1]
        return "".join(out)
