"""Stage services. Each stage is one module with a StageDefinition named STAGE; the bus
plumbing around it (services.runtime) is written once. ML libraries are imported here only,
and only inside the stage that needs them."""

# stage name -> module holding its STAGE definition; imported lazily so an env only needs
# the libraries of the stages it serves.
STAGE_MODULES = {
    "demux": "services.demux.stage",
    "source_separation": "services.source_separation.stage",
    "vad": "services.vad.stage",
    "vad_pyannote": "services.vad.pyannote_stage",
    "chunk": "services.chunk.stage",
    "asr": "services.asr.stage",
    "transcript_join": "services.transcript_join.stage",
    "alignment": "services.alignment.stage",
    "translation_indictrans2": "services.translation.indictrans2_stage",
    "translation_nllb": "services.translation.nllb_stage",
    "subtitle_gen": "services.subtitle_gen.stage",
    "mux": "services.mux.stage",
    "noop": "services.noop.stage",
}
