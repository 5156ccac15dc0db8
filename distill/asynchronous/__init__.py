"""Asynchronous generation: workers on Ray make the generating sources' sequences ahead of the
trainer, each step's from the student of an exact, bounded staleness (``sources.asynchronous``).
``worker`` is the actor; ``pipeline`` is the trainer's side: what to generate, from which policy
version, and what a checkpoint keeps of the steps generated ahead."""
