"""QEMU harness: boots a real Linux guest beside a vhost-user-blk backend and checks its disk.

Modules: ``assets`` (kernel/busybox cache, initramfs), ``pattern`` (the data pattern and the
expected disk image), ``backends`` (pluggable backend command lines), ``qmp`` (a tiny QMP client),
``guestlog`` (parsing the guest's result lines), ``accel`` (the KVM probe), ``vhost_tap`` (a
recording vhost-user relay), ``hotplug``, ``reconnect`` (backend crash test) and ``launch``
(``run_guest`` and the CLI).
"""
