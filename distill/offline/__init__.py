"""Offline teachers: ``distill cache-teacher`` runs the teacher once over a run's data and stores
its hidden states (or top-k log-probabilities) on disk (``build``, in the format of ``store``);
training reads them through ``teacher.CachedTeacher``, with no teacher forward."""
