"""A permessage-deflate WebSocket client (Python `websockets`) for ws_deflate.rs.

Usage: ws_deflate_client.py URL CASE. Prints one line per check and `done` at the end; any
failure raises (non-zero exit). The server is a hop::ws echo.
"""

import json
import os
import random
import sys

from websockets.extensions.permessage_deflate import (
    ClientPerMessageDeflateFactory,
    PerMessageDeflate,
)
from websockets.sync.client import connect


def deflate(**kw):
    return connect(
        URL,
        extensions=[ClientPerMessageDeflateFactory(**kw)],
        compression=None,
        max_size=None,
        open_timeout=20,
        close_timeout=20,
    )


def negotiated(ws):
    ext = [e for e in ws.protocol.extensions if isinstance(e, PerMessageDeflate)]
    assert ext, "permessage-deflate was not negotiated: %r" % (
        ws.response.headers.get("Sec-WebSocket-Extensions"),
    )
    e = ext[0]
    print(
        "negotiated",
        ws.response.headers["Sec-WebSocket-Extensions"],
        "| server takeover:",
        not e.remote_no_context_takeover,
        "client takeover:",
        not e.local_no_context_takeover,
    )
    return e


def json_message(i):
    return json.dumps(
        {
            "type": "trade",
            "seq": i,
            "symbol": ["BTC-USD", "ETH-USD", "SOL-USD"][i % 3],
            "price": "%.2f" % (1000 + (i * 37) % 5000 + 0.25),
            "size": "%.4f" % ((i * 13) % 97 / 7),
            "side": "buy" if i % 2 else "sell",
        }
    )


def echo(ws, msg):
    ws.send(msg)
    got = ws.recv(timeout=20)
    assert got == msg, "echo differs: sent %d bytes, got %d" % (len(msg), len(got))


def sizes():
    rnd = random.Random(1)
    with deflate() as ws:
        negotiated(ws)
        for n in [16, 64, 125, 126, 1000, 4096, 65535, 65536, 131072, 1 << 20]:
            text = ("".join(json_message(i) for i in range(n // 60 + 1)))[:n]
            echo(ws, text)
            echo(ws, os.urandom(n))
            echo(ws, bytes(rnd.choice(b"abcd") for _ in range(n)))
            print("echoed", n)


def fragmented():
    with deflate() as ws:
        negotiated(ws)
        for parts in [2, 3, 10]:
            chunks = [json_message(i) * 20 for i in range(parts)]
            ws.send(iter(chunks))
            got = ws.recv(timeout=20)
            assert got == "".join(chunks)
            chunks = [os.urandom(5000) for _ in range(parts)]
            ws.send(iter(chunks))
            assert ws.recv(timeout=20) == b"".join(chunks)
            print("fragmented", parts)


def window_bits():
    for bits in range(8, 16):
        # websockets' client compresses with 9 bits at least (zlib has no 8-bit window).
        client_bits = max(bits, 9)
        with deflate(server_max_window_bits=bits, client_max_window_bits=client_bits) as ws:
            e = negotiated(ws)
            assert e.remote_max_window_bits == bits, e.remote_max_window_bits
            for i in range(50):
                echo(ws, json_message(i) * (1 + i % 7))
            echo(ws, ("".join(json_message(i) for i in range(3000))))
            print("window bits", bits)


def no_context_takeover():
    for server, client in [(True, False), (False, True), (True, True)]:
        with deflate(
            server_no_context_takeover=server, client_no_context_takeover=client
        ) as ws:
            e = negotiated(ws)
            assert e.remote_no_context_takeover == server or not server
            assert e.local_no_context_takeover  # hop asks for it by default
            for i in range(100):
                echo(ws, json_message(i))
            print("no context takeover", server, client)


def client_context():
    # The route allows client context takeover: the client keeps its window.
    with deflate() as ws:
        e = negotiated(ws)
        assert not e.local_no_context_takeover
        for i in range(300):
            echo(ws, json_message(i))
        print("client context takeover")


def declined():
    with deflate() as ws:
        assert not ws.protocol.extensions, ws.protocol.extensions
        assert "Sec-WebSocket-Extensions" not in ws.response.headers
        echo(ws, json_message(1))
        print("declined")


def pushed():
    # The server pushes 200 JSON messages from a WsHandle on another thread.
    with deflate() as ws:
        negotiated(ws)
        for i in range(200):
            got = ws.recv(timeout=20)
            assert got == '{"seq":%d,"data":"%s"}' % (i, "abcdefgh" * 20), (i, got)
        print("pushed")


URL = sys.argv[1]
globals()[sys.argv[2]]()
print("done")
