"""The gateway's key file: `NAME SHA256HEX [admin|metrics]`, one mark at most (gateway/keys.py)."""
from __future__ import annotations

import pytest

from captionbus.gateway.keys import KeyRing, add_key, hash_key


def test_marks_give_roles_and_a_key_has_one_role_at_most(tmp_path):
    keys = tmp_path / "keys"
    made = {"alice": add_key(keys, "alice"), "ops": add_key(keys, "ops", admin=True),
            "scrape": add_key(keys, "scrape", metrics=True)}
    ring = KeyRing.load(keys)
    roles = {name: (c.admin, c.metrics_only) for name, key in made.items() if (c := ring.caller(key))}
    assert roles == {"alice": (False, False), "ops": (True, False), "scrape": (False, True)}
    assert ring.caller("cbk_wrong") is None and ring.caller(None) is None
    with pytest.raises(ValueError, match="admin or metrics"):
        add_key(keys, "both", admin=True, metrics=True)
    assert "both" not in KeyRing.load(keys).hashes  # nothing was written
    for marks in ("admin metrics", "metrics admin", "metrics metrics", "reader", "Metrics"):
        bad = tmp_path / "bad"
        bad.write_text(f"eve {hash_key('x')} {marks}\n")
        with pytest.raises(ValueError, match="bad:1"):
            KeyRing.load(bad)
