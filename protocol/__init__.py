"""The vhost-user wire format, sans-IO: bytes + fds in, typed messages out, and back."""
