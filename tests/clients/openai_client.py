"""Drives voxtrald's speech API with the official `openai` package, as Open WebUI and the SDK's
users do, and saves what came back. Usage: openai_client.py BASE_URL OUT_DIR"""
import base64
import json
import os
import sys

from openai import OpenAI

base, out = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base, api_key="not-needed", max_retries=0)
TEXT = "One here. Two there."
report = {}

# Every format, and none at all (the API's default, MP3), in one client: its connection pool
# keeps the connection alive between requests.
for fmt in [None, "mp3", "opus", "flac", "wav", "pcm"]:
    extra = {} if fmt is None else {"response_format": fmt}
    r = client.audio.speech.create(
        model="tts-1", voice="alloy", input=TEXT, instructions="Speak calmly.", **extra
    )
    name = fmt or "default"
    with open(os.path.join(out, name + ".bin"), "wb") as f:
        f.write(r.content)
    report[name] = {"bytes": len(r.content), "type": r.response.headers.get("content-type")}

# Streamed as it is generated.
with client.audio.speech.with_streaming_response.create(
    model="tts-1", voice="marin", input=TEXT, response_format="flac"
) as r:
    chunks = [c for c in r.iter_bytes()]
with open(os.path.join(out, "streamed.bin"), "wb") as f:
    f.write(b"".join(chunks))
report["streamed"] = {"chunks": len(chunks), "bytes": sum(len(c) for c in chunks)}

# Server-sent events: speech.audio.delta with base64 audio, then speech.audio.done.
with client.audio.speech.with_streaming_response.create(
    model="tts-1", voice="cedar", input=TEXT, response_format="pcm", stream_format="sse"
) as r:
    kinds, audio = [], b""
    for line in r.iter_lines():
        if line.startswith("data: "):
            ev = json.loads(line[6:])
            kinds.append(ev["type"])
            if ev["type"] == "speech.audio.delta":
                audio += base64.b64decode(ev["audio"])
    report["sse"] = {"type": r.headers.get("content-type"), "kinds": sorted(set(kinds)),
                     "last": kinds[-1] if kinds else None, "bytes": len(audio)}

# Errors come back as the SDK's own exceptions, with the API's message.
for name, kwargs in [("speed", {"speed": 9.0}), ("format", {"response_format": "aac"})]:
    try:
        client.audio.speech.create(model="tts-1", voice="alloy", input=TEXT, **kwargs)
        report["error_" + name] = None
    except Exception as e:  # openai.BadRequestError
        report["error_" + name] = {"status": getattr(e, "status_code", None), "message": str(e)}

print(json.dumps(report))
