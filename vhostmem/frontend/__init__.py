"""A vhost-user frontend ("fake guest") that plays QEMU's role against any vhost-user backend.

It never imports the vhostmem server: only `protocol` and the standard library.
"""
