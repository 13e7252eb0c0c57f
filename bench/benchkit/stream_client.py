"""One client opening Process streams as fast as it can, for `bench/streams.py`.

    python -m benchkit.stream_client CLIENT PORT STREAMS CONCURRENCY MESSAGES

CLIENT is ``direct`` or ``stub`` (extproc's `ProcessorClient`, as the proxy runs it) or
``floor`` (`benchkit.floor_stream`, the bench's reference). Each stream sends the request
headers and waits for the reply, then (MESSAGES 2) the response headers and waits again, then
ends. CONCURRENCY threads run at once. Prints one JSON line: CPU and wall µs per stream of
this process, after a warm-up.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable

from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from benchkit import floor_stream

REQUEST = ep.ProcessingRequest(request_headers=ep.HttpHeaders(end_of_stream=True))
RESPONSE = ep.ProcessingRequest(response_headers=ep.HttpHeaders(end_of_stream=True))
WARMUP = 500
TIMEOUT = 30.0


def _extproc(kind: str, port: int, messages: int) -> Callable[[], None]:
    from extproc.config import ProcessorSettings
    from extproc.io.processor import ProcessorClient

    client = ProcessorClient(ProcessorSettings(f"127.0.0.1:{port}", grpc_client=kind))

    def one() -> None:
        stream = client.open_stream()
        try:
            for request in (REQUEST, RESPONSE)[:messages]:
                stream.send(request)
                if stream.recv(TIMEOUT) is None:
                    raise ConnectionError("the processor ended the stream")
        finally:
            stream.close()

    return one


def _floor(port: int, messages: int) -> Callable[[], None]:
    channel = floor_stream.Channel(port)

    def one() -> None:
        with channel.stream(REQUEST) as stream:
            stream.reply("request_headers")
            if messages == 2:
                stream.exchange(RESPONSE, "response_headers")
            stream.close()

    return one


def main(argv: list[str]) -> int:
    client, port, streams, concurrency, messages = argv[1], *map(int, argv[2:6])
    one = _floor(port, messages) if client == "floor" else _extproc(client, port, messages)
    for _ in range(WARMUP):
        one()
    per_thread = streams // concurrency

    def run() -> None:
        for _ in range(per_thread):
            one()

    threads = [threading.Thread(target=run) for _ in range(concurrency)]
    cpu, wall = time.process_time(), time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done = per_thread * concurrency
    cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    print(json.dumps({"cpu_us": cpu * 1e6 / done, "wall_us": wall * 1e6 / done}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
