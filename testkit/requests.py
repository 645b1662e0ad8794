"""Validated engine requests for tests and benchmarks that drive an engine without gRPC.

Every request goes through ``validation.validate_request``, the one door to the
engine, from a protobuf built by the client's own ``build_request``; nothing
here builds a ``GenerationRequest`` by hand.
"""

from __future__ import annotations

import time
from typing import Sequence

from charrnn.modelfile import ModelMetadata
from charrnn.service.client import build_request
from charrnn.service.requests import GenerationRequest
from charrnn.service.validation import Limits, generate_fields, validate_request

# Far above anything a test asks for: the server's own caps are tested through the server.
OPEN_LIMITS = Limits(max_chars=10**9, max_prime_chars=10**6)


def generation_request(
    metadata: ModelMetadata,
    prime: str = "",
    max_chars: int = 60,
    *,
    seed: int | None = 1,
    temperature: float | None = 1.0,
    top_k: int = 0,
    top_p: float = 0.0,
    stop: Sequence[str] = (),
    deadline: float | None = None,
    request_id: str = "",
    **fields,
) -> GenerationRequest:
    """A request as the servicer would hand it to the engine; ``fields`` are further GenerateRequest fields."""
    pb = build_request(prime, max_chars, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                       stop=stop, request_id=request_id, **fields)
    return validate_request(generate_fields(pb), metadata, OPEN_LIMITS, now=time.monotonic(), deadline=deadline,
                            request_id=request_id or None)


def engine_outputs(model, requests: Sequence[GenerationRequest], **core_args) -> list[tuple[str, str, list]]:
    """Every request's (text, finish reason, [(character, logprob rounded to 4 places)]), all sent at once to
    one in-process core (cores.ThreadCore, ``core_args`` its keyword arguments) that is stopped after."""
    import asyncio

    from charrnn.service.cores import ThreadCore
    from charrnn.service.metrics import Metrics

    async def run():
        engine = ThreadCore(model, metrics=Metrics(), **core_args)
        engine.start()
        try:
            async def read(req):
                stream = engine.submit(req)
                text, lps = "", []
                async for chunk in stream:  # stream.logprobs: those of the chunk just read
                    text += chunk
                    lps += [(c, round(lp, 4)) for c, lp, _ in stream.logprobs]
                return text, stream.result.finish_reason.value, lps
            return await asyncio.gather(*(read(r) for r in requests))
        finally:
            engine.stop(5.0)
    return asyncio.run(run())
