"""vhostmem: a vhost-user backend with SPDK-style zero-copy guest memory registration."""

__version__ = "0.1.0"
