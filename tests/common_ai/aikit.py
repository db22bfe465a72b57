"""What the common-ai adapter tests share: the answers the ``instant`` emulator gives."""

from __future__ import annotations

JSON_PROMPT = "json:"
"""Prompts starting with this get a fenced JSON answer from the ``instant`` emulator."""

JSON_ANSWER = '```json\n{"label": "billing", "urgent": true}\n```'
"""What a JSON prompt gets, fenced as some models answer in JSON mode."""

FAIL_PATTERN = r"-1$"
"""The second request of every batch (custom id ``<key16>-1``) ends in the error file."""
