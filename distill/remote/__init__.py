"""Teachers served on Ray: ``distill serve-teacher`` starts named workers that hold the teacher
(``worker``, ``serve``); a training run with ``teacher.remote=NAME`` reaches them through
``teacher.RemoteTeacher``, which receives hidden states and applies the LM head itself."""
