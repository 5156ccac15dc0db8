"""distill's benchmark suite: ``python -m benchmarks SUITE`` (or ``distill bench SUITE`` in a checkout).

The suites (``ci``, ``full``, ``gpu``) and their members are in ``benchmarks.suite``; the regression
gate that compares a run with the committed baseline is ``benchmarks.compare``.
"""
