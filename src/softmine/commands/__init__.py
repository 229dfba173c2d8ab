"""The console commands: each module is a thin layer of argument parsing over the library.

:data:`COMMANDS` is the one table of them; ``softmine`` (the umbrella) lists it and
``softmine <command> ...`` runs one.
"""
