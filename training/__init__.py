"""Training code for fewstep's embedded default model (teacher -> reflow/one-step student).

Run ``python -m training --help``. Stages: ``teacher``, ``distill``, ``eval``, ``all``,
plus ``pack`` / ``unpack`` helpers for moving results between GPU calls.
"""
