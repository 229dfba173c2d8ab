"""Dataset readers: each parses one published layout into items; the shared bases in :mod:`softmine.data` do the rest."""
