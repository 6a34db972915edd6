"""Side-by-side benchmarks of v2mount and MLServer (``python -m benchmarks.compare``).

Not part of the installed package and not run by CI: see ``benchmarks/README.md``.
"""
