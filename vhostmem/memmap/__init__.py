"""SPDK-style memory maps: registered memory plus 3-level address -> translation maps.

```
reg = MemRegistry()
m = reg.alloc_map(default_translation=0, ops=MapOps(notify=cb, are_contiguous=None), ctx=None)
reg.register(vaddr, length)      # cb(m, ctx, NotifyAction.REGISTER, vaddr, length) per map
reg.unregister(vaddr, length)    # cb(..., UNREGISTER, ...) per chunk, maps in reverse order
m.set_translation(vaddr, size, translation); m.clear_translation(vaddr, size)
m.translate(vaddr) -> (translation, size); m.translate(vaddr, size=n); m.lookup(vaddr) -> int
m.translate_many(addresses) -> numpy uint64 array
reg.register_many(ranges); reg.unregister_many(ranges)   # all or nothing; MapOps.notify_many
m.set_translations(vaddrs, lengths, translations); m.clear_translations(vaddrs, lengths)
```

Addresses are below 2^48; ranges are 4 KiB aligned. Errors are ``MemMapError`` (an ``OSError``)
with ``errno`` EINVAL, EBUSY, ERANGE or ENOMEM as SPDK returns them (EDEADLK when a notify
callback calls back into its registry). A callback's own exception propagates unchanged after
the rollback described in ``_registry``.
"""

from vhostmem.memmap._common import MapOps, MemMapError, NotifyAction
from vhostmem.memmap._map import MemMap
from vhostmem.memmap._registry import MemRegistry

__all__ = ["MapOps", "MemMap", "MemMapError", "MemRegistry", "NotifyAction"]
