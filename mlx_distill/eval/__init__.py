"""Evaluation: run backends over an eval set (:mod:`.runner`, :mod:`.harness`), score tool calls
(:mod:`.scoring`), check privacy (:mod:`.privacy`), replay recorded tool results
(:mod:`.broker`), measure performance (:mod:`.perf`), apply gates (:mod:`.gates`) and write the
report (:mod:`.report`); ``mlx-distill eval`` is :mod:`.cli`."""
