"""Training code for fewstep's embedded default models: the image model (teacher -> reflow/one-step
student) and the streaming video model (StreamDiT teacher -> moving-buffer student).

Run ``fewstep train --help``. Stages: ``teacher``, ``distill``, ``eval``, ``all``,
``video-teacher``, ``video-distill``, ``video-eval``, plus ``pack`` / ``unpack`` helpers for moving
results between GPU calls; ``fewstep train study`` holds the CPU-side recipe evidence.
"""
