"""The teacher-state store: schema, packed layout, encodings, codecs, int8, locations, writer, reader,
chunk reads and the shard cache, verification.

Owns everything about the on-disk (or object-storage) layout. The bottom of stage 1: imports nothing else
from kvmap. `schema` is the one definition of the layout; `writer` and `reader` both import it and never
each other; `sample.decode_sample` is the one sample decoder every reader uses.
"""
