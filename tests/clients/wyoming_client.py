"""Drives voxtrald's Wyoming server with the `wyoming` package, as Home Assistant does, and
prints what came back as one JSON object. Usage: wyoming_client.py URI"""
import asyncio
import json
import sys

from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncClient
from wyoming.error import Error
from wyoming.info import Describe, Info
from wyoming.ping import Ping, Pong
from wyoming.tts import (
    Synthesize,
    SynthesizeChunk,
    SynthesizeStart,
    SynthesizeStop,
    SynthesizeStopped,
    SynthesizeVoice,
)


async def collect(client, until):
    """Events up to the first of type `until`: audio summarised per stream."""
    streams, events = [], []
    while True:
        event = await asyncio.wait_for(client.read_event(), 60)
        if event is None:
            events.append("closed")
            return streams, events
        events.append(event.type)
        if AudioStart.is_type(event.type):
            s = AudioStart.from_event(event)
            streams.append({"rate": s.rate, "width": s.width, "channels": s.channels, "bytes": 0})
        elif AudioChunk.is_type(event.type):
            streams[-1]["bytes"] += len(AudioChunk.from_event(event).audio)
        elif Error.is_type(event.type):
            events[-1] = "error: " + Error.from_event(event).text
        if event.type in until:
            return streams, events


async def main(uri):
    out = {}
    async with AsyncClient.from_uri(uri) as client:
        await client.write_event(Describe().event())
        info = Info.from_event(await asyncio.wait_for(client.read_event(), 60))
        tts = info.tts[0]
        out["info"] = {
            "programs": len(info.tts),
            "name": tts.name,
            "installed": tts.installed,
            "streaming": tts.supports_synthesize_streaming,
            "voices": [v.name for v in tts.voices if v.installed],
            "languages": sorted({l for v in tts.voices for l in v.languages}),
            "described": all(v.description for v in tts.voices),
        }
    # One request per connection, as Home Assistant makes them.
    async with AsyncClient.from_uri(uri) as client:
        await client.write_event(
            Synthesize(text="Bonjour à tous.", voice=SynthesizeVoice(name="fr_female")).event()
        )
        out["synthesize"], _ = await collect(client, {AudioStop().event().type})
    async with AsyncClient.from_uri(uri) as client:
        await client.write_event(Synthesize(text="Hallo.", voice=SynthesizeVoice(language="de")).event())
        out["by_language"], _ = await collect(client, {AudioStop().event().type})
    # Text streamed in pieces, as from an LLM, with the compatibility copy.
    async with AsyncClient.from_uri(uri) as client:
        await client.write_event(SynthesizeStart(voice=SynthesizeVoice(name="casual_female")).event())
        for piece in ["Hello there. How are", " you today? Fine", ". Bye"]:
            await client.write_event(SynthesizeChunk(text=piece).event())
        await client.write_event(
            Synthesize(text="Hello there. How are you today? Fine. Bye").event()
        )
        await client.write_event(SynthesizeStop().event())
        out["streamed"], out["streamed_events"] = await collect(
            client, {SynthesizeStopped().event().type}
        )
    # Bad requests get an error and the server keeps serving the connection.
    async with AsyncClient.from_uri(uri) as client:
        await client.write_event(Synthesize(text="Hi.", voice=SynthesizeVoice(name="nobody")).event())
        _, out["bad_voice"] = await collect(client, {"error"})
        await client.write_event(Synthesize(text="   ").event())
        _, out["blank"] = await collect(client, {"error"})
        await client.write_event(Ping().event())
        _, out["after"] = await collect(client, {Pong().event().type})
    print(json.dumps(out))


asyncio.run(main(sys.argv[1]))
