"""The ``shapes`` preset: a small/large SD3 pair trained here on procedural shape scenes."""
