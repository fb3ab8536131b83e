"""An Airflow notifier that records every call in a JSON-lines file (for alert tests)."""

from __future__ import annotations

import json

from airflow.sdk import BaseNotifier


class RecordingNotifier(BaseNotifier):
    template_fields = ("message",)

    def __init__(self, path: str, message: str = "{{ presend_alert }}") -> None:
        super().__init__()
        self.path = path
        self.message = message

    def notify(self, context) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"message": self.message}) + "\n")
