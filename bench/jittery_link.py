"""A jittery, lossy link between two sites, for bench/f2.sh: a TCP proxy
on a free loopback port that forwards every chunk after a random delay
(uniform between DELAY - JITTER and DELAY + JITTER), keeping the order
of the bytes, and holds a chunk back LOSS_DELAY more with probability
LOSS — what a lost packet costs a TCP stream (the retransmission after
Linux's minimum 200 ms timeout). Prints its port, then serves until
killed.

    python3 bench/jittery_link.py UPSTREAM_HOST:PORT DELAY_MS JITTER_MS LOSS LOSS_DELAY_MS SEED
"""

import asyncio
import random
import sys


async def pump(reader, writer, delay, jitter, loss, loss_delay, rng):
    loop = asyncio.get_running_loop()
    queue = asyncio.Queue()

    async def release():
        # In order: a chunk leaves at its own time, never before the one
        # ahead of it.
        while True:
            at, data = await queue.get()
            if data is None:
                break
            wait = at - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        writer.close()

    releaser = asyncio.create_task(release())
    last = 0.0
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            d = rng.uniform(delay - jitter, delay + jitter)
            if rng.random() < loss:
                d += loss_delay
            last = max(last, loop.time() + max(d, 0.0))
            await queue.put((last, data))
    except (ConnectionError, OSError):
        pass
    await queue.put((0.0, None))
    try:
        await releaser
    except (ConnectionError, OSError):
        pass


async def main():
    upstream, delay, jitter, loss, loss_delay, seed = sys.argv[1:7]
    host, port = upstream.rsplit(":", 1)
    delay, jitter, loss_delay = (float(delay) / 1e3, float(jitter) / 1e3, float(loss_delay) / 1e3)
    loss = float(loss)
    rng = random.Random(int(seed))

    async def connection(client_reader, client_writer):
        try:
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(
            pump(client_reader, up_writer, delay, jitter, loss, loss_delay, rng),
            pump(up_reader, client_writer, delay, jitter, loss, loss_delay, rng),
        )

    server = await asyncio.start_server(connection, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


asyncio.run(main())
