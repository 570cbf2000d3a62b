"""Client side of the npc-engine bridge: the wire protocol (`bridge.protocol`) and a Python client."""
from bridge.client import BridgeError, Client
from bridge.protocol import DEFAULT_ADDR, Limits, ProtocolError

__all__ = ["BridgeError", "Client", "DEFAULT_ADDR", "Limits", "ProtocolError"]
