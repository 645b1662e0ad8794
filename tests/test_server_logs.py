"""Logging: text by default; --log-format json writes one JSON object per line with the request id."""

from __future__ import annotations

import asyncio
import io
import json
import logging

from charrnn.service import logs


def _configured(fmt: str) -> tuple[logging.Logger, io.StringIO]:
    out = io.StringIO()
    logs.configure(fmt, "debug", stream=out)
    return logging.getLogger("charrnn.service.test"), out


def test_json_lines_carry_the_request_id_of_their_own_task():
    log, out = _configured("json")

    async def handle(rid: str) -> None:
        token = logs.REQUEST_ID.set(rid)
        try:
            log.info("start", extra={"model": "tiny"})
            await asyncio.sleep(0.01)  # the other request logs meanwhile
            log.warning("end %d", 3)
        finally:
            logs.REQUEST_ID.reset(token)

    async def both() -> None:
        await asyncio.gather(handle("req-a"), handle("req-b"))

    asyncio.run(both())
    log.info("outside any request")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == 5
    by_id = {rid: [x["message"] for x in lines if x.get("request_id") == rid] for rid in ("req-a", "req-b")}
    assert by_id == {"req-a": ["start", "end 3"], "req-b": ["start", "end 3"]}
    assert "request_id" not in lines[-1]
    first = lines[0]
    assert first["level"] == "info" and first["logger"] == "charrnn.service.test" and first["model"] == "tiny"
    assert first["time"].endswith("Z")


def test_text_is_the_default_and_shows_fields_and_exceptions():
    log, out = _configured("text")
    token = logs.REQUEST_ID.set("r-1")
    try:
        try:
            raise KeyError("boom")
        except KeyError:
            log.exception("failed", extra={"code": "INTERNAL"})
    finally:
        logs.REQUEST_ID.reset(token)
    text = out.getvalue()
    first = text.splitlines()[0]
    assert " ERROR charrnn.service.test: failed code=INTERNAL request_id=r-1" in first
    assert "Traceback" in text and "KeyError: 'boom'" in text
    assert not text.lstrip().startswith("{")
