"""Machine translation of transcripts. `core` is the stage every backend shares (sentence units,
glossary, batching, the output transcript); `nllb_stage` and `indictrans2_stage` each supply a
Translator for their model family. Which backend gets which language pair:
config/translation.yaml (captionbus.core.translation_routes)."""
