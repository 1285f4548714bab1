"""docs/settings.md lists every setting of captionbus.core.settings.Settings: one model, one page."""
from pathlib import Path

from captionbus.core.settings import Settings, settings_markdown

DOC = Path(__file__).resolve().parents[2] / "docs" / "settings.md"


def test_the_settings_page_is_generated_from_the_model():
    assert DOC.read_text() == settings_markdown(), "stale: run `python -m captionbus.core.settings > docs/settings.md`"


def test_no_captionbus_variable_is_read_outside_the_settings_model():
    """Process-wide CAPTIONBUS_* variables are fields of Settings; code outside captionbus/core/settings.py
    reads none of them straight from the environment (stage service options are ServiceOptions
    models; a launcher *setting* variables for a child process is fine)."""
    root = DOC.parents[1]
    readers = []
    for package in ("captionbus", "core", "coordinator", "services", "contracts"):
        for path in (root / package).rglob("*.py"):
            if path.name == "settings.py" and path.parent.name == "core":
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if "settings-exempt:" in line:
                    continue
                if ("os.environ.get(\"CAPTIONBUS_" in line or "os.environ[\"CAPTIONBUS_" in line
                        or "getenv(\"CAPTIONBUS_" in line):
                    readers.append(f"{path.relative_to(root)}:{n}: {line.strip()}")
    assert not readers, "read these through captionbus.core.settings.Settings:\n" + "\n".join(readers)
    assert {"CAPTIONBUS_ACK_WAIT", "CAPTIONBUS_WEBHOOK_SECRET", "CAPTIONBUS_DASHBOARD_TOKEN"} <= {
        f"CAPTIONBUS_{name.upper()}" for name in Settings.model_fields}
