"""shoal origin: fetches blobs from the registry, verifies them, turns them into torrents and seeds."""
