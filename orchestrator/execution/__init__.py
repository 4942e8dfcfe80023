"""Ray: which cluster a command joins (:mod:`.cluster`), what a sweep tries and stops per
category and how trials share slots (:mod:`.scheduling`: Optuna studies or a grid, ASHA), the
Tune experiment (:mod:`.tuner`: build, restore and fit it), what one trial runs
(:mod:`.trial`, :mod:`.worker`), waits with a bound (:mod:`.watchdog`), stops on Ctrl-C
(:mod:`.interrupts`), shows progress (:mod:`.progress`), and what a finished experiment gives
back (:mod:`.results`: one row per trial, and the choice: the best, the Pareto front)."""
