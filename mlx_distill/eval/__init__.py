"""Evaluation: tool-call scoring (:mod:`.scoring`), PII checks (:mod:`.privacy`) and the tool
broker that replays recorded tool results (:mod:`.broker`)."""
