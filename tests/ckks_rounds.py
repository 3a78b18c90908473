"""Driving a CKKS round by hand in tests: up to the clients' updates, without delivering them."""

from __future__ import annotations

from aggregation import wire


def to_updates(agg, ctx, inputs, clients=None):
    """Run the mask round's first stages; return the server (waiting for masked inputs), the client
    halves and each client's ``ckks/update`` frame (not yet delivered)."""
    clients = clients or {c: agg.client(ctx, c, *inputs[c]) for c in ctx.participants}
    server = agg.server(ctx)
    pending = list(server.start())
    updates: dict[int, bytes] = {}
    while pending and len(updates) < len(ctx.participants):
        nxt = []
        for cid, msg in pending:
            for reply in clients[cid].receive(msg):
                if wire.decode(reply).kind == "ckks/update":
                    updates[cid] = reply
                else:
                    nxt.extend(server.receive(cid, reply))
        pending = nxt
    return server, clients, updates
