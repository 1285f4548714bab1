"""The operators' web dashboard: see board.py for what it watches and why."""
