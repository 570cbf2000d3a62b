"""npc-engine: persona-conditioned NPC dialogue from a speculative-decoding core."""
__version__ = "0.1.0"
