"""Hostile guests and hostile input: malformed rings (test_rings), malformed control messages
against an in-process server (test_messages) and a real ``vhostmem serve`` process
(test_process), and the fences that make "never outside guest memory" checkable (test_fences).

    .venv/bin/python -m pytest -q tests/hostile            # all (hypothesis sequences: slow)
    .venv/bin/python -m pytest -q tests/hostile -m "not slow"
"""
