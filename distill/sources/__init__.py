"""Sources of training sequences: each turns a batch of prompts into sequences for the loss
(``docs/algorithms.md``, "Sources of training sequences")."""
