"""shoal agent: the node-local registry mirror that containerd, docker and podman pull through."""
