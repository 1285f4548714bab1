"""Stage services. Each stage is one module with a StageDefinition named STAGE; the bus
plumbing around it (services.runtime) is written once. ML libraries are imported here only,
and only inside the stage that needs them."""

# stage name -> module holding its STAGE definition; imported lazily so an env only needs
# the libraries of the stages it serves.
STAGE_MODULES = {
    "demux": "services.demux.stage",
    "asr": "services.asr.stage",
    "subtitle_gen": "services.subtitle_gen.stage",
    "mux": "services.mux.stage",
    "noop": "services.noop.stage",
}
