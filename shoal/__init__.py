"""shoal: shared code of the agent, tracker and origin (grammar, store, swarm, registry client, CLI)."""
