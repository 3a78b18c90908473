"""A hostile SuperNode for the malformed-frame attack over Flower (``attacks/redteam/flower-app-hostile-node``).

That app is the project's real ServerApp with this ClientApp, which relays every message to the
node's client host exactly like :mod:`fedrlhf_secure.transport.client_app`, except on the one
SuperNode whose client-host socket is the run config's ``hostile-node``: there it replaces the
node's answer to the ``fit`` request by the same frame with a wrong type deep in its header (the
first client's fit ``metrics`` as a string). The server loop must drop that node's clients and
finish the round with the others. Kept free of the suite's heavy imports: Flower starts a fresh
ClientApp process for every message.
"""

from __future__ import annotations

from pathlib import Path

try:
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp
except ImportError as exc:  # only Flower starts this module; it needs the flower extra
    raise ImportError("attacks.redteam.flower_hostile is a Flower ClientApp: pip install '.[flower]'") from exc

from fedrlhf_secure.federation.node_protocol import REQUEST, RESPONSE, NodeMessage
from fedrlhf_secure.transport.client_app import MESSAGE_ACTION, pack, unpack
from fedrlhf_secure.transport.local_socket import relay

app = ClientApp()


def hostile_fit_reply(reply: bytes) -> bytes:
    """The node's real fit reply with its first client's ``metrics`` replaced by a string."""
    msg = NodeMessage.decode(reply, RESPONSE)
    fit = dict(msg.header.get("fit", {}))
    if fit:
        first = sorted(fit)[0]
        fit[first] = {**fit[first], "metrics": "not a mapping"}
    return NodeMessage(msg.op, {**msg.header, "fit": fit}, msg.messages, msg.blobs, msg.arrays).encode(RESPONSE)


@app.query(MESSAGE_ACTION)
def hostile_handle(msg: Message, context: Context) -> Message:
    path = str(context.node_config.get("client-host", ""))
    request = unpack(msg.content)
    reply = relay(Path(path), request)
    if path == str(context.run_config.get("hostile-node", "")) and NodeMessage.decode(request, REQUEST).op == "fit":
        reply = hostile_fit_reply(reply)
    return Message(pack(reply), reply_to=msg)
