"""Driving a CKKS round by hand in tests: up to the clients' updates, without delivering them."""

from __future__ import annotations

from aggregation import wire
from aggregation.ckks import CKKSClient


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


class WeakCKKSClient(CKKSClient):
    """A deliberately weakened CKKS client for the tests that show each defence is load-bearing:
    ``unmasked`` encrypts the update without its mask (as before issue 12), ``skip_check`` decrypts
    any aggregate, ``skip_flooding`` releases the raw decryption."""

    def __init__(self, *args, unmasked=False, skip_check=False, skip_flooding=False):
        self.weak = {"unmasked": unmasked, "skip_check": skip_check, "skip_flooding": skip_flooding}
        super().__init__(*args)

    def _masked(self, payload, mask):
        self.mask_seen = mask.copy()  # what a server that broke the mask round would know
        return payload if self.weak["unmasked"] else super()._masked(payload, mask)

    def _verify(self, values, contributors):
        if not self.weak["skip_check"]:
            super()._verify(values, contributors)

    def _flood(self, payload, data):
        return payload if self.weak["skip_flooding"] else super()._flood(payload, data)


def weak_client(agg, ctx, cid, vector, weight, **flags):
    """A weakened client half built from the aggregator's own keys, plan and mask round."""
    key = agg.keys.client_key(cid, agg.epoch(ctx.round))
    return WeakCKKSClient(ctx, agg.config, key, cid, vector, weight, agg.plan, agg.masks, **flags)
