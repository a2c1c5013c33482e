"""shoal tracker: a private BitTorrent HTTP tracker that knows only torrents the origin registered."""
