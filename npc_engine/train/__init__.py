"""Training of the embedded default model pair (`npc-engine train`); see `npc_engine.train.cli`."""
