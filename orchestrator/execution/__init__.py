"""Ray: which cluster a command joins (:mod:`.cluster`), the Tune experiment (:mod:`.tuner`:
build, restore and fit it), what one trial runs (:mod:`.trial`, :mod:`.worker`), how trials
share slots per category (:mod:`.scheduling`), waits with a bound (:mod:`.watchdog`), stops on
Ctrl-C (:mod:`.interrupts`), shows progress (:mod:`.progress`), and what a finished
experiment gives back (:mod:`.results`: one row per trial, and the best)."""
