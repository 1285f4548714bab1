"""transcript_join: chunk transcripts -> one transcript, in chunk order.

This stage's declaration (captionbus.contracts.stage_declaration): pydantic, contracts and the standard
library only. `python -m captionbus.stagegen` copies it to captionbus/contracts/declarations/transcript_join.py for the
coordinator and the CLI, and derives the env map, env stage lists and JSON Schema from it.
"""
from __future__ import annotations

from captionbus.contracts.stage_declaration import StageSpec
from captionbus.contracts.stage_params import StageParams

class TranscriptJoinParams(StageParams):
    """transcript_join: the chunk transcripts, in chunk order, as one transcript (with the
    diarization stage's speakers on its words and segments when a `turns` input is wired)."""


TRANSCRIPT_JOIN = StageSpec(
    name="transcript_join",
    summary="chunk transcripts -> one transcript, in chunk order (speakers on words when turns are given)",
    env="common",
    params=TranscriptJoinParams,
    optional_inputs=("language", "turns"),
    input_lists=("transcripts",),
    outputs=("transcript",),
)

SPECS = (TRANSCRIPT_JOIN,)
