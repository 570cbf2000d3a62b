"""The Gilded Tankard: a pygame-ce demo of npc-engine. Run it with `python -m demo_game`."""
