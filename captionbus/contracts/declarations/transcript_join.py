"""transcript_join: chunk transcripts -> one transcript, in chunk order.

The stage's one declaration: captionbus.contracts.stage_declaration says what it holds and what is
derived from it.
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
